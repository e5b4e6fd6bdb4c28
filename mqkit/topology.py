"""Topology as data: :class:`Queue`, :class:`Exchange`, :class:`Binding`, and what a
consumer's queue plus its :class:`~mqkit.RetryPolicy` imply (the DLQ, and the retry tiers of
the consumer's service).

Values are frozen and hashable, so a client can remember what it declared and declare it
again after a reconnect. Declaring is I/O and lives in the shells.

For a work queue ``orders`` of service ``billing`` with the default policy the derived
topology is::

    billing.retries.1000ms   exchange (fanout) and queue: TTL 1 s, then dead-lettered to the
    billing.retries.10000ms  default exchange with the message's own routing key, which is the
                             name of the work queue it came from (one tier per delay, so a
                             short delay never waits behind a long one)
    orders.dlq               dead letters, with the reason in x-mqkit-* headers (same type)
    orders                   the work queue (quorum; overflow to orders.dlq at delivery-limit)

The tiers are the service's, shared by all its consumers and bus subscriptions: a retry copy
is published to the tier's exchange with the work queue's name as routing key. Before mqkit
shared them, each work queue had tiers of its own, ``orders.retry.1000ms`` dead-lettering to
``orders`` (:func:`retry_queue_name`): messages waiting there still come back by themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import KW_ONLY
from typing import Any, Literal

from pydantic import field_validator
from pydantic.dataclasses import dataclass

from mqkit.errors import ConfigError
from mqkit.retry import RetryPolicy

__all__ = [
    "Binding",
    "Exchange",
    "Queue",
    "check_entities",
    "consumer_topology",
    "dead_letter_queue",
    "dlq_name",
    "queue_arguments",
    "retry_queue_name",
    "retry_tier_name",
    "retry_tiers",
]

QueueType = Literal["quorum", "classic"]


def _freeze(value: Any) -> Any:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return tuple(sorted(value.items()))
    return tuple(tuple(item) for item in value)


@dataclass(frozen=True)
class Queue:
    """A queue. ``type=None`` takes ``settings.queue_type`` (quorum by default).

    ``arguments`` are extra ``x-`` arguments, e.g. ``{"x-max-length": 10_000}``.
    """

    name: str
    _: KW_ONLY
    type: QueueType | None = None
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    # Given as a dict; stored as sorted (key, value) pairs so the value stays hashable.
    arguments: Mapping[str, Any] | tuple[tuple[str, Any], ...] = ()

    @field_validator("arguments", mode="before")
    @classmethod
    def _freeze_arguments(cls, value: Any) -> Any:
        return _freeze(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or len(value.encode()) > 255:
            raise ValueError("a queue name must be 1 to 255 bytes")
        return value


@dataclass(frozen=True)
class Exchange:
    """An exchange (``topic`` by default; ``fanout``, ``direct``, ``headers`` too)."""

    name: str
    _: KW_ONLY
    type: Literal["topic", "fanout", "direct", "headers"] = "topic"
    durable: bool = True
    auto_delete: bool = False


@dataclass(frozen=True)
class Binding:
    """Routes messages from ``exchange`` to ``queue`` by ``routing_key`` (a topic pattern)."""

    exchange: str
    queue: str
    routing_key: str = "#"

    @field_validator("exchange", "queue", mode="before")
    @classmethod
    def _name_of(cls, value: Any) -> Any:
        return value.name if isinstance(value, (Queue, Exchange)) else value


Entity = Queue | Exchange | Binding


def check_entities(entities: Iterable[object]) -> None:
    """Raise :class:`ConfigError` for anything ``declare()`` cannot declare."""
    for entity in entities:
        if not isinstance(entity, (Queue, Exchange, Binding)):
            raise ConfigError(f"declare expects Queue, Exchange or Binding, got {entity!r}")


def dlq_name(queue: str) -> str:
    """The dead-letter queue of ``queue``."""
    return f"{queue}.dlq"


def retry_tier_name(service: str, delay: float) -> str:
    """The retry tier (an exchange and a queue of that name) where messages of ``service``
    wait ``delay`` seconds: ``billing.retries.1000ms``.

    Named after the service, so the permissions a service is granted by name prefix
    (``^billing\\.``) cover its tiers; never of the form ``<queue>.retry.<n>ms``, so a tier
    cannot be confused with a queue's own retry queue of an older mqkit (a work queue named
    like its service, ``billing``, had ``billing.retry.1000ms``).
    """
    return f"{service}.retries.{_ms(delay)}ms"


def retry_queue_name(queue: str, delay: float) -> str:
    """The retry queue of ``queue`` for ``delay`` seconds as mqkit declared it before the
    tiers were shared per service (``orders.retry.1000ms``, dead-lettering to ``orders``).

    mqkit no longer declares these; messages waiting in one still come back to ``queue`` by
    themselves, and an empty one can be deleted once no instance of an older mqkit runs.
    """
    return f"{queue}.retry.{_ms(delay)}ms"


def _ms(delay: float) -> int:
    return round(delay * 1000)


# Peeking at a DLQ returns its messages, and a quorum queue counts each return against its
# delivery limit (20 by default on RabbitMQ 4), which would drop a dead letter someone merely
# looked at. A DLQ gets a limit nobody reaches instead. (A classic DLQ would have no limit,
# but it lives on one node: in a cluster, losing that node would stop every consumer that
# dead-letters into it.)
DLQ_DELIVERY_LIMIT = 1_000_000


def dead_letter_queue(name: str, kind: QueueType) -> Queue:
    """The dead-letter queue ``name``, of the work queue's type ``kind``."""
    if kind == "quorum":
        return Queue(name, type="quorum", arguments={"x-delivery-limit": DLQ_DELIVERY_LIMIT})
    return Queue(name, type="classic")


