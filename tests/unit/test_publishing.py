"""Where a producer publishes and what it sends (mqkit.publishing)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from pydantic import BaseModel

from mqkit.errors import ConfigError
from mqkit.messages import Event
from mqkit.publishing import PublishTarget, check_model, plan_producer
from mqkit.topology import Exchange, Queue


class Order(BaseModel):
    order_id: str
    amount: Decimal


class Refund(BaseModel):
    order_id: str


class PubOrderPlaced(Event, event_type="publishing.orders.placed"):
    order_id: str


def _plan(**kwargs: object) -> tuple[PublishTarget[Order], tuple[object, ...]]:
    values: dict[str, object] = {
        "queue": None,
        "exchange": None,
        "routing_key": None,
        "default_type": "quorum",
        "delivery_limit": 20,
        "declared": (),
    }
    values.update(kwargs)
    return plan_producer(Order, **values)  # type: ignore[arg-type]


def test_a_queue_producer_declares_the_queue_and_its_dlq() -> None:
    target, entities = _plan(queue="orders")
    assert target.queue == "orders" and target.exchange == ""
    names = [entity.name for entity in entities]  # type: ignore[attr-defined]
    assert names == ["orders.dlq", "orders"]
    work = entities[-1]
    assert isinstance(work, Queue)
    assert dict(work.arguments)["x-dead-letter-routing-key"] == "orders.dlq"


def test_a_queue_this_client_declared_is_used_as_it_is() -> None:
    _, entities = _plan(queue=Queue("orders"), declared=(Queue("orders", type="classic"),))
    assert entities == ()


def test_an_exchange_is_declared_a_name_is_not() -> None:
    target, entities = _plan(exchange=Exchange("shop"), routing_key="orders.new")
    assert (target.exchange, target.routing_key, entities) == (
        "shop",
        "orders.new",
        (Exchange("shop"),),
    )
    target, entities = _plan(exchange="shop")
    assert (target.exchange, entities) == ("shop", ())


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"queue": "q", "exchange": "x"}, {"queue": "q", "routing_key": "k"}],
)
def test_invalid_producer_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        _plan(**kwargs)


def test_check_model() -> None:
    check_model(Order, "producer")
    with pytest.raises(ConfigError, match="producer expects a pydantic model class"):
        check_model(dict, "producer")


def test_routing_keys() -> None:
    order = Order(order_id="1", amount=Decimal(1))
    to_queue = PublishTarget(Order, queue="orders")
    assert to_queue.route(order) == "orders"
    assert to_queue.route(order, "orders") == "orders"
    with pytest.raises(ConfigError, match="routing_key does not apply"):
        to_queue.route(order, "elsewhere")
    to_exchange = PublishTarget(Order, "shop", "orders.new")
    assert to_exchange.route(order) == "orders.new"
    assert to_exchange.route(order, "orders.other") == "orders.other"
    assert PublishTarget(Order, "shop").route(order) == ""
    event = PubOrderPlaced(order_id="1")
    bus = PublishTarget(Event, "events", owner="EventBus")
    assert bus.route(event) == "publishing.orders.placed"
    assert bus.route(event, "") == ""


def test_prepare_encodes_with_the_options_and_checks_the_type() -> None:
    target = PublishTarget(Order, "shop", "orders.new")
    orders = [Order(order_id=str(i), amount=Decimal(i)) for i in range(3)]
    prepared = target.prepare(
        orders, service="billing", headers={"tenant": "acme"}, priority=3, expiration=1.5
    )
    assert [key for _, key in prepared] == ["orders.new"] * 3
    envelope = prepared[0][0]
    assert json.loads(envelope.body) == {"order_id": "0", "amount": "0"}
    assert envelope.app_id == "billing" and envelope.type == "Order"
    assert envelope.headers == {"tenant": "acme"}
    assert (envelope.priority, envelope.expiration) == (3, 1500)
    assert len({envelope.message_id for envelope, _ in prepared}) == 3
    with pytest.raises(TypeError, match=r"Producer\[Order\]\.publish expected Order, got dict"):
        target.prepare([{"order_id": "1"}], service="billing")
    with pytest.raises(TypeError, match=r"EventBus\.publish expected Event, got Refund"):
        PublishTarget(Event, "events", owner="EventBus").prepare(
            [Refund(order_id="1")], service="billing"
        )


def test_message_id_names_one_message_only() -> None:
    target = PublishTarget(Order, queue="orders")
    one = Order(order_id="1", amount=Decimal(1))
    [(envelope, _)] = target.prepare([one], service="billing", message_id="x")
    assert envelope.message_id == "x"
    # Returns are matched by message id: one id for several messages could pin a return on
    # the wrong one, so it is refused before anything is published.
    with pytest.raises(ConfigError, match="message_id= names one message"):
        target.prepare(iter([one, one]), service="billing", message_id="x")
    assert target.prepare([], service="billing", message_id="x") == []


def test_describe() -> None:
    assert PublishTarget(Order, queue="orders").describe() == "queue='orders'"
    assert PublishTarget(Order, "shop").describe() == "exchange='shop'"


def test_a_nacked_publish_is_sent_once_more_when_time_allows() -> None:
    from mqkit.publishing import NACK_RETRIES, retry_nacked

    assert NACK_RETRIES == 1
    assert retry_nacked(1, wait=0.0, budget=5.0)
    assert not retry_nacked(2, wait=0.0, budget=5.0)
    assert not retry_nacked(1, wait=1.0, budget=0.5)


def test_a_nacking_channel_is_replaced_at_once_then_at_most_once_per_interval() -> None:
    from mqkit.publishing import ChannelRenewal

    now = [100.0]
    renewal = ChannelRenewal(interval=1.0, clock=lambda: now[0])
    assert renewal.wait() == 0.0
    renewal.renewed()
    now[0] += 0.25
    assert renewal.wait() == 0.75
    now[0] += 1.0
    assert renewal.wait() == 0.0


def test_missing_exchange_names_the_exchange_the_broker_says_is_missing():
    from mqkit.publishing import missing_exchange

    text = "NOT_FOUND - no exchange 'orders.events' in vhost '/'"
    assert missing_exchange(404, text) == "orders.events"
    assert missing_exchange(None, text) == "orders.events"
    assert missing_exchange(404, "NOT_FOUND - no queue 'orders' in vhost '/'") is None
    assert missing_exchange(406, text) is None
