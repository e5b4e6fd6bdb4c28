"""The one event pipeline: what happened, as plain values the shells report.

Both runtimes report the same events at the same points (a delivery received, handled,
retried, dead-lettered; a publish confirmed, returned, nacked; the link lost and restored;
a consumer attached and detached; publishing blocked by a broker alarm; the link up at first
connect). Logging, metrics,
tracing and users' middleware observe that one stream, so the two clients cannot disagree on
what they say or at which level:

```python
pipeline = Pipeline([LogObserver()])
pipeline.emit(LinkLost(url="amqp://guest:***@localhost:5672/", reason="connection reset"))
```

:data:`LOG_POLICY` is the logging policy of both runtimes (the README's table is this table):
which logger, at which level, with which fields in ``extra=``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from mqkit.retry import GiveUp, Reject, RetryLater

__all__ = [
    "LOG_POLICY",
    "ConsumerAttached",
    "ConsumerDetached",
    "DeadLettered",
    "Delivery",
    "Handled",
    "LifecycleEvent",
    "LinkLost",
    "LinkRestored",
    "LinkUp",
    "LogObserver",
    "LogRule",
    "Nacked",
    "Observer",
    "Pipeline",
    "Published",
    "PublishingBlocked",
    "PublishingUnblocked",
    "Received",
    "Retried",
    "Returned",
    "Undecodable",
    "delivery_of",
    "level_of",
    "outcome_event",
]

_log = logging.getLogger("mqkit")


@dataclass(frozen=True, slots=True)
class Delivery:
    """What is known of a delivery when it is reported: where it came from and which it is
    (taken from the delivery itself, never from headers a sender could forge)."""

    queue: str
    message_id: str | None = None
    correlation_id: str | None = None
    event_type: str | None = None
    attempt: int = 1
    exchange: str = ""
    routing_key: str = ""
    service: str = ""


class LifecycleEvent:
    """Base of every event of the pipeline; ``name`` is its kind, in snake case."""

    __slots__ = ()
    name: ClassVar[str] = "event"

    def fields(self) -> dict[str, Any]:
        """The event's fields, flat (a :class:`Delivery` is spread out), for logs and
        middleware."""
        out: dict[str, Any] = {}
        for key in _names(type(self)):
            value = getattr(self, key)
            if key == "delivery" and isinstance(value, Delivery):
                for inner in _names(Delivery):
                    out[inner] = getattr(value, inner)
            else:
                out[key] = value
        return out


# Field names per event class (dataclasses.asdict deep-copies every value: a logged event
# only needs them read).
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


# -- publishing ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Published(LifecycleEvent):
    """The broker confirmed a message (``seconds``: from send to confirm)."""

    name: ClassVar[str] = "published"
    exchange: str
    routing_key: str
    message_id: str
    event_type: str | None = None
    correlation_id: str | None = None
    service: str = ""
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Returned(LifecycleEvent):
    """A mandatory publish came back: nothing is bound for its routing key."""

    name: ClassVar[str] = "returned"
    exchange: str
    routing_key: str
    message_id: str
    reply: str = ""
    service: str = ""


@dataclass(frozen=True, slots=True)
class Nacked(LifecycleEvent):
    """The broker refused to store a message."""

    name: ClassVar[str] = "nacked"
    exchange: str
    routing_key: str
    message_id: str
    service: str = ""


@dataclass(frozen=True, slots=True)
class PublishingBlocked(LifecycleEvent):
    """The broker blocked publishing (a memory or disk alarm); consuming goes on."""

    name: ClassVar[str] = "publishing_blocked"
    reason: str
    service: str = ""


@dataclass(frozen=True, slots=True)
class PublishingUnblocked(LifecycleEvent):
    """The broker's alarm cleared: publishing goes on."""

    name: ClassVar[str] = "publishing_unblocked"
    service: str = ""


