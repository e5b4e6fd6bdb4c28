"""The event bus: a topic exchange, one durable queue per (service, subscription).

Instances of a service share their subscription's queue (competing consumers), so every
service gets each matching event once. A ``broadcast=True`` subscription gets a classic
exclusive auto-delete queue per instance instead (every running instance gets a copy); its
retries are in-process only and its give-ups go to a durable DLQ the service's instances share.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

from mqkit.consumers import plan_subscriber
from mqkit.handlers import check_handler, role
from mqkit.lifecycle import Pipeline
from mqkit.messages import Envelope, Event
from mqkit.middleware import NO_MIDDLEWARE, MiddlewareStack
from mqkit.publishing import PublishTarget
from mqkit.retry import RetryPolicy
from mqkit.topology import Exchange

from .consumer import Consumer, stop_all

if TYPE_CHECKING:
    from .connection import Link
    from .declarer import Declarer
    from .publisher import Publisher

__all__ = ["EventBus"]

H = TypeVar("H", bound=Callable[..., Any])

# Buses of one client share the set of keys subscribed to (see EventBus): check-and-add
# under one lock. Subscribing is rare, so one lock for every bus is plenty.
_PLANNING = threading.Lock()


class EventBus:
    """Publish events and subscribe handlers to them, by type or by topic pattern.

    ```python
    bus = client.event_bus()

    @bus.subscribe(OrderPlaced)
    def reserve_stock(event: OrderPlaced, ctx: mqkit.Context) -> None: ...

    bus.subscribe("orders.*", audit)        # decoded by the `type` property
    bus.publish(OrderPlaced(order_id="42", total=Decimal("9.90")))
    bus.run()                               # or bus.start() / bus.stop(), or `with bus:`
    ```

    Handlers are plain functions (an ``async def`` one is refused with ``TypeError``: use
    :class:`~mqkit.AsyncClient`). Two handlers for one event type (or pattern) on the queue
    the bus names itself would each get half the events, so a second one is refused with
    :class:`~mqkit.ConfigError` (pass ``queue=`` to give it its own queue), also when it is
    on another ``event_bus()`` of the same client, service and exchange (``subscribed``, the
    keys those buses share, is given by the client).
    """

    def __init__(
        self,
        link: Link,
        declarer: Declarer,
        publisher: Publisher,
        pipeline: Pipeline,
        *,
        service: str,
        exchange: str,
        subscribed: set[str] | None = None,
        middleware: MiddlewareStack = NO_MIDDLEWARE,
    ) -> None:
        self._link = link
        self._declarer = declarer
        self._publisher = publisher
        self._pipeline = pipeline
        self._middleware = middleware
        self._service = service
        self._exchange = exchange
        self._target = PublishTarget(Event, exchange, owner="EventBus")
        self._consumers: list[Consumer[Any]] = []
        self._keys: set[str] = set() if subscribed is None else subscribed
        self._lock = threading.Lock()
        self._started = False
        self._ever_started = False
        self._stopped = threading.Event()

    def __repr__(self) -> str:
        return f"<EventBus exchange={self._exchange!r} service={self._service!r}>"

    @property
    def exchange(self) -> str:
        """The topic exchange's name."""
        return self._exchange

    @property
    def service(self) -> str:
        """The service whose queues this bus's subscriptions use."""
        return self._service

    @property
    def consumers(self) -> tuple[Consumer[Any], ...]:
        """One consumer per subscription, in the order subscribed (to check on them: each
        one's ``started``, ``attached``, ``queue``)."""
        with self._lock:
            return tuple(self._consumers)

    @property
    def started(self) -> bool:
        """Whether :meth:`start` ran and :meth:`stop` did not (subscriptions added meanwhile
        start at once)."""
        return self._started

    @property
    def ever_started(self) -> bool:
        """Whether :meth:`start` ever ran (:meth:`Client.close` warns about a bus with
        subscriptions that never was)."""
        return self._ever_started

    @overload
    def subscribe(
        self,
        target: type[Event] | str,
        handler: None = None,
        *,
        broadcast: bool = False,
        retry: RetryPolicy | None = None,
        queue: str | None = None,
        prefetch: int | None = None,
        concurrency: int = 1,
    ) -> Callable[[H], H]: ...

    @overload
    def subscribe(
        self,
        target: type[Event] | str,
        handler: H,
        *,
        broadcast: bool = False,
        retry: RetryPolicy | None = None,
        queue: str | None = None,
        prefetch: int | None = None,
        concurrency: int = 1,
    ) -> H: ...

    def subscribe(
        self,
        target: type[Event] | str,
        handler: H | None = None,
        *,
        broadcast: bool = False,
        retry: RetryPolicy | None = None,
        queue: str | None = None,
        prefetch: int | None = None,
        concurrency: int = 1,
    ) -> H | Callable[[H], H]:
        """Run ``handler(event, ctx)`` for each matching event; without ``handler``, a
        decorator. ``target``: an :class:`~mqkit.Event` subclass or a topic pattern.

        A handler that cannot run (not callable, ``async def``, not taking ``(event, ctx)``)
        raises ``TypeError``; a second subscription to the same target on this service's
        queue raises :class:`~mqkit.ConfigError` (see the class)."""
        if handler is None:

            def decorate(fn: H) -> H:
                self.subscribe(
                    target,
                    fn,
                    broadcast=broadcast,
                    retry=retry,
                    queue=queue,
                    prefetch=prefetch,
                    concurrency=concurrency,
                )
                return fn

            return decorate
        check_handler(handler, runtime="sync", role=role("subscription", target))
        with _PLANNING:
            plan = plan_subscriber(
                target,
                settings=self._link.settings,
                service=self._service,
                exchange=Exchange(self._exchange),
                subscribed=self._keys,
                broadcast=broadcast,
                queue=queue,
                retry=retry,
                prefetch=prefetch,
                concurrency=concurrency,
            )
        consumer: Consumer[Any] = Consumer(
            self._link,
            self._declarer,
            self._publisher,
            self._pipeline,
            plan,
            handler,
            middleware=self._middleware,
        )
        with self._lock:
            self._consumers.append(consumer)
            running = self._started
        if running:
            consumer.start()
        return handler

    def publish(
        self,
        event: Event,
        *,
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        mandatory: bool = False,
    ) -> str:
        """Publish ``event`` (routing key: its ``event_type``); return its id once confirmed.

        No subscriber is fine, unless ``mandatory=True`` (then
        :class:`~mqkit.PublishUnroutable`).
        """
        [(envelope, key)] = self._target.prepare(
            [event],
            service=self._service,
            routing_key=routing_key,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
        )
        self._link.ensure_open()

        def send(prepared: Sequence[tuple[Envelope, str]]) -> list[str]:
            [(envelope, key)] = prepared
            self._publisher.publish(
                envelope, exchange=self._exchange, routing_key=key, mandatory=mandatory
            )
            return [envelope.message_id]

        return self._middleware.publish_prepared(self._exchange, [(envelope, key)], send)[0]

    def start(self) -> None:
        """Start every subscription (and any added later); idempotent."""
        with self._lock:
            self._started = True
            self._ever_started = True
            self._stopped.clear()
            subscriptions = list(self._consumers)
        for consumer in subscriptions:
            consumer.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every subscription gracefully (see :meth:`Consumer.stop`), all at once, so the
        bus stops within ``timeout`` (plus the consumer's slack), not once per subscription;
        idempotent. Re-raises the first error a subscription's stop raised."""
        with self._lock:
            self._started = False
            subscriptions = list(self._consumers)
        try:
            stop_all(subscriptions, timeout)
        finally:
            self._stopped.set()

    def run(self) -> None:
        """Start, then block until :meth:`stop` (Ctrl-C stops gracefully)."""
        self.start()
        try:
            while not self._stopped.wait(0.5):
                pass
        except KeyboardInterrupt:
            self.stop()

    def __enter__(self) -> EventBus:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
