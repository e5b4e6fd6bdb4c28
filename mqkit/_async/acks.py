"""Acknowledging one consumer channel's deliveries in batches.

Handled deliveries are acked as :class:`mqkit.acks.AckWindow` decides: the contiguous run
from the oldest unsettled one with one ``basic.ack(multiple=True)`` for a tag that is itself
unacked (never covering a delivery still in a handler), and the stragglers (finished out of
order by concurrent handlers) one by one. Delivery tags mean something only on their
channel, so an :class:`Acks` lives and dies with one channel; reports about a dead channel's
deliveries are dropped (the broker redelivers).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import aio_pika.abc
import aiormq.abc

from mqkit.acks import AckWindow

from .connection import AMQP_ERRORS, describe

__all__ = ["Acks"]

log = logging.getLogger("mqkit.consumer")

_SETTLE_ERRORS = AMQP_ERRORS


class Acks:
    """The deliveries of one channel: delivery tags are only meaningful on their channel, so
    everything about acking lives here and dies with the channel."""

    __slots__ = ("alive", "lock", "owner", "tag", "underlay", "window")

    def __init__(
        self, owner: aio_pika.abc.AbstractChannel, underlay: aiormq.abc.AbstractChannel
    ) -> None:
        self.owner = owner
        self.underlay = underlay
        self.tag = f"mqkit.{uuid.uuid4().hex[:12]}"
        self.alive = True
        # The consumer records deliveries (window.delivered) and finished handlers
        # (window.finished) here directly: one call per delivery, no frame.
        self.window = AckWindow()
        # Settling frames must reach the wire in the order they were decided: a multiple ack
        # decided after a nack must not overtake it (it would ack the nacked tag).
        self.lock = asyncio.Lock()

    async def flush(self, *, everything: bool) -> None:
        """Ack the finished prefix with one ``multiple=True`` ack; with ``everything``, also
        the finished deliveries behind a still-running one, one by one."""
        if not self.window.waiting():
            return
        async with self.lock:
            last, singles = self.window.take(everything=everything)
            if not self.alive:
                return
            try:
                if last:
                    await self.underlay.basic_ack(last, multiple=True, wait=False)
                for tag in singles:  # finished out of order: one by one
                    await self.underlay.basic_ack(tag, wait=False)
            except _SETTLE_ERRORS as exc:  # the broker redelivers what we could not ack
                log.debug("ack failed: %s", describe(exc))

    async def nack(self, tag: int, *, requeue: bool = True) -> None:
        """Return one delivery to its queue; ``requeue=False``: reject it (the broker
        dead-letters it by the queue's DLX, or drops it if the queue has none)."""
        async with self.lock:
            if not self.window.returned(tag):
                return
            if self.alive:
                try:
                    await self.underlay.basic_nack(tag, requeue=requeue, wait=False)
                except _SETTLE_ERRORS as exc:
                    log.debug("nack failed: %s", describe(exc))

    async def requeue_rest(self) -> None:
        """Return every delivery not settled yet (call after the last flush)."""
        async with self.lock:
            last = self.window.last_unsettled()
            if last and self.alive:
                try:
                    await self.underlay.basic_nack(last, multiple=True, requeue=True, wait=False)
                except _SETTLE_ERRORS as exc:
                    log.debug("nack failed: %s", describe(exc))
            self.window.clear()
