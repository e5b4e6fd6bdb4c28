"""Typed, confirmed publishing: :class:`Producer`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel

from mqkit.messages import Envelope
from mqkit.middleware import NO_MIDDLEWARE, MiddlewareStack
from mqkit.publishing import PublishTarget

if TYPE_CHECKING:
    from .connection import Link
    from .publisher import Publisher

__all__ = ["Producer"]

T = TypeVar("T", bound=BaseModel)


class Producer(Generic[T]):
    """Publishes ``T`` messages to a queue or an exchange and waits for the broker's confirm.

    Every publish is mandatory and confirmed: :meth:`publish` returns the message id once the
    broker has taken responsibility for the message, or raises
    :class:`~mqkit.PublishUnroutable` (no queue bound), :class:`~mqkit.PublishNacked` (nacked
    again after being sent once more on a new channel), :class:`~mqkit.PublishTooLarge` (above
    ``max_message_size``, or the broker's own limit: never stored) or
    :class:`~mqkit.PublishTimeout` (no confirm within ``confirm_timeout``, e.g. while the link
    is down or a broker memory or disk alarm blocks publishing). A message that timed out may
    have been stored after all: to send it again, publish it with the same ``message_id=``
    (its id is in ``.unconfirmed``), so an idempotent consumer drops the duplicate.

    **Thread safety.** A producer may be shared by any number of threads. It holds no I/O
    state: each call encodes on the calling thread, hands the message to the client's IO
    thread (the only thread that touches the pika connection) and waits on its own confirm,
    so concurrent publishes are pipelined on one confirm channel and each caller gets exactly
    its own result. The broker returns an unroutable message with its ``message_id`` only, so
    do not give the same ``message_id=`` to publishes that may be in flight at once: a return
    could be pinned on the wrong one (and the unroutable one reported as confirmed).

    ```python
    producer = client.producer(ChargeCard, queue="charges")
    message_id = producer.publish(ChargeCard(order_id="42", amount=Decimal("9.90")))
    ```
    """

    def __init__(
        self,
        link: Link,
        publisher: Publisher,
        target: PublishTarget[T],
        *,
        middleware: MiddlewareStack = NO_MIDDLEWARE,
    ) -> None:
        self._link = link
        self._publisher = publisher
        self._target = target
        self._middleware = middleware

    def __repr__(self) -> str:
        return f"<Producer[{self._target.message_type.__name__}] {self._target.describe()}>"

    @property
    def message_type(self) -> type[T]:
        """The type of message this producer publishes."""
        return self._target.message_type

    def publish(
        self,
        message: T,
        *,
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        priority: int | None = None,
        expiration: float | None = None,
    ) -> str:
        """Publish one message (``expiration`` in seconds); return its id once confirmed."""
        [(envelope, key)] = self._target.prepare(
            [message],
            service=self._link.settings.service,
            routing_key=routing_key,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            priority=priority,
            expiration=expiration,
        )
        self._link.ensure_open()
        exchange = self._target.exchange
        [message_id] = self._middleware.publish_prepared(
            exchange, [(envelope, key)], self._send_one
        )
        return message_id

    def publish_many(
        self,
        messages: Iterable[T],
        *,
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        priority: int | None = None,
        expiration: float | None = None,
    ) -> list[str]:
        """Publish many messages with up to a thousand confirms in flight; return their ids
        (in order) once all are confirmed.

        On failure raises a :class:`~mqkit.PublishError` (the specific subclass when all
        failures are of one kind) whose ``unconfirmed`` lists the ids not confirmed: what to
        send again (each with ``publish(message, message_id=id)``, so a copy that was stored
        after all is recognised as a duplicate). A message too large fails alone; the others
        are sent. ``message_id=`` with more than one message raises
        :class:`~mqkit.ConfigError`: each message gets its own id.
        """
        prepared = self._target.prepare(
            messages,
            service=self._link.settings.service,
            routing_key=routing_key,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            priority=priority,
            expiration=expiration,
        )
        if not prepared:
            return []
        self._link.ensure_open()
        return self._middleware.publish_prepared(self._target.exchange, prepared, self._send_many)

    def _send_one(self, prepared: Sequence[tuple[Envelope, str]]) -> list[str]:
        [(envelope, key)] = prepared
        self._publisher.publish(envelope, exchange=self._target.exchange, routing_key=key)
        return [envelope.message_id]

    def _send_many(self, prepared: Sequence[tuple[Envelope, str]]) -> list[str]:
        exchange = self._target.exchange
        self._publisher.publish_many([(envelope, exchange, key) for envelope, key in prepared])
        return [envelope.message_id for envelope, _ in prepared]
