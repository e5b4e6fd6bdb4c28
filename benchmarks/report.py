"""What a run reports: each row's median round, the targets and their verdicts, tables, JSON."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any, Literal

from common import ASYNC_MISSING, SYNC_MISSING, Result
from rows_latency import RAW_RUNTIMES, row_key
from rows_observability import PAIRS
from rows_rss import RSS_LIMIT_KIB

Kind = Literal["rate", "p99", "growth"]


@dataclass(frozen=True)
class Target:
    """A target. ``rate``: ``key``'s msg/s over ``baselines[0]``'s is at least ``threshold``.
    ``p99``: ``key``'s p99 latency over the lowest p99 of ``baselines`` is at most
    ``threshold``. ``growth``: ``key``'s RSS growth is at most ``threshold`` KiB."""

    label: str
    key: str
    baselines: tuple[str, ...]
    threshold: float
    kind: Kind = "rate"


# mqkit row -> the FastStream row doing the same job
FASTSTREAM_PEERS = {
    "async.mqkit_publish": "faststream.publish_each",
    "async.mqkit_publish_many": "faststream.publish_gathered",
    "async.mqkit_consume": "faststream.consume",
    "sync.mqkit_publish": "faststream.publish_each",
    "sync.mqkit_publish_many": "faststream.publish_gathered",
    "sync.mqkit_consume": "faststream.consume",
}
FASTSTREAM_RATIO = 1.5
OBS_RATIO = 0.85  # throughput with logging, metrics and tracing on, over the same row off
P99_RATIO = 1.2
MEMORY_SUITE_RATIO = 20.0  # the behaviour suite's speed on memory:// over RabbitMQ
CODEC_LIMIT_US = 20.0


def targets(top_load: int | None) -> tuple[Target, ...]:
    """Every target of a run whose highest latency load is ``top_load`` (None: no latency)."""
    found = [
        Target("sync publish vs raw pika confirm-each", "sync.mqkit_publish",
               ("sync.raw_publish_each",), 1.0),
        Target("async consume vs raw aio-pika ack-each", "async.mqkit_consume",
               ("async.raw_consume",), 2.5),
        Target("async publish_many vs raw aio-pika gathered", "async.mqkit_publish_many",
               ("async.raw_publish_windowed",), 2.0),
        Target("sync publish_many vs raw pika SelectConnection pipelined",
               "sync.mqkit_publish_many", ("sync.raw_publish_select",), 0.8),
        Target("sync consume vs raw pika (kept from the first benchmark)", "sync.mqkit_consume",
               ("sync.raw_consume",), 0.9),
    ]  # fmt: skip
    for off, on in PAIRS:  # observability on vs off (logging INFO + metrics + tracing)
        found.append(
            Target(f"{on} vs {off}", f"observability.{on}", (f"observability.{off}",), OBS_RATIO)
        )
    found.append(
        Target(
            "behaviour suite on memory:// vs on RabbitMQ",
            "memory.suite_memory",
            ("memory.suite_rabbitmq",),
            MEMORY_SUITE_RATIO,
        )
    )
    for key, peer in FASTSTREAM_PEERS.items():
        label = f"{key} vs {peer}"
        found.append(Target(label, key, (peer,), FASTSTREAM_RATIO))
    if top_load is not None:
        raw = tuple(f"latency.{row_key(r, top_load)}" for r in RAW_RUNTIMES)
        for runtime, name in (("client", "Client"), ("async_client", "AsyncClient")):
            found.append(
                Target(
                    f"{name} p99 at {top_load:,} msg/s vs the best raw client's p99",
                    f"latency.{row_key(runtime, top_load)}",
                    raw,
                    P99_RATIO,
                    "p99",
                )
            )
    for runtime in ("client", "async"):
        for role in ("publisher", "consumer"):
            key = f"rss.{runtime}_{role}"
            found.append(Target(f"{key} RSS growth", key, (), RSS_LIMIT_KIB, "growth"))
    return tuple(found)


