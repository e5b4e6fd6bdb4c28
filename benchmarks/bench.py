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
import contextlib
import importlib
import inspect
import json
import os
import signal
import statistics
import sys
import threading
import time
import timeit
import tracemalloc
import types
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pika
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _import_core() -> str | None:
    """Import mqkit; if its clients are not importable yet, load the pure core without the
    package ``__init__`` (so the raw and codec rows still run). Returns why, or None."""
    try:
        importlib.import_module("mqkit")
        return None
    except Exception as exc:  # a shell that does not import yet: run what can run
        stub = types.ModuleType("mqkit")
        stub.__path__ = [str(ROOT / "mqkit")]
        sys.modules["mqkit"] = stub
        return f"{type(exc).__name__}: {exc}"


IMPORT_PROBLEM = _import_core()

from mqkit.messages import decode, encode  # noqa: E402
from mqkit.retry import DEFAULT_POLICY  # noqa: E402
from mqkit.topology import Queue, consumer_topology, queue_arguments  # noqa: E402


def _optional(module: str, name: str) -> tuple[Any, str | None]:
    try:
        return getattr(importlib.import_module(module), name), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


Client, SYNC_MISSING = _optional("mqkit._sync.client", "Client")
AsyncClient, ASYNC_MISSING = _optional("mqkit._async.client", "AsyncClient")

SERVICE = "mqkit-bench"
QUEUE_TYPE = "quorum"
DELIVERY_LIMIT = 20  # Settings' default: the raw declare must match what mqkit declares


class BenchMessage(BaseModel):
    """The message every row sends: small, a few typed fields."""

    order_id: str
    customer: str
    amount_cents: int
    currency: str
    items: list[str]
    note: str


def make_messages(n: int) -> list[BenchMessage]:
    """``n`` distinct messages, all serialising to the same number of bytes."""
    return [
        BenchMessage(
            order_id=f"order-{i:09d}",
            customer="customer-000042",
            amount_cents=123_456,
            currency="EUR",
            items=["sku-0001", "sku-0002", "sku-0003"],
            note="benchmark message: a small typed order",
        )
        for i in range(n)
    ]


def _body(message: BenchMessage) -> bytes:
    return message.__pydantic_serializer__.to_json(message)


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    """One measured row."""

    section: str
    key: str
    label: str
    messages: int = 0
    seconds: float = 0.0
    error: str | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        if self.error or self.messages <= 0 or self.seconds <= 0:
            return None
        return self.messages / self.seconds


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


# --------------------------------------------------------------------------- queues


