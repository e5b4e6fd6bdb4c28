"""Declaring topology, remembering it, and declaring it again after a reconnect.

Topology is data (:mod:`mqkit.topology`); this is the I/O. Declared entities are cached, so
declaring again costs nothing; the cache in declaration order is the client's ``topology``,
replayed on every new connection before consumers are restored (an exclusive queue of a
broadcast subscriber, for one, died with the old connection).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from mqkit import explain
from mqkit.declaring import DeclareMode, checks_only, missing_advice, use_existing
from mqkit.errors import ConnectionFailed, MqkitError, TopologyError
from mqkit.topology import Binding, Entity, Exchange, Queue, queue_arguments

from .channel import Channel, ChannelHandle
from .connection import RPC_TIMEOUT, Link

__all__ = ["Declarer"]

log = logging.getLogger("mqkit.topology")


class Declarer:
    """Declares on a control channel of the client's link (a
    :class:`~mqkit.shell.AsyncRestorable`: it declares everything again after a reconnect)."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self._settings = link.settings
        self._handle = ChannelHandle(link)
        self._declared: dict[Entity, None] = {}  # an ordered set
        self._existing: set[Entity] = set()  # found in another shape: checked, not declared
        self._lock = asyncio.Lock()

    @property
    def handle(self) -> ChannelHandle:
        """The control channel (for passive declares, purges)."""
        return self._handle

    @property
    def topology(self) -> tuple[Entity, ...]:
        """Everything declared so far, in order."""
        return tuple(self._declared)

    async def declare(self, entities: Iterable[Entity], *, force: bool = False) -> None:
        """Declare what is not declared yet (``force``: all of it), as ``settings.declare``
        says (:mod:`mqkit.declaring`); cache it for the replay. A conflict raises
        TopologyError."""
        todo = [entity for entity in entities if force or entity not in self._declared]
        if not todo:
            return
        timeout = self._settings.connect_timeout
        self._link.require_open("declare topology")
        if not await self._link.wait_ready(timeout):
            raise self._link.down_error("declare topology", timeout)
        async with self._lock:
            for entity in todo:
                if entity in self._declared and not force:
                    continue
                existing = await self._declare_entity(entity, wait_ready=True)
                self._declared[entity] = None
                if existing:
                    self._existing.add(entity)

    def forget(self, entities: Iterable[Entity]) -> None:
        """Stop re-declaring ``entities`` (temporary queues that went away)."""
        for entity in entities:
            self._declared.pop(entity, None)
            self._existing.discard(entity)

    async def _declare_entity(self, entity: Entity, *, wait_ready: bool) -> bool:
        """Declare (or check) ``entity``; ``True`` if it exists in a shape mqkit uses as it
        is rather than the one it declares."""
        mode = self._settings.declare
        known = entity in self._existing
        if checks_only(entity, mode, known=known):
            await self._declare_once(entity, passive=True, wait_ready=wait_ready, missing=mode)
            return known
        try:
            await self._declare_once(entity, passive=False, wait_ready=wait_ready)
        except TopologyError as exc:
            if not use_existing(entity, mode, exc.reply_code):
                raise
            await self._declare_once(entity, passive=True, wait_ready=wait_ready, missing=mode)
            log.warning(explain.using_existing(entity, exc))
            return True
        return False

    async def _declare_once(
        self,
        entity: Entity,
        *,
        passive: bool,
        wait_ready: bool,
        missing: DeclareMode | None = None,
    ) -> None:
        default_type = self._settings.queue_type

        async def op(channel: Channel) -> None:
            if isinstance(entity, Queue):
                if passive:
                    await channel.queue_declare(entity.name, passive=True, timeout=RPC_TIMEOUT)
                    return
                await channel.queue_declare(
                    entity.name,
                    durable=entity.durable,
                    exclusive=entity.exclusive,
                    auto_delete=entity.auto_delete,
                    arguments=queue_arguments(entity, default_type),
                    timeout=RPC_TIMEOUT,
                )
            elif isinstance(entity, Exchange):
                if passive:
                    await channel.exchange_declare(entity.name, passive=True, timeout=RPC_TIMEOUT)
                    return
                await channel.exchange_declare(
                    entity.name,
                    exchange_type=entity.type,
                    durable=entity.durable,
                    auto_delete=entity.auto_delete,
                    timeout=RPC_TIMEOUT,
                )
            elif isinstance(entity, Binding):
                await channel.queue_bind(
                    entity.queue,
                    entity.exchange,
                    routing_key=entity.routing_key,
                    timeout=RPC_TIMEOUT,
                )
            else:  # pragma: no cover - guarded by the type
                raise TypeError(f"cannot declare {entity!r}")

        await self._handle.run(
            op,
            what=explain.declaring(entity, passive=passive),
            wait_ready=wait_ready,
            missing=missing_advice(entity, missing) if missing else None,
        )

    # -- Restorable --------------------------------------------------------------------------

    def _link_lost(self, reason: BaseException) -> None:
        """Nothing to do: the control channel is reopened on next use."""

    async def _restore(self) -> None:
        """Declare everything again on the new connection (a conflict is logged, not fatal)."""
        for entity in self.topology:
            try:
                if await self._declare_entity(entity, wait_ready=False):
                    self._existing.add(entity)
            except ConnectionFailed:
                raise
            except MqkitError as exc:
                log.error("could not re-declare after reconnecting: %s", exc)
