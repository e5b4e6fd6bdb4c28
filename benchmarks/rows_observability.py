"""What observability costs: mqkit's publish_many and consume rows with logging at INFO,
Prometheus metrics and OpenTelemetry tracing on, beside the same rows with them off, on both
clients.

"On" is what a production service runs: the ``mqkit`` logger at INFO into a real handler (a
formatter writing to ``os.devnull``), a ``PrometheusMiddleware`` (a registry of its own) and
a ``TracingMiddleware`` on an SDK ``TracerProvider`` whose batch processor hands every span
to an exporter that drops it (so span creation, attributes, context propagation and export
batching are paid for; only the network is not). The variants: ``metrics`` is the logging
and Prometheus without tracing; ``sampled`` adds tracing with the usual production sampler,
``ParentBased(TraceIdRatioBased(0.1))`` (a trace is kept whole or not at all, one in ten);
``traced`` records every span (``ALWAYS_ON``). "Off" is the same client without middleware,
the ``mqkit`` logger at WARNING.

Each row notes the process's CPU time per message (all its threads: ``time.process_time``
over the timed phase) beside the wall-clock rate: on a busy machine the rates of rows run
seconds apart swing with the load, while the CPU each message costs swings much less, so
``off CPU / on CPU`` approximates the throughput ratio of a machine with a core to spare.
The rows of each job run back to back (off first); with ``--rounds K`` each target is the
median of its per-round ratios (report.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from common import (
    QUEUE_TYPE,
    SERVICE,
    AsyncClient,
    BenchMessage,
    Client,
    Config,
    Queues,
    Result,
    make_messages,
    set_error,
)

VARIANTS = {
    "off": "observability off",
    "metrics": "logging INFO + metrics",
    "sampled": "logging INFO + metrics + tracing (10% of traces)",
    "traced": "logging INFO + metrics + tracing (every message)",
}
JOBS = {
    "sync_publish_many": "Client publish_many",
    "sync_consume": "Client consume",
    "async_publish_many": "AsyncClient publish_many",
    "async_consume": "AsyncClient consume",
}
ROWS = tuple(
    (f"{job}_{variant}", f"{job_label}, {variant_label}")
    for job, job_label in JOBS.items()
    for variant, variant_label in VARIANTS.items()
)
# (off row, on row): each target compares one on row with its off row
PAIRS = tuple(
    (f"{job}_off", f"{job}_{variant}") for job in JOBS for variant in VARIANTS if variant != "off"
)


def observability_missing() -> str | None:
    """Why the "on" rows cannot run here (their extras are not installed), or None."""
    try:
        import opentelemetry.sdk.trace  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        return f"{exc} (install it: pip install -e '.[bench]')"
    return None


def _middleware(variant: str) -> tuple[list[Any], Any]:
    """The "on" middlewares, and the tracer provider to shut down after the row."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
    from prometheus_client import CollectorRegistry

    from mqkit.observability import PrometheusMiddleware, TracingMiddleware

    class Discard(SpanExporter):
        """Exports spans nowhere (the batching and the hand-over are still paid for)."""

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    metrics = PrometheusMiddleware(CollectorRegistry())
    if variant == "metrics":
        return [metrics], None
    sampler = ALWAYS_ON if variant == "traced" else ParentBased(TraceIdRatioBased(0.1))
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    return [metrics, TracingMiddleware(provider)], provider


@contextlib.contextmanager
def _logging(on: bool) -> Iterator[None]:
    """The ``mqkit`` logger at INFO into a formatting handler (on), or at WARNING (off)."""
    logger = logging.getLogger("mqkit")
    level, propagate = logger.level, logger.propagate
    sink = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger.setLevel(logging.INFO if on else logging.WARNING)
    logger.propagate = False
    if on:
        logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        sink.close()


class _Clock:
    """Wall clock and process CPU time between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self._wall0 = self._cpu0 = 0.0

    def start(self) -> None:
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall = time.perf_counter() - self._wall0
        self.cpu = time.process_time() - self._cpu0

    def result(self, result: Result, messages: int, wanted: int) -> Result:
        result.messages, result.seconds = messages, self.wall
        if messages:
            cpu_us = self.cpu / messages * 1e6
            result.extra["cpu_us_per_message"] = round(cpu_us, 1)
            result.note = f"{cpu_us:.1f} µs CPU/msg"
        if messages < wanted:
            result.note += "; stopped at the deadline"
        return result


class _Counter:
    """Counts handled messages; starts the clock at the warm-up's end, stops it at the last."""

    def __init__(self, clock: _Clock, warmup: int, total: int) -> None:
        self.clock, self.warmup, self.total = clock, warmup, total
        self.count = 0
        self.finished = False

    def tick(self) -> bool:
        """One more handled; True once the last one is in."""
        self.count += 1
        if self.count == self.warmup:
            self.clock.start()
        if self.count == self.total:
            self.clock.stop()
            self.finished = True
        return self.finished


