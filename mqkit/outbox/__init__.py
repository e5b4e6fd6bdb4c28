"""Transactional outbox and idempotent inbox for mqkit, on SQLAlchemy 2 (``mqkit[outbox]``).

The classic failure between a service's database and RabbitMQ: the order commits and the
process dies before ``OrderPlaced`` is published (lost), or the event is published and the
transaction rolls back (an event about nothing), or a redelivered ``ChargeCard`` charges
twice. The outbox writes messages in the service's own transaction and a relay publishes
them once committed; the inbox applies each message id once.

```python
from mqkit.outbox import Inbox, Outbox, OutboxRelay

outbox = Outbox(engine)
with engine.begin() as conn:
    conn.execute(insert(orders).values(...))
    outbox.publish(conn, OrderPlaced(...))
with client.outbox_relay(outbox):           # or client.run() starts and stops it
    ...

inbox = Inbox(engine)
client.consumer("billing.charges", ChargeCard, inbox.handler(charge))
```

Modules: :mod:`~mqkit.outbox.tables` (the tables), :mod:`~mqkit.outbox.rows` (message ⇄ row),
:mod:`~mqkit.outbox.relaying` (the relay's decisions), :mod:`~mqkit.outbox.store` (the SQL),
:mod:`~mqkit.outbox.locking` (SQLite's one relay at a time), ``_sync.py`` / ``_async.py``
(the I/O of each runtime), :mod:`~mqkit.outbox.cli` (``mqkit outbox list|retry|purge|ddl``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mqkit.outbox._async import AsyncOutboxRelay
    from mqkit.outbox._sync import OutboxRelay
    from mqkit.outbox.inbox import Inbox
    from mqkit.outbox.outbox import Outbox
    from mqkit.outbox.relaying import RelayPolicy
    from mqkit.outbox.store import OutboxStats, ParkedRow

__all__ = [
    "AsyncOutboxRelay",
    "Inbox",
    "Outbox",
    "OutboxRelay",
    "OutboxStats",
    "ParkedRow",
    "RelayPolicy",
]

# Imported on first use, so that ``mqkit.outbox.cli`` (part of the ``mqkit`` command) loads
# without SQLAlchemy, which only the ``mqkit[outbox]`` extra installs.
_WHERE = {
    "AsyncOutboxRelay": "mqkit.outbox._async",
    "Inbox": "mqkit.outbox.inbox",
    "Outbox": "mqkit.outbox.outbox",
    "OutboxRelay": "mqkit.outbox._sync",
    "OutboxStats": "mqkit.outbox.store",
    "ParkedRow": "mqkit.outbox.store",
    "RelayPolicy": "mqkit.outbox.relaying",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'mqkit.outbox' has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith(("sqlalchemy", "greenlet")):
            raise
        raise ImportError(
            f"mqkit.outbox needs SQLAlchemy 2 with asyncio support ({exc}); install it with: "
            "pip install 'mqkit[outbox]'"
        ) from exc