# The ratio column of the throughput table: each row against the row it is compared with.
BASELINES = {
    **{f"observability.{on}": f"observability.{off}" for off, on in PAIRS},
    "async.raw_publish_windowed": "async.raw_publish_each",
    "async.mqkit_publish": "async.raw_publish_each",
    "async.mqkit_publish_many": "async.raw_publish_windowed",
    "async.mqkit_consume": "async.raw_consume",
    "faststream.publish_each": "async.raw_publish_each",
    "faststream.publish_gathered": "async.raw_publish_windowed",
    "faststream.consume": "async.raw_consume",
    "sync.raw_publish_select": "sync.raw_publish_each",
    "sync.mqkit_publish": "sync.raw_publish_each",
    "sync.mqkit_publish_many": "sync.raw_publish_select",
    "sync.mqkit_consume": "sync.raw_consume",
}
THROUGHPUT = ("codec", "async", "faststream", "sync", "observability")
ONCE = ("rss", "footprint", "memory")  # sections run once, whatever --rounds says


def _score(result: Result) -> float | None:
    """What a row's median round is chosen by: p99 for latency rows, else the rate."""
    if result.error:
        return None
    if result.section == "latency":
        p99 = result.extra.get("p99_ms")
        return float(p99) if p99 is not None else None
    return result.rate


def median_of(rounds: list[list[Result]]) -> list[Result]:
    """Per row, the round with the median rate (latency rows: the median p99), with every
    round's figure in ``extra["rounds"]``. One round: the rows as they are."""
    if len(rounds) == 1:
        return rounds[0]
    merged: list[Result] = []
    for first in rounds[0]:
        same = [
            r for run in rounds for r in run if (r.section, r.key) == (first.section, first.key)
        ]
        ok = sorted((r for r in same if _score(r) is not None), key=lambda r: _score(r) or 0.0)
        if not ok:
            merged.append(first)
            continue
        chosen = ok[(len(ok) - 1) // 2]
        chosen.extra["rounds"] = [round(_score(r) or 0.0, 1) for r in same]
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


def _round_ratio(target: Target, run: dict[str, Result]) -> float | None:
    value = run.get(target.key)
    if value is None or value.error:
        return None
    if target.kind == "rate":
        base = run.get(target.baselines[0])
        if base and base.rate and value.rate:
            return value.rate / base.rate
        return None
    p99 = value.extra.get("p99_ms")
    best = [
        r.extra["p99_ms"]
        for b in target.baselines
        if (r := run.get(b)) is not None and not r.error and r.extra.get("p99_ms")
    ]
    if p99 is None or not best:
        return None
    return float(p99) / float(min(best))


def evaluate(results: list[Result], rounds: list[list[Result]]) -> list[dict[str, Any]]:
    """Each target with its ratio (or value) and PASS / FAIL / n/a. With several rounds a
    ratio is the median of the per-round ratios: a row and its baseline measured seconds
    apart share the machine's load, which the medians of each row taken separately would
    not. A target that could not be measured is n/a (``--strict`` counts it as not met)."""
    rows = _index(results)
    per_round = [_index(run) for run in rounds]
    loads = sorted(
        int(r.extra["offered"]) for r in results if r.section == "latency" and "offered" in r.extra
    )
    ran = {r.section for r in results}
    verdicts: list[dict[str, Any]] = []
    for target in targets(loads[-1] if loads else None):
        if not {k.partition(".")[0] for k in (target.key, *target.baselines)} <= ran:
            continue  # a section it needs was not run (--only)
        if target.kind == "growth":
            row = rows.get(target.key)
            growth = row.extra.get("growth_kib") if row and not row.error else None
            verdicts.append(
                {
                    "target": target.label,
                    "kind": target.kind,
                    "measure": target.key,
                    "baseline": None,
                    "value_kib": growth,
                    "ratio": None,
                    "threshold": f"<= {target.threshold / 1024:g} MiB",
                    "status": _status(growth is None, growth is not None
                                      and growth <= target.threshold),
                }
            )  # fmt: skip
            continue
        ratios = [r for run in per_round if (r := _round_ratio(target, run)) is not None]
        ratio = statistics.median(ratios) if ratios else None
        at_most = target.kind == "p99"
        met = ratio is not None and (ratio <= target.threshold if at_most else
                                     ratio >= target.threshold)  # fmt: skip
        verdicts.append(
            {
                "target": target.label,
                "kind": target.kind,
                "measure": target.key,
                "baseline": list(target.baselines),
                "ratio": ratio,
                "round_ratios": [round(r, 3) for r in ratios],
                "threshold": f"{'<=' if at_most else '>='} {target.threshold:g}x",
                "status": _status(ratio is None, met),
            }
        )
    codec = rows.get("codec.encode_decode")
    if codec is not None:
        us = codec.extra.get("us_best") if not codec.error else None
        verdicts.append(
            {
                "target": "encode + decode per message (kept from the first benchmark)",
                "kind": "codec",
                "measure": "codec.encode_decode",
                "baseline": None,
                "value_us": us,
                "ratio": None,
                "threshold": f"< {CODEC_LIMIT_US:g} µs",
                "status": _status(us is None, us is not None and us < CODEC_LIMIT_US),
            }
        )
    return verdicts


def write_json(
    path: str, results: list[Result], verdicts: list[dict[str, Any]], env: dict[str, Any]
) -> None:
    """The machine-readable report, one JSON document, to ``path`` (``-``: stdout)."""
    payload = {
        "environment": env,
        "results": [{**asdict(r), "rate": r.rate} for r in results],
        "targets": verdicts,
    }
    text = json.dumps(payload, indent=2, default=str)
    if path == "-":
        print(text)
        return
    with open(path, "w", encoding="utf-8") as out:
        out.write(text + "\n")
    print(f"JSON written to {path}", file=sys.stderr)


# --------------------------------------------------------------------------- tables


def _note(result: Result) -> str:
    note = result.error or result.note
    figures = result.extra.get("rounds")
    if figures:
        what = "p99 ms" if result.section == "latency" else "msg/s"
        shown = ", ".join(f"{r:,.1f}" if what == "p99 ms" else f"{r:,.0f}" for r in figures)
        note = "; ".join(filter(None, [note, f"rounds ({what}): {shown}"]))
    return note[:200]


def _ratio(result: Result, other: Result | None) -> str:
    if other and other.rate and result.rate:
        return f"{result.rate / other.rate:.2f}x {other.section}.{other.key}"
    return "-"


def print_table(results: list[Result], verdicts: list[dict[str, Any]], env: dict[str, Any]) -> None:
    """The human-readable report (rich tables; the row labels are in the README and JSON)."""
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 160)
    rows = _index(results)
    sections = {r.section for r in results}
    if sections & set(THROUGHPUT):
        console.print(_throughput_table(results, rows))
    if "latency" in sections:
        console.print(_latency_table(results, rows))
    if "rss" in sections:
        console.print(_rss_table(results, env))
    if "footprint" in sections:
        console.print(_footprint_table(results))
        for line in footprint_lines(results):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    if verdicts:
        console.print(_targets_table(verdicts))
    _footer(console, env)


