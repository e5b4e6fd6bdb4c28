"""Every example runs here: the demo end to end on the test broker, and each service's
handler logic directly (no broker) where it has logic worth pinning down."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

import mqkit

# The examples are a package beside mqkit, not installed with it: import them from the
# checkout. (No tests/examples/__init__.py: it would make this directory shadow `examples`.)
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples import billing, demo, inventory, notifications, orders, pricing  # noqa: E402
from examples.models import (  # noqa: E402
    CacheCleared,
    ChargeCard,
    LineItem,
    OrderPaid,
    OrderPlaced,
    PaymentFailed,
    Price,
    PriceQuote,
    StockReserved,
    mask_card,
)


def context(attempt: int = 1, event_type: str | None = None) -> mqkit.Context:
    return mqkit.Context(
        message_id=uuid.uuid4().hex, correlation_id=None, attempt=attempt, event_type=event_type
    )


def order(sku: str = "MUG", quantity: int = 1, order_id: str = "ORD-1") -> OrderPlaced:
    return OrderPlaced(
        order_id=order_id,
        customer="ada",
        items=[LineItem(sku=sku, quantity=quantity)],
        total=Decimal("10.00"),
    )


class FakeBus:
    """Records what a handler publishes (sync and async ``publish``)."""

    def __init__(self) -> None:
        self.published: list[mqkit.Event] = []
        self._lock = threading.Lock()

    def publish(self, event: mqkit.Event, **_: Any) -> str:
        with self._lock:
            self.published.append(event)
        return uuid.uuid4().hex


class AsyncFakeBus(FakeBus):
    async def publish(self, event: mqkit.Event, **kw: Any) -> str:  # type: ignore[override]
        return FakeBus.publish(self, event, **kw)


# -- the demo: every service, end to end ---------------------------------------------------

STORY = [
    # (what, a line that must be in the output)
    ("services ready", "[demo] all 5 services ready"),
    ("rpc answer", "[pricing] quote for ada (2x COFFEE-BEANS, 1x MUG): 38.80 EUR"),
    ("rpc caller", "[orders] ada: pricing answered over RPC: 38.80 EUR"),
    ("event", "to ada: thanks for order"),
    ("retry", "the broker holds it and redelivers in 1s"),
    ("retry success", "in the remote warehouse (attempt 2)"),
    ("billing retry", "declined by the issuer: do not honor (attempt 1/3); retry in 0.5s"),
    ("billing give up", "(attempt 3/3); giving up"),
    ("customer told", "to linus: we could not charge card ****0002"),
    ("dead letter", "dead letter charge-ORD-"),
    ("dead letter reason", ": CardDeclined: card ****0002 declined by the issuer"),
    ("replay", "DeadLetterQueue.replay(message_id=...) sent 1 back to billing"),
    ("back in the dlq", "declined again: the charge is back in"),
    ("broadcast 1", "[notifications-1] catalog cache cleared (price list updated)"),
    ("broadcast 2", "[notifications-2] catalog cache cleared (price list updated)"),
    ("graceful stop", "[billing] stopped"),
    ("clean broker", "[demo] cleaned up: deleted"),
    ("success", "[demo] scenario complete in"),
]


def _leftovers(url: str, run_id: str, ctl: Any) -> list[str]:
    """Queues and exchanges of the demo run still on the broker (``ctl``: the
    ``broker_ctl`` fixture, which also lists names the demo could not predict)."""
    queues, exchanges = demo.declared_names(run_id)
    left = []
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for name in queues:
            channel = connection.channel()
            try:
                channel.queue_declare(name, passive=True)
                left.append(name)
                channel.close()
            except pika.exceptions.ChannelClosedByBroker:
                pass
        for name in exchanges:
            channel = connection.channel()
            try:
                channel.exchange_declare(name, passive=True)
                left.append(name)
                channel.close()
            except pika.exceptions.ChannelClosedByBroker:
                pass
    finally:
        connection.close()
    for kind in ("queues", "exchanges"):
        left += [n for n in ctl.list(kind) if n.startswith(f"demo-{run_id}.")]
    return sorted(set(left))


@pytest.mark.timeout(180)
def test_demo_tells_the_whole_story_and_leaves_the_broker_clean(
    broker_url: str, broker_ctl: Any, names: Any
) -> None:
    # The demo names everything demo-<run id>.*: with the test's prefix as the run id, the
    # suite's queue counts and its end-of-session listing see the demo's queues too.
    run_id = names.base
    env = {**os.environ, "MQKIT_URL": broker_url, "DEMO_RUN_ID": run_id}
    env.pop("MQKIT_URLS", None)
    result = subprocess.run(
        [sys.executable, "-m", "examples.demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    output = result.stdout
    assert result.returncode == 0, f"demo failed:\n{output}\n--- stderr ---\n{result.stderr}"
    missing = [what for what, line in STORY if line not in output]
    assert not missing, f"story lines missing: {missing}\n{output}"
    # Each order event went to exactly one notifications instance (competing consumers).
    assert output.count("to ada: thanks for order") == 1, output
    assert _leftovers(broker_url, run_id, broker_ctl) == []


def test_demo_fails_loudly_when_the_broker_is_unreachable() -> None:
    env = {
        **os.environ,
        "MQKIT_URL": "amqp://guest:guest@127.0.0.1:1/",
        "MQKIT_CONNECT_TIMEOUT": "1",
        "DEMO_RUN_ID": f"t{uuid.uuid4().hex[:6]}",
    }
    result = subprocess.run(
        [sys.executable, "-m", "examples.demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "[demo] FAILED:" in result.stdout


# -- orders and pricing on the broker, in-process ------------------------------------------


async def test_checkout_prices_over_rpc_and_sends_the_charge(
    broker_url: str, names: Any, raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEMO_PREFIX", f"{names.base}.")
    from examples import queue_name

    quotes, charges = queue_name(pricing.QUEUE), queue_name(orders.BILLING_QUEUE)
    names.queues.update({quotes, charges})  # deleted afterwards, with their DLQs
    exchange = names.exchange()

    def checkout() -> tuple[OrderPlaced, mqkit.RemoteError]:
        with mqkit.Client(url=broker_url, service="orders", events_exchange=exchange) as client:
            shop = orders.Checkout(client)
            placed = shop.place(orders.SAMPLE_ORDERS[0])
            teapot = orders.NewOrder("bo", (LineItem(sku="TEAPOT", quantity=1),), "4242")
            with pytest.raises(mqkit.RemoteError) as refused:
                shop.place(teapot)
            return placed, refused.value

    async with mqkit.AsyncClient(url=broker_url, service="pricing") as client:
        responder = client.responder(quotes, PriceQuote, pricing.answer)
        await responder.start()
        try:
            placed, refused = await asyncio.to_thread(checkout)
        finally:
            await responder.stop()

    assert placed.total == Decimal("38.80")
    assert refused.error_type == "UnknownProduct" and "TEAPOT" in refused.error_message
    [(_, properties, body)] = raw.drain(charges)  # only the priced order was billed
    assert properties.message_id == f"charge-{placed.order_id}"
    assert properties.app_id == "orders"
    assert ChargeCard.model_validate_json(body) == ChargeCard(
        order_id=placed.order_id,
        customer="ada",
        card=orders.SAMPLE_ORDERS[0].card,
        amount=Decimal("38.80"),
    )


# -- pricing ------------------------------------------------------------------------------


def test_pricing_adds_shipping_below_fifty_euros() -> None:
    price = pricing.quote(
        PriceQuote(
            customer="ada",
            items=[LineItem(sku="COFFEE-BEANS", quantity=2), LineItem(sku="MUG", quantity=1)],
        )
    )
    assert price == Price(
        subtotal=Decimal("33.90"), shipping=Decimal("4.90"), total=Decimal("38.80")
    )


def test_pricing_ships_free_from_fifty_euros() -> None:
    price = pricing.quote(PriceQuote(customer="linus", items=[LineItem(sku="GRINDER", quantity=1)]))
    assert (price.shipping, price.total) == (Decimal("0.00"), Decimal("89.00"))


def test_pricing_refuses_an_unknown_product() -> None:
    with pytest.raises(pricing.UnknownProduct, match="TEAPOT"):
        pricing.quote(PriceQuote(customer="ada", items=[LineItem(sku="TEAPOT", quantity=1)]))


async def test_pricing_answer_returns_the_price_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    request = PriceQuote(customer="grace", items=[LineItem(sku="KETTLE", quantity=1)])
    price = await pricing.answer(request, context())
    assert price.total == Decimal("43.90")
    assert capsys.readouterr().out == "[pricing] quote for grace (1x KETTLE): 43.90 EUR\n"


# -- inventory ----------------------------------------------------------------------------


async def test_inventory_retries_a_remote_item_then_reserves_it() -> None:
    bus = AsyncFakeBus()
    service = inventory.Inventory(bus)  # type: ignore[arg-type]
    kettle = order("KETTLE")
    with pytest.raises(inventory.StockServiceBusy):
        await service.on_order_placed(kettle, context(attempt=1))
    assert bus.published == []
    await service.on_order_placed(kettle, context(attempt=2))
    assert bus.published == [
        StockReserved(order_id="ORD-1", customer="ada", items=kettle.items, warehouse="remote")
    ]
    assert service.warehouse.stock["KETTLE"] == inventory.STOCK["KETTLE"] - 1


async def test_inventory_reserves_once_per_order() -> None:
    bus = AsyncFakeBus()
    service = inventory.Inventory(bus)  # type: ignore[arg-type]
    mugs = order("MUG", 2)
    await service.on_order_placed(mugs, context())
    await service.on_order_placed(mugs, context())  # delivered twice: at-least-once
    assert service.warehouse.stock["MUG"] == inventory.STOCK["MUG"] - 2
    assert len(bus.published) == 2 and bus.published[0] == bus.published[1]


async def test_inventory_rejects_an_order_it_cannot_fill() -> None:
    service = inventory.Inventory(AsyncFakeBus())  # type: ignore[arg-type]
    with pytest.raises(mqkit.Reject, match="only 5 of GRINDER left"):
        await service.on_order_placed(order("GRINDER", 6), context())
    assert service.warehouse.stock["GRINDER"] == 5


# -- billing ------------------------------------------------------------------------------


def charge(card: str, order_id: str = "ORD-9") -> ChargeCard:
    return ChargeCard(order_id=order_id, customer="linus", card=card, amount=Decimal("89.00"))


def test_billing_charges_and_publishes_order_paid() -> None:
    bus = FakeBus()
    service = billing.Billing(bus)  # type: ignore[arg-type]
    service.on_charge(charge("4242-4242-4242-4242"), context())
    [paid] = bus.published
    assert isinstance(paid, OrderPaid)
    assert (paid.order_id, paid.amount) == ("ORD-9", Decimal("89.00"))


def test_billing_charges_once_per_order() -> None:
    bus = FakeBus()
    service = billing.Billing(bus)  # type: ignore[arg-type]
    service.on_charge(charge("4242-4242-4242-4242"), context())
    service.on_charge(charge("4242-4242-4242-4242"), context())
    assert len(service.gateway.charged) == 1
    assert bus.published[0] == bus.published[1]  # same authorization


def test_billing_soft_decline_is_retried_then_the_customer_is_told(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bus = FakeBus()
    service = billing.Billing(bus)  # type: ignore[arg-type]
    for attempt in range(1, billing.RETRY.max_attempts + 1):
        with pytest.raises(billing.CardDeclined, match=r"\*\*\*\*0002 declined"):
            service.on_charge(charge(billing.DECLINING_CARD), context(attempt=attempt))
    [failed] = bus.published  # only once billing gives up
    assert isinstance(failed, PaymentFailed) and failed.card == "****0002"
    out = capsys.readouterr().out
    assert "(attempt 1/3); retry in 0.5s" in out and "(attempt 3/3); giving up" in out
    assert billing.DECLINING_CARD not in out  # card numbers are masked


def test_billing_hard_decline_is_rejected_at_once() -> None:
    bus = FakeBus()
    service = billing.Billing(bus)  # type: ignore[arg-type]
    with pytest.raises(mqkit.Reject, match="expired"):
        service.on_charge(charge(billing.EXPIRED_CARD), context())
    assert [type(e) for e in bus.published] == [PaymentFailed]


# -- notifications ------------------------------------------------------------------------


def test_notifications_know_what_to_tell_the_customer() -> None:
    placed = order()
    assert notifications.message_for(placed) == (
        "ada",
        "thanks for order ORD-1: 10.00 EUR, we are on it",
    )
    paid = OrderPaid(order_id="ORD-1", customer="ada", amount=Decimal("10.00"), authorization="X")
    assert notifications.message_for(paid) == (
        "ada",
        "payment of 10.00 EUR for order ORD-1 received",
    )
    failed = PaymentFailed(order_id="ORD-2", customer="bo", card="****0002", reason="no")
    assert "could not charge card ****0002" in notifications.message_for(failed)[1]  # type: ignore[index]
    reserved = StockReserved(order_id="ORD-3", customer="cy", items=[], warehouse="local")
    assert notifications.message_for(reserved) == (
        "cy",
        "your items for order ORD-3 are set aside",
    )
    assert notifications.message_for(CacheCleared(reason="x")) is None


def test_notifications_print_one_line_per_event(capsys: pytest.CaptureFixture[str]) -> None:
    service = notifications.Notifications()
    service.notify(order(), context(event_type="orders.placed"))
    service.on_cache_cleared(CacheCleared(reason="price list updated"), context())
    assert service.template_reloads == 1
    assert capsys.readouterr().out.splitlines() == [
        "[notifications] to ada: thanks for order ORD-1: 10.00 EUR, we are on it  (orders.placed)",
        "[notifications] catalog cache cleared (price list updated): message templates reloaded",
    ]


# -- orders -------------------------------------------------------------------------------


def test_orders_build_the_event_and_the_charge_from_the_price() -> None:
    new = orders.SAMPLE_ORDERS[0]
    price = Price(subtotal=Decimal("33.90"), shipping=Decimal("4.90"), total=Decimal("38.80"))
    event, command = orders.build_order("ORD-7", new, price)
    assert event.event_type == "orders.placed"
    assert (event.order_id, event.customer, event.total) == ("ORD-7", "ada", Decimal("38.80"))
    assert command == ChargeCard(
        order_id="ORD-7", customer="ada", card=new.card, amount=Decimal("38.80")
    )


def test_orders_command_line_places_one_order() -> None:
    [new] = orders._parse(["--customer", "bo", "--card", "5555", "MUG=2", "KETTLE"])
    assert new == orders.NewOrder(
        "bo", (LineItem(sku="MUG", quantity=2), LineItem(sku="KETTLE", quantity=1)), "5555"
    )
    assert orders._parse([]) == list(orders.SAMPLE_ORDERS)


def test_orders_sample_set_has_one_declining_card() -> None:
    cards = [o.card for o in orders.SAMPLE_ORDERS]
    assert cards.count(billing.DECLINING_CARD) == 1
    assert mask_card(billing.DECLINING_CARD) == "****0002"
    assert orders.new_order_id() != orders.new_order_id()


def test_examples_keep_to_the_demo_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    from examples import queue_name

    monkeypatch.setenv("DEMO_PREFIX", "demo-abc.")
    assert queue_name("billing.charges") == "demo-abc.billing.charges"
    queues, exchanges = demo.declared_names("abc")
    assert "demo-abc.billing.charges.dlq" in queues
    assert "demo-abc.notifications.orders.*" in queues
    # The services' retry tiers are an exchange and a queue each, with the prefix too.
    assert "demo-abc.billing.retries.500ms" in queues
    assert exchanges[0] == "demo-abc.events" and "demo-abc.billing.retries.500ms" in exchanges
    assert all(name.startswith("demo-abc.") for name in [*queues, *exchanges])
