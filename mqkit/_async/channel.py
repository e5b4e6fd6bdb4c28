"""Opening channels on the link, a channel for request/response work (declares, gets,
purges), and deliveries as the core sees them.

:class:`ChannelHandle` serialises its callers: one operation at a time runs on its channel,
which is opened when needed. If the broker closes the channel (a declare that conflicts, a
missing queue), the operation fails with the translated error and the next one gets a fresh
channel, so a conflict never poisons the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aio_pika.abc
import aiormq.abc
from pamqp import commands as spec

from mqkit import explain
from mqkit.messages import Incoming, to_datetime

from . import lenient
from .connection import AMQP_ERRORS, RPC_ERRORS, RPC_TIMEOUT, Link, describe, translate

__all__ = [
    "Channel",
    "ChannelHandle",
    "close_channel",
    "incoming_of",
    "open_channel",
    "open_underlay",
]

log = logging.getLogger("mqkit.connection")

T = TypeVar("T")
Channel = aiormq.abc.AbstractChannel  # the channel the shell drives (aiormq's)


def incoming_of(message: aiormq.abc.DeliveredMessage) -> Incoming:
    """An aiormq delivery (``Basic.Deliver`` or ``Basic.GetOk``) as an :class:`Incoming`."""
    props = message.header.properties
    method: Any = message.delivery
    return Incoming(
        body=message.body,
        delivery_tag=method.delivery_tag,
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        type=props.message_type,
        app_id=props.app_id,
        content_type=props.content_type,
        timestamp=to_datetime(props.timestamp),
        headers=lenient.encodable(props.headers) if props.headers else {},
        priority=props.priority,
        expiration=props.expiration,
        redelivered=bool(method.redelivered),
        exchange=method.exchange or "",
        routing_key=method.routing_key or "",
    )


async def open_channel(
    link: Link,
    *,
    confirms: bool = False,
    timeout: float | None = None,
    wait_ready: bool = True,
) -> aio_pika.abc.AbstractChannel:
    """A new aio-pika channel, within ``timeout`` seconds in all (default: up to
    ``connect_timeout`` for the link, then RPC_TIMEOUT for the broker to open it).

    ``wait_ready=False`` opens it on the current connection before the link counts as
    connected again (a part restoring itself after a reconnect).
    """
    link.require_open("open a channel")
    wait = link.settings.connect_timeout if timeout is None else timeout
    deadline = time.monotonic() + wait
    if wait_ready and not await link.wait_ready(wait):
        raise link.down_error("open a channel", wait)
    connection = link.connection
    if connection is None:
        raise explain.link_lost("open a channel", link.last_error or "connection closed")
    left = RPC_TIMEOUT if timeout is None else max(0.001, deadline - time.monotonic())
    left = min(left, RPC_TIMEOUT)
    try:
        channel = connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
        await asyncio.wait_for(channel.initialize(), left)
    except AMQP_ERRORS as exc:
        raise translate(exc, what="open a channel") from exc
    except asyncio.TimeoutError as exc:
        raise explain.no_answer("open a channel", left) from exc
    return channel


async def open_underlay(
    link: Link,
    *,
    confirms: bool = False,
    timeout: float | None = None,
    wait_ready: bool = True,
) -> Channel:
    """A new aiormq channel (the protocol object under an aio-pika channel): see
    :func:`open_channel`."""
    channel = await open_channel(link, confirms=confirms, timeout=timeout, wait_ready=wait_ready)
    return await channel.get_underlay_channel()


async def close_channel(
    channel: aio_pika.abc.AbstractChannel | Channel, timeout: float = 5.0
) -> None:
    """Close ``channel`` (unacked messages go back to their queue), waiting at most
    ``timeout`` seconds for the broker; never raises."""
    try:
        if not channel.is_closed:
            await asyncio.wait_for(channel.close(), timeout=timeout)
    except Exception as exc:  # it may already be gone with the connection
        log.debug("closing a channel failed: %s", describe(exc))


class ChannelHandle:
    """One channel, used by one task at a time; every call has a timeout.

    ``reopen=False`` is for work that holds unacked messages (a DLQ scan): if the channel is
    lost midway, later calls fail instead of acking a delivery tag of another channel.
    """

    def __init__(self, link: Link, *, reopen: bool = True) -> None:
        self._link = link
        self._reopen = reopen
        self._lock = asyncio.Lock()
        self._channel: Channel | None = None
        self._used = False

    async def run(
        self,
        op: Callable[[Channel], Awaitable[T]],
        *,
        what: str,
        wait_ready: bool = True,
        missing: str | None = None,
    ) -> T:
        """Run ``op(channel)`` and return what it returns. aiormq errors come back
        translated (a conflicting declare: TopologyError; ``missing``: the advice when the
        broker says NOT_FOUND); the channel they closed is replaced on the next call."""
        if wait_ready:  # not under the lock: a restore after a reconnect needs it
            timeout = self._link.settings.connect_timeout
            if not await self._link.wait_ready(timeout):
                raise self._link.down_error(what, timeout)
        async with self._lock:
            channel = await self._open(what)
            try:
                return await op(channel)
            except RPC_ERRORS as exc:
                self._channel = None  # a channel error closed it; the next call opens another
                raise translate(exc, what=what, missing=missing) from exc

    async def get(
        self, queue: str, *, what: str, missing: str | None = None
    ) -> aiormq.abc.DeliveredMessage | None:
        """``basic.get`` without auto-ack: a message (held until acked or the channel closes)
        or ``None`` when the queue is empty."""

        async def op(channel: Channel) -> aiormq.abc.DeliveredMessage | None:
            got = await channel.basic_get(queue, no_ack=False, timeout=RPC_TIMEOUT)
            return None if isinstance(got.delivery, spec.Basic.GetEmpty) else got

        return await self.run(op, what=what, missing=missing)

    async def ack(self, delivery_tag: int, *, what: str) -> None:
        """Acknowledge a message got on this channel."""

        async def op(channel: Channel) -> None:
            await channel.basic_ack(delivery_tag)

        await self.run(op, what=what)

    async def close(self) -> None:
        """Close the channel (unacked messages go back to their queue); never raises."""
        async with self._lock:
            channel, self._channel = self._channel, None
            if channel is not None and not self._link.closed:
                await close_channel(channel)

    async def _open(self, what: str) -> Channel:
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        if self._used and not self._reopen:
            raise explain.link_lost(what, "the channel was closed midway")
        self._channel = await open_underlay(self._link, wait_ready=False)
        self._used = True
        return self._channel
