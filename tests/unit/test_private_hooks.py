"""The private parts of aiormq and pika the shells rely on, pinned: if an upgrade removes
them, these fail loudly instead of a shell quietly losing a feature (or getting slower).

- ``pyproject.toml`` pins aiormq to the versions these tests passed on; the installed one
  must be one of them.
- ``_watch_blocked`` wraps aiormq's handlers of connection.blocked / unblocked (aiormq has
  no callback for them): without them ``health()`` cannot report a broker alarm.
- The pipelined ``publish_many`` (``mqkit._async.transport.send_batch``) writes frames with
  aiormq's own confirm bookkeeping (``delivery_tag``, ``confirmations``,
  ``message_id_delivery_tag``, ``write_queue``, ``_split_body``) and checks the channel's
  close event (``is_closed`` lags behind a close-ok). Without them it would fall back to the
  one-task-per-message path, several times slower: so the fast path must be chosen on the
  installed aiormq, and aiormq's own frame handling must settle what it registered (acks,
  nacks, returns).
- :mod:`mqkit._async.lenient` repairs content headers through aiormq's
  ``transport_factory`` (aiormq 6.9 and later; ``tests/unit/test_wire.py`` checks it is there).
- The blocking client drops a connection the broker no longer answers (it blocks it during an
  alarm) with pika's ``_adapter_disconnect_stream``: without it, closing waits in vain.
"""

from __future__ import annotations

import asyncio
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiormq
import aiormq.abc
import aiormq.base
import aiormq.exceptions
import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from mqkit import PublishNacked, PublishUnroutable
from mqkit._async import connection as async_connection
from mqkit._async import publisher as async_publisher
from mqkit._async import transport as async_transport
from mqkit._async.publisher import properties
from mqkit.messages import Envelope

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
AIORMQ = version("aiormq")


def test_the_installed_aiormq_is_one_pyproject_pins() -> None:
    match = re.search(r'^\s*"aiormq(?P<spec>[^"]+)"', PYPROJECT.read_text(), re.MULTILINE)
    assert match, "pyproject.toml must pin aiormq: AsyncClient writes into its private state"
    pinned = SpecifierSet(match["spec"])
    assert Version(AIORMQ) in pinned, (
        f"aiormq {AIORMQ} is installed, but pyproject.toml pins aiormq{pinned}: "
        "run tests/unit/test_private_hooks.py on it and widen the pin only if it passes"
    )


def test_aiormq_still_has_the_connection_blocked_handlers() -> None:
    for name in async_connection._BLOCKED_HOOKS:
        assert callable(getattr(aiormq.Connection, name, None)), (
            f"aiormq.Connection.{name} is gone: mqkit cannot see connection.blocked any more "
            f"(aiormq {AIORMQ}); update mqkit._async.connection._watch_blocked"
        )


def test_aiormq_still_has_what_the_pipelined_publish_uses() -> None:
    # Instance attributes are set in Channel.__init__: look for them in its source.
    import inspect

    source = inspect.getsource(aiormq.Channel)
    for name in async_transport._PIPELINE_ATTRS:
        short = name.replace("_Channel__", "__")
        assert hasattr(aiormq.Channel, name) or f"self.{short}" in source, (
            f"aiormq.Channel no longer has {name} (aiormq {AIORMQ}): the "
            "pipelined publish_many falls back to one task per message"
        )


class _FakeUnderlay:
    def __init__(self, connection: Any) -> None:
        self.connection = connection


class _FakeAmqp:
    """Stands in for an aiormq Connection: the two private handlers, recording calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def _Connection__handle_connection_blocked(self, frame: Any) -> None:
        self.calls.append("blocked")

    async def _Connection__handle_connection_unblocked(self, frame: Any) -> None:
        self.calls.append("unblocked")


class _FakeConnection:
    def __init__(self, amqp: Any) -> None:
        self.transport = _FakeUnderlay(amqp)


def test_watching_a_connection_reports_block_and_unblock_after_aiormq_did() -> None:
    amqp = _FakeAmqp()
    connection: Any = _FakeConnection(amqp)
    seen: list[tuple[str, Any]] = []
    assert async_connection._watch_blocked(
        connection,
        lambda conn, reason: seen.append((reason, conn)),
        lambda conn: seen.append(("unblocked", conn)),
    )

    async def frames() -> None:
        await amqp._Connection__handle_connection_blocked(
            spec.Connection.Blocked(reason="low on memory")
        )
        await amqp._Connection__handle_connection_unblocked(spec.Connection.Unblocked())

    asyncio.run(frames())
    assert amqp.calls == ["blocked", "unblocked"]  # aiormq's own handling still runs
    assert seen == [("low on memory", connection), ("unblocked", connection)]


def test_a_connection_without_the_handlers_is_not_watched() -> None:
    connection: Any = _FakeConnection(object())
    assert not async_connection._watch_blocked(connection, print, print)


def test_pika_still_has_the_call_that_drops_a_connection_at_once() -> None:
    from pika.adapters.base_connection import BaseConnection

    assert callable(getattr(BaseConnection, "_adapter_disconnect_stream", None)), (
        "pika's BaseConnection._adapter_disconnect_stream is gone: Client.close() waits for a "
        "close-ok a blocked connection never gets, and leaves its socket open"
    )


# -- the pipelined publish_many on a real aiormq channel (no broker: frames are fed to it) --


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

    async def _on_close(self, exc: BaseException | None = None) -> None:
        return None


def _jobs(count: int) -> list[tuple[Envelope, str, str]]:
    return [
        (Envelope(b'{"n": %d}' % n, f"m-{n}", "Order", "test", 1_700_000_000), "", "orders")
        for n in range(count)
    ]


async def _channel() -> Any:
    return aiormq.Channel(_Connector(), number=1, publisher_confirms=True)


async def _feed(channel: Any, *frames: Any) -> None:
    """Hand ``frames`` to the channel the way aiormq's connection reader does."""
    for frame in frames:
        await channel.frames.put((0, frame))
    for _ in range(5):  # the reader task, then call_soon'd confirms
        await asyncio.sleep(0)


