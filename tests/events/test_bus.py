"""The event bus without sockets: delivery once per session, bytes encoded once per variant."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, cast

from nkservice.events.bus import EventBus
from nkservice.events.index import Topic
from nkservice.service.session import Session


@dataclass
class FakeConnection:
    sent: list[bytes] = field(default_factory=list)

    def send_event(self, data: bytes) -> None:
        self.sent.append(data)


@dataclass
class FakeService:
    name: str


@dataclass(eq=False)
class FakeSession:
    """What the bus uses of a session."""

    service: FakeService
    seed_form: bool = False
    conn: FakeConnection = field(default_factory=FakeConnection)
    subscriptions: dict[Topic, Any] = field(default_factory=dict)


def sessions(count: int, service: str = "demo", **options: Any) -> list[Session]:
    return [cast(Session, FakeSession(FakeService(service), **options)) for _ in range(count)]


def sent(session: Session) -> list[bytes]:
    return cast(FakeSession, session).conn.sent


def test_one_encoding_per_variant_whatever_the_number_of_receivers() -> None:
    bus = EventBus()
    plain = sessions(50)
    seed = sessions(20, seed_form=True)
    foreign = sessions(10, service="admin-side")
    with_body = sessions(5)
    topic = Topic("demo", "media", "session", "stop", "1")
    for session in [*plain, *seed, *foreign]:
        bus.subscribe(session, Topic("demo", "media"))
    shared_body = {"tag": "t"}
    for session in with_body:
        bus.subscribe(session, Topic("demo", "media", type="stop"), shared_body)

    assert bus.publish(topic, {"k": 1}) == 85
    for group in (plain, seed, foreign, with_body):
        payloads = [sent(s)[0] for s in group]
        assert all(p is payloads[0] for p in payloads)  # the same bytes object: encoded once
    assert json.loads(sent(plain[0])[0]) == {"class": "media", "subclass": "session",
                                             "type": "stop", "obj_id": "1", "body": {"k": 1}}
    assert json.loads(sent(seed[0])[0])["obj"] == "session"
    assert json.loads(sent(foreign[0])[0])["service"] == "demo"
    assert json.loads(sent(with_body[0])[0])["body"] == {"tag": "t", "k": 1}


def test_drop_removes_everything_of_a_session() -> None:
    bus = EventBus()
    (alice,) = sessions(1)
    bus.subscribe(alice, Topic("demo", "a"))
    bus.subscribe(alice, Topic("demo", "b", obj_id="x"), {"v": 1})
    assert [s.topic.class_ for s in bus.drop(alice)] == ["a", "b"]
    assert len(bus.index) == 0 and alice.subscriptions == {}
    assert bus.publish(Topic("demo", "a")) == 0
