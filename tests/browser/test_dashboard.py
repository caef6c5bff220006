"""The dashboard in a real browser (Debian's chromium, driven by playwright) against a real
`nkservice serve` process: log in, live sessions, the event stream, the console, services
created, updated and stopped from the page. Each test saves a screenshot (see conftest)."""

from __future__ import annotations

import asyncio
import json

import pytest
from playwright.async_api import Locator, Page, expect

from nkservice.client import ApiError, Client
from tests.browser.conftest import (
    ADMIN,
    DEMO_ADMIN,
    DEMO_USERS,
    ClientFactory,
    PageErrors,
    RunningNode,
    Screenshot,
    service_row,
)
from tests.conftest import free_port

# The session lifecycle events reach the page at once; the counts are also refreshed every
# second. "Within 1 s" is the promise for a session appearing or going.
LIVE = 1_000


def session_row(page: Page, session_id: str | None) -> Locator:
    assert session_id is not None
    return page.locator(f'#sessions-table tr[data-session-id="{session_id}"]')


def count_of(page: Page, service: str) -> Locator:
    return service_row(page, service).get_by_test_id("session-count")


async def closed(client: Client, within: float = 5.0) -> None:
    """Until the server has ended this client's connection."""
    async with asyncio.timeout(within):
        await client.closed.wait()


