"""Consuming on pika: the IO thread receives, worker threads run handlers, acks are batched.

Each consumer has its own channel (its prefetch is per channel) and ``concurrency`` worker
threads. The IO thread only appends a delivery to a ``SimpleQueue``; a worker decodes it,
runs the handler (with ``immediate`` in-process retries), asks :mod:`mqkit.retry` what to do,
publishes the retry or dead-letter copy (confirmed) if there is one, and then queues the ack.
The IO thread flushes finished deliveries in one go: the contiguous run from the oldest
unacked delivery with one ``basic.ack(multiple=True)``, stragglers one by one. A handler
blocking for minutes never stalls heartbeats, because it never runs on the IO thread.

A connection loss makes in-progress deliveries stale (their channel is gone, the broker
redelivers them): their acks are dropped. The link restores the consumer on the new
connection (basic.qos and basic.consume again) and it counts as attached once consume-ok
arrives.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import pika.exceptions as pex
import tenacity
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties
from pydantic import BaseModel

from mqkit._sync.acks import ACK, REJECT, REQUEUE, Acks, Settle
from mqkit._sync.channel import to_incoming
from mqkit._sync.connection import LinkDown, translate
from mqkit._sync.io_thread import settle
from mqkit.consumers import ConsumerPlan
from mqkit.context import Context
from mqkit.delivery import follow_up, format_traceback, prepare
from mqkit.errors import ConnectionFailed, MqkitError
from mqkit.messages import Incoming
from mqkit.retry import Ack, GiveUp, Outcome, Reject, Retry, RetryLater, decide

if TYPE_CHECKING:
    from mqkit._sync.client import Client

__all__ = ["Consumer", "ReplyStep"]

log = logging.getLogger("mqkit")

_STOP_SLACK = 0.5  # s: the least a stop gives the cancel and the close each, once time is up

T = TypeVar("T", bound=BaseModel)

# Instead of running the handler, a responder runs this (it replies and never raises).
ReplyStep = Callable[[Incoming, Any, Context, "GiveUp | None"], None]

_ACK, _REQUEUE, _REJECT = ACK, REQUEUE, REJECT
_ACKED = Ack()
_Delivery = tuple[int, Any, BasicProperties, bytes]  # (generation, method, props, body)


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
        client: Client,
        plan: ConsumerPlan,
        handler: Callable[[T, Context], object],
        *,
        reply: ReplyStep | None = None,
    ) -> None:
        self._client = client
        self._link = client._link
        self._publisher = client._publisher
        self._plan = plan
        self._queue = plan.queue
        self._handler = handler
        self._reply = reply
        self._lifecycle = threading.Lock()
        self._running = False
        self._stopped = threading.Event()
        self._workers: list[threading.Thread] = []
        self._work: SimpleQueue[_Delivery | None] = SimpleQueue()
        # IO-thread state
        self._acks = Acks(self._link.submit)
        self._consumer_tag: str | None = None
        self._stopping = False
        self._attached = False
        self._reattaching = False

    def __repr__(self) -> str:
        return f"Consumer(queue={self._queue!r}, concurrency={self._plan.concurrency})"

    @property
    def queue(self) -> str:
        """The queue's name."""
        return self._queue

    @property
    def started(self) -> bool:
        """Whether :meth:`start` ran and :meth:`stop` did not (:meth:`Client.run` starts
        only the consumers that are not started)."""
        return self._running

    @property
    def ever_started(self) -> bool:
        """Whether :meth:`start` ever succeeded (:meth:`Client.close` warns about a consumer
        made on it that never was)."""
        return self._running or self._stopped.is_set()

    @property
    def attached(self) -> bool:
        """Whether the broker is delivering to this consumer right now (``False`` while the
        client reconnects; a readiness probe wants it ``True``, see ``health()``)."""
        return self._attached

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Declare the queue's topology and start consuming; returns once consume-ok
        arrived. Idempotent."""
        with self._lifecycle:
            if self._running:
                return
            self._client._ensure_open()
            self._client._declarer.declare(*self._plan.entities)
            self._stopping = False
            self._stopped.clear()
            # A fresh queue: a worker stuck past an earlier stop() keeps the old one.
            self._work = SimpleQueue()
            self._workers = [
                threading.Thread(
                    target=self._work_loop, name=f"mqkit-{self._queue}-{n}", daemon=True
                )
                for n in range(self._plan.concurrency)
            ]
            for worker in self._workers:
                worker.start()
            self._link.attach(self)
            try:
                self._call_attach(wait_ready=True)
            except BaseException:
                self._link.detach(self)
                self._stop_workers(time.monotonic() + 1.0)
                raise
            self._running = True
            self._client._consumer_started(self)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking deliveries, let running handlers finish and ack, and return prefetched
        messages no handler started to the queue. Idempotent.

        Returns within ``timeout`` seconds, plus at most 1 s of slack so that the consumer is
        cancelled and its channel closed even when ``timeout`` is (nearly) used up."""
        with self._lifecycle:
            if not self._running:
                return
            self._running = False
            deadline = time.monotonic() + timeout

            def left() -> float:  # each broker round trip gets at least _STOP_SLACK s
                return max(_STOP_SLACK, deadline - time.monotonic())

            self._stopping = True
            try:
                self._link.call(
                    self._cancel,
                    min(left(), 10.0),
                    what=f"cancel consuming {self._queue!r}",
                    wait_ready=False,
                )
            except MqkitError as exc:  # the link is down: nothing to cancel, the broker requeues
                log.debug("mqkit: cancelling the consumer of %r: %s", self._queue, exc)
            self._stop_workers(deadline)
            try:
                self._link.call(
                    self._close_channel,
                    left(),
                    what=f"close consumer {self._queue!r}",
                    wait_ready=False,
                )
            except MqkitError as exc:
                log.debug("mqkit: closing the consumer channel of %r: %s", self._queue, exc)
            self._link.detach(self)
            self._attached = False
            self._client._consumer_stopped(self)
            if self._plan.temporary:
                self._client._declarer.forget(*self._plan.temporary)
            self._stopped.set()

    def run(self) -> None:
        """Start, then block until :meth:`stop` is called (Ctrl-C stops gracefully)."""
        self.start()
        try:
            while not self._stopped.wait(0.5):
                pass
        except KeyboardInterrupt:
            self.stop()

    def __enter__(self) -> Consumer[T]:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _stop_workers(self, deadline: float) -> None:
        for _ in self._workers:
            self._work.put(None)
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(worker.is_alive() for worker in self._workers)
        if stuck:
            log.warning(
                "mqkit: %d handler(s) of queue %r still running after the stop timeout; "
                "their messages go back to the queue",
                stuck,
                self._queue,
            )
        self._workers = []

    # -- attaching (IO thread) ----------------------------------------------------------------

    def _call_attach(self, *, wait_ready: bool) -> None:
        try:
            self._link.call(
                self._attach,
                max(self._link.settings.connect_timeout, 5.0),
                what=f"consume from queue {self._queue!r}",
                wait_ready=wait_ready,
            )
        except pex.AMQPError as exc:
            raise translate(exc, what=f"consume from queue {self._queue!r}") from exc

    def _attach(self, connection: SelectConnection, future: Future[None]) -> None:
        old = self._acks.channel
        self._reset()
        if old is not None and old.is_open:
            old.close()  # one channel per consumer: a superseded one would hold messages
        generation = self._acks.generation

        def on_open(channel: Channel) -> None:
            if generation != self._acks.generation:  # another attach (or a loss) came in between
                channel.close()
                settle(future, exc=LinkDown("superseded"))
                return
            self._acks.channel = channel
            channel.add_on_cancel_callback(self._on_broker_cancel)
            channel.basic_qos(
                prefetch_count=self._plan.prefetch, callback=lambda _f: consume(channel)
            )

        def consume(channel: Channel) -> None:
            if channel is self._acks.channel:
                self._consumer_tag = channel.basic_consume(
                    self._queue, self._on_message, callback=lambda _f: attached(channel)
                )

        def attached(channel: Channel) -> None:
            if channel is self._acks.channel:
                self._attached = True
            settle(future)

        def on_close(channel: Channel, reason: BaseException) -> None:
            settle(future, exc=reason)
            self._on_channel_closed(channel, reason)

        self._link.open_channel(connection, on_open, on_close)

    def _reset(self) -> None:
        self._acks.reset()  # deliveries of the old channel are stale from now on
        self._consumer_tag = None
        self._attached = False

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        if channel is not self._acks.channel:
            return
        self._reset()
        if self._stopping or self._link.closed:
            return
        if isinstance(reason, pex.ChannelClosedByBroker):
            log.error(
                "mqkit: the broker closed the channel of consumer %r (%s); re-attaching",
                self._queue,
                reason,
            )
            self._reattach_soon()
        # otherwise the connection is gone and the link restores us

    def _on_broker_cancel(self, _frame: Any) -> None:
        log.error(
            "mqkit: the broker cancelled the consumer of queue %r (deleted?); re-attaching",
            self._queue,
        )
        channel = self._acks.channel
        self._reset()
        if channel is not None and channel.is_open:
            channel.close()
        if not self._stopping:
            self._reattach_soon()

    def _reattach_soon(self) -> None:
        """IO thread: subscribe again from a helper thread (declaring blocks)."""
        if self._reattaching:
            return
        self._reattaching = True
        threading.Thread(target=self._reattach, name="mqkit-reattach", daemon=True).start()

    def _reattach(self) -> None:
        try:
            while not self._stopping and not self._link.closed:
                self._stopped.wait(1.0)
                if self._stopping or self._attached:
                    return
                try:
                    self._client._declarer.declare(*self._plan.entities, again=True)
                    self._call_attach(wait_ready=True)
                    log.warning("mqkit: consumer of %r re-attached", self._queue)
                    return
                except MqkitError as exc:
                    log.warning("mqkit: re-attaching to %r failed: %s", self._queue, exc)
                    self._stopped.wait(4.0)
        finally:
            self._reattaching = False

    # -- deliveries -------------------------------------------------------------------------

    def _on_message(
        self, _channel: Channel, method: Any, props: BasicProperties, body: bytes
    ) -> None:
        self._acks.delivered(method.delivery_tag)
        self._work.put((self._acks.generation, method, props, body))

    def _work_loop(self) -> None:
        get = self._work.get
        while True:
            item = get()
            if item is None:
                return
            generation, method, props, body = item
            if generation != self._acks.generation:
                continue  # its channel is gone; the broker redelivers it
            try:
                settle = self._process(method, props, body)
            except Exception:  # a bug of ours must kill neither the worker nor the queue
                # Requeued, it would come straight back and fail the same way (a hot loop):
                # the broker dead-letters it instead (the work queue's DLX is its DLQ).
                log.exception(
                    "unexpected error processing a delivery from %r; rejecting it (its "
                    "dead-letter queue gets it, with reason 'rejected')",
                    self._queue,
                )
                settle = _REJECT
            self._acks.finish(generation, method.delivery_tag, settle)

    def _process(self, method: Basic.Deliver, props: BasicProperties, body: bytes) -> Settle:
        incoming = to_incoming(method, props, body)
        plan = self._plan
        message, ctx, failure = prepare(
            incoming, queue=plan.queue, decoder=plan.decoder, policy=plan.policy
        )
        if self._reply is not None:
            self._reply(incoming, message, ctx, failure)
            return _ACK
        outcome = failure or self._run_handler(message, ctx)
        if failure is not None:
            log.error(
                "mqkit: message %s on %r cannot be decoded; dead-lettering it: %s",
                ctx.message_id,
                self._queue,
                failure.error_message,
            )
        copy = follow_up(incoming, outcome, queue=plan.queue, service=plan.service, dlq=plan.dlq)
        if copy is None:
            return _ACK
        try:
            self._publisher.publish("", copy.routing_key, [copy.envelope], mandatory=True)
        except MqkitError as exc:
            log.error(
                "mqkit: could not move message %s to %r (%s); returning it to %r",
                ctx.message_id,
                copy.routing_key,
                exc,
                self._queue,
            )
            return _REQUEUE
        except Exception:  # the copy cannot be encoded: it would fail again on every retry
            log.exception(
                "cannot copy message %s to %r; rejecting it (its dead-letter queue gets it, "
                "with reason 'rejected')",
                ctx.message_id,
                copy.routing_key,
            )
            return _REJECT
        return _ACK

    def _run_handler(self, message: Any, ctx: Context) -> Outcome:
        policy = self._plan.policy
        try:
            try:
                self._handler(message, ctx)
            except Exception as exc:
                if not (policy.immediate and policy.retries_immediately(exc)):
                    raise
                # Built only after a failure: most messages succeed at the first attempt.
                time.sleep(policy.immediate_delay(1))
                retrying = tenacity.Retrying(
                    stop=tenacity.stop_after_attempt(policy.immediate),
                    wait=lambda state: policy.immediate_delay(state.attempt_number + 1),
                    retry=tenacity.retry_if_exception(policy.retries_immediately),
                    reraise=True,
                )
                retrying(self._handler, message, ctx)
        except Exception as exc:
            outcome = decide(exc, ctx.attempt, policy, format_traceback(exc))
            self._log_failure(exc, ctx, outcome)
            return outcome
        return _ACKED

    def _log_failure(self, exc: Exception, ctx: Context, outcome: Outcome) -> None:
        signal = isinstance(exc, Reject | Retry)
        if isinstance(outcome, RetryLater):
            log.warning(
                "mqkit: handler for %r failed on message %s (attempt %d): %r; retrying in %gs",
                self._queue,
                ctx.message_id,
                ctx.attempt,
                exc,
                outcome.delay,
                exc_info=None if signal else exc,
            )
        else:
            log.error(
                "mqkit: handler for %r gave up on message %s after %d attempt(s): %r; "
                "dead-lettering it",
                self._queue,
                ctx.message_id,
                ctx.attempt,
                exc,
                exc_info=None if signal else exc,
            )

    # -- stopping (IO thread) --------------------------------------------------------------------

    def _cancel(self, _connection: SelectConnection, future: Future[None]) -> None:
        channel, tag = self._acks.channel, self._consumer_tag
        if channel is None or not channel.is_open or tag is None:
            self._requeue_unstarted(None)
            settle(future)
            return

        def cancelled(_frame: Any) -> None:
            self._requeue_unstarted(channel)
            settle(future)

        channel.basic_cancel(tag, callback=cancelled)

    def _requeue_unstarted(self, channel: Channel | None) -> None:
        generation = self._acks.generation
        while True:
            try:
                item = self._work.get_nowait()
            except Empty:
                return
            if item is None or item[0] != generation or channel is None:
                continue
            tag = item[1].delivery_tag
            channel.basic_nack(tag, requeue=True)
            self._acks.settled(tag)

    def _close_channel(self, _connection: SelectConnection, future: Future[None]) -> None:
        self._acks.flush()
        channel = self._acks.channel
        self._reset()
        if channel is not None and channel.is_open:
            channel.close()
        settle(future)

    # -- Component ---------------------------------------------------------------------------

    def _link_lost(self, reason: BaseException) -> None:
        """IO thread: the channel died with the connection; in-progress work is stale."""
        self._reset()

    def _restore(self) -> None:
        """Subscribe again on the new connection."""
        if self._stopping:
            return
        try:
            self._call_attach(wait_ready=False)
        except MqkitError as exc:
            if isinstance(exc, ConnectionFailed):
                raise
            log.error("mqkit: could not restore the consumer of %r: %s; retrying", self._queue, exc)
            self._reattach_soon()
