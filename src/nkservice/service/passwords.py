"""Password checks: constant-time, plain or scrypt-hashed (PROTOCOL.md §3).

A hashed password is written `scrypt$<n>$<r>$<p>$<salt base64>$<hash base64>`;
`nkservice hash-password` prints one. One scrypt check takes tens of milliseconds of CPU, so
`verify_password` runs it on a small thread pool (`hashlib.scrypt` releases the GIL): the
event loop, and every other connection of the node, never waits for it. The pool is bounded,
so a flood of wrong passwords queues up instead of taking every core.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from concurrent.futures import ThreadPoolExecutor

_N, _R, _P = 2**14, 8, 1
HASH_PREFIX = "scrypt$"
HASHING_THREADS = 2

_pool: ThreadPoolExecutor | None = None


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P)
    return "$".join(["scrypt", str(_N), str(_R), str(_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


def check_password(given: object, stored: str) -> bool:
    """The check itself, blocking: use `verify_password` on the event loop."""
    if not isinstance(given, str):
        return False
    if stored.startswith(HASH_PREFIX):
        try:
            _, n, r, p, salt, digest = stored.split("$")
            expected = base64.b64decode(digest)
            computed = hashlib.scrypt(given.encode(), salt=base64.b64decode(salt), n=int(n),
                                      r=int(r), p=int(p), dklen=len(expected))
        except ValueError:
            return False
        return hmac.compare_digest(computed, expected)
    return hmac.compare_digest(given.encode(), stored.encode())


async def verify_password(given: object, stored: str) -> bool:
    """`check_password` without blocking the loop: hashed ones run on the hashing pool."""
    if not (isinstance(given, str) and stored.startswith(HASH_PREFIX)):
        return check_password(given, stored)
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(HASHING_THREADS, thread_name_prefix="nkservice-scrypt")
    return await asyncio.get_running_loop().run_in_executor(_pool, check_password, given,
                                                            stored)