def observability_section(cfg: Config, queues: Queues) -> list[Result]:
    """Each job's rows (off, sampled, traced) back to back, on Client, then AsyncClient."""
    missing = observability_missing()
    results: list[Result] = []
    for key, label in ROWS:
        job, _, variant = key.rpartition("_")
        runtime = Client if job.startswith("sync") else AsyncClient
        if runtime is None or (variant != "off" and missing):
            why = missing if variant != "off" and missing else "mqkit is not importable"
            results.append(Result("observability", key, label, error=why))
            continue
        row = Result("observability", key, label)
        try:
            if job.startswith("sync"):
                _sync_row(cfg, queues, row, job, variant)
            else:
                asyncio.run(_async_row(cfg, queues, row, job, variant))
        except Exception as exc:
            set_error(row, exc)
        results.append(row)
    _cpu_ratios(results)
    return results


def _cpu_ratios(results: list[Result]) -> None:
    """Note on each "on" row its off row's CPU per message over its own (the throughput
    ratio of an unloaded machine, near enough)."""
    cpu = {r.key: r.extra.get("cpu_us_per_message") for r in results if not r.error}
    for row in results:
        off_key = row.key.rpartition("_")[0] + "_off"
        off, on = cpu.get(off_key), cpu.get(row.key)
        if row.key != off_key and off and on:
            row.extra["cpu_ratio"] = round(off / on, 3)
            row.note = f"{row.note}; CPU ratio {off / on:.2f}"


def _client_kwargs(cfg: Config, variant: str) -> tuple[dict[str, Any], Any]:
    kwargs: dict[str, Any] = {
        "url": cfg.url,
        "service": SERVICE,
        "queue_type": QUEUE_TYPE,
        "prefetch": cfg.prefetch,
    }
    provider = None
    if variant != "off":
        kwargs["middleware"], provider = _middleware(variant)
    return kwargs, provider


def _sync_row(cfg: Config, queues: Queues, row: Result, job: str, variant: str) -> None:
    kwargs, provider = _client_kwargs(cfg, variant)
    assert Client is not None
    clock = _Clock()
    try:
        with _logging(variant != "off"), Client(**kwargs) as client:
            if job.endswith("publish_many"):
                with queues.fresh_queue("obs-sync-publish") as q:
                    producer = client.producer(BenchMessage, queue=q)
                    producer.publish_many(make_messages(cfg.warmup))
                    messages = make_messages(cfg.messages)
                    clock.start()
                    sent = len(producer.publish_many(messages))
                    clock.stop()
                clock.result(row, sent, len(messages))
                return
            with queues.fresh_queue("obs-sync-consume") as q:
                total = cfg.warmup + cfg.messages
                queues.preload(q, make_messages(total))
                counter = _Counter(clock, cfg.warmup, total)
                done = threading.Event()

                def handler(message: BenchMessage, ctx: Any) -> None:
                    if counter.tick():
                        done.set()

                consumer = client.consumer(q, BenchMessage, handler, prefetch=cfg.prefetch)
                consumer.start()
                done.wait(cfg.phase_seconds + 5)
                if not done.is_set():
                    clock.stop()
                consumer.stop()
            clock.result(row, max(0, min(counter.count, total) - cfg.warmup), cfg.messages)
    finally:
        if provider is not None:
            provider.shutdown()


