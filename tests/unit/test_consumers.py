"""What a consumer declares and how it consumes (mqkit.consumers)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from mqkit.consumers import (
    RESPONDER_POLICY,
    ConsumerPlan,
    consumer_options,
    plan_consumer,
    plan_responder,
    plan_subscriber,
)
from mqkit.errors import ConfigError, DecodeError
from mqkit.messages import Event
from mqkit.retry import DEFAULT_POLICY, RetryPolicy
from mqkit.settings import Settings
from mqkit.topology import Binding, Exchange, Queue

SETTINGS = Settings(service="billing", prefetch=32, queue_type="quorum")


class Charge(BaseModel):
    order_id: str


class PlanCacheCleared(Event, event_type="consumers.cache.cleared"):
    key: str


def test_consumer_options() -> None:
    assert consumer_options(None, 1, default_prefetch=64) == (64, 1)
    assert consumer_options(10, 1, default_prefetch=64) == (10, 1)
    assert consumer_options(2, 8, default_prefetch=64) == (8, 8)  # never below concurrency
    for prefetch, concurrency in ((None, 0), (0, 1), (70000, 1)):
        with pytest.raises(ConfigError):
            consumer_options(prefetch, concurrency, default_prefetch=64)


def test_plan_consumer() -> None:
    plan = plan_consumer("charges", Charge, settings=SETTINGS, concurrency=4)
    assert (plan.queue, plan.prefetch, plan.concurrency) == ("charges", 32, 4)
    assert plan.policy is DEFAULT_POLICY
    assert (plan.service, plan.dlq, plan.temporary) == ("billing", "charges.dlq", ())
    names = [entity.name for entity in plan.entities if isinstance(entity, Queue)]
    # The service's retry tiers (settings.service, settings.queue_type), its DLQ, the queue.
    assert names == ["billing.retries.1000ms", "billing.retries.10000ms", "charges.dlq", "charges"]
    assert Exchange("billing.retries.1000ms", type="fanout") in plan.entities
    assert Binding("billing.retries.1000ms", "billing.retries.1000ms", "") in plan.entities
    assert plan.decoder(b'{"order_id": "1"}', None) == Charge(order_id="1")
    with pytest.raises(DecodeError):
        plan.decoder(b"{}", None)
    with pytest.raises(ConfigError, match="consumer expects a pydantic model class"):
        plan_consumer("charges", dict, settings=SETTINGS)  # type: ignore[arg-type]


def test_consumers_of_one_service_share_its_tiers() -> None:
    first = plan_consumer("charges", Charge, settings=SETTINGS)
    second = plan_consumer("refunds", Charge, settings=SETTINGS)

    def tiers(plan: ConsumerPlan) -> set[object]:
        return {
            e
            for e in plan.entities
            if ".retries." in (e.exchange if isinstance(e, Binding) else e.name)
        }

    assert tiers(first) == tiers(second)
    assert len(tiers(first)) == 6  # two delays: an exchange, a queue and a binding each
    other = plan_consumer("charges", Charge, settings=SETTINGS.merged(service="shipping"))
    assert not tiers(other) & tiers(first)


def test_plan_responder_is_never_retried() -> None:
    plan = plan_responder(Queue("adder"), Charge, settings=SETTINGS)
    assert plan.policy is RESPONDER_POLICY and plan.policy.tiers == ()
    assert plan.concurrency == 1
    assert [e.name for e in plan.entities] == ["adder.dlq", "adder"]  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="responder expects"):
        plan_responder("adder", int, settings=SETTINGS)  # type: ignore[arg-type]


def test_plan_subscriber_claims_its_key_once() -> None:
    exchange = Exchange("events")
    subscribed: set[str] = set()
    plan = plan_subscriber(
        PlanCacheCleared, settings=SETTINGS, service="web", exchange=exchange, subscribed=subscribed
    )
    assert plan.queue == "web.consumers.cache.cleared"
    assert plan.service == "web" and plan.dlq == "web.consumers.cache.cleared.dlq"
    assert Binding("events", plan.queue, "consumers.cache.cleared") in plan.entities
    # The bus's service owns the tiers its subscriptions retry through, not settings.service.
    tiers = {e.name for e in plan.entities if isinstance(e, Exchange) and e.type == "fanout"}
    assert tiers == {"web.retries.1000ms", "web.retries.10000ms"}
    assert subscribed == {"consumers.cache.cleared"}
    with pytest.raises(ConfigError, match="already subscribes"):
        plan_subscriber(
            PlanCacheCleared,
            settings=SETTINGS,
            service="web",
            exchange=exchange,
            subscribed=subscribed,
        )
    # With its own queue, or broadcast, a second handler is fine.
    plan_subscriber(
        PlanCacheCleared,
        settings=SETTINGS,
        service="web",
        exchange=exchange,
        subscribed=subscribed,
        queue="web.audit",
    )
    broadcast = plan_subscriber(
        PlanCacheCleared,
        settings=SETTINGS,
        service="web",
        exchange=exchange,
        subscribed=subscribed,
        broadcast=True,
        retry=RetryPolicy(max_attempts=3, immediate=2),
    )
    assert broadcast.temporary and broadcast.policy.max_attempts == 1
    assert not any(isinstance(e, Exchange) and e.type == "fanout" for e in broadcast.entities)
    with pytest.raises(ConfigError, match="concurrency"):
        plan_subscriber(
            "consumers.*",
            settings=SETTINGS,
            service="web",
            exchange=exchange,
            subscribed=subscribed,
            concurrency=0,
        )
    assert "consumers.*" not in subscribed  # a rejected subscription claims nothing


def test_a_stop_shares_one_deadline_and_still_gives_the_broker_a_moment():
    import time

    from mqkit.consumers import STOP_SLACK, StopClock

    clock = StopClock(5.0)
    assert 4.9 < clock.left() <= 5.0 and 4.9 < clock.round_trip() <= 5.0
    assert 4.9 < clock.cancel() <= 5.0
    assert StopClock(60.0).cancel() == 10.0  # the cancel never waits long for the broker
    spent = StopClock(0.0)
    time.sleep(0.01)
    assert spent.left() == 0.0  # handlers get nothing once time is up
    assert spent.round_trip() == STOP_SLACK == spent.cancel()  # the broker still gets a moment
