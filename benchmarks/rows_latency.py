"""Publish→handler latency at fixed offered loads, for every consuming runtime.

For each load (``--loads``, msg/s) and each runtime (mqkit ``Client``, mqkit ``AsyncClient``,
raw pika, raw aio-pika, FastStream), a fresh queue gets a consumer of that runtime in this
process, and a **paced publisher in a process of its own** (``multiprocessing``, spawned)
sends ``load`` messages a second to it. The publisher is the same for every runtime: raw
aio-pika on a confirming channel, each message persistent and ``mandatory``, sent on a fixed
schedule (it never waits for a confirm before sending the next message, so the broker's
confirm latency cannot slow the offered load; at most ``_IN_FLIGHT`` confirms are pending).
Each message carries ``time.time()`` taken just before it was handed to the client; the
handler subtracts it from ``time.time()`` when it runs (same machine, same clock). The
first ``--latency-warmup`` seconds of messages are not counted.

A row reports p50 / p95 / p99 / max of what it counted, the rate the publisher actually
achieved and how far it fell behind its schedule at worst (a publisher that could not keep up
offered less than the nominal load: the row says so). A row whose consumer did not handle
every message before the deadline fails.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.pool import AsyncResult, Pool
from typing import Any

import aio_pika
import pika
from common import (
    QUEUE_TYPE,
    SERVICE,
    AsyncClient,
    BenchMessage,
    Client,
    Config,
    Queues,
    Result,
    aio_message,
    maybe_await,
    percentile,
    runtime_missing,
    set_error,
)

RUNTIMES = (
    ("client", "mqkit Client consumer (concurrency=1)"),
    ("async_client", "mqkit AsyncClient consumer (concurrency=1)"),
    ("raw_pika", "raw pika BlockingConnection consumer, ack each"),
    ("raw_aio_pika", "raw aio-pika consumer, ack each"),
    ("faststream", "FastStream subscriber"),
)
RAW_RUNTIMES = ("raw_pika", "raw_aio_pika")
_IN_FLIGHT = 2000  # unconfirmed publishes the paced publisher allows before it waits
_SLACK = 15.0  # s after the schedule's end that a consumer may still take


def row_key(runtime: str, load: int) -> str:
    """The row's key in the ``latency`` section, e.g. ``client_1500``."""
    return f"{runtime}_{load}"


# --------------------------------------------------------------------------- the publisher


def paced_publisher(url: str, queue: str, rate: int, total: int) -> dict[str, float]:
    """Send ``total`` messages to ``queue`` at ``rate`` msg/s (runs in its own process)."""
    return asyncio.run(_paced(url, queue, rate, total))


async def _paced(url: str, queue: str, rate: int, total: int) -> dict[str, float]:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = channel.default_exchange
        pending: set[asyncio.Task[Any]] = set()
        failures: list[BaseException] = []

        def settled(task: asyncio.Task[Any]) -> None:
            pending.discard(task)
            if not task.cancelled() and task.exception() is not None:
                failures.append(task.exception())  # type: ignore[arg-type]  # not None here

        lag = 0.0
        start = time.time() + 0.05
        for i in range(total):
            ahead = start + i / rate - time.time()
            if ahead > 0:
                await asyncio.sleep(ahead)
            else:
                lag = max(lag, -ahead)
            message = BenchMessage(
                order_id=f"order-{i:09d}",
                customer="customer-000042",
                amount_cents=123_456,
                currency="EUR",
                items=["sku-0001", "sku-0002", "sku-0003"],
                note=f"{time.time():.6f}",  # the publish time the handler subtracts
            )
            task = asyncio.ensure_future(
                exchange.publish(aio_message(message), routing_key=queue, mandatory=True)
            )
            pending.add(task)
            task.add_done_callback(settled)
            if failures:
                raise failures[0]
            if len(pending) >= _IN_FLIGHT:
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        sent = time.time()
        if pending:
            await asyncio.gather(*pending)
        if failures:
            raise failures[0]
        return {"sent": total, "seconds": sent - start, "lag_max_ms": lag * 1000}
    finally:
        await connection.close()


