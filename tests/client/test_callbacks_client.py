"""The Python client as an external app (PROTOCOL.md §7), and examples/auth_backend.py."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from nkservice.client import Client
from nkservice.errors import ApiError
from tests.conftest import NodeFactory, url_of

EXAMPLE = Path(__file__).parents[2] / "examples" / "auth_backend.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("auth_backend", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["auth_backend"] = module
    spec.loader.exec_module(module)
    return module


async def test_the_example_auth_backend(make_node: NodeFactory) -> None:
    node = await make_node(demo={})
    example = load_example()
    ready = asyncio.Event()
    backend = asyncio.create_task(example.serve(url_of(node, "core", "ws"), "demo", "secret",
                                                ready))
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        for transport in ("tcp", "ws"):
            async with Client(url_of(node, "demo", transport)) as carol:
                login = await carol.login("carol", "c4rol")
                assert login["user"] == "carol"
                assert await carol.request("notes", "add", {"text": "milk"}) == {
                    "count": 1 if transport == "tcp" else 2}
                listed = await carol.request("notes", "list")
                assert listed["notes"][0] == "milk"
            async with Client(url_of(node, "demo", transport)) as mallory:
                try:
                    await mallory.login("carol", "wrong")
                except ApiError as refused:
                    assert refused.text == "Unauthorized: Invalid password"
                else:
                    raise AssertionError("a wrong password was accepted")
    finally:
        backend.cancel()
