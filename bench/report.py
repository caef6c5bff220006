"""Result tables, printed as Markdown so that they paste into docs/benchmarks.md as is."""

from __future__ import annotations

from typing import Any

import callbacks
import fanout
import matching
from callbacks import CallbackRow
from fanout import FanoutRow
from matching import MatchingRow, MicroRow
from memory import MemoryRow
from roundtrip import REFERENCE, ServerRow, ratio_to_reference

MB = 1024 * 1024


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
            + " |"
        )

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def roundtrip_table(rows: list[ServerRow]) -> str:
    header = [
        "transport",
        "scenario",
        "server",
        "req/s",
        "req/s range",
        "p50 µs",
        "p99 µs",
        "vs echo",
        "server CPU",
        "client CPU",
        "notes",
    ]
    ordered = sorted(rows, key=lambda r: (r.transport, r.scenario.window == 1))
    cells = []
    for row in ordered:
        scenario = f"{row.scenario.name} ({row.scenario.conns}x{row.scenario.window})"
        if row.result is None:
            cells.append(
                [
                    row.transport,
                    scenario,
                    row.server.name,
                    *["-"] * 7,
                    f"FAILED: {_first_line(row.failure)}",
                ]
            )
            continue
        res = row.result
        ratio = ratio_to_reference(rows, row)
        vs_echo = f"{ratio:.2f}x {REFERENCE[row.transport].name}" if ratio is not None else "-"
        rates = [sample["rps"] for sample in row.samples]
        cells.append(
            [
                row.transport,
                scenario,
                row.server.name,
                _num(res["rps"]),
                f"{_num(min(rates))}-{_num(max(rates))}",
                _num(res["p50_us"]),
                _num(res["p99_us"]),
                vs_echo,
                _num(res["server_cpu_pct"], ".0f") + "%",
                _num(res["client_cpu_pct"], ".0f") + "%",
                _roundtrip_notes(res, saturating=row.scenario.window > 1),
            ]
        )
    return markdown_table(header, cells)


# Above these, a sample was disturbed (see loadgen.CoreWatch) and the note says so.
_IDLE_NOTE_PCT = 10.0
_STEAL_NOTE_PCT = 2.0
# A load generator this busy may be what limits the figures (it has one core too).
_CLIENT_BUSY_PCT = 95.0


def _roundtrip_notes(res: dict[str, Any], *, saturating: bool) -> str:
    notes = []
    idle, steal = res.get("server_core_idle_pct"), res.get("steal_pct")
    # One request at a time leaves the server idle by design; pipelined load should not.
    if saturating and idle is not None and idle > _IDLE_NOTE_PCT:
        notes.append(f"server core {idle:.0f}% idle")
    if steal is not None and steal > _STEAL_NOTE_PCT:
        notes.append(f"VM steal {steal:.0f}%")
    if res["errors"]:
        notes.append(f"{res['errors']} error answers")
    if res["server_requests"]:
        notes.append(f"{res['server_requests']} server requests answered")
    if res["disconnected"]:
        notes.append(f"{res['disconnected']} connections dropped")
    return "; ".join(notes)


def fanout_table(rows: list[FanoutRow]) -> str:
    header = [
        "receivers",
        "scenario",
        "server",
        "deliveries/s",
        "deliveries/s range",
        "to last p50 ms",
        "to last max ms",
        "vs ceiling",
        "server CPU",
        "client CPU",
        "notes",
    ]
    cells = []
    for row in rows:
        first = [f"{row.receivers:,}", row.label, row.server.name]
        res = row.result
        if res is None:
            cells.append([*first, *["-"] * 7, f"FAILED: {_first_line(row.failure)}"])
            continue
        ratio = fanout.ratio_to_reference(rows, row)
        rates = [sample["dps"] for sample in row.samples]
        cells.append(
            [
                *first,
                _num(res["dps"]),
                f"{_num(min(rates))}-{_num(max(rates))}",
                _num(res["last_p50_ms"], ".1f"),
                _num(res["last_max_ms"], ".1f"),
                f"{ratio:.2f}x" if ratio is not None else "-",
                _num(res["server_cpu_pct"], ".0f") + "%",
                _num(res["client_cpu_pct"], ".0f") + "%",
                _event_notes(res),
            ]
        )
    return markdown_table(header, cells)


def matching_table(rows: list[MatchingRow]) -> str:
    header = [
        "subscriptions",
        "matching",
        "publishes/s",
        "publishes/s range",
        "deliveries/s",
        "vs smallest",
        "server CPU",
        "client CPU",
        "setup s",
        "notes",
    ]
    cells = []
    for row in rows:
        first = [f"{row.subscriptions:,}", "10"]
        res = row.result
        if res is None:
            cells.append([*first, *["-"] * 7, f"FAILED: {_first_line(row.failure)}"])
            continue
        ratio = matching.ratio(rows, row)
        rates = [sample["pps"] for sample in row.samples]
        setup = row.setup["setup_seconds"] if row.setup else None
        cells.append(
            [
                *first,
                _num(res["pps"]),
                f"{_num(min(rates))}-{_num(max(rates))}",
                _num(res["dps"]),
                f"{ratio:.2f}x" if ratio is not None else "-",
                _num(res["server_cpu_pct"], ".0f") + "%",
                _num(res["client_cpu_pct"], ".0f") + "%",
                _num(setup, ".1f"),
                _event_notes(res),
            ]
        )
    return markdown_table(header, cells)


