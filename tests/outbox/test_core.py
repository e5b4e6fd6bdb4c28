"""The outbox's decisions, without a broker: rows, targets, what a failure does, the pace of
a relay, SQLite's relay lock, the claim statement, and the errors bad input gets."""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import create_engine
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

import mqkit
from mqkit.errors import (
    ConfigError,
    ConnectionFailed,
    PublishError,
    PublishNacked,
    PublishTimeout,
    PublishTooLarge,
    PublishUnroutable,
)
from mqkit.outbox import AsyncOutboxRelay, Inbox, Outbox, OutboxRelay, RelayPolicy
from mqkit.outbox.locking import relay_lock
from mqkit.outbox.relaying import (
    RECHECKS,
    Pace,
    Timer,
    declarations,
    failed_rows,
    groups,
    one_by_one,
    seconds,
    settle,
    split,
)
from mqkit.outbox.rows import Pending, Target, check_headers, target, values
from mqkit.outbox.store import claim_statement
from mqkit.outbox.tables import ddl, tables


class Charge(BaseModel):
    order_id: str


class Shipped(mqkit.Event, event_type="outbox_core.shipped"):
    order_id: str


def pending(row_id: int = 1, **kw: Any) -> Pending:
    row = values(
        kw.pop("message", Charge(order_id=str(row_id))),
        kw.pop("where", Target("", "q", True)),
        headers=kw.pop("headers", None),
        message_id=kw.pop("message_id", None),
        correlation_id=None,
        ordering_key=kw.pop("ordering_key", None),
        now=1_700_000_000.5,
    )
    row.update(kw)
    return Pending.from_row(type("Row", (), {"id": row_id, **row})())


# -- where a message goes ----------------------------------------------------------------------


def test_targets_follow_the_producer_rules_and_events_default_to_the_bus() -> None:
    def where(message: BaseModel, **kw: Any) -> Target:
        kw = {"queue": None, "exchange": None, "routing_key": None, **kw}
        return target(message, **kw)

    assert where(Charge(order_id="1"), queue="billing") == Target("", "billing", True)
    assert where(Charge(order_id="1"), queue=mqkit.Queue("billing")).routing_key == "billing"
    assert where(Shipped(order_id="1"), exchange="shop") == Target(
        "shop", "outbox_core.shipped", True
    )
    assert where(Charge(order_id="1"), exchange=mqkit.Exchange("shop"), routing_key="k") == Target(
        "shop", "k", True
    )
    assert where(Shipped(order_id="1")) == Target(None, "outbox_core.shipped", False)
    assert where(Shipped(order_id="1"), routing_key="eu.shipped").routing_key == "eu.shipped"


@pytest.mark.parametrize(
    ("message", "kw", "error", "words"),
    [
        ({"order_id": "1"}, {"queue": "q"}, TypeError, "pydantic model instance"),
        (Charge(order_id="1"), {"queue": "q", "exchange": "x"}, ConfigError, "pass one of them"),
        (Charge(order_id="1"), {"queue": "q", "routing_key": "k"}, ConfigError, "does not apply"),
        (Charge(order_id="1"), {}, ConfigError, "needs queue= or exchange="),
        (Charge(order_id="1"), {"queue": "q" * 256}, ConfigError, "at most 255"),
        (Charge(order_id="1"), {"exchange": 42}, ConfigError, "a string"),
    ],
)
def test_a_target_that_cannot_be_says_what_to_pass(
    message: Any, kw: dict[str, Any], error: type[Exception], words: str
) -> None:
    kw = {"queue": None, "exchange": None, "routing_key": None, **kw}
    with pytest.raises(error) as raised:
        target(message, **kw)
    assert words in str(raised.value)


