"""The documentation against the code.

- docs/protocol.md names every command the code knows (both spellings), every error code
  with its name, and every config key (or docs/config.md does);
- the README's examples run: its Python example as a script, its `nkservice call` examples
  as commands, each against a node, their output compared with what the README shows;
- docs/services.md's `nkservice services` session runs, in order, with its TOML files.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import shlex
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import nkservice.service.config as config_module
from nkservice.errors import ErrorCode
from nkservice.node import Node
from nkservice.protocol.names import SEED_NAMES, SUBCLASS_ALIASES
from nkservice.service.config import parse_node_config
from tests.conftest import free_port, url_of

NodeFactory = Callable[..., Awaitable[Node]]

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
CONFIG = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")
SERVICES = (ROOT / "docs" / "services.md").read_text(encoding="utf-8")

# What the README's examples use, and what the test node has instead.
README_PORT = "127.0.0.1:9010"
README_PASSWORD = "admin"
NODE_PASSWORD = "secret"  # the global admin of tests/conftest.py's nodes
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# -- docs/protocol.md --------------------------------------------------------------------------

def test_every_command_is_documented_in_both_spellings() -> None:
    missing = []
    for seed, (subclass, cmd) in SEED_NAMES.items():
        missing += [name for name in (f"`{seed}`", f"`{subclass}`/`{cmd}`")
                    if name not in PROTOCOL]
    for (subclass, cmd), (target_subclass, target_cmd) in SUBCLASS_ALIASES.items():
        missing += [name for name in (f"`{subclass}`/`{cmd}`",
                                      f"`{target_subclass}`/`{target_cmd}`")
                    if name not in PROTOCOL]
    assert not missing, f"docs/protocol.md does not name {missing}"


def test_every_error_code_is_documented() -> None:
    rows = {line.split("|")[1].strip(): line for line in PROTOCOL.splitlines()
            if re.match(r"\| \d{6} \|", line)}
    for member in ErrorCode:
        row = rows.get(str(member.code))
        assert row is not None, f"no row for {member.code} ({member.name}) in docs/protocol.md"
        assert f"| `{member.name}` |" in row, row
        text = member.value[1].split("{}")[0].rstrip("'")
        assert text in row, f"{member.name}: {text!r} not in {row!r}"


def config_keys() -> set[str]:
    """Every key name `nkservice.service.config` accepts: the key sets it gives its
    unknown-key check (`_known(table, where, KEYS)`), read from its source and evaluated in
    its namespace, so a key added anywhere is found."""
    tree = ast.parse(inspect.getsource(config_module))
    checks = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Name) and node.func.id == "_known"]
    assert len(checks) >= 5, "config.py checks its keys another way now: update this test"
    keys: set[str] = set()
    for check in checks:
        expression = ast.Expression(check.args[2])
        keys |= eval(compile(expression, config_module.__file__, "eval"), vars(config_module))
    return keys


def test_every_config_key_is_documented() -> None:
    keys = config_keys()
    assert {"node", "data_dir", "listen", "certfile", "max_queue", "port"} <= keys
    docs = PROTOCOL + CONFIG
    missing = sorted(key for key in keys
                     if not any(form in docs for form in (f"`{key}`", f"[{key}]", f"[{key}.")))
    assert not missing, f"neither docs/protocol.md nor docs/config.md names {missing}"


def test_no_link_to_a_file_outside_the_repository() -> None:
    for name, text in (("README.md", README), ("docs/protocol.md", PROTOCOL)):
        assert "../shared" not in text and "shared/" not in text, name


# -- the README's examples ---------------------------------------------------------------------

def code_blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def shown_output(after: str) -> str:
    """The text block that follows `after` in the README: an example's output."""
    rest = README[README.index(after) + len(after):]
    found = re.match(r"```\n[^`]*```text\n(.*?)```", rest, re.S)  # its fence, prose, output
    assert found is not None, f"no output shown after {after[:40]!r}"
    return found[1]


def normal(text: str) -> str:
    return UUID.sub("UUID", text).strip()


