"""The IO thread's fast paths (``mqkit._sync.transport``): work run in place while it waits,
wakes deferred until it waits, a socket's reads taken by the thread waiting for an answer.

They rely on pika internals: ``pyproject.toml`` pins pika to the versions these tests passed
on, and the first two tests fail loudly if the installed pika is another or renamed them.
"""

from __future__ import annotations

import collections
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from pika.adapters.select_connection import EPollPoller, IOLoop, _PollerBase

from mqkit._sync.transport import IOThread, Loop, Reads, wake


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


@pytest.fixture
def io() -> Iterator[IOThread]:
    thread = IOThread(name="mqkit-io-test")
    thread.start()
    wait_for(lambda: thread.loop.waiting, "the IO thread to wait for I/O")
    try:
        yield thread
    finally:
        thread.stop(5.0)


PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_installed_pika_is_one_pyproject_pins() -> None:
    match = re.search(r'^\s*"pika(?P<spec>[^"]+)"', PYPROJECT.read_text(), re.MULTILINE)
    assert match, "pyproject.toml must pin pika: Client relies on its private ioloop state"
    pinned, installed = SpecifierSet(match["spec"]), version("pika")
    assert Version(installed) in pinned, (
        f"pika {installed} is installed, but pyproject.toml pins pika{pinned}: run "
        "tests/unit/test_io_thread.py on it and widen the pin only if it passes"
    )


def test_the_pika_internals_the_fast_paths_use_are_there() -> None:
    # If one of these fails, a pika release changed what mqkit._sync.transport relies on:
    # adapt it (or pin pika) before anything else.
    assert "_get_poller" in vars(IOLoop)
    assert "_create_poller" in vars(EPollPoller)
    assert "_dispatch_fd_events" in vars(_PollerBase)
    loop = Loop()
    try:
        assert loop.in_place  # Linux: epoll
        assert isinstance(loop._callbacks, collections.deque)  # type: ignore[attr-defined]
    finally:
        loop.close()


def test_run_here_runs_on_the_calling_thread_while_the_io_thread_waits(io: IOThread) -> None:
    ran: list[threading.Thread] = []

    def work() -> bool:
        ran.append(threading.current_thread())
        assert io.loop.lock.locked()  # the IO thread is held off meanwhile
        return True

    assert io.loop.run_here(work)
    assert ran == [threading.current_thread()]
    assert not io.loop.lock.locked()


def test_run_here_says_what_the_function_said(io: IOThread) -> None:
    assert io.loop.run_here(lambda: False) is False


def test_run_here_declines_while_the_io_thread_is_busy(io: IOThread) -> None:
    busy, release = threading.Event(), threading.Event()
    ran: list[bool] = []

    def record() -> bool:
        ran.append(True)
        return True

    def block() -> None:
        busy.set()
        release.wait(5)

    io.submit(block)
    assert busy.wait(5)
    try:
        assert not io.loop.run_here(record)
        assert not ran
    finally:
        release.set()
    wait_for(lambda: io.loop.waiting, "the IO thread to wait again")
    assert io.loop.run_here(record)
    assert ran == [True]


def test_run_here_declines_while_work_is_queued_so_it_stays_in_order() -> None:
    loop = Loop()  # not running: stand in for an IO thread that was woken but not yet run
    try:
        loop.waiting = True
        loop.add_callback_threadsafe(lambda: None)
        ran: list[bool] = []

        def record() -> bool:
            ran.append(True)
            return True

        assert not loop.run_here(record)
        assert not ran
    finally:
        loop.close()


def test_run_here_declines_when_no_io_thread_waits() -> None:
    loop = Loop()  # never started (or stopped): nobody would read the answers
    try:
        assert not loop.run_here(lambda: True)
    finally:
        loop.close()


def test_run_here_logs_what_the_function_raised(
    io: IOThread, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="mqkit.connection"):
        assert io.loop.run_here(broken)  # done, as on the IO thread
    assert "run in place" in caplog.text and "boom" in caplog.text
    assert not io.loop.lock.locked()


def test_wake_on_another_thread_runs_at_once() -> None:
    woken: list[bool] = []
    wake(lambda: woken.append(True))
    assert woken == [True]


def test_wake_on_the_io_thread_waits_until_it_waits_for_io(io: IOThread) -> None:
    order: list[str] = []
    done = threading.Event()

    def woken() -> None:
        order.append("woken")
        done.set()

    def on_io_thread() -> None:
        wake(woken)
        order.append("callback finished")

    io.submit(on_io_thread)
    assert done.wait(5)
    assert order == ["callback finished", "woken"]


def test_wakes_still_pending_run_when_the_io_thread_stops() -> None:
    io = IOThread(name="mqkit-io-test")
    io.start()
    woken = threading.Event()

    def wake_then_stop() -> None:
        wake(woken.set)
        io.loop.stop()

    io.submit(wake_then_stop)
    assert woken.wait(5)
    io.stop(5.0)


# ---------------------------------------------------------------------------- Reads


