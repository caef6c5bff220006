"""Section 8: what counting metrics costs a request round trip.

The same node twice, in the same run: with metrics counted (`[http] metrics = "core"`, the
default: every answered request adds to `nkservice_requests` and to the latency histogram)
and with metrics off (`[http] metrics = ""`: the node counts nothing, `Uncounted`). What is
left with metrics off is the part that is always there: a look at `Metrics.time_next` on
every request and a call that does nothing. With `--metrics-baseline REF`, a third node runs
the code of a git ref (checked out with `git worktree add` into a temporary directory,
removed afterwards) with `PYTHONPATH=<worktree>/src` in the same venv, so that the always-on
part is measured too, with whatever else changed on the request path since REF (REF must
predate `[http]`: its config has no such table).

The load is section 1's: bench/loadgen.py's round trips (`core ping` as the admin), 50
connections x 32 in flight (throughput) and 1 x 1 (latency), on tcp and ws. All nodes run
at once on the server's core (an idle node costs nothing), started afresh for each round
(two processes of the same code differ by a few percent); each round measures every
(transport, scenario) on each node back to back, every other round in reverse order, and
the ratio to the node with metrics off is taken within each round.

This VM's speed drifts by tens of percent from one measurement to the next, more than the
cost looked for. So each round also runs the pipelined load against every node at the
same time ("side by side"): the nodes share the server's core, their load generators the
other, and the server CPU time per request of each node, measured over the same seconds,
is compared; a change of the machine's speed falls on all of them alike. The verdict is
that figure's; the others are shown with their range over rounds, which is wider than the
target.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpuwatch import Busy
from harness import LoadFailed, RunContext
from report import markdown_table
from roundtrip import SCENARIOS, RoundtripRow, Scenario, Timing
from servers import BENCH_DIR, HOST, NKSERVICE, ServerFailed, ServerProcess, nkservice_config

TARGET = 0.05  # the issue's: metrics cost round trips at most 5 %
FULL = Timing(warmup=1.0, duration=3.0, rounds=6)
QUICK = Timing(warmup=0.5, duration=1.5, rounds=2)
TRANSPORTS = ("tcp", "ws")
# Section 1's pipelined load against every node at once, the nodes sharing one core.
SIDE_BY_SIDE = Scenario("side by side", conns=50, window=32)
MEASURES = (*SCENARIOS, SIDE_BY_SIDE)
_OTHER_NOTE_PCT = 10.0  # other processes' CPU worth a note, in % of one core


@dataclass(frozen=True)
class Node:
    """How a node under test runs: its `[http] metrics` (None: no `[http]` table at all, for
    code older than it) and the git ref whose code it runs ("": this checkout's)."""

    label: str
    metrics: str | None
    ref: str = ""

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "-").replace("/", "-")


ON = Node("metrics on", "core")
OFF = Node("metrics off", "")


def baseline(ref: str) -> Node:
    return Node(ref, None, ref)


class MetricsServer(ServerProcess):
    """nkservice with section 1's config and the node's `[http] metrics`, its code from
    `src` (a worktree's `src/`) when given."""

    def __init__(self, ctx: RunContext, node: Node, src: Path | None = None) -> None:
        super().__init__(NKSERVICE, ctx.server_cpus, ctx.log_dir / f"nkservice-{node.slug}.log")
        self.node = node
        self._src = src

    def _command(self) -> list[str]:
        http = "" if self.node.metrics is None else f'[http]\nmetrics = "{self.node.metrics}"\n'
        config = nkservice_config(Path(self._workdir.name), self.ports["ws"], self.ports["tcp"],
                                  more=http)
        command = [sys.executable, "-m", "nkservice", "serve", "--config", str(config)]
        if self._src is not None:  # `env` execs the server: the pid stays the server's
            return ["env", f"PYTHONPATH={self._src}", *command]
        return command

    def requests_counted(self) -> int | None:
        """The `core ping`s its /metrics counted, or None when it serves no /metrics."""
        url = f"http://{HOST}:{self.ports['ws']}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            return None
        return int(sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("nkservice_requests_total{") and 'cmd="ping"' in line))


