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

Each charge goes through the idempotent inbox (:class:`mqkit.outbox.Inbox`) on billing's
SQLite database (``BILLING_DB``, a SQLAlchemy URL; default a file in the temp directory): the
command's message id is recorded in the same transaction as the charge (a row in
``charges``) and its :class:`OrderPaid` (written to billing's outbox, published by its relay
once committed). A charge delivered again (a redelivery after a crash, or orders sending it
once more) is acked without charging: ``already applied`` in the output.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from decimal import Decimal

from sqlalchemy import Column, Engine, MetaData, Numeric, String, Table, create_engine, insert

import mqkit
from examples import exit_on_failure, middleware, queue_name, record_topology, say, setup_logging
from examples.models import CURRENCY, ChargeCard, OrderPaid, PaymentFailed, mask_card
from mqkit.outbox import Inbox, Outbox

__all__ = [
    "DECLINING_CARD",
    "EXPIRED_CARD",
    "QUEUE",
    "RETRY",
    "SERVICE",
    "Billing",
    "CardDeclined",
    "Ledger",
    "PaymentGateway",
    "database_url",
    "main",
    "serve",
]

SERVICE = "billing"
QUEUE = "billing.charges"
RETRY = mqkit.RetryPolicy(max_attempts=3, delays=(0.5, 1.0))

DECLINING_CARD = "4000-0000-0000-0002"
EXPIRED_CARD = "4000-0000-0000-0069"


CHARGES = Table(
    "charges",
    MetaData(),
    Column("order_id", String(20), primary_key=True),
    Column("amount", Numeric(10, 2), nullable=False),
    Column("authorization", String(20), nullable=False),
)


def database_url() -> str:
    """Billing's database: ``BILLING_DB``, else a SQLite file in the temp directory."""
    default = os.path.join(tempfile.gettempdir(), "mqkit-example-billing.db")
    return os.environ.get("BILLING_DB") or f"sqlite:///{default}"


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


class Ledger:
    """Billing's database: the charges, an inbox that applies each command once, and an
    outbox for the events of a charge, all written in the inbox's transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        CHARGES.metadata.create_all(engine)
        self.inbox = Inbox(engine)
        self.outbox = Outbox(engine)

    def charged(self, command: ChargeCard, authorization: str, paid: OrderPaid) -> None:
        """Record the charge and its :class:`OrderPaid` in the running handler's
        transaction: they commit with the message id, or not at all."""
        conn = self.inbox.connection()
        conn.execute(
            insert(CHARGES).values(
                order_id=command.order_id, amount=command.amount, authorization=authorization
            )
        )
        self.outbox.publish(conn, paid)


class Billing:
    """The service: a gateway, the bus it tells the outcome on, and (when given) the
    ledger a successful charge is recorded in, its OrderPaid going out through the outbox."""

    def __init__(
        self,
        bus: mqkit.EventBus,
        gateway: PaymentGateway | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.bus = bus
        self.gateway = gateway or PaymentGateway()
        self.ledger = ledger

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
        paid = OrderPaid(
            order_id=command.order_id,
            customer=command.customer,
            amount=command.amount,
            authorization=authorization,
        )
        if self.ledger is not None:
            self.ledger.charged(command, authorization, paid)
        else:
            self.bus.publish(paid)

    def _failed(self, command: ChargeCard, reason: str) -> None:
        self.bus.publish(
            PaymentFailed(
                order_id=command.order_id,
                customer=command.customer,
                card=mask_card(command.card),
                reason=reason,
            )
        )


class _SaySkipped(logging.Handler):
    """Tells the story of a duplicate the inbox acked without charging (its INFO line)."""

    def emit(self, record: logging.LogRecord) -> None:
        message_id = getattr(record, "message_id", None)
        if message_id and record.getMessage().startswith("duplicate"):
            say(SERVICE, f"{message_id}: already applied (inbox): acked without charging again")


def serve(client: mqkit.Client, engine: Engine | None = None) -> None:
    """Charge cards on ``client`` until SIGINT/SIGTERM, through the inbox on ``engine``
    (default: :func:`database_url`)."""
    engine = engine or create_engine(database_url())
    ledger = Ledger(engine)
    inbox_log = logging.getLogger("mqkit.outbox.inbox")
    inbox_log.addHandler(_SaySkipped())
    inbox_log.setLevel(logging.INFO)
    service = Billing(client.event_bus(service=queue_name(SERVICE)), ledger=ledger)
    handler = ledger.inbox.handler(service.on_charge)
    consumer = client.consumer(queue_name(QUEUE), ChargeCard, handler, retry=RETRY)
    relay = client.outbox_relay(ledger.outbox)  # publishes OrderPaid once a charge commits
    relay.start()
    consumer.start()
    say(SERVICE, f"ready: charging cards from {queue_name(QUEUE)!r}")
    try:
        client.run()
    finally:
        relay.stop()
        record_topology(client.topology)
        engine.dispose()


def main() -> None:
    """``python -m examples.billing``."""
    setup_logging(SERVICE)
    # In the demo, named with the run's prefix like its queues: so are its retry tiers.
    settings = mqkit.Settings(service=queue_name(SERVICE))
    with (
        exit_on_failure(SERVICE),
        mqkit.Client(settings, middleware=middleware(SERVICE)) as client,
    ):
        serve(client)
    say(SERVICE, "stopped")


if __name__ == "__main__":
    main()