# -- consuming -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received(LifecycleEvent):
    """A delivery arrived and is about to be decoded and handled."""

    name: ClassVar[str] = "received"
    delivery: Delivery


@dataclass(frozen=True, slots=True)
class Handled(LifecycleEvent):
    """The handler returned: the delivery is acked (``seconds`` in the handler)."""

    name: ClassVar[str] = "handled"
    delivery: Delivery
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Retried(LifecycleEvent):
    """The handler failed; the message comes back after ``delay`` seconds, held by the
    broker, as attempt ``next_attempt``."""

    name: ClassVar[str] = "retried"
    delivery: Delivery
    delay: float
    next_attempt: int
    error_type: str
    error: str
    traceback: str = field(default="", repr=False)
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class DeadLettered(LifecycleEvent):
    """The message went to the DLQ ``dlq``, with ``reason`` in its headers. ``rejected``: the
    handler raised :class:`~mqkit.Reject` (a decision, not a failure)."""

    name: ClassVar[str] = "dead_lettered"
    delivery: Delivery
    dlq: str
    error_type: str
    error: str
    rejected: bool = False
    traceback: str = field(default="", repr=False)
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Undecodable(LifecycleEvent):
    """The body did not decode into the expected type (it is dead-lettered at once)."""

    name: ClassVar[str] = "undecodable"
    delivery: Delivery
    error: str


@dataclass(frozen=True, slots=True)
class ConsumerAttached(LifecycleEvent):
    """A consumer is consuming ``queue`` (at start, or again after a reconnect)."""

    name: ClassVar[str] = "consumer_attached"
    queue: str
    again: bool = False
    service: str = ""


@dataclass(frozen=True, slots=True)
class ConsumerDetached(LifecycleEvent):
    """A consumer stopped consuming ``queue``: stopped (``reason`` empty) or lost."""

    name: ClassVar[str] = "consumer_detached"
    queue: str
    reason: str = ""
    service: str = ""


# -- the link ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkUp(LifecycleEvent):
    """The client connected to ``url`` (password masked) for the first time."""

    name: ClassVar[str] = "link_up"
    url: str
    service: str = ""


@dataclass(frozen=True, slots=True)
class LinkLost(LifecycleEvent):
    """The connection to ``url`` (password masked) was lost; the client reconnects."""

    name: ClassVar[str] = "link_lost"
    url: str
    reason: str
    service: str = ""


@dataclass(frozen=True, slots=True)
class LinkRestored(LifecycleEvent):
    """The client is connected again (to ``url``), its topology and consumers restored."""

    name: ClassVar[str] = "link_restored"
    url: str
    reconnects: int = 0
    service: str = ""


# -- what a delivery's outcome reports --------------------------------------------------------


def delivery_of(ctx: Any, *, service: str = "") -> Delivery:
    """The :class:`Delivery` of a handler's :class:`~mqkit.Context`."""
    return Delivery(
        queue=ctx.queue,
        message_id=ctx.message_id,
        correlation_id=ctx.correlation_id,
        event_type=ctx.event_type,
        attempt=ctx.attempt,
        exchange=ctx.exchange,
        routing_key=ctx.routing_key,
        service=service,
    )


def outcome_event(
    delivery: Delivery,
    outcome: Any,
    *,
    dlq: str,
    error: BaseException | None = None,
    seconds: float = 0.0,
) -> LifecycleEvent:
    """The event that reports how a delivery ended: :class:`Handled` (acked),
    :class:`Retried` or :class:`DeadLettered` (``outcome``: an ``Ack``, ``RetryLater`` or
    ``GiveUp`` of :mod:`mqkit.retry`; ``error``: what the handler raised, if anything)."""
    retry_later, give_up, reject = _OUTCOMES or _outcome_types()
    if isinstance(outcome, retry_later):
        return Retried(
            delivery,
            delay=outcome.delay,
            next_attempt=outcome.attempt,
            error_type=type(error).__name__ if error else "Retry",
            error=str(error) if error else "",
            traceback=_traceback(error),
            seconds=seconds,
        )
    if isinstance(outcome, give_up):
        rejected = isinstance(error, reject)
        return DeadLettered(
            delivery,
            dlq=dlq,
            error_type=outcome.error_type,
            error=outcome.error_message,
            rejected=rejected,
            traceback=outcome.traceback or ("" if rejected else _traceback(error)),
            seconds=seconds,
        )
    return Handled(delivery, seconds=seconds)


