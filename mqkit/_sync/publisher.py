"""Confirmed publishing: one confirm-mode channel per client, owned by the IO thread.

Every publish of a client (producers, the event bus, retry and dead-letter copies, RPC
requests and replies, replays) goes through its :class:`Publisher`. A publishing thread turns
its messages into pika properties and waits on a :class:`Batch`. A lone message it sends
itself while the IO thread is idle (:meth:`~mqkit._sync.io_thread.Loop.run_here`), and reads
its confirm itself too (:class:`~mqkit._sync.io_thread.Reads`): one publish at a time then
costs one thread wake-up, the confirm's, as with pika's ``BlockingConnection``. Otherwise it
hands them to the IO thread, in chunks: the IO thread sends one while it builds the next.
Up to :data:`~mqkit.publishing.CONFIRM_WINDOW` messages are in flight; the IO thread matches
``basic.ack``/``basic.nack`` (``multiple`` included) by delivery tag and ``basic.return``
(which arrives before the ack of the same publish) by ``message_id``. A publish that fails
returned or nacked is reported to the pipeline (:class:`~mqkit.lifecycle.Returned`,
:class:`~mqkit.lifecycle.Nacked`).

When the link drops, messages in flight go back to the head of the queue and are sent again
on the new channel (at-least-once: a message whose confirm was lost may be stored twice); a
publisher that waits longer than ``confirm_timeout`` without progress gives up with
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
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

import pika.exceptions as pex
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from mqkit import explain
from mqkit._sync.channel import open_channel
from mqkit._sync.connection import Link, translate
from mqkit._sync.io_thread import Loop, Reads, settle, wake
from mqkit._sync.transport import streamline
from mqkit.errors import ConnectionFailed, MqkitError
from mqkit.lifecycle import Nacked, Pipeline, Returned
from mqkit.messages import Envelope
from mqkit.publishing import (
    CONFIRM_WINDOW,
    SEND_CHUNK,
    ChannelRenewal,
    SizeLimit,
    missing_exchange,
    retry_nacked,
)

__all__ = ["Batch", "Publisher", "properties"]

log = logging.getLogger("mqkit.publisher")


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


class Batch:
    """Messages one thread waits on. Settled by the IO thread, read by the waiting thread."""

    __slots__ = ("_done", "abandoned", "errors", "ids", "ok", "progress", "remaining")

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.remaining = len(ids)
        self.progress = 0
        self.ok = bytearray(len(ids))  # 1 once confirmed
        self.errors: dict[int, MqkitError] = {}
        self.abandoned = False
        # A lock held until the last settle: cheaper to make and wake than an Event, and a
        # batch has exactly one waiter.
        self._done = threading.Lock()
        if ids:
            self._done.acquire()

    def settle(self, index: int, error: MqkitError | None = None) -> None:
        """IO thread: message ``index`` was confirmed (or failed with ``error``)."""
        if error is None:
            self.ok[index] = 1
        else:
            self.errors[index] = error
        self.progress += 1
        self.remaining -= 1
        if self.remaining == 0:
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

    def unconfirmed(self) -> list[str]:
        """Ids of the messages not confirmed (failed or still open)."""
        return [mid for mid, ok in zip(self.ids, self.ok, strict=True) if not ok]


@dataclass(slots=True, eq=False)
class _Message:
    exchange: str
    routing_key: str
    body: bytes
    properties: BasicProperties
    mandatory: bool
    batch: Batch
    index: int
    tag: int = 0
    settled: bool = False
    returned: str | None = None
    nacks: int = 0
    held: bool = False  # nacked, waiting for a new channel to be sent again on


class Publisher:
    """The client's confirm-mode channel. Thread-safe: any thread may call :meth:`publish`."""

    def __init__(self, link: Link, pipeline: Pipeline) -> None:
        self._link = link
        self._pipeline = pipeline
        self._confirm_timeout = link.settings.confirm_timeout
        self._channel: Channel | None = None  # IO thread: open and in confirm mode
        self._opening = False
        self._waiting: deque[_Message] = deque()
        self._inflight: deque[_Message] = deque()  # sent, in delivery-tag order
        self._next_tag = 1
        self._hooks: list[Callable[[Channel], None]] = []
        self._open_waiters: list[Future[None]] = []
        self._held: list[_Message] = []  # nacked once: sent again on the next channel
        self._renewal = ChannelRenewal()
        self._renewing: Channel | None = None  # a channel that nacked, to be replaced
        self._limit = SizeLimit(link.settings.max_message_size)
        # Loop.run_here of the IO thread, once a channel is open (None: hand everything over)
        self._run_here: Callable[[Callable[[], bool]], bool] | None = None
        self._reads: Reads | None = None  # of the channel's socket, for a lone publish's wait

    @property
    def channel(self) -> Channel | None:
        """IO thread: the confirm channel, when open."""
        return self._channel

    def add_channel_hook(self, hook: Callable[[Channel], None]) -> None:
        """IO thread: run ``hook(channel)`` now (if open) and on every new channel, before
        anything is published on it (direct reply-to consumes on this channel)."""
        self._hooks.append(hook)
        if self._channel is not None:
            hook(self._channel)
        else:
            self.reopen()

    # -- publishing threads ------------------------------------------------------------------

    def publish(
        self,
        exchange: str,
        routing_key: str,
        envelopes: Sequence[Envelope],
        *,
        mandatory: bool = True,
        routing_keys: Sequence[str] | None = None,
    ) -> list[str]:
        """Publish and wait for every confirm; return the message ids.

        Raises the :class:`~mqkit.PublishError` subclass for a single message; for several,
        one whose ``unconfirmed`` lists the ids not confirmed.
        """
        batch = Batch([envelope.message_id for envelope in envelopes])
        # Messages too large fail here, before the IO thread sees the batch (it settles the
        # others); only the rest is sent.
        limit = self._limit.limit
        too_large = {i for i, envelope in enumerate(envelopes) if len(envelope.body) > limit}
        for index in too_large:
            key = routing_keys[index] if routing_keys is not None else routing_key
            envelope = envelopes[index]
            what = partial(explain.publishing, envelope.message_id, exchange, key)
            error = self._limit.check(len(envelope.body), what)
            assert error is not None
            batch.settle(index, error)
        chunk: list[_Message] = []
        for index, envelope in enumerate(envelopes):
            if index in too_large:
                continue
            key = routing_keys[index] if routing_keys is not None else routing_key
            chunk.append(
                _Message(
                    exchange,
                    key,
                    envelope.body,
                    properties(envelope),
                    mandatory,
                    batch,
                    index,
                )
            )
            if len(chunk) >= SEND_CHUNK:  # let the IO thread start sending while we build the rest
                self._hand_over(chunk)
                chunk = []
        reads = self._hand_over(chunk, lone=len(envelopes) == 1) if chunk else None
        if reads is None:
            confirmed = batch.wait(self._confirm_timeout)
        else:  # a lone message sent in place: read its confirm here, not from the IO thread
            deadline = time.monotonic() + self._confirm_timeout
            reads.wait(lambda: batch.remaining == 0, deadline)
            confirmed = batch.wait(max(0.0, deadline - time.monotonic()))
        if not confirmed:
            batch.abandoned = True
        if confirmed and not batch.errors:
            return batch.ids
        raise self._failure(batch, exchange, routing_key, timed_out=not confirmed)

    def _hand_over(self, messages: list[_Message], *, lone: bool = False) -> Reads | None:
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

    def _send_here(self, messages: list[_Message], taken: list[Reads]) -> bool:
        """In place of the IO thread (:meth:`Loop.run_here`): send if the channel is open;
        if it went out, take the reads into ``taken``."""
        if self._channel is None:
            return False  # opening a channel is the IO thread's work
        self._enqueue(messages)
        reads = self._reads
        if reads is not None and not self._waiting and reads.take():
            taken.append(reads)
        return True

    def _failure(
        self, batch: Batch, exchange: str, routing_key: str, *, timed_out: bool
    ) -> MqkitError:
        errors = list(batch.errors.values())
        unconfirmed = batch.unconfirmed()
        if timed_out:
            pending = len(unconfirmed) - len(errors)
            what = (
                explain.publishing(unconfirmed[-1], exchange, routing_key)
                if len(batch.ids) == 1
                else f"publish {pending} message(s) to {explain.target(exchange, routing_key)}"
            )
            blocked = self._link.blocked
            cause = explain.publishing_blocked(blocked) if blocked else self._link.last_error
            errors.append(explain.confirm_timeout(what, self._confirm_timeout, cause))
        return explain.many_failed(errors, total=len(batch.ids), unconfirmed=unconfirmed)

    # -- IO thread -------------------------------------------------------------------------

    def _enqueue(self, messages: list[_Message]) -> None:
        self._waiting.extend(messages)
        self._pump()

    def _pump(self) -> None:
        channel = self._channel
        if channel is None:
            self.reopen()
            return
        waiting, inflight = self._waiting, self._inflight
        publish = channel.basic_publish
        while waiting and len(inflight) < CONFIRM_WINDOW:
            message = waiting.popleft()
            if message.batch.abandoned:
                continue
            if len(message.body) > self._limit.limit:  # above the broker's limit, learned since
                self._fail_too_large(message)
                continue
            try:
                publish(
                    message.exchange,
                    message.routing_key,
                    message.body,
                    message.properties,
                    message.mandatory,
                )
            except pex.ChannelWrongStateError:
                waiting.appendleft(message)  # the channel is closing: its close handler reopens
                return
            except Exception as exc:
                message.batch.settle(message.index, translate(exc, what=_what(message)))
                continue
            message.tag = self._next_tag
            self._next_tag += 1
            inflight.append(message)

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
        inflight = self._inflight
        if not inflight:
            return
        if multiple:
            while inflight and inflight[0].tag <= tag:
                self._settle(inflight.popleft(), nacked)
        else:
            offset = tag - inflight[0].tag
            if 0 <= offset < len(inflight):
                self._settle(inflight[offset], nacked)
            while inflight and (inflight[0].settled or inflight[0].held):
                inflight.popleft()
        if nacked:
            self._renew_soon(channel)
        if self._waiting:
            self._pump()

    def _settle(self, message: _Message, nacked: bool) -> None:
        if message.settled or message.held:
            return
        if nacked:
            message.nacks += 1
            if not message.batch.abandoned and retry_nacked(
                message.nacks, self._renewal.wait(), self._confirm_timeout
            ):
                message.held = True
                message.returned = None
                self._held.append(message)
                return
        message.settled = True
        error: MqkitError | None = None
        if nacked:
            error = explain.nacked(_what(message))
        elif message.returned is not None:
            error = explain.unroutable(_what(message), message.returned)
        if error is not None:
            self._report(message, nacked)
        message.batch.settle(message.index, error)

    def _report(self, message: _Message, nacked: bool) -> None:
        """IO thread: tell the pipeline that ``message`` failed, nacked or returned."""
        message_id = message.properties.message_id or "?"
        service = self._link.settings.service
        if nacked:
            event: Nacked | Returned = Nacked(
                message.exchange, message.routing_key, message_id, service=service
            )
        else:
            event = Returned(
                message.exchange,
                message.routing_key,
                message_id,
                reply=message.returned or "",
                service=service,
            )
        self._pipeline.emit(event)

    def _renew_soon(self, channel: Channel) -> None:
        """Replace ``channel``, which nacked, now or once :class:`ChannelRenewal` allows."""
        pending = self._renewing is not None
        self._renewing = channel  # a renewal on the way (for a channel lost since) takes it
        if pending:
            return
        wait = self._renewal.wait()
        connection = self._link.connection
        if wait <= 0 or connection is None:
            self._renew()
        else:
            connection.ioloop.call_later(wait, self._renew)

    def _renew(self) -> None:
        """IO thread: close the channel that nacked and open another; what was in flight on
        it, and the nacked messages held for a retry, go first on the new one."""
        old, self._renewing = self._renewing, None
        if old is None or old is not self._channel:
            # Lost (with the link, or closed by the broker) meanwhile: it was replaced
            # anyway, and what it held was put back in line then.
            self._release_held()
            self._pump()
            return
        self._renewal.renewed()
        log.warning(
            "the broker nacked a publish; replacing the publishing channel (a quorum "
            "queue may have elected a new leader)"
        )
        self._channel = None
        self._requeue_inflight()
        with contextlib.suppress(pex.ChannelWrongStateError):  # closing already
            old.close()
        self.reopen()

    def _on_return(
        self, channel: Channel, method: Basic.Return, props: BasicProperties, _body: bytes
    ) -> None:
        if channel is not self._channel:
            return
        message_id = props.message_id
        for message in self._inflight:
            if (
                not message.settled
                and not message.held
                and message.returned is None
                and message.properties.message_id == message_id
            ):
                message.returned = f"{method.reply_code} {method.reply_text}"
                return

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        if channel is not self._channel:
            return  # an old channel
        self._channel = None
        if self._link.closed:
            self._fail_all(ConnectionFailed("the mqkit client was closed before the confirm"))
            return
        if not isinstance(reason, pex.ChannelClosedByBroker):
            self._requeue_inflight()  # the connection is gone: the link restores us
            return
        if self._limit.refused(reason.reply_text) is not None:
            self._refused_too_large()
            return
        log.warning("the broker closed the publishing channel: %s", reason)
        # A missing exchange fails the messages to it (sent or not); the others go again on a
        # new channel. Any other reason cannot be pinned on one message: all sent ones fail.
        missing = missing_exchange(reason.reply_code, reason.reply_text)
        for message in (*self._inflight, *(self._waiting if missing else ())):
            if message.settled or message.held:
                continue
            if missing is None or message.exchange == missing:
                message.settled = True
                message.batch.settle(message.index, translate(reason, what=_what(message)))
        self._requeue_inflight()
        self._waiting = deque(m for m in self._waiting if not m.settled)
        self.reopen()

    def _refused_too_large(self) -> None:
        """IO thread: the broker closed the channel over a message above its size limit (now
        :attr:`_limit`). Fail the messages in flight above it, send the others again."""
        limit = self._limit.limit
        log.warning(
            "the broker refused a message above its max_message_size (%d bytes); failing "
            "the messages above it, sending the others again on a new channel (set "
            "max_message_size=%d to fail such messages before sending them)",
            limit,
            limit,
        )
        for message in self._inflight:
            if not message.settled and not message.held and len(message.body) > limit:
                self._fail_too_large(message)
        self._requeue_inflight()
        self.reopen()

    def _fail_too_large(self, message: _Message) -> None:
        message.settled = True
        error = self._limit.check(len(message.body), lambda: _what(message))
        assert error is not None
        message.batch.settle(message.index, error)

    def _requeue_inflight(self) -> None:
        """Put what was in flight, and the nacked messages held for a retry, back at the
        head of the line (they go first on the next channel)."""
        survivors = [m for m in self._inflight if not m.settled and not m.held]
        for message in survivors:
            message.returned = None
        self._inflight.clear()
        self._waiting.extendleft(reversed(survivors))
        self._release_held()

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for message in held:
            message.held = False
        self._waiting.extendleft(reversed([m for m in held if not m.settled]))

    def _fail_all(self, error: MqkitError) -> None:
        for message in (*self._held, *self._inflight, *self._waiting):
            if not message.settled:
                message.settled = True
                message.batch.settle(message.index, error)
        self._held.clear()
        self._inflight.clear()
        self._waiting.clear()

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
            self._next_tag = 1
            for hook in self._hooks:
                hook(channel)
            self._settle_waiters(None)
            self._pump()

        def on_close(channel: Channel, reason: BaseException) -> None:
            if not readied:  # closed before it was ready: this opening failed
                self._opening = False
                self._settle_waiters(reason)
                return
            self._on_channel_closed(channel, reason)

        open_channel(connection, on_open, on_close)

    def _send_in_place(self, channel: Channel) -> None:
        """IO thread: let publishing threads send on ``channel``'s connection themselves
        while the IO thread is idle (see :mod:`mqkit._sync.io_thread`)."""
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
            self._fail_all(ConnectionFailed("the mqkit client was closed before the confirm"))
        else:
            self._requeue_inflight()

    def _restore(self) -> None:
        """Open the confirm channel on the new connection, then send what is waiting."""
        self._link.call(
            self._open,
            self._link.settings.connect_timeout,
            what="open the publishing channel",
            wait_ready=False,
        )


def _what(message: _Message) -> str:
    return explain.publishing(
        message.properties.message_id or "?", message.exchange, message.routing_key
    )
