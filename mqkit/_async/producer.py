"""AsyncProducer[T]: publish typed messages to a queue or an exchange, confirmed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel

from mqkit.messages import Envelope, Event, encode

if TYPE_CHECKING:
    from .connection import Link

__all__ = ["AsyncProducer"]

T = TypeVar("T", bound=BaseModel)


class AsyncProducer(Generic[T]):
    """Publishes messages of one type; made by :meth:`AsyncClient.producer`.

    Every publish is mandatory and confirmed: ``await producer.publish(msg)`` returns the
    message id once the broker has taken responsibility for it. Safe to share across tasks.
    """

    def __init__(
        self,
        link: Link,
        message_type: type[T],
        *,
        service: str,
        exchange: str,
        routing_key: str | None,
        queue: str | None,
    ) -> None:
        self._link = link
        self._type = message_type
        self._service = service
        self._exchange = exchange
        self._routing_key = routing_key
        self._queue = queue

    def __repr__(self) -> str:
        target = f"queue={self._queue!r}" if self._queue else f"exchange={self._exchange!r}"
        return f"<AsyncProducer[{self._type.__name__}] {target}>"

    @property
    def message_type(self) -> type[T]:
        """The type of message this producer publishes."""
        return self._type

    def _route(self, message: T, routing_key: str | None) -> str:
        if self._queue is not None:
            return self._queue
        if routing_key is not None:
            return routing_key
        if self._routing_key is not None:
            return self._routing_key
        if isinstance(message, Event):
            return type(message).event_type
        return ""

    def _envelope(
        self,
        message: T,
        *,
        headers: Mapping[str, Any] | None,
        message_id: str | None,
        correlation_id: str | None,
        priority: int | None,
        expiration: float | None,
    ) -> Envelope:
        if not isinstance(message, self._type):
            raise TypeError(
                f"{type(self).__name__}[{self._type.__name__}].publish expected "
                f"{self._type.__name__}, got {type(message).__name__}"
            )
        return encode(
            message,
            service=self._service,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            priority=priority,
            expiration=expiration,
        )

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
        """Publish one message; its id once confirmed.

        Raises :class:`~mqkit.PublishUnroutable` (no queue bound), :class:`~mqkit.PublishNacked`,
        :class:`~mqkit.PublishTimeout` (no confirm within ``confirm_timeout``, the link
        included), :class:`~mqkit.TopologyError` (no such exchange), ``TypeError`` (not a T).
        """
        envelope = self._envelope(
            message,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            priority=priority,
            expiration=expiration,
        )
        await self._link.publishing.publish(
            envelope, exchange=self._exchange, routing_key=self._route(message, routing_key)
        )
        return envelope.message_id

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
        every failure is of one kind) whose ``unconfirmed`` lists the ids not confirmed."""
        jobs: list[tuple[Envelope, str, str]] = []
        for message in messages:
            envelope = self._envelope(
                message,
                headers=headers,
                message_id=message_id,
                correlation_id=correlation_id,
                priority=priority,
                expiration=expiration,
            )
            jobs.append((envelope, self._exchange, self._route(message, routing_key)))
        await self._link.publishing.publish_many(jobs)
        return [envelope.message_id for envelope, _, _ in jobs]
