"""mqkit vs raw pika / aio-pika: throughput on one broker, in one run, with the same queue shape.

    .venv/bin/python benchmarks/bench.py                 # a table; well under 2 minutes
    .venv/bin/python benchmarks/bench.py --json          # machine-readable
    .venv/bin/python benchmarks/bench.py --messages 5000 --strict

Every measurement gets a fresh, identical queue: durable quorum, declared with exactly the
arguments an mqkit consumer uses (``mqkit.topology.consumer_topology``), so mqkit's own declares
are no-op re-declares. Every message is the same small pydantic model, persistent, published
mandatory with publisher confirms. The raw baselines do the same job by hand: they serialise
the model with pydantic (and consumers validate it back) and set the same AMQP properties.
Each measurement is preceded by a warm-up of the same operation on the same connection, is
timed with ``time.perf_counter`` and stopped at ``--phase-seconds`` (its rate is then over what
it did). Consumers run with the same prefetch; consume rates are timed from the end of the
warm-up to the last message handled.

See benchmarks/README.md for what each row means and the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from typing import Any

import aio_pika
import pika
from common import ASYNC_MISSING, IMPORT_PROBLEM, SYNC_MISSING, Config, Queues, Result
from report import evaluate, median_of, print_json, print_table
from rows_async import async_section
from rows_sync import codec_section, sync_section


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    """The command line, as a Config."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("MQKIT_URL", "amqp://guest:guest@localhost:5672/"),
        help="broker URL (default: $MQKIT_URL or the local broker)",
    )
    parser.add_argument("--messages", type=int, default=2000, help="messages per row (2000)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up messages (N/10, 50-500)")
    parser.add_argument("--prefetch", type=int, default=64, help="consumer prefetch (64)")
    parser.add_argument("--window", type=int, default=256, help="raw publish window (256)")
    parser.add_argument(
        "--phase-seconds", type=float, default=8.0, help="stop any one row after this (8)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc passes")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run everything this many times and report each row's median (1)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is not met")
    parser.add_argument(
        "--only", choices=("async", "sync", "codec"), action="append", help="run only these"
    )
    args = parser.parse_args(argv)
    if args.messages < 1:
        parser.error("--messages must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    warmup = args.warmup if args.warmup is not None else max(50, min(500, args.messages // 10))
    cfg = Config(
        url=args.url,
        messages=args.messages,
        warmup=max(1, warmup),
        prefetch=args.prefetch,
        window=args.window,
        phase_seconds=args.phase_seconds,
        memory=not args.no_memory,
        memory_messages=min(args.messages, 500),
    )
    return cfg, args


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run every row, print the report; the exit status is 1 only with ``--strict``."""
    from mqkit.settings import mask_url

    cfg, args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    sections = set(args.only or ("async", "sync", "codec"))
    started = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    queues = Queues(cfg.url)
    rounds: list[list[Result]] = []
    try:
        for _ in range(args.rounds):
            results: list[Result] = []
            if "codec" in sections:
                results.append(codec_section())
            if "async" in sections:
                results += asyncio.run(async_section(cfg, queues))
            if "sync" in sections:
                results += sync_section(cfg, queues)
            rounds.append(results)
    except KeyboardInterrupt:
        print("interrupted; deleting the benchmark queues", file=sys.stderr)
        return 130
    finally:
        queues.delete()
    env = {
        "url": mask_url(cfg.url),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": time.perf_counter() - started,
        "messages": cfg.messages,
        "warmup": cfg.warmup,
        "prefetch": cfg.prefetch,
        "window": cfg.window,
        "python": sys.version.split()[0],
        "pika": pika.__version__,  # type: ignore[attr-defined]  # not in types-pika
        "aio_pika": aio_pika.__version__,
        "mqkit_import_problem": IMPORT_PROBLEM,
        "client_missing": SYNC_MISSING,
        "async_client_missing": ASYNC_MISSING,
    }
    env["rounds"] = args.rounds
    results = median_of(rounds)
    verdicts = evaluate(results, rounds)
    if args.json:
        print_json(results, verdicts, env)
    else:
        print_table(results, verdicts, env)
    if args.strict and any(v["status"] != "PASS" for v in verdicts):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