class Queues:
    """Fresh, identically shaped queues for each measurement; all deleted at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.run_id = uuid.uuid4().hex[:8]
        self.declared: list[str] = []
        # Never pruned: the final clean-up deletes these again, in case a client re-declared
        # a queue (topology replay after a channel was replaced) after its row deleted it.
        self.ever: list[str] = []
        self._n = 0

    def _topology(self, name: str) -> list[Queue]:
        return consumer_topology(
            Queue(name), DEFAULT_POLICY, default_type=QUEUE_TYPE, delivery_limit=DELIVERY_LIMIT
        )

    def fresh(self, slug: str) -> str:
        """Declare a new work queue (with its DLQ and retry queues, as an mqkit consumer
        declares them) and return its name."""
        self._n += 1
        name = f"mqkit-bench-{self.run_id}-{self._n:02d}-{slug}"
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            channel = connection.channel()
            for queue in self._topology(name):
                self.declared.append(queue.name)
                self.ever.append(queue.name)
                channel.queue_declare(
                    queue.name,
                    durable=queue.durable,
                    exclusive=queue.exclusive,
                    auto_delete=queue.auto_delete,
                    arguments=queue_arguments(queue, QUEUE_TYPE),
                )
        finally:
            connection.close()
        return name

    def delete(self, name: str | None = None) -> None:
        """Delete one work queue and its companions, or (``None``) everything ever declared."""
        doomed = list(self.ever) if name is None else [q.name for q in self._topology(name)]
        if not doomed:
            return
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.url))
        except pika.exceptions.AMQPError as exc:
            print(f"warning: could not delete benchmark queues {doomed}: {exc}", file=sys.stderr)
            return
        try:
            for queue in doomed:
                channel = connection.channel()
                channel.queue_delete(queue)
                channel.close()
                if queue in self.declared:
                    self.declared.remove(queue)
        finally:
            connection.close()

    def preload(self, name: str, messages: list[BenchMessage]) -> None:
        """Fill ``name`` for a consume measurement (not timed), then wait until all are in."""
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            channel = connection.channel()
            # No confirms (fast); waiting for the queue's count below is what makes it sure.
            for message in messages:
                channel.basic_publish("", name, _body(message), _pika_properties(message))
            deadline = time.monotonic() + 30
            count = 0
            while time.monotonic() < deadline:
                count = channel.queue_declare(name, passive=True).method.message_count
                if count >= len(messages):
                    return
                time.sleep(0.05)
            raise RuntimeError(f"preload of {name!r}: {count} of {len(messages)} messages arrived")
        finally:
            connection.close()


def _pika_properties(message: BenchMessage) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type="application/json",
        delivery_mode=2,
        message_id=uuid.uuid4().hex,
        timestamp=int(time.time()),
        type=type(message).__name__,
        app_id=SERVICE,
    )


def _aio_message(message: BenchMessage) -> aio_pika.Message:
    return aio_pika.Message(
        _body(message),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=uuid.uuid4().hex,
        timestamp=int(time.time()),
        type=type(message).__name__,
        app_id=SERVICE,
    )


# --------------------------------------------------------------------------- measuring


class Stamps:
    """Counts handled messages; the clock runs from the ``warmup``-th to the last one."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup = warmup
        self.total = total
        self.count = 0
        self.t0: float | None = None
        self.t1: float | None = None
        self.done = threading.Event()
        self.rss_kib = 0
        self.traced_kib: int | None = None
        self._lock = threading.Lock()

    def tick(self) -> None:
        with self._lock:
            self.count += 1
            if self.count == self.warmup:
                self.t0 = time.perf_counter()
            if self.count == self.total:
                self.t1 = time.perf_counter()
                self.done.set()

    def result(self, result: Result) -> Result:
        """Fill ``result`` with what was timed (partial if the deadline came first)."""
        if self.t0 is None:
            result.error = f"only {self.count} messages arrived (warm-up is {self.warmup})"
            return result
        end = self.t1 if self.t1 is not None else time.perf_counter()
        result.messages = min(self.count, self.total) - self.warmup
        result.seconds = end - self.t0
        if self.t1 is None:
            result.note = "stopped at the deadline"
        return result


