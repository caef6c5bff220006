"""Fixtures of the dashboard's browser tests: Debian's chromium driven by playwright, a real
`nkservice serve` process on free ports, the dashboard logged in, Python clients, and
screenshots (under the test's tmp_path; `NKSERVICE_DOC_SCREENSHOTS=1` copies them to
docs/images/dashboard-NAME.png).

Never `playwright install`: it downloads a browser build, which fails here. The chromium of
the system is used; the session fixture installs Debian's package when it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    async_playwright,
    expect,
)

from nkservice.client import Client
from tests.conftest import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
NKSERVICE = Path(sys.executable).parent / "nkservice"
DOC_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
ADMIN = ("admin", "secret")
DEMO_USERS = {"alice": "pw1", "bob": "pw2"}
DEMO_ADMIN = ("demo-admin", "pw")

# Auto-waiting assertions give up after this long (a test that needs less says so).
expect.set_options(timeout=5_000)
HERE = Path(__file__).resolve().parent
INSTALL_TIMEOUT = 900  # seconds for each apt-get call (install, update, install again)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Without chromium, the first test installs it: give these tests the time for that."""
    if CHROMIUM.exists():
        return
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.timeout(3 * INSTALL_TIMEOUT + 60))


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["apt-get", *args], capture_output=True, text=True,
                          timeout=INSTALL_TIMEOUT, check=False,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium, installed with apt-get when it is not there yet."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None:
        pytest.fail(f"{CHROMIUM} is missing and there is no apt-get to install it: install "
                    "a chromium there (Debian's package `chromium`)")
    try:
        result = _apt_get("install", "-y", "chromium")
        if result.returncode != 0:  # a machine whose package lists were never fetched
            _apt_get("update")
            result = _apt_get("install", "-y", "chromium")
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.fail(f"{CHROMIUM} is missing and `apt-get install -y chromium` failed: {error}")
    if result.returncode != 0 or not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing and `apt-get install -y chromium` failed "
                    f"(status {result.returncode}): {result.stderr.strip()[-2000:]}")
    return CHROMIUM


class RunningNode:
    """A `nkservice serve` process: the core service (which serves the dashboard) and a
    `demo` service, each on a ws and a tcp URL sharing one port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.core_port = free_port()
        self.demo_port = free_port()
        self.config = directory / "node.toml"
        self.config.write_text(f"""
[node]
data_dir = "{directory / 'data'}"

[admin]
user = "{ADMIN[0]}"
password = "{ADMIN[1]}"

[core]
listen = ["{self.core_ws}", "tcp://127.0.0.1:{self.core_port}"]

