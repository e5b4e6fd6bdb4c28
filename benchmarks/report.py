"""What a run reports: each row's median round, the targets and their verdicts, tables, JSON."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from common import ASYNC_MISSING, SYNC_MISSING, Result


@dataclass(frozen=True)
class Target:
    """A target ratio: ``key / baseline >= threshold`` (or, for the codec, ``value < limit``)."""

    label: str
    key: str
    baseline: str
    threshold: float


TARGETS = (
    Target("async publish_many vs raw windowed", "async.mqkit_publish_many",
           "async.raw_publish_windowed", 1.0),
    Target("async consume vs raw per-message ack", "async.mqkit_consume",
           "async.raw_consume", 1.5),
    Target("sync publish vs raw confirm-each", "sync.mqkit_publish", "sync.raw_publish_each", 0.9),
    Target("sync publish_many vs raw confirm-each", "sync.mqkit_publish_many",
           "sync.raw_publish_each", 5.0),
    Target("sync consume vs raw", "sync.mqkit_consume", "sync.raw_consume", 0.9),
)  # fmt: skip
CODEC_LIMIT_US = 20.0

BASELINES = {
    "async.raw_publish_windowed": "async.raw_publish_each",
    "async.mqkit_publish": "async.raw_publish_each",
    "async.mqkit_publish_many": "async.raw_publish_windowed",
    "async.mqkit_consume": "async.raw_consume",
    "sync.raw_publish_select": "sync.raw_publish_each",
    "sync.mqkit_publish": "sync.raw_publish_each",
    "sync.mqkit_publish_many": "sync.raw_publish_each",
    "sync.mqkit_consume": "sync.raw_consume",
}


def median_of(rounds: list[list[Result]]) -> list[Result]:
    """Per row, the round with the median rate (its own messages and seconds), with every
    round's rate in ``extra["rates"]``. One round: the rows as they are."""
    if len(rounds) == 1:
        return rounds[0]
    merged: list[Result] = []
    for first in rounds[0]:
        same = [
            r for run in rounds for r in run if (r.section, r.key) == (first.section, first.key)
        ]
        ok = sorted((r for r in same if r.rate), key=lambda r: r.rate or 0.0)
        if not ok:
            merged.append(first)
            continue
        chosen = ok[(len(ok) - 1) // 2]
        chosen.extra["rates"] = [round(r.rate or 0.0, 1) for r in same]
        if len(ok) < len(same):
            chosen.note = f"{len(same) - len(ok)} of {len(same)} rounds failed"
        merged.append(chosen)
    return merged


def _index(results: list[Result]) -> dict[str, Result]:
    return {f"{r.section}.{r.key}": r for r in results}


def _status(missing: bool, met: bool) -> str:
    if missing:
        return "n/a"
    return "PASS" if met else "FAIL"


def evaluate(results: list[Result], rounds: list[list[Result]]) -> list[dict[str, Any]]:
    """Each target with its ratio and PASS / FAIL / n/a. With several rounds the ratio is the
    median of the per-round ratios: a row and its baseline measured seconds apart share the
    machine's load, which the medians of each row taken separately would not."""
    rows = _index(results)
    per_round = [_index(run) for run in rounds]
    verdicts: list[dict[str, Any]] = []
    for target in TARGETS:
        ratios = []
        for run in per_round:
            value, base = run.get(target.key), run.get(target.baseline)
            if value and base and value.rate and base.rate:
                ratios.append(value.rate / base.rate)
        ratio = statistics.median(ratios) if ratios else None
        verdicts.append(
            {
                "target": target.label,
                "measure": target.key,
                "baseline": target.baseline,
                "ratio": ratio,
                "round_ratios": [round(r, 3) for r in ratios],
                "threshold": f">= {target.threshold:g}x",
                "status": _status(ratio is None, ratio is not None and ratio >= target.threshold),
            }
        )
    codec = rows.get("codec.encode_decode")
    us = codec.extra.get("us_best") if codec and not codec.error else None
    verdicts.append(
        {
            "target": "encode + decode per message",
            "measure": "codec.encode_decode",
            "baseline": None,
            "value_us": us,
            "ratio": None,
            "threshold": f"< {CODEC_LIMIT_US:g} µs",
            "status": _status(us is None, us is not None and us < CODEC_LIMIT_US),
        }
    )
    return verdicts


def print_json(results: list[Result], verdicts: list[dict[str, Any]], env: dict[str, Any]) -> None:
    """The machine-readable report: one JSON document."""
    payload = {
        "environment": env,
        "results": [{**asdict(r), "rate": r.rate} for r in results],
        "targets": verdicts,
    }
    print(json.dumps(payload, indent=2))


def _note(result: Result) -> str:
    note = result.error or result.note
    rates = result.extra.get("rates")
    if rates:
        note = "; ".join(filter(None, [note, "rounds: " + ", ".join(f"{r:,.0f}" for r in rates)]))
    return note[:160]


def print_table(results: list[Result], verdicts: list[dict[str, Any]], env: dict[str, Any]) -> None:
    """The human-readable report (rich tables; the row labels are in the README and --json)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 140)
    rows = _index(results)
    table = Table(title="mqkit benchmark: msg/s, higher is better")
    table.add_column("row", no_wrap=True, min_width=28)
    table.add_column("msg/s", justify="right")
    table.add_column("ratio", justify="right", no_wrap=True)
    table.add_column("msgs", justify="right")
    table.add_column("s", justify="right")
    table.add_column("RSS+ / traced KiB", justify="right")
    table.add_column("note", overflow="fold")
    for result in results:
        name = f"{result.section}.{result.key}"
        if result.section == "codec":
            us = result.extra["us_best"]
            table.add_row(
                name,
                f"{us:.2f} µs",
                "-",
                str(result.messages),
                f"{result.seconds:.3f}",
                "-",
                f"median {result.extra['us_median']:.2f} µs; {result.extra['body_bytes']} B body",
            )
            continue
        base = rows.get(BASELINES.get(name, ""))
        ratio = "-"
        if base and base.rate and result.rate:
            ratio = f"{result.rate / base.rate:.2f}x {base.key.replace('raw_', 'raw ')}"
        memory = "-"
        if "rss_growth_kib" in result.extra:
            traced_kib = result.extra.get("tracemalloc_peak_kib", "-")
            memory = f"{result.extra['rss_growth_kib']} / {traced_kib}"
        failed = result.error is not None
        table.add_row(
            name,
            f"{result.rate:,.0f}" if result.rate else "-",
            ratio,
            "-" if failed else str(result.messages),
            "-" if failed else f"{result.seconds:.2f}",
            memory,
            escape(_note(result)),
        )
    console.print(table)
    targets = Table(title="targets")
    several = any(len(v.get("round_ratios", ())) > 1 for v in verdicts)
    for column in ("target", "ratio / value", "needs", "result", "per round")[
        : 5 if several else 4
    ]:
        targets.add_column(column)
    for verdict in verdicts:
        if verdict.get("value_us") is not None:
            shown = f"{verdict['value_us']:.2f} µs"
        elif verdict["ratio"] is not None:
            shown = f"{verdict['ratio']:.3f}x" + (" (median)" if several else "")
        else:
            shown = "-"
        style = {"PASS": "green", "FAIL": "red"}.get(verdict["status"], "yellow")
        cells = [verdict["target"], shown, verdict["threshold"]]
        cells.append(f"[{style}]{verdict['status']}[/]")
        if several:
            cells.append(", ".join(f"{r:.2f}x" for r in verdict.get("round_ratios", ())))
        targets.add_row(*cells)
    console.print(targets)
    console.print(
        escape(
            f"broker {env['url']}, {env['cpus']} CPUs, load average {env['load_before']} before, "
            f"{env['load_after']} after; {env['wall_seconds']:.1f} s in all. "
            f"{env['messages']} messages per row (+{env['warmup']} warm-up), "
            f"median of {env['rounds']} round(s), prefetch "
            f"{env['prefetch']}, window {env['window']}, durable quorum queues, persistent "
            "messages, publisher confirms."
        )
    )
    for what, problem in (("Client", SYNC_MISSING), ("AsyncClient", ASYNC_MISSING)):
        if problem:
            console.print(escape(f"mqkit {what} not importable: {problem}"), style="yellow")