def test_a_row_comes_back_as_the_envelope_it_was_written_as() -> None:
    row = pending(
        7,
        headers={"tenant": "eu", "n": [1, 2.5, None], "deep": {"ok": True}},
        message_id="m-7",
        ordering_key="order-7",
    )
    envelope = row.envelope("orders")
    assert envelope.message_id == "m-7"
    assert json.loads(envelope.body) == {"order_id": "7"}
    assert envelope.type == "Charge"
    assert envelope.app_id == "orders"
    assert envelope.timestamp == 1_700_000_000
    assert envelope.headers == {"tenant": "eu", "n": [1, 2.5, None], "deep": {"ok": True}}
    assert envelope.delivery_mode == 2 and envelope.content_type == "application/json"
    assert row.ordering_key == "order-7" and row.queue == "q"


@pytest.mark.parametrize(
    ("headers", "where"),
    [
        ({"when": object()}, "when"),
        ({"raw": b"bytes"}, "raw"),
        ({"nan": math.nan}, "nan"),
        ({1: "x"}, "1"),
        ({"deep": {"list": [1, {2}]}}, "deep.list[1]"),
    ],
)
def test_headers_the_row_cannot_keep_are_refused(headers: dict[Any, Any], where: str) -> None:
    with pytest.raises(TypeError) as raised:
        check_headers(headers)
    assert f"header {where}" in str(raised.value)


def test_a_damaged_row_is_set_apart_not_published() -> None:
    good, bad = pending(1), dataclasses.replace(pending(2), headers="[1, 2]")
    made, broken = groups([good, bad], service="s", events_exchange="bus")
    assert [g.rows for g in made] == [[good]]
    assert list(broken) == [2] and isinstance(broken[2], ValueError)


# -- one pass ----------------------------------------------------------------------------------


def test_rows_are_grouped_per_exchange_and_bus_events_go_to_the_bus() -> None:
    to_queue = pending(1)
    to_bus = pending(
        2, message=Shipped(order_id="2"), where=Target(None, "outbox_core.shipped", False)
    )
    to_shop = pending(3, where=Target("shop", "k", True))
    made, broken = groups([to_queue, to_bus, to_shop], service="s", events_exchange="bus")
    assert not broken
    assert [(g.exchange, g.mandatory, g.keys) for g in made] == [
        ("", True, ["q"]),
        ("bus", False, ["outbox_core.shipped"]),
        ("shop", True, ["k"]),
    ]
    needed = declarations([to_queue, to_bus, to_shop], "bus", done=set())
    assert needed == {mqkit.Queue("q"): [1], mqkit.Exchange("bus"): [2]}
    assert declarations([to_queue], "bus", done={mqkit.Queue("q")}) == {}


def test_a_message_id_goes_once_per_publish() -> None:
    a, b, c = pending(1, message_id="same"), pending(2, message_id="same"), pending(3)
    assert split([a, b, c]) == ([a, c], [b])


def test_a_batch_error_is_pinned_on_the_rows_it_names() -> None:
    rows = [pending(1, message_id="m1"), pending(2, message_id="m2")]
    error = PublishUnroutable("1 of 2 not confirmed", unconfirmed=["m2"])
    assert failed_rows(rows, error) == {2: error}
    other = ConnectionFailed("gone")
    assert failed_rows(rows, other) == {1: other, 2: other}
    # each row of a failed batch is tried alone to learn its own error, unless it is an outage
    assert one_by_one(rows, {2: error}) == [rows[1]]
    assert one_by_one(rows, {1: other, 2: other}) == []
    assert one_by_one(rows[:1], {1: error}) == []


