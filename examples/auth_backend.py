"""An external app for nkservice: it decides who logs in to a service and serves a class of
commands of its own, over the same API as any client (PROTOCOL.md §7).

    python examples/auth_backend.py ws://127.0.0.1:9010/ --service demo

It connects to the node's core service as the global administrator (user `admin`, password
from `--password` or `NKSERVICE_ADMIN_PASSWORD`, default `admin`), then registers for:

- the `login` callback of the service: users log in against the table `ACCOUNTS` below
  (the service's own static users are asked only when this app is not connected);
- the `cmd` callback for the class `notes`: `notes`/`add` keeps a note for the user,
  `notes`/`list` returns the user's notes.

Run several copies: each callback goes to one of them, round-robin, and to another one when
one dies. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from nkservice.client import Client
from nkservice.errors import ApiError, ErrorCode

ACCOUNTS = {"carol": "c4rol", "dave": "d4ve"}  # a real app asks its own user store
NOTES: dict[str, list[str]] = {}


def authorize(login: dict[str, Any]) -> dict[str, Any]:
    """The `api_server_login` callback: the answer decides the login."""
    if ACCOUNTS.get(login["user"]) != login["password"]:
        return {"authorized": False, "reason": "Invalid password"}
    return {"authorized": True, "meta": {"checked_by": "auth_backend"}}


def notes(call: dict[str, Any]) -> Any:
    """The `api_server_cmd` callback of class `notes`: its answer is the user's answer."""
    request, user = call["request"], call["user"]
    if request["cmd"] == "add":
        text = (request.get("data") or {}).get("text")
        if not isinstance(text, str):
            raise ApiError(ErrorCode.missing_field, "text")
        NOTES.setdefault(user, []).append(text)
        return {"count": len(NOTES[user])}
    if request["cmd"] == "list":
        return {"notes": NOTES.get(user, [])}
    raise ApiError(ErrorCode.unknown_command, request["cmd"])


async def serve(url: str, service: str, password: str, ready: asyncio.Event | None = None
                ) -> None:
    async with Client(url, reconnect=True) as client:
        await client.login("admin", password)
        await client.register_callback("login", authorize, service=service)
        await client.register_callback("cmd", notes, service=service, class_="notes")
        print(f"serving logins and the class 'notes' of service {service!r}", flush=True)
        if ready is not None:
            ready.set()
        await client.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the core service, e.g. ws://127.0.0.1:9010/")
    parser.add_argument("--service", default="demo")
    parser.add_argument("--password", default=os.environ.get("NKSERVICE_ADMIN_PASSWORD",
                                                             "admin"))
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.url, args.service, args.password))
    except KeyboardInterrupt:
        pass
    except (ApiError, OSError) as exc:
        raise SystemExit(f"auth_backend: {exc}") from None


if __name__ == "__main__":
    main()