async def test_log_in(page: Page, node: RunningNode, screenshot: Screenshot) -> None:
    await page.goto(node.page_url)
    # The page connects to the WebSocket of the listener that served it.
    await expect(page.locator("#login-url")).to_have_value(node.core_ws)
    await expect(page.locator("#app")).to_be_hidden()

    await page.get_by_label("Password", exact=True).fill("wrong")
    await page.get_by_role("button", name="Log in").click()
    error = page.locator("#login-error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("Invalid password")
    await expect(page.locator("#app")).to_be_hidden()
    await screenshot("login")

    await page.get_by_label("Password", exact=True).fill(ADMIN[1])
    await page.get_by_role("button", name="Log in").click()
    await expect(page.locator("#connection")).to_have_text(f"Connected as {ADMIN[0]}")
    await expect(error).to_be_hidden()
    await expect(page.locator("#login-panel")).to_be_hidden()
    await expect(page.get_by_test_id("service-row")).to_have_count(2)
    core, demo = service_row(page, "core"), service_row(page, "demo")
    await expect(core).to_contain_text(node.core_ws)
    await expect(demo).to_contain_text(node.demo_ws)
    await expect(demo).to_contain_text(node.demo_tcp)
    await expect(demo).to_contain_text("config")
    await expect(count_of(page, "core")).to_have_text("1")  # the dashboard itself
    await expect(count_of(page, "demo")).to_have_text("0")
    await expect(page.get_by_test_id("session-row")).to_have_count(1)
    await expect(page.get_by_test_id("session-row")).to_contain_text("this dashboard")
    await screenshot("overview")

    await page.get_by_role("button", name="Log out").click()
    await expect(page.locator("#login-panel")).to_be_visible()
    await expect(page.locator("#connection")).to_have_text("Logged out.")
    await expect(page.locator("#app")).to_be_hidden()

    # In again: a new session, the old one gone.
    await page.get_by_label("Password", exact=True).fill(ADMIN[1])
    await page.get_by_role("button", name="Log in").click()
    await expect(page.locator("#connection")).to_have_text(f"Connected as {ADMIN[0]}")
    await expect(page.get_by_test_id("service-row")).to_have_count(2)
    await expect(count_of(page, "core")).to_have_text("1")
    await expect(page.get_by_test_id("session-row")).to_have_count(1)


async def test_a_session_appears_within_one_second(
        dashboard: Page, node: RunningNode, connect: ClientFactory,
        screenshot: Screenshot) -> None:
    page = dashboard
    alice = await connect(node.demo_ws, "alice", DEMO_USERS["alice"])
    row = session_row(page, alice.session_id)
    await expect(row).to_be_visible(timeout=LIVE)
    await expect(count_of(page, "demo")).to_have_text("1", timeout=LIVE)
    await expect(row).to_contain_text("alice")
    await expect(row).to_contain_text("demo")
    await expect(row).to_contain_text("ws:127.0.0.1:")

    bob = await connect(node.demo_tcp, "bob", DEMO_USERS["bob"])
    bob_row = session_row(page, bob.session_id)
    await expect(bob_row).to_be_visible(timeout=LIVE)
    await expect(bob_row).to_contain_text("tcp")
    await expect(count_of(page, "demo")).to_have_text("2", timeout=LIVE)

    # Filters: by user, then by service.
    await page.locator("#sessions-user").fill("bob")
    await expect(bob_row).to_be_visible()
    await expect(row).to_be_hidden()
    await expect(page.get_by_test_id("session-row")).to_have_count(1)
    await page.locator("#sessions-user").fill("")
    await page.locator("#sessions-service").select_option("core")
    await expect(page.get_by_test_id("session-row")).to_have_count(1)
    await expect(page.get_by_test_id("session-row")).to_contain_text("this dashboard")
    await page.locator("#sessions-service").select_option("demo")
    await expect(page.get_by_test_id("session-row")).to_have_count(2)
    await screenshot("sessions", page.locator("#sessions-panel"))

    # A session that ends goes within 1 s too.
    await alice.close()
    await expect(row).to_be_hidden(timeout=LIVE)
    await expect(count_of(page, "demo")).to_have_text("1", timeout=LIVE)


async def test_stop_a_session(dashboard: Page, node: RunningNode,
                              connect: ClientFactory) -> None:
    page = dashboard
    alice = await connect(node.demo_ws, "alice", DEMO_USERS["alice"])
    bob = await connect(node.demo_ws, "bob", DEMO_USERS["bob"])
    row = session_row(page, alice.session_id)
    await row.get_by_role("button", name="Stop").click()
    await closed(alice)
    await expect(page.locator("#sessions-status")).to_contain_text(
        f"Stopped session {alice.session_id}")
    await expect(row).to_be_hidden(timeout=LIVE)
    await expect(count_of(page, "demo")).to_have_text("1", timeout=LIVE)
    # Only that one.
    assert bob.connected
    assert await bob.request("core", "ping") is None


async def test_a_sessions_subscriptions(dashboard: Page, node: RunningNode,
                                        connect: ClientFactory,
                                        screenshot: Screenshot) -> None:
    page = dashboard
    alice = await connect(node.demo_ws, "alice", DEMO_USERS["alice"])
    await alice.subscribe("chat", "room", obj_id="r1", body={"from": "test"})
    await session_row(page, alice.session_id).get_by_role(
        "button", name="Subscriptions").click()
    await expect(page.locator("#subscriptions-of")).to_contain_text(str(alice.session_id))
    rows = page.get_by_test_id("subscription-row")
    # Its own and the two automatic ones, not the dashboard's.
    await expect(rows).to_have_count(3)
    chat = rows.filter(has_text="chat")
    await expect(chat).to_contain_text("room")
    await expect(chat).to_contain_text("r1")
    await expect(chat).to_contain_text('{"from":"test"}')
    await expect(rows.filter(has_text="user_event")).to_contain_text("alice")
    await expect(rows.filter(has_text="session_event")).to_contain_text(str(alice.session_id))
    await screenshot("subscriptions", page.locator("#subscriptions-panel"))

    await alice.unsubscribe("chat", "room", obj_id="r1")
    await page.locator("#subscriptions-refresh").click()
    await expect(rows).to_have_count(2)


async def test_an_event_sent_by_a_client_appears_in_the_stream(
        dashboard: Page, node: RunningNode, connect: ClientFactory,
        screenshot: Screenshot) -> None:
    page = dashboard
    await page.locator("#stream-class").fill("chat")
    await page.locator("#stream-subclass").fill("room")
    await page.locator("#stream-service").fill("demo")
    await page.get_by_role("button", name="Subscribe", exact=True).click()
    await expect(page.get_by_test_id("stream-subscription").locator("code")).to_have_text(
        "chat/room/*/* in demo")
    await expect(page.locator("#stream-status")).to_have_text(
        "Subscribed to chat/room/*/* in demo.")

    sender = await connect(node.demo_ws, *DEMO_ADMIN)
    # Not matched (another subclass), then matched: events of one sender arrive in order,
    # so once the second is shown the first would be there if it had been delivered.
    await sender.send_event("chat", "lobby", "message", "l1", body={"text": "not for us"})
    await sender.send_event("chat", "room", "message", "r1", body={"text": "<b>hello</b>"})
    events = page.get_by_test_id("event")
    await expect(events).to_have_count(1)
    await expect(events).to_contain_text("chat/room/message/r1")
    # Shown as text, never read as HTML.
    await expect(events).to_contain_text('{"text":"<b>hello</b>"}')
    await expect(events.locator("b")).to_have_count(0)
    await expect(events).to_contain_text("demo")
    await expect(events).not_to_contain_text("not for us")

    # Wildcards: a second filter on a type, with obj_id left to "*".
    await page.locator("#stream-class").fill("chat")
    await page.locator("#stream-subclass").fill("*")
    await page.locator("#stream-type").fill("typing")
    await page.get_by_role("button", name="Subscribe", exact=True).click()
    await expect(page.get_by_test_id("stream-subscription")).to_have_count(2)
    await sender.send_event("chat", "lobby", "typing", "l1", body={"who": "bob"})
    await expect(events).to_have_count(2)
    await expect(events.first).to_contain_text("chat/lobby/typing/l1")
    await screenshot("events", page.locator("#events-panel"))

    # Unsubscribed: nothing more from that filter.
    await page.get_by_role("button", name="Unsubscribe from chat/room/*/* in demo").click()
    await expect(page.get_by_test_id("stream-subscription")).to_have_count(1)
    await sender.send_event("chat", "room", "message", "r1", body={"text": "gone"})
    await sender.send_event("chat", "room", "typing", "r1", body={"who": "carol"})
    await expect(events).to_have_count(3)
    await expect(events.first).to_contain_text("carol")
    await expect(page.locator("#event-log")).not_to_contain_text("gone")


async def test_a_command_sent_from_the_console_shows_its_answer(
        dashboard: Page, node: RunningNode, connect: ClientFactory,
        screenshot: Screenshot) -> None:
    page = dashboard
    alice = await connect(node.demo_ws, "alice", DEMO_USERS["alice"])
    result = page.get_by_test_id("console-result")

    await page.locator("#console-subclass").fill("user")
    await page.locator("#console-cmd").fill("list")
    await page.locator("#console-data").fill(json.dumps({"service": "demo"}))
    await page.get_by_role("button", name="Send").click()
    await expect(result).to_have_attribute("data-state", "ok")
    answer = json.loads(await result.inner_text())
    assert answer == {"alice": [alice.session_id]}
    await expect(page.locator("#console-state")).to_contain_text("core user list: ok")
    await screenshot("console", page.locator("#console-panel"))

    await page.locator("#console-subclass").fill("")
    await page.locator("#console-cmd").fill("get_user")
    await page.locator("#console-data").fill('{"user": "nobody", "service": "demo"}')
    await page.get_by_role("button", name="Send").click()
    await expect(result).to_have_attribute("data-state", "error")
    await expect(result).to_have_text("User not found (user_not_found, 100033)")

    await page.locator("#console-data").fill("{not json")
    await page.get_by_role("button", name="Send").click()
    await expect(page.locator("#console-state")).to_contain_text("The data is not JSON")
    await expect(result).to_have_text("")


async def test_a_service_created_from_the_form_takes_logins_and_stopping_it_closes_them(
        dashboard: Page, node: RunningNode, connect: ClientFactory,
        screenshot: Screenshot) -> None:
    page = dashboard
    port = free_port()
    await page.locator("#service-name").fill("chat")
    await page.locator("#service-listen").fill(
        f"ws://127.0.0.1:{port}/\ntcp://127.0.0.1:{port}")
    await page.locator("#service-admin-user").fill("chat-admin")
    await page.get_by_role("button", name="Create").click()
    await expect(page.get_by_test_id("editor-status")).to_have_text(
        "Cannot create: the service admin needs a password")
    await page.locator("#service-admin-password").fill("chat-pw")
    await page.locator("#service-users").fill("carol = pw3\ndave = pw4")
    await page.locator("#service-ping-interval").fill("30")
    await page.get_by_role("button", name="Create").click()
    await expect(page.get_by_test_id("editor-status")).to_have_text("Service chat created.")
    row = service_row(page, "chat")
    await expect(row).to_contain_text(f"tcp://127.0.0.1:{port}")
    await expect(row).to_contain_text("api")

    carol = await connect(f"tcp://127.0.0.1:{port}", "carol", "pw3")
    dave = await connect(f"ws://127.0.0.1:{port}/", "dave", "pw4")
    chat_admin = await connect(f"ws://127.0.0.1:{port}/", "chat-admin", "chat-pw")
    await expect(count_of(page, "chat")).to_have_text("3", timeout=LIVE)
    await expect(session_row(page, carol.session_id)).to_be_visible(timeout=LIVE)
    with pytest.raises(ApiError) as refused:
        await connect(f"ws://127.0.0.1:{port}/", "carol", "wrong")
    assert refused.value.code == 100038
    await screenshot("service-created", page.locator("#services-panel"))

    await page.get_by_role("button", name="Stop…").click()
    await page.get_by_role("button", name="Really stop chat").click()
    await expect(page.get_by_test_id("editor-status")).to_have_text("Service chat stopped.")
    for client in (carol, dave, chat_admin):
        await closed(client)
    await expect(row).to_be_hidden(timeout=LIVE)
    await expect(session_row(page, carol.session_id)).to_be_hidden()
    with pytest.raises(OSError):
        await connect(f"tcp://127.0.0.1:{port}", "carol", "pw3")


async def test_a_service_from_text_then_updated_from_the_form(
        dashboard: Page, node: RunningNode, connect: ClientFactory,
        screenshot: Screenshot) -> None:
    page = dashboard
    port = free_port()
    await page.get_by_label("as JSON or TOML text").check()
    await expect(page.locator("#service-listen")).to_be_hidden()
    await page.locator("#service-text").fill(f"""# a TOML definition
name = "shop"
listen = ["ws://127.0.0.1:{port}/"]
users = {{ erin = "pw5" }}
ping_interval = 0

[permissions]
user = ["core.user.list"]
""")
    await page.get_by_role("button", name="Create").click()
    await expect(page.get_by_test_id("editor-status")).to_have_text("Service shop created.")
    await expect(service_row(page, "shop")).to_be_visible()
    erin = await connect(f"ws://127.0.0.1:{port}/", "erin", "pw5")
    assert await erin.request("core", "list_users") == {"erin": [erin.session_id]}

    # Bad text is refused on the page, and by the server with the key named.
    await page.locator("#service-text").fill('name = "shop"\nlisten = [')
    await page.get_by_role("button", name="Update").click()
    await expect(page.get_by_test_id("editor-status")).to_contain_text("Cannot update")
    await page.locator("#service-text").fill(json.dumps({"name": "shop", "users": {"x": 5}}))
    await page.get_by_role("button", name="Update").click()
    await expect(page.get_by_test_id("editor-status")).to_contain_text("users.x")

    # The form: Load, change users and the ping interval; only those are sent.
    await page.get_by_label("with the form").check()
    await page.locator("#service-name").fill("shop")
    await page.get_by_role("button", name="Load").click()
    await expect(page.get_by_test_id("editor-status")).to_have_text("Loaded shop.")
    await expect(page.locator("#service-listen")).to_have_value(f"ws://127.0.0.1:{port}/")
    await expect(page.locator("#service-permissions")).to_have_value("user = core.user.list")
    await page.locator("#service-users").fill("frank = pw6")
    await page.locator("#service-ping-interval").fill("25")
    await page.get_by_role("button", name="Update").click()
    await expect(page.get_by_test_id("editor-status")).to_have_text("Service shop updated.")
    await screenshot("service-editor", page.locator("#editor-panel"))

    admin = await connect(node.core_ws, *ADMIN)
    definition = await admin.request("core", "get_service", {"name": "shop"})
    assert definition["ping_interval"] == 25
    assert definition["users"] == ["frank"]
    assert definition["listen"] == [f"ws://127.0.0.1:{port}/"]
    assert definition["permissions"] == {"user": ["core.user.list"]}
    frank = await connect(f"ws://127.0.0.1:{port}/", "frank", "pw6")
    assert frank.connected
    with pytest.raises(ApiError):
        await connect(f"ws://127.0.0.1:{port}/", "erin", "pw5")


async def test_services_changed_elsewhere_show_at_once(
        dashboard: Page, node: RunningNode, connect: ClientFactory) -> None:
    page = dashboard
    admin = await connect(node.core_ws, *ADMIN)
    port = free_port()
    await admin.request("core", "create_service",
                        {"name": "news", "listen": [f"ws://127.0.0.1:{port}/"],
                         "users": {"gina": "pw7"}})
    row = service_row(page, "news")
    await expect(row).to_be_visible(timeout=LIVE)
    gina = await connect(f"ws://127.0.0.1:{port}/", "gina", "pw7")
    await expect(session_row(page, gina.session_id)).to_be_visible(timeout=LIVE)
    await expect(count_of(page, "news")).to_have_text("1", timeout=LIVE)
    await admin.request("core", "update_service",
                        {"name": "news", "listen": [f"tcp://127.0.0.1:{port}"]})
    await expect(row).to_contain_text(f"tcp://127.0.0.1:{port}", timeout=LIVE)
    await admin.request("core", "stop_service", {"name": "news"})
    await expect(row).to_be_hidden(timeout=LIVE)
    await expect(session_row(page, gina.session_id)).to_be_hidden(timeout=LIVE)


async def test_the_dashboard_reconnects_when_the_node_restarts(
        dashboard: Page, node: RunningNode, connect: ClientFactory,
        page_errors: PageErrors) -> None:
    page = dashboard
    page_errors.allow(r"WebSocket connection to .* failed")  # while the node is down
    connection = page.locator("#connection")
    await node.stop()
    await expect(connection).to_have_attribute("data-state", "reconnecting")
    await expect(connection).to_contain_text("server shutting down")
    await node.start()
    await expect(connection).to_have_text(f"Connected as {ADMIN[0]}", timeout=15_000)
    await expect(count_of(page, "core")).to_have_text("1")
    # Its subscriptions came back with it: a new session shows as fast as before.
    alice = await connect(node.demo_ws, "alice", DEMO_USERS["alice"])
    await expect(session_row(page, alice.session_id)).to_be_visible(timeout=LIVE)
    await expect(count_of(page, "demo")).to_have_text("1", timeout=LIVE)


TOML_CASES: list[tuple[str, object]] = [
    ('name = "chat"\nlisten = ["ws://127.0.0.1:9020/", # the first\n  "tcp://127.0.0.1:9020"]\n'
     'admin = { user = "chat-admin", password = "pw" }\nping_interval = 30\n'
     'request_timeout = 0.5\nresume_window = 1_000\n',
     {"name": "chat", "listen": ["ws://127.0.0.1:9020/", "tcp://127.0.0.1:9020"],
      "admin": {"user": "chat-admin", "password": "pw"}, "ping_interval": 30,
      "request_timeout": 0.5, "resume_window": 1000}),
    ("name = 'lit\\eral'\nscript_code = \"\"\"\nfunction login(req) return true end\n\"\"\"\n"
     "[permissions]\nuser = [\"core.user.list\"]\n[plugin.gelf]\n\"a.b\" = true\n",
     {"name": "lit\\eral", "script_code": "function login(req) return true end\n",
      "permissions": {"user": ["core.user.list"]}, "plugin": {"gelf": {"a.b": True}}}),
    ('users.alice = "pw\\u00e9"\n', {"users": {"alice": "pw\u00e9"}}),
    ('{"name": "json", "users": {"x": "y"}}', {"name": "json", "users": {"x": "y"}}),
    ("name = ", "line 1: expected a value"),
    ('name = "open', "line 1: unterminated string"),
    ("a = 1\na = 2", "line 2: a is given twice"),
    ("x = [1,\n", "line 2: expected a value"),
    ("[[array]]", "line 1: arrays of tables are not supported"),
    ("{not json", "not valid JSON"),
]


async def test_the_definition_reader(page: Page, node: RunningNode) -> None:
    """The page's reader of pasted definitions (toml.js): JSON, or TOML."""
    await page.goto(node.page_url)
    answers = await page.evaluate("""async (texts) => {
        const { parseDefinition } = await import("/dashboard/toml.js");
        return texts.map((text) => {
            try { return { ok: parseDefinition(text) }; } catch (e) { return { error: e.message }; }
        });
    }""", [text for text, _ in TOML_CASES])
    for (text, expected), answer in zip(TOML_CASES, answers, strict=True):
        if isinstance(expected, str):
            assert expected in answer.get("error", ""), (text, answer)
        else:
            assert answer == {"ok": expected}, text