def test_what_a_failure_does_to_a_row() -> None:
    policy = RelayPolicy(max_attempts=3, retry_delays=(1.0, 5.0))
    rows = [pending(n, attempts=a) for n, a in ((1, 0), (2, 0), (3, 2), (4, 0), (5, 0), (6, 0))]
    errors: dict[int, BaseException] = {
        2: PublishUnroutable("no route"),
        3: PublishNacked("nacked"),  # its third failure: parked
        4: PublishTooLarge("too big"),  # hopeless: parked at once
        5: PublishTimeout("no confirm"),  # not the row's fault: left alone
        6: ValueError("damaged row"),
    }
    outcome = settle(rows, errors, now=100.0, policy=policy)
    assert outcome.sent == [1]
    failures = {f.id: f for f in outcome.failures}
    assert set(failures) == {2, 3, 4, 6}
    assert (failures[2].park, failures[2].attempts, failures[2].available_at) == (False, 1, 101.0)
    assert failures[2].error == "PublishUnroutable: no route"
    assert (failures[3].park, failures[3].attempts) == (True, 3)
    assert (failures[4].park, failures[4].attempts) == (True, 1)
    assert failures[6].park
    assert isinstance(outcome.trouble, PublishTimeout)
    assert [f.id for f in outcome.parked] == [3, 4, 6]
    assert policy.delay(1) == 1.0 and policy.delay(2) == 5.0 and policy.delay(9) == 5.0
    long = settle([pending(1)], {1: PublishError("x" * 5000)}, now=0.0, policy=policy)
    assert len(long.failures[0].error) == 2000


def test_the_pace_of_a_relay() -> None:
    pace = Pace(poll_interval=2.0)
    assert pace.after(sent=0, full=False) == 2.0  # idle: poll
    assert pace.after(sent=3, full=False) == 0.0  # sent some: rows they held back may be due
    assert pace.after(sent=100, full=True) == 0.0
    pace.woken()  # a commit here: look again shortly until it shows
    assert [pace.after(sent=0, full=False) for _ in RECHECKS] == list(RECHECKS)
    assert pace.after(sent=0, full=False) == 2.0
    assert [pace.after(sent=0, full=False, trouble=True) for _ in range(6)] == [
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
    ]
    assert pace.after(sent=1, full=False) == 0.0  # back to normal