def _throughput_table(results: list[Result], rows: dict[str, Result]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="throughput: msg/s, higher is better")
    for column, justify in (
        ("row", "left"),
        ("msg/s", "right"),
        ("ratio", "right"),
        ("vs FastStream", "right"),
        ("msgs", "right"),
        ("s", "right"),
        ("RSS+ / traced KiB", "right"),
        ("note", "left"),
    ):
        table.add_column(column, justify=justify, no_wrap=column in ("row", "ratio"))  # type: ignore[arg-type]
    for result in results:
        if result.section not in THROUGHPUT:
            continue
        name = f"{result.section}.{result.key}"
        if result.section == "codec":
            if result.error:
                table.add_row(name, "-", "-", "-", "-", "-", "-", escape(_note(result)))
                continue
            table.add_row(
                name,
                f"{result.extra['us_best']:.2f} µs",
                "-",
                "-",
                str(result.messages),
                f"{result.seconds:.3f}",
                "-",
                f"median {result.extra['us_median']:.2f} µs; {result.extra['body_bytes']} B body",
            )
            continue
        memory = "-"
        if "rss_growth_kib" in result.extra:
            traced_kib = result.extra.get("tracemalloc_peak_kib", "-")
            memory = f"{result.extra['rss_growth_kib']} / {traced_kib}"
        failed = result.error is not None
        peer = rows.get(FASTSTREAM_PEERS.get(name, ""))
        table.add_row(
            name,
            f"{result.rate:,.0f}" if result.rate else "-",
            _ratio(result, rows.get(BASELINES.get(name, ""))),
            _ratio(result, peer).split("x ")[0] + "x" if peer and peer.rate else "-",
            "-" if failed else str(result.messages),
            "-" if failed else f"{result.seconds:.2f}",
            memory,
            escape(_note(result)),
        )
    return table


