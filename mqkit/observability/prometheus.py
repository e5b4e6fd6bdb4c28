"""Prometheus metrics of both clients: :class:`PrometheusMiddleware` (``mqkit[prometheus]``).

```python
from prometheus_client import start_http_server
from mqkit.observability import PrometheusMiddleware

start_http_server(9100)   # or mount prometheus_client.make_asgi_app() in your web app
client = mqkit.Client(service="billing", middleware=[PrometheusMiddleware()])
```

What it records (:data:`METRICS` lists the names; every one starts with ``mqkit_``):

- ``mqkit_messages_published_total`` (service, exchange, queue, event_type): messages
  published and confirmed (publish hook);
- ``mqkit_publish_errors_total`` (the same and error_type): messages not confirmed;
- ``mqkit_publish_confirm_seconds`` (service, exchange), histogram: seconds from handing a
  publish call's messages over to their broker confirm (one observation per ``publish`` or
  ``publish_many`` call that succeeded; publish hook);
- ``mqkit_messages_consumed_total`` (service, queue, event_type, outcome): deliveries handled
  (``handled`` / ``retried`` / ``dead_lettered`` events);
- ``mqkit_handler_duration_seconds`` (service, queue, event_type), histogram: time in the
  handler (the same events);
- ``mqkit_messages_in_flight`` (service, queue), gauge: handlers running now (handle hook);
- ``mqkit_messages_undecodable_total`` (service, queue): bodies that did not decode;
- ``mqkit_consumers_attached`` (service, queue), gauge: 1 while consuming, 0 once stopped;
- ``mqkit_connection_up`` (service), gauge: 1 on ``link_up`` (the first connect) and
  ``link_restored``, 0 on ``link_lost``, and 1 again on any sign of a live link;
- ``mqkit_reconnects_total`` (service): ``link_restored`` events after a loss;
- ``mqkit_publishing_blocked`` (service), gauge: 1 while a broker alarm blocks publishing.

``outcome`` is ``acked``, ``retried``, ``dead_lettered`` or ``rejected`` (the handler raised
:class:`~mqkit.Reject`). ``queue`` on a publish is the routing key of a message sent to the
default exchange (a queue), else empty. Label values are bounded: no message or correlation
ids; RabbitMQ's generated names (direct reply-to, ``amq.gen-*``) collapse to one value; and
past :data:`MAX_LABEL_VALUES` distinct values of one label (event types are chosen by whoever
publishes), further ones read ``other``.

Several middlewares (and several clients) on one registry share its metrics: two
``PrometheusMiddleware()`` in one process both record into ``prometheus_client.REGISTRY``.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from mqkit import explain
from mqkit.context import Context
from mqkit.correlation import current
from mqkit.errors import PublishError
from mqkit.lifecycle import (
    ConsumerAttached,
    ConsumerDetached,
    DeadLettered,
    Handled,
    LifecycleEvent,
    LinkLost,
    LinkRestored,
    LinkUp,
    Published,
    PublishingBlocked,
    PublishingUnblocked,
    Retried,
    Undecodable,
)
from mqkit.middleware import (
    AsyncHandleNext,
    AsyncPublishNext,
    HandleNext,
    Middleware,
    Outgoing,
    PublishNext,
)

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
except ImportError as exc:  # pragma: no cover - the extra is installed wherever tests run
    raise explain.missing_extra(
        "mqkit.observability.PrometheusMiddleware", "prometheus", "prometheus_client"
    ) from exc

__all__ = ["MAX_LABEL_VALUES", "METRICS", "PrometheusMiddleware"]

# Distinct values one label of one metric may take before further ones read "other".
MAX_LABEL_VALUES = 200
OTHER = "other"

_SERVICE = ("service",)
_PUBLISH_LABELS = ("service", "exchange", "queue", "event_type")
_ERROR_LABELS = (*_PUBLISH_LABELS, "error_type")
_CONFIRM_LABELS = ("service", "exchange")
_CONSUME_LABELS = ("service", "queue", "event_type")
_CONSUMED_LABELS = (*_CONSUME_LABELS, "outcome")
_QUEUE_LABELS = ("service", "queue")
_CONFIRM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_HANDLER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# name (as exposed, without a counter's _total): (type, help, labels)
_SPEC: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "mqkit_messages_published": (
        "counter",
        "Messages published and confirmed by the broker",
        _PUBLISH_LABELS,
    ),
    "mqkit_publish_errors": (
        "counter",
        "Messages whose publish failed (not confirmed), by error type",
        _ERROR_LABELS,
    ),
    "mqkit_publish_confirm_seconds": (
        "histogram",
        "Seconds from handing a publish call's messages over to their broker confirms",
        _CONFIRM_LABELS,
    ),
    "mqkit_messages_consumed": (
        "counter",
        "Deliveries handled, by outcome (acked, retried, dead_lettered, rejected)",
        _CONSUMED_LABELS,
    ),
    "mqkit_handler_duration_seconds": (
        "histogram",
        "Seconds a handler ran (with the middleware inside mqkit's own)",
        _CONSUME_LABELS,
    ),
    "mqkit_messages_in_flight": (
        "gauge",
        "Deliveries whose handler is running now",
        ("service", "queue"),
    ),
    "mqkit_messages_undecodable": (
        "counter",
        "Deliveries whose body did not decode (dead-lettered at once)",
        ("service", "queue"),
    ),
    "mqkit_consumers_attached": (
        "gauge",
        "Consumers consuming their queue (1) or not (0)",
        ("service", "queue"),
    ),
    "mqkit_connection_up": ("gauge", "1 while the client's link to the broker is up", ("service",)),
    "mqkit_reconnects": (
        "counter",
        "Times the client reconnected after losing its link",
        ("service",),
    ),
    "mqkit_publishing_blocked": (
        "gauge",
        "1 while the broker blocks publishing (a memory or disk alarm)",
        ("service",),
    ),
}

# Every metric name as it appears on /metrics (a counter with its _total).
METRICS: tuple[str, ...] = tuple(
    f"{name}_total" if kind == "counter" else name for name, (kind, _, _) in _SPEC.items()
)


class _Metrics:
    """The metric objects of one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        made: dict[str, Any] = {}
        for name, (kind, help_text, labels) in _SPEC.items():
            try:
                if kind == "counter":
                    made[name] = Counter(name, help_text, labels, registry=registry)
                elif kind == "gauge":
                    made[name] = Gauge(name, help_text, labels, registry=registry)
                else:
                    buckets = _CONFIRM_BUCKETS if "confirm" in name else _HANDLER_BUCKETS
                    made[name] = Histogram(
                        name, help_text, labels, registry=registry, buckets=buckets
                    )
            except ValueError as exc:  # a metric of that name, not made here, is there
                raise ValueError(
                    f"the Prometheus registry already has a metric named {name!r} that "
                    f"PrometheusMiddleware did not create ({exc}); give the middleware a "
                    "registry of its own: PrometheusMiddleware(registry=CollectorRegistry())"
                ) from exc
        self.published = made["mqkit_messages_published"]
        self.publish_errors = made["mqkit_publish_errors"]
        self.confirm_seconds = made["mqkit_publish_confirm_seconds"]
        self.consumed = made["mqkit_messages_consumed"]
        self.handler_seconds = made["mqkit_handler_duration_seconds"]
        self.in_flight = made["mqkit_messages_in_flight"]
        self.undecodable = made["mqkit_messages_undecodable"]
        self.consumers = made["mqkit_consumers_attached"]
        self.connection_up = made["mqkit_connection_up"]
        self.reconnects = made["mqkit_reconnects"]
        self.blocked = made["mqkit_publishing_blocked"]


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()
_by_registry_lock = threading.Lock()