class RssSampler:
    """Peak resident set size growth while it runs (reads /proc/self/statm every 10 ms)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * self.page
        except OSError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth_kib(self) -> int:
        return (self.peak - self.start) // 1024


@contextlib.contextmanager
def traced(enabled: bool) -> Iterator[dict[str, int]]:
    """tracemalloc's peak (KiB) over the block, if ``enabled``. Only for the separate memory
    passes: tracing slows Python down, so it never runs during a timed measurement."""
    out: dict[str, int] = {}
    if not enabled:
        yield out
        return
    tracemalloc.start()
    try:
        yield out
    finally:
        out["peak_kib"] = tracemalloc.get_traced_memory()[1] // 1024
        tracemalloc.stop()


@dataclass
class Config:
    """The command line."""

    url: str
    messages: int
    warmup: int
    prefetch: int
    window: int
    phase_seconds: float
    memory: bool
    memory_messages: int


def _error(result: Result, exc: BaseException) -> Result:
    from mqkit.settings import mask_url

    result.error = mask_url(f"{type(exc).__name__}: {exc}")[:300]
    return result


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# --------------------------------------------------------------------------- async rows


async def _publish_loop(
    publish: Callable[[BenchMessage], Awaitable[Any]], messages: list[BenchMessage], deadline: float
) -> int:
    done = 0
    for message in messages:
        await publish(message)
        done += 1
        if time.perf_counter() > deadline:
            break
    return done


async def _timed_async(
    result: Result,
    cfg: Config,
    run: Callable[[list[BenchMessage], float], Awaitable[int]],
) -> Result:
    """Warm up with ``run``, then time it over ``cfg.messages`` messages."""
    try:
        await run(make_messages(cfg.warmup), time.perf_counter() + cfg.phase_seconds)
        messages = make_messages(cfg.messages)
        start = time.perf_counter()
        done = await run(messages, start + cfg.phase_seconds)
        result.seconds = time.perf_counter() - start
        result.messages = done
        if done < len(messages):
            result.note = "stopped at the deadline"
    except Exception as exc:
        _error(result, exc)
    return result


async def async_section(cfg: Config, queues: Queues) -> list[Result]:
    """aio-pika raw rows, then AsyncClient rows."""
    results: list[Result] = []
    connection = await aio_pika.connect(cfg.url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = channel.default_exchange

        q = queues.fresh("async-raw-each")

        async def raw_each(messages: list[BenchMessage], deadline: float) -> int:
            async def one(m: BenchMessage) -> Any:
                return await exchange.publish(_aio_message(m), routing_key=q, mandatory=True)

            return await _publish_loop(one, messages, deadline)

        results.append(
            await _timed_async(
                Result("async", "raw_publish_each", "raw aio-pika publish, await each confirm"),
                cfg,
                raw_each,
            )
        )
        queues.delete(q)

        q2 = queues.fresh("async-raw-windowed")

        async def raw_windowed(messages: list[BenchMessage], deadline: float) -> int:
            done = 0
            for start in range(0, len(messages), cfg.window):
                chunk = messages[start : start + cfg.window]
                await asyncio.gather(
                    *(
                        exchange.publish(_aio_message(m), routing_key=q2, mandatory=True)
                        for m in chunk
                    )
                )
                done += len(chunk)
                if time.perf_counter() > deadline:
                    break
            return done

        results.append(
            await _timed_async(
                Result(
                    "async",
                    "raw_publish_windowed",
                    f"raw aio-pika publish, gather windows of {cfg.window}",
                ),
                cfg,
                raw_windowed,
            )
        )
        queues.delete(q2)

        results.append(await _async_raw_consume(cfg, queues, connection))
    finally:
        await connection.close()

    labels = (
        ("mqkit_publish", "mqkit AsyncProducer.publish (each)"),
        ("mqkit_publish_many", "mqkit AsyncProducer.publish_many"),
        ("mqkit_consume", "mqkit AsyncConsumer (concurrency=1)"),
    )
    if AsyncClient is None:
        results += [
            Result("async", key, label, error="not importable (see below)") for key, label in labels
        ]
        return results

    client = AsyncClient(url=cfg.url, service=SERVICE, queue_type=QUEUE_TYPE, prefetch=cfg.prefetch)
    try:
        await client.__aenter__()
    except Exception as exc:
        results += [_error(Result("async", key, label), exc) for key, label in labels]
        return results
    try:
        q3 = queues.fresh("async-mqkit-each")
        row = Result("async", *labels[0])
        try:
            producer = await _maybe_await(client.producer(BenchMessage, queue=q3))

            async def mqkit_each(messages: list[BenchMessage], deadline: float) -> int:
                return await _publish_loop(producer.publish, messages, deadline)

            results.append(await _timed_async(row, cfg, mqkit_each))
        except Exception as exc:
            results.append(_error(row, exc))
        queues.delete(q3)

        q4 = queues.fresh("async-mqkit-many")
        row = Result("async", *labels[1])
        try:
            producer = await _maybe_await(client.producer(BenchMessage, queue=q4))

            async def mqkit_many(messages: list[BenchMessage], deadline: float) -> int:
                return len(await producer.publish_many(messages))

            results.append(await _timed_async(row, cfg, mqkit_many))
        except Exception as exc:
            results.append(_error(row, exc))
        queues.delete(q4)

        results.append(await _async_mqkit_consume(cfg, queues, client))
    finally:
        await client.__aexit__(None, None, None)
    return results


async def _async_raw_consume(
    cfg: Config, queues: Queues, connection: aio_pika.abc.AbstractConnection
) -> Result:
    result = Result(
        "async", "raw_consume", f"raw aio-pika consume, ack each (prefetch {cfg.prefetch})"
    )

    async def once(total_messages: int, warmup: int, trace: bool = False) -> Stamps:
        q = queues.fresh("async-raw-consume")
        try:
            await asyncio.to_thread(queues.preload, q, make_messages(total_messages))
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=cfg.prefetch)
            queue = await channel.get_queue(q, ensure=True)
            stamps = Stamps(warmup, total_messages)

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                BenchMessage.model_validate_json(message.body)
                stamps.tick()  # as for mqkit: counted when handled, before the ack
                await message.ack()

            with RssSampler() as rss, traced(trace) as mem:
                tag = await queue.consume(on_message)
                await asyncio.to_thread(stamps.done.wait, cfg.phase_seconds + 5)
                await queue.cancel(tag)
            await channel.close()
            stamps.rss_kib, stamps.traced_kib = rss.growth_kib, mem.get("peak_kib")
            return stamps
        finally:
            queues.delete(q)

    try:
        stamps = await once(cfg.warmup + cfg.messages, cfg.warmup)
        stamps.result(result)
        result.extra["rss_growth_kib"] = stamps.rss_kib
        if cfg.memory:
            memory_pass = await once(cfg.memory_messages, 1, trace=True)
            result.extra["tracemalloc_peak_kib"] = memory_pass.traced_kib
    except Exception as exc:
        _error(result, exc)
    return result


async def _async_mqkit_consume(cfg: Config, queues: Queues, client: Any) -> Result:
    result = Result("async", "mqkit_consume", "mqkit AsyncConsumer (concurrency=1)")

    async def once(total_messages: int, warmup: int, trace: bool = False) -> Stamps:
        q = queues.fresh("async-mqkit-consume")
        try:
            await asyncio.to_thread(queues.preload, q, make_messages(total_messages))
            stamps = Stamps(warmup, total_messages)

            async def handler(message: BenchMessage, ctx: Any) -> None:
                stamps.tick()

            consumer = await _maybe_await(
                client.consumer(q, BenchMessage, handler, prefetch=cfg.prefetch, concurrency=1)
            )
            with RssSampler() as rss, traced(trace) as mem:
                await consumer.start()
                await asyncio.to_thread(stamps.done.wait, cfg.phase_seconds + 5)
                await consumer.stop()
            stamps.rss_kib, stamps.traced_kib = rss.growth_kib, mem.get("peak_kib")
            return stamps
        finally:
            queues.delete(q)

    try:
        stamps = await once(cfg.warmup + cfg.messages, cfg.warmup)
        stamps.result(result)
        result.extra["rss_growth_kib"] = stamps.rss_kib
        if cfg.memory:
            memory_pass = await once(cfg.memory_messages, 1, trace=True)
            result.extra["tracemalloc_peak_kib"] = memory_pass.traced_kib
    except Exception as exc:
        _error(result, exc)
    return result


# --------------------------------------------------------------------------- sync rows


def _timed_sync(
    result: Result, cfg: Config, run: Callable[[list[BenchMessage], float], int]
) -> Result:
    """Warm up with ``run``, then time it over ``cfg.messages`` messages."""
    try:
        run(make_messages(cfg.warmup), time.perf_counter() + cfg.phase_seconds)
        messages = make_messages(cfg.messages)
        start = time.perf_counter()
        done = run(messages, start + cfg.phase_seconds)
        result.seconds = time.perf_counter() - start
        result.messages = done
        if done < len(messages):
            result.note = "stopped at the deadline"
    except Exception as exc:
        _error(result, exc)
    return result


def _sync_publish_loop(
    publish: Callable[[BenchMessage], Any], messages: list[BenchMessage], deadline: float
) -> int:
    done = 0
    for message in messages:
        publish(message)
        done += 1
        if time.perf_counter() > deadline:
            break
    return done


def sync_section(cfg: Config, queues: Queues) -> list[Result]:
    """pika raw rows, then Client rows."""
    results: list[Result] = []

    q = queues.fresh("sync-raw-each")
    connection = pika.BlockingConnection(pika.URLParameters(cfg.url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()

        def raw_each(messages: list[BenchMessage], deadline: float) -> int:
            def one(m: BenchMessage) -> None:
                channel.basic_publish("", q, _body(m), _pika_properties(m), mandatory=True)

            return _sync_publish_loop(one, messages, deadline)

        results.append(
            _timed_sync(
                Result("sync", "raw_publish_each", "raw pika BlockingConnection, confirm each"),
                cfg,
                raw_each,
            )
        )
    finally:
        connection.close()
        queues.delete(q)

    results.append(_sync_raw_select(cfg, queues))
    results.append(_sync_raw_consume(cfg, queues))

    labels = (
        ("mqkit_publish", "mqkit Producer.publish (each)"),
        ("mqkit_publish_many", "mqkit Producer.publish_many"),
        ("mqkit_consume", "mqkit Consumer (concurrency=1)"),
    )
    if Client is None:
        results += [
            Result("sync", key, label, error="not importable (see below)") for key, label in labels
        ]
        return results
    client = Client(url=cfg.url, service=SERVICE, queue_type=QUEUE_TYPE, prefetch=cfg.prefetch)
    try:
        client.__enter__()
    except Exception as exc:
        results += [_error(Result("sync", key, label), exc) for key, label in labels]
        return results
    try:
        q3 = queues.fresh("sync-mqkit-each")
        row = Result("sync", *labels[0])
        try:
            producer = client.producer(BenchMessage, queue=q3)
            results.append(
                _timed_sync(row, cfg, lambda ms, dl: _sync_publish_loop(producer.publish, ms, dl))
            )
        except Exception as exc:
            results.append(_error(row, exc))
        queues.delete(q3)

        q4 = queues.fresh("sync-mqkit-many")
        row = Result("sync", *labels[1])
        try:
            producer_many = client.producer(BenchMessage, queue=q4)
            results.append(
                _timed_sync(row, cfg, lambda ms, dl: len(producer_many.publish_many(ms)))
            )
        except Exception as exc:
            results.append(_error(row, exc))
        queues.delete(q4)

        results.append(_sync_mqkit_consume(cfg, queues, client))
    finally:
        client.__exit__(None, None, None)
    return results


def _sync_raw_select(cfg: Config, queues: Queues) -> Result:
    """Reference: pika's SelectConnection keeping ``window`` confirms in flight."""
    result = Result(
        "sync",
        "raw_publish_select",
        f"raw pika SelectConnection, {cfg.window} confirms in flight (reference)",
    )
    q = queues.fresh("sync-raw-select")
    messages = make_messages(cfg.warmup + cfg.messages)
    state: dict[str, Any] = {"sent": 0, "confirmed": 0, "t0": None, "t1": None, "error": None}
    outstanding: set[int] = set()
    channel_box: list[Any] = []
    deadline = time.perf_counter() + 2 * cfg.phase_seconds

    def finish(connection: Any) -> None:
        if connection.is_open:
            connection.close()

    def pump() -> None:
        channel = channel_box[0]
        stop_sending = state["t0"] is not None and time.perf_counter() > deadline
        while not stop_sending and state["sent"] < len(messages) and len(outstanding) < cfg.window:
            message = messages[state["sent"]]
            channel.basic_publish("", q, _body(message), _pika_properties(message), mandatory=True)
            state["sent"] += 1
            outstanding.add(state["sent"])
        if not outstanding and (state["sent"] >= len(messages) or stop_sending):
            finish(channel.connection)

    def on_confirm(frame: Any) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            state["error"] = "nacked"
        tag = method.delivery_tag
        acked = {t for t in outstanding if t <= tag} if method.multiple else {tag} & outstanding
        outstanding.difference_update(acked)
        state["confirmed"] += len(acked)
        if state["t0"] is None and state["confirmed"] >= cfg.warmup:
            state["t0"] = time.perf_counter()
            state["c0"] = state["confirmed"]
        state["t1"] = time.perf_counter()
        pump()

    def on_return(channel: Any, method: Any, properties: Any, body: bytes) -> None:
        state["error"] = f"returned: {method.reply_text}"

    def on_channel(channel: Any) -> None:
        channel_box.append(channel)
        channel.add_on_return_callback(on_return)
        channel.confirm_delivery(on_confirm, callback=lambda _frame: pump())

    def on_open(connection: Any) -> None:
        connection.channel(on_open_callback=on_channel)

    def on_open_error(connection: Any, exc: BaseException) -> None:
        state["error"] = f"cannot connect: {exc}"
        connection.ioloop.stop()

    def on_close(connection: Any, reason: BaseException) -> None:
        connection.ioloop.stop()

    try:
        connection = pika.SelectConnection(
            pika.URLParameters(cfg.url),
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=on_close,
        )
        connection.ioloop.call_later(4 * cfg.phase_seconds + 10, lambda: finish(connection))
        connection.ioloop.start()
        if state["error"]:
            result.error = state["error"]
        elif state["t0"] is None:
            result.error = "the warm-up did not finish"
        else:
            result.messages = state["confirmed"] - state["c0"]
            result.seconds = state["t1"] - state["t0"]
            if state["confirmed"] < len(messages):
                result.note = "stopped at the deadline"
    except Exception as exc:
        _error(result, exc)
    finally:
        queues.delete(q)
    return result


