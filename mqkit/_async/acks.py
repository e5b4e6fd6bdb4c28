"""Acknowledging one consumer channel's deliveries in batches.

Handled deliveries are acked as the contiguous run from the oldest unsettled one, with one
``basic.ack(multiple=True)`` for a tag that is itself unacked (never covering a delivery still
in a handler), and the stragglers (finished out of order by concurrent handlers) one by one.
Delivery tags mean something only on their channel, so an :class:`Acks` lives and dies with
one channel; reports about a dead channel's deliveries are dropped (the broker redelivers).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque

import aio_pika.abc
import aiormq.abc

from .connection import AMQP_ERRORS, describe

__all__ = ["Acks"]

log = logging.getLogger("mqkit")

_SETTLE_ERRORS = AMQP_ERRORS


class Acks:
    """The deliveries of one channel: delivery tags are only meaningful on their channel, so
    everything about acking lives here and dies with the channel."""

    __slots__ = ("alive", "finished", "lock", "owner", "tag", "underlay", "unsettled")

    def __init__(
        self, owner: aio_pika.abc.AbstractChannel, underlay: aiormq.abc.AbstractChannel
    ) -> None:
        self.owner = owner
        self.underlay = underlay
        self.tag = f"mqkit.{uuid.uuid4().hex[:12]}"
        self.alive = True
        self.unsettled: deque[int] = deque()  # delivered, not acked/nacked, in tag order
        self.finished: set[int] = set()  # handled, waiting for their ack
        # Settling frames must reach the wire in the order they were decided: a multiple ack
        # decided after a nack must not overtake it (it would ack the nacked tag).
        self.lock = asyncio.Lock()

    async def flush(self, *, everything: bool) -> None:
        """Ack the finished prefix with one ``multiple=True`` ack; with ``everything``, also
        the finished deliveries behind a still-running one, one by one."""
        if not self.finished:
            return
        async with self.lock:
            unsettled, finished = self.unsettled, self.finished
            last = 0
            while unsettled and unsettled[0] in finished:
                last = unsettled.popleft()
                finished.discard(last)
            singles: list[int] = []
            if everything and finished:
                singles = sorted(finished)
                finished.clear()
                for tag in singles:
                    unsettled.remove(tag)
            if not self.alive:
                return
            try:
                if last:
                    await self.underlay.basic_ack(last, multiple=True, wait=False)
                for tag in singles:
                    await self.underlay.basic_ack(tag, wait=False)
            except _SETTLE_ERRORS as exc:  # the broker redelivers what we could not ack
                log.debug("mqkit: ack failed: %s", describe(exc))

    async def nack(self, tag: int) -> None:
        """Return one delivery to its queue."""
        async with self.lock:
            try:
                self.unsettled.remove(tag)
            except ValueError:
                return
            self.finished.discard(tag)
            if self.alive:
                try:
                    await self.underlay.basic_nack(tag, requeue=True, wait=False)
                except _SETTLE_ERRORS as exc:
                    log.debug("mqkit: nack failed: %s", describe(exc))

    async def requeue_rest(self) -> None:
        """Return every delivery not settled yet (call after the last flush)."""
        async with self.lock:
            if self.unsettled and self.alive:
                try:
                    await self.underlay.basic_nack(
                        self.unsettled[-1], multiple=True, requeue=True, wait=False
                    )
                except _SETTLE_ERRORS as exc:
                    log.debug("mqkit: nack failed: %s", describe(exc))
            self.unsettled.clear()
            self.finished.clear()