def test_a_timer_is_due_at_once_then_once_per_interval() -> None:
    now = [0.0]
    timer = Timer(10.0, clock=lambda: now[0])
    assert timer.due() and not timer.due()
    now[0] = 9.9
    assert not timer.due()
    now[0] = 10.0
    assert timer.due()


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"max_attempts": True}, "max_attempts"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"retention": -1}, "retention"),
        ({"retry_delays": ()}, "retry_delays"),
        ({"retry_delays": (1.0, -2.0)}, "retry_delays"),
        ({"cleanup_interval": "soon"}, "cleanup_interval"),
    ],
)
def test_a_policy_that_cannot_work_is_refused_naming_the_field(
    kw: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        RelayPolicy(**kw)


def test_durations_are_seconds_or_timedeltas() -> None:
    assert seconds(timedelta(minutes=2), "retention") == 120.0
    assert seconds(0, "retention", positive=False) == 0.0
    with pytest.raises(ConfigError, match="more than 0 seconds"):
        seconds(0, "poll_interval")


# -- the SQL and the SQLite lock ---------------------------------------------------------------


def test_the_claim_skips_locked_rows_and_rows_held_back_by_their_key() -> None:
    statement = claim_statement(tables("t_").outbox, now=1.0, limit=10)
    sql = str(statement.compile(dialect=postgresql.dialect()))
    assert "FOR UPDATE OF t_outbox SKIP LOCKED" in sql
    assert "NOT (EXISTS" in sql and "earlier.id < t_outbox.id" in sql
    assert "ORDER BY t_outbox.id" in sql


def test_the_ddl_has_both_tables_and_partial_indexes() -> None:
    text = ddl(postgresql.dialect(), "shop_", "orders")
    assert "CREATE TABLE orders.shop_outbox" in text and "CREATE TABLE orders.shop_inbox" in text
    assert "WHERE sent_at IS NULL" in text
    assert "PRIMARY KEY (consumer, message_id)" in text
    with pytest.raises(ConfigError, match="table_prefix"):
        tables("1bad")


def test_sqlite_relays_take_turns_and_a_closed_lock_frees_the_turn(tmp_path: Path) -> None:
    url = make_url(f"sqlite:///{tmp_path / 'shop.db'}")
    first, second = relay_lock(url, "t_outbox"), relay_lock(url, "t_outbox")
    assert first is not None and second is not None
    assert first.path == f"{tmp_path / 'shop.db'}-t_outbox.lock"
    assert first.acquire() and first.acquire()  # ours already
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    memory_a, memory_b = (
        relay_lock(make_url("sqlite://"), "t"),
        relay_lock(make_url("sqlite://"), "t"),
    )
    assert memory_a is not None and memory_b is not None
    assert memory_a.acquire() and not memory_b.acquire()
    memory_a.release()
    assert relay_lock(make_url("postgresql://h/db"), "t_outbox") is None


# -- bad input -----------------------------------------------------------------------------------


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    made = create_engine(f"sqlite:///{tmp_path / 'bad.db'}")
    yield made
    made.dispose()


def test_an_outbox_needs_an_engine_and_publish_a_connection(engine: Any) -> None:
    with pytest.raises(TypeError, match="SQLAlchemy Engine"):
        Outbox("sqlite:///x.db")  # type: ignore[arg-type]
    outbox = Outbox(engine)
    with pytest.raises(TypeError, match="an Engine has no transaction of yours"):
        outbox.publish(engine, Charge(order_id="1"), queue="q")  # type: ignore[call-overload]
    with engine.begin() as conn:
        with pytest.raises(TypeError, match="header when"):
            outbox.publish(conn, Charge(order_id="1"), queue="q", headers={"when": object()})
        with pytest.raises(ConfigError, match="ordering_key"):
            outbox.publish(conn, Charge(order_id="1"), queue="q", ordering_key="k" * 300)
    with pytest.raises(ConfigError, match="batch_size"):
        Outbox(engine, batch_size=-1)


def test_relays_and_inboxes_refuse_the_other_runtime(engine: Any, tmp_path: Path) -> None:
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'bad.db'}")
    with pytest.raises(ConfigError, match=r"AsyncClient\.outbox_relay"):
        mqkit.Client(url="amqp://localhost:1/").outbox_relay(Outbox(async_engine))
    with pytest.raises(ConfigError, match=r" Client\.outbox_relay"):
        mqkit.AsyncClient(url="amqp://localhost:1/").outbox_relay(Outbox(engine))


def test_a_relay_is_made_by_its_client(engine: Any, tmp_path: Path) -> None:
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'made.db'}")
    with pytest.raises(TypeError, match=r"by its Client: use client\.outbox_relay\(outbox\)"):
        OutboxRelay(mqkit.Client(url="amqp://localhost:1/"), Outbox(engine))
    with pytest.raises(TypeError, match=r"by its AsyncClient: use client\.outbox_relay\(outbox\)"):
        AsyncOutboxRelay(mqkit.AsyncClient(url="amqp://localhost:1/"), Outbox(async_engine))
    relay = mqkit.Client(url="amqp://localhost:1/").outbox_relay(Outbox(engine))
    assert isinstance(relay, OutboxRelay) and not relay.started

    async def handle_async(message: Charge, ctx: mqkit.Context) -> None: ...

    def handle(message: Charge, ctx: mqkit.Context) -> None: ...

    with pytest.raises(TypeError, match="async def function but this Inbox is on a blocking"):
        Inbox(engine).handler(handle_async)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="plain function but this Inbox is on an AsyncEngine"):
        Inbox(async_engine).handler(handle)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a function"):
        Inbox(engine).handler(42)  # type: ignore[call-overload]
    with pytest.raises(ConfigError, match="consumer"):
        Inbox(engine).handler(handle, consumer="")
    with pytest.raises(LookupError, match=r"inbox.handler\(...\)"):
        Inbox(engine).connection()
    with pytest.raises(ConfigError, match="retention"):
        Inbox(engine, retention=0)
