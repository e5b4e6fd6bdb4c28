"""billing (blocking, :class:`mqkit.Client`): charges cards for :class:`ChargeCard` commands from
the ``billing.charges`` work queue.

```
python -m examples.billing      # until Ctrl-C / SIGTERM
```

The issuer of card ``4000-0000-0000-0002`` always answers "do not honor", a soft decline
that is worth a retry or two: the handler raises :class:`CardDeclined`, the broker holds the
command for 0.5 s, then 1 s, and after the third attempt it lands in
``billing.charges.dlq`` with the reason (inspect it with ``mqkit dlq`` or
:class:`mqkit.DeadLetterQueue`). An expired card (``4000-0000-0000-0069``) is a hard decline:
:class:`mqkit.Reject` dead-letters it at once. Either way the customer is told
(:class:`PaymentFailed`); a successful charge publishes :class:`OrderPaid`.
"""

from __future__ import annotations

import hashlib
import threading
from decimal import Decimal

import mqkit
from examples import exit_on_failure, queue_name, record_topology, say, setup_logging
from examples.models import CURRENCY, ChargeCard, OrderPaid, PaymentFailed, mask_card

__all__ = [
    "DECLINING_CARD",
    "EXPIRED_CARD",
    "QUEUE",
    "RETRY",
    "SERVICE",
    "Billing",
    "CardDeclined",
    "PaymentGateway",
    "main",
    "serve",
]

SERVICE = "billing"
QUEUE = "billing.charges"
RETRY = mqkit.RetryPolicy(max_attempts=3, delays=(0.5, 1.0))

DECLINING_CARD = "4000-0000-0000-0002"
EXPIRED_CARD = "4000-0000-0000-0069"


class CardDeclined(Exception):
    """The issuer declined the charge; it may go through on a later try."""


class PaymentGateway:
    """A pretend card processor. Charging is idempotent per order: a command delivered twice
    (at-least-once) charges once and returns the same authorization."""

    def __init__(self) -> None:
        self.charged: dict[str, str] = {}
        self._lock = threading.Lock()

    def charge(self, order_id: str, card: str, amount: Decimal) -> str:
        """Charge ``amount`` to ``card``; the authorization code.

        Raises :class:`CardDeclined` (soft decline) or :class:`mqkit.Reject` (hard decline).
        """
        with self._lock:
            if order_id in self.charged:
                return self.charged[order_id]
            if card == DECLINING_CARD:
                raise CardDeclined(f"card {mask_card(card)} declined by the issuer: do not honor")
            if card == EXPIRED_CARD:
                raise mqkit.Reject(f"card {mask_card(card)} has expired")
            code = hashlib.sha256(f"{order_id}:{card}:{amount}".encode()).hexdigest()[:8]
            self.charged[order_id] = code.upper()
            return self.charged[order_id]


class Billing:
    """The service: a gateway, and the bus it tells the outcome on."""

    def __init__(self, bus: mqkit.EventBus, gateway: PaymentGateway | None = None) -> None:
        self.bus = bus
        self.gateway = gateway or PaymentGateway()

    def on_charge(self, command: ChargeCard, ctx: mqkit.Context) -> None:
        """Charge the card; on a decline, let the :data:`RETRY` policy decide what follows."""
        card = mask_card(command.card)
        try:
            authorization = self.gateway.charge(command.order_id, command.card, command.amount)
        except CardDeclined as exc:
            if ctx.attempt < RETRY.max_attempts:
                say(
                    SERVICE,
                    f"order {command.order_id}: {exc} (attempt {ctx.attempt}/"
                    f"{RETRY.max_attempts}); retry in {RETRY.delay_for(ctx.attempt):g}s",
                )
            else:
                say(
                    SERVICE,
                    f"order {command.order_id}: {exc} (attempt {ctx.attempt}/"
                    f"{RETRY.max_attempts}); giving up: to {queue_name(QUEUE)}.dlq",
                )
                self._failed(command, str(exc))
            raise
        except mqkit.Reject as exc:
            say(SERVICE, f"order {command.order_id}: {exc.reason}; dead-lettered at once")
            self._failed(command, exc.reason)
            raise
        say(
            SERVICE,
            f"order {command.order_id}: charged {command.amount} {CURRENCY} to {card} "
            f"(authorization {authorization})",
        )
        self.bus.publish(
            OrderPaid(
                order_id=command.order_id,
                customer=command.customer,
                amount=command.amount,
                authorization=authorization,
            )
        )

    def _failed(self, command: ChargeCard, reason: str) -> None:
        self.bus.publish(
            PaymentFailed(
                order_id=command.order_id,
                customer=command.customer,
                card=mask_card(command.card),
                reason=reason,
            )
        )


def serve(client: mqkit.Client) -> None:
    """Charge cards on ``client`` until SIGINT/SIGTERM."""
    service = Billing(client.event_bus(service=queue_name(SERVICE)))
    consumer = client.consumer(queue_name(QUEUE), ChargeCard, service.on_charge, retry=RETRY)
    consumer.start()
    say(SERVICE, f"ready: charging cards from {queue_name(QUEUE)!r}")
    try:
        client.run()
    finally:
        record_topology(client.topology)


def main() -> None:
    """``python -m examples.billing``."""
    setup_logging(SERVICE)
    with exit_on_failure(SERVICE), mqkit.Client(mqkit.Settings(service=SERVICE)) as client:
        serve(client)
    say(SERVICE, "stopped")


if __name__ == "__main__":
    main()
