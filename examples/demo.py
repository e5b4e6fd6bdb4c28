"""``make demo``: the whole shop on a real broker, told as a story.

```
python -m examples.demo            # MQKIT_URL picks the broker (default: localhost)
python -m examples.demo --verbose  # also show the services' log lines (stderr)
```

It starts pricing, inventory, billing and two notifications instances as their own
processes (``python -m examples.<name>``), waits until each says it is ready, runs the
checkout (``python -m examples.orders``) to place three orders, and follows what happens:

- **RPC**: orders asks pricing for each price (``client.request``, direct reply-to);
- **outbox**: orders saves each order in its SQLite database together with its
  ``OrderPlaced`` and ``ChargeCard``, in one transaction, in the outbox; the outbox relay
  publishes them once committed;
- **events**: ``OrderPlaced`` reaches inventory and notifications; ``StockReserved``,
  ``OrderPaid`` and ``PaymentFailed`` reach notifications (a topic pattern and a class);
- **retry**: the kettle's warehouse is busy on the first try; the broker holds the event for
  a second and inventory reserves it on attempt 2;
- **dead letter**: the card ``4000-0000-0000-0002`` is declined three times; the charge ends
  in ``billing.charges.dlq``. The demo looks at it with :class:`mqkit.DeadLetterQueue`
  (``count``, ``peek``: nothing removed) and replays it: billing tries afresh, is declined
  again, and the charge is back in the DLQ;
- **inbox**: billing charges through the idempotent inbox; the demo sends ada's charge once
  more with its message id (as a relay killed between the broker's confirm and its mark
  would), and billing acks it without charging again;
- **broadcast**: one ``CacheCleared`` reaches *both* notifications instances, while each order
  event went to only one of them;
- **shutdown**: every service stops on SIGTERM, finishing what it holds, and exits 0.

The run keeps to its own names: a fresh events exchange (``MQKIT_EVENTS_EXCHANGE``) and a
queue prefix (``DEMO_PREFIX``), both from ``demo-<run id>``, and SQLite files of its own
(``ORDERS_DB``, ``BILLING_DB``); at the end everything declared, and those files, are
deleted. Exits 0 when the story happened as told, 1 (saying what was missing) otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO

import pika
import pika.exceptions
from sqlalchemy import create_engine, select

import mqkit
from examples import billing, inventory, notifications, pricing
from examples.models import CacheCleared, ChargeCard, OrderPlaced, StockReserved
from mqkit.outbox.tables import tables
from mqkit.retry import DEFAULT_POLICY
from mqkit.settings import mask_url
from mqkit.topology import dlq_name, retry_tier_name

__all__ = ["Scenario", "ScenarioFailed", "declared_names", "main"]

ROOT = Path(__file__).resolve().parent.parent
SERVICES: tuple[tuple[str, str | None], ...] = (
    ("pricing", None),
    ("inventory", None),
    ("billing", None),
    ("notifications", "1"),
    ("notifications", "2"),
)
STEP_TIMEOUT = 20.0
_COLOURS = {
    "demo": "1",
    "orders": "36",
    "pricing": "35",
    "inventory": "33",
    "billing": "32",
    "notifications": "34",
}


class ScenarioFailed(Exception):
    """The story did not happen as told: what was expected and did not come."""


def declared_names(run_id: str) -> tuple[list[str], list[str]]:
    """The queues and exchanges a demo run ``run_id`` may declare, derived from the services'
    own names and retry policies (the demo deletes these even if a service could not say
    what it declared)."""
    prefix = f"demo-{run_id}."
    policies = (
        DEFAULT_POLICY,
        billing.RETRY,
        inventory.RETRY,
        notifications.BROADCAST_RETRY,
    )
    tiers = sorted({tier for policy in policies for tier in policy.tiers})
    work = [
        prefix + billing.QUEUE,
        prefix + pricing.QUEUE,
        f"{prefix}{inventory.SERVICE}.{OrderPlaced.event_type}",
        f"{prefix}{notifications.SERVICE}.orders.*",
        f"{prefix}{notifications.SERVICE}.{StockReserved.event_type}",
        f"{prefix}{notifications.SERVICE}.{CacheCleared.event_type}",
    ]
    # A service's retry tiers: an exchange and a queue each.
    services = (billing.SERVICE, inventory.SERVICE, notifications.SERVICE)
    retry = [retry_tier_name(prefix + service, t) for service in services for t in tiers]
    queues = list(retry)
    for queue in work:
        queues += [queue, dlq_name(queue)]
    return queues, [f"demo-{run_id}.events", *retry]


class Story:
    """Every line the processes print, in order, and the means to wait for one."""

    def __init__(self, *, colour: bool, verbose: bool) -> None:
        self.lines: list[str] = []
        self.logs: list[str] = []
        self._cond = threading.Condition()
        self._colour = colour
        self._verbose = verbose

    def _show(self, line: str) -> None:
        if self._colour:
            match = re.match(r"\[([a-z]+)", line)
            code = _COLOURS.get(match.group(1) if match else "", "0")
            line = f"\033[{code}m{line}\033[0m"
        print(line, flush=True)

    def add(self, line: str) -> None:
        """A line of a service's stdout: shown, and remembered for :meth:`wait_for`."""
        with self._cond:
            self.lines.append(line)
            self._show(line)
            self._cond.notify_all()

    def log(self, line: str) -> None:
        """A line of a service's stderr: kept, shown only with ``--verbose``."""
        with self._cond:
            self.logs.append(line)
            if self._verbose:
                print(f"    {line}", flush=True)

    def tell(self, text: str) -> None:
        """The demo's own narration."""
        with self._cond:
            self._show(f"[demo] {text}")

    def wait_for(
        self,
        pattern: str,
        what: str,
        *,
        count: int = 1,
        timeout: float = STEP_TIMEOUT,
        alive: Iterable[Service] = (),
    ) -> list[re.Match[str]]:
        """Wait until ``count`` lines match ``pattern``; :class:`ScenarioFailed` naming
        ``what`` if they do not come within ``timeout`` or a service in ``alive`` exits."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        watched = list(alive)
        with self._cond:
            while True:
                found = [m for m in map(regex.search, self.lines) if m]
                if len(found) >= count:
                    return found
                for service in watched:
                    if service.process.poll() is not None:
                        raise ScenarioFailed(
                            f"{service.label} exited (status {service.process.returncode}) "
                            f"while waiting for {what}"
                        )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ScenarioFailed(
                        f"expected {what} within {timeout:g}s "
                        f"(saw {len(found)} of {count} lines matching {pattern!r})"
                    )
                self._cond.wait(min(left, 0.2))


class Service:
    """One example service running as its own process, its output fed to the story."""

    def __init__(
        self, name: str, instance: str | None, env: dict[str, str], story: Story, *args: str
    ) -> None:
        self.name = name
        self.label = f"{name}-{instance}" if instance else name
        child_env = dict(env)
        if instance:
            child_env["DEMO_INSTANCE"] = instance
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"examples.{name}", *args],
            cwd=ROOT,
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            threading.Thread(target=self._pump, args=(self.process.stdout, story.add), daemon=True),
            threading.Thread(target=self._pump, args=(self.process.stderr, story.log), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _pump(stream: IO[str], sink: Callable[[str], None]) -> None:
        for line in stream:
            sink(line.rstrip("\n"))

    def terminate(self) -> None:
        """Ask the service to stop (SIGTERM: it drains and exits)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        """The exit status, or ``None`` if it is still running after ``timeout``."""
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for reader in self._readers:
            reader.join(2)
        return status

    def kill(self) -> None:
        """Last resort, for a service that did not stop on SIGTERM."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


class Scenario:
    """One run of the demo: its names, its processes, and what it saw."""

    def __init__(self, settings: mqkit.Settings, run_id: str, story: Story) -> None:
        self.run_id = run_id
        self.prefix = f"demo-{run_id}."
        self.exchange = f"demo-{run_id}.events"
        self.settings = settings.merged(service="demo", events_exchange=self.exchange)
        self.story = story
        self.services: list[Service] = []
        fd, topology = tempfile.mkstemp(prefix=f"demo-{run_id}-", suffix=".topology")
        os.close(fd)
        self.topology_file = Path(topology)
        self.data = Path(tempfile.mkdtemp(prefix=f"demo-{run_id}-data-"))
        self.orders_db = f"sqlite:///{self.data / 'orders.db'}"
        self.env = {
            **os.environ,
            "MQKIT_URL": self.settings.url,
            "MQKIT_EVENTS_EXCHANGE": self.exchange,
            "DEMO_PREFIX": self.prefix,
            "DEMO_TOPOLOGY_FILE": str(self.topology_file),
            "ORDERS_DB": self.orders_db,
            "BILLING_DB": f"sqlite:///{self.data / 'billing.db'}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("MQKIT_SERVICE", None)  # each service names itself

    # -- the story ---------------------------------------------------------------------

    def run(self) -> None:
        """Tell the whole story; :class:`ScenarioFailed` if a part of it did not happen."""
        tell = self.story.tell
        tell(
            f"broker {mask_url(self.settings.url)}, run {self.run_id}: exchange "
            f"{self.exchange!r}, queues '{self.prefix}*'"
        )
        self.start_services()
        placed = self.place_orders()
        ada, grace, linus = placed["ada"], placed["grace"], placed["linus"]
        self.follow_events(ada, grace, linus)
        self.show_dead_letter(linus)
        self.broadcast()
        self.stop_services()
        tell("the story, in short:")
        tell("  rpc          orders got 3 prices from pricing over direct reply-to")
        tell(
            "  outbox       orders saved each order and its 2 messages in one SQLite "
            "transaction; the relay published them, confirmed"
        )
        tell(
            f"  inbox        billing charged {ada} once; the same charge sent again was "
            "acked without charging"
        )
        tell(
            "  events       OrderPlaced -> inventory + notifications; StockReserved, "
            "OrderPaid, PaymentFailed -> notifications"
        )
        tell(
            f"  retry        inventory: {grace} failed once, the broker held it, "
            "reserved on attempt 2"
        )
        tell(
            f"  dead letter  billing: {linus} declined 3 times -> {self.prefix}{billing.QUEUE}.dlq;"
            " peeked, replayed, declined again"
        )
        tell("  broadcast    CacheCleared reached both notifications instances")
        tell("  shutdown     every service stopped on SIGTERM and exited 0")

    def start_services(self) -> None:
        """Start the long-running services and wait until each is consuming."""
        self.story.tell("starting pricing, inventory, billing and 2x notifications ...")
        started = time.monotonic()
        for name, instance in SERVICES:
            self.services.append(Service(name, instance, self.env, self.story))
        for service in self.services:
            self.story.wait_for(
                rf"^\[{re.escape(service.label)}\] ready:",
                f"{service.label} to be ready",
                timeout=45,
                alive=self.services,
            )
        self.story.tell(f"all 5 services ready in {time.monotonic() - started:.1f}s")

    def place_orders(self) -> dict[str, str]:
        """Run the checkout; ``{customer: order id}``."""
        self.story.tell(
            "placing 3 orders with `python -m examples.orders` "
            "(RPC quote -> OrderPlaced event -> ChargeCard command)"
        )
        checkout = Service("orders", None, self.env, self.story)
        status = checkout.wait(45)
        if status is None:
            checkout.kill()
            raise ScenarioFailed("the checkout (examples.orders) did not finish within 45s")
        if status != 0:
            raise ScenarioFailed(f"the checkout (examples.orders) exited with status {status}")
        placed = {
            m.group(1): m.group(2)
            for m in self.story.wait_for(
                r"^\[orders\] (\w+): placed order (ORD-\w+)", "3 orders placed", count=3
            )
        }
        for customer in ("ada", "grace", "linus"):
            if customer not in placed:
                raise ScenarioFailed(f"no order was placed for {customer}")
        return placed

    def follow_events(self, ada: str, grace: str, linus: str) -> None:
        """Wait for each consequence of the orders, in story order."""
        alive = self.services
        expect = self.story.wait_for
        expect(r"^\[pricing\] quote for linus", "pricing to answer linus's quote", alive=alive)
        expect(
            rf"^\[notifications-\d\] to ada: thanks for order {ada}",
            "notifications to thank ada (OrderPlaced via 'orders.*')",
            alive=alive,
        )
        expect(
            rf"^\[inventory\] order {grace}: .*busy.*\(attempt 1\)",
            "inventory's first attempt for grace's kettle to fail",
            alive=alive,
        )
        self.story.tell(
            f"inventory failed on {grace}: the event now waits in a retry queue "
            "on the broker, not in the service's memory"
        )
        expect(
            rf"^\[inventory\] order {grace}: reserved .*\(attempt 2\)",
            "inventory to reserve grace's kettle on attempt 2",
            alive=alive,
        )
        expect(
            rf"^\[notifications-\d\] to grace: your items for order {grace} are set aside",
            "notifications to tell grace (StockReserved)",
            alive=alive,
        )
        expect(rf"^\[billing\] order {ada}: charged", "billing to charge ada", alive=alive)
        expect(
            rf"^\[notifications-\d\] to ada: payment of .* for order {ada} received",
            "notifications to confirm ada's payment (OrderPaid)",
            alive=alive,
        )
        self.send_charge_again(ada)
        for attempt in (1, 2):
            expect(
                rf"^\[billing\] order {linus}: .*declined.*\(attempt {attempt}/3\); retry",
                f"billing's attempt {attempt} for linus to be declined",
                alive=alive,
            )
        expect(
            rf"^\[billing\] order {linus}: .*declined.*\(attempt 3/3\); giving up",
            "billing to give up on linus's card after 3 attempts",
            alive=alive,
        )
        expect(
            r"^\[notifications-\d\] to linus: we could not charge card \*+0002",
            "notifications to tell linus (PaymentFailed)",
            alive=alive,
        )

    def send_charge_again(self, ada: str) -> None:
        """Publish ada's ChargeCard once more, from orders' outbox row, with its message id
        (what a relay killed after the broker's confirm, before marking the row sent, does
        when it restarts): billing's inbox recognises it and acks it without charging."""
        outbox = tables().outbox
        engine = create_engine(self.orders_db)
        try:
            with engine.connect() as conn:
                row = conn.execute(
                    select(outbox.c.message_id, outbox.c.body).where(
                        outbox.c.message_id == f"charge-{ada}"
                    )
                ).one()
        finally:
            engine.dispose()
        self.story.tell(
            f"sending ada's charge {row.message_id} again, as the outbox relay does after being "
            "killed between the broker's confirm and marking the row sent"
        )
        with mqkit.Client(self.settings) as client:
            charges = client.producer(ChargeCard, queue=self.prefix + billing.QUEUE)
            charges.publish(ChargeCard.model_validate_json(row.body), message_id=row.message_id)
        self.story.wait_for(
            rf"^\[billing\] {re.escape(row.message_id)}: already applied",
            "billing's inbox to skip the charge it already applied",
            alive=self.services,
        )

    def show_dead_letter(self, linus: str) -> None:
        """Look at the dead-lettered charge with :class:`mqkit.DeadLetterQueue` (count, peek:
        nothing removed), then replay it to billing, where it is declined again."""
        queue = self.prefix + billing.QUEUE
        dlq = dlq_name(queue)
        tell = self.story.tell
        with mqkit.Client(self.settings) as client:
            dead = client.dead_letters(queue)
            self._wait_count(dead, 1)
            letters = dead.peek(limit=10)
            count = dead.count()  # peek takes nothing away: the letters are back already
            tell(f"{dlq} holds {count} dead letter(s); DeadLetterQueue.peek() shows:")
            mine = [d for d in letters if linus in d.body.decode("utf-8", "replace")]
            if not mine:
                raise ScenarioFailed(f"the dead letters in {dlq!r} do not mention {linus}")
            letter = mine[0]
            tell(f"  dead letter {letter.message_id}: {letter.error_type}: {letter.error_message}")
            when = f" failed_at={letter.failed_at:%H:%M:%S}" if letter.failed_at else ""
            tell(f"  attempts={letter.attempts} original_queue={letter.original_queue}{when}")
            if letter.error_type != "CardDeclined" or letter.attempts != billing.RETRY.max_attempts:
                raise ScenarioFailed(
                    f"expected a CardDeclined dead letter after {billing.RETRY.max_attempts} "
                    f"attempts, got {letter.error_type} after {letter.attempts}"
                )
            if count != 1:
                raise ScenarioFailed(f"peek must leave the dead letter in place (count={count})")
            replayed = dead.replay(message_id=letter.message_id)
            tell(
                f"DeadLetterQueue.replay(message_id=...) sent {replayed} back to billing "
                f"(attempts start afresh); {dlq} now holds {dead.count()}"
            )
            if replayed != 1:
                raise ScenarioFailed(f"expected to replay 1 dead letter, replayed {replayed}")
            self.story.wait_for(
                rf"^\[billing\] order {linus}: .*declined.*\(attempt 1/3\); retry",
                "billing to try the replayed charge again",
                count=2,
                alive=self.services,
            )
            self.story.wait_for(
                rf"^\[billing\] order {linus}: .*declined.*\(attempt 3/3\); giving up",
                "billing to give up on the replayed charge",
                count=2,
                alive=self.services,
            )
            self._wait_count(dead, 1)
        tell(f"declined again: the charge is back in {dlq}, for a person to sort out with linus")

    @staticmethod
    def _wait_count(dead: mqkit.DeadLetterQueue, count: int) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT
        while dead.count() != count:
            if time.monotonic() > deadline:
                raise ScenarioFailed(
                    f"expected {count} dead letter(s) in {dead.name!r}, found {dead.count()}"
                )
            time.sleep(0.1)

    def broadcast(self) -> None:
        """Publish one CacheCleared: every notifications instance gets its own copy."""
        self.story.tell("catalog admin: the price list changed -> CacheCleared (broadcast)")
        with mqkit.Client(self.settings) as client:
            client.event_bus().publish(CacheCleared(reason="price list updated"))
        for _, instance in (s for s in SERVICES if s[0] == "notifications"):
            self.story.wait_for(
                rf"^\[notifications-{instance}\] catalog cache cleared",
                f"notifications-{instance} to get the broadcast",
                alive=self.services,
            )

    def stop_services(self) -> None:
        """SIGTERM every service; each must drain, say so, and exit 0."""
        self.story.tell("stopping the services (SIGTERM) ...")
        for service in self.services:
            service.terminate()
        for service in self.services:
            status = service.wait(30)
            if status is None:
                service.kill()
                raise ScenarioFailed(f"{service.label} did not stop within 30s of SIGTERM")
            if status != 0:
                raise ScenarioFailed(f"{service.label} exited with status {status} on SIGTERM")
            self.story.wait_for(
                rf"^\[{re.escape(service.label)}\] stopped", f"{service.label} to say it stopped"
            )

    # -- housekeeping ------------------------------------------------------------------

    def shutdown(self) -> None:
        """Make sure no service outlives the demo (after a failure, say)."""
        for service in self.services:
            service.terminate()
        for service in self.services:
            if service.wait(15) is None:
                service.kill()

    def clean_up(self) -> tuple[int, int]:
        """Delete every queue and exchange of this run; ``(queues, exchanges)`` deleted."""
        queues, exchanges = declared_names(self.run_id)
        reported = self.topology_file.read_text("utf-8").split("\n")
        self.topology_file.unlink(missing_ok=True)
        shutil.rmtree(self.data, ignore_errors=True)  # the services' SQLite databases
        for line in reported:
            kind, _, name = line.partition(" ")
            # Only what carries this run's name: never anything shared (amq.*, the default).
            if not name.startswith(f"demo-{self.run_id}."):
                continue
            if kind == "queue" and name not in queues:
                queues.append(name)
            elif kind == "exchange" and name not in exchanges:
                exchanges.append(name)
        return _delete(self.settings.all_urls[0], queues, exchanges)


