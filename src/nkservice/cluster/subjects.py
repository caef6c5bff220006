"""NATS subjects for events (DESIGN.md: "subject interest"), and their escaping.

An event of (service, class, subclass, type, obj_id) is published on
`nks.ev.<service>.<class>.<subclass>.<type>.<obj_id>`; a subscription is interest in the
same subject with NATS's `*` for each field it leaves as `*`. So NATS brings an event only
to the processes holding a subscription that can match it, and their own index finishes
the match (§5.1). An event field sent as `*` is the token `%2A`: only a subscription with
`*` there matches it, the documented asymmetry.

A token must not hold `.`, `*`, `>`, white space, or be empty: every byte outside
`[A-Za-z0-9_-]` is written `%XX`, and the empty string is `%`, which no escaped value is.
A value longer than `MAX_TOKEN` is `~` and a hash of it.
"""

from __future__ import annotations

import functools
import hashlib
import re

from nkservice.events.index import WILDCARD, Topic

EVENTS = "nks.ev"
MAX_TOKEN = 64  # longer values: hashed (a NATS control line holds at most 4 KiB)

_PLAIN = re.compile(r"[A-Za-z0-9_-]+")
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def token(value: str) -> str:
    """One subject token for any string: the string itself, escaped; a long one (whose
    subject NATS would refuse) as a hash of it: another value may then share its subject,
    which costs a needless delivery that the receiving index drops, never a lost one."""
    if len(value) > MAX_TOKEN:
        return "~" + hashlib.blake2b(value.encode("utf-8"), digest_size=16).hexdigest()
    if _PLAIN.fullmatch(value):
        return value
    if not value:
        return "%"
    return "".join(chr(byte) if byte in _SAFE else f"%{byte:02X}"
                   for byte in value.encode("utf-8"))


@functools.lru_cache(maxsize=65536)  # one topic is published again and again
def event_subject(topic: Topic) -> str:
    return ".".join((EVENTS, token(topic.service), token(topic.class_), token(topic.subclass),
                     token(topic.type), token(topic.obj_id)))


def interest_subject(topic: Topic) -> str:
    """What a subscription with this key listens to: `*` where it takes any value."""
    return ".".join((EVENTS, token(topic.service), token(topic.class_),
                     *("*" if value == WILDCARD else token(value)
                       for value in (topic.subclass, topic.type, topic.obj_id))))