async def _async_row(cfg: Config, queues: Queues, row: Result, job: str, variant: str) -> None:
    kwargs, provider = _client_kwargs(cfg, variant)
    assert AsyncClient is not None
    clock = _Clock()
    try:
        with _logging(variant != "off"):
            async with AsyncClient(**kwargs) as client:
                if job.endswith("publish_many"):
                    with queues.fresh_queue("obs-async-publish") as q:
                        producer = await client.producer(BenchMessage, queue=q)
                        await producer.publish_many(make_messages(cfg.warmup))
                        messages = make_messages(cfg.messages)
                        clock.start()
                        sent = len(await producer.publish_many(messages))
                        clock.stop()
                    clock.result(row, sent, len(messages))
                    return
                with queues.fresh_queue("obs-async-consume") as q:
                    total = cfg.warmup + cfg.messages
                    await asyncio.to_thread(queues.preload, q, make_messages(total))
                    counter = _Counter(clock, cfg.warmup, total)
                    done = asyncio.Event()

                    async def handler(message: BenchMessage, ctx: Any) -> None:
                        if counter.tick():
                            done.set()

                    consumer = client.consumer(q, BenchMessage, handler, prefetch=cfg.prefetch)
                    await consumer.start()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(done.wait(), cfg.phase_seconds + 5)
                    if not done.is_set():
                        clock.stop()
                    await consumer.stop()
                clock.result(row, max(0, min(counter.count, total) - cfg.warmup), cfg.messages)
    finally:
        if provider is not None:
            provider.shutdown()


# -- without a broker ------------------------------------------------------------------------


def in_process(n: int = 4000, repeat: int = 5) -> dict[str, dict[str, float]]:
    """µs of CPU per message that mqkit's observability code adds on its own, without a
    broker: a consumer's handle chain and the events it reports (``Client`` and
    ``AsyncClient``), and the publish hooks around a lone publish and a batch of 100; the
    best of ``repeat`` loops of ``n`` messages, over the same loop with observability off."""
    from mqkit.context import Context
    from mqkit.correlation import handling
    from mqkit.lifecycle import LogObserver, Pipeline, delivery_of, outcome_event
    from mqkit.messages import Envelope
    from mqkit.middleware import MiddlewareStack
    from mqkit.retry import Ack

    def contexts() -> list[Context]:
        return [
            Context(f"m{i}", None, {}, exchange="", routing_key="q", queue="q", event_type="T")
            for i in range(n)
        ]

    def per_message(run: Any, variant: str, runtime: str) -> float:
        best = float("inf")
        for _ in range(repeat):
            middleware, provider = _middleware(variant) if variant != "off" else ([], None)
            stack = MiddlewareStack(middleware, runtime=runtime)  # type: ignore[arg-type]
            pipeline = Pipeline([LogObserver(), *stack.observers])
            started = time.process_time()
            run(stack, pipeline)
            best = min(best, (time.process_time() - started) / n * 1e6)
            if provider is not None:
                provider.shutdown()
        return best

    def consume(stack: Any, pipeline: Any) -> None:
        handler = stack.wrap(lambda message, ctx: None)
        for ctx in contexts():
            with handling(ctx, service=SERVICE):
                handler(None, ctx)
            pipeline.emit(outcome_event(delivery_of(ctx, service=SERVICE), Ack(), dlq="q.dlq"))

    def consume_async(stack: Any, pipeline: Any) -> None:
        async def empty(message: Any, ctx: Any) -> None:
            return None

        async def loop() -> None:
            handler = stack.wrap_async(empty)
            for ctx in contexts():
                with handling(ctx, service=SERVICE):
                    await handler(None, ctx)
                event = outcome_event(delivery_of(ctx, service=SERVICE), Ack(), dlq="q.dlq")
                pipeline.emit(event)

        asyncio.run(loop())

    def publish(batch: int) -> Any:
        def run(stack: Any, pipeline: Any) -> None:
            for b in range(n // batch):
                prepared = [
                    (Envelope(b"{}", f"m{b}-{i}", "T", SERVICE, 0, {}), "q") for i in range(batch)
                ]
                stack.publish_prepared("", prepared, lambda ps: [e.message_id for e, _ in ps])

        return run

    jobs = {
        "Client consume": (consume, "sync"),
        "AsyncClient consume": (consume_async, "async"),
        "a lone publish": (publish(1), "sync"),
        "publish_many (100)": (publish(100), "sync"),
    }
    logger = logging.getLogger("mqkit")
    with _logging(True):
        out: dict[str, dict[str, float]] = {}
        for job, (run, runtime) in jobs.items():
            logger.setLevel(logging.WARNING)
            off = per_message(run, "off", runtime)
            logger.setLevel(logging.INFO)
            out[job] = {
                variant: round(per_message(run, variant, runtime) - off, 1)
                for variant in ("metrics", "sampled", "traced")
            }
            out[job]["off (all of it)"] = round(off, 1)
    return out


if __name__ == "__main__":
    for job, costs in in_process().items():
        print(f"{job:22s}", "  ".join(f"{k}: {v}" for k, v in costs.items()))