# (RetryLater, GiveUp, Reject) of mqkit.retry, imported on first use: the pipeline itself
# needs no policy, and an import statement per delivery costs as much as the rest.
_OUTCOMES: tuple[type[RetryLater], type[GiveUp], type[Reject]] | None = None


def _outcome_types() -> tuple[type[RetryLater], type[GiveUp], type[Reject]]:
    global _OUTCOMES
    from mqkit.retry import GiveUp, Reject, RetryLater

    _OUTCOMES = (RetryLater, GiveUp, Reject)
    return _OUTCOMES


def _traceback(error: BaseException | None) -> str:
    if error is None or error.__traceback__ is None:
        return ""
    import traceback

    return "".join(traceback.format_exception(type(error), error, error.__traceback__, limit=-5))


# -- observing -----------------------------------------------------------------------------


class Observer(Protocol):
    """Anything that watches the pipeline: ``on_event(event)`` is called on the thread (or
    event loop) that reports it, so it must be quick and must not block. An exception it
    raises is logged and otherwise ignored: observing never changes what happens."""

    def on_event(self, event: LifecycleEvent) -> None: ...


class Pipeline:
    """Hands each event to every observer, in order."""

    __slots__ = ("_observers",)

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self._observers = tuple(observers)

    @property
    def observers(self) -> tuple[Observer, ...]:
        return self._observers

    def emit(self, event: LifecycleEvent) -> None:
        for observer in self._observers:
            try:
                observer.on_event(event)
            except Exception:
                _log.exception("an observer failed on %s; ignored", event.name)


# -- logging -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogRule:
    """How an event is logged: by logger ``logger`` at ``level``, with ``message`` (a
    format string over the event's fields)."""

    logger: str
    level: int
    message: str


def _dead_letter_level(event: LifecycleEvent) -> int:
    assert isinstance(event, DeadLettered)
    return logging.WARNING if event.rejected else logging.ERROR


# The one logging policy of both runtimes (README: "Logging").
LOG_POLICY: dict[type[LifecycleEvent], LogRule] = {
    Published: LogRule("mqkit.publisher", logging.DEBUG, "published {message_id} to {target}"),
    Returned: LogRule(
        "mqkit.publisher", logging.WARNING, "{message_id} to {target} came back: {reply}"
    ),
    Nacked: LogRule("mqkit.publisher", logging.WARNING, "the broker refused {message_id}"),
    PublishingBlocked: LogRule(
        "mqkit.connection",
        logging.WARNING,
        "the broker blocks publishing ({reason}); consuming goes on",
    ),
    PublishingUnblocked: LogRule(
        "mqkit.connection", logging.INFO, "the broker unblocked publishing"
    ),
    Received: LogRule("mqkit.consumer", logging.DEBUG, "received {message_id} from {queue}"),
    Handled: LogRule(
        "mqkit.consumer", logging.DEBUG, "handled {message_id} from {queue} in {seconds:.3f}s"
    ),
    Retried: LogRule(
        "mqkit.retry",
        logging.WARNING,
        "handler failed on {message_id} from {queue} (attempt {attempt}): {error_type}: "
        "{error}; retrying in {delay:g}s",
    ),
    DeadLettered: LogRule(
        "mqkit.dlq",
        logging.ERROR,  # WARNING for a Reject: see _dead_letter_level
        "dead-lettered {message_id} from {queue} into {dlq} after {attempt} attempt(s): "
        "{error_type}: {error}",
    ),
    Undecodable: LogRule(
        "mqkit.consumer",
        logging.WARNING,
        "{message_id} from {queue} did not decode ({error}); dead-lettering it",
    ),
    ConsumerAttached: LogRule("mqkit.consumer", logging.INFO, "consuming {queue}"),
    ConsumerDetached: LogRule("mqkit.consumer", logging.INFO, "stopped consuming {queue}"),
    LinkUp: LogRule("mqkit.connection", logging.INFO, "connected to {url}"),
    LinkLost: LogRule(
        "mqkit.connection", logging.WARNING, "lost the connection to {url} ({reason}); reconnecting"
    ),
    LinkRestored: LogRule("mqkit.connection", logging.INFO, "connected again to {url}"),
}


