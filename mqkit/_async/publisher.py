"""Confirmed publishing for the asyncio runtime: one channel with publisher confirms (and
mandatory returns raised) per client, shared by producers, consumers' retry and dead-letter
copies, RPC and dead-letter replays.

``publish`` waits for its confirm; while the link is down it waits for the link (within
``confirm_timeout``) and sends again what the link lost (at-least-once). ``publish_many``
keeps up to :data:`~mqkit.publishing.CONFIRM_WINDOW` confirms in flight and hands the writer
:data:`~mqkit.publishing.SEND_CHUNK` publishes per write. A publish that fails returned or
nacked is reported to the pipeline (:class:`~mqkit.lifecycle.Returned`,
:class:`~mqkit.lifecycle.Nacked`).

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
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timezone
from functools import partial
from typing import Any

import aiormq
import aiormq.abc
import aiormq.exceptions as amqp
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.header import ContentHeader

from mqkit import explain
from mqkit.errors import ConnectionFailed, MqkitError, PublishError, PublishTimeout
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

from .channel import open_underlay
from .connection import (
    AMQP_ERRORS,
    RPC_TIMEOUT,
    Link,
    cancelling,
    describe,
    reply_of,
    reply_text,
    returned_reply,
    translate,
)

__all__ = ["Publisher", "properties"]

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


class Publisher:
    """The client's confirm-mode channel and what is sent on it. Safe to share across
    tasks."""

    def __init__(self, link: Link, pipeline: Pipeline) -> None:
        self._link = link
        self._pipeline = pipeline
        self._confirm_timeout = link.settings.confirm_timeout
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._renewal = ChannelRenewal()
        self._renew_lock = asyncio.Lock()
        self._background: set[asyncio.Future[None]] = set()
        self._limit = SizeLimit(link.settings.max_message_size)

    def _why(self, default: str | None = None) -> str | None:
        """Why confirms do not come, when known: the broker blocks publishing, or the link's
        last error (else ``default``)."""
        blocked = self._link.blocked
        if blocked is not None:
            return explain.publishing_blocked(blocked)
        return self._link.last_error or default

    async def _renew(self, nacked_on: aiormq.abc.AbstractChannel) -> None:
        """Replace the publishing channel ``nacked_on``, which nacked a publish, now or once
        :class:`~mqkit.publishing.ChannelRenewal` allows; the next publish opens another.

        Publishes in flight on it fail as if the link was lost (and are sent again); callers
        that nacked at once wait for one replacement.
        """
        async with self._renew_lock:
            if self._channel is not nacked_on:
                return  # replaced already (another nack, or a new connection)
            wait = self._renewal.wait()
            if wait > 0:
                await asyncio.sleep(wait)
                if self._channel is not nacked_on:
                    return
            self._renewal.renewed()
            log.warning(
                "the broker nacked a publish; replacing the publishing channel (a quorum "
                "queue may have elected a new leader)"
            )
            self._channel = None
            self._spawn(_close_replaced(nacked_on))

    # -- Restorable --------------------------------------------------------------------------

    def _link_lost(self, reason: BaseException) -> None:
        """The connection is gone: so is the channel; what was in flight is sent again."""
        self._channel = None

    async def _restore(self) -> None:
        """Nothing to do: the next publish opens the channel on the new connection."""

    def _renew_later(self, nacked_on: aiormq.abc.AbstractChannel) -> None:
        self._spawn(self._renew(nacked_on))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def channel(self, timeout: float | None) -> aiormq.abc.AbstractChannel:
        """The publishing channel (confirms on, returns raise), replaced if it closed (a
        channel error, or a new connection)."""
        current = self._channel
        if current is not None and not current.is_closed:
            return current
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        def timed_out() -> PublishTimeout:
            return explain.confirm_timeout(
                "publish",
                self._confirm_timeout if timeout is None else timeout,
                self._why("not connected"),
            )

        # Another publish may be opening the channel on a link that does not answer: wait
        # for it no longer than this publish may take.
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
            self._channel = await open_underlay(self._link, confirms=True, timeout=left())
            return self._channel
        finally:
            self._lock.release()

    async def publish(
        self,
        envelope: Envelope,
        *,
        exchange: str,
        routing_key: str,
        mandatory: bool = True,
        timeout: float | None = None,
        channel: aiormq.abc.AbstractChannel | None = None,
    ) -> None:
        """Publish and wait for the broker's confirm.

        While the link is down this waits for it (within ``timeout``, default
        ``confirm_timeout``); a publish whose confirm was lost with the link is sent again on
        the new one (at-least-once), and so is a nacked one, once, on a new channel.
        ``channel`` pins the publish to one channel (RPC): neither is sent again then.
        """
        budget = self._confirm_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        props = properties(envelope)
        # The words for errors are built only when there is an error (this is the hot path).
        what = partial(explain.publishing, envelope.message_id, exchange, routing_key)
        nacks = 0
        if self._link.closed or not self._link.opened:
            self._link.require_open(what())
        too_large = self._limit.check(len(envelope.body), what, [envelope.message_id])
        if too_large is not None:
            raise too_large
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise explain.confirm_timeout(
                    what(), budget, self._why(), unconfirmed=[envelope.message_id]
                )
            try:
                ch = channel or await self.channel(left)
            except PublishTimeout:
                raise explain.confirm_timeout(
                    what(), budget, self._why(), unconfirmed=[envelope.message_id]
                ) from None
            except ConnectionFailed:
                if self._link.closed:
                    raise
                await asyncio.sleep(0.05)  # lost again while opening the channel: wait on
                continue
            try:
                await ch.basic_publish(  # type: ignore[call-arg]
                    envelope.body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=props,
                    mandatory=mandatory,
                    timeout=max(0.001, deadline - time.monotonic()),
                    wait=False,
                )
                return
            except asyncio.CancelledError:
                if cancelling():
                    raise
                lost: BaseException = ConnectionFailed("the channel closed")
            except asyncio.TimeoutError:
                why = explain.publishing_blocked(self._link.blocked) if self._link.blocked else None
                raise explain.confirm_timeout(
                    what(), budget, why, unconfirmed=[envelope.message_id]
                ) from None
            except AMQP_ERRORS as exc:
                if _nacked(exc):
                    nacks += 1
                    left = deadline - time.monotonic()
                    if channel is None and retry_nacked(nacks, self._renewal.wait(), left):
                        await self._renew(ch)
                        continue
                    self._renew_later(ch)
                if _refused_size(exc, self._limit):
                    # Ours, if above the broker's limit; else another publish's refusal closed
                    # the channel under this one: it goes again on a new channel.
                    too_large = self._limit.check(len(envelope.body), what, [envelope.message_id])
                    if too_large is not None:
                        raise too_large from exc
                elif _broker_refused(exc, exchange):
                    self._report(exc, exchange, routing_key, envelope.message_id)
                    mapped = translate(exc, what=what())
                    if isinstance(mapped, PublishError):
                        mapped.unconfirmed = [envelope.message_id]
                    raise mapped from exc
                lost = exc
            if channel is not None:
                raise translate(lost, what=what()) from lost
            log.debug("%s: %s; will send it again", what(), describe(lost))
            await asyncio.sleep(0.05)  # let the link notice the loss before waiting on it

    async def publish_many(
        self,
        jobs: Sequence[tuple[Envelope, str, str]],
        *,
        mandatory: bool = True,
    ) -> None:
        """Publish ``(envelope, exchange, routing_key)`` jobs with a window of confirms in
        flight; raise a :class:`PublishError` whose ``unconfirmed`` lists what failed.

        What the link loses is sent again once it is back (at-least-once), within one
        ``confirm_timeout`` from the first loss; what is left then is a PublishTimeout. A
        nacked job is sent once more on a new channel before it counts as nacked.
        """
        if not jobs:
            return
        self._link.require_open("publishing")
        budget = self._confirm_timeout
        failures: dict[int, BaseException] = {}
        nacks: dict[int, int] = {}
        limit = self._limit.limit
        todo = [i for i, (envelope, _, _) in enumerate(jobs) if len(envelope.body) <= limit]
        if len(todo) < len(jobs):  # the ones too large fail without being sent
            for index in sorted(set(range(len(jobs))) - set(todo)):
                error = self._limit.check(len(jobs[index][0].body), partial(_what, jobs[index]))
                assert error is not None
                failures[index] = error
        deadline: float | None = None
        while todo:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not await self._link.wait_ready(left):
                    for index in todo:
                        failures[index] = explain.confirm_timeout(
                            _what(jobs[index]), budget, self._why("link lost")
                        )
                    break
            try:
                channel = await self.channel(budget if deadline is None else left)
            except PublishTimeout as exc:
                for index in todo:
                    failures[index] = exc
                break
            except ConnectionFailed:
                if self._link.closed:
                    raise
                deadline = deadline or time.monotonic() + budget
                await asyncio.sleep(0.05)
                continue
            send = self._pipelined if _can_pipeline(channel) else self._window
            lost = await send(channel, jobs, todo, mandatory, failures)
            nacked = [i for i in todo if i in failures and _nacked(failures[i])]
            again: list[int] = []  # nacked once: sent again on a new channel
            if nacked:
                deadline = deadline or time.monotonic() + budget
                left = deadline - time.monotonic()
                for index in nacked:
                    nacks[index] = nacks.get(index, 0) + 1
                    if retry_nacked(nacks[index], self._renewal.wait(), left):
                        del failures[index]
                        again.append(index)
                if again:
                    await self._renew(channel)
                else:
                    self._renew_later(channel)
            if lost and deadline is None:
                deadline = time.monotonic() + budget
            if lost:
                log.debug("%d publishes lost with the link; sending them again", len(lost))
                await asyncio.sleep(0.05)  # let the link notice the loss before waiting on it
            todo = sorted(lost + again)
        if failures:
            for index, failure in failures.items():
                envelope, exchange, routing_key = jobs[index]
                self._report(failure, exchange, routing_key, envelope.message_id)
            raise _many_error(jobs, failures, budget, self._why())

    def _report(self, exc: BaseException, exchange: str, routing_key: str, message_id: str) -> None:
        """Tell the pipeline that a publish failed returned or nacked (``exc``); other
        failures are not reported."""
        service = self._link.settings.service
        if isinstance(exc, amqp.PublishError):
            reply = returned_reply(exc)
            self._pipeline.emit(
                Returned(exchange, routing_key, message_id, reply=reply, service=service)
            )
        elif _nacked(exc):
            self._pipeline.emit(Nacked(exchange, routing_key, message_id, service=service))

    async def _window(
        self,
        channel: aiormq.abc.AbstractChannel,
        jobs: Sequence[tuple[Envelope, str, str]],
        todo: Sequence[int],
        mandatory: bool,
        failures: dict[int, BaseException],
    ) -> list[int]:
        """One pass over ``todo`` on ``channel``; the indexes the link lost."""
        budget = self._confirm_timeout
        loop = asyncio.get_running_loop()
        lost: list[int] = []
        inflight: deque[tuple[int, asyncio.Future[Any]]] = deque()

        async def drain(count: int) -> None:
            await _drain(inflight, count, budget, jobs, failures, lost, self._limit)

        try:
            for position, index in enumerate(todo):
                if len(inflight) >= CONFIRM_WINDOW:
                    await drain(SEND_CHUNK)
                if channel.is_closed:
                    lost.extend(todo[position:])
                    break
                envelope, exchange, routing_key = jobs[index]
                task = loop.create_task(
                    channel.basic_publish(  # type: ignore[call-arg]
                        envelope.body,
                        exchange=exchange,
                        routing_key=routing_key,
                        properties=properties(envelope),
                        mandatory=mandatory,
                        wait=False,
                    )
                )
                inflight.append((index, task))
            await drain(len(inflight))
        finally:
            for _, pending in inflight:  # only when cancelled: do not leave publishes behind
                pending.cancel()
        return sorted(lost)

    async def _pipelined(
        self,
        channel: aiormq.abc.AbstractChannel,
        jobs: Sequence[tuple[Envelope, str, str]],
        todo: Sequence[int],
        mandatory: bool,
        failures: dict[int, BaseException],
    ) -> list[int]:
        """Like :meth:`_window`, but hands the writer ``SEND_CHUNK`` publishes at a time (one
        write, one lock, no task per message); confirms are tracked by aiormq as usual."""
        budget = self._confirm_timeout
        lost: list[int] = []
        inflight: deque[tuple[int, asyncio.Future[Any]]] = deque()

        async def drain(count: int) -> None:
            await _drain(inflight, count, budget, jobs, failures, lost, self._limit)

        position = 0
        while position < len(todo):
            if len(inflight) >= CONFIRM_WINDOW:
                await drain(SEND_CHUNK)
            if channel.is_closed:
                lost.extend(todo[position:])
                break
            chunk = todo[position : position + SEND_CHUNK]
            try:
                inflight.extend(await _send_batch(channel, jobs, chunk, mandatory))
            except AMQP_ERRORS:
                lost.extend(todo[position:])
                break
            position += len(chunk)
        await drain(len(inflight))
        return sorted(lost)


async def _drain(
    inflight: deque[tuple[int, asyncio.Future[Any]]],
    count: int,
    budget: float,
    jobs: Sequence[tuple[Envelope, str, str]],
    failures: dict[int, BaseException],
    lost: list[int],
    limit: SizeLimit,
) -> None:
    """Wait (up to ``budget`` seconds) for the oldest ``count`` confirms in flight: a refusal
    goes to ``failures``, a publish the link lost to ``lost``, no confirm is a timeout.
    The broker closing the channel over a message too large fails the ones above its limit
    (``limit`` learns it); the others are lost (sent again)."""
    batch = [inflight.popleft() for _ in range(min(count, len(inflight)))]
    if not batch:  # nothing was sent (the channel was closing): nothing to wait for
        return
    _, pending = await asyncio.wait([future for _, future in batch], timeout=budget)
    for future in pending:
        future.cancel()
    if pending:
        await asyncio.wait(pending)  # a cancelled publish task still has to unwind
    for index, future in batch:
        if future.cancelled():
            failures[index] = asyncio.TimeoutError()
            continue
        exc = future.exception()
        if exc is None:
            continue
        if _refused_size(exc, limit):
            too_large = limit.check(len(jobs[index][0].body), partial(_what, jobs[index]))
            if too_large is not None:
                failures[index] = too_large
            else:
                lost.append(index)
        elif _broker_refused(exc, jobs[index][1]):
            failures[index] = exc
        else:
            lost.append(index)


_PIPELINE_ATTRS = (
    "confirmations",
    "create_future",
    "delivery_tag",
    "lock",
    "message_id_delivery_tag",
    "number",
    "publisher_confirms",
    "write_queue",
    "_split_body",
    "_Channel__close_event",
)


def _can_pipeline(channel: Any) -> bool:
    """Whether ``channel`` is the aiormq 7 channel whose confirm bookkeeping we know."""
    return (
        isinstance(channel, aiormq.Channel)
        and all(hasattr(channel, name) for name in _PIPELINE_ATTRS)
        and bool(channel.publisher_confirms)
    )


def _forget(registry: dict[str, int], message_id: str, tag: int, _: Any) -> None:
    if registry.get(message_id) == tag:
        registry.pop(message_id, None)


async def _send_batch(
    channel: Any,
    jobs: Sequence[tuple[Envelope, str, str]],
    chunk: Sequence[int],
    mandatory: bool,
) -> list[tuple[int, asyncio.Future[Any]]]:
    """Publish ``chunk`` in one write, registering each confirm the way aiormq's own
    ``basic_publish`` does (delivery tag, confirmation future, message id for returns)."""
    frames: list[Any] = []
    sent: list[tuple[int, asyncio.Future[Any]]] = []
    async with channel.lock:
        # The broker closed the channel and aiormq answered close-ok, but is_closed (which
        # the lock checks) lags behind: a publish frame sent now would make the broker close
        # the whole connection (504 CHANNEL_ERROR).
        if channel._Channel__close_event.is_set():
            raise amqp.ChannelInvalidStateError(f"{channel!r} is closing")
        first = channel.delivery_tag
        for index in chunk:
            envelope, exchange, routing_key = jobs[index]
            channel.delivery_tag += 1
            tag = channel.delivery_tag
            future = channel.create_future()
            channel.confirmations[tag] = future
            channel.message_id_delivery_tag[envelope.message_id] = tag
            future.add_done_callback(
                partial(_forget, channel.message_id_delivery_tag, envelope.message_id, tag)
            )
            frames.append(
                spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
            )
            frames.append(
                ContentHeader(properties=properties(envelope), body_size=len(envelope.body))
            )
            frames.extend(channel._split_body(envelope.body))
            sent.append((index, future))
        try:
            await channel.write_queue.put(
                ChannelFrame.marshall(channel_number=channel.number, frames=frames)
            )
        except BaseException:
            # Never handed to the writer: undo, or the channel's confirm numbering is off.
            for offset, (_, future) in enumerate(sent, start=first + 1):
                channel.confirmations.pop(offset, None)
                future.cancel()
            channel.delivery_tag = first
            raise
    return sent


def _what(job: tuple[Envelope, str, str]) -> str:
    envelope, exchange, routing_key = job
    return explain.publishing(envelope.message_id, exchange, routing_key)


def _nacked(exc: BaseException) -> bool:
    """Whether ``exc`` is the broker's ``basic.nack`` of a publish (not a return)."""
    return (
        isinstance(exc, amqp.DeliveryError)
        and not isinstance(exc, amqp.PublishError)
        and isinstance(exc.frame, spec.Basic.Nack)
    )


