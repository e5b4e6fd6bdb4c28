"""What every benchmark row shares: the mqkit import, the message, the queues, the clocks.

Importing this module puts the repository root on ``sys.path`` and imports mqkit (or, if its
clients do not import yet, only its pure core), so the other benchmark modules take their
mqkit names from here rather than importing mqkit themselves.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import sys
import threading
import time
import tracemalloc
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aio_pika
import pika
from pika.exceptions import AMQPError
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

# Only after _import_core(): it decides whether "mqkit" is the package or a stub of its core.
from mqkit.messages import decode, encode  # noqa: E402
from mqkit.retry import DEFAULT_POLICY  # noqa: E402
from mqkit.topology import (  # noqa: E402
    Binding,
    Entity,
    Exchange,
    Queue,
    consumer_topology,
    dlq_name,
    queue_arguments,
)

__all__ = ["IMPORT_PROBLEM", "decode", "encode"]  # re-exported for the codec row and main


def _optional(module: str, name: str) -> tuple[Any, str | None]:
    try:
        return getattr(importlib.import_module(module), name), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


Client, SYNC_MISSING = _optional("mqkit._sync.client", "Client")
AsyncClient, ASYNC_MISSING = _optional("mqkit._async.client", "AsyncClient")


def faststream_missing() -> str | None:
    """Why FastStream cannot be used here, or None if it can (it is the ``bench`` extra)."""
    try:
        importlib.import_module("faststream.rabbit")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc} (install it: pip install -e '.[bench]')"
    return None


def runtime_missing(runtime: str) -> str | None:
    """Why a consumer of ``runtime`` (``client``, ``async_client``, ``raw_pika``,
    ``raw_aio_pika``, ``faststream``) cannot run here, or None if it can."""
    if runtime == "client" and Client is None:
        return f"mqkit Client is not importable: {SYNC_MISSING}"
    if runtime == "async_client" and AsyncClient is None:
        return f"mqkit AsyncClient is not importable: {ASYNC_MISSING}"
    if runtime == "faststream":
        return faststream_missing()
    return None


SERVICE = "mqkit-bench"
QUEUE_TYPE: Final = "quorum"
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


def message_body(message: BenchMessage) -> bytes:
    """The JSON body a raw row sends: what a user serialising the model by hand gets."""
    return message.__pydantic_serializer__.to_json(message)


def pika_properties(message: BenchMessage) -> pika.BasicProperties:
    """The AMQP properties a raw pika row sends (the ones mqkit sets)."""
    return pika.BasicProperties(
        content_type="application/json",
        delivery_mode=2,
        message_id=uuid.uuid4().hex,
        timestamp=int(time.time()),
        type=type(message).__name__,
        app_id=SERVICE,
    )


def aio_message(message: BenchMessage) -> aio_pika.Message:
    """The same message as an aio-pika row sends it (the properties mqkit sets)."""
    return aio_pika.Message(
        message_body(message),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=uuid.uuid4().hex,
        timestamp=int(time.time()),
        type=type(message).__name__,
        app_id=SERVICE,
    )


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


def set_error(result: Result, exc: BaseException) -> Result:
    """Record ``exc`` as why ``result`` failed (with any password in it masked)."""
    from mqkit.settings import mask_url

    result.error = mask_url(f"{type(exc).__name__}: {exc}")[:300]
    return result


def record_timed(result: Result, seconds: float, done: int, wanted: int) -> Result:
    """Fill ``result`` with a timed run that handled ``done`` of ``wanted`` messages."""
    result.seconds = seconds
    result.messages = done
    if done < wanted:
        result.note = "stopped at the deadline"
    return result


@dataclass
class Config:
    """The command line (``--quick`` scales the counts down; see bench.py)."""

    url: str
    messages: int
    warmup: int
    prefetch: int
    window: int
    phase_seconds: float
    memory: bool
    memory_messages: int
    quick: bool = False
    latency_loads: tuple[int, ...] = (500, 1500)
    latency_seconds: float = 10.0
    latency_warmup_seconds: float = 1.0
    rss_messages: int = 100_000
    rss_first: int = 10_000
    footprint_consumers: int = 100


# --------------------------------------------------------------------------- queues


def _declare(channel: Any, entity: Entity) -> None:
    """Declare ``entity`` with pika exactly as mqkit's declarer does."""
    if isinstance(entity, Queue):
        channel.queue_declare(
            entity.name,
            durable=entity.durable,
            exclusive=entity.exclusive,
            auto_delete=entity.auto_delete,
            arguments=queue_arguments(entity, QUEUE_TYPE),
        )
    elif isinstance(entity, Exchange):
        channel.exchange_declare(
            entity.name,
            exchange_type=entity.type,
            durable=entity.durable,
            auto_delete=entity.auto_delete,
        )
    elif isinstance(entity, Binding):
        channel.queue_bind(entity.queue, entity.exchange, routing_key=entity.routing_key)