[services.demo]
listen = ["{self.demo_ws}", "{self.demo_tcp}"]
admin = {{ user = "{DEMO_ADMIN[0]}", password = "{DEMO_ADMIN[1]}" }}
users = {{ {", ".join(f'{user} = "{password}"' for user, password in DEMO_USERS.items())} }}
""")
        self.process: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    @property
    def page_url(self) -> str:
        return f"http://127.0.0.1:{self.core_port}/"

    @property
    def core_ws(self) -> str:
        return f"ws://127.0.0.1:{self.core_port}/"

    @property
    def demo_ws(self) -> str:
        return f"ws://127.0.0.1:{self.demo_port}/"

    @property
    def demo_tcp(self) -> str:
        return f"tcp://127.0.0.1:{self.demo_port}"

    async def start(self) -> None:
        """Start the process, until it says it listens on every socket (its log line
        after the binds)."""
        process = self.process = await asyncio.create_subprocess_exec(
            str(NKSERVICE), "serve", "--config", str(self.config), cwd=self.directory,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        stderr = process.stderr
        assert stderr is not None
        self.log.clear()
        async with asyncio.timeout(20):
            while not any("node started" in line for line in self.log):
                line = await stderr.readline()
                if not line:
                    await process.wait()
                    raise AssertionError("nkservice serve exited:\n" + "".join(self.log))
                self.log.append(line.decode(errors="replace"))
        self._drain = asyncio.get_running_loop().create_task(self._read_log(stderr))

    async def _read_log(self, stderr: asyncio.StreamReader) -> None:
        """Keep reading the log, so a full pipe never blocks the node."""
        while line := await stderr.readline():
            self.log.append(line.decode(errors="replace"))

    async def stop(self) -> None:
        """SIGTERM (the node closes its sessions and listeners), until it has exited."""
        process = self.process
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._drain is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
            self._drain = None


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RunningNode]:
    running = RunningNode(tmp_path)
    try:
        await running.start()
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


class PageErrors:
    """Script errors and console errors of the page: any fails the test, but those a test
    expects (`allow`), such as a refused WebSocket while the node restarts."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.allowed: list[re.Pattern[str]] = []

    def allow(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [error for error in self.seen
                if not any(pattern.search(error) for pattern in self.allowed)]


@pytest.fixture
def page_errors() -> PageErrors:
    return PageErrors()


@pytest.fixture
async def page(browser: Browser, node: RunningNode,
               page_errors: PageErrors) -> AsyncIterator[Page]:
    """A page whose script errors fail the test; closed before the node stops."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    opened = await context.new_page()
    opened.on("pageerror", lambda error: page_errors.seen.append(f"page error: {error}"))

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            page_errors.seen.append(f"console error: {message.text}")

    opened.on("console", console)
    yield opened
    await context.close()
    unexpected = page_errors.unexpected()
    assert not unexpected, "\n".join(unexpected)


Screenshot = Callable[..., Awaitable[Path]]


@pytest.fixture
def screenshot(page: Page, tmp_path: Path) -> Screenshot:
    """`await screenshot(NAME)` saves the whole page, `await screenshot(NAME, locator)` one
    part of it, as tmp_path/dashboard-NAME.png (and in docs/images when
    NKSERVICE_DOC_SCREENSHOTS=1)."""
    async def take(name: str, part: Locator | None = None) -> Path:
        path = tmp_path / f"dashboard-{name}.png"
        if part is None:
            await page.screenshot(path=str(path), full_page=True)
        else:
            await part.screenshot(path=str(path))
        if os.environ.get("NKSERVICE_DOC_SCREENSHOTS") == "1":
            DOC_IMAGES.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOC_IMAGES / path.name)
        return path

    return take


async def log_in(page: Page, node: RunningNode) -> None:
    """Open the dashboard the node serves and log in as the global admin."""
    await page.goto(node.page_url)
    await expect(page.locator("body")).to_have_attribute("data-ready", "true")
    await page.get_by_label("Password", exact=True).fill(ADMIN[1])
    await page.get_by_role("button", name="Log in").click()
    await expect(page.locator("#connection")).to_have_text(f"Connected as {ADMIN[0]}")
    # Loaded: the dashboard's own session is counted in core, and listed.
    await expect(service_row(page, "core").get_by_test_id("session-count")).to_have_text("1")
    await expect(page.get_by_test_id("session-row")).to_have_count(1)


@pytest.fixture
async def dashboard(page: Page, node: RunningNode) -> Page:
    """The dashboard, logged in as the global admin."""
    await log_in(page, node)
    return page


def service_row(page: Page, name: str) -> Locator:
    return page.locator(f'#services-table tr[data-service="{name}"]')


ClientFactory = Callable[..., Awaitable[Client]]


@pytest.fixture
async def connect() -> AsyncIterator[ClientFactory]:
    """Python clients logged in (`connect(url, user, password)`), closed at the end."""
    clients: list[Client] = []

    async def open_client(url: str, user: str, password: str) -> Client:
        client = Client(url, request_timeout=5.0)
        clients.append(client)
        await client.connect()
        await client.login(user, password)
        return client

    yield open_client
    for client in clients:
        await client.close()