def queue_arguments(queue: Queue, default_type: QueueType) -> dict[str, Any]:
    """The declare arguments for ``queue``: its ``x-queue-type`` plus its own arguments."""
    kind = queue.type or default_type
    if kind == "quorum" and (queue.exclusive or queue.auto_delete or not queue.durable):
        kind = "classic"  # quorum queues are always durable and never exclusive
    args: dict[str, Any] = {"x-queue-type": kind}
    args.update(dict(queue.arguments))
    return args


def retry_tiers(service: str, delays: Iterable[float], kind: QueueType) -> list[Entity]:
    """The retry tiers of ``service`` for ``delays``: per delay, a fanout exchange, a queue of
    type ``kind`` (the service's ``settings.queue_type``) and the binding between them.

    The queue holds each message for the delay (``x-message-ttl``), then dead-letters it to
    the default exchange with no ``x-dead-letter-routing-key``: the message keeps its own
    routing key, the name of the work queue it was published for, and goes back there. A
    quorum tier dead-letters at least once.
    """
    out: list[Entity] = []
    for delay in sorted(set(delays)):
        name = retry_tier_name(service, delay)
        queue = Queue(
            name,
            type=kind,
            arguments={
                "x-message-ttl": _ms(delay),
                "x-dead-letter-exchange": "",
                **_at_least_once(kind),
            },
        )
        out += [Exchange(name, type="fanout"), queue, Binding(name, name, "")]
    return out


def consumer_topology(
    queue: Queue,
    policy: RetryPolicy | None,
    *,
    default_type: QueueType,
    delivery_limit: int,
    service: str | None = None,
) -> list[Entity]:
    """What a consumer of ``queue`` needs: the retry tiers of ``service`` its ``policy`` uses
    (:func:`retry_tiers`, of ``default_type``), the DLQ, and the work queue itself (last,
    since it refers to the DLQ).

    Without a ``service`` no tiers: a producer making sure its queue exists passes neither
    (the work queue's own arguments do not depend on the policy, so producer and consumer
    declare it identically), and the result is then queues only.

    Raises :class:`ConfigError` if the queue's ``x-delivery-limit`` could cut retries short.
    """
    kind = queue_arguments(queue, default_type)["x-queue-type"]
    own: dict[str, Any] = dict(queue.arguments)
    dlq = dead_letter_queue(dlq_name(queue.name), kind)
    tiers = retry_tiers(service, policy.tiers, default_type) if service and policy else []
    if queue.exclusive or queue.auto_delete or not queue.durable:
        # A temporary queue (a broadcast subscriber) gets no broker-side dead-lettering.
        return [*tiers, dlq, queue]
    extra: dict[str, Any] = {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dlq.name,
    }
    if kind == "quorum":
        limit = own.get("x-delivery-limit", delivery_limit)
        if policy and int(limit) < policy.max_attempts:
            raise ConfigError(
                f"queue {queue.name!r}: x-delivery-limit={limit} is below "
                f"RetryPolicy.max_attempts={policy.max_attempts}; raise delivery_limit"
            )
        extra["x-delivery-limit"] = int(limit)
        extra.update(_at_least_once(kind))
    extra.update(own)
    work = Queue(
        queue.name,
        type=queue.type,
        durable=queue.durable,
        exclusive=queue.exclusive,
        auto_delete=queue.auto_delete,
        arguments=extra,
    )
    return [*tiers, dlq, work]


def _at_least_once(kind: str) -> dict[str, Any]:
    # Quorum queues can dead-letter at-least-once (RabbitMQ >= 3.10); it requires
    # overflow=reject-publish. Classic queues dead-letter at-most-once and take neither.
    if kind != "quorum":
        return {}
    return {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
