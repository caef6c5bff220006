"""What every section needs: where logs go, which core runs what, and the load process."""

from __future__ import annotations

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

    def start_load(self, args: list[str], label: str) -> LoadProcess:
        return LoadProcess(args, self.log_dir / f"loadgen-{label}.log", self.load_cpus)

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

    def __init__(self, args: list[str], log_path: Path, cpus: set[int] | None) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(BENCH_DIR / "loadgen.py"), *args],
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