@contextlib.contextmanager
def worktree(ref: str) -> Iterator[tuple[Path, str]]:
    """A checkout of `ref` in a temporary directory (`git worktree add --detach`), and its
    short commit id; removed on exit."""
    repo = BENCH_DIR.parent
    where = Path(tempfile.mkdtemp(prefix="nkservice-metrics-baseline-")) / "tree"

    def git(*args: str | Path) -> str:
        done = subprocess.run(["git", "-C", str(repo), *map(str, args)], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise ServerFailed(f"git {' '.join(map(str, args))}: {done.stderr.strip()}")
        return done.stdout.strip()

    try:
        git("worktree", "add", "--detach", "--quiet", where, ref)
    except BaseException:
        shutil.rmtree(where.parent, ignore_errors=True)
        raise
    try:
        yield where, git("-C", where, "rev-parse", "--short", "HEAD")
    finally:
        with contextlib.suppress(ServerFailed, subprocess.TimeoutExpired):
            git("worktree", "remove", "--force", where)
        shutil.rmtree(where.parent, ignore_errors=True)
        with contextlib.suppress(ServerFailed, subprocess.TimeoutExpired):
            git("worktree", "prune")


def checkout_state() -> str:
    """This checkout's commit, and how many files under src/ differ from it (others may be
    editing the same checkout: the on and off nodes run what is on disk)."""
    repo = str(BENCH_DIR.parent)
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
        changed = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "src"],
                                 capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return "this checkout (git unavailable)"
    dirty = f", {len(changed)} files under src/ changed and not committed" if changed else ""
    return f"this checkout at {commit}{dirty}"


MetricsRow = RoundtripRow[Node]  # `server`: the node measured


@dataclass
class MetricsResults:
    rows: list[MetricsRow] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    commits: dict[str, str] = field(default_factory=dict)  # a baseline's ref → its commit
    counted: dict[str, int | None] = field(default_factory=dict)  # node → /metrics pings
    code: str = ""  # which code the on and off nodes ran


def _orders(rounds: int, nodes: list[Node]) -> list[list[Node]]:
    """A/B then B/A: every other round in reverse order, so that a steady drift of the
    machine's speed favours no node."""
    return [nodes if round_no % 2 == 0 else nodes[::-1] for round_no in range(rounds)]


def run(ctx: RunContext, timing: Timing, baseline_ref: str = "") -> MetricsResults:
    nodes = [ON, OFF, *([baseline(baseline_ref)] if baseline_ref else [])]
    results = MetricsResults(nodes=nodes, code=checkout_state())
    results.rows = [MetricsRow(transport, scenario, node) for transport in TRANSPORTS
                    for scenario in MEASURES for node in nodes]
    with contextlib.ExitStack() as trees:
        sources: dict[Node, Path | None] = {}
        for node in nodes:
            sources[node] = None
            if node.ref:
                tree, results.commits[node.ref] = trees.enter_context(worktree(node.ref))
                sources[node] = tree / "src"
        for round_no, order in enumerate(_orders(timing.rounds, nodes)):
            # Fresh processes each round: two processes of the same code differ by a few
            # percent (hash seeds, addresses), a bias that one pair for the whole run would
            # give every round alike.
            with contextlib.ExitStack() as stack:
                servers = _start(ctx, stack, results, order, sources)
                _run_round(ctx, servers, results, order, timing, round_no)
                for node, server in servers.items():
                    results.counted[node.label] = server.requests_counted()
    return results


def _start(ctx: RunContext, stack: contextlib.ExitStack, results: MetricsResults,
           nodes: list[Node], sources: dict[Node, Path | None]) -> dict[Node, MetricsServer]:
    servers: dict[Node, MetricsServer] = {}
    for node in nodes:
        if all(row.failure is not None for row in results.rows if row.server == node):
            continue
        try:
            servers[node] = stack.enter_context(MetricsServer(ctx, node, sources[node]))
        except ServerFailed as exc:
            _fail(results.rows, node, str(exc))
    return servers


def _run_round(ctx: RunContext, servers: dict[Node, MetricsServer], results: MetricsResults,
               order: list[Node], timing: Timing, round_no: int) -> None:
    for transport in TRANSPORTS:
        for scenario in SCENARIOS:
            for node in order:
                row = _row(results.rows, transport, scenario, node)
                if row.failure is not None or node not in servers:
                    continue
                try:
                    row.samples.append(_measure(ctx, servers[node], row, timing, round_no))
                except LoadFailed as exc:
                    row.failure = str(exc)
                except ServerFailed as exc:
                    _fail(results.rows, node, str(exc))
        together = {node: _row(results.rows, transport, SIDE_BY_SIDE, node)
                    for node in order if node in servers}
        _measure_together(ctx, servers, together, timing, round_no)


def _row(rows: list[MetricsRow], transport: str, scenario: Scenario, node: Node) -> MetricsRow:
    return next(r for r in rows
                if (r.transport, r.scenario, r.server) == (transport, scenario, node))


def _fail(rows: list[MetricsRow], node: Node, why: str) -> None:
    for row in rows:
        if row.server == node and row.failure is None:
            row.failure = why