def _ready() -> int:
    return os.getpid()


# --------------------------------------------------------------------------- the consumers


class Latencies:
    """What the handler saw: one latency per counted message, and when all have arrived."""

    def __init__(self, total: int, warmup: int) -> None:
        self.total = total
        self.warmup = warmup
        self.count = 0
        self.samples: list[float] = []
        self.done = threading.Event()
        self._lock = threading.Lock()

    def record(self, message: BenchMessage) -> None:
        latency = time.time() - float(message.note)
        with self._lock:
            self.count += 1
            if int(message.order_id.rpartition("-")[2]) >= self.warmup:
                self.samples.append(latency)
            if self.count >= self.total:
                self.done.set()


Launch = Callable[[], "AsyncResult[dict[str, float]]"]
"""Starts the paced publisher; the future holds its figures."""


def _wait(latencies: Latencies, publisher: AsyncResult[dict[str, float]], seconds: float) -> None:
    """Until every message is handled, the publisher failed, or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while not latencies.done.wait(0.1):
        if publisher.ready() and not publisher.successful():
            return
        if time.monotonic() > deadline:
            return


def _client(
    cfg: Config, q: str, latencies: Latencies, launch: Launch, wait: float
) -> AsyncResult[Any]:
    with Client(
        url=cfg.url, service=SERVICE, queue_type=QUEUE_TYPE, prefetch=cfg.prefetch
    ) as client:

        def handler(message: BenchMessage, ctx: Any) -> None:
            latencies.record(message)

        consumer = client.consumer(q, BenchMessage, handler, prefetch=cfg.prefetch, concurrency=1)
        consumer.start()
        try:
            publisher = launch()
            _wait(latencies, publisher, wait)
        finally:
            consumer.stop()
    return publisher


def _raw_pika(
    cfg: Config, q: str, latencies: Latencies, launch: Launch, wait: float
) -> AsyncResult[Any]:
    connection = pika.BlockingConnection(pika.URLParameters(cfg.url))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=cfg.prefetch)

        def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            latencies.record(BenchMessage.model_validate_json(body))
            ch.basic_ack(method.delivery_tag)

        channel.basic_consume(q, on_message)
        publisher = launch()
        deadline = time.monotonic() + wait
        while not latencies.done.is_set() and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.05)  # type: ignore[arg-type]  # a float works
            if publisher.ready() and not publisher.successful():
                break
        return publisher
    finally:
        if connection.is_open:
            connection.close()


async def _async_client(
    cfg: Config, q: str, latencies: Latencies, launch: Launch, wait: float
) -> AsyncResult[Any]:
    async with AsyncClient(
        url=cfg.url, service=SERVICE, queue_type=QUEUE_TYPE, prefetch=cfg.prefetch
    ) as client:

        async def handler(message: BenchMessage, ctx: Any) -> None:
            latencies.record(message)

        consumer = await maybe_await(
            client.consumer(q, BenchMessage, handler, prefetch=cfg.prefetch, concurrency=1)
        )
        await consumer.start()
        try:
            publisher = launch()
            await asyncio.to_thread(_wait, latencies, publisher, wait)
        finally:
            await consumer.stop()
    return publisher


async def _raw_aio_pika(
    cfg: Config, q: str, latencies: Latencies, launch: Launch, wait: float
) -> AsyncResult[Any]:
    connection = await aio_pika.connect(cfg.url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=cfg.prefetch)
        queue = await channel.get_queue(q, ensure=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            latencies.record(BenchMessage.model_validate_json(message.body))
            await message.ack()

        tag = await queue.consume(on_message)
        publisher = launch()
        await asyncio.to_thread(_wait, latencies, publisher, wait)
        await queue.cancel(tag)
        return publisher
    finally:
        await connection.close()


async def _faststream(
    cfg: Config, q: str, latencies: Latencies, launch: Launch, wait: float
) -> AsyncResult[Any]:
    from faststream import AckPolicy
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    broker = RabbitBroker(cfg.url, logger=None, app_id=SERVICE)
    subscriber = broker.subscriber(
        RabbitQueue(q, declare=False),
        channel=Channel(prefetch_count=cfg.prefetch),
        ack_policy=AckPolicy.REJECT_ON_ERROR,
    )

    async def handler(message: BenchMessage) -> None:
        latencies.record(message)

    subscriber(handler)
    await broker.start()
    try:
        publisher = launch()
        await asyncio.to_thread(_wait, latencies, publisher, wait)
    finally:
        await broker.stop()
    return publisher


Runner = Callable[[Config, str, Latencies, Launch, float], "AsyncResult[Any]"]


def _runner(runtime: str) -> Runner:
    """The blocking function that runs ``runtime``'s consumer around one measurement."""
    if runtime == "client":
        return _client
    if runtime == "raw_pika":
        return _raw_pika
    coroutine = {
        "async_client": _async_client,
        "raw_aio_pika": _raw_aio_pika,
        "faststream": _faststream,
    }[runtime]

    def run(
        cfg: Config, q: str, latencies: Latencies, launch: Launch, wait: float
    ) -> AsyncResult[Any]:
        return asyncio.run(coroutine(cfg, q, latencies, launch, wait))

    return run


