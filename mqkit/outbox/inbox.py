"""The idempotent consumer: :class:`Inbox`, which runs a handler in a database transaction
that also records the message id, and acks a message whose id it has recorded without
running the handler again.

```python
inbox = Inbox(engine)                  # Engine: plain handlers; AsyncEngine: async def ones

@inbox.handler
def charge(cmd: ChargeCard, ctx: mqkit.Context) -> None:
    conn = inbox.connection()          # the transaction the message id is recorded in
    conn.execute(insert(charges).values(order_id=cmd.order_id, amount=cmd.amount))
    outbox.publish(conn, OrderPaid(order_id=cmd.order_id))  # commits with it, or not at all

client.consumer("billing.charges", ChargeCard, charge)
```

What happens to a delivery (``_sync.py`` / ``_async.py`` carry it out):

1. a transaction begins, and ``(consumer, message_id)`` is inserted into ``{prefix}inbox``
   (``consumer``: the queue, unless ``inbox.handler(fn, consumer=...)`` names it);
2. already there: the transaction ends and the handler returns without running ``fn``, so
   mqkit acks the duplicate (logged at INFO);
3. else ``fn(message, ctx)`` runs, with :meth:`Inbox.connection` giving that transaction;
4. ``fn`` returns: the transaction commits (record and ``fn``'s writes together), then mqkit
   acks. ``fn`` raises: it rolls back (nothing recorded), and the error goes on to mqkit's
   retry policy as usual.

A crash before the commit leaves nothing recorded and the message unacked: it is delivered
again and handled. A crash after the commit, before the ack: delivered again, recognised,
acked. Ids are kept ``retention`` (default 7 days) after they were recorded, then deleted:
a duplicate that arrives later than that is handled again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar, Token
from datetime import timedelta
from typing import Any, Generic, TypeVar, overload

from pydantic import BaseModel
from sqlalchemy import Connection, Engine, Table
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mqkit import explain
from mqkit.context import Context
from mqkit.handlers import check_handler, is_async_handler
from mqkit.outbox import store
from mqkit.outbox.outbox import check_engine
from mqkit.outbox.relaying import Timer, seconds
from mqkit.outbox.tables import DEFAULT_PREFIX, tables

__all__ = ["Inbox"]

log = logging.getLogger("mqkit.outbox.inbox")

C = TypeVar("C", Connection, AsyncConnection)
T = TypeVar("T", bound=BaseModel)


class Inbox(Generic[C]):
    """Records the ids of the messages a consumer applied, in the transaction that applied
    them; see the module documentation for the steps and guarantees.

    ``Inbox(engine, *, table_prefix="mqkit_", schema=None, create_tables=True,
    retention=timedelta(days=7), cleanup_interval=60.0)``: ``engine`` is a SQLAlchemy
    ``Engine`` (plain handlers, on :class:`mqkit.Client`, or on :class:`mqkit.AsyncClient`
    which runs them in threads) or ``AsyncEngine`` (``async def`` handlers) on PostgreSQL or
    SQLite. The table ``{table_prefix}inbox`` is created on first use unless
    ``create_tables=False``. A recorded id is recognised for at least ``retention``; expired
    ids are deleted by the handlers of this process, at most once per ``cleanup_interval``.
    """

    @overload
    def __init__(
        self: Inbox[Connection],
        engine: Engine,
        *,
        table_prefix: str = ...,
        schema: str | None = ...,
        create_tables: bool = ...,
        retention: float | timedelta = ...,
        cleanup_interval: float | timedelta = ...,
    ) -> None: ...

    @overload
    def __init__(
        self: Inbox[AsyncConnection],
        engine: AsyncEngine,
        *,
        table_prefix: str = ...,
        schema: str | None = ...,
        create_tables: bool = ...,
        retention: float | timedelta = ...,
        cleanup_interval: float | timedelta = ...,
    ) -> None: ...

    def __init__(
        self,
        engine: Engine | AsyncEngine,
        *,
        table_prefix: str = DEFAULT_PREFIX,
        schema: str | None = None,
        create_tables: bool = True,
        retention: float | timedelta = timedelta(days=7),
        cleanup_interval: float | timedelta = 60.0,
    ) -> None:
        self._sync_engine, self._is_async = check_engine(engine, "Inbox")
        self._engine = engine
        self._table = tables(table_prefix, schema).inbox
        self._retention = seconds(retention, "retention")
        self._cleanup = Timer(seconds(cleanup_interval, "cleanup_interval"))
        self.ready = not create_tables  # the table is known to exist
        self._current: ContextVar[C | None] = ContextVar(f"mqkit_inbox_{id(self)}", default=None)
        self.duplicates = 0  # duplicates acked without running the handler, in this process

    def __repr__(self) -> str:
        return f"<Inbox {self._table.fullname} on {self._sync_engine.url.render_as_string()}>"

    @property
    def engine(self) -> Engine | AsyncEngine:
        """The engine whose transactions handlers run in."""
        return self._engine

    @property
    def is_async(self) -> bool:
        """Whether the engine is an AsyncEngine (handlers are then ``async def``)."""
        return self._is_async

    @property
    def table(self) -> Table:
        """The inbox table."""
        return self._table

    @property
    def retention(self) -> float:
        """Seconds a recorded id is kept (and a duplicate recognised), at least."""
        return self._retention

    # -- wrapping handlers -------------------------------------------------------------------

    @overload
    def handler(
        self: Inbox[Connection],
        fn: Callable[[T, Context], object],
        *,
        consumer: str | None = None,
    ) -> Callable[[T, Context], None]: ...

    @overload
    def handler(
        self: Inbox[AsyncConnection],
        fn: Callable[[T, Context], Awaitable[object]],
        *,
        consumer: str | None = None,
    ) -> Callable[[T, Context], Coroutine[Any, Any, None]]: ...

    def handler(self, fn: Any, *, consumer: str | None = None) -> Any:
        """``fn`` wrapped to run once per message id, in a transaction (see the module doc).

        Usable as a decorator. ``consumer`` names whose ids these are (default: the queue the
        message came from), so two handlers that get the same message (two subscriptions to
        one event) each apply it once. A plain ``fn`` needs an Inbox on an ``Engine``, an
        ``async def`` one an Inbox on an ``AsyncEngine`` (else ``TypeError``).
        """
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        if callable(fn) and is_async_handler(fn) != self._is_async:
            raise explain.inbox_handler_runtime(
                name, handler_async=not self._is_async, engine_async=self._is_async
            )
        # Not callable, a generator, a signature that cannot take (message, ctx): TypeError.
        check_handler(fn, runtime="async", role="inbox.handler")
        if consumer is not None and not (isinstance(consumer, str) and 0 < len(consumer) <= 255):
            raise explain.outbox_bad_value("consumer", consumer, "a name of 1 to 255 characters")
        if self._is_async:
            from mqkit.outbox._async import inbox_handler as async_handler

            return async_handler(self, fn, consumer)  # type: ignore[arg-type]
        from mqkit.outbox._sync import inbox_handler

        return inbox_handler(self, fn, consumer)  # type: ignore[arg-type]

    def connection(self) -> C:
        """The connection of the transaction the running handler's message id is recorded
        in (a ``Connection``, or an ``AsyncConnection`` for an AsyncEngine). Write with it,
        and publish through an outbox with it, to commit with the message. Raises
        ``LookupError`` outside a handler this inbox wrapped."""
        conn = self._current.get()
        if conn is None:
            raise explain.inbox_outside_handler()
        return conn

    # -- for the runtimes (``_sync.py``, ``_async.py``) ---------------------------------------

    def scope(self, ctx: Context, consumer: str | None) -> str:
        """Whose ids these are: ``consumer``, else the message's queue."""
        return consumer or ctx.queue or ctx.routing_key

    def enter(self, conn: C) -> Token[C | None]:
        """Make ``conn`` what :meth:`connection` returns, until :meth:`leave`."""
        return self._current.set(conn)

    def leave(self, token: Token[C | None]) -> None:
        """Undo :meth:`enter`."""
        self._current.reset(token)

    def dropped(self, ctx: Context, consumer: str) -> None:
        """Count and log a duplicate acked without running the handler."""
        self.duplicates += 1
        log.info(
            "duplicate of message %s on %s: already applied, acked without running the handler",
            ctx.message_id,
            consumer,
            extra={"message_id": ctx.message_id, "consumer": consumer, "queue": ctx.queue},
        )

    def cleanup_due(self) -> bool:
        """Whether this process should delete expired ids now."""
        return self._cleanup.due()

    def expired_before(self) -> float:
        """Ids recorded before this time (seconds since the epoch) have expired."""
        return time.time() - self._retention

    # -- looking at it -----------------------------------------------------------------------

    def create_tables(self, conn: Connection) -> None:
        """Create the inbox table unless it exists, in ``conn``'s transaction."""
        store.create(conn, self._table)

    def recorded(self, conn: Connection, message_id: str, consumer: str) -> bool:
        """Whether ``consumer`` (a queue name, or the name given to :meth:`handler`) has
        applied ``message_id`` (and it has not expired yet)."""
        return store.recorded(conn, self._table, consumer=consumer, message_id=message_id)

    def forget_expired(self, conn: Connection, limit: int = 1000) -> int:
        """Delete up to ``limit`` ids older than the retention; how many."""
        return store.forget(conn, self._table, before=self.expired_before(), limit=limit)
