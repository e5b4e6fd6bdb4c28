"""notifications (blocking, :class:`mqkit.Client`): tells customers what happened to their order.

```
python -m examples.notifications    # until Ctrl-C / SIGTERM; run two to see the difference
```

Three subscriptions on one :class:`mqkit.EventBus`:

- ``"orders.*"``, a topic pattern: every order event, whatever its class (decoded by its
  ``type`` through the :class:`mqkit.Event` registry). Instances of this service share the
  queue, so each event is handled by one of them.
- :class:`StockReserved`, by class.
- :class:`CacheCleared` with ``broadcast=True``: every running instance gets its own copy
  and drops its cached message templates.
"""

from __future__ import annotations

import mqkit
from examples import exit_on_failure, middleware, queue_name, record_topology, say, setup_logging
from examples.models import (
    CURRENCY,
    CacheCleared,
    OrderPaid,
    OrderPlaced,
    PaymentFailed,
    StockReserved,
)

__all__ = ["SERVICE", "Notifications", "main", "message_for", "serve"]

SERVICE = "notifications"
# A broadcast queue is this instance's own and goes away with it: no broker-held retries,
# only quick in-process ones.
BROADCAST_RETRY = mqkit.RetryPolicy(max_attempts=1, immediate=2)


def message_for(event: mqkit.Event) -> tuple[str, str] | None:
    """``(customer, text)``: what a customer is told about ``event``; ``None``: nothing."""
    if isinstance(event, OrderPlaced):
        return event.customer, (
            f"thanks for order {event.order_id}: {event.total} {CURRENCY}, we are on it"
        )
    if isinstance(event, OrderPaid):
        return event.customer, (
            f"payment of {event.amount} {CURRENCY} for order {event.order_id} received"
        )
    if isinstance(event, PaymentFailed):
        return event.customer, (
            f"we could not charge card {event.card} for order {event.order_id}; "
            "please update your payment details"
        )
    if isinstance(event, StockReserved):
        return event.customer, f"your items for order {event.order_id} are set aside"
    return None


class Notifications:
    """The service: sends (prints) customer messages made from cached templates."""

    def __init__(self) -> None:
        self.template_reloads = 0

    def notify(self, event: mqkit.Event, ctx: mqkit.Context) -> None:
        """Tell the customer about an order event (pattern and typed subscriptions)."""
        message = message_for(event)
        if message is None:
            say(SERVICE, f"nothing to tell anyone about {ctx.event_type or event.event_type}")
            return
        customer, text = message
        say(SERVICE, f"to {customer}: {text}  ({ctx.event_type})")

    def on_stock_reserved(self, event: StockReserved, ctx: mqkit.Context) -> None:
        """Typed subscription: the handler's argument is a :class:`StockReserved`."""
        self.notify(event, ctx)

    def on_cache_cleared(self, event: CacheCleared, ctx: mqkit.Context) -> None:
        """Broadcast: reload the cached templates (every instance gets this)."""
        self.template_reloads += 1
        say(SERVICE, f"catalog cache cleared ({event.reason}): message templates reloaded")


def serve(client: mqkit.Client) -> None:
    """Notify customers on ``client`` until SIGINT/SIGTERM."""
    service = Notifications()
    bus = client.event_bus(service=queue_name(SERVICE))
    bus.subscribe("orders.*", service.notify)
    bus.subscribe(StockReserved, service.on_stock_reserved)
    bus.subscribe(CacheCleared, service.on_cache_cleared, broadcast=True, retry=BROADCAST_RETRY)
    bus.start()
    say(SERVICE, "ready: telling customers about 'orders.*' and 'inventory.reserved'")
    try:
        client.run()
    finally:
        record_topology(client.topology)


def main() -> None:
    """``python -m examples.notifications``."""
    setup_logging(SERVICE)
    with (
        exit_on_failure(SERVICE),
        mqkit.Client(mqkit.Settings(service=SERVICE), middleware=middleware(SERVICE)) as client,
    ):
        serve(client)
    say(SERVICE, "stopped")


if __name__ == "__main__":
    main()
