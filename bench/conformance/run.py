"""WebSocket conformance: the Autobahn TestSuite's fuzzing client against nkservice.

    .venv/bin/python bench/conformance/run.py [--cases 1.*,7.*]

(`make conformance` runs it.) Two testees:

- `nkservice-echo`: nkservice's own WebSocket transport wired to an echo
  (bench/conformance/echo_server.py), for every case of groups 1-7, 9, 10, 12 and 13;
- `nkservice-node`: a real node (`python -m nkservice serve`, ws and tcp sharing one port),
  for groups 2-7. It answers JSON, not echoes, so only the cases that expect no message back
  (pings, bad frames, closing handshakes) say anything about it; the others are shown as
  `n/a`.

The Autobahn TestSuite (`wstest`, PyPI package autobahntestsuite) runs on Python 2.7 only.
The interpreter is looked for as $PYTHON27, python2.7 and python2 on the PATH, then pyenv's
versions; autobahntestsuite is installed for it once, with its own pip, under
.venv/conformance-py27/. If either is missing, one line says what and how to get it, and
the exit status is 2. Otherwise the per-case verdict table is printed, then a summary; the
exit status is 1 if any case failed. Reports (JSON and HTML) are kept in the directory named
at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
AUTOBAHN = "autobahntestsuite==25.10.1"  # the version these docs were written with
INSTALL_DIR = ROOT / ".venv" / "conformance-py27"
ECHO_CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*", "12.*", "13.*"]
NODE_EXCLUDED = ["1.*", "9.*", "10.*", "12.*", "13.*"]  # all of them need an echo
READY_TIMEOUT = 15.0
RUN_TIMEOUT = 1800.0
ECHO, NODE = "nkservice-echo", "nkservice-node"
# Verdicts that mean the testee did something wrong.
BAD = {"FAILED", "WRONG CODE", "UNCLEAN", "FAILED BY CLIENT"}


class Missing(Exception):
    """Python 2.7 or the Autobahn TestSuite is not there: the one line that says so."""


def find_python27() -> str:
    candidates = [os.environ.get("PYTHON27", ""), "python2.7", "python2"]
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/2.7*/bin/python2.7"), reverse=True)
    candidates += ["/usr/bin/python2.7", "/usr/local/bin/python2.7"]
    for candidate in candidates:
        path = shutil.which(candidate) if candidate else None
        if path is None:
            continue
        try:  # a pyenv shim exists even when no 2.7 is selected: ask the interpreter
            version = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2])"],
                                     capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if version.returncode == 0 and version.stdout.strip() == "(2, 7)":
            return path
    raise Missing("make conformance: no Python 2.7 found (the Autobahn TestSuite needs it): "
                  "install one (e.g. `pyenv install 2.7.18`) and/or set PYTHON27=/path/to/"
                  "python2.7")


def ensure_autobahn(python27: str) -> Path:
    """autobahntestsuite installed for `python27` under INSTALL_DIR (once); its lib dir."""
    lib = INSTALL_DIR / "lib"
    marker = INSTALL_DIR / "installed.txt"
    wanted = f"{python27}\n{AUTOBAHN}\n"
    if marker.exists() and marker.read_text() == wanted:
        return lib
    shutil.rmtree(INSTALL_DIR, ignore_errors=True)
    tools = INSTALL_DIR / "build-tools"
    print(f"installing {AUTOBAHN} for {python27} in {INSTALL_DIR} (once)", flush=True)
    # Some of its dependencies are source packages, and a bare 2.7 may lack setuptools.
    steps = [
        ([python27, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          "--target", str(tools), "setuptools<45", "wheel<0.38"], {}),
        ([python27, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          "--no-warn-script-location", "--target", str(lib), AUTOBAHN],
         {"PYTHONPATH": str(tools)}),
    ]
    for command, extra_env in steps:
        done = subprocess.run(command, env={**os.environ, **extra_env}, capture_output=True,
                              text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise Missing(f"make conformance: could not install {AUTOBAHN} with {python27} "
                          f"-m pip ({last}); it comes from PyPI and needs pip for Python 2.7")
    marker.write_text(wanted)
    return lib


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_accepting(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server on port {port} did not start; its log: {log}\n"
                               + log.read_text(errors="replace")[-2000:])
        time.sleep(0.05)


@contextlib.contextmanager
def server(command: list[str], port: int, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_accepting(port, process, log)
        yield
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def node_config(workdir: Path, port: int) -> Path:
    path = workdir / "nkservice.toml"
    path.write_text(f"""[node]
