"""The blocking client: :class:`Client`, on pika, with one IO thread per client."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

from pydantic import BaseModel

from mqkit import explain
from mqkit._sync.bus import EventBus
from mqkit._sync.connection import Link
from mqkit._sync.consumer import Consumer
from mqkit._sync.dead_letters import DeadLetterQueue
from mqkit._sync.declarer import Declarer
from mqkit._sync.producer import Producer
from mqkit._sync.publisher import Publisher
from mqkit._sync.rpc import Requester, reply_step
from mqkit.consumers import plan_consumer, plan_responder
from mqkit.context import Context
from mqkit.declaring import expand
from mqkit.health import Health
from mqkit.publishing import plan_producer
from mqkit.retry import RetryPolicy
from mqkit.settings import Settings, mask_url
from mqkit.topology import Entity, Exchange, Queue, check_entities

__all__ = ["Client"]

log = logging.getLogger("mqkit")

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)

_CLOSE_STOP_TIMEOUT = 10.0  # close() lets running handlers finish this long


class Client:
    """A blocking mqkit client on pika; thread-safe.

    ``Client(settings=None, **overrides)``: any :class:`~mqkit.Settings` field can be given as
    a keyword. Nothing happens until the client is used: entering the context manager
    connects (raising :class:`~mqkit.ConnectionFailed` within ``connect_timeout``), leaving it
    closes. The connection lives on an IO thread of its own that keeps heartbeats going while
    handlers run on worker threads; after a connection loss it reconnects (fail-over across
    ``urls``), re-declares :attr:`topology` and restores consumers by itself.

    ```python
    with mqkit.Client(service="billing") as client:
        client.producer(ChargeCard, queue="charges").publish(ChargeCard(order_id="42"))
        client.consumer("charges", ChargeCard, charge)
        client.run()    # until stop(), SIGINT or SIGTERM
    ```
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        self._settings = (settings or Settings()).merged(**overrides)
        self._link = Link(self._settings)
        self._publisher = Publisher(self._link, self._settings.confirm_timeout)
        self._declarer = Declarer(self._link, self._settings)
        self._requester = Requester(self)
        self._link.attach(self._declarer)
        self._link.attach(self._publisher)
        self._link.attach(self._requester)
        self._lock = threading.RLock()
        self._opened = False
        self._made: list[Consumer[Any] | EventBus] = []
        self._active: list[Consumer[Any]] = []
        self._stop = threading.Event()

    def __repr__(self) -> str:
        url = self._link.url or mask_url(self._settings.all_urls[0])
        return f"Client(url={url!r}, service={self._settings.service!r})"

    @property
    def settings(self) -> Settings:
        """The settings in use."""
        return self._settings

    @property
    def topology(self) -> tuple[Entity, ...]:
        """Every queue, exchange and binding declared so far (re-declared after a reconnect)."""
        return self._declarer.topology

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Client:
        self._ensure_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def connect(self) -> None:
        """Connect now (idempotent); entering the context manager does it too, and so does
        the first use. Raises :class:`~mqkit.ConnectionFailed` within ``connect_timeout``."""
        self._ensure_open()

    def _ensure_open(self) -> None:
        if self._opened:
            return
        with self._lock:
            if self._link.closed:
                raise explain.closed("connect")
            if not self._opened:
                self._link.open()
                self._opened = True

    def close(self) -> None:
        """Stop every consumer and bus of this client (gracefully), then close the
        connection. Idempotent."""
        with self._lock:
            if self._link.closed:
                return
            made = list(self._made)
            active = list(self._active)
        for item in reversed(made):
            item.stop(_CLOSE_STOP_TIMEOUT)
        for consumer in active:
            consumer.stop(_CLOSE_STOP_TIMEOUT)
        self._link.close()

    def run(self) -> None:
        """Start every consumer and bus made on this client, block until :meth:`stop`,
        SIGINT or SIGTERM, then stop them gracefully."""
        self._ensure_open()
        with self._lock:
            made = list(self._made)
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():

            def on_signal(signum: int, _frame: FrameType | None) -> None:
                log.info("mqkit: signal %d received; stopping", signum)
                self._stop.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            for item in made:
                item.start()
            log.info("mqkit: running %d consumer(s) and bus(es); waiting for stop", len(made))
            # Short waits: Python runs signal handlers on the main thread between them.
            while not self._stop.wait(0.2):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop.clear()  # a stop() before run() ends that run at once; not the next
            for item in reversed(made):
                item.stop()

    def stop(self) -> None:
        """End :meth:`run` (thread-safe; callable from a handler or a signal handler)."""
        self._stop.set()

    def health(self) -> Health:
        """A snapshot for liveness/readiness probes; no I/O."""
        with self._lock:
            active = list(self._active)
        connected = self._link.connected
        return Health(
            connected=connected,
            url=self._link.url if connected else "",
            consumers=len(active),
            consumers_attached=sum(1 for consumer in active if consumer._attached),
            reconnects=self._link.reconnects,
            last_error=self._link.last_error,
        )

    def _consumer_started(self, consumer: Consumer[Any]) -> None:
        with self._lock:
            if consumer not in self._active:
                self._active.append(consumer)

    def _consumer_stopped(self, consumer: Consumer[Any]) -> None:
        with self._lock:
            if consumer in self._active:
                self._active.remove(consumer)

    # -- topology and publishing --------------------------------------------------------------

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
        self._ensure_open()
        self._declarer.declare(*self._shaped(entities))

    def _shaped(self, entities: tuple[Entity, ...]) -> list[Entity]:
        settings = self._settings
        return expand(
            entities, default_type=settings.queue_type, delivery_limit=settings.delivery_limit
        )

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
            self._ensure_open()
            self._declarer.declare(*entities)
        return Producer(self, target)

    # -- consuming -------------------------------------------------------------------------------

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
        """A :class:`Consumer` (not started) running ``handler(message, ctx)`` per message."""
        plan = plan_consumer(
            queue,
            message_type,
            settings=self._settings,
            prefetch=prefetch,
            concurrency=concurrency,
            retry=retry,
            declared=self.topology,
        )
        return self._made_consumer(Consumer(self, plan, handler))

    def event_bus(self, *, service: str | None = None, exchange: str | None = None) -> EventBus:
        """An :class:`EventBus` on the topic exchange ``exchange`` (default
        ``settings.events_exchange``, declared durable) for ``service``."""
        name = exchange or self._settings.events_exchange
        self.declare(Exchange(name))
        bus = EventBus(self, service=service or self._settings.service, exchange=name)
        with self._lock:
            self._made.append(bus)
        return bus

    def request(
        self, queue: str, message: BaseModel, response_type: type[R], *, timeout: float = 5.0
    ) -> R:
        """Send ``message`` to ``queue`` and wait for the typed reply (direct reply-to).

        Raises :class:`~mqkit.RequestTimeout` after ``timeout`` seconds,
        :class:`~mqkit.RemoteError` if the responder's handler raised, and
        :class:`~mqkit.PublishUnroutable` if no such queue exists.
        """
        return self._requester.request(queue, message, response_type, timeout)

    def responder(
        self,
        queue: str | Queue,
        request_type: type[T],
        handler: Callable[[T, Context], BaseModel],
    ) -> Consumer[T]:
        """A :class:`Consumer` (not started) whose handler's return value is the reply."""
        plan = plan_responder(queue, request_type, settings=self._settings, declared=self.topology)
        reply = reply_step(self, plan.queue, handler)
        return self._made_consumer(Consumer(self, plan, handler, reply=reply))

    def _made_consumer(self, consumer: Consumer[T]) -> Consumer[T]:
        with self._lock:
            self._made.append(consumer)
        return consumer

    def dead_letters(self, queue: str | Queue) -> DeadLetterQueue:
        """The :class:`DeadLetterQueue` of ``queue`` (its DLQ is ``f"{queue}.dlq"``)."""
        return DeadLetterQueue(self, queue.name if isinstance(queue, Queue) else queue)
