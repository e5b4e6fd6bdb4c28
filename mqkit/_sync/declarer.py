"""Declaring topology, remembering it, and declaring it again after a reconnect.

Topology is data (:mod:`mqkit.topology`); this is the I/O. Declared entities are cached, so
declaring again costs nothing; the cache in declaration order is the client's ``topology``,
replayed on every new connection before consumers are restored (an exclusive queue of a
broadcast subscriber, for one, died with the old connection).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

from pika.channel import Channel
from pika.exchange_type import ExchangeType

from mqkit import explain
from mqkit._sync.channel import ChannelHandle
from mqkit._sync.connection import Link
from mqkit._sync.io_thread import settle
from mqkit.errors import ConnectionFailed, MqkitError
from mqkit.settings import Settings
from mqkit.topology import Binding, Entity, Exchange, Queue, queue_arguments

__all__ = ["Declarer"]

log = logging.getLogger("mqkit")


class Declarer:
    """Declares on a control channel of the client's link (a :class:`Component`)."""

    def __init__(self, link: Link, settings: Settings) -> None:
        self._link = link
        self._settings = settings
        self._handle = ChannelHandle(link)
        self._declared: dict[Entity, None] = {}  # an ordered set
        self._lock = threading.Lock()

    @property
    def handle(self) -> ChannelHandle:
        """The control channel (for passive declares, purges)."""
        return self._handle

    @property
    def topology(self) -> tuple[Entity, ...]:
        """Everything declared so far, in order."""
        with self._lock:
            return tuple(self._declared)

    def declare(self, *entities: Entity, again: bool = False) -> None:
        """Declare what is not declared yet (``again``: all of it); a conflict raises
        TopologyError."""
        for entity in entities:
            if entity in self._declared and not again:
                continue
            self._declare(entity, wait_ready=True)
            with self._lock:
                self._declared[entity] = None

    def forget(self, *entities: Entity) -> None:
        """Stop re-declaring ``entities`` (temporary queues that went away)."""
        with self._lock:
            for entity in entities:
                self._declared.pop(entity, None)

    def _declare(self, entity: Entity, *, wait_ready: bool) -> None:
        default_type = self._settings.queue_type

        def op(channel: Channel, future: Future[None]) -> None:
            def done(_frame: object) -> None:
                settle(future)

            if isinstance(entity, Queue):
                channel.queue_declare(
                    entity.name,
                    durable=entity.durable,
                    exclusive=entity.exclusive,
                    auto_delete=entity.auto_delete,
                    arguments=queue_arguments(entity, default_type),
                    callback=done,
                )
            elif isinstance(entity, Exchange):
                channel.exchange_declare(
                    entity.name,
                    exchange_type=ExchangeType(entity.type),
                    durable=entity.durable,
                    auto_delete=entity.auto_delete,
                    callback=done,
                )
            elif isinstance(entity, Binding):
                channel.queue_bind(
                    entity.queue, entity.exchange, routing_key=entity.routing_key, callback=done
                )
            else:  # pragma: no cover - guarded by the type
                raise TypeError(f"cannot declare {entity!r}")

        self._handle.run(op, what=explain.declaring(entity), wait_ready=wait_ready)

    # -- Component ---------------------------------------------------------------------------

    def _link_lost(self, reason: BaseException) -> None:
        """Nothing to do: the control channel is reopened on next use."""

    def _restore(self) -> None:
        """Declare everything again on the new connection (a conflict is logged, not fatal)."""
        for entity in self.topology:
            try:
                self._declare(entity, wait_ready=False)
            except ConnectionFailed:
                raise
            except MqkitError as exc:
                log.error("mqkit: could not re-declare after reconnecting: %s", exc)
