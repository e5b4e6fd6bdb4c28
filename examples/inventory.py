"""inventory (asyncio, :class:`mqkit.AsyncClient`): reserves stock for every :class:`OrderPlaced`
and publishes :class:`StockReserved`.

```
python -m examples.inventory    # until Ctrl-C / SIGTERM
```

Kettles are kept in a remote warehouse whose stock service is busy on the first try: the
handler raises :class:`StockServiceBusy`, and the :class:`mqkit.RetryPolicy` has the *broker*
hold the event for a second (in a retry queue, not in this process) before it comes back
as attempt 2. An order for more than is in stock is rejected (:class:`mqkit.Reject`) and
dead-lettered at once: retrying would not make stock appear.
"""

from __future__ import annotations

import asyncio

import mqkit
from examples import exit_on_failure, middleware, queue_name, record_topology, say, setup_logging
from examples.models import OrderPlaced, StockReserved

__all__ = ["RETRY", "SERVICE", "Inventory", "StockServiceBusy", "Warehouse", "main", "serve"]

SERVICE = "inventory"
RETRY = mqkit.RetryPolicy(max_attempts=4, delays=(1.0, 2.0))

STOCK = {"COFFEE-BEANS": 120, "MUG": 40, "GRINDER": 5, "KETTLE": 3}
REMOTE = {"KETTLE"}  # stocked in the remote warehouse, whose stock service is flaky


class StockServiceBusy(Exception):
    """The remote warehouse's stock service did not answer in time (transient)."""


class Warehouse:
    """Stock levels, and the reservations made against them (one per order).

    Reserving is idempotent per order: an event delivered twice (at-least-once) reserves once.
    """

    def __init__(self, stock: dict[str, int] | None = None) -> None:
        self.stock = dict(STOCK if stock is None else stock)
        self.reservations: dict[str, StockReserved] = {}

    def reserve(self, order: OrderPlaced, attempt: int) -> StockReserved:
        """Set ``order``'s items aside; ``attempt`` is the delivery attempt (1, 2, ...).

        Raises :class:`StockServiceBusy` on the first attempt for a remote product, and
        :class:`mqkit.Reject` when there is not enough stock.
        """
        done = self.reservations.get(order.order_id)
        if done is not None:
            return done
        remote = sorted({item.sku for item in order.items} & REMOTE)
        if remote and attempt == 1:
            raise StockServiceBusy(f"remote warehouse stock service busy for {', '.join(remote)}")
        for item in order.items:
            if self.stock.get(item.sku, 0) < item.quantity:
                raise mqkit.Reject(
                    f"only {self.stock.get(item.sku, 0)} of {item.sku} left, "
                    f"order {order.order_id} wants {item.quantity}"
                )
        for item in order.items:
            self.stock[item.sku] -= item.quantity
        reserved = StockReserved(
            order_id=order.order_id,
            customer=order.customer,
            items=order.items,
            warehouse="remote" if remote else "local",
        )
        self.reservations[order.order_id] = reserved
        return reserved


class Inventory:
    """The service: its warehouse and the bus it answers on."""

    def __init__(self, bus: mqkit.AsyncEventBus, warehouse: Warehouse | None = None) -> None:
        self.bus = bus
        self.warehouse = warehouse or Warehouse()

    async def on_order_placed(self, order: OrderPlaced, ctx: mqkit.Context) -> None:
        """Reserve the order's items, then tell everyone (:class:`StockReserved`)."""
        try:
            reserved = self.warehouse.reserve(order, ctx.attempt)
        except StockServiceBusy as exc:
            if ctx.attempt < RETRY.max_attempts:
                wait = RETRY.delay_for(ctx.attempt)
                say(
                    SERVICE,
                    f"order {order.order_id}: {exc} (attempt {ctx.attempt}); "
                    f"the broker holds it and redelivers in {wait:g}s",
                )
            raise
        except mqkit.Reject as exc:
            say(SERVICE, f"order {order.order_id}: rejected: {exc.reason}")
            raise
        items = ", ".join(f"{i.quantity}x {i.sku}" for i in order.items)
        say(
            SERVICE,
            f"order {order.order_id}: reserved {items} in the {reserved.warehouse} warehouse "
            f"(attempt {ctx.attempt})",
        )
        await self.bus.publish(reserved)


async def serve(client: mqkit.AsyncClient) -> None:
    """Reserve stock for orders on ``client`` until SIGINT/SIGTERM."""
    bus = client.event_bus(service=queue_name(SERVICE))
    service = Inventory(bus)
    bus.subscribe(OrderPlaced, service.on_order_placed, retry=RETRY)
    await bus.start()
    say(SERVICE, f"ready: reserving stock for {OrderPlaced.event_type!r} events")
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
    """``python -m examples.inventory``."""
    setup_logging(SERVICE)
    with exit_on_failure(SERVICE):
        asyncio.run(_main())


if __name__ == "__main__":
    main()
