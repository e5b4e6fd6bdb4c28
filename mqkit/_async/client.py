"""AsyncClient: the asyncio runtime's entry point (aio-pika).

```python
async with mqkit.AsyncClient(service="billing") as client:
    producer = await client.producer(ChargeCard, queue="charges")
    await producer.publish(ChargeCard(order_id="42", amount=Decimal("9.90")))
```
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel

from mqkit import explain, running
from mqkit.consumers import plan_consumer, plan_responder
from mqkit.declaring import expand
from mqkit.handlers import check_handler, role
from mqkit.health import Health, health_of
from mqkit.lifecycle import LogObserver, Pipeline
from mqkit.middleware import Middleware, MiddlewareStack
from mqkit.publishing import plan_producer
from mqkit.retry import RetryPolicy
from mqkit.settings import Settings, mask_url
from mqkit.topology import Entity, Exchange, Queue, check_entities

from .bus import AsyncEventBus
from .connection import Link
from .consumer import AsyncConsumer, as_async
from .dead_letters import AsyncDeadLetterQueue
from .declarer import Declarer
from .producer import AsyncProducer
from .publisher import Publisher
from .rpc import Requester, reply_step

if TYPE_CHECKING:
    from mqkit.outbox import AsyncOutboxRelay, Outbox

__all__ = ["AsyncClient"]

log = logging.getLogger("mqkit.client")

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)

Made = Literal["consumer", "responder", "bus"]


class AsyncClient:
    """A connection to RabbitMQ for asyncio services; every I/O method is ``async``.

    ``AsyncClient(settings=None, *, middleware=None, **overrides)`` does no I/O (``middleware``:
    a list of :class:`~mqkit.Middleware` with ``async def`` hooks, applied in order, the first
    outermost; see :mod:`mqkit.middleware`); ``async with`` (or :meth:`connect`) connects,
    raising :class:`~mqkit.ConnectionFailed` within ``connect_timeout``. After that the client
    reconnects by itself (fail-over across ``settings.all_urls``), re-declares its topology
    and restores its consumers.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        middleware: Sequence[Middleware] | None = None,
        **overrides: Any,
    ) -> None:
        self._settings = (settings or Settings()).merged(**overrides)
        self._middleware = MiddlewareStack(middleware, runtime="async", client="AsyncClient")
        # Two connections, as RabbitMQ advises: a memory or disk alarm blocks the publishing
        # one, and consumers (and declares) on the other keep going.
        # What happens is reported to one pipeline; logging is its first observer, then the
        # middlewares' on_event.
        self._pipeline = Pipeline([LogObserver(), *self._middleware.observers])
        self._link = Link(self._settings, self._pipeline, purpose="consuming")
        self._publish_link = Link(self._settings, self._pipeline, purpose="publishing")
        self._publisher = Publisher(self._publish_link, self._pipeline)
        self._declarer = Declarer(self._link)
        self._requester = Requester(self._link, self._publisher, middleware=self._middleware)
        self._link.register(self._declarer)
        self._publish_link.register(self._publisher)
        self._publish_link.register(self._requester)  # replies come on the publishing channel
        self._made: list[tuple[Made, AsyncConsumer[Any] | AsyncEventBus]] = []
        self._relays: list[AsyncOutboxRelay] = []  # outbox relays: started first, stopped last
        self._subscribed: dict[tuple[str, str], set[str]] = {}  # (service, exchange): keys
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stop_requested = False
        self._closed = False

    def __repr__(self) -> str:
        urls = ", ".join(mask_url(u) for u in self._settings.all_urls)
        connected = self._link.connected and self._publish_link.connected
        state = "closed" if self._closed else ("connected" if connected else "idle")
        return f"<AsyncClient service={self._settings.service!r} {urls} {state}>"

    # ----------------------------------------------------------------- properties

    @property
    def settings(self) -> Settings:
        """The settings in use (overrides applied)."""
        return self._settings

    @property
    def topology(self) -> tuple[Entity, ...]:
        """Every queue, exchange and binding declared so far (replayed after a reconnect)."""
        return self._declarer.topology

    # ----------------------------------------------------------------- lifecycle

    async def connect(self) -> None:
        """Connect now (idempotent); ``async with`` does it too. Raises
        :class:`~mqkit.ConnectionFailed` within ``connect_timeout``. Unlike :class:`Client`,
        an ``AsyncClient`` must be connected before it is used."""
        if self._closed:
            raise explain.closed("connect")
        self._loop = asyncio.get_running_loop()
        await self._link.open()
        try:
            await self._publish_link.open()
        except BaseException:
            await self._link.disconnect()  # a later connect() tries again
            raise

    async def close(self) -> None:
        """Stop consumers and buses gracefully (running handlers get
        ``settings.drain_timeout`` seconds to finish), then close the connection; idempotent.

        One WARNING names the queue of each consumer, responder or event bus made on this
        client that was never started (it handled nothing)."""
        if self._closed:
            return
        self._closed = True
        made = list(self._made)
        running.warn_never_started(
            [
                (kind, item)
                for kind, item in made
                if isinstance(item, AsyncConsumer) and kind != "bus"
            ],
            [item for _, item in made if isinstance(item, AsyncEventBus)],
            runtime="async",
        )
        try:  # relays last, so what the handlers wrote goes out too
            await self._stop_all([item for _, item in made], self._settings.drain_timeout)
            await self._stop_relays(self._settings.drain_timeout)
        finally:
            await self._close_links()

    async def _close_links(self) -> None:
        await self._publish_link.close()
        await self._link.close()

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- topology

    async def declare(self, *entities: Entity) -> None:
        """Declare queues, exchanges and bindings (idempotent, cached); as
        :meth:`mqkit.Client.declare`: a durable queue in the shape every mqkit part declares
        it (with its DLQ); one that exists with other arguments is used as it is, with a
        WARNING, unless ``settings.declare='strict'`` (then: TopologyError)."""
        check_entities(entities)
        settings = self._settings
        await self._declarer.declare(
            expand(
                entities, default_type=settings.queue_type, delivery_limit=settings.delivery_limit
            )
        )

    # ----------------------------------------------------------------- factories

    async def producer(
        self,
        message_type: type[T],
        *,
        queue: str | Queue | None = None,
        exchange: str | Exchange | None = None,
        routing_key: str | None = None,
    ) -> AsyncProducer[T]:
        """A producer of ``message_type`` to a ``queue`` (declared with the arguments its
        consumer will use) or to an ``exchange`` (an :class:`~mqkit.Exchange` is declared; a
        name is used as is). Exactly one of ``queue`` / ``exchange``."""
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
            await self._declarer.declare(entities)
        return AsyncProducer(self._link, self._publisher, target, middleware=self._middleware)

    def consumer(
        self,
        queue: str | Queue,
        message_type: type[T],
        handler: Callable[[T, Any], Awaitable[Any]] | Callable[[T, Any], Any],
        *,
        prefetch: int | None = None,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
    ) -> AsyncConsumer[T]:
        """A consumer (not started) running ``async def handler(message, ctx)`` for each
        message of ``queue``; ``retry`` defaults to ``RetryPolicy()``.

        A plain function is accepted too: it runs in a worker thread, so a blocking call in
        it never freezes the event loop (see :mod:`mqkit.handlers`). A handler that cannot
        run raises ``TypeError`` here (not callable, a generator, not callable as
        ``(message, ctx)``). Start it with :meth:`run` (or ``await consumer.start()``); one
        never started is named in a WARNING when the client closes."""
        plan = plan_consumer(
            queue,
            message_type,
            settings=self._settings,
            prefetch=prefetch,
            concurrency=concurrency,
            retry=retry,
            declared=self.topology,
        )
        check_handler(handler, runtime="async", role=role("consumer", plan.queue))
        consumer: AsyncConsumer[T] = AsyncConsumer(
            self._link,
            self._declarer,
            self._publisher,
            self._pipeline,
            plan,
            as_async(handler),
            middleware=self._middleware,
        )
        return self._made_consumer(consumer, "consumer")

    def event_bus(
        self, *, service: str | None = None, exchange: str | None = None
    ) -> AsyncEventBus:
        """An event bus on the topic exchange ``exchange`` (default
        ``settings.events_exchange``) for ``service`` (default ``settings.service``).

        Buses of this client for the same service and exchange share its subscription
        queues, so subscribing one event type on two of them is refused like subscribing
        it twice on one (:class:`~mqkit.ConfigError`: each would get half the events)."""
        owner = service or self._settings.service
        name = exchange or self._settings.events_exchange
        subscribed = self._subscribed.setdefault((owner, name), set())
        bus = AsyncEventBus(
            self._link,
            self._declarer,
            self._publisher,
            self._pipeline,
            service=owner,
            exchange=name,
            subscribed=subscribed,
            middleware=self._middleware,
        )
        self._made.append(("bus", bus))
        return bus

    async def request(
        self,
        queue: str,
        message: BaseModel,
        response_type: type[R],
        *,
        timeout: float = 5.0,
        headers: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
    ) -> R:
        """Send ``message`` to ``queue`` and return the typed reply (direct reply-to).

        ``headers`` go with the request; ``correlation_id`` names its conversation (default:
        inside a handler, the handled message's; else the request's own id). Raises
        :class:`~mqkit.RequestTimeout`, :class:`~mqkit.RemoteError` (the responder raised),
        :class:`~mqkit.PublishUnroutable` (no such queue).
        """
        return await self._requester.request(
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
        handler: Callable[[T, Any], Awaitable[BaseModel]] | Callable[[T, Any], BaseModel],
    ) -> AsyncConsumer[T]:
        """A consumer (not started) whose ``async def handler(request, ctx)`` return value is
        the reply. Errors are sent back to the caller (as :class:`~mqkit.RemoteError`), not
        retried. ``handler`` is checked, and a plain function runs in a worker thread, as
        for :meth:`consumer`."""
        plan = plan_responder(queue, request_type, settings=self._settings, declared=self.topology)
        check_handler(handler, runtime="async", role=role("responder", plan.queue))
        wrapped = as_async(handler)
        reply = reply_step(
            self._link, self._publisher, plan.queue, wrapped, middleware=self._middleware
        )
        consumer: AsyncConsumer[T] = AsyncConsumer(
            self._link,
            self._declarer,
            self._publisher,
            self._pipeline,
            plan,
            wrapped,
            reply=reply,
        )
        return self._made_consumer(consumer, "responder")

    def _made_consumer(self, consumer: AsyncConsumer[T], kind: Made) -> AsyncConsumer[T]:
        self._made.append((kind, consumer))
        return consumer

    def dead_letters(self, queue: str | Queue) -> AsyncDeadLetterQueue:
        """The dead letters of ``queue`` (its DLQ is ``f"{queue}.dlq"``)."""
        name = queue.name if isinstance(queue, Queue) else queue
        return AsyncDeadLetterQueue(self._link, self._declarer, self._publisher, name)

    # ----------------------------------------------------------------- run / stop

    async def run(self, drain_timeout: float | None = None) -> None:
        """Start every consumer and bus made on this client, wait until :meth:`stop`,
        SIGINT or SIGTERM, then stop them all at once, gracefully: running handlers get
        ``drain_timeout`` seconds (default ``settings.drain_timeout``, 30) to finish and be
        acked; the messages prefetched but not started go back to their queues.

        A second SIGINT or SIGTERM while draining stops at once: the connection is closed
        (the messages still being handled go back to their queues) and ``run()`` raises
        ``SystemExit(130)`` (128 + the signal), which ends ``asyncio.run()`` and the process
        without a traceback. Signals are only handled when the loop runs on the main thread.
        """
        timeout = running.drain_timeout(drain_timeout, self._settings)
        self._loop = asyncio.get_running_loop()
        if self._stop_event is None:
            self._stop_event = asyncio.Event()
        if self._stop_requested:
            self._stop_event.set()
        stop_event = self._stop_event
        made = [item for _, item in self._made]
        again = asyncio.Event()  # a second signal, while draining
        signums: list[int] = []

        def on_signal(signum: int) -> None:
            signums.append(signum)
            if self._stop_requested or stop_event.is_set():
                again.set()
            else:
                running.signalled(signum)
                self.stop()

        restore, signals = self._install_signal_handlers(on_signal)
        try:
            try:
                for relay in list(self._relays):
                    await relay.start()
                for item in made:
                    if not item.started:
                        await item.start()
                running.started(len(made))
                await stop_event.wait()
            finally:
                stop_event.set()  # from here on, a signal is the second one
                running.stopping(len(made), timeout, signals=signals)
                drained = await self._stop_all(made, timeout, again)
                if drained:  # after the consumers: what their handlers wrote goes out too
                    await self._stop_relays(timeout)
        finally:
            restore()
            stop_event.clear()
            self._stop_requested = False
        if not drained:
            status = running.abandoning(signums[-1])
            self._closed = True  # close() has nothing left to wait for
            await self._close_links()  # unacked deliveries go back to their queues
            raise SystemExit(status)

    def stop(self) -> None:
        """End :meth:`run`, which then drains (see there). Safe to call from any thread and
        from a signal handler; does not wait."""
        self._stop_requested = True
        loop, event = self._loop, self._stop_event
        if loop is None or event is None:
            return
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            event.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(event.set)

    async def _stop_relays(self, timeout: float) -> None:
        for relay in list(self._relays):
            await relay.stop(timeout)

    def outbox_relay(self, outbox: Outbox) -> AsyncOutboxRelay:
        """The relay that publishes ``outbox``'s committed rows through this client (see
        :mod:`mqkit.outbox`; needs ``mqkit[outbox]`` and an ``AsyncEngine``). :meth:`run`
        starts it before the consumers and stops it after they drained, so the rows their
        handlers wrote go out too; or await its ``start()``/``stop()``. :meth:`close` stops
        it."""
        from mqkit.outbox import AsyncOutboxRelay  # SQLAlchemy is an extra

        relay = AsyncOutboxRelay(self, outbox, self._publisher.publish_many)
        self._relays.append(relay)
        return relay

    async def _stop_all(
        self,
        items: list[AsyncConsumer[Any] | AsyncEventBus],
        timeout: float,
        again: asyncio.Event | None = None,
    ) -> bool:
        """Stop ``items`` all at once (each within ``timeout`` seconds); ``False`` as soon as
        ``again`` is set (the stops carry on in the background). Re-raises the first error a
        stop raised."""
        stops = asyncio.ensure_future(
            asyncio.gather(*(item.stop(timeout) for item in reversed(items) if item.started))
        )
        if again is None:
            await stops
            return True
        waiter = asyncio.ensure_future(again.wait())
        try:
            await asyncio.wait({stops, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not stops.done():
            stops.add_done_callback(_retrieve)  # abandoned: nobody awaits it any more
            return False
        stops.result()
        return True

    def _install_signal_handlers(
        self, on_signal: Callable[[int], None]
    ) -> tuple[Callable[[], None], bool]:
        """Have SIGINT and SIGTERM call ``on_signal(signum)``; how to undo it, and whether
        any was installed (only on the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return (lambda: None), False
        loop = asyncio.get_running_loop()
        installed: list[tuple[signal.Signals, Any]] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous = signal.getsignal(sig)
                loop.add_signal_handler(sig, on_signal, int(sig))
            except (NotImplementedError, RuntimeError, ValueError):  # not on this platform
                continue
            installed.append((sig, previous))

        def restore() -> None:
            for sig, previous in installed:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
                    signal.signal(sig, previous)

        return restore, bool(installed)

    # ----------------------------------------------------------------- health

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

    def _consumers(self) -> list[AsyncConsumer[Any]]:
        """The started consumers (the link restores them after a reconnect)."""
        return [item for item in self._link.restorables if isinstance(item, AsyncConsumer)]


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned task's outcome as seen (no "exception was never retrieved")."""
    if not task.cancelled():
        task.exception()
