"""plan_subscription: one derivation of a subscription's topology for both buses."""

from __future__ import annotations

import pytest

import mqkit
from mqkit.subscriptions import plan_subscription, subscription_queue_name
from mqkit.topology import Binding, Exchange, Queue


class Shipped(mqkit.Event, event_type="unit.shipped"):
    order_id: str


EXCHANGE = Exchange("events")


def plan(target: object, **kwargs: object) -> object:
    return plan_subscription(
        target,  # type: ignore[arg-type]
        service="svc",
        exchange=EXCHANGE,
        default_type="quorum",
        delivery_limit=20,
        **kwargs,  # type: ignore[arg-type]
    )


def test_pattern_queue_names_are_safe_for_every_client() -> None:
    assert subscription_queue_name("svc", "orders.*") == "svc.orders._star_"
    assert subscription_queue_name("svc", "#") == "svc._hash_"
    assert subscription_queue_name("svc", "a b/c") == "svc.a_b_c"


def test_event_class_subscription_binds_its_event_type_and_declares_retries() -> None:
    sub = plan(Shipped, retry=mqkit.RetryPolicy(max_attempts=2, delays=(0.5,)))
    assert sub.key == "unit.shipped"
    assert sub.queue == Queue("svc.unit.shipped")
    assert sub.message_type is Shipped
    assert sub.dlq == "svc.unit.shipped.dlq"
    names = [e.name for e in sub.entities if isinstance(e, Queue)]
    assert names == ["svc.unit.shipped.dlq", "svc.unit.shipped.retry.500ms", "svc.unit.shipped"]
    assert Binding("events", "svc.unit.shipped", "unit.shipped") in sub.entities
    assert sub.entities[0] == EXCHANGE
    assert sub.temporary == ()


def test_broadcast_gets_an_exclusive_queue_per_instance_and_a_shared_dlq() -> None:
    first = plan("orders.*", broadcast=True, retry=mqkit.RetryPolicy(immediate=2))
    second = plan("orders.*", broadcast=True)
    assert first.queue.name != second.queue.name
    assert first.queue.exclusive and first.queue.auto_delete and first.queue.type == "classic"
    assert first.dlq == second.dlq == "svc.orders._star_.dlq"
    assert first.policy.max_attempts == 1 and first.policy.immediate == 2
    assert first.message_type is None
    assert set(first.temporary) == {first.queue, Binding("events", first.queue.name, "orders.*")}


def test_explicit_queue_name_wins() -> None:
    sub = plan(Shipped, queue="custom")
    assert sub.queue.name == "custom" and sub.dlq == "custom.dlq"


def test_anything_else_is_a_config_error() -> None:
    with pytest.raises(mqkit.ConfigError, match="Event subclass or a topic pattern"):
        plan(42)