def micro_table(rows: list[MicroRow]) -> str:
    header = ["subscriptions", "matched", "µs per match", "vs smallest"]
    base = rows[0].us_per_match if rows else 0.0
    cells = [
        [
            f"{row.subscriptions:,}",
            str(row.matched),
            _num(row.us_per_match, ".2f"),
            f"{base / row.us_per_match:.2f}x" if row.us_per_match else "-",
        ]
        for row in rows
    ]
    return markdown_table(header, cells)


def _event_notes(res: dict[str, Any]) -> str:
    notes = []
    idle, steal = res.get("server_core_idle_pct"), res.get("steal_pct")
    if idle is not None and idle > _IDLE_NOTE_PCT:
        notes.append(f"server core {idle:.0f}% idle")
    if steal is not None and steal > _STEAL_NOTE_PCT:
        notes.append(f"VM steal {steal:.0f}%")
    if res["client_cpu_pct"] >= _CLIENT_BUSY_PCT:
        notes.append("client busy")
    if res["error_answers"]:
        notes.append(f"{res['error_answers']} error answers")
    if res["unexpected_events"]:
        notes.append(f"{res['unexpected_events']:+d} events vs expected")
    if res["server_requests"]:
        notes.append(f"{res['server_requests']} server requests answered")
    if res["disconnected"]:
        notes.append(f"{res['disconnected']} connections dropped")
    return "; ".join(notes)


def memory_table(rows: list[MemoryRow]) -> str:
    header = [
        "server",
        "connections",
        "RSS before MB",
        "RSS delta MB",
        "KB/connection",
        "connect s",
        "notes",
    ]
    cells = []
    for row in rows:
        notes = []
        if row.server.is_echo:
            notes.append("plain connections")
        else:
            notes.append("logged-in sessions")
        if row.dropped:
            notes.append(f"{row.dropped} dropped while idle")
        if row.failure:
            notes.append(f"FAILED: {_first_line(row.failure)}")
        measured = row.rss_after > 0
        cells.append(
            [
                row.server.name,
                f"{row.sessions:,}",
                _num(row.rss_before / MB, ".1f") if row.rss_before else "-",
                _num((row.rss_after - row.rss_before) / MB, ".1f") if measured else "-",
                _num(row.kb_per_session, ".1f"),
                _num(row.connect_seconds, ".1f") if row.connected else "-",
                "; ".join(notes),
            ]
        )
    return markdown_table(header, cells)


def callbacks_table(rows: list[CallbackRow]) -> str:
    header = [
        "measure",
        "scenario",
        "through",
        "per second",
        "range",
        "vs",
        "server µs each",
        "µs added (range)",
        "server CPU",
        "client CPU",
        "notes",
    ]
    cells = []
    for row in rows:
        sc = row.scenario
        first = [sc.measure, sc.label, sc.via]
        res = row.result
        if res is None:
            cells.append([*first, *["-"] * 7, f"FAILED: {_first_line(row.failure)}"])
            continue
        rates = [sample["rate"] for sample in row.samples]
        ratio = callbacks.ratio(rows, row)
        added = callbacks.added_us(rows, row)
        cells.append(
            [
                *first,
                _num(res["rate"]),
                f"{_num(min(rates))}-{_num(max(rates))}",
                f"{ratio:.2f}x {callbacks.baseline_name(row)}" if ratio is not None else "-",
                _num(callbacks.server_us(res), ".1f"),
                f"{added[0]:+.1f} ({added[1]:+.1f} to {added[2]:+.1f})" if added else "-",
                _num(res["server_cpu_pct"], ".0f") + "%",
                _num(res["client_cpu_pct"], ".0f") + "%",
                _callback_notes(res, slack=callbacks.in_flight(sc)),
            ]
        )
    return markdown_table(header, cells)


# Above this, something else used the server's core in that round (other processes, or
# kernel work for the server that its own CPU time does not show).
_OTHER_WORK_NOTE_PCT = 20.0


def _callback_notes(res: dict[str, Any], *, slack: int) -> str:
    notes = []
    idle, steal = res.get("server_core_idle_pct"), res.get("steal_pct")
    if idle is not None and idle > _IDLE_NOTE_PCT:
        notes.append(f"server core {idle:.0f}% idle")
    server = res.get("server_cpu_pct")
    if idle is not None and server is not None:
        other = 100 - idle - server
        if other > _OTHER_WORK_NOTE_PCT:
            notes.append(f"server core {other:.0f}% other work")
    if steal is not None and steal > _STEAL_NOTE_PCT:
        notes.append(f"VM steal {steal:.0f}%")
    if res["client_cpu_pct"] >= _CLIENT_BUSY_PCT:
        notes.append("client busy")
    if res["errors"]:
        notes.append(f"{res['errors']} error answers")
    if res.get("connect_failures"):
        notes.append(f"{res['connect_failures']} connects failed")
    if res.get("stuck"):
        notes.append(f"{res['stuck']} logins unfinished at the end")
    # One callback per login or request; those in flight at the period's edges may be
    # counted on one side and their answers on the other.
    if abs(res["callbacks"] - res["expected_callbacks"]) > slack:
        notes.append(f"{res['callbacks']} callbacks for {res['expected_callbacks']} answers")
    if res["server_requests"]:
        notes.append(f"{res['server_requests']} server requests answered")
    if res["disconnected"]:
        notes.append(f"{res['disconnected']} connections dropped")
    return "; ".join(notes)


def _first_line(text: str | None) -> str:
    return (text or "unknown").strip().splitlines()[0]
