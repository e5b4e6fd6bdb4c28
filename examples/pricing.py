"""pricing (asyncio, :class:`mqkit.AsyncClient`): answers :class:`PriceQuote` requests over RPC.

```
python -m examples.pricing      # until Ctrl-C / SIGTERM
```

Orders asks ``client.request("pricing.quotes", PriceQuote(...), Price)``; this service is the
responder. A quote for an unknown product raises :class:`UnknownProduct`, which reaches the
caller as :class:`mqkit.RemoteError` (RPC requests are not retried).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import mqkit
from examples import exit_on_failure, middleware, queue_name, record_topology, say, setup_logging
from examples.models import CURRENCY, Price, PriceQuote

__all__ = ["CATALOG", "QUEUE", "SERVICE", "UnknownProduct", "answer", "main", "quote", "serve"]

SERVICE = "pricing"
QUEUE = "pricing.quotes"

CATALOG: dict[str, Decimal] = {
    "COFFEE-BEANS": Decimal("12.50"),
    "MUG": Decimal("8.90"),
    "KETTLE": Decimal("39.00"),
    "GRINDER": Decimal("89.00"),
}
SHIPPING = Decimal("4.90")
FREE_SHIPPING_FROM = Decimal("50.00")


class UnknownProduct(ValueError):
    """A quote asked for a product that is not in the catalog."""


def quote(request: PriceQuote) -> Price:
    """Price ``request``: catalog prices, shipping free from 50 EUR."""
    subtotal = Decimal("0.00")
    for item in request.items:
        try:
            subtotal += CATALOG[item.sku] * item.quantity
        except KeyError:
            raise UnknownProduct(
                f"no product {item.sku!r} in the catalog; known: {', '.join(CATALOG)}"
            ) from None
    shipping = Decimal("0.00") if subtotal >= FREE_SHIPPING_FROM else SHIPPING
    return Price(subtotal=subtotal, shipping=shipping, total=subtotal + shipping)


async def answer(request: PriceQuote, ctx: mqkit.Context) -> Price:
    """The responder's handler: the reply is what it returns."""
    price = quote(request)
    items = ", ".join(f"{i.quantity}x {i.sku}" for i in request.items)
    say(SERVICE, f"quote for {request.customer} ({items}): {price.total} {CURRENCY}")
    return price


async def serve(client: mqkit.AsyncClient) -> None:
    """Answer quotes on ``client`` until SIGINT/SIGTERM."""
    responder = client.responder(queue_name(QUEUE), PriceQuote, answer)
    await responder.start()
    say(SERVICE, f"ready: answering price quotes on {queue_name(QUEUE)!r}")
    try:
        await client.run()
    finally:
        record_topology(client.topology)


async def _main() -> None:
    async with mqkit.AsyncClient(
        mqkit.Settings(service=SERVICE), middleware=middleware(SERVICE)
    ) as client:
        await serve(client)
    say(SERVICE, "stopped")


def main() -> None:
    """``python -m examples.pricing``."""
    setup_logging(SERVICE)
    with exit_on_failure(SERVICE):
        asyncio.run(_main())


if __name__ == "__main__":
    main()
