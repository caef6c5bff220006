"""The subscription index against a brute-force matcher (PROTOCOL.md §5.1, §5.2)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nkservice.events.index import WILDCARD, Subscription, SubscriptionIndex, Topic

VALUES = st.sampled_from([WILDCARD, "a", "b"])
topics = st.builds(Topic, service=st.sampled_from(["s1", "s2"]),
                   class_=st.sampled_from(["media", "chat"]),
                   subclass=VALUES, type=VALUES, obj_id=VALUES)


def brute_force(subscriptions: list[tuple[int, Topic, Subscription]], event: Topic
                ) -> dict[int, Subscription]:
    """§5.1 read literally, and §5.2's choice: most specific, then oldest."""
    chosen: dict[int, Subscription] = {}
    for subscriber, topic, subscription in subscriptions:
        matches = (topic.service == event.service and topic.class_ == event.class_
                   and all(mine in (WILDCARD, theirs)
                           for mine, theirs in zip(topic.key, event.key, strict=True)))
        if not matches:
            continue
        best = chosen.get(subscriber)
        if best is None or (subscription.topic.specificity, -subscription.order) > (
                best.topic.specificity, -best.order):
            chosen[subscriber] = subscription
    return chosen


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, 5), topics, st.integers(0, 3)), max_size=40),
       st.lists(st.tuples(st.integers(0, 5), topics), max_size=10),
       st.lists(topics, min_size=1, max_size=10))
def test_index_matches_like_brute_force(adds: list[tuple[int, Topic, int]],
                                        removes: list[tuple[int, Topic]],
                                        events: list[Topic]) -> None:
    index: SubscriptionIndex[int] = SubscriptionIndex()
    live: dict[tuple[int, Topic], Subscription] = {}
    for subscriber, topic, body in adds:
        live[(subscriber, topic)] = index.add(subscriber, topic, {"n": body})
    for subscriber, topic in removes:
        assert index.remove(subscriber, topic) == (live.pop((subscriber, topic), None)
                                                   is not None)
    assert len(index) == len(live)
    everything = [(subscriber, topic, sub) for (subscriber, topic), sub in live.items()]
    for event in events:
        assert index.match(event) == brute_force(everything, event)


def test_the_senders_wildcard_only_reaches_wildcards() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("fixed", Topic("s", "media", "session", "stop", "1"))
    index.add("any", Topic("s", "media"))
    index.add("typed", Topic("s", "media", type="stop"))
    assert set(index.match(Topic("s", "media", "session", "stop", "1"))) == {
        "fixed", "any", "typed"}
    assert set(index.match(Topic("s", "media", "session"))) == {"any"}
    assert index.match(Topic("s2", "media")) == {}


def test_resubscribing_replaces_the_body_and_keeps_the_age() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    first = index.add("x", Topic("s", "c", "a"), {"v": 1})
    index.add("x", Topic("s", "c", type="t"), {"v": 2})
    again = index.add("x", Topic("s", "c", "a"), {"v": 3})
    assert again is first and first.body == {"v": 3}
    # Equal specificity: the older subscription's body is the one delivered.
    assert index.match(Topic("s", "c", "a", "t"))["x"].body == {"v": 3}
    assert len(index) == 2