class _Socket:
    """A socket pair; the IO thread's loop watches ``ours`` and records who read what."""

    def __init__(self, io: IOThread) -> None:
        self.ours, self.peer = socket.socketpair()
        self.ours.setblocking(False)
        self.fd = self.ours.fileno()
        self.read: list[tuple[str, bytes]] = []
        self.broken = False  # reading raises
        watching = threading.Event()

        def watch() -> None:
            io.loop.add_handler(self.fd, self._on_readable, io.loop.READ)  # type: ignore[arg-type]
            watching.set()

        io.submit(watch)
        assert watching.wait(5)
        wait_for(lambda: io.loop.waiting, "the IO thread to wait for I/O")

    def _on_readable(self, fd: int, events: int) -> None:
        if self.broken:
            raise RuntimeError("boom")
        self.read.append((threading.current_thread().name, self.ours.recv(4096)))

    def readers(self) -> list[str]:
        return [name for name, _ in self.read]

    def close(self) -> None:
        self.ours.close()
        self.peer.close()


@pytest.fixture
def sock(io: IOThread) -> Iterator[_Socket]:
    made = _Socket(io)
    try:
        yield made
    finally:
        made.close()


def take(io: IOThread, reads: Reads) -> bool:
    taken: list[bool] = []

    def take_here() -> bool:
        taken.append(reads.take())
        return True

    assert io.loop.run_here(take_here)
    return taken == [True]


def test_a_thread_that_took_the_reads_reads_its_answer_itself(io: IOThread, sock: _Socket) -> None:
    reads = Reads(io.loop, sock.fd)
    assert take(io, reads)
    assert not take(io, Reads(io.loop, sock.fd))  # one thread at a time
    sock.peer.send(b"answer")
    reads.wait(lambda: bool(sock.read), time.monotonic() + 5)
    assert sock.read == [(threading.current_thread().name, b"answer")]
    # Given back: the IO thread reads again.
    sock.peer.send(b"later")
    wait_for(lambda: len(sock.read) == 2, "the IO thread to read")
    assert sock.read[1] == ("mqkit-io-test", b"later")


def test_what_the_io_thread_saw_before_the_take_is_left_to_the_taker(
    io: IOThread, sock: _Socket
) -> None:
    reads = Reads(io.loop, sock.fd)
    poller = io.loop.poller
    assert poller is not None

    def take_then_dispatch_stale_readiness() -> bool:
        assert reads.take()
        poller._dispatch_fd_events({sock.fd: io.loop.READ})  # what epoll said before the take
        return True

    assert io.loop.run_here(take_then_dispatch_stale_readiness)
    sock.peer.send(b"answer")
    reads.wait(lambda: bool(sock.read), time.monotonic() + 5)
    assert sock.readers() == [threading.current_thread().name]


def test_waiting_with_the_reads_ends_at_the_deadline_and_gives_them_back(
    io: IOThread, sock: _Socket
) -> None:
    reads = Reads(io.loop, sock.fd)
    assert take(io, reads)
    started = time.monotonic()
    reads.wait(lambda: False, started + 0.2)
    assert 0.2 <= time.monotonic() - started < 2
    sock.peer.send(b"later")
    wait_for(lambda: bool(sock.read), "the IO thread to read")
    assert sock.readers() == ["mqkit-io-test"]


def test_waiting_with_the_reads_stops_when_the_socket_is_closed(
    io: IOThread, sock: _Socket
) -> None:
    reads = Reads(io.loop, sock.fd)
    assert take(io, reads)
    io.submit(lambda: io.loop.remove_handler(sock.fd))  # type: ignore[arg-type]
    started = time.monotonic()
    reads.wait(lambda: False, started + 10)
    assert time.monotonic() - started < 2  # not until the deadline
    assert io.loop.epoll is not None and sock.fd not in io.loop.epoll.taken


def test_waiting_with_the_reads_never_outlasts_a_busy_io_thread_past_the_deadline(
    io: IOThread, sock: _Socket
) -> None:
    reads = Reads(io.loop, sock.fd)
    assert take(io, reads)
    busy, release = threading.Event(), threading.Event()

    def block() -> None:
        busy.set()
        release.wait(10)

    io.submit(block)
    assert busy.wait(5)
    try:
        sock.peer.send(b"answer")
        started = time.monotonic()
        reads.wait(lambda: bool(sock.read), started + 0.3)
        assert time.monotonic() - started < 2 and not sock.read  # it holds the loop's lock
    finally:
        release.set()
    wait_for(lambda: bool(sock.read), "the IO thread to read once free")
    assert sock.readers() == ["mqkit-io-test"]


def test_a_timer_started_in_place_wakes_the_io_thread_to_keep_its_time(io: IOThread) -> None:
    fired = threading.Event()
    started = time.monotonic()

    def start_timer() -> bool:
        io.loop.call_later(0.05, fired.set)
        return True

    # The IO thread waits up to 5 s at a time when nothing is due: without the wake-up the
    # timer would fire that late.
    assert io.loop.run_here(start_timer)
    assert fired.wait(5)
    assert time.monotonic() - started < 1


def test_an_error_while_reading_in_place_is_logged_and_the_reads_given_back(
    io: IOThread, sock: _Socket, caplog: pytest.LogCaptureFixture
) -> None:
    reads = Reads(io.loop, sock.fd)
    assert take(io, reads)
    sock.broken = True
    sock.peer.send(b"answer")
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="mqkit.connection"):
        reads.wait(lambda: False, started + 10)
        assert time.monotonic() - started < 2  # not until the deadline
        assert "reading in place" in caplog.text
        assert io.loop.epoll is not None and sock.fd not in io.loop.epoll.taken
        sock.broken = False  # given back: the IO thread reads what is left
        wait_for(lambda: bool(sock.read), "the IO thread to read")
    assert sock.readers() == ["mqkit-io-test"]