class Queues:
    """Fresh, identically shaped queues for each measurement; all deleted at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.run_id = uuid.uuid4().hex[:8]
        self.declared: list[str] = []
        # Never pruned: the final clean-up deletes these again, in case a client re-declared
        # a queue (topology replay after a channel was replaced) after its row deleted it.
        self.ever: list[str] = []
        self.exchanges: list[str] = []  # the retry tiers' exchanges (deleted at the end)
        self._n = 0

    def _topology(self, name: str) -> list[Entity]:
        """What an mqkit consumer of ``name`` declares: the retry tiers of :data:`SERVICE`
        (an exchange and a queue per delay, shared by every work queue of the run), the DLQ
        and the work queue."""
        return consumer_topology(
            Queue(name),
            DEFAULT_POLICY,
            default_type=QUEUE_TYPE,
            delivery_limit=DELIVERY_LIMIT,
            service=SERVICE,
        )

    def _own(self, name: str) -> list[str]:
        """The queues of work queue ``name`` alone, its DLQ and itself (the tiers are the
        service's: they go at the final clean-up)."""
        return [dlq_name(name), name]

    def fresh(self, slug: str) -> str:
        """Declare a new work queue (with its DLQ and the service's retry tiers, as an mqkit
        consumer declares them) and return its name."""
        self._n += 1
        name = f"mqkit-bench-{self.run_id}-{self._n:02d}-{slug}"
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            channel = connection.channel()
            for entity in self._topology(name):
                _declare(channel, entity)
                if isinstance(entity, Exchange) and entity.name not in self.exchanges:
                    self.exchanges.append(entity.name)
                elif isinstance(entity, Queue):
                    if entity.name not in self.declared:
                        self.declared.append(entity.name)
                    if entity.name not in self.ever:
                        self.ever.append(entity.name)
        finally:
            connection.close()
        return name

    @contextlib.contextmanager
    def fresh_queue(self, slug: str) -> Iterator[str]:
        """A :meth:`fresh` queue for the block, deleted when it ends."""
        name = self.fresh(slug)
        try:
            yield name
        finally:
            self.delete(name)

    def delete(self, name: str | None = None) -> None:
        """Delete one work queue and its DLQ, or (``None``) everything ever declared, the
        retry tiers included."""
        doomed = list(self.ever) if name is None else self._own(name)
        exchanges = list(self.exchanges) if name is None else []
        if not doomed and not exchanges:
            return
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.url))
        except AMQPError as exc:
            print(f"warning: could not delete benchmark queues {doomed}: {exc}", file=sys.stderr)
            return
        try:
            for queue in doomed:
                channel = connection.channel()
                channel.queue_delete(queue)
                channel.close()
                if queue in self.declared:
                    self.declared.remove(queue)
            for exchange in exchanges:
                channel = connection.channel()
                channel.exchange_delete(exchange)
                channel.close()
        finally:
            connection.close()

    def preload(self, name: str, messages: list[BenchMessage]) -> None:
        """Fill ``name`` for a consume measurement (not timed), then wait until all are in."""
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            channel = connection.channel()
            # No confirms (fast); waiting for the queue's count below is what makes it sure.
            for message in messages:
                channel.basic_publish("", name, message_body(message), pika_properties(message))
            deadline = time.monotonic() + 30
            count = 0
            while time.monotonic() < deadline:
                # The stubs say int | None; a passive declare's declare-ok always carries it.
                declared = channel.queue_declare(name, passive=True)
                count = declared.method.message_count  # type: ignore[assignment]
                if count >= len(messages):
                    return
                time.sleep(0.05)
            raise RuntimeError(f"preload of {name!r}: {count} of {len(messages)} messages arrived")
        finally:
            connection.close()


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


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_kib() -> int:
    """This process's resident set size now, in KiB (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE // 1024
    except OSError:
        return 0


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of an ascending, non-empty list."""
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


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


@contextlib.contextmanager
def memory(stamps: Stamps, trace: bool) -> Iterator[None]:
    """Sample RSS (and, if ``trace``, tracemalloc) over the block; store both in ``stamps``."""
    with RssSampler() as rss, traced(trace) as mem:
        yield
    stamps.rss_kib, stamps.traced_kib = rss.growth_kib, mem.get("peak_kib")


async def maybe_await(value: Any) -> Any:
    """``value``, awaited if it is awaitable (a client method may be sync or async)."""
    return await value if inspect.isawaitable(value) else value
