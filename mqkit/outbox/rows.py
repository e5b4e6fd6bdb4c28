"""A message as an outbox row, and an outbox row as the envelope the relay publishes.

:func:`target` decides where ``outbox.publish(...)`` sends a message (the same rules as a
producer's, plus the event bus for an :class:`~mqkit.Event` given no target), :func:`values`
is the row written in the caller's transaction, and :class:`Pending` is a row read back by the
relay, which turns it into an :class:`~mqkit.messages.Envelope` with the row's message id, so
a row sent again after a crash carries the id it had the first time.

```python
where = target(OrderPlaced(...), queue=None, exchange=None, routing_key=None)
assert where == Target(exchange=None, routing_key="orders.placed", mandatory=False)  # the bus
row = values(OrderPlaced(...), where, headers=None, message_id=None, correlation_id=None,
             ordering_key="42", now=time.time())
```
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from mqkit import explain
from mqkit.messages import Envelope, Event, encode
from mqkit.topology import Exchange, Queue

__all__ = ["MAX_ERROR", "Pending", "Target", "check_headers", "target", "values"]

MAX_NAME = 255  # columns for names, keys and ids are VARCHAR(255)
MAX_ERROR = 2000  # characters of an error kept in last_error


@dataclass(frozen=True, slots=True)
class Target:
    """Where a row goes: ``exchange`` (``None``: the event bus, i.e. the relay's client's
    ``events_exchange``; ``""``: the default exchange, i.e. a queue), ``routing_key``, and
    whether an unroutable publish is an error (``mandatory``; not for bus events, where no
    subscriber is fine, as for ``bus.publish``)."""

    exchange: str | None
    routing_key: str
    mandatory: bool


def target(
    message: BaseModel,
    *,
    queue: str | Queue | None,
    exchange: str | Exchange | None,
    routing_key: str | None,
) -> Target:
    """Where ``outbox.publish`` sends ``message``: to ``queue``; or to ``exchange`` with
    ``routing_key`` (default: an event's ``event_type``, else ``""``); or, for an
    :class:`~mqkit.Event` given neither, to the event bus with its ``event_type`` (or
    ``routing_key``). Anything else is a :class:`~mqkit.ConfigError` that says what to pass.
    """
    if not isinstance(message, BaseModel):
        raise explain.outbox_not_a_model(message)
    if queue is not None and exchange is not None:
        raise explain.outbox_two_targets(_name(queue), _name(exchange))
    if queue is not None:
        name = _checked("queue", _name(queue))
        if routing_key is not None and routing_key != name:
            raise explain.outbox_key_for_queue(name, routing_key)
        return Target("", name, True)
    event_type = type(message).event_type if isinstance(message, Event) else None
    if exchange is not None:
        key = routing_key if routing_key is not None else (event_type or "")
        return Target(_checked("exchange", _name(exchange)), _checked("routing_key", key), True)
    if event_type is None:
        raise explain.outbox_no_target(type(message).__name__)
    key = routing_key if routing_key is not None else event_type
    return Target(None, _checked("routing_key", key), False)


def values(
    message: BaseModel,
    where: Target,
    *,
    headers: Mapping[str, Any] | None,
    message_id: str | None,
    correlation_id: str | None,
    ordering_key: str | None,
    now: float,
) -> dict[str, Any]:
    """The outbox row for ``message``: its JSON body, type and message id (a new one unless
    given) as :func:`mqkit.messages.encode` makes them for a producer, and where it goes."""
    if headers:
        check_headers(headers)
    for name, value in (
        ("message_id", message_id),
        ("correlation_id", correlation_id),
        ("ordering_key", ordering_key),
    ):
        if value is not None:
            _checked(name, value)
    envelope = encode(
        message,
        service="",  # the relay's client names the service (app_id) when it publishes
        headers=headers,
        message_id=message_id,
        correlation_id=correlation_id,
    )
    return {
        "message_id": envelope.message_id,
        "exchange": where.exchange,
        "routing_key": where.routing_key,
        "mandatory": where.mandatory,
        "type": envelope.type,
        "body": envelope.body,
        "headers": json.dumps(envelope.headers, separators=(",", ":")) if headers else None,
        "correlation_id": correlation_id,
        "ordering_key": ordering_key,
        "created_at": now,
        "available_at": 0.0,
        "attempts": 0,
    }


def check_headers(headers: Mapping[str, Any]) -> None:
    """``TypeError`` unless ``headers`` maps strings to JSON values (strings, numbers,
    booleans, ``None``, and lists or string-keyed objects of those): the row keeps them as
    JSON, and they must come out of it as they went in."""
    if not isinstance(headers, Mapping):
        raise explain.outbox_header_not_json("headers", headers)

    def check(path: str, value: Any) -> None:
        if value is None or isinstance(value, (str, bool, int)):
            return
        if isinstance(value, float):
            if not math.isfinite(value):
                raise explain.outbox_header_not_json(path, value)
            return
        if isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                check(f"{path}[{index}]", item)
            return
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise explain.outbox_header_not_json(f"{path}[{key!r}]", key)
                check(f"{path}.{key}", item)
            return
        raise explain.outbox_header_not_json(path, value)

    for key, value in headers.items():
        if not isinstance(key, str):
            raise explain.outbox_header_not_json(repr(key), key)
        check(key, value)


@dataclass(frozen=True, slots=True)
class Pending:
    """An unsent outbox row as the relay reads it."""

    id: int
    message_id: str
    exchange: str | None
    routing_key: str
    mandatory: bool
    type: str
    body: bytes
    headers: str | None
    correlation_id: str | None
    ordering_key: str | None
    created_at: float
    attempts: int

    @classmethod
    def from_row(cls, row: Any) -> Pending:
        """From a result row of the outbox table (any driver's types)."""
        return cls(
            id=int(row.id),
            message_id=str(row.message_id),
            exchange=row.exchange,
            routing_key=str(row.routing_key),
            mandatory=bool(row.mandatory),
            type=str(row.type),
            body=bytes(row.body),
            headers=row.headers,
            correlation_id=row.correlation_id,
            ordering_key=row.ordering_key,
            created_at=float(row.created_at),
            attempts=int(row.attempts),
        )

    def exchange_name(self, events_exchange: str) -> str:
        """The exchange to publish to: the row's, or ``events_exchange`` for a bus event."""
        return events_exchange if self.exchange is None else self.exchange

    @property
    def queue(self) -> str | None:
        """The queue this row is addressed to, if it goes to one (the default exchange)."""
        return self.routing_key if self.exchange == "" else None

    def envelope(self, service: str) -> Envelope:
        """The envelope to publish: the row's body, id, type, headers and correlation id,
        ``timestamp`` = when the row was written, ``app_id`` = ``service``. A row whose
        headers are not a JSON object raises ``ValueError``."""
        headers = json.loads(self.headers) if self.headers else {}
        if not isinstance(headers, dict):
            raise ValueError(f"the row's headers are not a JSON object: {self.headers!r:.100}")
        return Envelope(
            body=self.body,
            message_id=self.message_id,
            type=self.type,
            app_id=service,
            timestamp=int(self.created_at),
            headers=headers,
            correlation_id=self.correlation_id,
        )


def _name(value: str | Queue | Exchange) -> str:
    return value.name if isinstance(value, (Queue, Exchange)) else value


def _checked(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise explain.outbox_bad_value(what, value, "a string")
    if len(value) > MAX_NAME:
        raise explain.outbox_bad_value(what, value, f"at most {MAX_NAME} characters")
    return value
