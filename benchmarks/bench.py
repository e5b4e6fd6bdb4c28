"""mqkit vs raw pika / aio-pika and FastStream: throughput, latency, memory and broker footprint,
on one broker, in one run, with the same queue shape.

    .venv/bin/python benchmarks/bench.py --quick          # every section, under a minute
    .venv/bin/python benchmarks/bench.py                  # the full run (a few minutes)
    .venv/bin/python benchmarks/bench.py --json out.json  # tables, and the JSON in out.json
    .venv/bin/python benchmarks/bench.py --strict         # exit 1 unless every target is met

Every throughput and latency measurement gets a fresh, identical queue: durable quorum,
declared with exactly the arguments an mqkit consumer uses (``mqkit.topology.consumer_topology``),
so mqkit's own declares are no-op re-declares. Every message is the same small pydantic model,
persistent, published mandatory with publisher confirms. The raw baselines and FastStream do
the same job: they serialise the model (and consumers validate it back) and set the same AMQP
properties. Each throughput measurement is preceded by a warm-up of the same operation on the
same connection, is timed with ``time.perf_counter`` and stopped at ``--phase-seconds`` (its
rate is then over what it did). Consumers run with the same prefetch; consume rates are timed
from the end of the warm-up to the last message handled.

Every queue the run declares is deleted at the end, also after an error, Ctrl-C or SIGTERM.
See benchmarks/README.md for what each row means and the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import pika
from common import ASYNC_MISSING, IMPORT_PROBLEM, SYNC_MISSING, Config, Queues, Result
from report import ONCE, evaluate, median_of, print_table, write_json
from rows_async import async_section
from rows_faststream import faststream_section, faststream_version
from rows_footprint import footprint_section
from rows_latency import latency_section
from rows_memory import memory_section
from rows_observability import observability_section
from rows_rss import rss_section
from rows_sync import codec_section, sync_section

SECTIONS = (
    "codec",
    "async",
    "faststream",
    "sync",
    "observability",
    "latency",
    "rss",
    "footprint",
    "memory",
)

# (full, quick) defaults of the options --quick scales down
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "messages": (2000, 500),
    "phase_seconds": (8.0, 4.0),
    "loads": ("500,1500", "1500"),
    "latency_seconds": (10.0, 1.0),
    "latency_warmup": (1.0, 0.5),
    "rss_messages": (100_000, 10_000),
    "rss_first": (10_000, 1_000),
    "footprint_consumers": (100, 10),
}


def _loads(text: str) -> tuple[int, ...]:
    try:
        loads = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give msg/s as integers, e.g. 500,1500"
        ) from None
    if not loads or min(loads) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one load of 1 msg/s or more")
    return loads


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    """The command line, as a Config (``--quick`` fills what was not given explicitly)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("MQKIT_URL", "amqp://guest:guest@localhost:5672/"),
        help="broker URL (default: $MQKIT_URL or the local broker)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="every section with small counts, under a minute (the counts are in the report)",
    )
    parser.add_argument(
        "--messages", type=int, help="messages per throughput row (2000; quick 500)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up messages (N/10, 50-500)")
    parser.add_argument("--prefetch", type=int, default=64, help="consumer prefetch (64)")
    parser.add_argument("--window", type=int, default=256, help="gathered publish window (256)")
    parser.add_argument(
        "--phase-seconds", type=float, help="stop any one throughput row after this (8; quick 4)"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the tracemalloc passes (quick skips them)"
    )
    parser.add_argument(
        "--loads", type=_loads, help="latency: offered loads in msg/s (500,1500; quick 1500)"
    )
    parser.add_argument(
        "--latency-seconds", type=float, help="latency: seconds counted per load (10; quick 1)"
    )
    parser.add_argument(
        "--latency-warmup", type=float, help="latency: seconds not counted first (1; quick 0.5)"
    )
    parser.add_argument(
        "--rss-messages", type=int, help="memory rows: messages in all (100000; quick 10000)"
    )
    parser.add_argument(
        "--rss-first", type=int, help="memory rows: the first RSS mark (10000; quick 1000)"
    )
    parser.add_argument(
        "--footprint-consumers", type=int, help="footprint: consumers per runtime (100; quick 10)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the throughput and latency sections this many times; report each row's median",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        nargs="?",
        const="-",
        help="also write the results as JSON to PATH ('-' or no PATH: JSON on stdout, no tables)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is not met")
    parser.add_argument(
        "--only", choices=SECTIONS, action="append", help="run only these sections (repeatable)"
    )
    args = parser.parse_args(argv)
    mode = 1 if args.quick else 0
    for name, defaults in DEFAULTS.items():
        if getattr(args, name) is None:
            value = defaults[mode]
            setattr(args, name, _loads(value) if name == "loads" else value)
    for name in ("messages", "rss_messages", "rss_first", "footprint_consumers", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.latency_seconds <= 0 or args.latency_warmup < 0:
        parser.error("--latency-seconds must be above 0 and --latency-warmup at least 0")
    warmup = args.warmup if args.warmup is not None else max(50, min(500, args.messages // 10))
    cfg = Config(
        url=args.url,
        messages=args.messages,
        warmup=max(1, warmup),
        prefetch=args.prefetch,
        window=args.window,
        phase_seconds=args.phase_seconds,
        memory=not (args.no_memory or args.quick),
        memory_messages=min(args.messages, 500),
        quick=args.quick,
        latency_loads=args.loads,
        latency_seconds=args.latency_seconds,
        latency_warmup_seconds=args.latency_warmup,
        rss_messages=args.rss_messages,
        rss_first=min(args.rss_first, args.rss_messages),
        footprint_consumers=args.footprint_consumers,
    )
    return cfg, args


def broker_version(url: str) -> str | None:
    """The version the broker at ``url`` announces, or None if it cannot be asked."""
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
    except Exception:
        return None
    try:
        impl: Any = connection._impl  # type: ignore[attr-defined]  # not in types-pika
        properties = impl.server_properties or {}
        version = properties.get("version")
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        connection.close()


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _run(name: str, cfg: Config, queues: Queues, spent: dict[str, float]) -> list[Result]:
    """Run section ``name``; add its wall time to ``spent``."""
    started = time.perf_counter()
    runs: dict[str, Callable[[], list[Result]]] = {
        "codec": lambda: [codec_section()],
        "async": lambda: asyncio.run(async_section(cfg, queues)),
        "faststream": lambda: asyncio.run(faststream_section(cfg, queues)),
        "sync": lambda: sync_section(cfg, queues),
        "latency": lambda: latency_section(cfg, queues),
        "observability": lambda: observability_section(cfg, queues),
        "rss": lambda: rss_section(cfg, queues),
        "footprint": lambda: footprint_section(cfg),
        "memory": lambda: memory_section(cfg),
    }
    try:
        return runs[name]()
    finally:
        spent[name] = round(spent.get(name, 0.0) + time.perf_counter() - started, 1)


def main(argv: list[str] | None = None) -> int:
    """Run every section, print the report; the exit status is 1 only with ``--strict``."""
    from mqkit.settings import mask_url

    cfg, args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    chosen = [name for name in SECTIONS if name in (args.only or SECTIONS)]
    started = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    queues = Queues(cfg.url)
    rounds: list[list[Result]] = []
    once: list[Result] = []
    spent: dict[str, float] = {}
    try:
        for _ in range(args.rounds):
            rounds.append(
                [r for name in chosen if name not in ONCE for r in _run(name, cfg, queues, spent)]
            )
        for name in chosen:
            if name in ONCE:
                once += _run(name, cfg, queues, spent)
    except KeyboardInterrupt:
        print("interrupted; deleting the benchmark queues", file=sys.stderr)
        return 130
    finally:
        queues.delete()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": cfg.quick,
        "url": mask_url(cfg.url),
        "broker_version": broker_version(cfg.url),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": time.perf_counter() - started,
        "sections": chosen,
        "section_seconds": spent,
        "rounds": args.rounds,
        "messages": cfg.messages,
        "warmup": cfg.warmup,
        "prefetch": cfg.prefetch,
        "window": cfg.window,
        "latency_loads": list(cfg.latency_loads),
        "latency_seconds": cfg.latency_seconds,
        "latency_warmup_seconds": cfg.latency_warmup_seconds,
        "rss_messages": cfg.rss_messages,
        "rss_first": cfg.rss_first,
        "footprint_consumers": cfg.footprint_consumers,
        "python": sys.version.split()[0],
        "pika": pika.__version__,  # type: ignore[attr-defined]  # not in types-pika
        "aio_pika": aio_pika.__version__,
        "faststream": faststream_version(),
        "mqkit_import_problem": IMPORT_PROBLEM,
        "client_missing": SYNC_MISSING,
        "async_client_missing": ASYNC_MISSING,
    }
    results = median_of(rounds) + once
    verdicts = evaluate(results, [*rounds[:-1], rounds[-1] + once])
    if args.json != "-":
        print_table(results, verdicts, env)
    if args.json is not None:
        write_json(args.json, results, verdicts, env)
    if args.strict and any(v["status"] != "PASS" for v in verdicts):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
