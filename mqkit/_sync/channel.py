"""Opening channels on the link, a channel for request/response work (declares, gets,
purges), and deliveries as the core sees them.

:class:`ChannelHandle` serialises its callers: one operation at a time is handed to the IO
thread, which opens the channel when needed. If the broker closes the channel (a declare that
conflicts, a missing queue), the operation fails with the translated error and the next one
gets a fresh channel, so a conflict never poisons the client.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import pika.exceptions as pex
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from mqkit.errors import MqkitError
from mqkit.messages import Incoming, to_datetime

from .connection import Link, LinkDown, translate
from .io_thread import settle

__all__ = ["ChannelHandle", "Got", "incoming_of", "open_channel"]

T = TypeVar("T")
Got = tuple[Any, BasicProperties, bytes]  # (Basic.GetOk or Basic.Deliver, properties, body)


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


def open_channel(
    connection: SelectConnection,
    on_open: Callable[[Channel], None],
    on_close: Callable[[Channel, BaseException], None],
) -> None:
    """IO thread: open a channel; ``on_close(channel, reason)`` runs once it closes (a
    channel lost while opening goes with its connection: its parts hear ``_link_lost``)."""

    def opened(channel: Channel) -> None:
        _unwrapped(channel)
        channel.add_on_close_callback(on_close)
        on_open(channel)

    connection.channel(on_open_callback=opened)


# What opentelemetry-instrumentation-pika (and the like) put on a channel instance, over
# pika's own methods: mqkit's channels use pika's, so such instrumentation sees none of their
# traffic. Its spans would duplicate mqkit.observability.TracingMiddleware's, and made on the
# IO thread, outside the caller's trace, they would start new traces and overwrite the
# traceparent header mqkit's tracing writes (tests/integration/test_observability.py).
_INSTANCE_WRAPPED = ("basic_publish", "basic_consume")


def _unwrapped(channel: Channel) -> None:
    """Drop per-instance wrappers of pika's methods from ``channel`` (pika sets none)."""
    for name in _INSTANCE_WRAPPED:
        vars(channel).pop(name, None)


class ChannelHandle:
    """One channel, used by one thread at a time; every call waits with a timeout.

    ``reopen=False`` is for work that holds unacked messages (a DLQ scan): if the channel is
    lost midway, later calls fail instead of acking a delivery tag of another channel.
    """

    def __init__(self, link: Link, *, reopen: bool = True) -> None:
        self._link = link
        self._reopen = reopen
        self._lock = threading.Lock()
        self._channel: Channel | None = None  # IO thread
        self._used = False
        self._current: Future[Any] | None = None
        self._get: Future[Got | None] | None = None

    def run(
        self,
        op: Callable[[Channel, Future[T]], None],
        *,
        what: str,
        timeout: float | None = None,
        wait_ready: bool = True,
        missing: str | None = None,
    ) -> T:
        """Run ``op(channel, future)`` on the IO thread; return what it settles ``future``
        with. pika errors come back translated (a conflicting declare: TopologyError;
        ``missing``: the advice when the broker says NOT_FOUND)."""
        settings = self._link.settings
        limit = timeout or max(settings.connect_timeout, settings.confirm_timeout)
        with self._lock:
            try:
                return self._link.call(
                    lambda connection, future: self._start(connection, op, future),
                    limit,
                    what=what,
                    wait_ready=wait_ready,
                )
            except (pex.AMQPError, LinkDown) as exc:
                raise translate(exc, what=what, missing=missing) from exc

    def get(self, queue: str, *, what: str, missing: str | None = None) -> Got | None:
        """``basic.get`` without auto-ack: a message (held until acked or the channel closes)
        or ``None`` when the queue is empty."""

        def op(channel: Channel, future: Future[Got | None]) -> None:
            self._get = future

            def got(_ch: Channel, method: Basic.GetOk, props: BasicProperties, body: bytes) -> None:
                self._get = None
                settle(future, (method, props, body))

            channel.basic_get(queue, got, auto_ack=False)

        return self.run(op, what=what, missing=missing)

    def ack(self, delivery_tag: int, *, what: str) -> None:
        """Acknowledge a message got on this channel."""

        def op(channel: Channel, future: Future[None]) -> None:
            channel.basic_ack(delivery_tag)
            settle(future)

        self.run(op, what=what)

    def close(self, timeout: float = 5.0) -> None:
        """Close the channel and wait for the broker (unacked messages go back to their
        queue); never raises."""
        if self._link.closed:
            return

        def op(_connection: SelectConnection, future: Future[None]) -> None:
            channel = self._channel
            if channel is None or not channel.is_open:
                settle(future)
                return
            self._current = future  # settled by _on_close once the broker said close-ok
            channel.close()

        with self._lock, contextlib.suppress(MqkitError, pex.AMQPError):
            self._link.call(op, timeout, what="close a channel", wait_ready=False)

    # -- IO thread -------------------------------------------------------------------------

    def _start(
        self,
        connection: SelectConnection,
        op: Callable[[Channel, Future[T]], None],
        future: Future[T],
    ) -> None:
        self._current = future
        channel = self._channel
        if channel is not None and channel.is_open:
            op(channel, future)
            return
        if self._used and not self._reopen:
            settle(future, exc=LinkDown("the channel was closed midway"))
            return
        self._used = True

        def on_open(channel: Channel) -> None:
            self._channel = channel
            channel.add_callback(self._on_get_empty, [Basic.GetEmpty], one_shot=False)
            try:
                op(channel, future)
            except Exception as exc:
                settle(future, exc=exc)

        open_channel(connection, on_open, self._on_close)

    def _on_get_empty(self, _frame: Any) -> None:
        future, self._get = self._get, None
        if future is not None:
            settle(future, None)

    def _on_close(self, channel: Channel, reason: BaseException) -> None:
        if channel is self._channel or self._channel is None:
            self._channel = None
        if self._current is not None:
            settle(self._current, exc=reason)