def _metrics_for(registry: CollectorRegistry) -> _Metrics:
    with _by_registry_lock:
        metrics = _by_registry.get(registry)
        if metrics is None:
            metrics = _by_registry[registry] = _Metrics(registry)
        return metrics


class _Bounded:
    """Label values kept within :data:`MAX_LABEL_VALUES` per label: RabbitMQ's generated
    names collapse to one value, and values past the limit read ``other``."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, label: str, value: str | None) -> str:
        if not value:
            return ""
        if value.startswith("amq.rabbitmq.reply-to"):
            return "amq.rabbitmq.reply-to"
        if value.startswith("amq.gen-"):
            return "amq.gen"
        seen = self._seen.get(label)
        if seen is not None and value in seen:
            return value
        with self._lock:
            seen = self._seen.setdefault(label, set())
            if value in seen:
                return value
            if len(seen) >= self.limit:
                return OTHER
            seen.add(value)
            return value


# Label children kept per middleware, by raw label values, at most this many (raw values
# past the bound map onto "other" children: a flood of made-up event types costs no memory).
_CACHE_LIMIT = 10_000


class PrometheusMiddleware(Middleware):
    """Records what the client publishes and handles into ``registry`` (default:
    ``prometheus_client.REGISTRY``); serve it with ``prometheus_client.start_http_server``
    or your web framework. Works on ``Client`` and ``AsyncClient``; see the module's
    docstring for the metrics.

    ``service``: the ``service`` label of what does not name its service (every event and
    message of mqkit's clients does: their ``settings.service``).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        service: str = "",
        max_label_values: int = MAX_LABEL_VALUES,
    ) -> None:
        self.registry = registry if registry is not None else prometheus_client.REGISTRY
        self._m = _metrics_for(self.registry)
        self._label = _Bounded(max_label_values)
        self.service = service
        # (metric, raw label values) -> its child: a delivery costs dict lookups, not
        # prometheus_client's labels() (which validates and locks)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._up: dict[str, int] = {}  # connection_up as this middleware last set it
        # what a handled delivery records, by (service, queue, event type, outcome, whether
        # a handler ran): its consumed counter and its duration histogram (or None)
        self._outcomes: dict[tuple[str, str, str, str, bool], tuple[Any, Any]] = {}
        self._gauges: dict[tuple[str, str], Any] = {}  # in-flight gauges by (service, queue)
        # a publish's labels (service, exchange, queue, event type): its published counter
        # and its confirm histogram (service, exchange)
        self._publish_children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        self._on: dict[type[LifecycleEvent], Callable[[Any], None]] = {
            Handled: self._handled,
            Retried: self._handled,
            DeadLettered: self._handled,
            Published: self._published_event,
            Undecodable: self._undecodable,
            ConsumerAttached: self._consumer,
            ConsumerDetached: self._consumer,
            LinkUp: self._link_up,
            LinkLost: self._link_lost,
            LinkRestored: self._link_restored,
            PublishingBlocked: self._blocked,
            PublishingUnblocked: self._blocked,
        }

    def __repr__(self) -> str:
        return f"PrometheusMiddleware(registry={self.registry!r})"

    def _child(self, metric: Any, names: tuple[str, ...], values: tuple[str, ...]) -> Any:
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            label = self._label
            child = metric.labels(*(label(n, v) for n, v in zip(names, values, strict=True)))
            if len(self._children) < _CACHE_LIMIT:
                self._children[key] = child
        return child

    def _connected(self, service: str, up: int) -> None:
        if self._up.get(service) != up:
            self._up[service] = up
            self._child(self._m.connection_up, _SERVICE, (service,)).set(up)

    # -- publishing ----------------------------------------------------------------------

    def publish(self, messages: list[Outgoing], call_next: PublishNext) -> list[str]:
        started = time.perf_counter()
        try:
            ids = call_next(messages)
        except BaseException as exc:
            self._published(messages, exc, 0.0)
            raise
        self._published(messages, None, time.perf_counter() - started)
        return ids

    async def publish_async(
        self, messages: list[Outgoing], call_next: AsyncPublishNext
    ) -> list[str]:
        started = time.perf_counter()
        try:
            ids = await call_next(messages)
        except BaseException as exc:
            self._published(messages, exc, 0.0)
            raise
        self._published(messages, None, time.perf_counter() - started)
        return ids

    def _published(
        self, messages: Sequence[Outgoing], error: BaseException | None, seconds: float
    ) -> None:
        failed: set[str] | None = None
        if isinstance(error, PublishError) and error.unconfirmed:
            failed = set(error.unconfirmed)
        fallback = self.service
        counts: dict[tuple[str, str, str, str], int] = {}
        errors: dict[tuple[str, str, str, str], int] = {}
        for message in messages:
            envelope, exchange = message.envelope, message.exchange
            labels = (
                envelope.app_id or fallback,
                exchange,
                message.routing_key if exchange == "" else "",
                envelope.type,
            )
            if error is not None and (failed is None or envelope.message_id in failed):
                errors[labels] = errors.get(labels, 0) + 1
            else:
                counts[labels] = counts.get(labels, 0) + 1
        confirm: Any = None
        for key, count in counts.items():
            children = self._publish_children.get(key) or self._publish_children_of(key)
            children[0].inc(count)
            confirm = children[1]  # one publish call: one service, one exchange
        if error is None and confirm is not None:
            confirm.observe(seconds)
            service = next(iter(counts))[0]
            if self._up.get(service) != 1:
                self._connected(service, 1)
        if errors:
            kind = type(error).__name__
            for key, count in errors.items():
                self._child(self._m.publish_errors, _ERROR_LABELS, (*key, kind)).inc(count)

    def _publish_children_of(self, key: tuple[str, str, str, str]) -> tuple[Any, Any]:
        """The published counter and confirm histogram of ``key``'s publish labels."""
        m, child = self._m, self._child
        children = (
            child(m.published, _PUBLISH_LABELS, key),
            child(m.confirm_seconds, _CONFIRM_LABELS, key[:2]),
        )
        if len(self._publish_children) < _CACHE_LIMIT:
            self._publish_children[key] = children
        return children

    # -- handling ------------------------------------------------------------------------

    def handle(self, message: Any, ctx: Context, call_next: HandleNext) -> Any:
        gauge = self._in_flight(ctx)
        gauge.inc()
        try:
            return call_next(message, ctx)
        finally:
            gauge.dec()

    async def handle_async(self, message: Any, ctx: Context, call_next: AsyncHandleNext) -> Any:
        gauge = self._in_flight(ctx)
        gauge.inc()
        try:
            return await call_next(message, ctx)
        finally:
            gauge.dec()

    def _in_flight(self, ctx: Context) -> Any:
        scope = current()
        key = ((scope.service if scope is not None else "") or self.service, ctx.queue)
        gauge = self._gauges.get(key)
        if gauge is None:
            gauge = self._child(self._m.in_flight, _QUEUE_LABELS, key)
            if len(self._gauges) < _CACHE_LIMIT:
                self._gauges[key] = gauge
        return gauge

    # -- events --------------------------------------------------------------------------

    def on_event(self, event: LifecycleEvent) -> None:
        record = self._on.get(type(event))
        if record is None:  # a subclass of an event: the handler of its nearest base
            record = next(
                (self._on[cls] for cls in type(event).__mro__ if cls in self._on), _ignore
            )
        record(event)

    def _handled(self, event: Handled | Retried | DeadLettered) -> None:
        d = event.delivery
        ran = not (isinstance(event, DeadLettered) and event.error_type == "DecodeError")
        key = (d.service or self.service, d.queue, d.event_type or "", _outcome(event), ran)
        children = self._outcomes.get(key)
        if children is None:
            children = self._outcome_children(key)
        consumed, seconds = children
        consumed.inc()
        if seconds is not None:
            seconds.observe(event.seconds)
        if self._up.get(key[0]) != 1:
            self._connected(key[0], 1)

    def _outcome_children(self, key: tuple[str, str, str, str, bool]) -> tuple[Any, Any]:
        m, child = self._m, self._child
        children = (
            child(m.consumed, _CONSUMED_LABELS, key[:4]),
            child(m.handler_seconds, _CONSUME_LABELS, key[:3]) if key[4] else None,
        )
        if len(self._outcomes) < _CACHE_LIMIT:
            self._outcomes[key] = children
        return children

    def _published_event(self, event: Published) -> None:  # confirm times: the publish hook
        self._connected(event.service or self.service, 1)

    def _undecodable(self, event: Undecodable) -> None:
        d = event.delivery
        self._child(self._m.undecodable, _QUEUE_LABELS, (d.service or self.service, d.queue)).inc()

    def _consumer(self, event: ConsumerAttached | ConsumerDetached) -> None:
        service = event.service or self.service
        attached = 1 if isinstance(event, ConsumerAttached) else 0
        self._child(self._m.consumers, _QUEUE_LABELS, (service, event.queue)).set(attached)
        if attached:
            self._connected(service, 1)

    def _link_up(self, event: LinkUp) -> None:
        self._connected(event.service or self.service, 1)

    def _link_lost(self, event: LinkLost) -> None:
        self._connected(event.service or self.service, 0)

    def _link_restored(self, event: LinkRestored) -> None:
        service = event.service or self.service
        self._connected(service, 1)
        if event.reconnects:
            self._child(self._m.reconnects, _SERVICE, (service,)).inc()

    def _blocked(self, event: PublishingBlocked | PublishingUnblocked) -> None:
        blocked = 1 if isinstance(event, PublishingBlocked) else 0
        self._child(self._m.blocked, _SERVICE, (event.service or self.service,)).set(blocked)


def _ignore(event: LifecycleEvent) -> None:
    """What the metrics record of an event they do not count: nothing."""


def _outcome(event: Handled | Retried | DeadLettered) -> str:
    if isinstance(event, Handled):
        return "acked"
    if isinstance(event, Retried):
        return "retried"
    return "rejected" if event.rejected else "dead_lettered"
