"""The publishing connection's socket (``mqkit._sync.transport``): writes sent at once in one
piece, reads that end short, confirms read without pika's frame machinery.

It relies on pika internals: ``pyproject.toml`` pins pika to the versions these tests passed
on, and the first test fails loudly if the installed pika renamed them.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pika.connection
import pytest
from pika import frame, spec
from pika.adapters.base_connection import BaseConnection
from pika.adapters.utils import io_services_utils

from mqkit._sync.transport import cork, parse_confirms, streamline


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_the_pika_internals_streamline_uses_are_there() -> None:
    # If one of these fails, a pika release changed what mqkit._sync.transport relies on:
    # adapt it (or pin pika) before anything else.
    assert "_output_marshaled_frames" in vars(pika.connection.Connection)
    assert "_adapter_emit_data" in vars(BaseConnection)
    transport = io_services_utils._AsyncPlaintextTransport  # type: ignore[attr-defined]
    assert "write" in vars(transport)
    base = set(vars(io_services_utils._AsyncTransportBase))  # type: ignore[attr-defined]
    assert {"_consume", "_STATE_ACTIVE", "_MAX_RECV_BYTES", "_MAX_CONSUME_BYTES"} <= base
    assert "RxEndOfFile" in base
    # Set on each connection by pika (Connection._init_connection_state).
    init = pika.connection.Connection._init_connection_state  # type: ignore[attr-defined]
    source = init.__code__.co_names
    assert {"_frame_buffer", "bytes_received", "frames_received"} <= set(source)


class _Services:
    """What pika's transport asks of the ioloop, recorded."""

    def __init__(self) -> None:
        self.writer: Callable[[], None] | None = None

    def set_reader(self, fd: int, callback: Callable[[], None]) -> None:
        pass

    def set_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self.writer = callback

    def remove_writer(self, fd: int) -> bool:
        self.writer = None
        return True


class _Connection:
    """The parts of a pika connection :func:`streamline` changes, around a real transport."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._frame_buffer = b""  # pika's: part of a frame read before
        self.bytes_sent = 0
        self.frames_sent = 0
        self.bytes_received = 0
        self.frames_received = 0
        self.emitted: list[bytes] = []

    def _adapter_emit_data(self, data: bytes) -> None:
        self.emitted.append(data)
        self._transport.write(data)

    def _output_marshaled_frames(self, frames: list[bytes]) -> None:
        raise AssertionError("replaced by streamline")


class _Protocol:
    """What pika's transport hands what it reads to, recorded."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.received.append(data)


@pytest.fixture
def wire() -> Iterator[tuple[_Connection, _Services, socket.socket]]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    services = _Services()
    transport = io_services_utils._AsyncPlaintextTransport(ours, _Protocol(), services)  # type: ignore[attr-defined]
    connection = _Connection(transport)
    try:
        yield connection, services, peer
    finally:
        ours.close()
        peer.close()


def read(peer: socket.socket, size: int) -> bytes:
    peer.settimeout(5)
    data = b""
    while len(data) < size:
        data += peer.recv(size - len(data))
    return data


def test_streamline_joins_a_publish_and_sends_it_without_the_ioloop(
    wire: tuple[_Connection, _Services, socket.socket],
) -> None:
    connection, services, peer = wire
    assert streamline(connection)
    assert streamline(connection)  # idempotent
    frames = [b"method", b"header", b"body"]
    connection._output_marshaled_frames(frames)
    assert connection.emitted == [b"methodheaderbody"]  # one write, so one TCP segment
    assert (connection.bytes_sent, connection.frames_sent) == (16, 3)
    assert services.writer is None  # sent: the ioloop was not asked to wait for writability
    assert read(peer, 16) == b"methodheaderbody"


def test_streamline_queues_what_the_socket_cannot_take_in_order(
    wire: tuple[_Connection, _Services, socket.socket],
) -> None:
    connection, services, peer = wire
    assert streamline(connection)
    big = bytes(range(256)) * 40_000  # more than a socket buffer holds
    connection._output_marshaled_frames([big])
    assert services.writer is not None  # the rest waits for the ioloop, as pika does it
    connection._output_marshaled_frames([b"after"])  # behind what is queued, not before
    received = b""
    peer.settimeout(5)
    while len(received) < len(big) + 5:
        received += peer.recv(1 << 20)
        if services.writer is not None:
            services.writer()  # the ioloop found the socket writable
    assert received == big + b"after"
    assert services.writer is None


