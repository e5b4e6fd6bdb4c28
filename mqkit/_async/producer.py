"""Typed, confirmed publishing: :class:`AsyncProducer`."""

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

__all__ = ["AsyncProducer"]

T = TypeVar("T", bound=BaseModel)


class AsyncProducer(Generic[T]):
    """Publishes messages of one type; made by :meth:`AsyncClient.producer`.

    Every publish is mandatory and confirmed: ``await producer.publish(msg)`` returns the
    message id once the broker has taken responsibility for it, or raises
    :class:`~mqkit.PublishUnroutable`, :class:`~mqkit.PublishNacked` (nacked again after being
    sent once more on a new channel), :class:`~mqkit.PublishTooLarge` or
    :class:`~mqkit.PublishTimeout`. Safe to share across tasks.
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
        return f"<AsyncProducer[{self._target.message_type.__name__}] {self._target.describe()}>"

    @property
    def message_type(self) -> type[T]:
        """The type of message this producer publishes."""
        return self._target.message_type

    async def publish(
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
        """Publish one message (``expiration`` in seconds); its id once confirmed.

        Raises :class:`~mqkit.PublishUnroutable` (no queue bound), :class:`~mqkit.PublishNacked`,
        :class:`~mqkit.PublishTooLarge` (above ``max_message_size``, or the broker's own limit:
        never stored), :class:`~mqkit.PublishTimeout` (no confirm within ``confirm_timeout``,
        the link included, or while a broker memory or disk alarm blocks publishing; it may
        have been stored after all: send it again with the same ``message_id=``, so an
        idempotent consumer drops the duplicate), :class:`~mqkit.TopologyError` (no such
        exchange), ``TypeError`` (not a T).
        """
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
        exchange = self._target.exchange
        [message_id] = await self._middleware.publish_prepared_async(
            exchange, [(envelope, key)], self._send_one
        )
        return message_id

    async def publish_many(
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
        """Publish many messages with hundreds of confirms in flight; their ids once all are
        confirmed. On failure raises a :class:`~mqkit.PublishError` (the specific subclass if
        every failure is of one kind) whose ``unconfirmed`` lists the ids not confirmed: what
        to send again (each with ``publish(message, message_id=id)``). A message too large
        fails alone; the others are sent."""
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
        return await self._middleware.publish_prepared_async(
            self._target.exchange, prepared, self._send_many
        )

    async def _send_one(self, prepared: Sequence[tuple[Envelope, str]]) -> list[str]:
        [(envelope, key)] = prepared
        await self._publisher.publish(envelope, exchange=self._target.exchange, routing_key=key)
        return [envelope.message_id]

    async def _send_many(self, prepared: Sequence[tuple[Envelope, str]]) -> list[str]:
        exchange = self._target.exchange
        await self._publisher.publish_many(
            [(envelope, exchange, key) for envelope, key in prepared]
        )
        return [envelope.message_id for envelope, _ in prepared]