# --------------------------------------------------------------------------- the section


def latency_section(cfg: Config, queues: Queues) -> list[Result]:
    """Every runtime at every load, in that order (one publisher process for them all)."""
    results: list[Result] = []
    context = multiprocessing.get_context("spawn")  # never fork a process with IO threads
    # Leaving the block terminates the publisher process, also on an error or Ctrl-C.
    with context.Pool(1) as pool:
        pool.apply_async(_ready).get(timeout=120)  # spawn and import before any clock runs
        for load in cfg.latency_loads:
            for runtime, label in RUNTIMES:
                results.append(_measure(cfg, queues, pool, runtime, label, load))
    return results


def _measure(
    cfg: Config, queues: Queues, pool: Pool, runtime: str, label: str, load: int
) -> Result:
    row = Result("latency", row_key(runtime, load), f"{label} at {load:,} msg/s")
    row.extra["runtime"] = runtime
    row.extra["offered"] = load
    missing = runtime_missing(runtime)
    if missing is not None:
        row.error = missing
        return row
    warmup = round(load * cfg.latency_warmup_seconds)
    total = warmup + max(1, round(load * cfg.latency_seconds))
    wait = total / load + _SLACK
    latencies = Latencies(total, warmup)
    with queues.fresh_queue(f"lat-{runtime}-{load}") as q:

        def launch() -> AsyncResult[dict[str, float]]:
            return pool.apply_async(paced_publisher, (cfg.url, q, load, total))

        try:
            publisher = _runner(runtime)(cfg, q, latencies, launch, wait)
            sent = publisher.get(timeout=wait)
        except Exception as exc:
            return set_error(row, exc)
    ordered = sorted(latencies.samples)
    row.messages = latencies.count
    row.seconds = sent["seconds"]
    row.extra.update(
        expected=total,
        counted=len(ordered),
        published_rate=round(sent["sent"] / sent["seconds"], 1) if sent["seconds"] > 0 else None,
        publisher_lag_max_ms=round(sent["lag_max_ms"], 2),
    )
    if latencies.count < total:
        row.error = f"only {latencies.count} of {total} messages handled within {wait:.0f} s"
        return row
    if not ordered:
        row.error = "no message was counted (the run was all warm-up)"
        return row
    for name, q_ in (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("max", 100.0)):
        row.extra[f"{name}_ms"] = round(percentile(ordered, q_) * 1000, 3)
    if sent["lag_max_ms"] > 100:
        row.note = f"the publisher fell up to {sent['lag_max_ms']:.0f} ms behind its schedule"
    return row