def _load_args(server: MetricsServer, row: MetricsRow, timing: Timing) -> list[str]:
    return [
        "roundtrip",
        f"--transport={row.transport}",
        f"--port={server.ports[row.transport]}",
        f"--conns={row.scenario.conns}",
        f"--window={row.scenario.window}",
        f"--warmup={timing.warmup}",
        f"--duration={timing.duration}",
        f"--server-pid={server.pid}",
        "--phase-timeout=30",
    ]


def _label(row: MetricsRow, round_no: int) -> str:
    scenario = row.scenario.name.replace(" ", "-")
    return f"metrics-{row.server.slug}-{row.transport}-{scenario}-{round_no + 1}"


def _with_cpu(sample: dict[str, Any], other_cpu_pct: float) -> dict[str, Any]:
    sample["other_cpu_pct"] = other_cpu_pct
    if sample["server_cpu_pct"] is not None and sample["requests"]:
        sample["server_us"] = (1e4 * sample["server_cpu_pct"] * sample["seconds"]
                               / sample["requests"])
    return sample


def _measure(ctx: RunContext, server: MetricsServer, row: MetricsRow, timing: Timing,
             round_no: int) -> dict[str, Any]:
    busy = Busy({"server": server.pid})
    sample = ctx.run_load(_load_args(server, row, timing), _label(row, round_no),
                          timeout=timing.warmup + timing.duration + 60)
    sample = _with_cpu(sample, busy.finish()["other_cpu_pct"])
    server.check_alive()
    return sample


def _measure_together(ctx: RunContext, servers: dict[Node, MetricsServer],
                      rows: dict[Node, MetricsRow], timing: Timing, round_no: int) -> None:
    """The pipelined load against every node at once (started in the round's order)."""
    rows = {node: row for node, row in rows.items() if row.failure is None}
    busy = Busy({node.slug: servers[node].pid for node in rows})
    loads = {node: ctx.start_load(_load_args(servers[node], row, timing),
                                  _label(row, round_no)) for node, row in rows.items()}
    outs: dict[Node, bytes] = {}
    for node, load in loads.items():
        try:
            outs[node], _ = load.proc.communicate(timeout=timing.warmup + timing.duration + 60)
        except subprocess.TimeoutExpired:
            load.abort()
            rows[node].failure = "load generator still running after its deadline; killed"
    other = busy.finish()["other_cpu_pct"]
    for node, out in outs.items():
        try:
            rows[node].samples.append(_with_cpu(loads[node].result(out), other))
            servers[node].check_alive()
        except LoadFailed as exc:
            rows[node].failure = str(exc)
        except ServerFailed as exc:
            rows[node].failure = str(exc)


# -- ratios and tables ---------------------------------------------------------------------------


def ratios(rows: list[MetricsRow], row: MetricsRow, reference: Node, key: str) -> list[float]:
    """This row's `key` divided by the reference node's in the same round, one per round."""
    ref = _row(rows, row.transport, row.scenario, reference)
    if ref.failure or row.failure:
        return []
    return [mine[key] / theirs[key] for mine, theirs in zip(row.samples, ref.samples,
                                                             strict=False)
            if mine.get(key) and theirs.get(key)]


def _ratio_cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3f}x ({min(values):.2f}-{max(values):.2f})"


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def _notes(res: dict[str, Any], saturating: bool) -> str:
    notes = []
    other = res.get("other_cpu_pct")
    if other is not None and other > _OTHER_NOTE_PCT:
        notes.append(f"other processes {other:.0f}%")
    idle = res.get("server_core_idle_pct")
    if saturating and idle is not None and idle > 10:
        notes.append(f"server core {idle:.0f}% idle")
    if res.get("steal_pct") and res["steal_pct"] > 2:
        notes.append(f"VM steal {res['steal_pct']:.0f}%")
    for key, what in (("errors", "error answers"), ("disconnected", "connections dropped"),
                      ("server_requests", "server requests answered")):
        if res.get(key):
            notes.append(f"{res[key]} {what}")
    return "; ".join(notes)


def table(results: MetricsResults) -> str:
    header = ["transport", "scenario", "node", "req/s", "req/s range", "p50 µs", "p99 µs",
              "server µs/req", "req/s vs off", "p50 vs off", "p99 vs off", "server µs vs off",
              "other CPU", "notes"]
    cells = []
    rows = results.rows
    for row in rows:
        scenario = f"{row.scenario.name} ({row.scenario.conns}x{row.scenario.window})"
        if row.scenario == SIDE_BY_SIDE:
            scenario = f"{row.scenario.name} ({row.scenario.conns}x{row.scenario.window} each)"
        first = [row.transport, scenario, _node_label(results, row.server)]
        res = row.result
        if res is None:
            cells.append([*first, *["-"] * 10, f"FAILED: {_first_line(row.failure)}"])
            continue
        rates = [s["rps"] for s in row.samples]
        one = row.scenario.window == 1
        vs = ([_ratio_cell(ratios(rows, row, OFF, key)) if row.server != OFF else "-"
               for key in ("rps", "p50_us", "p99_us", "server_us")])
        if not one:
            vs[1] = vs[2] = "-"
        cells.append([
            *first, _num(res["rps"]), f"{_num(min(rates))}-{_num(max(rates))}",
            _num(res["p50_us"]), _num(res["p99_us"]), _num(res.get("server_us"), ".2f"), *vs,
            _num(res.get("other_cpu_pct"), ".0f") + "%", _notes(res, saturating=not one)])
    return markdown_table(header, cells)


