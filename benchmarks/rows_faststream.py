"""The FastStream rows: the same three jobs (publish each, publish gathered, consume) done the
way a FastStream user does them, on the same queue shape as every other row.

What FastStream does, and what these rows set:

- ``RabbitBroker`` publishes on its default channel, which has publisher confirms on
  (``Channel.publisher_confirms=True``): ``broker.publish`` returns after the broker's
  ``basic.ack``. Messages are published ``mandatory`` (FastStream's default) and
  ``persist=True`` (delivery mode 2; FastStream's default is transient, so the rows set it).
  A returned (unroutable) message does not raise by default (``on_return_raises=False``);
  every row publishes to an existing queue, so nothing is returned.
- The model is serialised by FastStream (JSON, ``content_type=application/json``), with a
  ``message_id`` and ``correlation_id`` of its own; ``message_type`` and ``app_id`` are set
  as mqkit sets ``type`` and ``app_id``.
- The subscriber takes the model as its argument (FastStream validates the body with
  pydantic), on a channel of its own with the same prefetch as the other consumers, and
  acks after the handler returns (``AckPolicy.REJECT_ON_ERROR``, FastStream's default).
- FastStream binds to the queue the benchmark declared (``RabbitQueue(name,
  declare=False)``: a passive declare), so the queue is exactly the other rows' queue.
- FastStream's per-message access log is off (``logger=None``): mqkit logs nothing per
  message either, and printing thousands of lines would measure the terminal.

FastStream is an optional extra (``pip install -e '.[bench]'``); without it these rows say
so and the targets that need them are ``n/a``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
from typing import TYPE_CHECKING, Any

from common import (
    SERVICE,
    BenchMessage,
    Config,
    Queues,
    Result,
    Stamps,
    faststream_missing,
    make_messages,
    memory,
    set_error,
)
from rows_async import consume_row, publish_loop, timed

if TYPE_CHECKING:
    from faststream.rabbit import RabbitBroker

ROWS = (
    ("publish_each", "FastStream broker.publish, await each confirm"),
    ("publish_gathered", "FastStream broker.publish, gather windows"),
    ("consume", "FastStream subscriber (model argument, ack after handler)"),
)


def faststream_version() -> str | None:
    """FastStream's version, if it is installed."""
    try:
        return importlib.metadata.version("faststream")
    except importlib.metadata.PackageNotFoundError:
        return None


async def faststream_section(cfg: Config, queues: Queues) -> list[Result]:
    """The three FastStream rows (each with a note saying why, if FastStream is missing)."""
    missing = faststream_missing()
    if missing is not None:
        return [Result("faststream", key, label, error=missing) for key, label in ROWS]
    from faststream.rabbit import RabbitBroker

    results: list[Result] = []
    broker = RabbitBroker(cfg.url, logger=None, app_id=SERVICE)
    try:
        await broker.start()
    except Exception as exc:
        return [set_error(Result("faststream", key, label), exc) for key, label in ROWS]
    try:
        results.append(await _publish(cfg, queues, broker, gathered=False))
        results.append(await _publish(cfg, queues, broker, gathered=True))
        results.append(await _consume(cfg, queues, broker))
    finally:
        await broker.stop()
    return results


async def _publish(cfg: Config, queues: Queues, broker: RabbitBroker, gathered: bool) -> Result:
    """``broker.publish`` one at a time, or gathered over windows of ``cfg.window``."""
    key, label = ROWS[1 if gathered else 0]
    if gathered:
        label = f"{label} of {cfg.window}"
    row = Result("faststream", key, label)
    with queues.fresh_queue("fs-gathered" if gathered else "fs-each") as q:

        async def one(message: BenchMessage) -> Any:
            return await broker.publish(
                message,
                queue=q,
                persist=True,
                mandatory=True,
                message_type=type(message).__name__,
            )

        async def each(messages: list[BenchMessage], deadline: float) -> int:
            return await publish_loop(one, messages, deadline)

        async def windows(messages: list[BenchMessage], deadline: float) -> int:
            done = 0
            for start in range(0, len(messages), cfg.window):
                chunk = messages[start : start + cfg.window]
                await asyncio.gather(*(one(m) for m in chunk))
                done += len(chunk)
                if time.perf_counter() > deadline:
                    break
            return done

        await timed(row, cfg, windows if gathered else each)
    return row


async def _consume(cfg: Config, queues: Queues, broker: RabbitBroker) -> Result:
    from faststream import AckPolicy
    from faststream.rabbit import Channel, RabbitQueue

    result = Result("faststream", *ROWS[2])

    async def once(total_messages: int, warmup: int, trace: bool) -> Stamps:
        with queues.fresh_queue("fs-consume") as q:
            await asyncio.to_thread(queues.preload, q, make_messages(total_messages))
            stamps = Stamps(warmup, total_messages)
            subscriber = broker.subscriber(
                RabbitQueue(q, declare=False),
                channel=Channel(prefetch_count=cfg.prefetch),
                ack_policy=AckPolicy.REJECT_ON_ERROR,
                persistent=False,  # added to a running broker, removed when done
            )

            async def handler(message: BenchMessage) -> None:
                stamps.tick()

            subscriber(handler)
            with memory(stamps, trace):
                await subscriber.start()
                await asyncio.to_thread(stamps.done.wait, cfg.phase_seconds + 5)
                await subscriber.stop()
            return stamps

    return await consume_row(result, cfg, once)
