"""Topology values and what a consumer's queue plus its RetryPolicy imply: its DLQ, and the
retry tiers of its service (one exchange and queue per delay, shared by the service)."""

from __future__ import annotations

import dataclasses

import pytest

from mqkit.declaring import is_derived
from mqkit.errors import ConfigError
from mqkit.retry import RetryPolicy
from mqkit.topology import (
    DLQ_DELIVERY_LIMIT,
    Binding,
    Entity,
    Exchange,
    Queue,
    consumer_topology,
    dlq_name,
    queue_arguments,
    retry_queue_name,
    retry_tier_name,
    retry_tiers,
)


def by_name(entities: list[Entity]) -> dict[str, Queue]:
    """The queues among ``entities``, by name."""
    return {e.name: e for e in entities if isinstance(e, Queue)}


def names_of(entities: list[Entity]) -> list[str]:
    """Every entity in order: a queue or exchange by name, a binding as ``exchange->queue``."""
    return [
        f"{e.exchange}->{e.queue}" if isinstance(e, Binding) else f"{type(e).__name__}:{e.name}"
        for e in entities
    ]


def test_queue_defaults() -> None:
    queue = Queue("orders")
    assert queue.name == "orders"
    assert queue.type is None  # settings.queue_type decides
    assert queue.durable is True
    assert queue.arguments == ()


