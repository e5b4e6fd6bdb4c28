"""The asyncio rows: raw aio-pika publish and consume, then the same jobs with AsyncClient."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from common import (
    QUEUE_TYPE,
    SERVICE,
    AsyncClient,
    BenchMessage,
    Config,
    Queues,
    Result,
    Stamps,
    aio_message,
    make_messages,
    maybe_await,
    memory,
    record_timed,
    set_error,
)

Run = Callable[[list[BenchMessage], float], Awaitable[int]]
"""Sends the messages, stopping early after the deadline; returns how many it sent."""

MQKIT_ROWS = (
    ("mqkit_publish", "mqkit AsyncProducer.publish (each)"),
    ("mqkit_publish_many", "mqkit AsyncProducer.publish_many"),
    ("mqkit_consume", "mqkit AsyncConsumer (concurrency=1)"),
)


async def publish_loop(
    publish: Callable[[BenchMessage], Awaitable[Any]], messages: list[BenchMessage], deadline: float
) -> int:
    """Await ``publish`` for each message in turn, stopping after ``deadline``; how many."""
    done = 0
    for message in messages:
        await publish(message)
        done += 1
        if time.perf_counter() > deadline:
            break
    return done


async def timed(result: Result, cfg: Config, run: Run) -> Result:
    """Warm up with ``run``, then time it over ``cfg.messages`` messages."""
    try:
        await run(make_messages(cfg.warmup), time.perf_counter() + cfg.phase_seconds)
        messages = make_messages(cfg.messages)
        start = time.perf_counter()
        done = await run(messages, start + cfg.phase_seconds)
        record_timed(result, time.perf_counter() - start, done, len(messages))
    except Exception as exc:
        set_error(result, exc)
    return result


async def consume_row(
    result: Result, cfg: Config, once: Callable[[int, int, bool], Awaitable[Stamps]]
) -> Result:
    """A timed pass of ``once`` (after ``cfg.warmup`` messages), then its memory pass."""
    try:
        stamps = await once(cfg.warmup + cfg.messages, cfg.warmup, False)
        stamps.result(result)
        result.extra["rss_growth_kib"] = stamps.rss_kib
        if cfg.memory:
            memory_pass = await once(cfg.memory_messages, 1, True)
            result.extra["tracemalloc_peak_kib"] = memory_pass.traced_kib
    except Exception as exc:
        set_error(result, exc)
    return result


async def async_section(cfg: Config, queues: Queues) -> list[Result]:
    """aio-pika raw rows, then AsyncClient rows."""
    results: list[Result] = []
    connection = await aio_pika.connect(cfg.url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = channel.default_exchange

        with queues.fresh_queue("async-raw-each") as q:

            async def raw_each(messages: list[BenchMessage], deadline: float) -> int:
                async def one(m: BenchMessage) -> Any:
                    return await exchange.publish(aio_message(m), routing_key=q, mandatory=True)

                return await publish_loop(one, messages, deadline)

            label = "raw aio-pika publish, await each confirm"
            results.append(await timed(Result("async", "raw_publish_each", label), cfg, raw_each))

        with queues.fresh_queue("async-raw-windowed") as q2:

            async def raw_windowed(messages: list[BenchMessage], deadline: float) -> int:
                done = 0
                for start in range(0, len(messages), cfg.window):
                    chunk = messages[start : start + cfg.window]
                    await asyncio.gather(
                        *(
                            exchange.publish(aio_message(m), routing_key=q2, mandatory=True)
                            for m in chunk
                        )
                    )
                    done += len(chunk)
                    if time.perf_counter() > deadline:
                        break
                return done

            label = f"raw aio-pika publish, gather windows of {cfg.window}"
            row = Result("async", "raw_publish_windowed", label)
            results.append(await timed(row, cfg, raw_windowed))

        results.append(await _raw_consume(cfg, queues, connection))
    finally:
        await connection.close()

    if AsyncClient is None:
        results += [
            Result("async", key, label, error="not importable (see below)")
            for key, label in MQKIT_ROWS
        ]
        return results

    client = AsyncClient(url=cfg.url, service=SERVICE, queue_type=QUEUE_TYPE, prefetch=cfg.prefetch)
    try:
        await client.__aenter__()
    except Exception as exc:
        results += [set_error(Result("async", key, label), exc) for key, label in MQKIT_ROWS]
        return results
    try:
        results.append(await _mqkit_publish(cfg, queues, client, publish_many=False))
        results.append(await _mqkit_publish(cfg, queues, client, publish_many=True))
        results.append(await _mqkit_consume(cfg, queues, client))
    finally:
        await client.__aexit__(None, None, None)
    return results


async def _mqkit_publish(cfg: Config, queues: Queues, client: Any, publish_many: bool) -> Result:
    """``AsyncProducer.publish`` one at a time, or ``publish_many`` of them all."""
    row = Result("async", *MQKIT_ROWS[1 if publish_many else 0])
    with queues.fresh_queue("async-mqkit-many" if publish_many else "async-mqkit-each") as q:
        try:
            producer = await maybe_await(client.producer(BenchMessage, queue=q))

            async def each(messages: list[BenchMessage], deadline: float) -> int:
                return await publish_loop(producer.publish, messages, deadline)

            async def many(messages: list[BenchMessage], deadline: float) -> int:
                return len(await producer.publish_many(messages))

            await timed(row, cfg, many if publish_many else each)
        except Exception as exc:
            set_error(row, exc)
    return row


async def _raw_consume(
    cfg: Config, queues: Queues, connection: aio_pika.abc.AbstractConnection
) -> Result:
    result = Result(
        "async", "raw_consume", f"raw aio-pika consume, ack each (prefetch {cfg.prefetch})"
    )

    async def once(total_messages: int, warmup: int, trace: bool) -> Stamps:
        with queues.fresh_queue("async-raw-consume") as q:
            await asyncio.to_thread(queues.preload, q, make_messages(total_messages))
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=cfg.prefetch)
            queue = await channel.get_queue(q, ensure=True)
            stamps = Stamps(warmup, total_messages)

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                BenchMessage.model_validate_json(message.body)
                stamps.tick()  # as for mqkit: counted when handled, before the ack
                await message.ack()

            with memory(stamps, trace):
                tag = await queue.consume(on_message)
                await asyncio.to_thread(stamps.done.wait, cfg.phase_seconds + 5)
                await queue.cancel(tag)
            await channel.close()
            return stamps

    return await consume_row(result, cfg, once)


async def _mqkit_consume(cfg: Config, queues: Queues, client: Any) -> Result:
    result = Result("async", *MQKIT_ROWS[2])

    async def once(total_messages: int, warmup: int, trace: bool) -> Stamps:
        with queues.fresh_queue("async-mqkit-consume") as q:
            await asyncio.to_thread(queues.preload, q, make_messages(total_messages))
            stamps = Stamps(warmup, total_messages)

            async def handler(message: BenchMessage, ctx: Any) -> None:
                stamps.tick()

            consumer = await maybe_await(
                client.consumer(q, BenchMessage, handler, prefetch=cfg.prefetch, concurrency=1)
            )
            with memory(stamps, trace):
                await consumer.start()
                await asyncio.to_thread(stamps.done.wait, cfg.phase_seconds + 5)
                await consumer.stop()
            return stamps

    return await consume_row(result, cfg, once)