def _delete(url: str, queues: Sequence[str], exchanges: Sequence[str]) -> tuple[int, int]:
    """Delete ``queues`` and ``exchanges``; how many of each existed.

    Plain pika: mqkit declares topology but has no call to delete it, and removing a
    service's queues is an operator's job, not a service's.
    """
    deleted_queues = deleted_exchanges = 0
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for queue in queues:
            channel = connection.channel()
            try:
                channel.queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker:
                continue  # never declared (or already gone with its connection)
            channel.queue_delete(queue)
            channel.close()
            deleted_queues += 1
        for exchange in exchanges:
            channel = connection.channel()
            try:
                channel.exchange_declare(exchange, passive=True)
            except pika.exceptions.ChannelClosedByBroker:
                continue
            channel.exchange_delete(exchange)
            channel.close()
            deleted_exchanges += 1
    finally:
        connection.close()
    return deleted_queues, deleted_exchanges


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m examples.demo``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show the services' log lines")
    args = parser.parse_args(argv)
    story = Story(colour=sys.stdout.isatty(), verbose=args.verbose)
    run_id = os.environ.get("DEMO_RUN_ID") or uuid.uuid4().hex[:6]
    try:
        settings = mqkit.Settings()
    except mqkit.ConfigError as exc:
        story.tell(f"FAILED: {exc}")
        return 2
    scenario = Scenario(settings, run_id, story)
    started = time.monotonic()
    status = 1
    try:
        scenario.run()
        status = 0
    except ScenarioFailed as exc:
        story.tell(f"FAILED: {exc}")
        for line in story.logs[-30:]:
            print(f"    {line}", file=sys.stderr)
    except mqkit.MqkitError as exc:
        story.tell(f"FAILED: {type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        story.tell("interrupted")
        status = 130
    finally:
        scenario.shutdown()
        try:
            queues, exchanges = scenario.clean_up()
            story.tell(f"cleaned up: deleted {queues} queues and {exchanges} exchange(s)")
        except pika.exceptions.AMQPConnectionError as exc:
            url = mask_url(scenario.settings.all_urls[0])
            story.tell(f"clean-up skipped: cannot connect to {url} ({type(exc).__name__})")
            status = status or 1
        except pika.exceptions.AMQPError as exc:  # the outcome of the story still counts
            story.tell(f"clean-up failed: {mask_url(repr(exc))}")
            status = status or 1
    if status == 0:
        story.tell(f"scenario complete in {time.monotonic() - started:.1f}s")
    return status


if __name__ == "__main__":
    sys.exit(main())