class _CountingSocket:
    """A socket whose sends are counted."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sends = 0

    def send(self, data: bytes) -> int:
        self.sends += 1
        return self._sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_corked_writes_go_out_as_one(
    wire: tuple[_Connection, _Services, socket.socket],
) -> None:
    connection, _, peer = wire
    counting = _CountingSocket(connection._transport._sock)
    connection._transport._sock = counting
    assert streamline(connection)
    uncork = cork(connection)
    assert uncork is not None
    for name in (b"one", b"two", b"three"):
        connection._output_marshaled_frames([name, b"|"])
    assert counting.sends == 0  # held
    uncork()
    assert counting.sends == 1
    assert read(peer, 14) == b"one|two|three|"
    connection._output_marshaled_frames([b"lone"])  # uncorked: sent at once, as before
    assert counting.sends == 2 and read(peer, 4) == b"lone"
    assert cork(_Connection(None)) is None  # a connection that was not streamlined


def test_streamline_leaves_other_transports_to_pika() -> None:
    class Other:
        pass

    connection = _Connection(Other())
    assert not streamline(connection)
    assert not streamline(object())


def test_streamline_ends_a_read_that_did_not_fill_the_buffer(
    wire: tuple[_Connection, _Services, socket.socket],
) -> None:
    connection, _services, peer = wire
    transport = connection._transport
    assert streamline(connection)
    protocol = transport._protocol
    peer.sendall(b"ack")
    wait_for(lambda: _readable(transport._sock), "the bytes to arrive")
    transport._consume()  # one read: pika would read again, and meet "would block"
    assert protocol.received == [b"ack"]
    big = b"x" * (transport._MAX_RECV_BYTES + 10)
    peer.sendall(big)
    wait_for(lambda: _readable(transport._sock), "the bytes to arrive")
    time.sleep(0.05)
    transport._consume()  # a full read reads on
    assert b"".join(protocol.received[1:]) == big


def test_streamline_reads_end_of_file_and_would_block_as_pika_does(
    wire: tuple[_Connection, _Services, socket.socket],
) -> None:
    connection, _services, peer = wire
    transport = connection._transport
    assert streamline(connection)
    with pytest.raises(BlockingIOError):  # a spurious wake-up: pika's caller ignores it
        transport._consume()
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(io_services_utils._AsyncTransportBase.RxEndOfFile):  # type: ignore[attr-defined]
        transport._consume()


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


# ---------------------------------------------------------------------------- confirms


def confirm(tag: int, *, channel: int = 1, multiple: bool = False, nack: bool = False) -> bytes:
    method = spec.Basic.Nack(tag, multiple) if nack else spec.Basic.Ack(tag, multiple)
    return frame.Method(channel, method).marshal()


def test_confirms_are_parsed_from_whole_ack_and_nack_frames_of_one_channel() -> None:
    data = confirm(1) + confirm(3, multiple=True) + confirm(4, nack=True)
    assert parse_confirms(data) == (1, [(1, False, False), (3, True, False), (4, False, True)])
    assert parse_confirms(confirm(7, channel=2)) == (2, [(7, False, False)])
    assert parse_confirms(confirm(1) + confirm(2, channel=2)) is None  # two channels
    assert parse_confirms(confirm(1)[:-1]) is None  # part of a frame
    assert parse_confirms(confirm(1)[:-1] + b"X") is None  # no frame end
    heartbeat = frame.Heartbeat().marshal()
    assert parse_confirms(confirm(1) + heartbeat) is None
    qos_ok = frame.Method(1, spec.Basic.QosOk()).marshal()
    assert parse_confirms(qos_ok * 3) is None
    assert parse_confirms(b"") is None
    # A 21-byte frame that is not a confirm (another class and method, same size).
    other = struct.pack(">BHIHHQBB", 1, 1, 13, 60, 81, 5, 0, 0xCE)
    assert parse_confirms(other) is None


def streamlined(
    wire: tuple[_Connection, _Services, socket.socket], takes: bool = True
) -> tuple[_Connection, list[tuple[int, list[tuple[int, bool, bool]]]], socket.socket]:
    connection, _services, peer = wire
    taken: list[tuple[int, list[tuple[int, bool, bool]]]] = []

    def confirms(channel: int, read: list[tuple[int, bool, bool]]) -> bool:
        if takes:
            taken.append((channel, read))
        return takes

    assert streamline(connection, confirms)
    return connection, taken, peer


def feed(connection: _Connection, peer: socket.socket, data: bytes) -> None:
    peer.sendall(data)
    wait_for(lambda: _readable(connection._transport._sock), "the bytes to arrive")
    time.sleep(0.02)  # all of them
    connection._transport._consume()


def test_a_read_of_confirms_goes_to_the_publisher_not_to_pika(
    wire: tuple[_Connection, _Services, socket.socket],
) -> None:
    connection, taken, peer = streamlined(wire)
    data = confirm(1) + confirm(2, multiple=True)
    feed(connection, peer, data)
    assert taken == [(1, [(1, False, False), (2, True, False)])]
    assert connection._transport._protocol.received == []
    # pika's counts (its heartbeat checker watches bytes_received) move as if it had read them
    assert (connection.bytes_received, connection.frames_received) == (len(data), 2)


def test_anything_else_goes_to_pika_whole(
    wire: tuple[_Connection, _Services, socket.socket],
) -> None:
    connection, taken, peer = streamlined(wire)
    protocol = connection._transport._protocol
    mixed = confirm(1) + frame.Heartbeat().marshal()
    feed(connection, peer, mixed)
    connection._frame_buffer = b"\x01"  # pika holds part of a frame: what comes continues it
    feed(connection, peer, confirm(2))
    assert taken == [] and protocol.received == [mixed, confirm(2)]
    assert connection.bytes_received == 0  # pika counts what it reads itself


def test_confirms_the_publisher_declines_go_to_pika(
    wire: tuple[_Connection, _Services, socket.socket],
) -> None:
    connection, _taken, peer = streamlined(wire, takes=False)  # another channel's
    feed(connection, peer, confirm(1, channel=5))
    assert connection._transport._protocol.received == [confirm(1, channel=5)]


def test_streamline_again_changes_who_takes_confirms(
    wire: tuple[_Connection, _Services, socket.socket],
) -> None:
    connection, taken, peer = streamlined(wire)
    assert streamline(connection, None)  # a new channel without a taker: pika reads them
    feed(connection, peer, confirm(1))
    assert taken == [] and connection._transport._protocol.received == [confirm(1)]
