"""An aio-pika connection that survives content headers pamqp cannot decode.

aiormq reads frames from an ``asyncio.StreamReader`` and has pamqp decode them; a content
header pamqp cannot decode (a timestamp beyond the year 9999, a message id that is not
UTF-8) ends the connection, on every redelivery. aiormq (>= 6.9) takes a
``transport_factory`` per connection: :func:`install` gives an aio-pika connection one whose
reader gets the socket's bytes through a :class:`FrameFilter`, which repairs content headers
with :func:`mqkit.wire.repair_frame` before aiormq reads them. Only mqkit's own connections
are made this way: pamqp, aiormq and asyncio are not patched, so other code in the process
keeps their behaviour.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import aio_pika
import aiormq
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

from mqkit.wire import FRAME_HEADER, PAMQP, repair_frame

__all__ = ["FrameFilter", "RepairingTransport", "encodable", "install", "supported"]

log = logging.getLogger("mqkit.wire")

_HEAD = 7  # frame type, channel, size


def supported() -> bool:
    """Whether this aiormq takes a ``transport_factory`` (6.9 and later)."""
    return _SUPPORTED


_SUPPORTED = "transport_factory" in inspect.signature(aiormq.Connection.__init__).parameters
_warned = False


class FrameFilter:
    """Passes the bytes a transport feeds its reader on to ``feed``, content-header frames
    repaired: they are held until whole (they are small), every other byte passes at once.

    A chunk without a content header that needs repair is passed on as it is, uncopied;
    the per-chunk cost is a walk over the frame heads in it.
    """

    def __init__(self, feed: Callable[[bytes], None]) -> None:
        self._feed = feed
        self._pending = b""  # the start of a frame whose head or content header is split
        self._skip = 0  # bytes of the current frame that are passed on without a look

    def feed_data(self, data: bytes) -> None:
        data = bytes(data)
        if self._pending:
            data, self._pending = self._pending + data, b""
        elif self._skip >= len(data):  # inside a large frame (a body): pass it on
            self._skip -= len(data)
            self._feed(data)
            return
        out: list[bytes] = []
        start = 0  # where the run of bytes passed on unchanged starts
        pos = min(self._skip, len(data))  # the next frame's start
        self._skip -= pos
        end = len(data)
        while pos < end:
            if end - pos < _HEAD:
                break  # a split head: held until the rest comes
            if data[pos : pos + 4] == b"AMQP":  # the broker refused our protocol version
                pos += _HEAD + 1
                continue
            size = _HEAD + int.from_bytes(data[pos + 3 : pos + 7], "big") + 1
            if data[pos] != FRAME_HEADER:
                pos += size
                continue
            if pos + size > end:
                break  # a split content header: held until whole
            repaired = _repaired(data[pos : pos + size])
            if repaired is not None:
                out.append(data[start:pos])
                out.append(repaired)
                start = pos + size
            pos += size
        if pos > end:  # the last frame goes on in the next chunk
            self._skip = pos - end
        elif pos < end:
            self._pending = data[pos:]
            end = pos
        if not out:
            if start < end:
                self._feed(data if end == len(data) else data[:end])
            return
        out.append(data[start:end])
        self._feed(b"".join(out))


def _repaired(frame: bytes) -> bytes | None:
    repaired = repair_frame(frame, PAMQP)
    if repaired is None:
        return None
    fixed, channel, repair = repaired
    log.warning(
        "message %s on channel %d: %s; delivering it with what could be decoded",
        repair.message_id,
        channel,
        "; ".join(repair.changes),
    )
    return fixed


class RepairingTransport(TransportFactory):
    """aiormq's TCP or TLS transport, its reader fed through a :class:`FrameFilter`."""

    def __init__(self, inner: TransportFactory) -> None:
        self._inner = inner

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self._inner.create(url, **kwargs)
        # The transport's protocol hands each chunk to reader.feed_data: this reader's (and
        # only this reader's) goes through the filter first.
        reader.feed_data = FrameFilter(reader.feed_data).feed_data  # type: ignore[method-assign,assignment]
        return reader, writer


def install(connection: aio_pika.Connection, url: str) -> bool:
    """Make ``connection`` (not connected yet) repair content headers; whether it could
    (an aiormq older than 6.9 cannot)."""
    if not supported():
        global _warned
        if not _warned:
            _warned = True
            log.warning(
                "aiormq %s takes no transport_factory: a message whose content header pamqp "
                "cannot decode (a timestamp beyond the year 9999) will cost the connection; "
                "upgrade aiormq to 6.9 or later",
                version("aiormq"),
            )
        return False
    inner = TLSTransportFactory() if URL(url).scheme == "amqps" else TCPTransportFactory()
    connection.kwargs["transport_factory"] = RepairingTransport(inner)
    return True


def encodable(headers: dict[str, Any]) -> dict[str, Any]:
    """``headers`` as pamqp decoded them, made such that pamqp can encode them again (for a
    retry or dead-letter copy): ``bytes``, its value for a long string that is not UTF-8,
    becomes ``bytearray``, its value for a byte array. The same dict when nothing changes."""
    for value in headers.values():
        kind = type(value)
        if kind is bytes or ((kind is dict or kind is list) and _has_bytes(value)):
            return {key: _bytes_to_bytearray(value) for key, value in headers.items()}
    return headers


def _has_bytes(value: Any) -> bool:
    if isinstance(value, bytes):
        return True
    if isinstance(value, dict):
        return any(_has_bytes(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_bytes(v) for v in value)
    return False


def _bytes_to_bytearray(value: Any) -> Any:
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {k: _bytes_to_bytearray(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bytes_to_bytearray(v) for v in value]
    return value
