"""The publishing connection's socket, read and written with fewer system calls than pika's.

:func:`streamline` changes three things on pika's plaintext transport of one connection, all
on the path of every confirmed publish:

- **Writes.** pika sends each frame of a publish (method, header, body) on its own, and only
  after asking the ioloop to wait until the socket is writable (two ``epoll_ctl`` and one
  ``epoll_wait`` around three ``send``). Here a publish is one write, sent at once when nothing
  waits before it; what the socket cannot take is queued behind, as pika does it. A batch is
  fewer writes still: between :func:`cork` and :func:`uncork` writes are held and then sent
  as one (the publisher sends a batch in slices of :data:`CORKED` messages).
- **Reads.** pika reads until the socket says it would block: after each confirm, one more
  ``recv`` that fails, and an exception caught in Python. Here a read that did not fill the
  buffer ends there; epoll (level-triggered) reports whatever comes after.
- **Confirms.** A read made only of ``basic.ack`` / ``basic.nack`` frames of one channel (what
  a publisher mostly gets) goes to the publisher's ``confirms`` function, not through pika's
  frame decoding and callback dispatch. Anything else (a partial frame, a return, a heartbeat,
  a close, or frames ``confirms`` declines) goes to pika whole, as before.

Everything runs where pika's own reading and writing would: on the IO thread, or on a thread
holding the IO loop's lock in its place (:mod:`mqkit._sync.io_thread`). It uses pika internals
(stable from pika 1.0 to 1.4): the plaintext transport's ``write``, ``_consume``, ``_sock``,
``_tx_buffers``, ``_protocol``, ``_state`` and read limits, and a connection's ``_transport``,
``_output_marshaled_frames``, ``_frame_buffer`` and byte and frame counts (which pika's
heartbeat checker reads). A connection without them (TLS, another pika) keeps pika's way:
:func:`streamline` returns ``False``. ``pyproject.toml`` pins pika to the versions
``tests/unit/test_transport.py`` passed on, and those tests fail loudly if they change.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

from pika.adapters.utils import io_services_utils

__all__ = ["CORKED", "Confirms", "cork", "streamline"]

Confirms = Callable[[int, list[tuple[int, bool, bool]]], bool]
"""``confirms(channel_number, [(delivery_tag, multiple, nacked), ...])``: handle them and
return ``True``, or return ``False`` (having handled none) to leave them to pika."""

_PLAINTEXT: Any = getattr(io_services_utils, "_AsyncPlaintextTransport", None)
_PARTS = ("_sock", "_tx_buffers", "_STATE_ACTIVE", "_MAX_RECV_BYTES", "_MAX_CONSUME_BYTES")

# A basic.ack or basic.nack frame: type 1 (method), channel, size 13, class 60 (basic),
# method 80 (ack) or 120 (nack), delivery tag, flags (bit 0: multiple), frame end 0xCE.
_CONFIRM = struct.Struct(">BHIHHQBB")
_CONFIRM_SIZE = _CONFIRM.size  # 21
_ACK, _NACK = 80, 120


def streamline(connection: Any, confirms: Confirms | None = None) -> bool:
    """IO thread: streamline pika's plaintext ``connection`` (see the module's docstring);
    ``confirms`` (or ``None``) takes the reads made of confirms from now on. ``False`` if its
    transport is not one that can. Call it again for each new channel: it only changes the
    ``confirms`` function on a connection already streamlined."""
    if getattr(connection, "_mqkit_streamlined", False):
        connection._mqkit_confirms = confirms
        return True
    transport: Any = getattr(connection, "_transport", None)
    if _PLAINTEXT is None or type(transport) is not _PLAINTEXT:
        return False
    parts: list[Any] = [getattr(transport, name, None) for name in _PARTS]
    end_of_file: Any = getattr(transport, "RxEndOfFile", None)
    emit: Any = getattr(connection, "_adapter_emit_data", None)
    if emit is None or end_of_file is None or any(part is None for part in parts):
        return False
    if not hasattr(connection, "_frame_buffer"):
        return False
    sock, buffered, active, recv_max, consume_max = parts
    queue_write: Callable[[bytes], None] = transport.write
    held: list[bytes] = []  # while corked: writes to send as one
    corked = [False]

    def write(data: bytes) -> None:
        if corked[0]:
            held.append(data)
            return
        if not buffered and transport._state == active:
            try:
                sent = sock.send(data)
            except OSError:  # would block, or failed: pika's writer meets the error and aborts
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        queue_write(data)

    def output_frames(frames: Sequence[bytes]) -> None:
        if not frames:
            return
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        connection.bytes_sent += len(data)
        connection.frames_sent += len(frames)
        emit(data)

    def consume() -> None:
        # pika's _consume, ending after a read that did not fill the buffer. What it raises
        # (would block, end of file, a protocol error) pika's caller handles as its own.
        consumed = 0
        while transport._state == active and consumed < consume_max:
            data = sock.recv(recv_max)
            if not data:
                raise end_of_file()
            consumed += len(data)
            if not _took_confirms(connection, data):
                transport._protocol.data_received(data)
            if len(data) < recv_max:
                return

    def cork() -> None:
        corked[0] = True

    def uncork() -> None:
        corked[0] = False
        if held:
            data = held[0] if len(held) == 1 else b"".join(held)
            held.clear()
            write(data)

    transport.write = write
    transport._consume = consume
    connection._mqkit_cork = (cork, uncork)
    connection._output_marshaled_frames = output_frames
    connection._mqkit_confirms = confirms
    connection._mqkit_streamlined = True
    return True


# Messages of a batch sent as one write (about 16 KiB of small messages): enough to spare the
# system calls, few enough that the broker starts on the first ones at once.
CORKED = 64


def cork(connection: Any) -> Callable[[], None] | None:
    """Hold ``connection``'s writes (a streamlined one; else ``None``, nothing held): they go
    out as one write when the returned function is called."""
    pair = getattr(connection, "_mqkit_cork", None)
    if pair is None:
        return None
    pair[0]()
    uncork: Callable[[], None] = pair[1]
    return uncork


def _took_confirms(connection: Any, data: bytes) -> bool:
    """Whether ``data`` (read from ``connection``) was only confirms, handed to its
    ``confirms`` function, which took them; pika's byte and frame counts go up as if pika had
    read them."""
    confirms: Confirms | None = connection._mqkit_confirms
    if confirms is None or connection._frame_buffer or len(data) % _CONFIRM_SIZE:
        return False  # pika holds part of a frame: this continues it
    read = parse_confirms(data)
    if read is None or not confirms(*read):
        return False
    connection.bytes_received += len(data)
    connection.frames_received += len(data) // _CONFIRM_SIZE
    return True


def parse_confirms(data: bytes) -> tuple[int, list[tuple[int, bool, bool]]] | None:
    """``(channel_number, [(delivery_tag, multiple, nacked), ...])`` if ``data`` is whole
    ``basic.ack`` / ``basic.nack`` frames of one channel, else ``None``."""
    if not data or len(data) % _CONFIRM_SIZE:
        return None
    channel_number = -1
    read: list[tuple[int, bool, bool]] = []
    for offset in range(0, len(data), _CONFIRM_SIZE):
        kind, channel, size, cls, method, tag, flags, end = _CONFIRM.unpack_from(data, offset)
        if kind != 1 or size != 13 or cls != 60 or end != 0xCE or method not in (_ACK, _NACK):
            return None
        if channel != channel_number:
            if channel_number != -1:
                return None
            channel_number = channel
        read.append((tag, bool(flags & 1), method == _NACK))
    return channel_number, read
