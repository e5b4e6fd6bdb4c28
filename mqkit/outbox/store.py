"""The SQL of the outbox and the inbox, written once for both runtimes.

Every function takes a blocking SQLAlchemy :class:`~sqlalchemy.engine.Connection` inside the
caller's transaction and does not commit. The blocking relay and inbox call them directly;
the asyncio ones through :meth:`AsyncConnection.run_sync
<sqlalchemy.ext.asyncio.AsyncConnection.run_sync>`, so both run the very same statements.

**Claiming.** :func:`claim` selects committed rows that are unsent, not parked and due, in
``id`` order, skipping any row an earlier unsent row of the same ``ordering_key`` holds back,
with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL: the claimed rows stay locked until the
relay's transaction ends, so another relay neither claims them nor (through the
ordering-key check, which sees them unsent) a later row of their key. SQLite has no row
locks: there one relay at a time works (:mod:`mqkit.outbox.locking`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import (
    Connection,
    Select,
    Table,
    delete,
    exists,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from mqkit.outbox.relaying import Settlement
from mqkit.outbox.rows import Pending

__all__ = [
    "OutboxStats",
    "ParkedRow",
    "claim",
    "claim_statement",
    "clean",
    "create",
    "forget",
    "parked",
    "purge",
    "record",
    "recorded",
    "retry",
    "settle",
    "stats",
]


def create(conn: Connection, table: Table) -> None:
    """Create ``table`` and its indexes unless it exists. On PostgreSQL an advisory lock
    (held to the end of the transaction) keeps two processes from creating it at once."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(table)})
    table.metadata.create_all(conn, tables=[table], checkfirst=True)