def _sync_raw_consume(cfg: Config, queues: Queues) -> Result:
    result = Result(
        "sync",
        "raw_consume",
        f"raw pika BlockingConnection consume, ack each (prefetch {cfg.prefetch})",
    )

    def once(total_messages: int, warmup: int, trace: bool = False) -> Stamps:
        q = queues.fresh("sync-raw-consume")
        try:
            queues.preload(q, make_messages(total_messages))
            connection = pika.BlockingConnection(pika.URLParameters(cfg.url))
            try:
                channel = connection.channel()
                channel.basic_qos(prefetch_count=cfg.prefetch)
                stamps = Stamps(warmup, total_messages)

                def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
                    BenchMessage.model_validate_json(body)
                    stamps.tick()  # as for mqkit: counted when handled, before the ack
                    ch.basic_ack(method.delivery_tag)
                    if stamps.done.is_set():
                        ch.stop_consuming()

                with RssSampler() as rss, traced(trace) as mem:
                    channel.basic_consume(q, on_message)
                    connection.call_later(cfg.phase_seconds + 5, channel.stop_consuming)
                    channel.start_consuming()
                stamps.rss_kib, stamps.traced_kib = rss.growth_kib, mem.get("peak_kib")
                return stamps
            finally:
                if connection.is_open:
                    connection.close()
        finally:
            queues.delete(q)

    try:
        stamps = once(cfg.warmup + cfg.messages, cfg.warmup)
        stamps.result(result)
        result.extra["rss_growth_kib"] = stamps.rss_kib
        if cfg.memory:
            result.extra["tracemalloc_peak_kib"] = once(cfg.memory_messages, 1, True).traced_kib
    except Exception as exc:
        _error(result, exc)
    return result


