"""Opening channels on the link, a channel for request/response work (declares, gets,
purges), and deliveries as the core sees them.

:class:`Channel` lets any thread but the IO thread drive a pika channel the way the asyncio
shell drives an aiormq channel: the same method names and arguments, each call handed to the
IO thread and waited for. So the parts that open a channel and talk to the broker on it
(declaring, consuming, RPC replies, dead letters) are written the same on both runtimes.

:class:`ChannelHandle` serialises its callers: one operation at a time runs on its channel,
which is opened when needed. If the broker closes the channel (a declare that conflicts, a
missing queue), the operation fails with the translated error and the next one gets a fresh
channel, so a conflict never poisons the client.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import pika.channel
from pika.adapters.select_connection import SelectConnection
from pika.spec import BasicProperties

from mqkit import explain
from mqkit.messages import Incoming, to_datetime

from .connection import RPC_ERRORS, RPC_TIMEOUT, Link, describe, translate
from .transport import Channel, Got, settle, unwrapped

__all__ = [
    "Channel",
    "ChannelHandle",
    "Got",
    "close_channel",
    "incoming_of",
    "open_channel",
    "open_on_io_thread",
]

log = logging.getLogger("mqkit.connection")

T = TypeVar("T")


def incoming_of(method: Any, props: BasicProperties, body: bytes) -> Incoming:
    """A pika delivery (``Basic.Deliver`` or ``Basic.GetOk``) as an :class:`Incoming`."""
    return Incoming(
        body=body,
        delivery_tag=method.delivery_tag,
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        type=props.type,
        app_id=props.app_id,
        content_type=props.content_type,
        timestamp=to_datetime(props.timestamp),
        headers=dict(props.headers) if props.headers else {},
        priority=props.priority,
        expiration=props.expiration,
        redelivered=bool(method.redelivered),
        exchange=method.exchange or "",
        routing_key=method.routing_key or "",
    )


def open_channel(link: Link, *, timeout: float | None = None, wait_ready: bool = True) -> Channel:
    """A new channel, within ``timeout`` seconds in all (default: up to ``connect_timeout``
    for the link, then RPC_TIMEOUT for the broker to open it).

    ``wait_ready=False`` opens it on the current connection before the link counts as
    connected again (a part restoring itself after a reconnect).
    """
    link.ensure_open()
    wait = link.settings.connect_timeout if timeout is None else timeout
    deadline = time.monotonic() + wait
    if wait_ready and not link.wait_ready(wait):
        raise link.down_error("open a channel", wait)
    left = RPC_TIMEOUT if timeout is None else max(0.001, deadline - time.monotonic())
    left = min(left, RPC_TIMEOUT)

    def start(connection: SelectConnection, future: Future[Channel]) -> None:
        def opened(underlay: pika.channel.Channel) -> None:
            settle(future, Channel(link.submit, underlay))

        connection.channel(on_open_callback=opened)

    return link.call(start, left, what="open a channel", wait_ready=False)


def close_channel(channel: Channel, timeout: float = 5.0) -> None:
    """Close ``channel`` (unacked messages go back to their queue), waiting at most
    ``timeout`` seconds for the broker; never raises."""
    try:
        if not channel.is_closed:
            channel.close(timeout=timeout)
    except Exception as exc:  # it may already be gone with the connection
        log.debug("closing a channel failed: %s", describe(exc))


def open_on_io_thread(
    connection: SelectConnection,
    on_open: Callable[[pika.channel.Channel], None],
    on_close: Callable[[pika.channel.Channel, BaseException], None],
) -> None:
    """IO thread: open a channel; ``on_close(channel, reason)`` runs once it closes (a
    channel lost while opening goes with its connection: its parts hear ``_link_lost``)."""

    def opened(channel: pika.channel.Channel) -> None:
        unwrapped(channel)
        channel.add_on_close_callback(on_close)
        on_open(channel)

    connection.channel(on_open_callback=opened)


class ChannelHandle:
    """One channel, used by one thread at a time; every call has a timeout.

    ``reopen=False`` is for work that holds unacked messages (a DLQ scan): if the channel is
    lost midway, later calls fail instead of acking a delivery tag of another channel.
    """

    def __init__(self, link: Link, *, reopen: bool = True) -> None:
        self._link = link
        self._reopen = reopen
        self._lock = threading.Lock()
        self._channel: Channel | None = None
        self._used = False

    def run(
        self,
        op: Callable[[Channel], T],
        *,
        what: str,
        wait_ready: bool = True,
        missing: str | None = None,
    ) -> T:
        """Run ``op(channel)`` and return what it returns. pika errors come back
        translated (a conflicting declare: TopologyError; ``missing``: the advice when the
        broker says NOT_FOUND); the channel they closed is replaced on the next call."""
        if wait_ready:  # not under the lock: a restore after a reconnect needs it
            timeout = self._link.settings.connect_timeout
            if not self._link.wait_ready(timeout):
                raise self._link.down_error(what, timeout)
        with self._lock:
            channel = self._open(what)
            try:
                return op(channel)
            except RPC_ERRORS as exc:
                self._channel = None  # a channel error closed it; the next call opens another
                raise translate(exc, what=what, missing=missing) from exc

    def get(self, queue: str, *, what: str, missing: str | None = None) -> Got | None:
        """``basic.get`` without auto-ack: a message (held until acked or the channel closes)
        or ``None`` when the queue is empty."""

        def op(channel: Channel) -> Got | None:
            return channel.basic_get(queue, no_ack=False, timeout=RPC_TIMEOUT)

        return self.run(op, what=what, missing=missing)

    def ack(self, delivery_tag: int, *, what: str) -> None:
        """Acknowledge a message got on this channel."""

        def op(channel: Channel) -> None:
            channel.basic_ack(delivery_tag)

        self.run(op, what=what)

    def close(self) -> None:
        """Close the channel (unacked messages go back to their queue); never raises."""
        with self._lock:
            channel, self._channel = self._channel, None
            if channel is not None and not self._link.closed:
                close_channel(channel)

    def _open(self, what: str) -> Channel:
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        if self._used and not self._reopen:
            raise explain.link_lost(what, "the channel was closed midway")
        self._channel = open_channel(self._link, wait_ready=False)
        self._used = True
        return self._channel
