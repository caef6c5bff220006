"""What every section needs: where logs go, which core runs what, and the load process."""

from __future__ import annotations

import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from oslimits import pin
from servers import BENCH_DIR, ServerProcess, ServerSpec


class LoadFailed(Exception):
    """The load generator failed or timed out; the message says why."""


@dataclass(frozen=True)
class RunContext:
    log_dir: Path
    server_cpus: set[int] | None
    load_cpus: set[int] | None

    def server(self, spec: ServerSpec, label: str) -> ServerProcess:
        return ServerProcess(spec, self.server_cpus, self.log_dir / f"{spec.name}-{label}.log")

    def start_load(self, args: list[str], label: str, script: str = "loadgen.py") -> LoadProcess:
        return LoadProcess(args, self.log_dir / f"loadgen-{label}.log", self.load_cpus, script)

    def load_session(self, args: list[str], label: str) -> LoadSession:
        """A bench/eventload.py process, driven by commands (see LoadSession)."""
        return LoadSession(self.start_load(args, label, "eventload.py"))

    def run_load(self, args: list[str], label: str, timeout: float) -> dict[str, Any]:
        """Run the load generator to completion and return its JSON result."""
        load = self.start_load(args, label)
        try:
            out, _ = load.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            load.abort()
            raise LoadFailed(
                f"load generator still running after {timeout:.0f} s; killed"
            ) from None
        return load.result(out)


class LoadProcess:
    """A running bench/loadgen.py: JSON lines on stdout, diagnostics in a log file.

    stderr goes to a file, not a pipe: thousands of failing connections can log more than
    a pipe holds, and a full pipe would freeze the load generator mid-measurement.
    """

    def __init__(
        self, args: list[str], log_path: Path, cpus: set[int] | None, script: str = "loadgen.py"
    ) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(BENCH_DIR / script), *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        pin(self.proc.pid, cpus)

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def failure(self) -> LoadFailed:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return LoadFailed(
            lines[-1] if lines else f"load generator exited with status {self.proc.returncode}"
        )

    def result(self, out: bytes) -> dict[str, Any]:
        """The last JSON line of a finished run, or LoadFailed with the reason it logged."""
        if self.proc.returncode != 0 or not out.strip():
            raise self.failure()
        result: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
        if not self.log_path.stat().st_size:
            self.log_path.unlink()  # keep only the logs that say something
        return result


class LoadSession:
    """A load generator that sets up, prints one JSON line, then answers commands.

    Each command is one JSON line on its stdin and gets one JSON line back; `{"error": …}`
    becomes LoadFailed. Use as a context manager: the process is closed (or killed) on exit.
    """

    def __init__(self, load: LoadProcess) -> None:
        self._load = load

    def __enter__(self) -> LoadSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line, within `timeout` seconds."""
        proc = self._load.proc
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if readable else b""
        if not line:
            still_running = proc.poll() is None
            self._load.abort()
            if still_running:
                raise LoadFailed(f"load generator silent for {timeout:.0f} s; killed")
            raise self._load.failure()
        reply: dict[str, Any] = orjson.loads(line)
        if "error" in reply:
            raise LoadFailed(f"load generator: {reply['error']}")
        return reply

    def command(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        proc = self._load.proc
        assert proc.stdin is not None
        if proc.poll() is not None:
            raise self._load.failure()
        proc.stdin.write(orjson.dumps(command) + b"\n")
        proc.stdin.flush()
        return self.read(timeout)

    def close(self, timeout: float = 60.0) -> None:
        """Ask the process to close its connections and end; kill it if it does not."""
        proc = self._load.proc
        if proc.poll() is not None:
            return
        try:
            proc.communicate(orjson.dumps({"op": "close"}) + b"\n", timeout=timeout)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            self._load.abort()
        log = self._load.log_path
        if log.exists() and not log.stat().st_size:
            log.unlink()  # keep only the logs that say something


def median_sample(samples: list[dict[str, Any]], rate: str, failure: str | None
                  ) -> dict[str, Any] | None:
    """The round with the median `rate`, so that the row's other figures come from the same
    round; None when the row failed or has no round."""
    if failure or not samples:
        return None
    ordered = sorted(samples, key=lambda sample: float(sample[rate]))
    return ordered[(len(ordered) - 1) // 2]
