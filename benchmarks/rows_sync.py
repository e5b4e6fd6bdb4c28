"""The blocking rows: raw pika publish and consume, then the same jobs with Client; the codec."""

from __future__ import annotations

import statistics
import time
import timeit
from collections.abc import Callable
from typing import Any

import pika
from common import (
    QUEUE_TYPE,
    SERVICE,
    BenchMessage,
    Client,
    Config,
    Queues,
    Result,
    Stamps,
    decode,
    encode,
    make_messages,
    memory,
    message_body,
    pika_properties,
    record_timed,
    set_error,
)

Run = Callable[[list[BenchMessage], float], int]
"""Sends the messages, stopping early after the deadline; returns how many it sent."""

MQKIT_ROWS = (
    ("mqkit_publish", "mqkit Producer.publish (each)"),
    ("mqkit_publish_many", "mqkit Producer.publish_many"),
    ("mqkit_consume", "mqkit Consumer (concurrency=1)"),
)


def _timed(result: Result, cfg: Config, run: Run) -> Result:
    """Warm up with ``run``, then time it over ``cfg.messages`` messages."""
    try:
        run(make_messages(cfg.warmup), time.perf_counter() + cfg.phase_seconds)
        messages = make_messages(cfg.messages)
        start = time.perf_counter()
        done = run(messages, start + cfg.phase_seconds)
        record_timed(result, time.perf_counter() - start, done, len(messages))
    except Exception as exc:
        set_error(result, exc)
    return result


def _publish_loop(
    publish: Callable[[BenchMessage], Any], messages: list[BenchMessage], deadline: float
) -> int:
    done = 0
    for message in messages:
        publish(message)
        done += 1
        if time.perf_counter() > deadline:
            break
    return done


def _consume_row(result: Result, cfg: Config, once: Callable[[int, int, bool], Stamps]) -> Result:
    """A timed pass of ``once`` (after ``cfg.warmup`` messages), then its memory pass."""
    try:
        stamps = once(cfg.warmup + cfg.messages, cfg.warmup, False)
        stamps.result(result)
        result.extra["rss_growth_kib"] = stamps.rss_kib
        if cfg.memory:
            result.extra["tracemalloc_peak_kib"] = once(cfg.memory_messages, 1, True).traced_kib
    except Exception as exc:
        set_error(result, exc)
    return result


def sync_section(cfg: Config, queues: Queues) -> list[Result]:
    """pika raw rows, then Client rows."""
    results: list[Result] = []

    with queues.fresh_queue("sync-raw-each") as q:
        connection = pika.BlockingConnection(pika.URLParameters(cfg.url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()

            def raw_each(messages: list[BenchMessage], deadline: float) -> int:
                def one(m: BenchMessage) -> None:
                    channel.basic_publish(
                        "", q, message_body(m), pika_properties(m), mandatory=True
                    )

                return _publish_loop(one, messages, deadline)

            label = "raw pika BlockingConnection, confirm each"
            results.append(_timed(Result("sync", "raw_publish_each", label), cfg, raw_each))
        finally:
            connection.close()

    results.append(_raw_select(cfg, queues))
    results.append(_raw_consume(cfg, queues))

    if Client is None:
        results += [
            Result("sync", key, label, error="not importable (see below)")
            for key, label in MQKIT_ROWS
        ]
        return results
    client = Client(url=cfg.url, service=SERVICE, queue_type=QUEUE_TYPE, prefetch=cfg.prefetch)
    try:
        client.__enter__()
    except Exception as exc:
        results += [set_error(Result("sync", key, label), exc) for key, label in MQKIT_ROWS]
        return results
    try:
        results.append(_mqkit_publish(cfg, queues, client, publish_many=False))
        results.append(_mqkit_publish(cfg, queues, client, publish_many=True))
        results.append(_mqkit_consume(cfg, queues, client))
    finally:
        client.__exit__(None, None, None)
    return results


def _mqkit_publish(cfg: Config, queues: Queues, client: Any, publish_many: bool) -> Result:
    """``Producer.publish`` one at a time, or ``publish_many`` of them all."""
    row = Result("sync", *MQKIT_ROWS[1 if publish_many else 0])
    with queues.fresh_queue("sync-mqkit-many" if publish_many else "sync-mqkit-each") as q:
        try:
            producer = client.producer(BenchMessage, queue=q)

            def each(messages: list[BenchMessage], deadline: float) -> int:
                return _publish_loop(producer.publish, messages, deadline)

            def many(messages: list[BenchMessage], deadline: float) -> int:
                return len(producer.publish_many(messages))

            _timed(row, cfg, many if publish_many else each)
        except Exception as exc:
            set_error(row, exc)
    return row


def _raw_select(cfg: Config, queues: Queues) -> Result:
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
            channel.basic_publish(
                "", q, message_body(message), pika_properties(message), mandatory=True
            )
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

    def on_open_error(connection: Any, exc: str | Exception) -> None:
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
        set_error(result, exc)
    finally:
        queues.delete(q)
    return result


def _raw_consume(cfg: Config, queues: Queues) -> Result:
    result = Result(
        "sync",
        "raw_consume",
        f"raw pika BlockingConnection consume, ack each (prefetch {cfg.prefetch})",
    )

    def once(total_messages: int, warmup: int, trace: bool) -> Stamps:
        with queues.fresh_queue("sync-raw-consume") as q:
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

                with memory(stamps, trace):
                    channel.basic_consume(q, on_message)
                    connection.call_later(cfg.phase_seconds + 5, channel.stop_consuming)
                    channel.start_consuming()
                return stamps
            finally:
                if connection.is_open:
                    connection.close()

    return _consume_row(result, cfg, once)


def _mqkit_consume(cfg: Config, queues: Queues, client: Any) -> Result:
    result = Result("sync", *MQKIT_ROWS[2])

    def once(total_messages: int, warmup: int, trace: bool) -> Stamps:
        with queues.fresh_queue("sync-mqkit-consume") as q:
            queues.preload(q, make_messages(total_messages))
            stamps = Stamps(warmup, total_messages)

            def handler(message: BenchMessage, ctx: Any) -> None:
                stamps.tick()

            consumer = client.consumer(
                q, BenchMessage, handler, prefetch=cfg.prefetch, concurrency=1
            )
            with memory(stamps, trace):
                consumer.start()
                stamps.done.wait(cfg.phase_seconds + 5)
                consumer.stop()
            return stamps

    return _consume_row(result, cfg, once)


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
    result.extra["body_bytes"] = len(message_body(message))
    return result
