"""plan_subscription: one derivation of a subscription's topology for both buses."""

from __future__ import annotations

import pytest

import mqkit
from mqkit.errors import DecodeError
from mqkit.subscriptions import plan_subscription, subscription_queue_name, topic_matches
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
    assert names == ["svc.retries.500ms", "svc.unit.shipped.dlq", "svc.unit.shipped"]
    # The service's tier for 0.5 s: an exchange and a queue bound to it, shared with the
    # service's other subscriptions and consumers.
    assert Exchange("svc.retries.500ms", type="fanout") in sub.entities
    assert Binding("svc.retries.500ms", "svc.retries.500ms", "") in sub.entities
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
    # No broker retries for a queue that goes away with its instance: no tiers.
    assert [e for e in first.entities if isinstance(e, Exchange)] == [EXCHANGE]


def test_subscriptions_of_a_service_share_its_tiers() -> None:
    policy = mqkit.RetryPolicy(max_attempts=2, delays=(0.5,))
    shipped = plan(Shipped, retry=policy)
    pattern = plan("orders.*", retry=policy)
    tier = Queue(
        "svc.retries.500ms",
        type="quorum",
        arguments={
            "x-message-ttl": 500,
            "x-dead-letter-exchange": "",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )
    assert tier in shipped.entities and tier in pattern.entities


def test_explicit_queue_name_wins() -> None:
    sub = plan(Shipped, queue="custom")
    assert sub.queue.name == "custom" and sub.dlq == "custom.dlq"


def test_anything_else_is_a_config_error() -> None:
    with pytest.raises(mqkit.ConfigError, match="Event subclass or a topic pattern"):
        plan(42)


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("orders.*", "orders.placed", True),
        ("orders.*", "orders.placed.eu", False),
        ("orders.*", "orders", False),
        ("orders.*", "admin.grant", False),
        ("orders.#", "orders", True),
        ("orders.#", "orders.placed.eu", True),
        ("#", "anything.at.all", True),
        ("*.placed", "orders.placed", True),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
        ("orders.placed", "orders.placed", True),
        ("orders.placed", "orders.placedx", False),
    ],
)
def test_topic_matches_like_a_topic_exchange(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


class UnitOrderNew(mqkit.Event, event_type="unitsub.orders.new"):
    order_id: str


class UnitAdminGrant(mqkit.Event, event_type="unitsub.admin.grant"):
    user: str


def test_a_pattern_subscription_decodes_only_types_its_pattern_covers() -> None:
    subscription = plan("unitsub.orders.*")
    decoder = subscription.decoder  # type: ignore[attr-defined]
    assert decoder(b'{"order_id": "1"}', "unitsub.orders.new") == UnitOrderNew(order_id="1")
    # A registered type from elsewhere, on a message that reached the queue: not handed over.
    with pytest.raises(DecodeError, match="does not match this subscription's pattern"):
        decoder(b'{"user": "mallory"}', "unitsub.admin.grant")
    with pytest.raises(DecodeError):
        decoder(b"{}", None)
    with pytest.raises(DecodeError, match="no Event class"):
        decoder(b"{}", "unitsub.orders.unknown")