def _ms(result: Result, key: str) -> str:
    value = result.extra.get(key)
    return f"{value:,.1f}" if isinstance(value, (int, float)) else "-"


def _latency_table(results: list[Result], rows: dict[str, Result]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="publish→handler latency at a fixed offered load: ms, lower is better")
    for column in ("row", "offered", "published", "p50", "p95", "p99", "max", "p99 vs best raw"):
        table.add_column(column, justify="left" if column == "row" else "right")
    table.add_column("note")
    for result in results:
        if result.section != "latency":
            continue
        load = result.extra.get("offered")
        raw = [
            r.extra["p99_ms"]
            for runtime in RAW_RUNTIMES
            if (r := rows.get(f"latency.{row_key(runtime, int(load or 0))}"))
            and not r.error
            and r.extra.get("p99_ms")
        ]
        p99 = result.extra.get("p99_ms")
        versus = f"{p99 / min(raw):.2f}x" if raw and p99 is not None else "-"
        published = result.extra.get("published_rate")
        table.add_row(
            result.key,
            f"{load:,}" if load else "-",
            f"{published:,.0f}" if published else "-",
            _ms(result, "p50_ms"),
            _ms(result, "p95_ms"),
            _ms(result, "p99_ms"),
            _ms(result, "max_ms"),
            versus,
            escape(_note(result)),
        )
    return table


