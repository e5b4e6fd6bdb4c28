"""AsyncClient's publisher on its ledger (mqkit.ledger), on a real aiormq channel fed frames by
hand (no broker): what aiormq settles reaches the ledger, and a chunk the channel refuses goes
back in line. The sync publisher's path through its ledger is pika's; the broker tests cover
both (tests/integration/test_sync_publish_path.py and the shared suite)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import aiormq.base
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from mqkit import PublishNacked, PublishUnroutable
from mqkit._async import publisher as async_publisher
from mqkit._async.publisher import Batch, Publisher
from mqkit.errors import ConnectionFailed
from mqkit.ledger import Entry, Job
from mqkit.lifecycle import Pipeline
from mqkit.messages import Envelope
from mqkit.settings import Settings


class _Connector(aiormq.base.Base):
    """Just enough of an aiormq Connection for a Channel to be built on it."""

    publisher_confirms = True
    is_opened = False  # closing the channel sends nothing

    def __init__(self) -> None:
        super().__init__(loop=asyncio.get_running_loop())
        self.connection_tune = spec.Connection.Tune(frame_max=131072, heartbeat=0)
        self.write_queue: asyncio.Queue[Any] = asyncio.Queue()
        self.channels: dict[int, Any] = {}

    def __str__(self) -> str:
        return "fake connection"

    async def _on_close(self, exc: BaseException | type[BaseException] | None = None) -> None:
        return None


class _Link:
    """The publisher's link, down for good: a publisher that needs a new channel waits."""

    settings = Settings(service="billing", confirm_timeout=5)
    closed = False
    opened = True
    blocked: str | None = None
    last_error: str | None = None

    def require_open(self, what: str) -> None:
        return None

    async def wait_ready(self, timeout: float | None) -> bool:
        await asyncio.sleep(0.01)
        return False


def _jobs(count: int) -> list[Job]:
    return [
        (Envelope(b'{"n": %d}' % n, f"m-{n}", "Order", "test", 1_700_000_000), "", "orders")
        for n in range(count)
    ]


async def _setup(count: int) -> tuple[Publisher, Any, Batch, list[Entry]]:
    channel = aiormq.Channel(_Connector(), number=1, publisher_confirms=True)  # type: ignore[arg-type]
    publisher = Publisher(_Link(), Pipeline())  # type: ignore[arg-type]
    publisher._channel = channel  # as channel() leaves it
    jobs = _jobs(count)
    batch = Batch([envelope.message_id for envelope, _, _ in jobs])
    entries = list(publisher._ledger.admit(batch, jobs))
    return publisher, channel, batch, entries


async def _feed(channel: Any, *frames: Any) -> None:
    """Hand ``frames`` to the channel the way aiormq's connection reader does."""
    for frame in frames:
        await channel.frames.put((0, frame))
    for _ in range(6):  # the reader task, call_soon'd confirms, then the futures' callbacks
        await asyncio.sleep(0)


def test_what_aiormq_settles_reaches_the_ledger() -> None:
    async def check() -> None:
        publisher, channel, batch, entries = await _setup(4)
        ledger = publisher._ledger
        try:
            await publisher._send(channel, entries)
            assert channel.write_queue.qsize() == 1, "a chunk goes to the writer in one write"
            assert [e.tag for e in ledger.inflight] == [1, 2, 3, 4]
            # m-0 and m-1 acked at once (multiple), m-3 comes back, m-2 is nacked
            props = async_publisher.properties(entries[3].envelope)
            body = entries[3].envelope.body
            await _feed(
                channel,
                spec.Basic.Ack(delivery_tag=2, multiple=True),
                spec.Basic.Return(reply_code=312, reply_text="NO_ROUTE", routing_key="orders"),
                ContentHeader(properties=props, body_size=len(body)),
                ContentBody(body),
                spec.Basic.Ack(delivery_tag=4),
            )
            assert batch.ok == bytearray([1, 1, 0, 0])
            unroutable = batch.errors[3]
            assert isinstance(unroutable, PublishUnroutable) and "312 NO_ROUTE" in str(unroutable)
            await _feed(channel, spec.Basic.Nack(delivery_tag=3))
            # nacked once: held, the channel replaced, the message back in line for the next
            assert publisher._channel is None and batch.remaining == 1
            assert [e.envelope.message_id for e in ledger.waiting] == ["m-2"]
            assert not ledger.inflight and not ledger.held
        finally:
            batch.abandoned = True  # the sending task, waiting for a channel, ends
            await channel.close()

    asyncio.run(check())


def test_a_second_nack_fails_the_publish_nacked() -> None:
    async def check() -> None:
        publisher, channel, batch, entries = await _setup(1)
        try:
            entries[0].nacks = 1  # nacked on a channel before this one
            await publisher._send(channel, entries)
            await _feed(channel, spec.Basic.Nack(delivery_tag=1))
            assert isinstance(batch.errors[0], PublishNacked) and batch.remaining == 0
        finally:
            await channel.close()

    asyncio.run(check())


def test_a_chunk_on_a_channel_the_broker_closed_goes_back_in_line() -> None:
    """The broker closed the channel (close-ok sent, ``is_closed`` not yet true): nothing is
    written on it, and every message waits, in order, for the next channel."""

    async def check() -> None:
        publisher, channel, batch, entries = await _setup(3)
        ledger = publisher._ledger
        try:
            channel._Channel__close_event.set()
            closing = asyncio.ensure_future(channel.close(ConnectionError("closed")))
            await publisher._send(channel, entries)
            await closing
            assert channel.write_queue.empty() and channel.delivery_tag == 0
            assert publisher._channel is None and not ledger.inflight
            assert [e.envelope.message_id for e in ledger.waiting] == ["m-0", "m-1", "m-2"]
            assert batch.remaining == 3
        finally:
            batch.abandoned = True

    asyncio.run(check())


def test_a_lost_link_sends_the_unconfirmed_again_and_fails_the_pinned() -> None:
    async def check() -> None:
        publisher, channel, batch, entries = await _setup(2)
        pinned = Batch(["m-9"])
        [rpc] = publisher._ledger.admit(pinned, _jobs(10)[9:], pinned=True)
        try:
            await publisher._send(channel, [*entries, rpc])
            await _feed(channel, spec.Basic.Ack(delivery_tag=1))
            publisher._link_lost(ConnectionResetError("reset"))
            error = pinned.errors[0]
            assert isinstance(error, ConnectionFailed) and "reset" in str(error)
            assert [e.envelope.message_id for e in publisher._ledger.waiting] == ["m-1"]
            assert batch.ok == bytearray([1, 0])
        finally:
            batch.abandoned = True
            await channel.close()

    asyncio.run(check())
