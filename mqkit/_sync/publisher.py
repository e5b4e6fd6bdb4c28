"""Confirmed publishing: one confirm-mode channel per client, owned by the IO thread.

Every publish of a client (producers, the event bus, retry and dead-letter copies, RPC
requests and replies, replays) goes through its :class:`Publisher`. A publishing thread turns
its messages into pika properties and waits on a :class:`Batch`. A lone message it sends
itself while the IO thread is idle (:meth:`~mqkit._sync.transport.Loop.run_here`), and reads
its confirm itself too (:class:`~mqkit._sync.transport.Reads`): one publish at a time then
costs one thread wake-up, the confirm's, as with pika's ``BlockingConnection``. Otherwise it
hands them to the IO thread, in chunks: the IO thread sends one while it builds the next.

What is in flight, and what each confirm, return, nack, closed channel or lost link does to
it, is the core's :class:`~mqkit.ledger.Ledger`, the same on both runtimes: this module only
sends what it says and tells it what pika reported (``basic.ack``/``basic.nack`` by delivery
tag, ``multiple`` included; ``basic.return`` by ``message_id``). In short: up to
:data:`~mqkit.publishing.CONFIRM_WINDOW` messages are in flight; a return fails its publish
with :class:`~mqkit.PublishUnroutable`; after a lost link the unconfirmed messages are sent
again on the new channel (at-least-once: a message whose confirm was lost may be stored
twice); a publisher that waits longer than ``confirm_timeout`` without progress gives up with
:class:`~mqkit.PublishTimeout` and its messages that were not sent yet are dropped.

**Nacks.** A ``basic.nack`` makes the publisher replace its channel (at most once per
:data:`mqkit.publishing.RENEW_INTERVAL`): RabbitMQ 3.10 nacks a channel's publishes to a
quorum queue for good once its first one landed during a leader election, and only a new
channel gets through. What was in flight on the old channel is sent again on the new one, as
after a lost link. A nacked message is sent once more on the new channel
(:func:`mqkit.publishing.retry_nacked`) and fails with :class:`~mqkit.PublishNacked` only if
it is nacked again (or no new channel can be had within ``confirm_timeout``).

**Size.** A message whose body is above ``max_message_size`` (:class:`~mqkit.publishing.SizeLimit`)
fails with :class:`~mqkit.PublishTooLarge` before it is sent. If the broker's own limit is
lower, the broker closes the channel over it: then only the messages in flight above the limit
it names fail, the others are sent again on a new channel, and the broker's limit is checked
from then on.

**Alarms.** The publisher's link is a connection of its own: while a memory or disk alarm
blocks it, publishes get no confirm and raise :class:`~mqkit.PublishTimeout` after
``confirm_timeout`` (saying why), and consumers, on the other connection, keep going.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial
from typing import Any

import pika.exceptions as pex
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from mqkit import explain, ledger
from mqkit.errors import ConnectionFailed, PublishTimeout
from mqkit.ledger import Entry, Job, Ledger, stall_cause
from mqkit.lifecycle import Pipeline
from mqkit.messages import Envelope
from mqkit.publishing import SEND_CHUNK

from .channel import open_on_io_thread
from .connection import Link, describe, reply_of, translate
from .transport import CORKED, Loop, Reads, cork, settle, streamline, wake
from .transport import Channel as BlockingChannel

__all__ = ["Batch", "Publisher", "properties"]


def properties(envelope: Envelope) -> BasicProperties:
    """pika properties for an envelope (built on the publishing thread, not the IO thread)."""
    return BasicProperties(
        content_type=envelope.content_type,
        delivery_mode=envelope.delivery_mode,
        message_id=envelope.message_id,
        timestamp=envelope.timestamp,
        type=envelope.type or None,
        app_id=envelope.app_id or None,
        headers=envelope.headers or None,
        correlation_id=envelope.correlation_id,
        reply_to=envelope.reply_to,
        priority=envelope.priority,
        expiration=None if envelope.expiration is None else str(envelope.expiration),
    )


class Batch(ledger.Batch):
    """Messages one thread waits on. Settled by the IO thread, read by the waiting thread."""

    __slots__ = ("_done",)

    def __init__(self, ids: list[str]) -> None:
        super().__init__(ids)
        # A lock held until the last settle: cheaper to make and wake than an Event, and a
        # batch has exactly one waiter.
        self._done = threading.Lock()
        if ids:
            self._done.acquire()

    def done(self) -> None:
        """IO thread: every message is settled."""
        wake(self._done.release)

    def wait(self, timeout: float) -> bool:
        """Wait until all are settled, as long as confirms keep coming at least every
        ``timeout`` seconds; ``False`` on a stall."""
        while True:
            seen = self.progress
            if self._done.acquire(timeout=timeout):
                self._done.release()
                return True
            if self.progress == seen:
                return False


class Publisher:
    """The client's confirm-mode channel. Thread-safe: any thread may call :meth:`publish`."""

    def __init__(self, link: Link, pipeline: Pipeline) -> None:
        self._link = link
        self._confirm_timeout = link.settings.confirm_timeout
        # IO thread (or a thread in its place), but for admit(), which only reads the limit
        self._ledger = Ledger(link.settings, pipeline)
        self._channel: Channel | None = None  # IO thread: open and in confirm mode
        self._opening = False
        self._facade: BlockingChannel | None = None  # the open channel, for RPC (IO thread)
        self._open_waiters: list[Future[None]] = []
        self._renewing: Channel | None = None  # a channel that nacked, to be replaced
        # Loop.run_here of the IO thread, once a channel is open (None: hand everything over)
        self._run_here: Callable[[Callable[[], bool]], bool] | None = None
        self._reads: Reads | None = None  # of the channel's socket, for a lone publish's wait

    def channel(self, timeout: float | None) -> BlockingChannel:
        """The publishing channel, opened within ``timeout`` seconds (default
        ``confirm_timeout``; else PublishTimeout) if it is not open: for direct reply-to,
        which consumes replies on the channel that publishes requests."""
        current = self._facade
        if current is not None and not current.is_closed and current.underlay is self._channel:
            return current
        wait = self._confirm_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait

        def timed_out() -> PublishTimeout:
            cause = stall_cause(self._link.blocked, self._link.last_error)
            return explain.confirm_timeout("publish", wait, cause or "not connected")

        if not self._link.wait_ready(wait):
            if self._link.closed:
                raise explain.closed("publishing")
            raise timed_out()
        try:
            self._link.call(
                self._open,
                max(0.001, deadline - time.monotonic()),
                what="open the publishing channel",
                wait_ready=False,
            )
        except pex.AMQPError as exc:
            raise translate(exc, what="open the publishing channel") from exc
        except ConnectionFailed:
            if not self._link.closed and deadline - time.monotonic() < 0.01:
                raise timed_out() from None  # no answer within this caller's time
            raise
        current = self._facade
        if current is None or current.is_closed:
            raise explain.link_lost("open the publishing channel", ledger.REPLACED)
        return current

    # -- publishing threads ------------------------------------------------------------------

    def publish(
        self,
        envelope: Envelope,
        *,
        exchange: str,
        routing_key: str,
        mandatory: bool = True,
        timeout: float | None = None,
        channel: BlockingChannel | None = None,
    ) -> None:
        """Publish one message and wait for its confirm (within ``timeout``, default
        ``confirm_timeout``); raises the :class:`~mqkit.PublishError` subclass that says why
        it was not confirmed. ``channel`` pins the publish to one channel (RPC): it is not
        sent again on another then."""
        if channel is not None and (channel is not self._facade or channel.is_closed):
            what = explain.publishing(envelope.message_id, exchange, routing_key)
            raise explain.link_lost(what, ledger.REPLACED)
        budget = self._confirm_timeout if timeout is None else timeout
        jobs = [(envelope, exchange, routing_key)]
        self._publish(jobs, mandatory, budget, pinned=channel is not None)

    def publish_many(self, jobs: Sequence[Job], *, mandatory: bool = True) -> None:
        """Publish ``(envelope, exchange, routing_key)`` jobs and wait for every confirm; on
        a failure, raises a :class:`~mqkit.PublishError` whose ``unconfirmed`` lists the ids
        not confirmed."""
        if not jobs:
            return
        self._publish(jobs, mandatory, self._confirm_timeout)

    def _publish(
        self, jobs: Sequence[Job], mandatory: bool, budget: float, *, pinned: bool = False
    ) -> None:
        batch = Batch([envelope.message_id for envelope, _, _ in jobs])
        # Messages too large fail in admit(), before the IO thread sees the batch (it settles
        # the others); pika's properties are built here, on this thread.
        chunk: list[Entry] = []
        admitted = self._ledger.admit(
            batch, jobs, mandatory=mandatory, properties=properties, pinned=pinned
        )
        for entry in admitted:
            chunk.append(entry)
            if len(chunk) >= SEND_CHUNK:  # let the IO thread start sending while we build the rest
                self._hand_over(chunk)
                chunk = []
        reads = self._hand_over(chunk, lone=len(jobs) == 1) if chunk else None
        if reads is None:
            confirmed = batch.wait(budget)
        else:  # a lone message sent in place: read its confirm here, not from the IO thread
            deadline = time.monotonic() + budget
            reads.wait(lambda: batch.remaining == 0, deadline)
            confirmed = batch.wait(max(0.0, deadline - time.monotonic()))
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

    def _hand_over(self, messages: list[Entry], *, lone: bool = False) -> Reads | None:
        """Hand ``messages`` to the IO thread, or send a ``lone`` message from this thread
        while the IO thread is idle: then this thread also takes the socket's reads, returned
        (the caller must wait with them). A batch stays with the IO thread, which sends one
        chunk while this thread builds the next (in place, this thread would do both)."""
        run_here = self._run_here
        if lone and run_here is not None:
            taken: list[Reads] = []
            if run_here(partial(self._send_here, messages, taken)):
                return taken[0] if taken else None
        self._link.submit(partial(self._enqueue, messages))
        return None

    def _send_here(self, messages: list[Entry], taken: list[Reads]) -> bool:
        """In place of the IO thread (:meth:`Loop.run_here`): send if the channel is open;
        if it went out, take the reads into ``taken``."""
        if self._channel is None:
            return False  # opening a channel is the IO thread's work
        self._enqueue(messages)
        reads = self._reads
        if reads is not None and not self._ledger.waiting and reads.take():
            taken.append(reads)
        return True

    # -- IO thread -------------------------------------------------------------------------

    def _enqueue(self, messages: list[Entry]) -> None:
        self._ledger.add(messages)
        self._pump()

    def _pump(self) -> None:
        """Send what is waiting, as the confirm window allows (opening the channel first)."""
        channel = self._channel
        if channel is None:
            self.reopen()
            return
        ledger = self._ledger
        publish = channel.basic_publish
        # A batch goes out in slices of CORKED messages, one write each; a lone message at once.
        uncork = cork(channel.connection) if len(ledger.waiting) > 1 else None
        try:
            count = 0
            while (entry := ledger.next_to_send()) is not None:
                try:
                    publish(
                        entry.exchange,
                        entry.routing_key,
                        entry.envelope.body,
                        entry.properties,
                        entry.mandatory,
                    )
                except pex.ChannelWrongStateError:
                    ledger.unsent([entry])  # the channel is closing: its close handler reopens
                    return
                except Exception as exc:
                    ledger.fail(entry, translate(exc, what=entry.what))
                    continue
                ledger.sent(entry)
                count += 1
                if uncork is not None and count % CORKED == 0:
                    uncork()
                    cork(channel.connection)
        finally:
            if uncork is not None:
                uncork()

    def _on_confirm(self, channel: Channel, frame: Any) -> None:
        if channel is not self._channel:
            return  # a replaced channel: what was in flight on it was sent again
        method = frame.method
        self._confirmed(
            channel, method.delivery_tag, method.multiple, isinstance(method, Basic.Nack)
        )

    def _on_confirms_read(
        self, channel_number: int, confirms: list[tuple[int, bool, bool]]
    ) -> bool:
        """The confirms of a read that held nothing else (:func:`streamline`): ``False`` if
        they are not this channel's (pika then hands them to whom they concern)."""
        channel = self._channel
        if channel is None or channel.channel_number != channel_number:
            return False
        for tag, multiple, nacked in confirms:
            if channel is not self._channel:
                break  # replaced after a nack: the rest were for it (pika's way: ignored)
            self._confirmed(channel, tag, multiple, nacked)
        return True

    def _confirmed(self, channel: Channel, tag: int, multiple: bool, nacked: bool) -> None:
        """``basic.ack`` (or ``basic.nack``) ``tag`` (``multiple``: and all before it)."""
        self._ledger.confirmed(tag, multiple, nacked)
        if nacked:
            self._renew_soon(channel)
        if self._ledger.waiting:
            self._pump()

    def _on_return(
        self, channel: Channel, method: Basic.Return, props: BasicProperties, _body: bytes
    ) -> None:
        if channel is not self._channel:
            return
        self._ledger.returned(props.message_id, f"{method.reply_code} {method.reply_text}")

    def _renew_soon(self, channel: Channel) -> None:
        """Replace ``channel``, which nacked, now or once the ledger's renewal allows."""
        pending = self._renewing is not None
        self._renewing = channel  # a renewal on the way (for a channel lost since) takes it
        if pending:
            return
        wait = self._ledger.renewal.wait()
        connection = self._link.connection
        if wait <= 0 or connection is None:
            self._renew()
        else:
            connection.ioloop.call_later(wait, self._renew)

    def _renew(self) -> None:
        """IO thread: close the channel that nacked and open another; what was in flight on
        it, and the nacked messages held for a retry, go first on the new one."""
        old, self._renewing = self._renewing, None
        if not self._ledger.renew(old is not None and old is self._channel) or old is None:
            self._pump()
            return
        self._channel = None
        with contextlib.suppress(pex.ChannelWrongStateError):  # closing already
            old.close()
        self.reopen()

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        if channel is not self._channel:
            return  # an old channel
        self._channel = None
        if self._link.closed:
            self._ledger.closed()
            return
        code, text = reply_of(reason)
        if code is None:  # not the broker's doing (the connection is gone: the link restores us)
            self._ledger.requeue(describe(reason))
        else:
            self._ledger.closed_by_broker(code, text)
            self.reopen()

    def reopen(self) -> None:
        """IO thread: open the confirm channel unless it is open or opening."""
        connection = self._link.connection
        if connection is not None:
            self._open(connection, None)

    def _open(self, connection: SelectConnection, future: Future[None] | None) -> None:
        """Open the confirm channel unless it is open or opening; ``future`` settles when
        it is ready (one channel at a time: confirms are tracked per channel)."""
        if future is not None:
            self._open_waiters.append(future)
        if self._channel is not None:
            self._settle_waiters(None)
            return
        if self._opening:
            return
        self._opening = True
        readied: list[Channel] = []

        def on_open(channel: Channel) -> None:
            channel.add_on_return_callback(self._on_return)
            channel.confirm_delivery(
                lambda frame: self._on_confirm(channel, frame),
                callback=lambda _frame: ready(channel),
            )

        def ready(channel: Channel) -> None:
            readied.append(channel)
            self._send_in_place(channel)
            self._opening = False
            self._channel = channel
            self._facade = BlockingChannel(self._link.submit, channel)
            self._ledger.opened()
            self._settle_waiters(None)
            self._pump()

        def on_close(channel: Channel, reason: BaseException) -> None:
            if not readied:  # closed before it was ready: this opening failed
                self._opening = False
                self._settle_waiters(reason)
                return
            self._on_channel_closed(channel, reason)

        open_on_io_thread(connection, on_open, on_close)

    def _send_in_place(self, channel: Channel) -> None:
        """IO thread: let publishing threads send on ``channel``'s connection themselves
        while the IO thread is idle (see :mod:`mqkit._sync.transport`)."""
        connection: Any = channel.connection
        streamline(connection, self._on_confirms_read)
        loop = connection.ioloop
        in_place = isinstance(loop, Loop) and loop.in_place
        self._run_here = loop.run_here if in_place else None
        self._reads = loop.reads(connection) if in_place else None

    def _settle_waiters(self, exc: BaseException | None) -> None:
        waiters, self._open_waiters = self._open_waiters, []
        for waiter in waiters:
            settle(waiter, exc=exc)

    # -- Restorable ------------------------------------------------------------------------

    def _link_lost(self, reason: BaseException) -> None:
        """IO thread: the connection is gone; what was in flight is sent again later."""
        self._channel = None
        self._opening = False
        self._settle_waiters(reason)
        if self._link.closed:
            self._ledger.closed()
        else:
            self._ledger.requeue(describe(reason))

    def _restore(self) -> None:
        """Open the confirm channel on the new connection, then send what is waiting."""
        self._link.call(
            self._open,
            self._link.settings.connect_timeout,
            what="open the publishing channel",
            wait_ready=False,
        )