def _rss_table(results: list[Result], env: dict[str, Any]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    title = "resident memory over many messages (fresh processes)"
    if env.get("quick"):
        title += f": quick mode, {env['rss_messages']:,} messages (the full run sends 100,000)"
    table = Table(title=title)
    for column in ("row", "messages", "RSS at first MiB", "RSS at last MiB", "growth KiB"):
        table.add_column(column, justify="left" if column == "row" else "right")
    table.add_column("needs")
    table.add_column("note")
    for result in results:
        if result.section != "rss":
            continue
        first, last = result.extra.get("rss_first_kib"), result.extra.get("rss_last_kib")
        table.add_row(
            f"{result.section}.{result.key}",
            f"{result.extra.get('first', 0):,} → {result.extra.get('total', 0):,}",
            f"{first / 1024:.1f}" if first is not None else "-",
            f"{last / 1024:.1f}" if last is not None else "-",
            f"{result.extra['growth_kib']:,}" if "growth_kib" in result.extra else "-",
            f"<= {RSS_LIMIT_KIB:,}",
            escape(_note(result)),
        )
    return table


def _footprint_table(results: list[Result]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    node = next((r.extra["node"] for r in results if "node" in r.extra), "own node")
    table = Table(title=f"broker footprint per consumer, on {node}")
    for column in (
        "runtime",
        "consumers",
        "queues",
        "per consumer",
        "broker memory MiB",
        "Δ MiB",
        "Δ KiB / consumer",
        "quorum MiB",
        "node RSS MiB (Δ)",
        "fds (Δ)",
    ):
        table.add_column(column, justify="left" if column == "runtime" else "right")
    table.add_column("note")
    for result in results:
        if result.section != "footprint":
            continue
        x = result.extra
        if "queues" not in x:
            table.add_row(result.label, str(x.get("consumers", "-")), *["-"] * 8,
                          escape(_note(result)))  # fmt: skip
            continue
        table.add_row(
            result.label,
            str(x["consumers"]),
            f"{x['queues']:,}",
            f"{x['queues_per_consumer']:.1f}",
            f"{x['memory_mib']:.1f}",
            f"{x['memory_delta_mib']:+.1f}",
            f"{x['per_consumer_kib']:,.0f}",
            f"{x['quorum_mib']:.1f}",
            f"{x['os_rss_mib']:.0f} ({x['os_rss_delta_mib']:+.0f})",
            f"{x['fds']} ({x['fds_delta']:+d})" if x.get("fds") is not None else "-",
            escape(_note(result)),
        )
    return table


def footprint_lines(results: list[Result]) -> list[str]:
    """One plain line per footprint row, easy to compare between two runs (before/after)."""
    lines = []
    for r in results:
        if r.section != "footprint":
            continue
        x = r.extra
        if "queues" not in x:
            lines.append(f"footprint {r.key}: {r.error or 'not measured'}")
            continue
        lines.append(
            f"footprint {r.key}: {x['consumers']} consumers, {x['queues']} queues "
            f"({x['queues_per_consumer']:.1f} per consumer), broker memory "
            f"{x['memory_mib']:.1f} MiB ({x['memory_delta_mib']:+.1f} MiB, "
            f"{x['per_consumer_kib']:,.0f} KiB per consumer), quorum queues "
            f"{x['quorum_mib']:.1f} MiB, node RSS {x['os_rss_mib']:.0f} MiB, "
            f"{x.get('fds')} file descriptors ({x['fds_delta']:+d})"
        )
    return lines


def _targets_table(verdicts: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="targets")
    several = any(len(v.get("round_ratios", ())) > 1 for v in verdicts)
    for column in ("target", "ratio / value", "needs", "result", "per round")[
        : 5 if several else 4
    ]:
        table.add_column(column)
    for verdict in verdicts:
        if verdict.get("value_us") is not None:
            shown = f"{verdict['value_us']:.2f} µs"
        elif verdict.get("value_kib") is not None:
            shown = f"{verdict['value_kib']:,} KiB"
        elif verdict["ratio"] is not None:
            shown = f"{verdict['ratio']:.3f}x" + (" (median)" if several else "")
        else:
            shown = "-"
        style = {"PASS": "green", "FAIL": "red"}.get(verdict["status"], "yellow")
        cells = [verdict["target"], shown, verdict["threshold"]]
        cells.append(f"[{style}]{verdict['status']}[/]")
        if several:
            cells.append(", ".join(f"{r:.2f}x" for r in verdict.get("round_ratios", ())))
        table.add_row(*cells)
    return table


def _footer(console: Any, env: dict[str, Any]) -> None:
    from rich.markup import escape

    mode = "quick mode (counts scaled down)" if env.get("quick") else "full mode"
    ran = set(env["sections"])
    parts = [
        f"{env['date']}; {mode}; broker {env['url']} (RabbitMQ {env['broker_version']}), "
        f"{env['cpus']} CPUs, load average {env['load_before']} before, "
        f"{env['load_after']} after; {env['wall_seconds']:.1f} s in all."
    ]
    if ran & set(THROUGHPUT):
        parts.append(
            f"{env['messages']} messages per throughput row (+{env['warmup']} warm-up), "
            f"prefetch {env['prefetch']}, window {env['window']};"
        )
    if "latency" in ran:
        loads = ", ".join(f"{load:,}" for load in env["latency_loads"])
        parts.append(
            f"latency at {loads} msg/s, {env['latency_seconds']:g} s counted after "
            f"{env['latency_warmup_seconds']:g} s of warm-up;"
        )
    if ran - set(ONCE):
        parts.append(f"median of {env['rounds']} round(s);")
    if "rss" in ran:
        parts.append(f"RSS from message {env['rss_first']:,} to {env['rss_messages']:,};")
    if "footprint" in ran:
        parts.append(f"{env['footprint_consumers']} consumers per runtime for the footprint;")
    if env.get("section_seconds"):
        spent = ", ".join(f"{k} {v:g} s" for k, v in env["section_seconds"].items())
        parts.append(f"Time per section: {spent};")
    parts.append(
        "durable quorum queues, persistent messages, publisher confirms. "
        f"Python {env['python']}, pika {env['pika']}, aio-pika {env['aio_pika']}, "
        f"FastStream {env['faststream'] or 'not installed'}."
    )
    console.print(escape(" ".join(parts)))
    for what, problem in (("Client", SYNC_MISSING), ("AsyncClient", ASYNC_MISSING)):
        if problem:
            console.print(escape(f"mqkit {what} not importable: {problem}"), style="yellow")