async def test_the_readme_python_example_runs_as_a_script(make_node: NodeFactory) -> None:
    (script,) = [block for block in code_blocks("python") if "asyncio.run(" in block]
    node = await make_node()
    port = url_of(node, "core", "ws").split("/")[2]
    assert README_PORT in script and f'"{README_PASSWORD}")' in script
    runnable = (script.replace(README_PORT, port)
                .replace(f'"{README_PASSWORD}")', f'"{NODE_PASSWORD}")'))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", runnable, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(20):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert normal(out.decode()) == normal(shown_output(script))


def readme_calls(text: str = README, subcommand: str = "call"
                 ) -> list[tuple[list[str], str]]:
    """Each `$ .venv/bin/nkservice call …` of the README (or `subcommand` of `text`), with
    its `\\` continuation lines, and the output shown under it, up to the next `$` line or
    the end of the block."""
    examples = []
    for block in code_blocks("sh", text):
        lines = block.splitlines()
        index = 0
        while index < len(lines):
            line = lines[index]
            index += 1
            if not line.startswith(f"$ .venv/bin/nkservice {subcommand} "):
                continue
            command = line[2:]
            while command.endswith("\\"):
                command = command[:-1] + lines[index]
                index += 1
            output = []
            while index < len(lines) and not lines[index].startswith("$ "):
                output.append(lines[index])
                index += 1
            examples.append((shlex.split(command)[1:], "\n".join(output)))
    return examples


def test_the_readme_shows_calls() -> None:
    assert len(readme_calls()) >= 3


async def test_the_readme_calls_print_what_the_readme_shows(make_node: NodeFactory) -> None:
    node = await make_node()
    port = url_of(node, "core", "tcp").split("/")[2]
    for args, shown in readme_calls():
        command: list[Any] = [arg.replace(README_PORT, port) for arg in args]
        if "--password" in command:
            command[command.index("--password") + 1] = NODE_PASSWORD
        out = await run_cli(command)
        assert normal(out.replace(port, README_PORT)) == normal(shown), args


async def run_cli(args: list[str], cwd: Path | None = None) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nkservice", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, cwd=cwd)
    async with asyncio.timeout(20):
        out, _ = await process.communicate()
    return out.decode()


async def test_the_services_session_prints_what_services_md_shows(tmp_path: Path) -> None:
    """With the node on free ports in place of 9010, 9020 and 9021."""
    ports = {"9010": str(free_port()), "9020": str(free_port()), "9021": str(free_port())}

    def here(text: str) -> str:
        for shown, free in ports.items():
            text = text.replace(f"127.0.0.1:{shown}", f"127.0.0.1:{free}")
        return text

    for block in code_blocks("toml", SERVICES):
        name = block.splitlines()[0].removeprefix("# ")
        (tmp_path / name).write_text(here(block), encoding="utf-8")
    config = parse_node_config({"node": {"data_dir": str(tmp_path / "data")},
                                "core": {"listen": [here("ws://127.0.0.1:9010/"),
                                                    here("tcp://127.0.0.1:9010")]}}, tmp_path)
    node = Node(config)
    await node.start()
    try:
        calls = readme_calls(SERVICES, "services")
        assert [args[1] for args in (call for call, _ in calls)] == [
            "create", "list", "update", "stop", "get"]
        for args, shown in calls:
            out = await run_cli([here(arg) for arg in args], cwd=tmp_path)
            for shown_port, free in ports.items():
                out = out.replace(f"127.0.0.1:{free}", f"127.0.0.1:{shown_port}")
            assert out.strip() == shown.strip(), args
    finally:
        await node.stop()


@pytest.mark.parametrize("path", ["README.md", "docs/protocol.md", "docs/client.md",
                                  "docs/events.md", "docs/config.md", "docs/services.md",
                                  "docs/cluster.md"])
def test_relative_links_point_at_files(path: str) -> None:
    text = (ROOT / path).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (ROOT / path).parent.joinpath(target).exists(), f"{path}: {target}"
