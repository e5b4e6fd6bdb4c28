"""The blocking client: :class:`Client`, on pika, with one IO thread per client."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel

from mqkit import running
from mqkit.consumers import plan_consumer, plan_responder
from mqkit.context import Context
from mqkit.declaring import expand
from mqkit.handlers import check_handler, role
from mqkit.health import Health, health_of
from mqkit.lifecycle import LogObserver, Pipeline
from mqkit.middleware import Middleware, MiddlewareStack
from mqkit.publishing import plan_producer
from mqkit.retry import RetryPolicy
from mqkit.settings import Settings, mask_url
from mqkit.topology import Entity, Exchange, Queue, check_entities

from .bus import EventBus
from .connection import Link
from .consumer import Consumer, stop_all
from .dead_letters import DeadLetterQueue
from .declarer import Declarer
from .producer import Producer
from .publisher import Publisher
from .rpc import Requester, reply_step

if TYPE_CHECKING:
    from mqkit.outbox import Outbox, OutboxRelay

__all__ = ["Client"]

log = logging.getLogger("mqkit.client")

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)

Made = Literal["consumer", "responder", "bus"]


class Client:
    """A blocking mqkit client on pika; thread-safe.

    ``Client(settings=None, *, middleware=None, **overrides)``: any :class:`~mqkit.Settings`
    field can be given as a keyword; ``middleware`` is a list of :class:`~mqkit.Middleware`
    applied in order (the first is the outermost; see :mod:`mqkit.middleware`). Nothing
    happens until the client is used: entering the context manager connects (raising
    :class:`~mqkit.ConnectionFailed` within ``connect_timeout``), leaving it closes. The
    connection lives on an IO thread of its own that keeps heartbeats going while
    handlers run on worker threads; after a connection loss it reconnects (fail-over across
    ``urls``), re-declares :attr:`topology` and restores consumers by itself.

    ```python
    with mqkit.Client(service="billing") as client:
        client.producer(ChargeCard, queue="charges").publish(ChargeCard(order_id="42"))
        client.consumer("charges", ChargeCard, charge)
        client.run()    # until stop(), SIGINT or SIGTERM
    ```
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        middleware: Sequence[Middleware] | None = None,
        **overrides: Any,
    ) -> None:
        self._settings = (settings or Settings()).merged(**overrides)
        self._middleware = MiddlewareStack(middleware, runtime="sync", client="Client")
        # Two connections, as RabbitMQ advises: a memory or disk alarm blocks the publishing
        # one, and consumers (and declares) on the other keep going. They share an IO thread.
        # What happens is reported to one pipeline; logging is its first observer, then the
        # middlewares' on_event.
        self._pipeline = Pipeline([LogObserver(), *self._middleware.observers])
        self._link = Link(self._settings, self._pipeline, purpose="consuming")
        self._publish_link = Link(
            self._settings, self._pipeline, purpose="publishing", io_from=self._link
        )
        self._publisher = Publisher(self._publish_link, self._pipeline)
        self._declarer = Declarer(self._link)
        self._requester = Requester(self._link, self._publisher, middleware=self._middleware)
        self._link.register(self._declarer)
        self._publish_link.register(self._publisher)
        self._publish_link.register(self._requester)  # replies come on the publishing channel
        self._lock = threading.RLock()
        self._made: list[tuple[Made, Consumer[Any] | EventBus]] = []
        self._relays: list[OutboxRelay] = []  # outbox relays: started first, stopped last
        self._subscribed: dict[tuple[str, str], set[str]] = {}  # (service, exchange): keys
        self._stop = threading.Event()

    def __repr__(self) -> str:
        urls = ", ".join(mask_url(u) for u in self._settings.all_urls)
        connected = self._link.connected and self._publish_link.connected
        state = "closed" if self._link.closed else ("connected" if connected else "idle")
        return f"<Client service={self._settings.service!r} {urls} {state}>"

    @property
    def settings(self) -> Settings:
        """The settings in use."""
        return self._settings

    @property
    def topology(self) -> tuple[Entity, ...]:
        """Every queue, exchange and binding declared so far (re-declared after a reconnect)."""
        return self._declarer.topology

    # -- lifecycle -------------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect now (idempotent); entering the context manager does it too, and so does
        the first use. Raises :class:`~mqkit.ConnectionFailed` within ``connect_timeout``."""
        self._link.ensure_open()

    def close(self) -> None:
        """Stop every consumer and bus of this client (gracefully: running handlers get
        ``settings.drain_timeout`` seconds to finish), then close the connection. Idempotent.

        One WARNING names the queue of each consumer, responder or event bus made on this
        client that was never started (it handled nothing)."""
        with self._lock:
            if self._link.closed:
                return
            made = list(self._made)
        running.warn_never_started(
            [(kind, item) for kind, item in made if isinstance(item, Consumer) and kind != "bus"],
            [item for _, item in made if isinstance(item, EventBus)],
            runtime="sync",
        )
        try:  # a bus stops its own consumers; relays last, so the handlers' rows go out too
            self._stop_all([item for _, item in made], self._settings.drain_timeout)
            self._stop_relays(self._settings.drain_timeout)
        finally:
            self._link.close()

    def __enter__(self) -> Client:
        self._link.ensure_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- topology --------------------------------------------------------------------------------

    def declare(self, *entities: Entity) -> None:
        """Declare queues, exchanges and bindings (idempotent; cached). A queue's ``type=None``
        takes ``settings.queue_type``.

        A durable queue is declared exactly as a producer, consumer, responder or the bus of
        any mqkit service declares it (with its DLQ ``{name}.dlq``), so whoever comes first,
        the others agree. One that exists with other arguments is used as it is, with a
        WARNING, unless ``settings.declare='strict'`` (then: TopologyError); with
        ``declare='passive'`` nothing is declared, only checked (see :mod:`mqkit.declaring`).
        """
        check_entities(entities)
        settings = self._settings
        self._link.ensure_open()
        self._declarer.declare(
            expand(
                entities, default_type=settings.queue_type, delivery_limit=settings.delivery_limit
            )
        )

    # -- factories -------------------------------------------------------------------------------

    def producer(
        self,
        message_type: type[T],
        *,
        queue: str | Queue | None = None,
        exchange: str | Exchange | None = None,
        routing_key: str | None = None,
    ) -> Producer[T]:
        """A :class:`Producer` for ``message_type``, to a queue (declared, with its DLQ) or
        an exchange (an :class:`Exchange` is declared; a name is used as it is)."""
        target, entities = plan_producer(
            message_type,
            queue=queue,
            exchange=exchange,
            routing_key=routing_key,
            default_type=self._settings.queue_type,
            delivery_limit=self._settings.delivery_limit,
            declared=self.topology,
        )
        if entities:
            self._link.ensure_open()
            self._declarer.declare(entities)
        return Producer(self._link, self._publisher, target, middleware=self._middleware)

    def consumer(
        self,
        queue: str | Queue,
        message_type: type[T],
        handler: Callable[[T, Context], object],
        *,
        prefetch: int | None = None,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
    ) -> Consumer[T]:
        """A :class:`Consumer` (not started) running ``handler(message, ctx)`` per message.

        ``handler`` is a plain function (run on the consumer's worker threads). One that
        cannot run raises ``TypeError`` here: not callable, an ``async def`` (use
        :class:`~mqkit.AsyncClient`), a generator, or not callable as ``(message, ctx)``.
        Start it with :meth:`run` (or ``consumer.start()``); one never started is named in
        a WARNING when the client closes."""
        plan = plan_consumer(
            queue,
            message_type,
            settings=self._settings,
            prefetch=prefetch,
            concurrency=concurrency,
            retry=retry,
            declared=self.topology,
        )
        check_handler(handler, runtime="sync", role=role("consumer", plan.queue))
        consumer: Consumer[T] = Consumer(
            self._link,
            self._declarer,
            self._publisher,
            self._pipeline,
            plan,
            handler,
            middleware=self._middleware,
        )
        return self._made_consumer(consumer, "consumer")

    def event_bus(self, *, service: str | None = None, exchange: str | None = None) -> EventBus:
        """An :class:`EventBus` on the topic exchange ``exchange`` (default
        ``settings.events_exchange``, declared durable) for ``service``.

        Buses of this client for the same service and exchange share its subscription
        queues, so subscribing one event type on two of them is refused like subscribing
        it twice on one (:class:`~mqkit.ConfigError`: each would get half the events)."""
        owner = service or self._settings.service
        name = exchange or self._settings.events_exchange
        self.declare(Exchange(name))
        with self._lock:
            subscribed = self._subscribed.setdefault((owner, name), set())
        bus = EventBus(
            self._link,
            self._declarer,
            self._publisher,
            self._pipeline,
            service=owner,
            exchange=name,
            subscribed=subscribed,
            middleware=self._middleware,
        )
        with self._lock:
            self._made.append(("bus", bus))
        return bus

    def request(
        self,
        queue: str,
        message: BaseModel,
        response_type: type[R],
        *,
        timeout: float = 5.0,
        headers: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
    ) -> R:
        """Send ``message`` to ``queue`` and wait for the typed reply (direct reply-to).

        ``headers`` go with the request; ``correlation_id`` names its conversation (default:
        inside a handler, the handled message's; else the request's own id). Raises
        :class:`~mqkit.RequestTimeout` after ``timeout`` seconds, :class:`~mqkit.RemoteError`
        if the responder's handler raised, and :class:`~mqkit.PublishUnroutable` if no such
        queue exists.
        """
        return self._requester.request(
            queue,
            message,
            response_type,
            timeout,
            headers=headers,
            correlation_id=correlation_id,
        )

    def responder(
        self,
        queue: str | Queue,
        request_type: type[T],
        handler: Callable[[T, Context], BaseModel],
    ) -> Consumer[T]:
        """A :class:`Consumer` (not started) whose handler's return value is the reply.

        ``handler`` is checked as for :meth:`consumer` (``TypeError`` if it cannot run)."""
        plan = plan_responder(queue, request_type, settings=self._settings, declared=self.topology)
        check_handler(handler, runtime="sync", role=role("responder", plan.queue))
        reply = reply_step(
            self._link, self._publisher, plan.queue, handler, middleware=self._middleware
        )
        consumer: Consumer[T] = Consumer(
            self._link, self._declarer, self._publisher, self._pipeline, plan, handler, reply=reply
        )
        return self._made_consumer(consumer, "responder")

    def _made_consumer(self, consumer: Consumer[T], kind: Made) -> Consumer[T]:
        with self._lock:
            self._made.append((kind, consumer))
        return consumer

    def dead_letters(self, queue: str | Queue) -> DeadLetterQueue:
        """The :class:`DeadLetterQueue` of ``queue`` (its DLQ is ``f"{queue}.dlq"``)."""
        name = queue.name if isinstance(queue, Queue) else queue
        return DeadLetterQueue(self._link, self._declarer, self._publisher, name)

    # -- run / stop ------------------------------------------------------------------------------

    def run(self, drain_timeout: float | None = None) -> None:
        """Start every consumer and bus made on this client, block until :meth:`stop`,
        SIGINT or SIGTERM, then stop them all at once, gracefully: running handlers get
        ``drain_timeout`` seconds (default ``settings.drain_timeout``, 30) to finish and be
        acked; the messages prefetched but not started go back to their queues.

        A second SIGINT or SIGTERM while draining stops at once: the connection is closed
        (the messages still being handled go back to their queues) and ``run()`` raises
        ``SystemExit(130)`` (128 + the signal), which ends the process without a traceback.
        Signals are only handled when ``run()`` is called on the main thread.
        """
        timeout = running.drain_timeout(drain_timeout, self._settings)
        self._link.ensure_open()
        with self._lock:
            made = [item for _, item in self._made]
        signums: list[int] = []
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():

            def on_signal(signum: int, _frame: FrameType | None) -> None:
                # Only a list append: Python runs a signal handler on the main thread between
                # two bytecodes, maybe while that thread holds a lock (inside Event.wait, or
                # logging): taking one here (Event.set, a log line) could deadlock.
                signums.append(signum)

            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            try:
                with self._lock:
                    relays = list(self._relays)
                for relay in relays:
                    relay.start()
                for item in made:
                    item.start()
                running.started(len(made))
                # Short waits: Python runs signal handlers on the main thread between them.
                while not signums and not self._stop.wait(0.2):
                    pass
            finally:
                first = len(signums)  # from here on, a signal is the second one
                self._stop.set()
                if signums:
                    running.signalled(signums[0])
                running.stopping(len(made), timeout, signals=bool(previous))
                drained = self._stop_all(made, timeout, lambda: len(signums) > first)
                if drained:  # after the consumers: what their handlers wrote goes out too
                    self._stop_relays(timeout)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop.clear()  # a stop() before run() ends that run at once; not the next
        if not drained:
            status = running.abandoning(signums[-1])
            self._link.close(timeout=1.0)  # unacked deliveries go back to their queues
            raise SystemExit(status)

    def stop(self) -> None:
        """End :meth:`run`, which then drains (see there); thread-safe, callable from a
        handler or a signal handler, does not wait."""
        self._stop.set()

    def _stop_relays(self, timeout: float) -> None:
        with self._lock:
            relays = list(self._relays)
        for relay in relays:
            relay.stop(timeout)

    def outbox_relay(self, outbox: Outbox) -> OutboxRelay:
        """The relay that publishes ``outbox``'s committed rows through this client (see
        :mod:`mqkit.outbox`; needs ``mqkit[outbox]``). :meth:`run` starts it before the
        consumers and stops it after they drained, so the rows their handlers wrote go out
        too; or call its ``start()``/``stop()``. :meth:`close` stops it."""
        from mqkit.outbox import OutboxRelay  # SQLAlchemy is an extra

        relay = OutboxRelay(self, outbox, self._publisher.publish_many)
        with self._lock:
            self._relays.append(relay)
        return relay

    def _stop_all(
        self,
        items: list[Consumer[Any] | EventBus],
        timeout: float,
        again: Callable[[], bool] | None = None,
    ) -> bool:
        """Stop ``items``, the last made first, all at once (see :func:`stop_all`)."""
        return stop_all(items[::-1], timeout, again)

    # -- health ----------------------------------------------------------------------------------

    def health(self) -> Health:
        """A snapshot for liveness/readiness probes; no I/O. ``publishing_blocked`` says the
        broker blocks publishing (a memory or disk alarm): consumers keep going meanwhile."""
        started = self._consumers()
        return health_of(
            self._link,
            self._publish_link,
            consumers=len(started),
            consumers_attached=sum(1 for consumer in started if consumer.attached),
        )

    def _consumers(self) -> list[Consumer[Any]]:
        """The started consumers (the link restores them after a reconnect)."""
        return [item for item in self._link.restorables if isinstance(item, Consumer)]
