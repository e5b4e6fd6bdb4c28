"""Confirmed publishing for the asyncio runtime: one channel with publisher confirms (and
mandatory returns raised) per client, shared by producers, consumers' retry and dead-letter
copies, RPC and dead-letter replays.

A publishing task turns its messages into a :class:`Batch` it awaits. A lone message it sends
itself when no sending task is at work (:meth:`Publisher._send_here`); otherwise its messages
wait in line for the sending task, which writes :data:`~mqkit.publishing.SEND_CHUNK` publishes
per write (aiormq's channel is written into directly: :func:`.transport.send_batch`). While
the link is down, messages wait in line for it.

What is in flight, and what each confirm, return, nack, closed channel or lost link does to
it, is the core's :class:`~mqkit.ledger.Ledger`, the same on both runtimes: this module only
sends what it says and tells it what aiormq reported (aiormq matches ``basic.ack`` /
``basic.nack``, ``multiple`` included, and ``basic.return`` to each publish's future). In
short: up to :data:`~mqkit.publishing.CONFIRM_WINDOW` messages are in flight; a return fails
its publish with :class:`~mqkit.PublishUnroutable`; after a lost link the unconfirmed messages
are sent again on the new channel (at-least-once); a publisher that waits longer than
``confirm_timeout`` without progress gives up with :class:`~mqkit.PublishTimeout` and its
messages that were not sent yet are dropped.

**Nacks.** A ``basic.nack`` makes the publisher replace its channel (at most once per
:data:`mqkit.publishing.RENEW_INTERVAL`): RabbitMQ 3.10 nacks a channel's publishes to a
quorum queue for good once its first one landed during a leader election, and only a new
channel gets through. What was in flight on the old channel is sent again on the new one, as
after a lost link. A nacked message is sent once more on the new channel
(:func:`mqkit.publishing.retry_nacked`) and fails with :class:`~mqkit.PublishNacked` only if
it is nacked again (or no new channel can be had within ``confirm_timeout``). A publish pinned
to one channel (an RPC request, whose reply comes on that channel) is not sent again.

**Size.** A message whose body is above ``max_message_size`` (:class:`~mqkit.publishing.SizeLimit`)
fails with :class:`~mqkit.PublishTooLarge` before it is sent. If the broker's own limit is
lower, the broker closes the channel over it: then only the publishes above the limit it names
fail, the others are sent again on a new channel, and the broker's limit is checked from then
on.

**Alarms.** The publisher's link is a connection of its own: while a memory or disk alarm
blocks it, publishes get no confirm and raise :class:`~mqkit.PublishTimeout` after
``confirm_timeout`` (saying why), and consumers, on the other connection, keep going.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from functools import partial
from typing import Any

import aiormq.exceptions as amqp
from aiormq.abc import AbstractChannel as Channel
from pamqp import commands as spec

from mqkit import explain, ledger
from mqkit.errors import ConnectionFailed, MqkitError, PublishTimeout
from mqkit.ledger import Entry, Job, Ledger, stall_cause
from mqkit.lifecycle import Pipeline
from mqkit.messages import Envelope
from mqkit.publishing import SEND_CHUNK

from .channel import open_underlay
from .connection import (
    AMQP_ERRORS,
    RPC_TIMEOUT,
    Link,
    describe,
    reply_of,
    returned_reply,
    translate,
)
from .transport import can_pipeline, idle, send_batch

__all__ = ["Batch", "Publisher", "properties"]

log = logging.getLogger("mqkit.publisher")


def properties(envelope: Envelope) -> spec.Basic.Properties:
    """pamqp properties for an envelope."""
    return spec.Basic.Properties(
        content_type=envelope.content_type,
        delivery_mode=envelope.delivery_mode,
        message_id=envelope.message_id,
        timestamp=datetime.fromtimestamp(envelope.timestamp, tz=timezone.utc),
        message_type=envelope.type or None,
        app_id=envelope.app_id or None,
        headers=envelope.headers or None,
        correlation_id=envelope.correlation_id,
        reply_to=envelope.reply_to,
        priority=envelope.priority,
        expiration=None if envelope.expiration is None else str(envelope.expiration),
    )


class Batch(ledger.Batch):
    """Messages one task waits on, settled by the publisher's confirm callbacks."""

    __slots__ = ("_waiter",)

    def __init__(self, ids: list[str]) -> None:
        super().__init__(ids)
        # What the waiting task awaits: woken by the last settle, or by its timeout. One
        # future awaited directly, not asyncio.wait(): the confirm wakes the task at once.
        self._waiter: asyncio.Future[None] | None = None

    def done(self) -> None:
        """Every message is settled."""
        _wake(self._waiter)

    async def wait(self, timeout: float) -> bool:
        """Wait until all are settled, as long as confirms keep coming at least every
        ``timeout`` seconds; ``False`` on a stall."""
        loop = asyncio.get_running_loop()
        while self.remaining:
            seen = self.progress
            waiter = self._waiter = loop.create_future()
            expiry = loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                expiry.cancel()
                self._waiter = None
            if self.remaining and self.progress == seen:
                return False
        return True