data_dir = "{workdir / "data"}"

[admin]
user = "admin"
password = "conformance"

[core]
listen = ["ws://{HOST}:{port}/", "tcp://{HOST}:{port}"]
ping_interval = 0
""")
    return path


def run_wstest(python27: str, lib: Path, workdir: Path, cases: list[str], echo_port: int,
               node_port: int) -> Path:
    outdir = workdir / "reports"
    spec = {
        "outdir": str(outdir),
        "servers": [{"agent": ECHO, "url": f"ws://{HOST}:{echo_port}/"},
                    {"agent": NODE, "url": f"ws://{HOST}:{node_port}/"}],
        "cases": cases,
        "exclude-cases": [],
        "exclude-agent-cases": {NODE: NODE_EXCLUDED},
    }
    spec_path = workdir / "fuzzingclient.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    launcher = ("import site, sys; site.addsitedir(sys.argv.pop(1)); "
                "from autobahntestsuite.wstest import run; run()")
    log = workdir / "wstest.log"
    with log.open("wb") as out:
        done = subprocess.run([python27, "-c", launcher, str(lib), "-m", "fuzzingclient",
                               "-s", str(spec_path)], cwd=workdir, stdout=out,
                              stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT)
    index = outdir / "index.json"
    if done.returncode != 0 or not index.exists():
        raise RuntimeError(f"wstest failed (status {done.returncode}); its log: {log}\n"
                           + log.read_text(errors="replace")[-3000:])
    return outdir


def case_key(case: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case.split("."))


def expects_an_echo(outdir: Path, entry: dict[str, Any]) -> bool:
    """Does the case expect messages back (then a node, which answers JSON, cannot pass)?"""
    report = json.loads((outdir / entry["reportfile"]).read_text())
    expected = report.get("expected", {})
    return any(item and item[0] == "message" for items in expected.values() for item in items)


def verdict(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    text = entry["behavior"]
    if entry["behaviorClose"] not in ("OK", "INFORMATIONAL", entry["behavior"]):
        text += f"/{entry['behaviorClose']}"
    code = entry.get("remoteCloseCode")
    return f"{text} ({code})" if code is not None else text


def table(outdir: Path) -> tuple[list[str], Counter[tuple[str, str]], int]:
    index = json.loads((outdir / "index.json").read_text())
    echo, node = index.get(ECHO, {}), index.get(NODE, {})
    lines = ["| case | nkservice-echo (transport + echo) | nkservice-node |",
             "|---|---|---|"]
    summary: Counter[tuple[str, str]] = Counter()
    bad = 0
    for case in sorted(set(echo) | set(node), key=case_key):
        echo_entry, node_entry = echo.get(case), node.get(case)
        node_text = verdict(node_entry)
        if node_entry is not None and expects_an_echo(outdir, node_entry):
            node_text = "n/a (expects an echo)"
            node_entry = None
        for agent, entry in ((ECHO, echo_entry), (NODE, node_entry)):
            if entry is not None:
                summary[(agent, entry["behavior"])] += 1
                bad += entry["behavior"] in BAD or entry["behaviorClose"] in BAD
        lines.append(f"| {case} | {verdict(echo_entry)} | {node_text} |")
    return lines, summary, bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(ECHO_CASES),
                        help="comma-separated Autobahn case patterns (default: %(default)s)")
    args = parser.parse_args()
    try:
        python27 = find_python27()
        lib = ensure_autobahn(python27)
    except Missing as missing:
        print(missing, file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="nkservice-conformance-"))
    echo_port, node_port = free_port(), free_port()
    python = sys.executable
    with server([python, str(ROOT / "bench" / "conformance" / "echo_server.py"), str(echo_port)],
                echo_port, workdir / "echo_server.log"), \
         server([python, "-m", "nkservice", "serve", "--config",
                 str(node_config(workdir, node_port))], node_port, workdir / "node.log"):
        started = time.monotonic()
        outdir = run_wstest(python27, lib, workdir, args.cases.split(","), echo_port, node_port)
        took = time.monotonic() - started
    lines, summary, bad = table(outdir)
    print("\n".join(lines))
    print()
    for agent in (ECHO, NODE):
        counts = ", ".join(f"{behavior} {count}" for (who, behavior), count
                           in sorted(summary.items()) if who == agent)
        print(f"{agent}: {counts}")
    print(f"wstest ran {took:.0f} s; reports (index.html, one JSON per case) in {outdir}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
