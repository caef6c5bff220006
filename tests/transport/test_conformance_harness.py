"""bench/conformance/ without the Autobahn TestSuite: the echo server it tests answers like an
echo, and `make conformance` says in one line what is missing when there is no Python 2.7."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.transport.rawws import BINARY, CONTINUATION, TEXT, Frame, RawClient

HARNESS = Path(__file__).resolve().parents[2] / "bench" / "conformance"


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HARNESS / "echo_server.py"), str(port), "1000",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        assert process.stdout is not None
        async with asyncio.timeout(15):
            assert b"echo server on" in await process.stdout.readline()
        yield port
    finally:
        process.terminate()
        await process.wait()


async def test_the_echo_server_echoes_text_and_binary(echo_port: int) -> None:
    client = await RawClient.connect("127.0.0.1", echo_port)
    try:
        await client.send(TEXT, "κόσμε".encode())
        await client.send(BINARY, b"\xff\x00")
        await client.send(TEXT, b"frag", fin=False)
        await client.send(CONTINUATION, b"ments")
        assert [await client.recv_frame() for _ in range(3)] == [
            Frame(TEXT, "κόσμε".encode()), Frame(BINARY, b"\xff\x00"), Frame(TEXT, b"fragments")]
        await client.send(TEXT, b"x" * 1001)  # over the limit it was started with
        assert (await client.recv_close()).close_code == 1009
    finally:
        client.close()


def test_without_python_2_7_one_line_says_what_is_missing(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "PYTHON27": "",
           "PYENV_ROOT": str(tmp_path), "HOME": str(tmp_path)}
    if any(Path(p).exists() for p in ("/usr/bin/python2.7", "/usr/local/bin/python2.7")):
        pytest.skip("this machine has a system Python 2.7")
    done = subprocess.run([sys.executable, str(HARNESS / "run.py")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "no Python 2.7 found" in lines[0] and "PYTHON27" in lines[0]
