"""Python plugins (PROTOCOL.md §8): loading, dependency order, pass-through, settings, and
the example plugin in examples/."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from nkservice.errors import ConfigError
from nkservice.plugins.loader import plugin_links
from nkservice.service.config import ServiceConfig, parse_service
from tests.plugins import sample
from tests.service.fakes import Client, FakeNode, code_of

EXAMPLES = Path(__file__).parents[2] / "examples"


def definition(plugins: list[str], tables: dict[str, Any] | None = None) -> ServiceConfig:
    return parse_service("demo", {"plugins": plugins, "plugin": tables or {}}, Path("."))


async def test_the_chain_runs_from_the_top_plugin_down_to_the_base() -> None:
    links = plugin_links(definition(["tests.plugins.sample:Top", "tests.plugins.sample:Other"]),
                         "services.demo.")
    assert [getattr(link, "name", None) for link in links] == ["top", "other", "base"]
    service = FakeNode().add("demo", logic=links)
    sample.SEEN.clear()
    alice = Client(service)
    assert (await alice.login("alice", "pw1"))["result"] == "ok"
    assert sample.SEEN == ["top.login", "other.login", "base.login"]  # all passed
    sample.SEEN.clear()
    assert (await alice.request("x", class_="other"))["data"] == {"served_by": "other"}
    assert sample.SEEN == ["top.other", "other.other"]  # decided: base never asked
    assert code_of(await alice.request("x", class_="nobody")) == 100050
    assert (await alice.request("ping"))["result"] == "ok"  # the core at the base


@pytest.mark.parametrize(("names", "tables", "message"), [
    (("nope",), {}, "services.demo.plugins: no built-in plugin 'nope'"),
    (("tests.plugins.missing:X",), {}, "cannot load plugin"),
    (("tests.plugins.sample:NOT_A_PLUGIN",), {}, "is not a nkservice Plugin"),
    (("tests.plugins.sample:Loop",), {}, "in a circle: "),
    (("tests.plugins.sample:Base",), {"ghost": {}}, "services.demo.plugin.ghost"),
    (("tests.plugins.sample:Base",), {"base": {"k": 1}},
     "services.demo.plugin.base.k: unknown key"),
])
def test_bad_plugin_configuration_names_the_key(names: tuple[str, ...],
                                                tables: dict[str, dict[str, object]],
                                                message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        plugin_links(definition(list(names), tables), "services.demo.")


@pytest.fixture
def examples_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delitem(sys.modules, "chat_plugin", raising=False)


@pytest.mark.usefixtures("examples_on_path")
async def test_the_example_chat_plugin() -> None:
    links = plugin_links(definition(["chat_plugin:ChatRooms"], {"chat": {"max_rooms": 1}}),
                         "services.demo.")
    service = FakeNode().add("demo", logic=links)
    alice, bob = Client(service), Client(service)
    await alice.login("alice", "pw1")
    await bob.login("bob", "pw2")
    assert code_of(await bob.request("subscribe", {"class": "chat", "obj_id": "r1"})) == 100030
    assert (await alice.request("join", {"room": "r1"}, class_="chat"))["data"] == {
        "members": ["alice"]}
    assert code_of(await alice.request("join", {"room": "r2"}, class_="chat")) == 100040
    await alice.request("subscribe", {"class": "chat", "obj_id": "r1"})
    alice.conn.receive(b'{"class":"chat","cmd":"say","tid":"s","data":{"room":"r1","text":"hi"}}')
    event, answer = await alice.wire.recv(), await alice.wire.recv()  # published, then ok
    assert answer == {"result": "ok", "tid": "s"}
    assert event["data"] == {"class": "chat", "subclass": "room", "obj": "room",
                             "type": "message", "obj_id": "r1",
                             "body": {"user": "alice", "text": "hi"}}


@pytest.mark.usefixtures("examples_on_path")
def test_the_example_plugins_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"services\.demo\.plugin\.chat\.max_rooms"):
        plugin_links(definition(["chat_plugin:ChatRooms"], {"chat": {"max_rooms": 0}}),
                     "services.demo.")
