"""orders (blocking, :class:`mqkit.Client`): the checkout. Places orders, then exits.

```
python -m examples.orders                                   # the three sample orders
python -m examples.orders --customer ada --card 4242-4242-4242-4242 COFFEE-BEANS=2 MUG=1
```

For each order it

1. asks pricing for the price over RPC:
   ``client.request("pricing.quotes", PriceQuote(...), Price)``;
2. publishes :class:`OrderPlaced` on the event bus (inventory and notifications react);
3. sends a :class:`ChargeCard` command to the ``billing.charges`` work queue with a
   ``Producer[ChargeCard]``; billing charges the card.

Every publish is confirmed by the broker before the next step, so an order the checkout
reported as placed is safely stored. Exits 1 if an order could not be placed.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import mqkit
from examples import exit_on_failure, queue_name, record_topology, say, setup_logging
from examples.models import (
    CURRENCY,
    ChargeCard,
    LineItem,
    OrderPlaced,
    Price,
    PriceQuote,
    mask_card,
)
from examples.pricing import QUEUE as PRICING_QUEUE

__all__ = ["SAMPLE_ORDERS", "SERVICE", "Checkout", "NewOrder", "main", "new_order_id"]

SERVICE = "orders"
BILLING_QUEUE = "billing.charges"


@dataclass(frozen=True)
class NewOrder:
    """What a customer put in the basket, and the card to pay with."""

    customer: str
    items: tuple[LineItem, ...]
    card: str


SAMPLE_ORDERS = (
    NewOrder(
        "ada",
        (LineItem(sku="COFFEE-BEANS", quantity=2), LineItem(sku="MUG", quantity=1)),
        "4242-4242-4242-4242",
    ),
    # Kettles come from the remote warehouse: inventory's first try fails, the broker retries.
    NewOrder("grace", (LineItem(sku="KETTLE", quantity=1),), "5555-5555-5555-4444"),
    # This card's issuer always declines: billing retries, then dead-letters the charge.
    NewOrder("linus", (LineItem(sku="GRINDER", quantity=1),), "4000-0000-0000-0002"),
)


def new_order_id() -> str:
    """A fresh order id, ``ORD-`` and six hex digits."""
    return f"ORD-{secrets.token_hex(3).upper()}"


def build_order(order_id: str, new: NewOrder, price: Price) -> tuple[OrderPlaced, ChargeCard]:
    """The event and the billing command for an order priced at ``price``."""
    event = OrderPlaced(
        order_id=order_id, customer=new.customer, items=list(new.items), total=price.total
    )
    charge = ChargeCard(order_id=order_id, customer=new.customer, card=new.card, amount=price.total)
    return event, charge


class Checkout:
    """Places orders through one :class:`mqkit.Client`."""

    def __init__(self, client: mqkit.Client) -> None:
        self.client = client
        self.bus = client.event_bus()
        self.charges = client.producer(ChargeCard, queue=queue_name(BILLING_QUEUE))

    def place(self, new: NewOrder) -> OrderPlaced:
        """Price, announce and bill one order; the :class:`OrderPlaced` that was published."""
        price = self.client.request(
            queue_name(PRICING_QUEUE),
            PriceQuote(customer=new.customer, items=list(new.items)),
            Price,
        )
        say(
            SERVICE,
            f"{new.customer}: pricing answered over RPC: {price.total} {CURRENCY} "
            f"(subtotal {price.subtotal} + shipping {price.shipping})",
        )
        event, charge = build_order(new_order_id(), new, price)
        self.bus.publish(event)
        say(SERVICE, f"{new.customer}: placed order {event.order_id} ({event.event_type})")
        # The message id makes the command's identity stable: billing can recognise a resend.
        self.charges.publish(charge, message_id=f"charge-{event.order_id}")
        say(
            SERVICE,
            f"{new.customer}: asked billing to charge {charge.amount} {CURRENCY} "
            f"to {mask_card(new.card)} for {event.order_id}",
        )
        return event


def _parse(argv: Sequence[str] | None) -> list[NewOrder]:
    parser = argparse.ArgumentParser(
        prog="python -m examples.orders", description="Place orders (default: the samples)."
    )
    parser.add_argument("--customer", default="guest")
    parser.add_argument("--card", default="4242-4242-4242-4242")
    parser.add_argument("items", nargs="*", metavar="SKU=QTY")
    args = parser.parse_args(argv)
    if not args.items:
        return list(SAMPLE_ORDERS)
    items = []
    for spec in args.items:
        sku, _, qty = spec.partition("=")
        try:
            items.append(LineItem(sku=sku, quantity=int(qty or "1")))
        except ValueError:
            parser.error(f"{spec!r} is not SKU=QTY (e.g. MUG=2)")
    return [NewOrder(args.customer, tuple(items), args.card)]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m examples.orders``; returns the exit status."""
    setup_logging(SERVICE)
    orders = _parse(argv)
    failed = 0
    with exit_on_failure(SERVICE), mqkit.Client(mqkit.Settings(service=SERVICE)) as client:
        checkout = Checkout(client)
        for new in orders:
            try:
                checkout.place(new)
            except (mqkit.RemoteError, mqkit.RequestTimeout, mqkit.PublishError) as exc:
                failed += 1
                say(SERVICE, f"{new.customer}: order not placed: {exc}")
        record_topology(client.topology)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
