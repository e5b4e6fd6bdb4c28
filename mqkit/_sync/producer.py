"""Typed, confirmed publishing: :class:`Producer`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel

from mqkit.errors import ConfigError
from mqkit.messages import Envelope, Event, encode

if TYPE_CHECKING:
    from mqkit._sync.client import Client

__all__ = ["Producer"]

T = TypeVar("T", bound=BaseModel)


class Producer(Generic[T]):
    """Publishes ``T`` messages to a queue or an exchange and waits for the broker's confirm.

    Every publish is mandatory and confirmed: :meth:`publish` returns the message id once the
    broker has taken responsibility for the message, or raises
    :class:`~mqkit.PublishUnroutable` (no queue bound), :class:`~mqkit.PublishNacked` or
    :class:`~mqkit.PublishTimeout` (no confirm within ``confirm_timeout``, e.g. while the link
    is down).

    **Thread safety.** A producer may be shared by any number of threads. It holds no I/O
    state: each call encodes on the calling thread, hands the message to the client's IO
    thread (the only thread that touches the pika connection) and waits on its own confirm,
    so concurrent publishes are pipelined on one confirm channel and each caller gets exactly
    its own result.

    ```python
    producer = client.producer(ChargeCard, queue="charges")
    message_id = producer.publish(ChargeCard(order_id="42", amount=Decimal("9.90")))
    ```
    """

    def __init__(
        self,
        client: Client,
        message_type: type[T],
        *,
        exchange: str,
        routing_key: str | None,
        queue: str | None = None,
    ) -> None:
        self._client = client
        self._type = message_type
        self._exchange = exchange
        self._routing_key = routing_key
        self._queue = queue

    def __repr__(self) -> str:
        target = (
            f"queue={self._queue!r}"
            if self._queue is not None
            else (f"exchange={self._exchange!r}")
        )
        return f"Producer[{self._type.__name__}]({target})"

    @property
    def message_type(self) -> type[T]:
        """The type of message this producer publishes."""
        return self._type

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
        envelope = self._encode(message, headers, message_id, correlation_id, priority, expiration)
        key = self._key(message, routing_key)
        self._client._ensure_open()
        return self._client._publisher.publish(self._exchange, key, [envelope])[0]

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
        failures are of one kind) whose ``unconfirmed`` lists the ids not confirmed;
        re-publishing those is safe.
        """
        envelopes: list[Envelope] = []
        keys: list[str] = []
        for message in messages:
            envelopes.append(
                self._encode(message, headers, message_id, correlation_id, priority, expiration)
            )
            keys.append(self._key(message, routing_key))
        if not envelopes:
            return []
        self._client._ensure_open()
        first = keys[0] if keys else ""
        return self._client._publisher.publish(self._exchange, first, envelopes, routing_keys=keys)

    def _encode(
        self,
        message: T,
        headers: Mapping[str, Any] | None,
        message_id: str | None,
        correlation_id: str | None,
        priority: int | None,
        expiration: float | None,
    ) -> Envelope:
        if not isinstance(message, self._type):
            raise TypeError(
                f"Producer[{self._type.__name__}].publish expected {self._type.__name__}, "
                f"got {type(message).__name__}"
            )
        return encode(
            message,
            service=self._client.settings.service,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            priority=priority,
            expiration=expiration,
        )

    def _key(self, message: BaseModel, routing_key: str | None) -> str:
        if self._queue is not None:
            if routing_key is not None and routing_key != self._queue:
                raise ConfigError(
                    f"this producer publishes to queue {self._queue!r}; routing_key does not "
                    "apply (use client.producer(..., exchange=...) to route by key)"
                )
            return self._queue
        if routing_key is not None:
            return routing_key
        if self._routing_key is not None:
            return self._routing_key
        if isinstance(message, Event):
            return message.event_type
        return ""
