"""An aio-pika connection that survives content headers pamqp cannot decode.

aiormq reads frames from an ``asyncio.StreamReader`` and has pamqp decode them; a content
header pamqp cannot decode (a timestamp beyond the year 9999, a message id that is not
UTF-8) ends the connection, on every redelivery. aiormq (>= 6.9) takes a
``transport_factory`` per connection: :func:`install` gives an aio-pika connection one whose
reader hands aiormq whole frames, content headers repaired by :func:`mqkit.wire.repair_frame`
first. Only mqkit's own connections are made this way: pamqp and aiormq are not patched, so
other code in the process keeps their behaviour.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from typing import Any

import aio_pika
import aiormq
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

from mqkit.wire import FRAME_HEADER, PAMQP, repair_frame

__all__ = ["RepairingReader", "RepairingTransport", "encodable", "install", "supported"]

log = logging.getLogger("mqkit.wire")

_HEAD = 7  # frame type, channel, size


def supported() -> bool:
    """Whether this aiormq takes a ``transport_factory`` (6.9 and later)."""
    return _SUPPORTED


_SUPPORTED = "transport_factory" in inspect.signature(aiormq.Connection.__init__).parameters
_warned = False


class RepairingReader:
    """The reader aiormq's frame receiver reads from: whole frames from ``inner``, content
    headers repaired. It offers what the receiver uses of an ``asyncio.StreamReader``:
    ``readexactly``, ``read`` and ``at_eof``."""

    def __init__(self, inner: asyncio.StreamReader) -> None:
        self._inner = inner
        self._chunks: deque[bytes] = deque()
        self._buffered = 0

    def at_eof(self) -> bool:
        return not self._buffered and self._inner.at_eof()

    async def read(self, n: int = -1) -> bytes:
        if self._buffered:
            return self._take(self._buffered if n < 0 else min(n, self._buffered))
        return await self._inner.read(n)

    async def readexactly(self, n: int) -> bytes:
        while self._buffered < n:
            await self._fill()
        return self._take(n)

    async def _fill(self) -> None:
        """Read one more frame (or the broker's protocol header) from ``inner``."""
        head = await self._inner.readexactly(_HEAD)
        if head[:4] == b"AMQP":  # the broker refused our protocol version: pass it on as is
            self._push(head)
            return
        rest = await self._inner.readexactly(int.from_bytes(head[3:7], "big") + 1)
        if head[0] == FRAME_HEADER:
            repaired = repair_frame(head + rest, PAMQP)
            if repaired is not None:
                frame, channel, repair = repaired
                log.warning(
                    "message %s on channel %d: %s; delivering it with what could be decoded",
                    repair.message_id,
                    channel,
                    "; ".join(repair.changes),
                )
                head, rest = frame[:_HEAD], frame[_HEAD:]
        self._push(head)
        self._push(rest)

    def _push(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)

    def _take(self, n: int) -> bytes:
        if n <= 0:
            return b""
        chunks = self._chunks
        self._buffered -= n
        first = chunks[0]
        if len(first) == n:  # the usual case: the receiver asks for what a chunk holds
            return chunks.popleft()
        if len(first) > n:
            chunks[0] = first[n:]
            return first[:n]
        parts = []
        while n:
            chunk = chunks.popleft()
            if len(chunk) > n:
                chunks.appendleft(chunk[n:])
                chunk = chunk[:n]
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)


class RepairingTransport(TransportFactory):
    """aiormq's TCP or TLS transport, its reader a :class:`RepairingReader`."""

    def __init__(self, inner: TransportFactory) -> None:
        self._inner = inner

    async def create(self, url: URL, **kwargs: Any) -> tuple[Any, asyncio.StreamWriter]:
        reader, writer = await self._inner.create(url, **kwargs)
        return RepairingReader(reader), writer


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
                getattr(aiormq, "__version__", "?"),
            )
        return False
    inner = TLSTransportFactory() if URL(url).scheme == "amqps" else TCPTransportFactory()
    connection.kwargs["transport_factory"] = RepairingTransport(inner)
    return True


def encodable(headers: dict[str, Any]) -> dict[str, Any]:
    """``headers`` as pamqp decoded them, made such that pamqp can encode them again (for a
    retry or dead-letter copy): ``bytes``, its value for a long string that is not UTF-8,
    becomes ``bytearray``, its value for a byte array. The same dict when nothing changes."""
    if not any(_has_bytes(value) for value in headers.values()):
        return headers
    return {key: _bytes_to_bytearray(value) for key, value in headers.items()}


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
