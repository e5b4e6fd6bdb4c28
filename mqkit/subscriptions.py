"""What an event-bus subscription declares and how it consumes, as plain data.

Both buses (``_sync/bus.py``, ``_async/bus.py``) ask :func:`plan_subscription` and only do
the I/O, so a sync and an async instance of one service derive the same queue, bindings and
dead-letter queue, and compete on the same queue.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from dataclasses import dataclass

from pydantic import BaseModel

from mqkit.delivery import Decoder, typed_decoder
from mqkit.errors import ConfigError, DecodeError
from mqkit.messages import Event, decode_event
from mqkit.retry import DEFAULT_POLICY, RetryPolicy
from mqkit.topology import (
    Binding,
    Entity,
    Exchange,
    Queue,
    QueueType,
    consumer_topology,
    dead_letter_queue,
    dlq_name,
)

__all__ = [
    "Subscription",
    "pattern_decoder",
    "plan_subscription",
    "subscription_queue_name",
    "topic_matches",
]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


def subscription_queue_name(service: str, key: str) -> str:
    """The durable queue of ``service``'s subscription to ``key`` (an event type or pattern).

    Topic wildcards become words (``orders.*`` → ``orders._star_``, ``#`` → ``_hash_``) and
    other characters AMQP clients refuse in names become ``_``, so every client can name it.
    """
    safe = key.replace("*", "_star_").replace("#", "_hash_")
    return f"{service}.{_UNSAFE.sub('_', safe)}"


def topic_matches(pattern: str, key: str) -> bool:
    """Whether routing key ``key`` matches topic ``pattern`` as RabbitMQ's topic exchange
    matches them: words split at ``.``, ``*`` is exactly one word, ``#`` zero or more."""
    words, keys = pattern.split("."), key.split(".")
    # reachable[j]: the pattern so far can match the first j words of the key.
    reachable = [True] + [False] * len(keys)
    for word in words:
        if word == "#":
            for j in range(1, len(keys) + 1):
                reachable[j] = reachable[j] or reachable[j - 1]
            continue
        after = [False] * (len(keys) + 1)
        for j, ok in enumerate(reachable[:-1]):
            if ok and (word in ("*", keys[j])):
                after[j + 1] = True
        reachable = after
    return reachable[-1]


def pattern_decoder(pattern: str) -> Decoder:
    """The decoder of a subscription to topic ``pattern``: the :class:`~mqkit.Event` class
    is picked by the ``type`` property, which must match ``pattern``.

    The ``type`` property comes from the wire: without the check, anyone who may publish
    to the subscription's queue (or to the exchange with a routing key it binds) could hand
    the handler any registered event class, ``AdminGrant`` to an ``orders.*`` handler. Such a
    message is a :class:`DecodeError`: dead-lettered at once, with the reason.
    """

    def _decode(body: bytes, event_type: str | None) -> BaseModel:
        if event_type is None or not topic_matches(pattern, event_type):
            raise DecodeError(
                f"event type {event_type!r} does not match this subscription's pattern "
                f"{pattern!r}; publish it with a routing key and type the pattern covers"
            )
        return decode_event(body, event_type)

    return _decode


@dataclass(frozen=True)
class Subscription:
    """A planned subscription: what to declare and how to consume.

    ``temporary`` lists the entities that go away with the connection (a broadcast
    subscriber's exclusive queue and its binding): re-declared after a reconnect while the
    subscription runs, forgotten once it stops.
    """

    key: str
    queue: Queue
    decoder: Decoder
    message_type: type[Event] | None
    policy: RetryPolicy
    dlq: str
    entities: tuple[Entity, ...]
    temporary: tuple[Entity, ...] = ()


def plan_subscription(
    target: type[Event] | str,
    *,
    service: str,
    exchange: Exchange,
    broadcast: bool = False,
    queue: str | None = None,
    retry: RetryPolicy | None = None,
    default_type: QueueType,
    delivery_limit: int,
) -> Subscription:
    """Plan a subscription of ``service`` to ``target`` on ``exchange``.

    ``target`` is an :class:`~mqkit.Event` subclass (bound by its ``event_type``, decoded as
    that class) or a topic pattern (decoded by the ``type`` property through the registry,
    :func:`pattern_decoder`: a type that is unknown or outside the pattern is dead-lettered
    with the reason).

    One durable queue per (service, subscription): the service's instances compete on it;
    its retries wait in the service's retry tiers, shared with its other subscriptions and
    consumers (:func:`~mqkit.topology.retry_tiers`). ``broadcast=True`` gives each instance
    its own exclusive, auto-delete queue instead; such a queue cannot have broker retries
    (they would route back to a queue that may be gone), so only the policy's in-process
    ``immediate`` retries apply, and give-ups go to a durable DLQ the instances share.
    """
    decoder: Decoder
    message_type: type[Event] | None
    if isinstance(target, str):
        key, decoder, message_type = target, pattern_decoder(target), None
    elif isinstance(target, type) and issubclass(target, Event):
        key, decoder, message_type = target.event_type, typed_decoder(target), target
    else:
        raise ConfigError(
            f"subscribe() takes an mqkit.Event subclass or a topic pattern, got {target!r}"
        )
    policy = retry or DEFAULT_POLICY
    shared = queue or subscription_queue_name(service, key)
    if broadcast:
        name = f"{shared}.{uuid.uuid4().hex[:8]}"
        work = Queue(name, type="classic", durable=False, exclusive=True, auto_delete=True)
        binding = Binding(exchange.name, name, key)
        dlq = dlq_name(shared)
        return Subscription(
            key=key,
            queue=work,
            decoder=decoder,
            message_type=message_type,
            policy=dataclasses.replace(policy, max_attempts=1),
            dlq=dlq,
            entities=(exchange, dead_letter_queue(dlq, default_type), work, binding),
            temporary=(work, binding),
        )
    work = Queue(shared)
    derived = consumer_topology(
        work, policy, default_type=default_type, delivery_limit=delivery_limit, service=service
    )
    return Subscription(
        key=key,
        queue=work,
        decoder=decoder,
        message_type=message_type,
        policy=policy,
        dlq=dlq_name(shared),
        entities=(exchange, *derived, Binding(exchange.name, shared, key)),
    )
