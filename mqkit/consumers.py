"""What a consumer declares and how it consumes, as one plain value both shells run.

``client.consumer(...)``, ``client.responder(...)`` and ``bus.subscribe(...)`` ask this
module for a :class:`ConsumerPlan`, so the two runtimes validate the same arguments, pick the
same prefetch and declare the same topology. The shells' consumers only do the I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import BaseModel

from mqkit.delivery import Decoder, typed_decoder
from mqkit.errors import ConfigError
from mqkit.messages import Event
from mqkit.publishing import check_model
from mqkit.retry import DEFAULT_POLICY, RetryPolicy
from mqkit.settings import Settings
from mqkit.subscriptions import plan_subscription
from mqkit.topology import Entity, Exchange, Queue, consumer_topology, dlq_name

__all__ = [
    "RESPONDER_POLICY",
    "STOP_BACKSTOP",
    "STOP_SLACK",
    "ConsumerPlan",
    "StopClock",
    "consumer_options",
    "plan_consumer",
    "plan_responder",
    "plan_subscriber",
    "resolve_queue",
]

# RPC requests are not retried: the caller is waiting, and gets the error instead.
RESPONDER_POLICY = RetryPolicy(max_attempts=1, delays=())

STOP_SLACK = 0.5  # s: the least a stop gives the cancel and the close each, once time is up
STOP_BACKSTOP = 2.0  # s: how much longer than its timeout stop(timeout) may take at most
_CANCEL_LIMIT = 10.0  # s: the most a stop waits for the broker's cancel-ok


@dataclass
class StopClock:
    """How a consumer's ``stop(timeout)`` spends its time, on both runtimes: the
    ``basic.cancel``, the wait for running handlers and the close of the channel come out of
    one deadline, and each broker round trip still gets at least :data:`STOP_SLACK` seconds,
    so a stop returns within ``timeout`` plus twice that even when the broker does not
    answer.

    ```python
    clock = StopClock(5.0)
    clock.cancel()      # for basic.cancel: what is left, at least STOP_SLACK, at most 10 s
    clock.left()        # for running handlers: what is left (0 once it is up)
    clock.round_trip()  # for closing the channel: what is left, at least STOP_SLACK
    ```
    """

    timeout: float
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def round_trip(self) -> float:
        return max(STOP_SLACK, self.left())

    def cancel(self) -> float:
        return min(self.round_trip(), _CANCEL_LIMIT)


_MAX_PREFETCH = 65535  # basic.qos prefetch_count is a 16-bit field


@dataclass(frozen=True)
class ConsumerPlan:
    """A consumer of ``queue``: how to decode, when to retry, what to declare on start.

    ``dlq`` is where give-ups go; ``temporary`` lists what goes away with the connection (a
    broadcast queue and its binding): re-declared while the consumer runs, forgotten once it
    stops. ``service`` is named in the dead letters' headers, and its retry tiers are where
    retries wait (:func:`~mqkit.topology.retry_tier_name`); ``entities`` declare them.
    """

    queue: str
    decoder: Decoder
    policy: RetryPolicy
    entities: tuple[Entity, ...]
    prefetch: int
    concurrency: int
    service: str
    dlq: str
    temporary: tuple[Entity, ...] = ()


def consumer_options(
    prefetch: int | None, concurrency: int, *, default_prefetch: int
) -> tuple[int, int]:
    """Validated ``(prefetch, concurrency)``: ``concurrency`` at least 1, ``prefetch`` 1 to
    65535 or ``None`` (``default_prefetch``), and never below ``concurrency`` (a worker with
    nothing prefetched would idle)."""
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    if prefetch is not None and not 1 <= prefetch <= _MAX_PREFETCH:
        raise ConfigError(f"prefetch must be between 1 and {_MAX_PREFETCH}, got {prefetch}")
    return min(max(prefetch or default_prefetch, concurrency), _MAX_PREFETCH), concurrency


def plan_consumer(
    queue: str | Queue,
    message_type: type[BaseModel],
    *,
    settings: Settings,
    prefetch: int | None = None,
    concurrency: int = 1,
    retry: RetryPolicy | None = None,
    declared: Iterable[Entity] = (),
) -> ConsumerPlan:
    """The plan for ``client.consumer(queue, message_type, handler, ...)``: ``retry`` None is
    :data:`~mqkit.retry.DEFAULT_POLICY`; the queue gets its DLQ, and the service's retry tiers
    for the policy's delays are declared with it. A queue
    given by name that the client ``declared`` itself keeps the arguments it was declared
    with."""
    check_model(message_type, "consumer")
    work = resolve_queue(queue, declared)
    return _plan(work, message_type, retry or DEFAULT_POLICY, settings, prefetch, concurrency)


def plan_responder(
    queue: str | Queue,
    request_type: type[BaseModel],
    *,
    settings: Settings,
    declared: Iterable[Entity] = (),
) -> ConsumerPlan:
    """The plan for ``client.responder(queue, request_type, handler)``: one request at a
    time, never retried (:data:`RESPONDER_POLICY`)."""
    check_model(request_type, "responder")
    return _plan(resolve_queue(queue, declared), request_type, RESPONDER_POLICY, settings, None, 1)


def resolve_queue(queue: str | Queue, declared: Iterable[Entity]) -> Queue:
    """``queue`` as a :class:`Queue`: a name the client declared as a queue takes that
    declaration (its type and arguments), so a consumer agrees with ``declare(Queue(...))``."""
    if isinstance(queue, Queue):
        return queue
    for entity in declared:
        if isinstance(entity, Queue) and entity.name == queue:
            return entity
    return Queue(queue)


def plan_subscriber(
    target: type[Event] | str,
    *,
    settings: Settings,
    service: str,
    exchange: Exchange,
    subscribed: set[str],
    broadcast: bool = False,
    queue: str | None = None,
    retry: RetryPolicy | None = None,
    prefetch: int | None = None,
    concurrency: int = 1,
) -> ConsumerPlan:
    """The plan for ``bus.subscribe(target, ...)`` of ``service`` on ``exchange`` (see
    :func:`mqkit.subscriptions.plan_subscription`).

    ``subscribed`` holds the keys ``service`` already subscribes to on ``exchange``, on the
    queues the bus names itself (the client shares one set among its buses of that service
    and exchange); subscribing to one of them again without ``queue=`` would put a second
    handler on the same queue (each would get half the events), so it is a
    :class:`ConfigError`. The new key is added to it.
    """
    prefetch, concurrency = consumer_options(
        prefetch, concurrency, default_prefetch=settings.prefetch
    )
    subscription = plan_subscription(
        target,
        service=service,
        exchange=exchange,
        broadcast=broadcast,
        queue=queue,
        retry=retry,
        default_type=settings.queue_type,
        delivery_limit=settings.delivery_limit,
    )
    if queue is None and not broadcast:
        if subscription.key in subscribed:
            raise ConfigError(
                f"service {service!r} already subscribes to {subscription.key!r} on exchange "
                f"{exchange.name!r} (on this event bus or another one of this client), so a "
                "second handler on its queue would get only half the events; pass queue= to "
                "subscribe a second handler with its own queue"
            )
        subscribed.add(subscription.key)
    return ConsumerPlan(
        queue=subscription.queue.name,
        decoder=subscription.decoder,
        policy=subscription.policy,
        entities=subscription.entities,
        prefetch=prefetch,
        concurrency=concurrency,
        service=service,
        dlq=subscription.dlq,
        temporary=subscription.temporary,
    )


def _plan(
    queue: str | Queue,
    message_type: type[BaseModel],
    policy: RetryPolicy,
    settings: Settings,
    prefetch: int | None,
    concurrency: int,
) -> ConsumerPlan:
    prefetch, concurrency = consumer_options(
        prefetch, concurrency, default_prefetch=settings.prefetch
    )
    work = queue if isinstance(queue, Queue) else Queue(queue)
    entities = consumer_topology(
        work,
        policy,
        default_type=settings.queue_type,
        delivery_limit=settings.delivery_limit,
        service=settings.service,
    )
    return ConsumerPlan(
        queue=work.name,
        decoder=typed_decoder(message_type),
        policy=policy,
        entities=tuple(entities),
        prefetch=prefetch,
        concurrency=concurrency,
        service=settings.service,
        dlq=dlq_name(work.name),
    )