class Publisher:
    """The client's confirm-mode channel and what is sent on it. Safe to share across
    tasks."""

    def __init__(self, link: Link, pipeline: Pipeline) -> None:
        self._link = link
        self._confirm_timeout = link.settings.confirm_timeout
        self._ledger = Ledger(link.settings, pipeline)
        self._channel: Channel | None = None
        self._lock = asyncio.Lock()  # one task opens the channel
        self._renewing: Channel | None = None  # nacked, to be replaced
        self._sending = False  # a task sends what is waiting (see _pump)
        self._pipelined_on: Channel | None = None  # the channel the fast path was chosen for
        self._background: set[asyncio.Future[None]] = set()

    async def channel(self, timeout: float | None) -> Channel:
        """The publishing channel (confirms on, returns raise), opened if there is none (a
        channel error closed it, or a new connection) within ``timeout`` seconds."""
        current = self._channel
        if current is not None and not current.is_closed:
            return current
        if current is not None:  # closed, and its close not handled yet: handle it first
            self._on_channel_closed(current, _close_reason(current))
        return await self._open(timeout)

    # -- publishing tasks --------------------------------------------------------------------

    async def publish(
        self,
        envelope: Envelope,
        *,
        exchange: str,
        routing_key: str,
        mandatory: bool = True,
        timeout: float | None = None,
        channel: Channel | None = None,
    ) -> None:
        """Publish and wait for the broker's confirm.

        While the link is down this waits for it (within ``timeout``, default
        ``confirm_timeout``); a publish whose confirm was lost with the link is sent again on
        the new one (at-least-once), and so is a nacked one, once, on a new channel.
        ``channel`` pins the publish to one channel (RPC): neither is sent again then.
        """
        if self._link.closed or not self._link.opened:
            self._link.require_open(explain.publishing(envelope.message_id, exchange, routing_key))
        if channel is not None and (channel is not self._channel or channel.is_closed):
            what = explain.publishing(envelope.message_id, exchange, routing_key)
            raise explain.link_lost(what, ledger.REPLACED)
        budget = self._confirm_timeout if timeout is None else timeout
        jobs = [(envelope, exchange, routing_key)]
        await self._publish(jobs, mandatory, budget, pinned=channel is not None)

    async def publish_many(self, jobs: Sequence[Job], *, mandatory: bool = True) -> None:
        """Publish ``(envelope, exchange, routing_key)`` jobs with a window of confirms in
        flight; raise a :class:`~mqkit.PublishError` whose ``unconfirmed`` lists what failed.

        What the link loses is sent again once it is back (at-least-once), as long as
        confirms keep coming within ``confirm_timeout``; what is left then is a
        PublishTimeout. A nacked job is sent once more on a new channel before it counts as
        nacked.
        """
        if not jobs:
            return
        self._link.require_open("publishing")
        await self._publish(jobs, mandatory, self._confirm_timeout)

    async def _publish(
        self, jobs: Sequence[Job], mandatory: bool, budget: float, *, pinned: bool = False
    ) -> None:
        """Publish ``jobs`` and wait for every confirm, as long as they keep coming within
        ``budget`` seconds; raise the failure."""
        batch = Batch([envelope.message_id for envelope, _, _ in jobs])
        # Messages too large fail in admit(), before any is sent.
        chunk = list(self._ledger.admit(batch, jobs, mandatory=mandatory, pinned=pinned))
        try:
            if chunk:
                await self._hand_over(chunk, lone=len(jobs) == 1)
            confirmed = await batch.wait(budget)
        except BaseException:
            batch.abandoned = True  # cancelled: what is not sent yet is dropped
            raise
        if not confirmed:
            batch.abandoned = True
        if confirmed and not batch.errors:
            return
        _, exchange, routing_key = jobs[0]
        raise batch.failure(
            exchange,
            routing_key,
            timeout=None if confirmed else budget,
            cause=stall_cause(self._link.blocked, self._link.last_error),
        )

    async def _hand_over(self, messages: list[Entry], *, lone: bool = False) -> None:
        """Put ``messages`` in line for the sending task, or send a ``lone`` message from
        this task while no task sends and the channel is idle (no task to wake, and the
        write cannot keep this task past its deadline)."""
        channel = self._channel
        if lone and not self._sending and channel is not None and idle(channel):
            await self._send_here(messages)
            return
        self._enqueue(messages)

    async def _send_here(self, messages: list[Entry]) -> None:
        """In place of the sending task: send what is waiting, ``messages`` included."""
        self._sending = True
        self._ledger.add(messages)
        try:
            await self._send_waiting()
        finally:
            self._sending = False
            self._pump()  # what is left (cancelled midway, or no room) goes on in a task

    # -- sending -------------------------------------------------------------------------------

    def _enqueue(self, messages: list[Entry]) -> None:
        self._ledger.add(messages)
        self._pump()

    def _pump(self) -> None:
        """Have a task send what is waiting, unless one does, or the window has no room for
        a chunk yet (confirms call this again: one write per chunk, not per confirm)."""
        if self._sending or not self._ledger.waiting or not self._ledger.room(SEND_CHUNK):
            return
        self._sending = True
        self._spawn(self._sender())

    async def _sender(self) -> None:
        try:
            await self._send_waiting()
        finally:
            self._sending = False

    async def _send_waiting(self) -> None:
        """Send what is waiting, a chunk per write, as the confirm window allows; open the
        channel first (waiting for the link) when needed."""
        ledger = self._ledger
        while ledger.waiting:
            channel = self._channel
            if channel is None or channel.is_closed:
                channel = await self.reopen()
                if channel is None:
                    return
            chunk = ledger.take(SEND_CHUNK)
            if not chunk:
                return  # no room: confirms call _pump
            mandatory = chunk[0].mandatory
            cut = next((i for i, e in enumerate(chunk) if e.mandatory != mandatory), len(chunk))
            if cut < len(chunk):  # one write carries one mandatory flag
                ledger.unsent(chunk[cut:])
                del chunk[cut:]
            await self._send(channel, chunk)

    async def _send(self, channel: Channel, messages: list[Entry]) -> None:
        """Write ``messages`` on ``channel`` (one write on aiormq 7's channel, else a task
        each) and watch each one's confirm."""
        ledger = self._ledger
        fast = self._pipelines(channel)
        try:
            if fast:
                jobs = [(m.envelope, m.exchange, m.routing_key) for m in messages]
                settled = partial(self._settled, channel, messages)
                sent = await send_batch(
                    channel, jobs, range(len(jobs)), messages[0].mandatory, properties, settled
                )
                confirms = [confirm for _, confirm in sent]
            else:
                confirms = [_publish_task(channel, message) for message in messages]
        except asyncio.CancelledError:
            ledger.unsent(messages)
            raise
        except AMQP_ERRORS:  # the channel is closing: its close handler puts back what it held
            ledger.unsent(messages)
            await self._closed(channel)
            return
        except Exception as exc:  # these messages cannot be written (not the channel's fault)
            for message in messages:
                ledger.fail(message, translate(exc, what=message.what))
            return
        if channel is not self._channel:  # replaced while this waited for its lock
            ledger.unsent(messages)
            return
        for message in messages:
            ledger.sent(message)
        if not fast:
            on_confirm = self._on_confirm
            for message, confirm in zip(messages, confirms, strict=True):
                confirm.add_done_callback(partial(on_confirm, channel, message))

    def _pipelines(self, channel: Channel) -> bool:
        """Whether ``channel`` takes the fast path (:func:`.transport.send_batch`); asked once
        per channel."""
        if channel is not self._pipelined_on:
            self._pipelined_on = channel if can_pipeline(channel) else None
        return channel is self._pipelined_on

    def _settled(
        self, channel: Channel, messages: list[Entry], index: int, confirm: asyncio.Future[Any]
    ) -> None:
        self._on_confirm(channel, messages[index], confirm)

    def _on_confirm(self, channel: Channel, message: Entry, confirm: asyncio.Future[Any]) -> None:
        """aiormq settled ``message``'s confirm future: acked, nacked, returned, or failed
        with its channel."""
        exc = None if confirm.cancelled() else confirm.exception()
        if channel is not self._channel or confirm.cancelled():
            return  # a replaced channel: what was in flight on it was sent again
        if exc is None:
            self._confirmed(channel, message.tag, False, False)
        elif _nacked(exc):
            self._confirmed(channel, message.tag, False, True)
        elif isinstance(exc, amqp.PublishError):
            self._on_return(channel, exc)
            self._confirmed(channel, message.tag, False, False)
        elif isinstance(exc, Exception) and not isinstance(exc, AMQP_ERRORS):
            self._ledger.fail(message, translate(exc, what=message.what))
        # else the channel closed under it: its close handler puts it back in line or fails it

    def _confirmed(self, channel: Channel, tag: int, multiple: bool, nacked: bool) -> None:
        """``basic.ack`` (or ``basic.nack``) ``tag`` (``multiple``: and all before it)."""
        self._ledger.confirmed(tag, multiple, nacked)
        if nacked:
            self._renew_soon(channel)
        if self._ledger.waiting:
            self._pump()

    def _on_return(self, channel: Channel, returned: amqp.PublishError) -> None:
        if channel is not self._channel:
            return
        message: Any = returned.message
        message_id = message.header.properties.message_id if message is not None else None
        self._ledger.returned(message_id, returned_reply(returned))

    def _renew_soon(self, channel: Channel) -> None:
        """Replace ``channel``, which nacked, now or once the ledger's renewal allows."""
        pending = self._renewing is not None
        self._renewing = channel  # a renewal on the way (for a channel lost since) takes it
        if pending:
            return
        wait = self._ledger.renewal.wait()
        if wait <= 0:
            self._renew()
        else:
            asyncio.get_running_loop().call_later(wait, self._renew)

    def _renew(self) -> None:
        """Close the channel that nacked and open another; what was in flight on it, and the
        nacked messages held for a retry, go first on the new one."""
        old, self._renewing = self._renewing, None
        if not self._ledger.renew(old is not None and old is self._channel) or old is None:
            self._pump()
            return
        self._channel = None
        self._spawn(_close_replaced(old))
        self._pump()

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        if channel is not self._channel:
            return  # an old channel
        self._channel = None
        if self._link.closed:
            self._ledger.closed()
            return
        code, text = reply_of(reason) if isinstance(reason, amqp.AMQPChannelError) else (None, "")
        if code is None:  # not the broker's doing (the connection is gone, or closed here)
            self._ledger.requeue(describe(reason))
        else:
            self._ledger.closed_by_broker(code, text)
        self._pump()

    async def reopen(self) -> Channel | None:
        """The channel, opened once the link is up; ``None`` when no caller waits for one
        any more, or it cannot be had (the callers fail)."""
        while self._ledger.live():
            try:
                return await self.channel(self._confirm_timeout)
            except PublishTimeout:
                continue  # the link is not back: the callers time out on their own
            except ConnectionFailed as exc:
                if self._link.closed:
                    self._ledger.fail_all(exc)
                    return None
                await asyncio.sleep(0.05)  # lost again while opening the channel: wait on
            except MqkitError as exc:
                self._ledger.fail_all(exc)
                return None
        return None

    async def _open(self, timeout: float | None) -> Channel:
        """Open the confirm channel unless another task did meanwhile (one channel at a
        time), within ``timeout`` seconds (else PublishTimeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        def timed_out() -> PublishTimeout:
            return explain.confirm_timeout(
                "publish",
                self._confirm_timeout if timeout is None else timeout,
                stall_cause(self._link.blocked, self._link.last_error) or "not connected",
            )

        # Another task may be opening the channel on a link that does not answer: wait for
        # it no longer than this one may take.
        try:
            await asyncio.wait_for(self._lock.acquire(), timeout)
        except asyncio.TimeoutError:
            raise timed_out() from None
        try:
            current = self._channel
            if current is not None and not current.is_closed:
                return current
            self._link.require_open("publishing")
            if not await self._link.wait_ready(left()):
                raise timed_out()
            try:
                channel = await open_underlay(self._link, confirms=True, timeout=left())
            except ConnectionFailed:
                if deadline is not None and deadline - time.monotonic() < 0.01:
                    raise timed_out() from None  # no answer within this caller's time
                raise
            self._channel = channel
            self._ledger.opened()
            channel.closing.add_done_callback(
                lambda _closing: self._on_channel_closed(channel, _close_reason(channel))
            )
            return channel
        finally:
            self._lock.release()

    async def _closed(self, channel: Channel) -> None:
        """Wait until ``channel``, which refused a write, has closed; handle its close."""
        if not channel.is_closed:
            await asyncio.wait((channel.closing,), timeout=RPC_TIMEOUT)
        self._on_channel_closed(channel, _close_reason(channel))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- Restorable --------------------------------------------------------------------------

    def _link_lost(self, reason: BaseException) -> None:
        """The connection is gone: so is the channel; what was in flight is sent again."""
        self._channel = None
        if self._link.closed:
            self._ledger.closed()
        else:
            self._ledger.requeue(describe(reason))

    async def _restore(self) -> None:
        """Send what is waiting: the sending task opens the channel on the new connection."""
        self._pump()


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _nacked(exc: BaseException) -> bool:
    """Whether ``exc`` is the broker's ``basic.nack`` of a publish (not a return)."""
    return (
        isinstance(exc, amqp.DeliveryError)
        and not isinstance(exc, amqp.PublishError)
        and isinstance(exc.frame, spec.Basic.Nack)
    )


