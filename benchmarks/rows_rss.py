"""Memory over many messages: does an mqkit publisher or consumer grow as messages go by?

For each runtime (``Client``, ``AsyncClient``) a fresh queue gets an mqkit consumer in one
spawned process and an mqkit publisher in another, both started together (so the queue never
holds more than the consumer lags behind). The publisher sends ``--rss-messages`` messages
with ``publish_many`` in chunks of ``_CHUNK`` (one confirmed publish at a time would take
minutes for 100,000); the consumer (``concurrency=1``, no-op handler) takes them all. Each
process reads its own resident set size (``/proc/self/statm``) once it has handled
``--rss-first`` messages and again after the last one: the row is the growth between the two,
and its target is at most ``RSS_LIMIT_KIB``. The warm-up (first ``--rss-first`` messages)
is where imports, connection buffers and caches settle; what grows after it grows with the
number of messages. Fresh processes, so no other row's memory is in the numbers.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
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
    maybe_await,
    rss_kib,
    set_error,
)

RSS_LIMIT_KIB = 5 * 1024  # 5 MiB of growth from the first mark to the last
_CHUNK = 1000
RUNTIMES = (("client", "mqkit Client"), ("async", "mqkit AsyncClient"))


class Marks:
    """The RSS at the ``first``-th message and at the ``total``-th, and the time between."""

    def __init__(self, first: int, total: int) -> None:
        self.first = min(first, total)
        self.total = total
        self.count = 0
        self.kib: dict[str, int] = {}
        self.t0 = 0.0
        self.t1 = 0.0
        self.done = threading.Event()

    def passed(self, count: int) -> None:
        """``count`` messages are done (called from one thread only)."""
        self.count = count
        if "first" not in self.kib and count >= self.first:
            self.kib["first"] = rss_kib()
            self.t0 = time.perf_counter()
        if count >= self.total and not self.done.is_set():
            self.kib["last"] = rss_kib()
            self.t1 = time.perf_counter()
            self.done.set()

    def tick(self) -> None:
        self.passed(self.count + 1)

    def report(self) -> dict[str, Any]:
        if not self.done.is_set():
            return {"error": f"only {self.count} of {self.total} messages in time"}
        return {
            "first_kib": self.kib["first"],
            "last_kib": self.kib["last"],
            "messages": self.total - self.first,
            "seconds": self.t1 - self.t0,
        }


def _guarded(work: Any) -> dict[str, Any]:
    """``work()``'s figures, or the error as text (an mqkit error may not pickle)."""
    try:
        result: dict[str, Any] = work()
        return result
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


# --------------------------------------------------------------------------- child processes


def client_publisher(url: str, q: str, total: int, first: int) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        marks = Marks(first, total)
        with Client(url=url, service=SERVICE, queue_type=QUEUE_TYPE) as client:
            producer = client.producer(BenchMessage, queue=q)
            sent = 0
            while sent < total:
                chunk = make_messages(min(_CHUNK, total - sent))
                producer.publish_many(chunk)
                sent += len(chunk)
                marks.passed(sent)
        return marks.report()

    return _guarded(work)


def client_consumer(url: str, q: str, total: int, first: int, prefetch: int) -> dict[str, Any]:
    def work() -> dict[str, Any]:
        marks = Marks(first, total)
        with Client(url=url, service=SERVICE, queue_type=QUEUE_TYPE) as client:

            def handler(message: BenchMessage, ctx: Any) -> None:
                marks.tick()

            consumer = client.consumer(q, BenchMessage, handler, prefetch=prefetch, concurrency=1)
            consumer.start()
            marks.done.wait(_deadline(total))
            consumer.stop()
        return marks.report()

    return _guarded(work)


def async_publisher(url: str, q: str, total: int, first: int) -> dict[str, Any]:
    async def work() -> dict[str, Any]:
        marks = Marks(first, total)
        async with AsyncClient(url=url, service=SERVICE, queue_type=QUEUE_TYPE) as client:
            producer = await maybe_await(client.producer(BenchMessage, queue=q))
            sent = 0
            while sent < total:
                chunk = make_messages(min(_CHUNK, total - sent))
                await producer.publish_many(chunk)
                sent += len(chunk)
                marks.passed(sent)
        return marks.report()

    return _guarded(lambda: asyncio.run(work()))


def async_consumer(url: str, q: str, total: int, first: int, prefetch: int) -> dict[str, Any]:
    async def work() -> dict[str, Any]:
        marks = Marks(first, total)
        async with AsyncClient(url=url, service=SERVICE, queue_type=QUEUE_TYPE) as client:

            async def handler(message: BenchMessage, ctx: Any) -> None:
                marks.tick()

            consumer = await maybe_await(
                client.consumer(q, BenchMessage, handler, prefetch=prefetch, concurrency=1)
            )
            await consumer.start()
            await asyncio.to_thread(marks.done.wait, _deadline(total))
            await consumer.stop()
        return marks.report()

    return _guarded(lambda: asyncio.run(work()))


def _deadline(total: int) -> float:
    return 60 + total / 250  # s: far beyond what any client needs; only a hang hits it


# --------------------------------------------------------------------------- the section


def rss_section(cfg: Config, queues: Queues) -> list[Result]:
    """Publisher and consumer rows for each runtime."""
    results: list[Result] = []
    total, first = cfg.rss_messages, min(cfg.rss_first, cfg.rss_messages)
    for runtime, name in RUNTIMES:
        publisher = Result("rss", f"{runtime}_publisher", f"{name} publisher (publish_many)")
        consumer = Result("rss", f"{runtime}_consumer", f"{name} consumer (concurrency=1)")
        pair = (publisher, consumer)
        for row in pair:
            row.extra.update(first=first, total=total, limit_kib=RSS_LIMIT_KIB)
        if (Client if runtime == "client" else AsyncClient) is None:
            for row in pair:
                row.error = f"{name} is not importable"
            results += pair
            continue
        publish, consume = (
            (client_publisher, client_consumer)
            if runtime == "client"
            else (async_publisher, async_consumer)
        )
        context = multiprocessing.get_context("spawn")
        try:
            with (
                queues.fresh_queue(f"rss-{runtime}") as q,
                context.Pool(2, maxtasksperchild=1) as pool,  # exit terminates them
            ):
                consuming = pool.apply_async(consume, (cfg.url, q, total, first, cfg.prefetch))
                publishing = pool.apply_async(publish, (cfg.url, q, total, first))
                timeout = _deadline(total) + 60
                _fill(publisher, publishing.get(timeout=timeout))
                _fill(consumer, consuming.get(timeout=timeout))
        except Exception as exc:
            for row in pair:
                if row.error is None and "growth_kib" not in row.extra:
                    set_error(row, exc)
        results += pair
    return results


def _fill(row: Result, figures: dict[str, Any]) -> None:
    if "error" in figures:
        row.error = figures["error"]
        return
    row.messages = figures["messages"]
    row.seconds = figures["seconds"]
    row.extra.update(
        rss_first_kib=figures["first_kib"],
        rss_last_kib=figures["last_kib"],
        growth_kib=figures["last_kib"] - figures["first_kib"],
    )
