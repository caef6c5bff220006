"""The seed's flat command names and the subclass form they stand for (PROTOCOL.md §9).

A `core` request without `subclass` uses the seed name in `cmd`; `canonical()` maps it to
the (subclass, cmd) pair every handler is registered under.
"""

from __future__ import annotations

SEED_NAMES: dict[str, tuple[str, str]] = {
    "login": ("user", "login"),
    "list_users": ("user", "list"),
    "get_user": ("user", "get"),
    "send_user_event": ("user", "send_event"),
    "stop_session": ("session", "stop"),
    "logout_session": ("session", "stop"),
    "send_session_event": ("session", "send_event"),
    "session_cmd": ("session", "cmd"),
    "call_session": ("session", "cmd"),
    "log": ("session", "log"),
    "subscribe": ("event", "subscribe"),
    "unsubscribe": ("event", "unsubscribe"),
    "get_subscriptions": ("event", "get_subscriptions"),
    "send_event": ("event", "send"),
    "register_callback": ("callback", "register"),
    "unregister_callback": ("callback", "unregister"),
    "list_callbacks": ("callback", "list"),
    "create_service": ("service", "create"),
    "update_service": ("service", "update"),
    "stop_service": ("service", "stop"),
    "list_services": ("service", "list"),
    "get_service": ("service", "get"),
    "ping": ("core", "ping"),
}

# Second spellings in the subclass form itself.
SUBCLASS_ALIASES: dict[tuple[str, str], tuple[str, str]] = {
    ("event", "send_event"): ("event", "send"),
}


def canonical(subclass: str | None, cmd: str) -> tuple[str, str] | None:
    """The (subclass, cmd) of a core request, or None when the name is unknown."""
    if subclass is None:
        return SEED_NAMES.get(cmd)
    return SUBCLASS_ALIASES.get((subclass, cmd), (subclass, cmd))