async def _close_replaced(channel: Channel) -> None:
    """Close a publishing channel that was replaced. What is still in flight on it fails
    with a link error, so its publishers send it again on the new channel."""
    try:
        await asyncio.wait_for(
            channel.close(amqp.ChannelInvalidStateError("the publishing channel was replaced")),
            RPC_TIMEOUT,
        )
    except Exception as exc:  # closing is bookkeeping: the channel is out of use already
        log.debug("closing a replaced publishing channel: %s", describe(exc))


def _publish_task(channel: Channel, message: Entry) -> asyncio.Future[Any]:
    """``message`` published with aiormq's own ``basic_publish`` (a channel the fast path
    does not know): a task that ends with its confirm."""
    return asyncio.ensure_future(
        channel.basic_publish(  # type: ignore[call-arg]
            message.envelope.body,
            exchange=message.exchange,
            routing_key=message.routing_key,
            properties=properties(message.envelope),
            mandatory=message.mandatory,
            wait=False,
        )
    )


def _close_reason(channel: Channel) -> BaseException:
    """Why ``channel`` closed: the error aiormq closed it with."""
    closing = channel.closing
    if closing.done() and not closing.cancelled():
        reason = closing.exception()
        if reason is not None:
            return reason
    return ConnectionError("the channel closed")