def _sync_mqkit_consume(cfg: Config, queues: Queues, client: Any) -> Result:
    result = Result("sync", "mqkit_consume", "mqkit Consumer (concurrency=1)")

    def once(total_messages: int, warmup: int, trace: bool = False) -> Stamps:
        q = queues.fresh("sync-mqkit-consume")
        try:
            queues.preload(q, make_messages(total_messages))
            stamps = Stamps(warmup, total_messages)

            def handler(message: BenchMessage, ctx: Any) -> None:
                stamps.tick()

            consumer = client.consumer(
                q, BenchMessage, handler, prefetch=cfg.prefetch, concurrency=1
            )
            with RssSampler() as rss, traced(trace) as mem:
                consumer.start()
                stamps.done.wait(cfg.phase_seconds + 5)
                consumer.stop()
            stamps.rss_kib, stamps.traced_kib = rss.growth_kib, mem.get("peak_kib")
            return stamps
        finally:
            queues.delete(q)

    try:
        stamps = once(cfg.warmup + cfg.messages, cfg.warmup)
        stamps.result(result)
        result.extra["rss_growth_kib"] = stamps.rss_kib
        if cfg.memory:
            result.extra["tracemalloc_peak_kib"] = once(cfg.memory_messages, 1, True).traced_kib
    except Exception as exc:
        _error(result, exc)
    return result


