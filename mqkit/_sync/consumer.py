"""Consuming on pika: the IO thread receives, worker threads run handlers, acks are batched.

Each consumer has its own channel (its prefetch is per channel) and ``concurrency`` worker
threads. The IO thread only appends a delivery to a ``SimpleQueue``; a worker decodes it,
runs the handler (with ``immediate`` in-process retries), asks :mod:`mqkit.retry` what to do,
publishes the retry or dead-letter copy (confirmed) if there is one, and then queues the ack.
The IO thread flushes finished deliveries in one go: the contiguous run from the oldest
unacked delivery with one ``basic.ack(multiple=True)``, stragglers one by one. A handler
blocking for minutes never stalls heartbeats, because it never runs on the IO thread.

What happened is reported to the pipeline (:mod:`mqkit.lifecycle`): attached, detached (stopped
or lost), a body that does not decode, and how each delivery ended (handled, retried,
dead-lettered), after its ack.

A connection loss makes in-progress deliveries stale (their channel is gone, the broker
redelivers them): their acks are dropped. The link restores the consumer on the new
connection (basic.qos and basic.consume again) and it counts as attached once consume-ok
arrives.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial
from queue import Empty, SimpleQueue
from typing import Any, Generic, Protocol, TypeVar

import pika.exceptions as pex
import tenacity
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.spec import BasicProperties
from pydantic import BaseModel

from mqkit import explain
from mqkit.acks import ACK, REJECT, REQUEUE, Settle
from mqkit.backoff import LINK_BACKOFF
from mqkit.consumers import STOP_BACKSTOP, ConsumerPlan, StopClock
from mqkit.context import Context
from mqkit.correlation import handling
from mqkit.delivery import follow_up, format_traceback, prepare
from mqkit.errors import ConnectionFailed, MqkitError
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
from .connection import RPC_ERRORS, RPC_TIMEOUT, Link, describe, translate
from .declarer import Declarer
from .publisher import Publisher
from .transport import settle

__all__ = ["Consumer", "ReplyStep", "stop_all"]

log = logging.getLogger("mqkit.consumer")


T = TypeVar("T", bound=BaseModel)

# Instead of running the handler, a responder runs this (it replies and never raises).
ReplyStep = Callable[[Incoming, Any, Context, "GiveUp | None"], None]

_ACK, _REQUEUE, _REJECT = ACK, REQUEUE, REJECT
_ACKED = Ack()
_Delivery = tuple[Acks, Any, BasicProperties, bytes]  # (session, method, props, body)


class Consumer(Generic[T]):
    """Consumes ``T`` messages from a queue and runs ``handler(message, ctx)`` for each.

    Returning normally acks; raising retries per the :class:`~mqkit.RetryPolicy` (the broker
    holds the message in a retry queue), then dead-letters; :class:`~mqkit.Reject`
    dead-letters at once. ``start()`` returns once the broker confirmed the subscription;
    handlers run on ``concurrency`` worker threads. ``stop()`` lets running handlers finish
    and returns prefetched messages that no handler started to the queue.

    ```python
    with client.consumer("charges", ChargeCard, charge) as consumer:
        ...  # consuming in background threads
    ```

    Made by :meth:`Client.consumer`, :meth:`Client.responder` and
    :meth:`EventBus.subscribe`; the constructor's arguments are internal.
    """

    def __init__(
        self,
        link: Link,
        declarer: Declarer,
        publisher: Publisher,
        pipeline: Pipeline,
        plan: ConsumerPlan,
        handler: Callable[[T, Context], object],
        *,
        reply: ReplyStep | None = None,
        middleware: MiddlewareStack = NO_MIDDLEWARE,
    ) -> None:
        self._link = link
        self._declarer = declarer
        self._publisher = publisher
        self._pipeline = pipeline
        self._plan = plan
        self._handler = middleware.wrap(handler)
        self._reply = reply
        self._start_lock = threading.Lock()  # start and stop, one at a time
        self._ready: SimpleQueue[_Delivery | None] = SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._stopped = threading.Event()
        self._started = False
        self._stopping = False
        # IO-thread state
        self._session: Acks | None = None  # the current channel's deliveries
        self._lock = threading.Lock()
        self._attach_lock = threading.Lock()
        self._reattacher: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<Consumer queue={self._plan.queue!r} started={self._started}>"

    # -- properties --------------------------------------------------------------------------

    @property
    def queue(self) -> str:
        """The queue's name."""
        return self._plan.queue

    @property
    def started(self) -> bool:
        """Whether :meth:`start` ran and :meth:`stop` did not (:meth:`Client.run` starts
        only the consumers that are not started)."""
        return self._started

    @property
    def ever_started(self) -> bool:
        """Whether :meth:`start` ever succeeded (:meth:`Client.close` warns about a consumer
        made on it that never was)."""
        return self._started or self._stopped.is_set()

    @property
    def attached(self) -> bool:
        """Whether the broker is delivering to this consumer right now (``False`` while the
        client reconnects; a readiness probe wants it ``True``, see ``health()``)."""
        session = self._session
        return session is not None and session.alive

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Declare the queue's topology and start consuming; returns once consume-ok
        arrived. Idempotent."""
        if self._started:
            return
        with self._start_lock:
            if not self._started:
                self._start()

    def _start(self) -> None:
        self._link.ensure_open()
        self._declarer.declare(self._plan.entities)
        self._stopping = False
        self._stopped.clear()
        # A fresh queue: a worker stuck past an earlier stop() keeps the old one.
        self._ready = SimpleQueue()
        self._workers = [
            threading.Thread(target=self._work, name=f"mqkit-{self._plan.queue}-{n}", daemon=True)
            for n in range(self._plan.concurrency)
        ]
        for worker in self._workers:
            worker.start()
        self._link.register(self)
        try:
            self._attach(again=False, wait_ready=True)
        except BaseException:
            self._link.unregister(self)
            self._stop_workers(1.0)
            raise
        self._started = True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking deliveries, let running handlers finish and ack, and return prefetched
        messages no handler started to the queue. Idempotent.

        Returns within ``timeout`` seconds, plus at most 1 s of slack so that the consumer is
        cancelled and its channel closed even when ``timeout`` is (nearly) used up."""
        with self._start_lock:
            if self._started:
                self._stop(timeout)

    def run(self) -> None:
        """Start, then block until :meth:`stop` is called (Ctrl-C stops gracefully)."""
        self.start()
        try:
            while not self._stopped.wait(0.5):
                pass
        except KeyboardInterrupt:
            self.stop()

    def _restore(self) -> None:
        """Attach again after the link reconnected (the link calls it)."""
        if self._stopping:
            return
        try:
            self._attach(again=True, wait_ready=False)
        except MqkitError as exc:
            if isinstance(exc, ConnectionFailed):
                raise
            log.error("could not restore the consumer of %r: %s; retrying", self._plan.queue, exc)
            self._schedule_reattach()

    def _link_lost(self, reason: BaseException) -> None:
        """IO thread: the channel died with the connection; in-progress work is stale."""
        self._lose(describe(reason))

    def __enter__(self) -> Consumer[T]:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- attach / detach -------------------------------------------------------------------

    def _attach(self, *, again: bool, wait_ready: bool) -> None:
        with self._attach_lock:
            if self._stopping or self.attached:
                return
            what = f"consume from queue {self._plan.queue!r}"
            plan = self._plan
            channel = open_channel(self._link, wait_ready=wait_ready)
            session: Acks | None = None
            try:
                channel.basic_qos(prefetch_count=plan.prefetch, timeout=RPC_TIMEOUT)
                session = Acks(channel.underlay, self._link.submit)
                channel.close_callbacks.add(partial(self._on_closed, session))
                channel.on_consumer_cancel_callbacks.add(partial(self._on_cancelled, session))
                channel.basic_consume(
                    plan.queue,
                    partial(self._on_delivery, session),
                    consumer_tag=session.tag,
                    timeout=RPC_TIMEOUT,
                )
            except RPC_ERRORS as exc:
                if session is not None:
                    session.alive = False
                close_channel(channel)
                raise translate(exc, what=what) from exc
            with self._lock:  # stop() reads the session under it once it is stopping
                current = not self._stopping and not channel.is_closed
                if current:
                    self._session = session
            if not current:  # stopped, or the channel closed, while it attached
                session.alive = False
                close_channel(channel)
                if self._stopping:
                    return
                raise explain.link_lost(what, "the channel closed while it attached")
            self._pipeline.emit(ConsumerAttached(plan.queue, again, service=plan.service))

    def _reset(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.alive = False  # deliveries of the old channel are stale from now on

    def _lose(self, reason: str) -> None:
        """IO thread: the channel is gone or useless; report it once, if it was attached."""
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
        if isinstance(exc, pex.ChannelClosedByBroker):
            self._schedule_reattach()
        # otherwise the connection is gone and the link restores us

    def _on_cancelled(self, session: Acks, _frame: Any) -> None:
        # The broker cancelled us (the queue was deleted, or a quorum leader moved): the
        # channel is fine but useless, so drop it and attach afresh (re-declaring the queue).
        if session is not self._session or not session.alive:
            return
        self._lose("the broker cancelled it; was the queue deleted?")
        if session.owner.is_open:
            session.owner.close()
        if not self._stopping:
            self._schedule_reattach()

    def _schedule_reattach(self) -> None:
        """IO thread: subscribe again from a helper thread (declaring blocks)."""
        if self._reattacher is None or not self._reattacher.is_alive():
            self._reattacher = threading.Thread(
                target=self._reattach, name="mqkit-reattach", daemon=True
            )
            self._reattacher.start()

    def _reattach(self) -> None:
        failures = 0
        while not self._stopping and not self._link.closed:
            failures += 1
            self._stopped.wait(LINK_BACKOFF.delay(failures))
            if self._stopping or self.attached:
                return
            try:
                self._declarer.declare(self._plan.entities, force=True)
                self._attach(again=True, wait_ready=True)
                return
            except MqkitError as exc:
                log.warning("cannot re-attach the consumer of %r yet: %s", self._plan.queue, exc)

    # -- deliveries --------------------------------------------------------------------------

    def _on_delivery(
        self, session: Acks, _channel: Channel, method: Any, props: BasicProperties, body: bytes
    ) -> None:
        # Called by pika (IO thread) once per delivery: keep it tiny, the workers do the work.
        if not session.alive:
            return
        session.window.delivered(method.delivery_tag)
        self._ready.put((session, method, props, body))

    def _work(self) -> None:
        get = self._ready.get
        while True:
            item = get()
            if item is None:
                return
            session, method, props, body = item
            if not session.alive:
                continue  # its channel is gone; the broker redelivers it
            try:
                self._handle(session, method, props, body)
            except Exception:  # a bug here must kill neither the worker nor the queue
                # Requeued, it would come straight back and fail the same way (a hot loop):
                # the broker dead-letters it instead (the work queue's DLX is its DLQ).
                log.exception(
                    "unexpected error handling a message from %r; rejecting it (its "
                    "dead-letter queue gets it, with reason 'rejected')",
                    self._plan.queue,
                )
                self._finish(session, method.delivery_tag, _REJECT)

    def _handle(self, session: Acks, method: Any, props: BasicProperties, body: bytes) -> None:
        incoming = incoming_of(method, props, body)
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
                self._reply(incoming, value, ctx, failure)
            self._finish(session, tag, _ACK)
            delivery = delivery_of(ctx, service=plan.service)
            self._pipeline.emit(outcome_event(delivery, _ACKED, dlq=plan.dlq))
            return
        outcome: Outcome = _ACKED
        exc: BaseException | None = None
        seconds = 0.0
        if failure is None:
            started = time.monotonic()
            with scope:
                exc = self._call(value, ctx)
            seconds = time.monotonic() - started
            if exc is not None:
                outcome = decide(exc, ctx.attempt, plan.policy, format_traceback(exc))
        else:
            outcome = failure
        copy = follow_up(incoming, outcome, queue=plan.queue, service=plan.service, dlq=plan.dlq)
        if copy is not None:
            scope.stamp(copy.envelope.headers)  # what middleware asked the copy to carry
            try:
                self._publisher.publish(
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
                self._finish(session, tag, _REQUEUE)
                return
            except Exception:  # the copy cannot be encoded: it would fail on every retry
                log.exception(
                    "cannot copy message %s to %r; rejecting it (its dead-letter queue gets "
                    "it, with reason 'rejected')",
                    ctx.message_id,
                    copy.routing_key,
                )
                self._finish(session, tag, _REJECT)
                return
        event = outcome_event(
            delivery_of(ctx, service=plan.service),
            outcome,
            dlq=plan.dlq,
            error=exc,
            seconds=seconds,
        )
        self._finish(session, tag, _ACK)
        self._pipeline.emit(event)

    def _call(self, value: Any, ctx: Context) -> BaseException | None:
        """Run the handler (with the policy's quick in-process retries); its exception."""
        policy = self._plan.policy
        try:
            self._handler(value, ctx)
            return None
        except Exception as exc:
            if not (policy.immediate and policy.retries_immediately(exc)):
                return exc
        # Built only after a failure: most messages succeed at the first attempt.
        time.sleep(policy.immediate_delay(1))
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(policy.immediate),
            wait=lambda state: policy.immediate_delay(state.attempt_number + 1),
            retry=tenacity.retry_if_exception(policy.retries_immediately),
            reraise=True,
        )
        try:
            retrying(self._handler, value, ctx)
        except Exception as exc:
            return exc
        return None

    def _finish(self, session: Acks, tag: int, how: Settle) -> None:
        session.finish(tag, how)

    # -- stop --------------------------------------------------------------------------------

    def _stop(self, timeout: float) -> None:
        self._started = False
        queue = self._plan.queue
        clock = StopClock(timeout)
        with self._lock:  # an attach under way sees it, or has set its session by now
            self._stopping = True
        try:
            self._link.call(
                self._cancel, clock.cancel(), what=f"cancel consuming {queue!r}", wait_ready=False
            )
        except MqkitError as exc:  # the link is down: nothing to cancel, the broker requeues
            log.debug("basic.cancel of the consumer of %r failed: %s", queue, exc)
        self._stop_workers(clock.left())
        try:
            self._link.call(
                self._close_channel,
                clock.round_trip(),
                what=f"close consumer {queue!r}",
                wait_ready=False,
            )
        except MqkitError as exc:
            log.debug("closing the channel of the consumer of %r failed: %s", queue, exc)
        self._link.unregister(self)
        self._reset()
        if self._plan.temporary:
            self._declarer.forget(self._plan.temporary)
        self._stopped.set()
        self._detached("")

    def _stop_workers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for _ in self._workers:
            self._ready.put(None)
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(worker.is_alive() for worker in self._workers)
        if stuck:
            log.warning(
                "%d handler(s) of %r still running after the stop timeout; their messages go "
                "back to the queue",
                stuck,
                self._plan.queue,
            )
        self._workers = []

    def _cancel(self, _connection: SelectConnection, future: Future[None]) -> None:
        """IO thread: basic.cancel, then return what was prefetched and not started."""
        session = self._session
        if session is None or not session.owner.is_open:
            self._requeue_unstarted(nack=False)
            settle(future)
            return

        def cancelled(_frame: Any) -> None:
            self._requeue_unstarted(nack=True)
            settle(future)

        session.owner.basic_cancel(session.tag, callback=cancelled)

    def _requeue_unstarted(self, *, nack: bool) -> None:
        """IO thread: take the deliveries no worker started out of line; ``nack``: return
        them to the queue now (otherwise their channel is gone, and the broker does)."""
        while True:
            try:
                item = self._ready.get_nowait()
            except Empty:
                return
            if nack and item is not None and item[0] is self._session:
                item[0].nack(item[1].delivery_tag, requeue=True)

    def _close_channel(self, _connection: SelectConnection, future: Future[None]) -> None:
        """IO thread: send the last acks, then close the channel."""
        session = self._session
        if session is not None:
            session.flush(everything=True)
        self._reset()
        if session is not None and session.owner.is_open:
            session.owner.close()
        settle(future)


class _Stoppable(Protocol):
    def stop(self, timeout: float = ...) -> None: ...


def stop_all(
    items: Sequence[_Stoppable], timeout: float, again: Callable[[], bool] | None = None
) -> bool:
    """Stop ``items`` all at once, each on a thread of its own within ``timeout`` seconds (so
    they stop within ``timeout``, not once per item); ``False`` as soon as ``again()`` says
    so (a second signal: the stops carry on in the background). Re-raises the first error a
    stop raised."""
    errors: list[BaseException] = []

    def stop(item: _Stoppable) -> None:
        try:
            item.stop(timeout)
        except BaseException as exc:
            errors.append(exc)

    stoppers = [
        threading.Thread(target=stop, args=(item,), name="mqkit-stop", daemon=True)
        for item in items
    ]
    for stopper in stoppers:
        stopper.start()
    deadline = time.monotonic() + timeout + STOP_BACKSTOP  # each stop is bounded: a backstop
    for stopper in stoppers:
        # Short joins: a second signal is handled (on this thread) between them.
        while stopper.is_alive() and time.monotonic() < deadline:
            if again is not None and again():
                return False
            stopper.join(min(0.1, max(0.0, deadline - time.monotonic())))
    if again is not None and again():
        return False
    if errors:
        raise errors[0]
    return True
