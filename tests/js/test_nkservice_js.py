"""The JavaScript client's suite (js/test/), run by node against this checkout's server.

Node runs each js/test/*.test.mjs file; the files start `nkservice serve` themselves (the
`nkservice` of the Python running pytest, through NKSERVICE_BIN) on free ports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE_MAJOR = 20  # the oldest Node the client supports (with --experimental-websocket)


@pytest.mark.timeout(300)
def test_nkservice_js() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not on PATH: the JavaScript client's tests (js/test/) need "
                    f"Node {NODE_MAJOR}+", pytrace=False)
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    found = re.match(r"v(\d+)\.", version.stdout)
    if found is None or int(found.group(1)) < NODE_MAJOR:
        pytest.fail(f"node {version.stdout.strip()} is too old: the JavaScript client's tests "
                    f"need Node {NODE_MAJOR}+", pytrace=False)
    env = {**os.environ, "NKSERVICE_BIN": str(Path(sys.executable).parent / "nkservice")}
    result = subprocess.run(
        [node, "--experimental-websocket", "--test", "--test-reporter=spec", "js/test/"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280, check=False)
    if result.returncode != 0:
        pytest.fail(f"node --test js/test/ failed (exit status {result.returncode}):\n"
                    f"{result.stdout}\n{result.stderr}", pytrace=False)