async def _close_replaced(channel: aiormq.abc.AbstractChannel) -> None:
    """Close a publishing channel that was replaced. What is still in flight on it fails
    with a link error, so its publishers send it again on the new channel."""
    try:
        await asyncio.wait_for(
            channel.close(amqp.ChannelInvalidStateError("the publishing channel was replaced")),
            RPC_TIMEOUT,
        )
    except Exception as exc:  # closing is bookkeeping: the channel is out of use already
        log.debug("closing a replaced publishing channel: %s", describe(exc))


def _refused_size(exc: BaseException, limit: SizeLimit) -> bool:
    """Whether ``exc`` is the broker closing the channel over a message above its size limit
    (which ``limit`` then learns)."""
    return isinstance(exc, amqp.AMQPChannelError) and limit.refused(reply_text(exc)) is not None


def _broker_refused(exc: BaseException, exchange: str) -> bool:
    """A definitive answer about this message (not a lost link): returned, nacked, or the
    exchange it was sent to does not exist."""
    if isinstance(exc, amqp.DeliveryError):
        return True
    if isinstance(exc, amqp.ChannelNotFoundEntity):
        # Any publish in flight on a channel the broker closed gets that channel's error;
        # only the one naming our exchange is about us. The rest go again.
        return missing_exchange(*reply_of(exc)) == exchange
    return isinstance(exc, amqp.AMQPChannelError) and not isinstance(
        exc, amqp.ChannelNotFoundEntity
    )


def _many_error(
    jobs: Sequence[tuple[Envelope, str, str]],
    failures: dict[int, BaseException],
    budget: float,
    why: str | None = None,
) -> MqkitError:
    errors: list[MqkitError] = []
    for index in sorted(failures):
        exc = failures[index]
        if isinstance(exc, asyncio.TimeoutError):
            errors.append(explain.confirm_timeout(_what(jobs[index]), budget, why))
        else:
            errors.append(translate(exc, what=_what(jobs[index])))
    ids = [jobs[i][0].message_id for i in sorted(failures)]
    return explain.many_failed(errors, total=len(jobs), unconfirmed=ids)