def _node_label(results: MetricsResults, node: Node) -> str:
    commit = results.commits.get(node.ref)
    return f"{node.label} ({commit})" if node.ref and commit and commit != node.ref else (
        node.label if not node.ref else f"code at {node.label}")


def _first_line(text: str | None) -> str:
    return (text or "unknown").strip().splitlines()[0]


def _cost(rows: list[MetricsRow], node: Node, reference: Node, transport: str,
          scenario: Scenario) -> tuple[float, float, float] | None:
    """The cost of `node` against `reference`, as a fraction (median, lowest, highest over
    rounds): 1 - req/s ratio when pipelined, p50 ratio - 1 one at a time, server CPU per
    request ratio - 1 side by side."""
    row = _row(rows, transport, scenario, node)
    if scenario == SIDE_BY_SIDE:
        values = [r - 1 for r in ratios(rows, row, reference, "server_us")]
    elif scenario.window == 1:
        values = [r - 1 for r in ratios(rows, row, reference, "p50_us")]
    else:
        values = [1 - r for r in ratios(rows, row, reference, "rps")]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def targets(results: MetricsResults) -> str:
    """The verdict: metrics on against off (the target), and against the baseline if any."""
    pairs = [(ON, OFF, "metrics on vs off")]
    for node in results.nodes[2:]:
        pairs += [(OFF, node, f"metrics off vs {_node_label(results, node)}"),
                  (ON, node, f"metrics on vs {_node_label(results, node)}")]
    header = ["comparison", "transport", "measure", "cost (median over rounds)",
              "range over rounds", f"≤ {TARGET:.0%}"]
    cells = []
    for node, reference, what in pairs:
        for transport in TRANSPORTS:
            for scenario in MEASURES:
                measure = _measure_name(scenario)
                cost = _cost(results.rows, node, reference, transport, scenario)
                if cost is None:
                    cells.append([what, transport, measure, "-", "-", "no figures"])
                    continue
                median, low, high = cost
                cells.append([what, transport, measure, f"{median:+.1%}",
                              f"{low:+.1%} to {high:+.1%}",
                              ("met" if median <= TARGET else "NOT MET")
                              if scenario == SIDE_BY_SIDE else "not decisive"])
    return markdown_table(header, cells)


def _measure_name(scenario: Scenario) -> str:
    if scenario == SIDE_BY_SIDE:
        return f"server CPU per request, side by side ({scenario.conns}x{scenario.window} each)"
    if scenario.window == 1:
        return "p50 latency, one at a time (1x1)"
    return f"throughput, pipelined ({scenario.conns}x{scenario.window})"


def verdict(results: MetricsResults) -> str:
    """Decided by the side-by-side CPU per request alone: the one-node-at-a-time figures
    move by tens of percent between rounds on a VM (their ranges show it), an A/A run of
    the side-by-side one by about 1.5 % (docs/benchmarks.md, section 8)."""
    costs = [_cost(results.rows, ON, OFF, t, SIDE_BY_SIDE) for t in TRANSPORTS]
    if any(c is None for c in costs):
        return "verdict: incomplete (a measurement failed)"
    worst = max(c[0] for c in costs if c is not None)
    status = "met" if worst <= TARGET else "NOT met"
    return (f"verdict: metrics cost at most {worst:+.1%} of the server's CPU per request"
            f" (on vs off, side by side, median over rounds, {' and '.join(TRANSPORTS)}):"
            f" target ≤ {TARGET:.0%} {status}")


def counted_lines(results: MetricsResults) -> str:
    """What each node's /metrics says it counted: proof that on counts and off does not."""
    lines = [f"- code of the on and off nodes: {results.code}"]
    for node in results.nodes:
        counted = results.counted.get(node.label)
        what = ("no /metrics (404 or none)" if counted is None
                else f"/metrics counted {counted:,} `core ping`s")
        lines.append(f"- {_node_label(results, node)}: {what}")
    return "\n".join(lines)


def failures(results: MetricsResults) -> list[tuple[str, str]]:
    return [(f"nkservice {r.server.label} {r.transport} {r.scenario.name}", r.failure)
            for r in results.rows if r.failure]