def _lock_key(table: Table) -> int:
    digest = hashlib.sha256(f"mqkit.outbox:{table.fullname}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# -- the relay ---------------------------------------------------------------------------------


def claim_statement(table: Table, *, now: float, limit: int) -> Select[tuple[object, ...]]:
    """The ``SELECT ... FOR UPDATE SKIP LOCKED`` of :func:`claim` (see the module doc)."""
    t = table
    earlier = t.alias("earlier")
    held_back = (
        exists()
        .where(earlier.c.ordering_key == t.c.ordering_key)
        .where(earlier.c.sent_at.is_(None))
        .where(earlier.c.id < t.c.id)
    )
    return (
        select(t)
        .where(t.c.sent_at.is_(None))
        .where(t.c.parked_at.is_(None))
        .where(t.c.available_at <= now)
        .where(or_(t.c.ordering_key.is_(None), ~held_back))
        .order_by(t.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=t)
    )


def claim(conn: Connection, table: Table, *, now: float, limit: int) -> list[Pending]:
    """Up to ``limit`` rows to publish now, locked until the transaction ends (PostgreSQL)."""
    rows = conn.execute(claim_statement(table, now=now, limit=limit)).all()
    return [Pending.from_row(row) for row in rows]


def settle(conn: Connection, table: Table, outcome: Settlement, *, now: float) -> None:
    """Mark the confirmed rows sent, and write each failure (attempts, error, parked or when
    to try again)."""
    t = table
    if outcome.sent:
        conn.execute(update(t).where(t.c.id.in_(outcome.sent)).values(sent_at=now))
    for failure in outcome.failures:
        conn.execute(
            update(t)
            .where(t.c.id == failure.id)
            .values(
                attempts=failure.attempts,
                last_error=failure.error,
                available_at=failure.available_at,
                parked_at=now if failure.park else None,
            )
        )


def clean(conn: Connection, table: Table, *, before: float, limit: int = 1000) -> int:
    """Delete up to ``limit`` rows sent before ``before``; how many were deleted."""
    t = table
    old = select(t.c.id).where(t.c.sent_at.is_not(None)).where(t.c.sent_at < before).limit(limit)
    return int(conn.execute(delete(t).where(t.c.id.in_(old.scalar_subquery()))).rowcount)


# -- looking at parked rows --------------------------------------------------------------------


@dataclass(frozen=True)
class ParkedRow:
    """A row the relay gave up on, with why (``last_error``)."""

    id: int
    message_id: str
    exchange: str | None
    routing_key: str
    type: str
    ordering_key: str | None
    attempts: int
    last_error: str | None
    created_at: float
    parked_at: float
    size: int

    @property
    def target(self) -> str:
        """Where it was going, in words: "queue 'q'", "exchange 'x' (key 'k')", "event bus
        (key 'k')"."""
        if self.exchange is None:
            return f"event bus (key {self.routing_key!r})"
        if self.exchange == "":
            return f"queue {self.routing_key!r}"
        return f"exchange {self.exchange!r} (key {self.routing_key!r})"


@dataclass(frozen=True)
class OutboxStats:
    """How many rows wait to be sent (``pending``), are ``parked``, or were ``sent`` (and
    are still kept)."""

    pending: int
    parked: int
    sent: int


def parked(conn: Connection, table: Table, *, limit: int | None = None) -> list[ParkedRow]:
    """The parked rows, oldest first."""
    t = table
    query = (
        select(
            t.c.id,
            t.c.message_id,
            t.c.exchange,
            t.c.routing_key,
            t.c.type,
            t.c.ordering_key,
            t.c.attempts,
            t.c.last_error,
            t.c.created_at,
            t.c.parked_at,
            func.length(t.c.body).label("size"),
        )
        .where(t.c.sent_at.is_(None))
        .where(t.c.parked_at.is_not(None))
        .order_by(t.c.id)
    )
    if limit is not None:
        query = query.limit(limit)
    return [
        ParkedRow(
            id=int(r.id),
            message_id=str(r.message_id),
            exchange=r.exchange,
            routing_key=str(r.routing_key),
            type=str(r.type),
            ordering_key=r.ordering_key,
            attempts=int(r.attempts),
            last_error=r.last_error,
            created_at=float(r.created_at),
            parked_at=float(r.parked_at),
            size=int(r.size or 0),
        )
        for r in conn.execute(query)
    ]


def _parked_where(table: Table, ids: Sequence[int] | None) -> list[object]:
    t = table
    where: list[object] = [t.c.sent_at.is_(None), t.c.parked_at.is_not(None)]
    if ids is not None:
        where.append(t.c.id.in_(list(ids)))
    return where


def retry(conn: Connection, table: Table, ids: Sequence[int] | None = None) -> int:
    """Un-park the parked rows ``ids`` (all of them for ``None``): the relay publishes them
    again, with a fresh count of attempts. How many were un-parked."""
    result = conn.execute(
        update(table)
        .where(*_parked_where(table, ids))  # type: ignore[arg-type]
        .values(parked_at=None, attempts=0, available_at=0.0)
    )
    return int(result.rowcount)


def purge(conn: Connection, table: Table, ids: Sequence[int] | None = None) -> int:
    """Delete the parked rows ``ids`` (all of them for ``None``); how many were deleted."""
    result = conn.execute(delete(table).where(*_parked_where(table, ids)))  # type: ignore[arg-type]
    return int(result.rowcount)


def stats(conn: Connection, table: Table) -> OutboxStats:
    """Counts of pending, parked and (kept) sent rows."""
    t = table
    pending = t.c.sent_at.is_(None) & t.c.parked_at.is_(None)
    is_parked = t.c.sent_at.is_(None) & t.c.parked_at.is_not(None)
    row = conn.execute(
        select(
            func.count().filter(pending),
            func.count().filter(is_parked),
            func.count().filter(t.c.sent_at.is_not(None)),
        )
    ).one()
    return OutboxStats(pending=int(row[0]), parked=int(row[1]), sent=int(row[2]))


# -- the inbox ---------------------------------------------------------------------------------


def record(conn: Connection, table: Table, *, consumer: str, message_id: str, now: float) -> bool:
    """Record that ``consumer`` is applying ``message_id``; ``False`` if it already had
    (a duplicate). On PostgreSQL a concurrent transaction recording the same id makes this
    wait until that one ends: then it is a duplicate if that one committed."""
    row = {"consumer": consumer, "message_id": message_id, "received_at": now}
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = insert(table).values(row).on_conflict_do_nothing()
    # SQLAlchemy keeps an INSERT's rowcount only when asked to.
    result = conn.execute(statement.execution_options(preserve_rowcount=True))
    return int(result.rowcount) == 1


def recorded(conn: Connection, table: Table, *, consumer: str, message_id: str) -> bool:
    """Whether ``consumer`` has recorded ``message_id``."""
    t = table
    query = select(t.c.message_id).where(t.c.consumer == consumer, t.c.message_id == message_id)
    return conn.execute(query).first() is not None


def forget(conn: Connection, table: Table, *, before: float, limit: int = 1000) -> int:
    """Delete up to ``limit`` inbox records received before ``before``; how many."""
    t = table
    old = select(t.c.consumer, t.c.message_id).where(t.c.received_at < before).limit(limit)
    statement = delete(t).where(tuple_(t.c.consumer, t.c.message_id).in_(old))
    return int(conn.execute(statement).rowcount)
