"""What each consumer costs the broker: queues, memory, file descriptors.

The measurement runs on a RabbitMQ node of its own (``mqkit.testing.RabbitNode``: the local
RabbitMQ installation, started on free loopback ports in a temporary directory and removed at
the end), so the broker at ``--url`` is neither disturbed nor counted. For each runtime in
turn, ``--footprint-consumers`` consumers are started, each on a queue of its own, with what
that runtime declares for a consumer:

- mqkit ``Client`` / ``AsyncClient``: ``client.consumer(name, Model, handler)`` with the
  default retry policy: whatever mqkit declares for it (today the work queue, its DLQ and
  one retry queue per delay tier);
- raw pika, raw aio-pika and FastStream: one durable quorum queue per consumer (no DLQ and
  no retry queues: those runtimes do not make them), consumed with the same prefetch.

All consumers of one runtime share one connection (one client, broker or connection per
runtime, as one service would). Once they are all consuming, the node is asked (one
``rabbitmqctl eval``, after a garbage collection of every Erlang process) for its queue
count and memory (``rabbit_vm:memory()``, the breakdown ``rabbitmq-diagnostics
memory_breakdown`` prints), and the node's open file descriptors and resident set are read
from ``/proc``. The same figures just before the runtime started are the baseline; a row
reports the figures with the consumers running and the difference per consumer. Then the
consumers stop and every queue on the node is deleted before the next runtime.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
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
    Result,
    maybe_await,
    runtime_missing,
    set_error,
)

RUNTIMES = (
    ("client", "mqkit Client"),
    ("async_client", "mqkit AsyncClient"),
    ("raw_pika", "raw pika"),
    ("raw_aio_pika", "raw aio-pika"),
    ("faststream", "FastStream"),
)
_SETTLE = 0.5  # s between the last consumer starting and the measurement
_MEMORY = (
    "[erlang:garbage_collect(P) || P <- erlang:processes()], "
    "[{version, rabbit_misc:version()}, {queues, rabbit_amqqueue:count()}, "
    "{processes, erlang:system_info(process_count)}, "
    "{channels, length(rabbit_channel:list())}, {erlang_total, erlang:memory(total)} "
    "| [{K, V} || {K, V} <- rabbit_vm:memory(), is_integer(V)]] ++ "
    "[{queue, element(4, amqqueue:get_name(Q))} || Q <- rabbit_amqqueue:list()]."
)
_PAIR = re.compile(r"\{(\w+),(\d+)\}")
_VERSION = re.compile(r'\{version,\s*"([^"]*)"\}')
_QUEUE = re.compile(r'\{queue,\s*<<"([^"]*)">>\}')
_MIB = 1024 * 1024

Snapshot = dict[str, Any]
Measure = Callable[[], Snapshot]


# --------------------------------------------------------------------------- the node


def _snapshot(node: Any) -> Snapshot:
    """The node's figures now (memory in bytes)."""
    answer = node.eval(_MEMORY)
    figures: Snapshot = {key: int(value) for key, value in _PAIR.findall(answer)}
    names = _QUEUE.findall(answer)
    if len(names) != figures.get("queues"):  # a name the regular expression did not take
        listed = node.ctl("list_queues", "--quiet", "--no-table-headers", "name")
        names = [line.strip() for line in listed.splitlines() if line.strip()]
    figures["names"] = names
    version = _VERSION.search(answer)
    figures["version"] = version.group(1) if version else "?"
    pid = node.pid
    if pid is not None:
        proc = Path(f"/proc/{pid}")
        try:
            figures["fds"] = len(os.listdir(proc / "fd"))
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    figures["os_rss"] = int(line.split()[1]) * 1024
        except OSError:
            pass
    return figures


def _delete_queues(node: Any, names: list[str]) -> None:
    if not names:
        return
    connection = pika.BlockingConnection(pika.URLParameters(node.url))
    try:
        channel = connection.channel()
        for name in names:
            channel.queue_delete(name)
    finally:
        connection.close()


# --------------------------------------------------------------------------- runtimes


def _names(runtime: str, n: int) -> list[str]:
    run = uuid.uuid4().hex[:6]
    return [f"mqkit-bench-fp-{run}-{runtime}-{i:03d}" for i in range(n)]


def _client(url: str, n: int, prefetch: int, measure: Measure) -> Snapshot:
    with Client(url=url, service=SERVICE, queue_type=QUEUE_TYPE, prefetch=prefetch) as client:

        def handler(message: BenchMessage, ctx: Any) -> None:
            pass

        consumers = [client.consumer(q, BenchMessage, handler) for q in _names("client", n)]
        try:
            for consumer in consumers:
                consumer.start()
            return measure()
        finally:
            for consumer in consumers:
                consumer.stop()


def _raw_pika(url: str, n: int, prefetch: int, measure: Measure) -> Snapshot:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for q in _names("pika", n):
            channel = connection.channel()
            channel.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
            channel.basic_qos(prefetch_count=prefetch)
            channel.basic_consume(q, lambda ch, method, properties, body: None)
        return measure()
    finally:
        connection.close()


