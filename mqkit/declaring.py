"""How an entity is declared: the decisions both shells follow, as plain functions.

mqkit is an adapter layer: services adopt it next to queues that other clients, an
operator's definitions file or another language already declared. ``settings.declare``
says what to do with them:

``auto`` (default)
    Declare what is missing. A queue that exists with other arguments (the broker answers
    ``PRECONDITION_FAILED``), or that this user may not configure (``ACCESS_REFUSED``), is
    checked passively and used as it is, with one WARNING saying what mqkit cannot guarantee
    there. mqkit's retries and dead letters are published copies, so they work on any queue.
``strict``
    Declare; a queue that exists with other arguments is a :class:`~mqkit.TopologyError`.
``passive``
    Declare nothing: check that each queue and exchange exists (``passive=true``), which needs
    no configure permission. Bindings are still made (they need write on the queue and read
    on the exchange, never configure).

A shell runs, per entity::

    if checks_only(entity, mode, known=...):   passive declare; NOT_FOUND -> TopologyError
    else:
        try:   declare
        except TopologyError as exc:
            if not use_existing(entity, mode, exc.reply_code): raise
            passive declare                     # NOT_FOUND -> TopologyError, with advice
            log.warning(explain.using_existing(entity, exc))
            remember entity as existing         # re-checked passively after a reconnect
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from mqkit import explain
from mqkit.topology import Binding, Entity, Queue, QueueType, consumer_topology

__all__ = [
    "DeclareMode",
    "checks_only",
    "expand",
    "is_derived",
    "missing_advice",
    "use_existing",
]

DeclareMode = Literal["auto", "strict", "passive"]


def checks_only(entity: Entity, mode: DeclareMode, *, known: bool = False) -> bool:
    """Whether ``entity`` is only checked (a passive declare) rather than declared: in
    ``passive`` mode every queue and exchange is; ``known`` marks an entity that was found to
    exist with other arguments before (re-checked after a reconnect, not warned about again)."""
    if isinstance(entity, Binding):
        return False
    return mode == "passive" or known


def use_existing(entity: Entity, mode: DeclareMode, reply_code: int | None) -> bool:
    """Whether a declare of ``entity`` that the broker refused with ``reply_code`` falls back
    to using what exists (after a passive check).

    Only in ``auto`` mode. A queue with other arguments is usable: mqkit's retries and dead
    letters do not depend on them. An exchange with another type is not (routing would
    change under the caller's feet), so that conflict stays an error; an exchange or queue
    this user may not configure is usable if it exists.
    """
    if mode != "auto" or isinstance(entity, Binding):
        return False
    if reply_code == explain.PRECONDITION_FAILED:
        return isinstance(entity, Queue)
    return reply_code == explain.ACCESS_REFUSED


def is_derived(name: str) -> bool:
    """Whether ``name`` is a queue mqkit derives rather than a work queue: a DLQ, a service's
    retry tier (``billing.retries.1000ms``) or a queue's own retry queue of an older mqkit
    (``orders.retry.1000ms``)."""
    if name.endswith(".dlq"):
        return True
    return any(_tier_suffix(name, infix) for infix in (".retries.", ".retry."))


def _tier_suffix(name: str, infix: str) -> bool:
    head, _, tail = name.rpartition(infix)
    return bool(head) and tail.endswith("ms") and tail[:-2].isdigit()


def expand(
    entities: Iterable[Entity], *, default_type: QueueType, delivery_limit: int
) -> list[Entity]:
    """What ``client.declare(*entities)`` declares: a durable queue in exactly the shape a
    producer, consumer, responder or the bus declares it (with its DLQ, see
    :func:`~mqkit.topology.consumer_topology`), so whoever declares it first, the others
    agree; temporary queues, mqkit's own derived queues, exchanges and bindings as given."""
    out: list[Entity] = []
    for entity in entities:
        if (
            isinstance(entity, Queue)
            and entity.durable
            and not (entity.exclusive or entity.auto_delete or is_derived(entity.name))
        ):
            shaped = consumer_topology(
                entity, None, default_type=default_type, delivery_limit=delivery_limit
            )
            out.extend(e for e in shaped if e not in out)
        elif entity not in out:
            out.append(entity)
    return out


def missing_advice(entity: Entity, mode: DeclareMode) -> str:
    """The advice when a passive check finds ``entity`` missing."""
    kind = "queue" if isinstance(entity, Queue) else "exchange"
    if mode == "passive":
        return (
            f"declare='passive' declares nothing: have the {kind} created (by an operator "
            "or a definitions file), or use declare='auto' with a user that may configure it"
        )
    return "this user may not create it: grant it configure permission, or have it created"