def test_the_fast_path_is_chosen_on_this_aiormq() -> None:
    async def check() -> None:
        channel = await _channel()
        try:
            missing = [n for n in async_transport._PIPELINE_ATTRS if not hasattr(channel, n)]
            assert not missing, (
                f"aiormq {AIORMQ}'s Channel lacks {missing}: publish_many would fall "
                "back to one task per message (several times slower); update "
                "mqkit._async.transport.send_batch"
            )
            assert async_transport.can_pipeline(channel), (
                f"publish_many does not take its fast path on aiormq {AIORMQ}"
            )
        finally:
            await channel.close()

    asyncio.run(check())


def test_aiormq_settles_what_the_fast_path_registered() -> None:
    """``send_batch`` registers each publish as aiormq's ``basic_publish`` does; aiormq's own
    frame handling must then settle those futures: a multiple ack, a nack, a return."""

    async def check() -> None:
        channel = await _channel()
        writes: asyncio.Queue[Any] = channel.write_queue
        try:
            jobs = _jobs(4)
            sent = await async_transport.send_batch(channel, jobs, [0, 1, 2, 3], True, properties)
            assert writes.qsize() == 1, "a chunk must go to the writer in one write"
            assert isinstance(writes.get_nowait(), aiormq.abc.ChannelFrame)
            assert channel.delivery_tag == 4
            assert sorted(channel.confirmations) == [1, 2, 3, 4]
            assert channel.message_id_delivery_tag == {f"m-{n}": n + 1 for n in range(4)}
            futures = [future for _, future in sent]

            # m-0 and m-1 are acked at once (multiple), m-2 is nacked, m-3 comes back (basic.return,
            # then its ack).
            returned_properties = properties(jobs[3][0])
            await _feed(
                channel,
                spec.Basic.Return(reply_code=312, reply_text="NO_ROUTE", routing_key="orders"),
                ContentHeader(properties=returned_properties, body_size=len(jobs[3][0].body)),
                ContentBody(jobs[3][0].body),
                spec.Basic.Nack(delivery_tag=3),
                spec.Basic.Ack(delivery_tag=2, multiple=True),
                spec.Basic.Ack(delivery_tag=4),
            )
            assert all(future.done() for future in futures), "aiormq left a confirm unsettled"
            assert futures[0].exception() is None and futures[1].exception() is None
            nacked, returned = futures[2].exception(), futures[3].exception()
            assert async_publisher._nacked(nacked)
            assert isinstance(async_connection.translate(nacked, what="m-2"), PublishNacked)
            unroutable = async_connection.translate(returned, what="m-3")
            assert isinstance(unroutable, PublishUnroutable) and "312 NO_ROUTE" in str(unroutable)
            assert not channel.message_id_delivery_tag, "settled publishes must be forgotten"
        finally:
            await channel.close()

    asyncio.run(check())


def test_a_batch_the_writer_never_took_is_undone() -> None:
    async def check() -> None:
        channel = await _channel()
        try:
            await async_transport.send_batch(channel, _jobs(2), [0, 1], True, properties)

            async def refuse(_frame: Any) -> None:
                raise asyncio.CancelledError

            channel.write_queue.put = refuse
            with pytest.raises(asyncio.CancelledError):
                await async_transport.send_batch(channel, _jobs(3), [2], True, properties)
            assert channel.delivery_tag == 2, "the channel's confirm numbering is off"
            assert sorted(channel.confirmations) == [1, 2]
        finally:
            await channel.close()

    asyncio.run(check())
