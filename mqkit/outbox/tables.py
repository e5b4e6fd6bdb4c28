"""The outbox and inbox tables, as SQLAlchemy Core tables (no I/O here).

``tables(prefix, schema)`` gives both tables for one name prefix (default ``mqkit_``:
``mqkit_outbox`` and ``mqkit_inbox``) and schema. Times are seconds since the epoch (UTC) as
double-precision numbers, from the clock of the process that wrote them: portable across
PostgreSQL and SQLite, and compared only with times from the same kind of writer.

``mqkit_outbox``: one row per message to publish.

===============  ===========================================================================
id               insertion order: rows of one ``ordering_key`` are published in this order
message_id       the AMQP ``message_id``; the same on every send of the row
exchange         the exchange; NULL for the event bus (the relay's ``events_exchange``)
routing_key      the routing key (the queue's name for a message to a queue)
mandatory        whether an unroutable publish is an error (false for bus events)
type             the AMQP ``type`` property (the event type or the model's class name)
body             the JSON body, exactly as it is sent
headers          the AMQP headers as a JSON object, or NULL
correlation_id   the AMQP ``correlation_id``, or NULL
ordering_key     rows with the same key are published one after another, in ``id`` order
created_at       when it was written (the AMQP ``timestamp``)
available_at     not before this time (a row that failed waits here); 0 for a new row
attempts         failed publishes so far
last_error       the last failure, as text
parked_at        set when the relay gave up on the row; NULL otherwise
sent_at          set when the broker confirmed it; NULL until then
===============  ===========================================================================

``mqkit_inbox``: one row per message a consumer applied, ``(consumer, message_id)`` unique,
with ``received_at``; rows older than the inbox's retention are deleted.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.schema import CreateIndex, CreateTable

from mqkit.errors import ConfigError

__all__ = ["DEFAULT_PREFIX", "Tables", "ddl", "tables"]

DEFAULT_PREFIX = "mqkit_"
_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")
_NAME = 255  # the longest name, key or id a row holds (AMQP short strings are 255 bytes)


@dataclass(frozen=True)
class Tables:
    """The outbox and inbox tables for one prefix and schema (one :class:`MetaData`)."""

    metadata: MetaData
    outbox: Table
    inbox: Table


def check_prefix(prefix: str) -> str:
    """``prefix`` if it can start a table name everywhere; else :class:`ConfigError`."""
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ConfigError(
            f"table_prefix={prefix!r} cannot start a table name: use up to 40 letters, digits "
            "and underscores, not starting with a digit (e.g. 'orders_')"
        )
    return prefix


@functools.lru_cache(maxsize=64)
def tables(prefix: str = DEFAULT_PREFIX, schema: str | None = None) -> Tables:
    """Both tables named ``{prefix}outbox`` and ``{prefix}inbox`` in ``schema``.

    ```python
    t = tables("billing_")
    assert t.outbox.name == "billing_outbox"
    ```
    """
    check_prefix(prefix)
    metadata = MetaData(schema=schema)
    outbox = Table(
        f"{prefix}outbox",
        metadata,
        # SQLite: INTEGER PRIMARY KEY is the rowid, which is what makes it autoincrement.
        Column(
            "id",
            BigInteger().with_variant(Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        Column("message_id", String(_NAME), nullable=False),
        Column("exchange", String(_NAME), nullable=True),
        Column("routing_key", String(_NAME), nullable=False),
        Column("mandatory", Boolean, nullable=False),
        Column("type", String(_NAME), nullable=False),
        Column("body", LargeBinary, nullable=False),
        Column("headers", Text, nullable=True),
        Column("correlation_id", String(_NAME), nullable=True),
        Column("ordering_key", String(_NAME), nullable=True),
        Column("created_at", Double, nullable=False),
        Column("available_at", Double, nullable=False, server_default="0"),
        Column("attempts", Integer, nullable=False, server_default="0"),
        Column("last_error", Text, nullable=True),
        Column("parked_at", Double, nullable=True),
        Column("sent_at", Double, nullable=True),
    )
    unsent = outbox.c.sent_at.is_(None)
    # What the relay claims next: unsent rows in id order.
    Index(
        f"ix_{prefix}outbox_unsent",
        outbox.c.id,
        postgresql_where=unsent,
        sqlite_where=unsent,
    )
    # Whether an earlier unsent row holds the same ordering key.
    Index(
        f"ix_{prefix}outbox_key",
        outbox.c.ordering_key,
        outbox.c.id,
        postgresql_where=unsent,
        sqlite_where=unsent,
    )
    # Sent rows past their retention, to delete.
    sent = outbox.c.sent_at.is_not(None)
    Index(f"ix_{prefix}outbox_sent", outbox.c.sent_at, postgresql_where=sent, sqlite_where=sent)

    inbox = Table(
        f"{prefix}inbox",
        metadata,
        Column("consumer", String(_NAME), nullable=False),
        Column("message_id", String(_NAME), nullable=False),
        Column("received_at", Double, nullable=False),
        PrimaryKeyConstraint("consumer", "message_id", name=f"pk_{prefix}inbox"),
    )
    Index(f"ix_{prefix}inbox_received", inbox.c.received_at)
    return Tables(metadata, outbox, inbox)


def ddl(dialect: Dialect, prefix: str = DEFAULT_PREFIX, schema: str | None = None) -> str:
    """The ``CREATE TABLE`` / ``CREATE INDEX`` statements of both tables for ``dialect``,
    for teams that manage their schema with migrations (e.g. Alembic)."""
    made = tables(prefix, schema)
    statements: list[str] = []
    for table in (made.outbox, made.inbox):
        statements.append(str(CreateTable(table).compile(dialect=dialect)))
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            statements.append(str(CreateIndex(index).compile(dialect=dialect)))
    tidy = ["\n".join(line.rstrip() for line in s.strip().splitlines()) for s in statements]
    return ";\n\n".join(tidy) + ";\n"
