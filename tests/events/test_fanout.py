"""Fan-out without sockets or sessions: delivery once per subscriber, bytes encoded once per
variant, interest told to the bus once per key."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from nkservice.events.bus import LocalBus
from nkservice.events.fanout import Events
from nkservice.events.index import Subscription, Topic


@dataclass(eq=False)
class Sink:
    """The least a subscriber is: a namespace, a form, its subscriptions, `deliver`."""

    home: str = "demo"
    seed_form: bool = False
    subscriptions: dict[Topic, Subscription] = field(default_factory=dict)
    sent: list[bytes] = field(default_factory=list)

    def deliver(self, data: bytes) -> None:
        self.sent.append(data)


class RecordingBus(LocalBus):
    def __init__(self) -> None:
        super().__init__()
        self.interest: list[tuple[str, Topic]] = []

    def add_interest(self, topic: Topic) -> None:
        self.interest.append(("add", topic))

    def remove_interest(self, topic: Topic) -> None:
        self.interest.append(("remove", topic))


def sinks(count: int, **options: Any) -> list[Sink]:
    return [Sink(**options) for _ in range(count)]


def test_one_encoding_per_variant_whatever_the_number_of_receivers() -> None:
    events = Events(LocalBus())
    plain = sinks(50)
    seed = sinks(20, seed_form=True)
    foreign = sinks(10, home="admin-side")
    with_body = sinks(5)
    topic = Topic("demo", "media", "session", "stop", "1")
    for sink in [*plain, *seed, *foreign]:
        events.subscribe(sink, Topic("demo", "media"))
    shared_body = {"tag": "t"}
    for sink in with_body:
        events.subscribe(sink, Topic("demo", "media", type="stop"), shared_body)

    events.publish(topic, {"k": 1})
    for group in (plain, seed, foreign, with_body):
        payloads = [s.sent[0] for s in group]
        assert len(payloads) == len(group)
        assert all(p is payloads[0] for p in payloads)  # the same bytes object: encoded once
    assert json.loads(plain[0].sent[0]) == {"class": "media", "subclass": "session",
                                            "type": "stop", "obj_id": "1", "body": {"k": 1}}
    assert json.loads(seed[0].sent[0])["obj"] == "session"
    assert json.loads(foreign[0].sent[0])["service"] == "demo"
    assert json.loads(with_body[0].sent[0])["body"] == {"tag": "t", "k": 1}


def test_drop_removes_everything_of_a_subscriber() -> None:
    events = Events(LocalBus())
    alice = Sink()
    events.subscribe(alice, Topic("demo", "a"))
    events.subscribe(alice, Topic("demo", "b", obj_id="x"), {"v": 1})
    assert [s.topic.class_ for s in events.drop(alice)] == ["a", "b"]
    assert len(events.index) == 0 and alice.subscriptions == {}
    events.publish(Topic("demo", "a"))
    assert alice.sent == []


def test_the_bus_hears_of_each_key_once_while_anyone_holds_it() -> None:
    bus = RecordingBus()
    events = Events(bus)
    alice, bob = Sink(), Sink()
    media, chat = Topic("demo", "media"), Topic("demo", "chat", obj_id="room1")
    events.subscribe(alice, media)
    events.subscribe(bob, media)
    events.subscribe(alice, media, {"again": True})  # a body change is not new interest
    events.subscribe(bob, chat)
    assert bus.interest == [("add", media), ("add", chat)]
    events.unsubscribe(alice, media)
    assert bus.interest[2:] == []
    events.drop(bob)
    assert bus.interest[2:] == [("remove", media), ("remove", chat)]


def test_move_hands_subscriptions_over_without_losing_interest() -> None:
    bus = RecordingBus()
    events = Events(bus)
    old, new = Sink(), Sink()
    events.subscribe(old, Topic("demo", "media"), {"b": 1})
    events.move(old, new)
    assert bus.interest == [("add", Topic("demo", "media"))]
    assert [(s.topic, s.body) for s in new.subscriptions.values()] == [
        (Topic("demo", "media"), {"b": 1})]
    events.publish(Topic("demo", "media"))
    assert old.sent == [] and len(new.sent) == 1
