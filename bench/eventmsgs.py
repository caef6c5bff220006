"""The messages of the event sections, shared by the load generator, the fan-out ceiling
server and the orchestrator's in-process matching benchmark."""

from __future__ import annotations

from typing import Any

import orjson

LOGIN_TID = 0
LOGIN = orjson.dumps(
    {
        "class": "core",
        "subclass": "user",
        "cmd": "login",
        "tid": LOGIN_TID,
        "data": {"user": "admin", "password": "admin"},
    }
)
SUBSCRIBE = b'{"class":"core","subclass":"event","cmd":"subscribe","tid":%d,"data":%b}'

# The event body: {"seq":N,"pad":"xx…"}, about 100 bytes.
PAD = b"x" * 80
# Fan-out: the publisher's send_event, and the subscription that receives it.
FANOUT_TOPIC: dict[str, Any] = {"class": "bench"}
PUBLISH = (
    b'{"class":"core","subclass":"event","cmd":"send","tid":%d,'
    b'"data":{"class":"bench","body":{"seq":%d,"pad":"%b"}}}'
)
# What nkservice delivers for PUBLISH (the ceiling server sends the same bytes).
EVENT = (
    b'{"class":"core","cmd":"event","tid":%d,'
    b'"data":{"class":"bench","body":{"seq":%d,"pad":"%b"}}}'
)

# Matching: the publisher's event, the subscription of the receivers it must reach, and
# the filler subscriptions that it must not.
HIT_TOPIC: dict[str, Any] = {"class": "bench", "type": "hit"}
PUBLISH_HIT = (
    b'{"class":"core","subclass":"event","cmd":"send","tid":%d,'
    b'"data":{"class":"bench","type":"hit","obj_id":"x","body":{"seq":%d,"pad":"%b"}}}'
)
HIT_EVENT: dict[str, str] = {"class": "bench", "type": "hit", "obj_id": "x"}
MATCH_RECEIVERS = 10  # sessions subscribed to HIT_TOPIC
MATCH_FILLERS = 100  # sessions holding the filler subscriptions


def filler_topic(i: int) -> dict[str, Any]:
    """Filler subscription number i: none matches HIT_EVENT; some differ from it in one field
    only, some are in other classes. Every i gives a distinct subscription."""
    kind = i % 5
    if kind == 0:
        return {"class": "bench", "obj_id": f"f{i}"}
    if kind == 1:
        return {"class": "bench", "type": f"t{i}"}
    if kind == 2:
        return {"class": "bench", "type": "hit", "obj_id": f"o{i}"}
    if kind == 3:
        return {"class": "bench", "subclass": f"s{i}", "type": "hit", "obj_id": "x"}
    return {"class": f"c{i % 100}", "type": "hit", "obj_id": f"o{i}"}


def split(total: int, parts: int) -> list[range]:
    """range(total) cut into `parts` consecutive pieces whose sizes differ by one at most."""
    base, extra = divmod(total, parts)
    pieces, start = [], 0
    for part in range(parts):
        size = base + (part < extra)
        pieces.append(range(start, start + size))
        start += size
    return pieces