# --------------------------------------------------------------------------- codec


def codec_section() -> Result:
    """mqkit.messages.encode + decode of one small model, in µs per message (best of 7)."""
    result = Result("codec", "encode_decode", "mqkit encode + decode (µs per message)")
    message = make_messages(1)[0]

    def once() -> None:
        envelope = encode(message, service=SERVICE)
        decode(envelope.body, BenchMessage)

    number = 2000
    for _ in range(200):
        once()  # warm-up
    runs = timeit.repeat(once, repeat=7, number=number)
    result.messages = number
    result.seconds = min(runs)
    result.extra["us_best"] = min(runs) / number * 1e6
    result.extra["us_median"] = statistics.median(runs) / number * 1e6
    result.extra["body_bytes"] = len(_body(message))
    return result


# --------------------------------------------------------------------------- report


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


# --------------------------------------------------------------------------- main


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
        "pika": pika.__version__,
        "aio_pika": aio_pika.__version__,
        "mqkit_import_problem": IMPORT_PROBLEM,
        "client_missing": SYNC_MISSING,
        "async_client_missing": ASYNC_MISSING,
    }
    env["rounds"] = args.rounds
    results = median_of(rounds)
    verdicts = evaluate(results, rounds)
    if args.json:
        payload = {
            "environment": env,
            "results": [{**asdict(r), "rate": r.rate} for r in results],
            "targets": verdicts,
        }
        print(json.dumps(payload, indent=2))
    else:
        print_table(results, verdicts, env)
    if args.strict and any(v["status"] != "PASS" for v in verdicts):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
