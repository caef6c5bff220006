"""Password checks: constant-time, plain or scrypt-hashed (PROTOCOL.md §3).

A hashed password is written `scrypt$<n>$<r>$<p>$<salt base64>$<hash base64>`;
`nkservice hash-password` prints one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

_N, _R, _P = 2**14, 8, 1


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P)
    return "$".join(["scrypt", str(_N), str(_R), str(_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


def check_password(given: object, stored: str) -> bool:
    if not isinstance(given, str):
        return False
    if stored.startswith("scrypt$"):
        try:
            _, n, r, p, salt, digest = stored.split("$")
            expected = base64.b64decode(digest)
            computed = hashlib.scrypt(given.encode(), salt=base64.b64decode(salt), n=int(n),
                                      r=int(r), p=int(p), dklen=len(expected))
        except ValueError:
            return False
        return hmac.compare_digest(computed, expected)
    return hmac.compare_digest(given.encode(), stored.encode())
