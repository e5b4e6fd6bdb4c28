"""orders (blocking, :class:`mqkit.Client`): the checkout. Places orders, then exits.

```
python -m examples.orders                                   # the three sample orders
python -m examples.orders --customer ada --card 4242-4242-4242-4242 COFFEE-BEANS=2 MUG=1
```

For each order it

1. asks pricing for the price over RPC:
   ``client.request("pricing.quotes", PriceQuote(...), Price)``;
2. saves the order in its SQLite database (``ORDERS_DB``, a SQLAlchemy URL; default a file in
   the temp directory) and, **in the same transaction**, writes :class:`OrderPlaced` (for the
   event bus: inventory and notifications react) and a :class:`ChargeCard` command (for the
   ``billing.charges`` work queue) into the transactional outbox (:class:`mqkit.outbox.Outbox`);
3. lets the outbox relay publish them with confirms and mark them sent.

An order is never saved without its messages, nor announced without being saved: a crash
after the commit leaves the messages in the outbox, and the next run publishes them first
(with the same message ids, so billing's inbox recognises a charge it already applied).
Exits 1 if an order could not be placed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Column, Connection, MetaData, Numeric, String, Table, create_engine, insert
from sqlalchemy.pool import StaticPool

import mqkit
from examples import exit_on_failure, middleware, queue_name, record_topology, say, setup_logging
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
from mqkit.outbox import Outbox

__all__ = [
    "ORDERS",
    "SAMPLE_ORDERS",
    "SERVICE",
    "Checkout",
    "NewOrder",
    "database_url",
    "main",
    "new_order_id",
]

SERVICE = "orders"
BILLING_QUEUE = "billing.charges"

# The service's own table; the outbox keeps its rows beside it, in the same database.
ORDERS = Table(
    "orders",
    MetaData(),
    Column("order_id", String(20), primary_key=True),
    Column("customer", String(50), nullable=False),
    Column("total", Numeric(10, 2), nullable=False),
)


def database_url() -> str:
    """Where orders are kept: ``ORDERS_DB``, else a SQLite file in the temp directory."""
    default = os.path.join(tempfile.gettempdir(), "mqkit-example-orders.db")
    return os.environ.get("ORDERS_DB") or f"sqlite:///{default}"


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
    """Places orders through one :class:`mqkit.Client`, saving each with its messages.

    ``database``: a SQLAlchemy URL; ``None`` keeps everything in memory (for tests)."""

    def __init__(self, client: mqkit.Client, database: str | None = None) -> None:
        self.client = client
        if database is None:  # one in-memory database, shared by every connection
            self.engine = create_engine("sqlite://", poolclass=StaticPool)
        else:
            self.engine = create_engine(database)
        ORDERS.metadata.create_all(self.engine)
        self.outbox = Outbox(self.engine)
        # Started by hand: this process publishes right after each commit and then exits.
        # A long-running service would start this relay (or let client.run() start it)
        # and let it publish in the background, woken by each commit.
        self.relay = client.outbox_relay(self.outbox)
        left = self.relay.publish_pending()  # what a run killed after its commit left
        if left:
            say(SERVICE, f"published {left} message(s) a previous run left in the outbox")

    def place(self, new: NewOrder) -> OrderPlaced:
        """Price, save, announce and bill one order; the :class:`OrderPlaced` published."""
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
        with self.engine.begin() as conn:  # the order and its two messages, or none of them
            self._save(conn, event, charge)
        sent = self.relay.publish_pending()
        say(
            SERVICE,
            f"{new.customer}: saved order {event.order_id} with its 2 messages in one "
            f"transaction; the outbox relay published {sent} (confirmed)",
        )
        say(SERVICE, f"{new.customer}: placed order {event.order_id} ({event.event_type})")
        say(
            SERVICE,
            f"{new.customer}: asked billing to charge {charge.amount} {CURRENCY} "
            f"to {mask_card(new.card)} for {event.order_id}",
        )
        return event

    def _save(self, conn: Connection, event: OrderPlaced, charge: ChargeCard) -> None:
        conn.execute(
            insert(ORDERS).values(
                order_id=event.order_id, customer=event.customer, total=event.total
            )
        )
        self.outbox.publish(conn, event)  # to the event bus, routing key "orders.placed"
        # The message id makes the command's identity stable: billing recognises a resend.
        self.outbox.publish(
            conn, charge, queue=queue_name(BILLING_QUEUE), message_id=f"charge-{event.order_id}"
        )

    def close(self) -> None:
        """Release the database."""
        self.engine.dispose()


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
    with (
        exit_on_failure(SERVICE),
        mqkit.Client(mqkit.Settings(service=SERVICE), middleware=middleware(SERVICE)) as client,
    ):
        checkout = Checkout(client, database_url())
        try:
            for new in orders:
                try:
                    checkout.place(new)
                except (mqkit.RemoteError, mqkit.RequestTimeout, mqkit.PublishError) as exc:
                    failed += 1
                    say(SERVICE, f"{new.customer}: order not placed: {exc}")
        finally:
            checkout.close()
            record_topology(client.topology)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
