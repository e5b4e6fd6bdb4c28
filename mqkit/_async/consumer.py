"""Consuming on aio-pika: the event loop receives, worker tasks run handlers, acks are batched.

Each consumer has its own channel (its prefetch is per channel) and ``concurrency`` worker
tasks that take deliveries from a local buffer. What happens to a delivery is decided by the
core (:mod:`mqkit.delivery`, :mod:`mqkit.retry`); this module only does the I/O: it acks
finished deliveries in batches (``multiple=True`` over the contiguous finished prefix, flushed
when the batch fills, when the workers go idle, on a short timer, and before ``stop``
returns), publishes retry and dead-letter copies (confirmed) before acking the original, and
returns prefetched-but-unstarted deliveries to the queue on ``stop``.

What happened is reported to the pipeline (:mod:`mqkit.lifecycle`): attached, detached (stopped
or lost), a body that does not decode, and how each delivery ended (handled, retried,
dead-lettered), after its ack.

A connection loss makes in-progress deliveries stale (their channel is gone, the broker
redelivers them): their acks are dropped. The link restores the consumer on the new
connection (basic.qos and basic.consume again) and it counts as attached once consume-ok
arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from functools import partial
from typing import Any, Generic, TypeVar

import aiormq.abc
import aiormq.exceptions as amqp
import tenacity
from pydantic import BaseModel

from mqkit import explain
from mqkit.acks import ACK, REJECT, REQUEUE, Settle
from mqkit.backoff import LINK_BACKOFF
from mqkit.consumers import ConsumerPlan, StopClock
from mqkit.context import Context
from mqkit.correlation import handling
from mqkit.delivery import follow_up, format_traceback, prepare
from mqkit.errors import ConnectionFailed, MqkitError
from mqkit.handlers import is_async_handler
from mqkit.lifecycle import (
    ConsumerAttached,
    ConsumerDetached,
    Pipeline,
    Undecodable,
    delivery_of,
    outcome_event,
)
from mqkit.messages import Incoming
from mqkit.middleware import NO_MIDDLEWARE, MiddlewareStack
from mqkit.retry import Ack, GiveUp, Outcome, decide

from .acks import Acks
from .channel import close_channel, incoming_of, open_channel
from .connection import RPC_ERRORS, RPC_TIMEOUT, Link, cancelling, describe, translate
from .declarer import Declarer
from .publisher import Publisher

__all__ = ["AsyncConsumer", "Handler", "ReplyStep", "as_async", "cancelling"]

log = logging.getLogger("mqkit.consumer")

T = TypeVar("T", bound=BaseModel)
Handler = Callable[[T, Context], Awaitable[Any]]
# Instead of running the handler, a responder runs this (it replies and never raises).
ReplyStep = Callable[[Incoming, Any, Context, "GiveUp | None"], Awaitable[None]]

_ACK, _REQUEUE, _REJECT = ACK, REQUEUE, REJECT
_ACKED = Ack()
ACK_DELAY = 0.05  # seconds a finished delivery may wait for its (batched) ack


def as_async(handler: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """``handler`` as an ``async`` callable.

    An ``async def`` handler (an object with an ``async def __call__``, a partial of either:
    :func:`mqkit.handlers.is_async_handler`) is returned as it is and awaited on the loop.
    A plain function runs in a worker thread of its own for each call (with a copy of the
    caller's context variables), so a handler that blocks (a database driver,
    ``time.sleep``) never freezes the event loop; the thread is a daemon, so one that never
    returns does not keep the process alive. If it returns an awaitable, that is awaited on
    the loop.
    """
    if is_async_handler(handler):
        return handler

    async def run(*args: Any) -> Any:
        result = await _in_thread(handler, *args)
        if inspect.isawaitable(result):
            return await result
        return result

    return run


def _in_thread(function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Call ``function(*args)`` on a new daemon thread; its outcome as a future of this loop.

    Not ``asyncio.to_thread``: the loop's default executor also resolves host names for
    reconnects, and its threads are joined at exit, so a stuck handler would hold both up.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: Any = None, exc: BaseException | None = None) -> None:
        if future.done():  # cancelled: the consumer stopped waiting for this handler
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result = context.run(function, *args)
        except BaseException as exc:  # handed to the awaiting task, which decides
            outcome = partial(settle, exc=exc)
        else:
            outcome = partial(settle, result)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(outcome)

    threading.Thread(target=target, name="mqkit-handler", daemon=True).start()
    return future


class AsyncConsumer(Generic[T]):
    """Consumes ``T`` messages from a queue and awaits ``handler(message, ctx)`` for each.

    Returning normally acks; raising retries per the :class:`~mqkit.RetryPolicy` (the broker
    holds the message in a retry queue), then dead-letters to ``f"{queue}.dlq"``;
    :class:`~mqkit.Reject` dead-letters at once. A body that does not decode is dead-lettered
    at once; the consumer keeps running whatever the handler does. Not started until
    :meth:`start` (or ``async with consumer:``, or :meth:`run`).

    Made by :meth:`AsyncClient.consumer`, :meth:`AsyncClient.responder` and
    :meth:`AsyncEventBus.subscribe`; the constructor's arguments are internal.
    """

    def __init__(
        self,
        link: Link,
        declarer: Declarer,
        publisher: Publisher,
        pipeline: Pipeline,
        plan: ConsumerPlan,
        handler: Handler[T],
        *,
        reply: ReplyStep | None = None,
        middleware: MiddlewareStack = NO_MIDDLEWARE,
    ) -> None:
        self._link = link
        self._declarer = declarer
        self._publisher = publisher
        self._pipeline = pipeline
        self._plan = plan
        self._handler = middleware.wrap_async(as_async(handler))
        self._reply = reply
        self._start_lock = asyncio.Lock()  # two tasks may start it at once (a bus, client.run())
        self._ready: deque[tuple[Acks, aiormq.abc.DeliveredMessage]] = deque()
        self._workers: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._started = False
        self._stopping = False
        self._session: Acks | None = None  # the current channel's deliveries
        self._batch = max(1, plan.prefetch // 4)
        self._idle_flush = max(1, plan.prefetch // 2)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._background: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._attach_lock = asyncio.Lock()
        self._reattacher: asyncio.Task[None] | None = None
        self._stopper: asyncio.Task[None] | None = None

    def __await__(self) -> Generator[None, None, AsyncConsumer[T]]:
        """``await client.consumer(...)`` works too. Making one does no I/O, so the client
        returns it directly; awaiting it gives the same object, for code that awaits every
        AsyncClient method."""
        return self
        yield  # a generator that returns at once

    def __repr__(self) -> str:
        return f"<AsyncConsumer queue={self._plan.queue!r} started={self._started}>"

    # -- properties --------------------------------------------------------------------------

    @property
    def queue(self) -> str:
        """The queue's name."""
        return self._plan.queue

    @property
    def started(self) -> bool:
        """Whether :meth:`start` ran and :meth:`stop` did not (:meth:`AsyncClient.run` starts
        only the consumers that are not started)."""
        return self._started

    @property
    def ever_started(self) -> bool:
        """Whether :meth:`start` ever succeeded (:meth:`AsyncClient.close` warns about a consumer
        made on it that never was)."""
        return self._started or self._stopped.is_set()

    @property
    def attached(self) -> bool:
        """Whether the broker is delivering to this consumer right now (``False`` while the
        client reconnects; a readiness probe wants it ``True``, see ``health()``)."""
        return self._session is not None and self._session.alive

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Declare the queue's topology and start consuming; returns once consume-ok
        arrived. Idempotent."""
        if self._started:
            return
        async with self._start_lock:
            if not self._started:
                await self._start()

    async def _start(self) -> None:
        await self._declarer.declare(self._plan.entities)
        self._stopping = False
        self._stopped.clear()
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work()) for _ in range(self._plan.concurrency)]
        self._link.register(self)
        try:
            await self._attach(again=False, wait_ready=True)
        except BaseException:
            self._link.unregister(self)
            for worker in self._workers:
                worker.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
            self._workers = []
            raise
        self._started = True

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop taking deliveries, let running handlers finish and ack, and return prefetched
        messages no handler started to the queue. Idempotent."""
        if not self._started:
            return
        if self._stopper is None:
            self._stopper = asyncio.get_running_loop().create_task(self._stop(timeout))
        await asyncio.shield(self._stopper)

    async def run(self) -> None:
        """Start, then wait until :meth:`stop` is called (from another task)."""
        await self.start()
        await self._stopped.wait()

    async def _restore(self) -> None:
        """Attach again after the link reconnected (the link calls it)."""
        if self._stopping:
            return
        try:
            await self._attach(again=True, wait_ready=False)
        except MqkitError as exc:
            if isinstance(exc, ConnectionFailed):
                raise
            log.error("could not restore the consumer of %r: %s; retrying", self._plan.queue, exc)
            self._schedule_reattach()

    def _link_lost(self, reason: BaseException) -> None:
        """The channel died with the connection; in-progress work is stale."""
        self._lose(describe(reason))

    async def __aenter__(self) -> AsyncConsumer[T]:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- attach / detach -------------------------------------------------------------------

    async def _attach(self, *, again: bool, wait_ready: bool) -> None:
        async with self._attach_lock:
            if self._stopping or self.attached:
                return
            what = f"consume from queue {self._plan.queue!r}"
            plan = self._plan
            channel = await open_channel(self._link, wait_ready=wait_ready)
            session: Acks | None = None
            try:
                await channel.set_qos(prefetch_count=plan.prefetch, timeout=RPC_TIMEOUT)
                underlay = await channel.get_underlay_channel()
                session = Acks(channel, underlay)
                channel.close_callbacks.add(partial(self._on_closed, session))
                underlay.on_consumer_cancel_callbacks.add(partial(self._on_cancelled, session))
                await underlay.basic_consume(
                    plan.queue,
                    partial(self._on_delivery, session),
                    consumer_tag=session.tag,
                    timeout=RPC_TIMEOUT,
                )
            except RPC_ERRORS as exc:
                if session is not None:
                    session.alive = False
                await close_channel(channel)
                raise translate(exc, what=what) from exc
            current = not self._stopping and not channel.is_closed
            if current:
                self._session = session
            if not current:  # stopped, or the channel closed, while it attached
                session.alive = False
                await close_channel(channel)
                if self._stopping:
                    return
                raise explain.link_lost(what, "the channel closed while it attached")
            self._pipeline.emit(ConsumerAttached(plan.queue, again, service=plan.service))

    def _reset(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.alive = False  # deliveries of the old channel are stale from now on
        self._drop_timer()

    def _lose(self, reason: str) -> None:
        """The channel is gone or useless; report it once, if it was attached."""
        lost = self.attached and not self._stopping and not self._link.closed
        self._reset()
        if lost:
            self._detached(reason)

    def _detached(self, reason: str) -> None:
        plan = self._plan
        self._pipeline.emit(ConsumerDetached(plan.queue, reason, service=plan.service))

    def _on_closed(self, session: Acks, _sender: Any, exc: BaseException | None) -> None:
        if session is not self._session:
            return
        self._lose(describe(exc))
        if self._stopping or self._link.closed:
            return
        if isinstance(exc, amqp.AMQPChannelError):
            self._schedule_reattach()
        # otherwise the connection is gone and the link restores us

    def _on_cancelled(self, session: Acks, _frame: Any) -> None:
        # The broker cancelled us (the queue was deleted, or a quorum leader moved): the
        # channel is fine but useless, so drop it and attach afresh (re-declaring the queue).
        if session is not self._session or not session.alive:
            return
        self._lose("the broker cancelled it; was the queue deleted?")
        self._spawn(close_channel(session.owner))
        if not self._stopping:
            self._schedule_reattach()

    def _schedule_reattach(self) -> None:
        """Subscribe again from a task of its own (declaring waits for the broker)."""
        if self._reattacher is None or self._reattacher.done():
            self._reattacher = asyncio.get_running_loop().create_task(self._reattach())

    async def _reattach(self) -> None:
        failures = 0
        while not self._stopping and not self._link.closed:
            failures += 1
            await asyncio.sleep(LINK_BACKOFF.delay(failures))
            if self._stopping or self.attached:
                return
            try:
                await self._declarer.declare(self._plan.entities, force=True)
                await self._attach(again=True, wait_ready=True)
                return
            except MqkitError as exc:
                log.warning("cannot re-attach the consumer of %r yet: %s", self._plan.queue, exc)

    # -- deliveries --------------------------------------------------------------------------

    async def _on_delivery(self, session: Acks, message: aiormq.abc.DeliveredMessage) -> None:
        # Called by aiormq once per delivery: keep it tiny, the workers do the work.
        if not session.alive:
            return
        method: Any = message.delivery  # a Basic.Deliver on a consumer's channel
        session.window.delivered(method.delivery_tag)
        self._ready.append((session, message))
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def _work(self) -> None:
        ready = self._ready
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if not ready:
                # Idle. Acking now would send an ack per message whenever the broker is the
                # slower side; the batch threshold and the ACK_DELAY timer cover the rest. But
                # if the broker holds back for want of acks (half the prefetch unacked), ack.
                session = self._session
                if (
                    session is not None
                    and session.window.waiting()
                    and session.window.unsettled() >= self._idle_flush
                ):
                    await session.flush(everything=True)
                    continue
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append(waiter)
                await waiter
                continue
            session, message = ready.popleft()
            if not session.alive:
                continue  # its channel is gone; the broker redelivers it
            try:
                await self._handle(session, message)
            except Exception:  # a bug here must kill neither the worker nor the queue
                # Requeued, it would come straight back and fail the same way (a hot loop):
                # the broker dead-letters it instead (the work queue's DLX is its DLQ).
                log.exception(
                    "unexpected error handling a message from %r; rejecting it (its "
                    "dead-letter queue gets it, with reason 'rejected')",
                    self._plan.queue,
                )
                method: Any = message.delivery
                await self._finish(session, method.delivery_tag, _REJECT)

    async def _handle(self, session: Acks, message: aiormq.abc.DeliveredMessage) -> None:
        incoming = incoming_of(message)
        tag = incoming.delivery_tag
        plan = self._plan
        value, ctx, failure = prepare(
            incoming, queue=plan.queue, decoder=plan.decoder, policy=plan.policy
        )
        if failure is not None:
            delivery = delivery_of(ctx, service=plan.service)
            self._pipeline.emit(Undecodable(delivery, failure.error_message))
        scope = handling(ctx, service=plan.service)  # what the handler publishes inherits
        if self._reply is not None:
            with scope:
                await self._reply(incoming, value, ctx, failure)
            await self._finish(session, tag, _ACK)
            delivery = delivery_of(ctx, service=plan.service)
            self._pipeline.emit(outcome_event(delivery, _ACKED, dlq=plan.dlq))
            return
        outcome: Outcome = _ACKED
        exc: BaseException | None = None
        seconds = 0.0
        if failure is None:
            started = time.monotonic()
            with scope:
                exc = await self._call(value, ctx)
            seconds = time.monotonic() - started
            if exc is not None:
                outcome = decide(exc, ctx.attempt, plan.policy, format_traceback(exc))
        else:
            outcome = failure
        copy = follow_up(incoming, outcome, queue=plan.queue, service=plan.service, dlq=plan.dlq)
        if copy is not None:
            scope.stamp(copy.envelope.headers)  # what middleware asked the copy to carry
            try:
                await self._publisher.publish(
                    copy.envelope,
                    exchange=copy.exchange,
                    routing_key=copy.routing_key,
                    mandatory=True,
                )
            except MqkitError as error:
                log.error(
                    "could not move message %s to %s (%s); returning it to %r",
                    ctx.message_id,
                    copy.target,
                    error,
                    plan.queue,
                )
                await self._finish(session, tag, _REQUEUE)
                return
            except Exception:  # the copy cannot be encoded: it would fail on every retry
                log.exception(
                    "cannot copy message %s to %r; rejecting it (its dead-letter queue gets "
                    "it, with reason 'rejected')",
                    ctx.message_id,
                    copy.routing_key,
                )
                await self._finish(session, tag, _REJECT)
                return
        event = outcome_event(
            delivery_of(ctx, service=plan.service),
            outcome,
            dlq=plan.dlq,
            error=exc,
            seconds=seconds,
        )
        await self._finish(session, tag, _ACK)
        self._pipeline.emit(event)

    async def _call(self, value: Any, ctx: Context) -> BaseException | None:
        """Run the handler (with the policy's quick in-process retries); its exception.

        A ``CancelledError`` the handler raises while this worker is not being cancelled (it
        awaited something that was cancelled) is a failure like any other: letting it out
        would end the worker and leave its delivery unacked.
        """
        policy = self._plan.policy
        try:
            await self._handler(value, ctx)
            return None
        except asyncio.CancelledError as exc:
            if cancelling():
                raise
            return exc
        except Exception as exc:
            if not (policy.immediate and policy.retries_immediately(exc)):
                return exc
        # Built only after a failure: most messages succeed at the first attempt.
        await asyncio.sleep(policy.immediate_delay(1))
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(policy.immediate),
            wait=lambda state: policy.immediate_delay(state.attempt_number + 1),
            retry=tenacity.retry_if_exception(policy.retries_immediately),
            reraise=True,
        )
        try:
            await retrying(self._handler, value, ctx)
        except asyncio.CancelledError as exc:
            if cancelling():
                raise
            return exc
        except Exception as exc:
            return exc
        return None

    async def _finish(self, session: Acks, tag: int, how: Settle) -> None:
        """Ack ``tag`` (batched: see the module), or nack it now: requeue or reject."""
        if how != _ACK:
            await session.nack(tag, requeue=how == _REQUEUE)
            return
        session.window.finished(tag)
        if session.window.waiting() >= self._batch:
            await session.flush(everything=False)
        if session.window.waiting() and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._on_timer, session)

    def _drop_timer(self) -> None:
        # The flush timer belongs to the session that closed; left set, it would keep the
        # next session's finished deliveries from scheduling their own flush until it fires.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self, session: Acks) -> None:
        self._timer = None
        if session.window.waiting() and session.alive:
            self._spawn(session.flush(everything=True))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- stop --------------------------------------------------------------------------------

    async def _stop(self, timeout: float) -> None:
        queue = self._plan.queue
        clock = StopClock(timeout)
        self._stopping = True
        self._link.unregister(self)
        try:
            if self._reattacher is not None and not self._reattacher.done():
                self._reattacher.cancel()
            session = self._session
            if session is not None and session.alive:
                try:
                    await session.underlay.basic_cancel(session.tag, timeout=clock.cancel())
                except RPC_ERRORS as exc:  # the link is down: the broker requeues
                    log.debug("basic.cancel of the consumer of %r failed: %s", queue, describe(exc))
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters.clear()
            await self._stop_workers(clock.left())
            self._drop_timer()
            if session is not None:
                await session.flush(everything=True)
                await session.requeue_rest()
                session.alive = False
                await close_channel(session.owner, clock.round_trip())
            self._ready.clear()
        finally:
            if self._plan.temporary:
                self._declarer.forget(self._plan.temporary)
            self._session = None
            self._workers = []
            self._started = False
            self._stopper = None
            self._stopped.set()
        self._detached("")

    async def _stop_workers(self, timeout: float) -> None:
        if not self._workers:
            return
        _, stuck = await asyncio.wait(self._workers, timeout=timeout)
        if stuck:
            log.warning(
                "%d handler(s) of %r still running after the stop timeout; their messages go "
                "back to the queue",
                len(stuck),
                self._plan.queue,
            )
            for task in stuck:
                task.cancel()
            await asyncio.wait(stuck, timeout=5)
