"""The messages the example services exchange: events on the bus, a command, an RPC pair.

Every service imports this module, so every :class:`mqkit.Event` below is registered by its
``event_type`` and a pattern subscriber (notifications' ``"orders.*"``) can decode it.

=====================  =================================  ==============================
message                kind                               from → to
=====================  =================================  ==============================
``PriceQuote``         RPC request (``pricing.quotes``)   orders → pricing
``Price``              RPC response                       pricing → orders
``OrderPlaced``        event ``orders.placed``            orders → inventory, notifications
``ChargeCard``         command (``billing.charges``)      orders → billing
``OrderPaid``          event ``orders.paid``              billing → notifications
``PaymentFailed``      event ``orders.payment_failed``    billing → notifications
``StockReserved``      event ``inventory.reserved``       inventory → notifications
``CacheCleared``       event ``catalog.cache_cleared``    anyone → every notifications
=====================  =================================  ==============================
"""

from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, Field

import mqkit

__all__ = [
    "CURRENCY",
    "CacheCleared",
    "ChargeCard",
    "LineItem",
    "OrderPaid",
    "OrderPlaced",
    "PaymentFailed",
    "Price",
    "PriceQuote",
    "StockReserved",
    "mask_card",
]

CURRENCY = "EUR"


def mask_card(card: str) -> str:
    """A card number as a person may see it in a log line: ``****0002``."""
    digits = [c for c in card if c.isdigit()]
    return "****" + "".join(digits[-4:])


class LineItem(BaseModel):
    """One line of an order: a product and how many of it."""

    sku: str
    quantity: int = Field(ge=1)


class PriceQuote(BaseModel):
    """RPC request to pricing: what would these items cost this customer?"""

    customer: str
    items: list[LineItem]


class Price(BaseModel):
    """RPC response from pricing: the price of a :class:`PriceQuote`."""

    subtotal: Decimal
    shipping: Decimal
    total: Decimal
    currency: str = CURRENCY


class OrderPlaced(mqkit.Event, event_type="orders.placed"):
    """A customer placed an order (published by orders)."""

    order_id: str
    customer: str
    items: list[LineItem]
    total: Decimal


class ChargeCard(BaseModel):
    """Command to billing: take ``amount`` from ``card`` for ``order_id``."""

    order_id: str
    customer: str
    card: str
    amount: Decimal


class OrderPaid(mqkit.Event, event_type="orders.paid"):
    """Billing charged the card for an order."""

    order_id: str
    customer: str
    amount: Decimal
    authorization: str


class PaymentFailed(mqkit.Event, event_type="orders.payment_failed"):
    """Billing gave up charging the card for an order."""

    order_id: str
    customer: str
    card: str  # masked
    reason: str


class StockReserved(mqkit.Event, event_type="inventory.reserved"):
    """Inventory set the items of an order aside."""

    order_id: str
    customer: str
    items: list[LineItem]
    warehouse: str


class CacheCleared(mqkit.Event, event_type="catalog.cache_cleared"):
    """The catalog changed: every running instance must drop what it cached (broadcast)."""

    reason: str
