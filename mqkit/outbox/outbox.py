"""The transactional outbox: :class:`Outbox`, where a service writes the messages of a
transaction, in that transaction.

```python
outbox = Outbox(engine)                       # a SQLAlchemy Engine (AsyncEngine: AsyncClient)
with engine.begin() as conn:                  # the service's own transaction
    conn.execute(insert(orders).values(...))
    outbox.publish(conn, OrderPlaced(...))                          # to the event bus
    outbox.publish(conn, ChargeCard(...), queue="billing.charges")  # to a queue
relay = client.outbox_relay(outbox)           # started by client.run(), or relay.start()
```

A rollback leaves no message; a commit leaves rows a relay (``_sync.py``, ``_async.py``)
publishes with confirms, at least once, each with the message id it was given here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import timedelta
from typing import Any, overload

from pydantic import BaseModel
from sqlalchemy import Connection, Engine, Table, event, insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from mqkit import explain
from mqkit.outbox import store
from mqkit.outbox.relaying import RelayPolicy, seconds
from mqkit.outbox.rows import target, values
from mqkit.outbox.store import OutboxStats, ParkedRow
from mqkit.outbox.tables import DEFAULT_PREFIX, tables
from mqkit.topology import Exchange, Queue

__all__ = ["SUPPORTED_DIALECTS", "Outbox", "check_engine"]

SUPPORTED_DIALECTS = ("postgresql", "sqlite")


def check_engine(engine: object, role: str) -> tuple[Engine, bool]:
    """The blocking engine behind ``engine`` and whether ``engine`` is an AsyncEngine; a
    ``TypeError`` / :class:`~mqkit.ConfigError` for anything the outbox cannot use."""
    if isinstance(engine, AsyncEngine):
        sync, is_async = engine.sync_engine, True
    elif isinstance(engine, Engine):
        sync, is_async = engine, False
    else:
        raise explain.outbox_not_an_engine(role, engine)
    if sync.dialect.name not in SUPPORTED_DIALECTS:
        raise explain.outbox_dialect(role, sync.dialect.name)
    return sync, is_async


class Outbox:
    """A table of messages to publish, written in the caller's transactions.

    ``Outbox(engine, *, table_prefix="mqkit_", schema=None, create_tables=True, ...)``:
    ``engine`` is a SQLAlchemy ``Engine`` (for :class:`mqkit.Client`) or ``AsyncEngine`` (for
    :class:`mqkit.AsyncClient`) on PostgreSQL or SQLite. The table is ``{table_prefix}outbox``
    in ``schema``; with ``create_tables`` it is created on first use (else create it with
    your migrations: ``mqkit outbox ddl`` prints its DDL). The other keywords set the relay's
    :class:`~mqkit.outbox.relaying.RelayPolicy`: ``batch_size``, ``poll_interval``,
    ``max_attempts``, ``retry_delays``, ``retention`` (how long sent rows are kept, seconds
    or a ``timedelta``) and ``cleanup_interval``.

    :meth:`publish` writes a row in the caller's transaction. The admin methods
    (:meth:`stats`, :meth:`parked`, :meth:`retry`, :meth:`purge`, :meth:`create_tables`)
    take a blocking ``Connection``; on an AsyncEngine run them with
    ``await conn.run_sync(outbox.parked)``.
    """

    def __init__(
        self,
        engine: Engine | AsyncEngine,
        *,
        table_prefix: str = DEFAULT_PREFIX,
        schema: str | None = None,
        create_tables: bool = True,
        batch_size: int = 100,
        poll_interval: float | timedelta = 1.0,
        max_attempts: int = 10,
        retry_delays: Sequence[float] = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
        retention: float | timedelta = timedelta(days=1),
        cleanup_interval: float | timedelta = 60.0,
    ) -> None:
        self._sync_engine, self._is_async = check_engine(engine, "Outbox")
        self._engine = engine
        self._table = tables(table_prefix, schema).outbox
        self._create = bool(create_tables)
        self._policy = RelayPolicy(
            batch_size=batch_size,
            poll_interval=seconds(poll_interval, "poll_interval"),
            max_attempts=max_attempts,
            retry_delays=tuple(retry_delays),
            retention=seconds(retention, "retention", positive=False),
            cleanup_interval=seconds(cleanup_interval, "cleanup_interval"),
        )
        self._ready = not self._create  # the table is known to exist
        # Keys in a connection's info dict: "this transaction wrote rows" / "... created it".
        self._wrote = ("mqkit.outbox.wrote", id(self))
        self._created = ("mqkit.outbox.created", id(self))
        self._waiters: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        event.listen(self._sync_engine, "commit", self._on_commit)
        event.listen(self._sync_engine, "rollback", self._on_rollback)

    def __repr__(self) -> str:
        return f"<Outbox {self._table.fullname} on {self._sync_engine.url.render_as_string()}>"

    # -- what it is ------------------------------------------------------------------------

    @property
    def engine(self) -> Engine | AsyncEngine:
        """The engine the relay and :meth:`create_tables` use."""
        return self._engine

    @property
    def sync_engine(self) -> Engine:
        """The blocking engine (for an AsyncEngine, the one it wraps)."""
        return self._sync_engine

    @property
    def is_async(self) -> bool:
        """Whether the engine is an AsyncEngine (the relay is then an AsyncClient's)."""
        return self._is_async

    @property
    def table(self) -> Table:
        """The outbox table."""
        return self._table

    @property
    def policy(self) -> RelayPolicy:
        """How relays work through this outbox."""
        return self._policy

    # -- writing ---------------------------------------------------------------------------

    @overload
    def publish(
        self,
        conn: Connection | Session,
        message: BaseModel,
        *,
        queue: str | Queue | None = None,
        exchange: str | Exchange | None = None,
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        ordering_key: str | None = None,
    ) -> str: ...

    @overload
    def publish(
        self,
        conn: AsyncConnection | AsyncSession,
        message: BaseModel,
        *,
        queue: str | Queue | None = None,
        exchange: str | Exchange | None = None,
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        ordering_key: str | None = None,
    ) -> Coroutine[Any, Any, str]: ...

    def publish(
        self,
        conn: Connection | Session | AsyncConnection | AsyncSession,
        message: BaseModel,
        *,
        queue: str | Queue | None = None,
        exchange: str | Exchange | None = None,
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        ordering_key: str | None = None,
    ) -> str | Coroutine[Any, Any, str]:
        """Write ``message`` into the outbox in the transaction of ``conn``; its message id.

        ``conn`` is the ``Connection`` (or ORM ``Session``) of the caller's transaction; for
        an ``AsyncConnection`` / ``AsyncSession``, await the call. Nothing is published until
        that transaction commits; a rollback leaves nothing. The options are a producer's:
        ``queue=``, or ``exchange=`` with ``routing_key=``; an :class:`~mqkit.Event` given
        neither goes to the event bus with its ``event_type`` as routing key. ``headers``
        must be JSON values. ``message_id`` (default: a new one) is the id of every send of
        this message. Rows with the same ``ordering_key`` are published one after another
        in the order they were written; a row without one waits for no other.
        """
        row = values(
            message,
            target(message, queue=queue, exchange=exchange, routing_key=routing_key),
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            ordering_key=ordering_key,
            now=time.time(),
        )
        if isinstance(conn, (AsyncConnection, AsyncSession)):
            return self._publish_async(conn, row)
        if isinstance(conn, Session):
            conn = conn.connection()
        if not isinstance(conn, Connection):
            raise explain.outbox_not_a_connection(conn, expects_async=self._is_async)
        self._write(conn, row)
        return str(row["message_id"])

    async def _publish_async(
        self, conn: AsyncConnection | AsyncSession, row: dict[str, Any]
    ) -> str:
        connection = await conn.connection() if isinstance(conn, AsyncSession) else conn
        await connection.run_sync(self._write, row)
        return str(row["message_id"])

    def _write(self, conn: Connection, row: dict[str, Any]) -> None:
        if not self._ready and not conn.info.get(self._created):
            # In the caller's transaction: SQLite would wait on its own write lock if the
            # table were created on a connection of its own.
            self.create_tables(conn)
        conn.execute(insert(self._table), row)
        conn.info[self._wrote] = True

    # -- waking relays -----------------------------------------------------------------------

    def _on_commit(self, conn: Connection) -> None:
        # Called as a transaction of this engine commits (SQLAlchemy calls it just before the
        # database's COMMIT: a relay woken by it looks again shortly if it finds nothing).
        try:
            info = conn.info
            if info.pop(self._created, None):
                self._ready = True
            wrote = info.pop(self._wrote, None)
        except Exception:  # never break the caller's commit over a wake-up
            return
        if wrote:
            self._wake()

    def _on_rollback(self, conn: Connection) -> None:
        try:
            conn.info.pop(self._wrote, None)
            conn.info.pop(self._created, None)
        except Exception:
            return

    def _wake(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for waiter in waiters:
            try:
                waiter()
            except Exception:  # a relay whose loop is gone
                continue

    def add_waiter(self, waiter: Callable[[], None]) -> Callable[[], None]:
        """Call ``waiter()`` (from any thread; it must not block) after each commit in this
        process that wrote rows into this outbox; returns the function that stops it.
        Relays use it to publish without waiting for their next poll."""
        with self._lock:
            self._waiters.append(waiter)

        def remove() -> None:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

        return remove

    # -- the table -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the table is known to exist (created by a committed transaction, or
        ``create_tables=False``)."""
        return self._ready

    def create_tables(self, conn: Connection) -> None:
        """Create the outbox table (and its indexes) unless it exists, in ``conn``'s
        transaction."""
        store.create(conn, self._table)
        conn.info[self._created] = True  # known to exist once this commits

    def stats(self, conn: Connection) -> OutboxStats:
        """How many rows are pending, parked, and sent (not yet cleaned up)."""
        return store.stats(conn, self._table)

    def parked(self, conn: Connection, limit: int | None = None) -> list[ParkedRow]:
        """The rows the relay gave up on (oldest first), each with its ``last_error``.

        A parked row holds back the later rows of its ``ordering_key`` until it is retried
        or purged."""
        return store.parked(conn, self._table, limit=limit)

    def retry(self, conn: Connection, ids: Sequence[int] | None = None) -> int:
        """Publish the parked rows ``ids`` (``None``: all) again; how many there were."""
        return store.retry(conn, self._table, ids)

    def purge(self, conn: Connection, ids: Sequence[int] | None = None) -> int:
        """Delete the parked rows ``ids`` (``None``: all); how many there were."""
        return store.purge(conn, self._table, ids)