def test_values_are_frozen() -> None:
    for value in (Queue("q"), Exchange("x"), Binding("x", "q", "a.b")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.name = "other"  # type: ignore[misc,union-attr]


def test_values_are_hashable_and_compare_by_value() -> None:
    a = Queue("q", type="quorum", arguments={"x-max-length": 10, "x-a": "b"})
    b = Queue("q", type="quorum", arguments={"x-a": "b", "x-max-length": 10})
    assert a == b and hash(a) == hash(b)
    assert a != Queue("q", type="classic", arguments={"x-a": "b", "x-max-length": 10})
    entities = {a, b, Exchange("x"), Exchange("x"), Binding("x", "q", "k"), Binding("x", "q", "k")}
    assert len(entities) == 3


def test_queue_arguments_are_stored_as_sorted_pairs() -> None:
    queue = Queue("q", arguments={"x-b": 2, "x-a": 1})
    assert queue.arguments == (("x-a", 1), ("x-b", 2))
    assert dict(queue.arguments) == {"x-a": 1, "x-b": 2}


@pytest.mark.parametrize("name", ["", "x" * 256])
def test_queue_name_must_be_1_to_255_bytes(name: str) -> None:
    with pytest.raises(ValueError, match="255"):
        Queue(name)


def test_queue_type_is_checked() -> None:
    with pytest.raises(ValueError):
        Queue("q", type="stream-ish")  # type: ignore[arg-type]


def test_exchange_defaults_and_types() -> None:
    assert Exchange("events").type == "topic"
    assert Exchange("events").durable is True
    assert Exchange("fan", type="fanout").type == "fanout"
    with pytest.raises(ValueError):
        Exchange("x", type="nope")  # type: ignore[arg-type]


def test_binding_takes_names_or_entities() -> None:
    binding = Binding(Exchange("events"), Queue("orders"), "orders.*")  # type: ignore[arg-type]
    assert binding == Binding("events", "orders", "orders.*")
    assert Binding("events", "orders").routing_key == "#"


def test_derived_names() -> None:
    assert dlq_name("orders") == "orders.dlq"
    assert retry_tier_name("billing", 1.0) == "billing.retries.1000ms"
    assert retry_tier_name("billing", 0.3) == "billing.retries.300ms"
    # The per-queue retry queue of mqkit before the tiers were shared (kept for upgrades).
    assert retry_queue_name("orders", 1.0) == "orders.retry.1000ms"
    assert retry_queue_name("orders", 0.3) == "orders.retry.300ms"


def test_a_tier_is_never_named_like_a_queues_old_retry_queue() -> None:
    # A work queue named like its service had "billing.retry.1000ms" of its own: a shared
    # tier of that name would be declared with other arguments and send the service's
    # retries to that one queue.
    assert retry_tier_name("billing", 1.0) != retry_queue_name("billing", 1.0)
    for service in ("billing", "billing.retry", "a.b"):
        for delay in (0.001, 1.0, 60.0):
            tier = retry_tier_name(service, delay)
            head, _, tail = tier.rpartition(".retry.")
            assert not (head and tail.endswith("ms") and tail[:-2].isdigit()), tier
            assert tier.startswith(f"{service}.")  # under the service's permission prefix


def test_derived_names_are_recognised() -> None:
    assert is_derived(retry_tier_name("billing", 1.0))
    assert is_derived(retry_queue_name("orders", 1.0))
    assert is_derived(dlq_name("orders"))
    assert not is_derived("billing.retries.soon") and not is_derived("retries.10ms")
    assert not is_derived("billing.retries")


def test_queue_arguments_type() -> None:
    assert queue_arguments(Queue("q"), "quorum") == {"x-queue-type": "quorum"}
    assert queue_arguments(Queue("q"), "classic") == {"x-queue-type": "classic"}
    assert queue_arguments(Queue("q", type="classic"), "quorum") == {"x-queue-type": "classic"}
    own = queue_arguments(Queue("q", arguments={"x-max-length": 5}), "quorum")
    assert own == {"x-queue-type": "quorum", "x-max-length": 5}


@pytest.mark.parametrize(
    "queue",
    [
        Queue("tmp", exclusive=True),
        Queue("tmp", auto_delete=True),
        Queue("tmp", durable=False),
        Queue("tmp", type="quorum", exclusive=True, auto_delete=True),
    ],
)
def test_temporary_queues_are_classic(queue: Queue) -> None:
    # Quorum queues are always durable and never exclusive: asking would fail on the broker.
    assert queue_arguments(queue, "quorum")["x-queue-type"] == "classic"


def test_consumer_topology_quorum_default_policy() -> None:
    entities = consumer_topology(
        Queue("orders"), RetryPolicy(), default_type="quorum", delivery_limit=20, service="billing"
    )
    # The service's tiers first (exchange, queue, binding per delay), then the DLQ, and the
    # work queue last: the work queue refers to the DLQ.
    assert names_of(entities) == [
        "Exchange:billing.retries.1000ms",
        "Queue:billing.retries.1000ms",
        "billing.retries.1000ms->billing.retries.1000ms",
        "Exchange:billing.retries.10000ms",
        "Queue:billing.retries.10000ms",
        "billing.retries.10000ms->billing.retries.10000ms",
        "Queue:orders.dlq",
        "Queue:orders",
    ]
    queues_ = by_name(entities)

    dlq = queues_["orders.dlq"]
    # Same type as the work queue (it must survive the loss of a cluster node), with a delivery
    # limit nobody reaches: peeking returns messages, and that must never drop one.
    dlq_args = queue_arguments(dlq, "quorum")
    assert dlq_args["x-queue-type"] == "quorum"
    assert dlq_args["x-delivery-limit"] == DLQ_DELIVERY_LIMIT
    assert dlq.durable

    assert Exchange("billing.retries.1000ms", type="fanout") in entities
    tier = queues_["billing.retries.1000ms"]
    assert tier.durable and not (tier.exclusive or tier.auto_delete)
    tier_args = queue_arguments(tier, "quorum")
    assert tier_args == {
        "x-queue-type": "quorum",
        "x-message-ttl": 1000,
        # Back by the default exchange with the message's own routing key (the work queue it
        # was published for): no x-dead-letter-routing-key, so every queue shares the tier.
        "x-dead-letter-exchange": "",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert queue_arguments(queues_["billing.retries.10000ms"], "quorum")["x-message-ttl"] == 10000

    work = queue_arguments(queues_["orders"], "quorum")
    assert work["x-queue-type"] == "quorum"
    assert work["x-dead-letter-exchange"] == ""
    assert work["x-dead-letter-routing-key"] == "orders.dlq"
    assert work["x-delivery-limit"] == 20
    assert work["x-dead-letter-strategy"] == "at-least-once"
    assert work["x-overflow"] == "reject-publish"
    assert queues_["orders"].durable


def test_consumer_topology_classic() -> None:
    policy = RetryPolicy(max_attempts=3, delays=(0.3, 0.6))
    queues = by_name(
        consumer_topology(
            Queue("jobs"), policy, default_type="classic", delivery_limit=20, service="svc"
        )
    )
    assert set(queues) == {"jobs", "jobs.dlq", "svc.retries.300ms", "svc.retries.600ms"}
    work = queue_arguments(queues["jobs"], "classic")
    assert work["x-queue-type"] == "classic"
    assert work["x-dead-letter-routing-key"] == "jobs.dlq"
    # Classic queues have neither a delivery limit nor at-least-once dead-lettering.
    assert "x-delivery-limit" not in work
    assert "x-dead-letter-strategy" not in work
    assert "x-overflow" not in work
    tier = queue_arguments(queues["svc.retries.600ms"], "classic")
    assert tier == {"x-queue-type": "classic", "x-message-ttl": 600, "x-dead-letter-exchange": ""}


def test_tiers_take_the_services_queue_type_not_the_work_queues() -> None:
    # The tiers are the service's, shared by all its queues: settings.queue_type decides.
    queues = by_name(
        consumer_topology(
            Queue("jobs", type="classic"),
            RetryPolicy(),
            default_type="quorum",
            delivery_limit=20,
            service="svc",
        )
    )
    assert queue_arguments(queues["jobs"], "quorum")["x-queue-type"] == "classic"
    assert "x-delivery-limit" not in queue_arguments(queues["jobs"], "quorum")
    tier = queue_arguments(queues["svc.retries.1000ms"], "quorum")
    assert tier["x-queue-type"] == "quorum"
    assert tier["x-dead-letter-strategy"] == "at-least-once"


def test_every_queue_of_a_service_derives_the_same_tiers() -> None:
    policy = RetryPolicy(max_attempts=3, delays=(0.5, 2.0))

    def tiers_of(queue: str) -> list[Entity]:
        derived = consumer_topology(
            Queue(queue), policy, default_type="quorum", delivery_limit=20, service="svc"
        )
        return [e for e in derived if not (isinstance(e, Queue) and e.name.startswith(queue))]

    assert tiers_of("a") == tiers_of("b") == retry_tiers("svc", policy.tiers, "quorum")
    other = consumer_topology(
        Queue("a"), policy, default_type="quorum", delivery_limit=20, service="other"
    )
    assert not set(tiers_of("a")) & set(other)  # another service's tiers are its own


def test_retry_tiers_one_per_distinct_delay_shortest_first() -> None:
    tiers = retry_tiers("svc", (2.0, 0.5, 2.0), "quorum")
    assert names_of(tiers) == [
        "Exchange:svc.retries.500ms",
        "Queue:svc.retries.500ms",
        "svc.retries.500ms->svc.retries.500ms",
        "Exchange:svc.retries.2000ms",
        "Queue:svc.retries.2000ms",
        "svc.retries.2000ms->svc.retries.2000ms",
    ]
    assert all(e.type == "fanout" and e.durable for e in tiers if isinstance(e, Exchange))
    assert retry_tiers("svc", (), "quorum") == []


def test_producer_and_consumer_declare_the_work_queue_identically() -> None:
    queue = Queue("orders", arguments={"x-max-length": 1000})
    for kind in ("quorum", "classic"):
        producer = consumer_topology(queue, None, default_type=kind, delivery_limit=20)
        consumer = by_name(
            consumer_topology(
                queue,
                RetryPolicy(max_attempts=5, delays=(0.1, 0.2)),
                default_type=kind,
                delivery_limit=20,
                service="svc",
            )
        )
        # No tiers without a policy and a service: queues only.
        assert names_of(producer) == ["Queue:orders.dlq", "Queue:orders"]
        assert by_name(producer)["orders"] == consumer["orders"]
        assert by_name(producer)["orders.dlq"] == consumer["orders.dlq"]


def test_no_tiers_without_a_service() -> None:
    entities = consumer_topology(
        Queue("q"), RetryPolicy(), default_type="quorum", delivery_limit=20
    )
    assert names_of(entities) == ["Queue:q.dlq", "Queue:q"]


def test_single_attempt_policy_has_no_retry_tiers() -> None:
    entities = consumer_topology(
        Queue("q"),
        RetryPolicy(max_attempts=1),
        default_type="quorum",
        delivery_limit=20,
        service="svc",
    )
    assert names_of(entities) == ["Queue:q.dlq", "Queue:q"]


def test_one_retry_tier_per_distinct_delay() -> None:
    policy = RetryPolicy(max_attempts=6, delays=(0.5, 0.5, 2.0))
    entities = consumer_topology(
        Queue("q"), policy, default_type="quorum", delivery_limit=20, service="svc"
    )
    assert [e.name for e in entities if isinstance(e, Queue)] == [
        "svc.retries.500ms",
        "svc.retries.2000ms",
        "q.dlq",
        "q",
    ]


def test_own_arguments_are_kept_and_win() -> None:
    queue = Queue("q", arguments={"x-max-length": 10, "x-delivery-limit": 50})
    work = by_name(
        consumer_topology(queue, RetryPolicy(), default_type="quorum", delivery_limit=20)
    )
    args = queue_arguments(work["q"], "quorum")
    assert args["x-max-length"] == 10
    assert args["x-delivery-limit"] == 50


def test_delivery_limit_below_max_attempts_is_a_config_error() -> None:
    policy = RetryPolicy(max_attempts=5, delays=(0.1,))
    with pytest.raises(ConfigError) as info:
        consumer_topology(Queue("orders"), policy, default_type="quorum", delivery_limit=3)
    text = str(info.value)
    assert "orders" in text and "x-delivery-limit=3" in text and "max_attempts=5" in text
    assert isinstance(info.value, ValueError)


def test_queue_own_delivery_limit_is_checked_too() -> None:
    queue = Queue("orders", arguments={"x-delivery-limit": 2})
    with pytest.raises(ConfigError, match="x-delivery-limit=2"):
        consumer_topology(
            queue, RetryPolicy(max_attempts=3), default_type="quorum", delivery_limit=20
        )


def test_delivery_limit_equal_to_max_attempts_is_fine() -> None:
    queues = consumer_topology(
        Queue("q"), RetryPolicy(max_attempts=3), default_type="quorum", delivery_limit=3
    )
    assert queue_arguments(by_name(queues)["q"], "quorum")["x-delivery-limit"] == 3


def test_delivery_limit_does_not_apply_to_classic_queues() -> None:
    queues = consumer_topology(
        Queue("q"),
        RetryPolicy(max_attempts=10, delays=(0.1,)),
        default_type="classic",
        delivery_limit=1,
    )
    assert "x-delivery-limit" not in queue_arguments(by_name(queues)["q"], "classic")


def test_broadcast_queue_gets_no_broker_dead_lettering() -> None:
    queue = Queue("svc.cache.cleared.ab12cd34", exclusive=True, auto_delete=True)
    policy = RetryPolicy(max_attempts=3, delays=(0.1,))
    queues = consumer_topology(queue, policy, default_type="quorum", delivery_limit=1)
    work = queues[-1]
    assert work == queue  # declared as given: no x-dead-letter-*, no delivery limit
    args = queue_arguments(work, "quorum")
    assert args == {"x-queue-type": "classic"}
    assert work.exclusive and work.auto_delete
    assert queues[0].name == "svc.cache.cleared.ab12cd34.dlq"
