"""Crash tests with real processes: an orders service (outbox) and a billing service (inbox),
each SIGKILLed at every step a message passes, on PostgreSQL and SQLite, one service on each
runtime. Nothing committed is lost, nothing rolled back is published, nothing is applied
twice; the accounting is printed.

The orders service is killed, one run per step (``MQKIT_TEST_CRASH_AT``, see
mqkit/outbox/failpoints.py): before its transaction commits; after its relay claimed rows;
while a publish is in flight; after the broker confirmed, before the rows are marked sent;
after they are marked, before that commits. Then a last run sends what is left. Meanwhile the
billing service is killed after recording a message id (handler not run), after its handler
ran (not committed), and after the commit (not acked), and restarted each time.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

CHILD = Path(__file__).with_name("crash_child.py")

# (crash point, orders written in that run, order killed before its commit)
PRODUCER_RUNS: list[tuple[str | None, range, int | None]] = [
    (None, range(0, 6), 3),  # killed by the producer itself, with order 3 uncommitted
    ("relay.claimed:1", range(6, 12), None),
    ("relay.publishing:1", range(12, 18), None),
    ("relay.confirmed:1", range(18, 24), None),
    ("relay.marked:1", range(24, 30), None),
    (None, range(30, 36), None),  # sends whatever is left, then exits
]
CONSUMER_CRASHES = ["inbox.recorded:1", "inbox.handled:1", "inbox.committed:1"]


class Child:
    """One run of crash_child.py, its output in a file."""

    def __init__(self, cfg: dict[str, Any], crash: str | None, out: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "MQKIT_TEST_CRASH_AT"}
        if crash is not None:
            env["MQKIT_TEST_CRASH_AT"] = crash
        self.crash = crash
        self.out = out
        self._file = out.open("w")
        self.process = subprocess.Popen(
            [sys.executable, str(CHILD), json.dumps(cfg)],
            stdout=self._file,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def poll(self) -> int | None:
        return self.process.poll()

    def output(self) -> str:
        self._file.flush()
        return self.out.read_text()

    def finish(self, timeout: float = 30.0) -> int:
        try:
            code = self.process.wait(timeout)
        finally:
            self._file.close()
        return code

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.finish()


def rows(url: str, query: str) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(query)))
    finally:
        engine.dispose()


@pytest.mark.parametrize(("producer_rt", "consumer_rt"), [("sync", "async"), ("async", "sync")])
def test_no_message_is_lost_or_applied_twice_when_services_are_killed(
    db, producer_rt: str, consumer_rt: str, names, broker_url: str, tmp_path: Path, capsys
) -> None:
    queue = names.queue()
    log = tmp_path / "billing.log"
    log.touch()
    orders_prefix, billing_prefix = db.prefix, f"{db.prefix}b_"
    if db.kind == "sqlite":  # each service its own database file
        billing_db = tmp_path / "billing.db"
        billing_sync, billing_async = f"sqlite:///{billing_db}", f"sqlite+aiosqlite:///{billing_db}"
    else:
        billing_sync = billing_async = db.sync_url

    def url(runtime: str, sync_url: str, async_url: str) -> str:
        return sync_url if runtime == "sync" else async_url

    base = {"broker": broker_url, "queue": queue}
    consumer_cfg = {
        **base,
        "role": "consumer",
        "service": names.service(),  # billing: its retry tiers go with the names
        "runtime": consumer_rt,
        "db": url(consumer_rt, billing_sync, billing_async),
        "prefix": billing_prefix,
        "log": str(log),
    }
    consumer_crashes = list(CONSUMER_CRASHES)
    consumer_deaths: list[str] = []
    runs = 0

    def start_consumer() -> Child:
        nonlocal runs
        runs += 1
        crash = consumer_crashes[0] if consumer_crashes else None
        return Child(consumer_cfg, crash, tmp_path / f"consumer{runs}.out")

    consumer = start_consumer()

    def tend() -> None:
        """Restart the billing service when it has died at its crash point."""
        nonlocal consumer
        code = consumer.poll()
        if code is None:
            return
        assert code == -signal.SIGKILL and consumer.crash, consumer.output()
        consumer_deaths.append(consumer.crash)
        consumer.finish()
        consumer_crashes.pop(0)
        consumer = start_consumer()

    committed_expected: set[int] = set()
    try:
        for n, (crash, orders, die_before) in enumerate(PRODUCER_RUNS):
            cfg = {
                **base,
                "role": "producer",
                "runtime": producer_rt,
                "db": url(producer_rt, db.sync_url, db.async_url),
                "prefix": orders_prefix,
                "orders": list(orders),
                "die_before_commit": die_before,
            }
            producer = Child(cfg, crash, tmp_path / f"producer{n}.out")
            deadline = time.monotonic() + 60
            while producer.poll() is None and time.monotonic() < deadline:
                tend()
                time.sleep(0.05)
            code = producer.finish(timeout=5)
            killed = crash is not None or die_before is not None
            assert code == (-signal.SIGKILL if killed else 0), producer.output()
            committed_expected |= {o for o in orders if die_before is None or o < die_before}

        # Wait until billing applied every committed order (restarting it as it crashes).
        applied_query = f"SELECT order_id, message_id FROM {billing_prefix}applied"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tend()
            applied_orders = {r[0] for r in rows(billing_sync, applied_query)}
            if applied_orders >= committed_expected and not consumer_crashes:
                break
            time.sleep(0.1)
        time.sleep(0.5)  # a duplicate still on its way would be applied by now
        tend()
        assert consumer.stop() == 0, consumer.output()
    finally:
        if consumer.poll() is None:
            consumer.process.kill()
            consumer.finish()

    committed = {r[0] for r in rows(db.sync_url, f"SELECT id FROM {orders_prefix}orders")}
    outbox = rows(
        db.sync_url,
        f"SELECT message_id, sent_at IS NOT NULL, parked_at IS NOT NULL FROM {orders_prefix}outbox",
    )
    applied = rows(billing_sync, applied_query)
    lines = [line.split() for line in log.read_text().splitlines()]
    received = [line for line in lines if line[0] == "received"]
    dropped = [line for line in lines if line[0] == "dropped"]
    times_applied = collections.Counter(order for order, _ in applied)
    lost = committed - set(times_applied)
    twice = {order: n for order, n in times_applied.items() if n > 1}
    phantom = set(times_applied) - committed

    with capsys.disabled():
        print(
            f"\n[{db.kind}: orders on {producer_rt}, billing on {consumer_rt}] "
            f"published {len(outbox)} (rows committed), delivered {len(received)}, "
            f"applied {len(applied)}, duplicates dropped {len(dropped)}, "
            f"rolled back by a crash {len(received) - len(applied) - len(dropped)}, "
            f"lost {len(lost)}, applied twice {len(twice)}, never committed yet applied "
            f"{len(phantom)}; orders killed at: "
            f"{', '.join(['before its commit'] + [c for c, _, _ in PRODUCER_RUNS if c])}; "
            f"billing killed at: {', '.join(consumer_deaths)}"
        )
    assert committed == committed_expected  # order 3 died uncommitted
    assert 3 not in committed and all(int(line[1]) != 3 for line in received)
    assert len(outbox) == len(committed)
    assert all(sent and not parked for _, sent, parked in outbox), outbox
    assert consumer_deaths == CONSUMER_CRASHES
    assert not lost, f"committed but never applied: {sorted(lost)}"
    assert not twice, f"applied more than once: {twice}"
    assert not phantom
    assert len(applied) == len(committed)
    # Re-sends (killed between confirm and mark) and redeliveries (killed between commit and
    # ack) happened, and the inbox dropped them.
    assert dropped, "no duplicate reached billing: the crashes did not test the inbox"
    assert {mid for _, mid in applied} == {mid for mid, _, _ in outbox}
    if db.kind == "sqlite":
        (tmp_path / "billing.db").unlink()
