"""AsyncEventBus: publish :class:`~mqkit.Event` s on a topic exchange and subscribe to them.

Each (service, subscription) has one durable queue, so every service gets each matching event
once and a service's instances compete for it. ``broadcast=True`` gives every running
instance its own temporary queue instead (retries in process only; give-ups go to a durable
DLQ the service's instances share).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

from mqkit.consumers import plan_subscriber
from mqkit.handlers import check_handler, role
from mqkit.lifecycle import Pipeline
from mqkit.messages import Envelope, Event
from mqkit.middleware import NO_MIDDLEWARE, MiddlewareStack
from mqkit.publishing import PublishTarget
from mqkit.retry import RetryPolicy
from mqkit.topology import Exchange

from .consumer import AsyncConsumer

if TYPE_CHECKING:
    from .connection import Link
    from .declarer import Declarer
    from .publisher import Publisher

__all__ = ["AsyncEventBus"]

H = TypeVar("H", bound=Callable[..., Any])


class AsyncEventBus:
    """Events on the topic exchange ``settings.events_exchange``; made by
    :meth:`AsyncClient.event_bus`.

    ```python
    bus = client.event_bus()

    @bus.subscribe(OrderPlaced)
    async def reserve_stock(event: OrderPlaced, ctx: mqkit.Context) -> None: ...

    async with bus:
        await bus.publish(OrderPlaced(order_id="42", total=Decimal("9.90")))
    ```

    Handlers are ``async def`` functions, awaited on the loop; a plain function is accepted
    and runs in a worker thread (see :mod:`mqkit.handlers`). Two handlers for one event
    type (or pattern) on the queue the bus names itself would each get half the events, so
    a second one is refused with :class:`~mqkit.ConfigError` (pass ``queue=`` to give it its
    own queue), also when it is on another ``event_bus()`` of the same client, service and
    exchange (``subscribed``, the keys those buses share, is given by the client).
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
        self._consumers: list[AsyncConsumer[Any]] = []
        self._keys: set[str] = set() if subscribed is None else subscribed
        self._started = False
        self._ever_started = False
        self._stopped = asyncio.Event()
        self._declared = False  # the exchange (the declarer caches it too; this skips the lookup)
        self._background: set[asyncio.Task[None]] = set()

    def __await__(self) -> Generator[None, None, AsyncEventBus]:
        """``await client.event_bus(...)`` works too. Making one does no I/O, so the client
        returns it directly; awaiting it gives the same object, for code that awaits every
        AsyncClient method."""
        return self
        yield  # a generator that returns at once

    def __repr__(self) -> str:
        return f"<AsyncEventBus exchange={self._exchange!r} service={self._service!r}>"

    @property
    def exchange(self) -> str:
        """The topic exchange's name."""
        return self._exchange

    @property
    def service(self) -> str:
        """The service whose queues this bus's subscriptions use."""
        return self._service

    @property
    def consumers(self) -> tuple[AsyncConsumer[Any], ...]:
        """One consumer per subscription, in the order subscribed (to check on them: each
        one's ``started``, ``attached``, ``queue``)."""
        return tuple(self._consumers)

    @property
    def started(self) -> bool:
        """Whether :meth:`start` ran and :meth:`stop` did not (subscriptions added meanwhile
        start at once)."""
        return self._started

    @property
    def ever_started(self) -> bool:
        """Whether :meth:`start` ever succeeded (:meth:`AsyncClient.close` warns about a bus
        with subscriptions that never was)."""
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
        """Subscribe ``handler`` to an :class:`~mqkit.Event` subclass (its ``event_type``) or
        to a topic pattern such as ``"orders.*"`` (events decoded by their ``type``).

        Without ``handler`` it is a decorator. Subscriptions start with the bus. A handler
        that cannot run (not callable, not taking ``(event, ctx)``) raises ``TypeError``; a
        second subscription to the same target on this service's queue raises
        :class:`~mqkit.ConfigError` (see the class).
        """
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
        check_handler(handler, runtime="async", role=role("subscription", target))
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
        consumer: AsyncConsumer[Any] = AsyncConsumer(
            self._link,
            self._declarer,
            self._publisher,
            self._pipeline,
            plan,
            handler,
            middleware=self._middleware,
        )
        self._consumers.append(consumer)
        if self._started:
            # Subscribing on a running bus: start the new subscription in the background.
            task = asyncio.get_running_loop().create_task(consumer.start())
            self._background.add(task)  # a task nothing refers to may be collected mid-way
            task.add_done_callback(self._background.discard)
            task.add_done_callback(_start_failed)
        return handler

    async def publish(
        self,
        event: Event,
        *,
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        mandatory: bool = False,
    ) -> str:
        """Publish ``event`` (confirmed); its message id. Routing key: its ``event_type``.

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
        if not self._declared:
            await self._declare()

        async def send(prepared: Sequence[tuple[Envelope, str]]) -> list[str]:
            [(envelope, key)] = prepared
            await self._publisher.publish(
                envelope, exchange=self._exchange, routing_key=key, mandatory=mandatory
            )
            return [envelope.message_id]

        [message_id] = await self._middleware.publish_prepared_async(
            self._exchange, [(envelope, key)], send
        )
        return message_id

    async def start(self) -> None:
        """Declare the exchange and start every subscription (returns once consuming)."""
        await self._declare()
        self._stopped.clear()
        for consumer in self._consumers:
            await consumer.start()
        self._started = True
        self._ever_started = True

    async def _declare(self) -> None:
        await self._declarer.declare([Exchange(self._exchange)])
        self._declared = True

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop every subscription gracefully (see :meth:`AsyncConsumer.stop`)."""
        await asyncio.gather(*(c.stop(timeout) for c in self._consumers))
        self._started = False
        self._stopped.set()

    async def run(self) -> None:
        """Start, then wait until :meth:`stop`."""
        await self.start()
        await self._stopped.wait()

    async def __aenter__(self) -> AsyncEventBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _start_failed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logging.getLogger("mqkit.consumer").error(
            "a subscription added to a running bus failed to start: %s", task.exception()
        )
