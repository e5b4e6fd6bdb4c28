"""The results of a benchmark run as Markdown, for benchmarks/README.md's "Results":

    .venv/bin/python benchmarks/bench.py --rounds 3 --json bench.json
    .venv/bin/python benchmarks/markdown.py bench.json

Prints where and when it ran, every target with its ratio and verdict, and every row's
figure (msg/s, p99 or RSS growth) with its rounds.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _figure(row: dict[str, Any]) -> str:
    extra = row.get("extra") or {}
    if row.get("error"):
        return f"error: {row['error'][:80]}"
    if row["section"] == "latency":
        return (
            f"p50 {extra.get('p50_ms')} / p95 {extra.get('p95_ms')} / p99 "
            f"{extra.get('p99_ms')} / max {extra.get('max_ms')} ms"
        )
    if row["section"] == "rss":
        return f"+{extra.get('growth_kib')} KiB"
    if row["section"] == "footprint":
        return f"{extra.get('queues')} queues, broker {extra.get('memory_mib', 0):.1f} MiB"
    if row["section"] == "memory":
        return str(row.get("note", ""))
    if row["section"] == "codec":
        return f"{extra.get('us_median', 0):.1f} µs per message (median)"
    rate = row.get("rate")
    return f"{rate:,.0f} /s" if rate else "-"


def render(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"Run of {env['date']}: RabbitMQ {env['broker_version']}, {env['cpus']} CPUs, load "
        f"average {env['load_before']} before and {env['load_after']} after, "
        f"{'quick mode, ' if env.get('quick') else ''}median of {env['rounds']} round(s), "
        f"{env['wall_seconds']:.0f} s in all.",
        "",
        "| target | ratio / value | needs | result |",
        "|---|---|---|---|",
    ]
    for target in report["targets"]:
        ratio = target.get("ratio")
        if isinstance(ratio, (int, float)):
            value = f"{ratio:.2f}x"
        elif target.get("value_kib") is not None:
            value = f"+{target['value_kib']} KiB"
        elif target.get("value_us") is not None:
            value = f"{target['value_us']:.1f} µs"
        else:
            value = "-"
        lines.append(
            f"| {target['target']} | {value} | {target['threshold']} | {target['status']} |"
        )
    lines += ["", "| row | figure | rounds |", "|---|---|---|"]
    for row in report["results"]:
        rounds = (row.get("extra") or {}).get("rounds")
        shown = ", ".join(f"{r:,.1f}" for r in rounds) if rounds else ""
        lines.append(f"| {row['section']}.{row['key']} | {_figure(row)} | {shown} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/markdown.py bench.json", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as source:
        print(render(json.load(source)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