def level_of(event: LifecycleEvent) -> int:
    """The level ``event`` is logged at (:data:`LOG_POLICY`, with its exceptions)."""
    if isinstance(event, DeadLettered):
        return _dead_letter_level(event)
    if isinstance(event, ConsumerDetached) and event.reason:
        return logging.WARNING  # lost, not stopped
    return LOG_POLICY[type(event)].level


# The events whose level depends on the event (level_of has the exceptions).
_LEVEL_VARIES = (DeadLettered, ConsumerDetached)


class LogObserver:
    """mqkit's own logging, as an observer of the pipeline: one record per event, by the
    policy in :data:`LOG_POLICY`, every field also in ``extra=`` (for JSON formatters). A
    failure's traceback is logged at DEBUG (on its own record), not with every WARNING.

    An event whose level the logger filters out costs two lookups and a level test: no
    message or ``extra=`` is built for it."""

    __slots__ = ("_rules",)

    def __init__(self) -> None:
        # event class -> (its logger, its fixed level or None); getLogger takes logging's
        # module lock, so each logger is looked up once, not per delivery
        self._rules: dict[type[LifecycleEvent], tuple[logging.Logger, int | None]] = {
            cls: (
                logging.getLogger(rule.logger),
                None if issubclass(cls, _LEVEL_VARIES) else rule.level,
            )
            for cls, rule in LOG_POLICY.items()
        }

    def on_event(self, event: LifecycleEvent) -> None:
        logger, level = self._rules[type(event)]
        if level is None:
            level = level_of(event)
        if not logger.isEnabledFor(level):
            return
        rule = LOG_POLICY[type(event)]
        values = event.fields()
        traceback = values.pop("traceback", "")
        if isinstance(event, ConsumerDetached) and event.reason:
            message = f"lost the consumer of {event.queue!r} ({event.reason}); re-attaching"
        else:
            message = rule.message.format(target=_target(values), **_quoted(values))
        extra = {"mqkit_event": event.name, **values}
        logger.log(level, message, extra=_safe_extra(extra))
        if traceback and logger.isEnabledFor(logging.DEBUG):
            logger.debug("traceback of %s:\n%s", values.get("message_id"), traceback)


def _quoted(values: dict[str, Any]) -> dict[str, Any]:
    """The values as the messages show them: names quoted, a message by its id."""
    shown = {
        key: repr(value) if key in ("queue", "dlq") and isinstance(value, str) else value
        for key, value in values.items()
    }
    if "message_id" in shown:
        mid = shown["message_id"]
        shown["message_id"] = f"message {mid}" if mid else "a message without message_id"
    return shown


def _target(values: dict[str, Any]) -> str:
    exchange, key = values.get("exchange"), values.get("routing_key")
    if exchange is None:
        return ""
    return f"queue {key!r}" if exchange == "" else f"exchange {exchange!r} ({key!r})"


# LogRecord attributes that ``extra=`` must not overwrite (logging raises KeyError).
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _safe_extra(extra: dict[str, Any]) -> dict[str, Any]:
    return {(f"mqkit_{k}" if k in _RESERVED else k): v for k, v in extra.items()}