async def _async_client(url: str, n: int, prefetch: int, measure: Measure) -> Snapshot:
    async with AsyncClient(
        url=url, service=SERVICE, queue_type=QUEUE_TYPE, prefetch=prefetch
    ) as client:

        async def handler(message: BenchMessage, ctx: Any) -> None:
            pass

        consumers = [
            await maybe_await(client.consumer(q, BenchMessage, handler)) for q in _names("async", n)
        ]
        try:
            for consumer in consumers:
                await consumer.start()
            return await asyncio.to_thread(measure)
        finally:
            for consumer in consumers:
                await consumer.stop()


async def _raw_aio_pika(url: str, n: int, prefetch: int, measure: Measure) -> Snapshot:
    connection = await aio_pika.connect(url)
    try:

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            pass

        for q in _names("aiopika", n):
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.declare_queue(
                q, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.consume(on_message)
        return await asyncio.to_thread(measure)
    finally:
        await connection.close()


async def _faststream(url: str, n: int, prefetch: int, measure: Measure) -> Snapshot:
    from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue

    broker = RabbitBroker(url, logger=None, app_id=SERVICE)

    for q in _names("faststream", n):

        async def handler(message: BenchMessage) -> None:
            pass

        broker.subscriber(
            RabbitQueue(q, durable=True, queue_type=QueueType.QUORUM),
            channel=Channel(prefetch_count=prefetch),
        )(handler)
    await broker.start()
    try:
        return await asyncio.to_thread(measure)
    finally:
        await broker.stop()


def _runner(runtime: str) -> Callable[[str, int, int, Measure], Snapshot]:
    if runtime == "client":
        return _client
    if runtime == "raw_pika":
        return _raw_pika
    coroutine = {
        "async_client": _async_client,
        "raw_aio_pika": _raw_aio_pika,
        "faststream": _faststream,
    }[runtime]

    def run(url: str, n: int, prefetch: int, measure: Measure) -> Snapshot:
        return asyncio.run(coroutine(url, n, prefetch, measure))

    return run


# --------------------------------------------------------------------------- the section


def footprint_section(cfg: Config) -> list[Result]:
    """One row per runtime, measured on a node of the benchmark's own."""
    rows = [Result("footprint", key, label) for key, label in RUNTIMES]
    n = cfg.footprint_consumers
    for row in rows:
        row.extra["consumers"] = n
    try:
        from mqkit.testing import RabbitNode

        node = RabbitNode(f"mqkit-bench-{uuid.uuid4().hex[:6]}")
    except Exception as exc:
        return [set_error(row, exc) for row in rows]
    try:
        node.start()
        for row in rows:
            missing = runtime_missing(row.key)
            if missing is not None:
                row.error = missing
                continue
            names: list[str] | None = None
            try:
                names = _measure(node, row, _runner(row.key), n, cfg.prefetch)
            except Exception as exc:
                set_error(row, exc)
            finally:
                # The next runtime starts on an empty node.
                _delete_queues(node, _snapshot(node)["names"] if names is None else names)
    except Exception as exc:
        for row in rows:
            if row.error is None and "queues" not in row.extra:
                set_error(row, exc)
    finally:
        node.cleanup()
    return rows


def _measure(
    node: Any,
    row: Result,
    run: Callable[[str, int, int, Measure], Snapshot],
    n: int,
    prefetch: int,
) -> list[str]:
    """Fill ``row``; returns the names of the queues the runtime's consumers declared."""
    before = _snapshot(node)
    row.extra["node"] = f"RabbitMQ {before['version']} (own node, port {node.port})"

    def measure() -> Snapshot:
        time.sleep(_SETTLE)
        return _snapshot(node)

    started = time.perf_counter()
    during = run(node.url, n, prefetch, measure)
    row.seconds = time.perf_counter() - started

    def delta(key: str) -> int:
        return int(during.get(key, 0)) - int(before.get(key, 0))

    quorum = ("quorum_queue_procs", "quorum_ets", "quorum_queue_dlx_procs")
    connection = (
        "connection_readers",
        "connection_writers",
        "connection_channels",
        "connection_other",
    )
    row.extra.update(
        queues=during.get("queues", 0),
        queues_per_consumer=delta("queues") / n,
        channels=during.get("channels", 0),
        memory_mib=during.get("erlang_total", 0) / _MIB,
        memory_delta_mib=delta("erlang_total") / _MIB,
        per_consumer_kib=delta("erlang_total") / n / 1024,
        quorum_mib=sum(during.get(k, 0) for k in quorum) / _MIB,
        connection_mib=sum(during.get(k, 0) for k in connection) / _MIB,
        os_rss_mib=during.get("os_rss", 0) / _MIB,
        os_rss_delta_mib=delta("os_rss") / _MIB,
        fds=during.get("fds"),
        fds_delta=delta("fds"),
        erlang_processes=during.get("processes", 0),
        baseline={k: before[k] for k in ("queues", "erlang_total", "fds", "os_rss") if k in before},
    )
    return list(during.get("names", []))
