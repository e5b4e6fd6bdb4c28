"""The contract between the core and a shell (``mqkit/_sync`` on pika, ``mqkit/_async`` on
aio-pika), written down once. ``docs/SHELL_CONTRACT.md`` says the same in prose.

The core decides; a shell does the I/O the decision asks for and reports what happened. A
shell must:

1. **Connect** to ``settings.all_urls`` in order, waiting :data:`mqkit.backoff.LINK_BACKOFF`
   between rounds, until ``connect_timeout``; an error retrying cannot fix (credentials,
   vhost, TLS) fails at once (``explain``). After a loss it reconnects with the same
   back-off, re-declares its topology (:mod:`mqkit.declaring`) and restores every
   :class:`Restorable` part, then reports :class:`~mqkit.lifecycle.LinkRestored`.
2. **Declare** each entity as :mod:`mqkit.declaring` says (declare, check, or use what
   exists), caching what it declared for the replay after a reconnect.
3. **Publish** with confirms and ``mandatory``, keeping the books in a
   :class:`mqkit.ledger.Ledger`: the shell sends what the ledger gives and tells it every
   ack, nack, return, closed channel and lost link. So, on both runtimes: at most
   :data:`mqkit.publishing.CONFIRM_WINDOW` unconfirmed; a return is ``PublishUnroutable``; a
   nack replaces the channel and the message is sent again once on the new one
   (:func:`mqkit.publishing.retry_nacked`); a closed channel fails only the messages the
   broker named (:func:`mqkit.publishing.missing_exchange`,
   :class:`mqkit.publishing.SizeLimit`); on a lost link, unconfirmed messages are sent again
   as long as confirms keep coming within ``confirm_timeout``, else ``PublishTimeout`` naming
   them (:meth:`mqkit.ledger.Batch.failure`).
4. **Consume** with manual acks: per delivery :func:`mqkit.delivery.prepare`, then the
   handler, then :func:`mqkit.retry.decide` and :func:`mqkit.delivery.follow_up`; a follow-up
   copy is published (confirmed) before the ack, and a copy that cannot be published means
   ``nack(requeue=True)``; acks are batched by :class:`mqkit.acks.AckWindow`.
5. **Report** every :mod:`mqkit.lifecycle` event at the point it names, to the
   :class:`~mqkit.lifecycle.Pipeline` it was given (never log those events itself): the
   pipeline's observers (logging, metrics, tracing, middleware) see the same stream on both
   runtimes.

The parts of a shell take their collaborators (the link, the publisher, the declarer, the
pipeline) as arguments, never reach into the client's private members, and carry the same
names and module names on both sides, so that a normalised ``diff`` of a pair
(``scripts/twins.py``) shows only I/O.
"""

from __future__ import annotations

from typing import Protocol

from mqkit.urls import memory_name

__all__ = [
    "RPC_TIMEOUT",
    "AsyncRestorable",
    "Restorable",
    "connectable",
    "connection_name",
    "link_name",
]

RPC_TIMEOUT = 30.0  # seconds the broker has to answer one channel operation


def connectable(url: str) -> str:
    """The AMQP URL a shell opens for ``url``: ``url`` itself, or for ``memory://NAME`` the
    loopback URL of that in-process broker (:mod:`mqkit.testing.memory`, started on first
    use, and imported only then)."""
    if memory_name(url) is None:
        return url
    from mqkit.testing.memory import amqp_url

    return amqp_url(url)


def connection_name(service: str, purpose: str = "") -> str:
    """The name a connection shows in the broker (``rabbitmqctl list_connections
    client_properties``, the management UI): the same on both runtimes, and telling a
    client's two connections apart, e.g. ``mqkit:billing (publishing)``."""
    return f"mqkit:{service} ({purpose})" if purpose else f"mqkit:{service}"


def link_name(purpose: str = "") -> str:
    """How log lines name a client's connection, the same on both runtimes: "the publishing
    connection", or "the connection" when it has no purpose of its own."""
    return f"the {purpose} connection" if purpose else "the connection"


class Restorable(Protocol):
    """A part of the blocking shell that the link restores after a reconnect (a consumer, the
    publisher, the declarer). Registered with ``link.register(part)``."""

    def _link_lost(self, reason: BaseException) -> None:
        """The connection is gone: drop channel state (never block, never raise)."""

    def _restore(self) -> None:
        """The link is up again and the topology declared: reopen channels, re-attach."""


class AsyncRestorable(Protocol):
    """The asyncio shell's :class:`Restorable`: the same two steps, ``_restore`` awaited."""

    def _link_lost(self, reason: BaseException) -> None:
        """The connection is gone: drop channel state (never block, never raise)."""

    async def _restore(self) -> None:
        """The link is up again and the topology declared: reopen channels, re-attach."""
