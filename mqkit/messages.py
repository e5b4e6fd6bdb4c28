"""Messages on the wire: :class:`Event`, its type registry, and the envelope codec.

The wire format is plain AMQP that any client can read and write: a JSON body
(``content_type="application/json"``), ``delivery_mode=2`` (persistent), a unique
``message_id``, ``timestamp``, ``type`` (the event type, or the model's class name),
``app_id`` (the publishing service) and ``correlation_id`` when given. Nothing is pickled
or wrapped, so a message published by one runtime is consumed by the other unchanged.

This module imports neither pika nor aio-pika: the shells turn an :class:`Envelope` into
their client's message object and an incoming delivery into an :class:`Incoming`.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ValidationError

from mqkit.correlation import inherit
from mqkit.errors import DecodeError
from mqkit.wire import INT64_MAX, MAX_SECONDS, SHORTSTR_MAX

__all__ = [
    "CONTENT_TYPE",
    "Envelope",
    "Event",
    "Incoming",
    "bad_body",
    "decode",
    "decode_event",
    "encode",
    "event_class",
    "portable",
    "to_datetime",
    "type_name",
]

M = TypeVar("M", bound=BaseModel)

CONTENT_TYPE = "application/json"
PERSISTENT = 2

_registry: dict[str, type[Event]] = {}


class Event(BaseModel):
    """A message published on the event bus.

    ``event_type`` (a class keyword; default: the class name) is the routing key on the
    event exchange and the AMQP ``type`` property. Subclasses register themselves by
    ``event_type``, so a pattern subscriber can decode an event by its ``type``::

        class OrderPlaced(mqkit.Event, event_type="orders.placed"):
            order_id: str
    """

    event_type: ClassVar[str] = "Event"

    def __init_subclass__(cls, event_type: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.event_type = event_type or cls.__name__
        # The newest definition wins: re-importing a module (or a test redefining a class)
        # must not make the registry refuse a type.
        _registry[cls.event_type] = cls


def event_class(event_type: str) -> type[Event] | None:
    """The registered :class:`Event` subclass for ``event_type``, or ``None``."""
    return _registry.get(event_type)


def type_name(model: type[BaseModel]) -> str:
    """The AMQP ``type`` property for a model class: its ``event_type`` or its class name."""
    if issubclass(model, Event):
        return model.event_type
    return model.__name__


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message ready to publish: the body and AMQP properties, client-neutral.

    ``timestamp`` is whole seconds since the epoch (AMQP's resolution); ``expiration`` is in
    milliseconds, as AMQP carries it.
    """

    body: bytes
    message_id: str
    type: str
    app_id: str
    timestamp: int
    headers: dict[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None
    reply_to: str | None = None
    priority: int | None = None
    expiration: int | None = None
    content_type: str = CONTENT_TYPE
    delivery_mode: int = PERSISTENT


def encode(
    message: BaseModel,
    *,
    service: str,
    headers: Mapping[str, Any] | None = None,
    message_id: str | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    priority: int | None = None,
    expiration: float | None = None,
) -> Envelope:
    """Turn a pydantic model into an :class:`Envelope`. ``expiration`` is in seconds.

    Inside a handler, the message inherits the handled delivery's correlation id (unless
    ``correlation_id`` is given) and names it in ``x-mqkit-causation-id``
    (:func:`mqkit.correlation.inherit`)."""
    own_headers = dict(headers) if headers else {}
    return Envelope(
        body=message.__pydantic_serializer__.to_json(message),
        message_id=message_id or uuid.uuid4().hex,
        type=type_name(type(message)),
        app_id=service,
        timestamp=int(time.time()),
        headers=own_headers,
        correlation_id=inherit(correlation_id, own_headers),
        reply_to=reply_to,
        priority=priority,
        expiration=None if expiration is None else max(0, int(expiration * 1000)),
    )


@dataclass(slots=True)
class Incoming:
    """A delivery as the core sees it, whatever client received it.

    Whatever the wire held, the fields have their declared types: a short string that is not
    UTF-8 (pika hands over ``bytes``) becomes text with U+FFFD for the bad bytes, and so do
    such header names.
    """

    body: bytes
    delivery_tag: int
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    type: str | None = None
    app_id: str | None = None
    content_type: str | None = None
    timestamp: datetime | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    priority: int | None = None
    expiration: str | None = None
    redelivered: bool = False
    exchange: str = ""
    routing_key: str = ""

    def __post_init__(self) -> None:
        # Cheap for what mqkit and other clients send (every check is a type test); only
        # bytes (pika's value for a short string that is not UTF-8) are converted.
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None and type(value) is not str:
                setattr(self, name, _short_text(value))
        headers = self.headers
        if headers and not all(type(key) is str for key in headers):
            self.headers = {_short_text(key): value for key, value in headers.items()}

    def republished(self, headers: Mapping[str, Any]) -> Envelope:
        """An envelope for this delivery's body and properties with ``headers`` merged in.

        Used to move a message to a retry queue or a DLQ, or back from one: everything the
        publisher set is kept, ``message_id`` included, so consumers can de-duplicate.
        """
        merged = dict(self.headers)
        merged.update(headers)
        merged = {k: portable(v) for k, v in merged.items() if v is not None}
        return Envelope(
            body=self.body,
            message_id=self.message_id or uuid.uuid4().hex,
            type=self.type or "",
            app_id=self.app_id or "",
            timestamp=int(self.timestamp.timestamp()) if self.timestamp else int(time.time()),
            headers=merged,
            correlation_id=self.correlation_id,
            reply_to=self.reply_to,
            priority=self.priority,
            expiration=None,  # a message must not expire in a retry queue or a DLQ
            content_type=self.content_type or CONTENT_TYPE,
        )


_TEXT_FIELDS = (
    "message_id",
    "correlation_id",
    "reply_to",
    "type",
    "app_id",
    "content_type",
    "expiration",
)
_FLOAT32_MAX = 3.4028234663852886e38


def _short_text(value: Any) -> str:
    """A short string (or header name) from the wire as text of at most 255 UTF-8 bytes."""
    if isinstance(value, (bytes, bytearray)):
        encoded = bytes(value).decode("utf-8", "replace").encode("utf-8")
        return encoded[:SHORTSTR_MAX].decode("utf-8", "ignore")
    return str(value)


def portable(value: Any) -> Any:
    """A header value as both pika and pamqp encode it again, for a copy of a message
    (a retry, a dead letter, a replay): what only one of them decodes becomes text.

    An integer beyond 64 bits (pika reads a large double as one) and a float beyond single
    precision or not finite (pamqp writes floats as single precision) become their text;
    tables and arrays are converted inside. Everything else is kept as it is.
    """
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        return value if -INT64_MAX - 1 <= value <= INT64_MAX else str(value)
    if kind is float:
        return value if math.isfinite(value) and abs(value) <= _FLOAT32_MAX else repr(value)
    if isinstance(value, Mapping):
        return {_short_text(k) if type(k) is not str else k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, Decimal) and not value.is_finite():
        return str(value)
    return value


def to_datetime(value: Any) -> datetime | None:
    """An AMQP timestamp as an aware UTC ``datetime``, or ``None`` when there is none or it
    cannot be one (beyond the year 9999, not a number).

    pamqp gives a ``datetime``, pika the integer: like pamqp, a value above ``2**32`` (the
    year 2106 in seconds) is read as milliseconds, so both runtimes see the same time.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    try:
        seconds: float = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if seconds > 0xFFFFFFFF:
        seconds /= 1000.0
    if not 0 <= seconds < MAX_SECONDS + 1:
        return None
    try:
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    except (ValueError, OverflowError, OSError):  # the platform's time_t may hold less
        return None


def decode(body: bytes, message_type: type[M]) -> M:
    """Validate a JSON body into ``message_type``; :class:`DecodeError` says what is wrong."""
    try:
        return message_type.model_validate_json(body)
    except ValidationError as exc:
        raise DecodeError(_explain(exc, message_type.__name__)) from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"body is not valid JSON for {message_type.__name__}: {exc}") from exc
    except Exception as exc:  # a validator raising TypeError (pydantic does not wrap it), ...
        raise DecodeError(bad_body(exc, message_type.__name__)) from exc


def bad_body(exc: BaseException, name: str) -> str:
    """The reason a body could not be decoded into ``name`` when decoding raised ``exc``,
    something other than a validation error (a validator's own ``TypeError``, a bug)."""
    return f"decoding the body as {name} raised {type(exc).__name__}: {exc}"


def decode_event(body: bytes, event_type: str | None) -> Event:
    """Decode an event by its ``type`` property through the :class:`Event` registry."""
    cls = _registry.get(event_type or "")
    if cls is None:
        raise DecodeError(
            f"no Event class is registered for type {event_type!r}; "
            "import the module that defines it before consuming"
        )
    return decode(body, cls)


def _explain(exc: ValidationError, name: str) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    if errors and errors[0]["type"] == "json_invalid":
        return f"body is not valid JSON for {name}: {errors[0]['msg']}"
    parts = [
        f"{'.'.join(str(p) for p in error['loc']) or '(body)'}: {error['msg']}" for error in errors
    ]
    return f"body does not match {name}: " + "; ".join(parts)
