"""The IO thread: a pika ``IOLoop`` on a daemon thread of its own, and handing work to it.

pika is not thread-safe, so each client keeps every pika object behind one lock, its
:class:`Loop`'s, which the IO thread holds except while it waits for I/O. Other threads hand
it work: they :meth:`IOThread.submit` a function (pika's ``add_callback_threadsafe``, the one
thread-safe entry point) and wait on a ``concurrent.futures.Future`` that the function, or a
pika callback it registered, settles with :func:`settle`. A function that raises is logged,
never allowed to kill the thread.

**Running in place.** A hand-off costs thread switches: the IO thread wakes to run the
function, and later wakes the caller with its answer. On a latency-bound path (one confirmed
publish at a time) those switches, and the GIL passed back and forth with them, were most of
what a client cost on top of pika's own work. So a short function may also be run with
:meth:`Loop.run_here`: while the IO thread waits for I/O and nothing is queued for it, the
function runs at once on the calling thread, holding the loop's lock (the IO thread, should
it wake, waits for it); otherwise the caller submits it as usual. Either way one thread at a
time touches pika. :func:`mqkit._sync.transport.streamline` makes a connection send what it
writes at once, in one piece per publish, so such a function needs the IO thread for nothing
but the answer; and a
thread that sent in place can take that too: it takes the socket's reads from the IO thread
(:class:`Reads`) and reads its answer itself, so the answer wakes it and not the IO thread
that would wake it in turn. The IO thread, for its part, wakes a waiting thread (:func:`wake`)
once it has let go of the loop's lock, on its way to wait for I/O, not while it still runs
Python code: the woken thread finds the GIL and the loop free instead of waiting for them
and being woken a second time.

That uses pika internals (stable from pika 1.0 to 1.4): ``IOLoop._get_poller``,
``IOLoop._callbacks``, and ``EPollPoller._create_poller`` (so Linux's ``select.epoll``) and
``_dispatch_fd_events``. Where they are missing, work is handed over as before
(:attr:`Loop.in_place` is ``False``); ``pyproject.toml`` pins pika to the versions
``tests/unit/test_io_thread.py`` passed on, and those tests fail loudly if they change.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from pika.adapters.select_connection import EPollPoller, IOLoop

from mqkit.errors import ConnectionFailed

__all__ = ["IOThread", "Loop", "Reads", "settle", "wake"]

log = logging.getLogger("mqkit.connection")

_EPOLL = hasattr(select, "epoll") and hasattr(EPollPoller, "_create_poller")
_SLICE = 0.05  # seconds: how long a thread reading in place waits before looking again

_here = threading.local()  # on an IO thread: ``wakes``, run before it next waits for I/O


def settle(future: Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    """Resolve ``future`` unless it already is (IO-thread callbacks may race with close)."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def wake(release: Callable[[], None]) -> None:
    """Run ``release`` (what wakes a waiting thread): on an IO thread, just before it next
    waits for I/O; on any other thread, at once."""
    wakes: list[Callable[[], None]] | None = getattr(_here, "wakes", None)
    if wakes is None:
        release()
    else:
        wakes.append(release)


def _run_wakes(wakes: list[Callable[[], None]]) -> None:
    for release in wakes:
        try:
            release()
        except Exception:
            log.exception("waking a waiting thread failed")
    wakes.clear()


class _Epoll:
    """``select.epoll`` for pika's poller, letting go of the loop's lock while it waits, and
    not watching a socket for reading while a thread that took its reads (:class:`Reads`)
    watches it instead."""

    __slots__ = ("_epoll", "_loop", "_masks", "_masks_lock", "close", "taken")

    def __init__(self, loop: Loop) -> None:
        epoll = select.epoll()
        self._epoll = epoll
        self._loop = loop
        self._masks: dict[int, int] = {}  # what pika asked to watch, per file descriptor
        self._masks_lock = threading.Lock()  # also taken without the loop's lock (give_back)
        # File descriptors a thread reads in place of the IO thread, each with a token of that
        # taking (a closed socket's number may come back with another socket).
        self.taken: dict[int, object] = {}
        self.close = epoll.close
        loop.epoll = self

    def _mask(self, fd: int) -> int:
        mask = self._masks[fd]
        return mask & ~select.EPOLLIN if fd in self.taken else mask

    def register(self, fd: int, mask: int) -> None:
        with self._masks_lock:
            self._masks[fd] = mask
            self._epoll.register(fd, self._mask(fd))

    def modify(self, fd: int, mask: int) -> None:
        with self._masks_lock:
            self._masks[fd] = mask
            self._epoll.modify(fd, self._mask(fd))

    def unregister(self, fd: int) -> None:
        with self._masks_lock:
            self._masks.pop(fd, None)
            self.taken.pop(fd, None)
            self._epoll.unregister(fd)

    def take(self, fd: int) -> object | None:
        """Under the loop's lock: stop watching ``fd`` for reading and return the token of
        this taking; ``None`` if it is not watched or already taken."""
        with self._masks_lock:
            if fd not in self._masks or fd in self.taken:
                return None
            self._epoll.modify(fd, self._masks[fd] & ~select.EPOLLIN)
            token = self.taken[fd] = object()
            return token

    def give_back(self, fd: int, token: object) -> None:
        """Watch ``fd`` for reading again, if it is still taken with ``token`` (what came
        meanwhile wakes the IO thread)."""
        with self._masks_lock:
            if self.taken.get(fd) is token:
                del self.taken[fd]
                self._epoll.modify(fd, self._mask(fd))

    def poll(self, timeout: float = -1, maxevents: int = -1) -> list[tuple[int, int]]:
        loop = self._loop
        loop.waiting = True
        loop.lock.release()
        try:
            # Woken once the lock is free: a publisher woken here can send its next one in place.
            _run_wakes(loop.wakes)
            return self._epoll.poll(timeout, maxevents)
        finally:
            loop.lock.acquire()
            loop.waiting = False


class _Poller(EPollPoller):
    def __init__(self, loop: Loop, **kwargs: Any) -> None:
        self._loop = loop
        super().__init__(**kwargs)

    def _create_poller(self) -> _Epoll:
        return _Epoll(self._loop)

    def _dispatch_fd_events(self, fd_event_map: dict[int, int]) -> None:
        epoll = self._loop.epoll
        if epoll is not None and epoll.taken:
            # Readiness reported before a thread took the reads: that thread reads now.
            for fd in epoll.taken.keys() & fd_event_map.keys():
                fd_event_map[fd] &= ~select.EPOLLIN
        super()._dispatch_fd_events(fd_event_map)  # type: ignore[misc]

    def read_here(self, fd: int) -> None:
        """Under the loop's lock: read ``fd`` and handle what came, as the IO thread would."""
        super()._dispatch_fd_events({fd: select.EPOLLIN})  # type: ignore[misc]


class Loop(IOLoop):
    """pika's ``IOLoop`` behind :attr:`lock`; other threads may :meth:`run_here`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held by the thread running pika code
        self.waiting = False  # the IO thread waits for I/O (read and written under the lock)
        self.wakes: list[Callable[[], None]] = []  # IO thread: see wake()
        self.in_place = _EPOLL  # whether run_here can ever run a function
        self.epoll: _Epoll | None = None  # the poller's, once the IO thread started it
        self.poller: _Poller | None = None
        super().__init__()

    def _get_poller(self, get_wait_seconds: Any, process_timeouts: Any) -> Any:
        if not self.in_place:
            return IOLoop._get_poller(get_wait_seconds, process_timeouts)  # type: ignore[attr-defined]
        self.poller = _Poller(
            self, get_wait_seconds=get_wait_seconds, process_timeouts=process_timeouts
        )
        return self.poller

    def call_later(self, delay: float, callback: Callable[[], None]) -> Any:
        """pika's ``call_later``; a timer started in place of the IO thread (while it waits
        for I/O, with a wait reckoned without that timer) wakes it to reckon again."""
        timeout = super().call_later(delay, callback)
        if self.waiting:
            self.add_callback_threadsafe(_nothing)
        return timeout

    def reads(self, connection: Any) -> Reads | None:
        """The reads of pika ``connection``'s socket, for a thread to take (``None`` if this
        loop cannot hand them over)."""
        fd = _fileno(connection)
        if not self.in_place or fd is None:
            return None
        return Reads(self, fd)

    def run_here(self, fn: Callable[[], bool]) -> bool:
        """Run ``fn`` on this thread now if the IO thread waits for I/O and nothing is queued
        for it (which then runs first), holding the IO thread off meanwhile; return what ``fn``
        returned, or ``False`` without running it: then :meth:`IOThread.submit` the work.

        ``fn`` must be short and must not block or wait for the IO thread. Its exceptions are
        logged, as on the IO thread, and count as done (``True``)."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            callbacks: Sequence[object] = self._callbacks  # type: ignore[attr-defined]
            if not self.waiting or callbacks:
                return False
            try:
                return fn()
            except Exception:
                log.exception("error in IO-thread work run in place")
                return True
        finally:
            self.lock.release()


class Reads:
    """A connection's socket, read by a thread waiting for an answer on it instead of the IO
    thread: the answer then wakes the waiting thread itself, not the IO thread that would wake
    it in turn. That thread takes the reads (:meth:`take`) while it holds the loop's lock
    (:meth:`Loop.run_here`, right after sending what it waits for), then waits (:meth:`wait`),
    reading and handling whatever arrives on the socket (its own answer, those of other
    threads, heartbeats, a close) under the loop's lock, as the IO thread would. One thread at
    a time; the IO thread keeps everything else (timers, writes, the other sockets).
    """

    __slots__ = ("_fd", "_loop", "_token")

    def __init__(self, loop: Loop, fd: int) -> None:
        self._loop = loop
        self._fd = fd
        self._token: object | None = None  # of the current taking

    def take(self) -> bool:
        """Under the loop's lock: take the reads from the IO thread; ``False`` if another
        thread has them (or the socket is gone). Then call :meth:`wait`, whatever happens."""
        epoll = self._loop.epoll
        self._token = None if epoll is None else epoll.take(self._fd)
        return self._token is not None

    def wait(self, done: Callable[[], bool], deadline: float) -> None:
        """Read until ``done()`` or ``time.monotonic()`` passes ``deadline``, then give the
        reads back. Stops early (``done()`` still false) if the socket goes away or the loop's
        lock cannot be had in time: then wait for the answer the usual way."""
        loop, fd, token = self._loop, self._fd, self._token
        epoll, poller = loop.epoll, loop.poller
        if epoll is None or poller is None or token is None:
            return

        def ours() -> bool:  # else the socket was closed (its number may be in use again)
            return epoll.taken.get(fd) is token and epoll is loop.epoll

        try:
            watch = select.poll()
            watch.register(fd, select.POLLIN)
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                # In slices: what settles the answer without a byte on this socket (the
                # client closing) is seen within one.
                ready = watch.poll(min(remaining, _SLICE) * 1000)
                if not ours():
                    return
                if not ready:
                    continue
                if not loop.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    return
                try:
                    if ours():
                        poller.read_here(fd)
                except Exception:  # on the IO thread it would be logged and the loop go on
                    log.exception("error reading in place of the IO thread")
                    return
                finally:
                    loop.lock.release()
        finally:
            self._token = None
            epoll.give_back(fd, token)


def _nothing() -> None:
    pass


def _fileno(connection: Any) -> int | None:
    sock = getattr(getattr(connection, "_transport", None), "_sock", None)
    try:
        return int(sock.fileno()) if sock is not None else None
    except (OSError, ValueError):
        return None


class IOThread:
    """One :class:`Loop` running on a daemon thread until :meth:`stop`."""

    def __init__(self, name: str = "mqkit-io") -> None:
        self.loop = Loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped = False

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the IO thread soon; its exceptions are logged there."""
        if self._stopped:
            raise ConnectionFailed("the mqkit client is closed; open a new one")
        self.loop.add_callback_threadsafe(lambda: _guarded(fn))

    def stop(self, timeout: float) -> None:
        """Stop the loop (after the callbacks already submitted) and wait for the thread."""
        if self._stopped:
            return
        self._stopped = True
        self.loop.add_callback_threadsafe(self.loop.stop)
        if self._thread is not threading.current_thread() and self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()

    def _run(self) -> None:
        loop = self.loop
        if loop.in_place:
            _here.wakes = loop.wakes
        with loop.lock:
            try:
                while True:
                    try:
                        loop.start()
                        return
                    except Exception:  # a bug in a callback must not kill the connection's thread
                        log.exception("error in the IO thread (continuing)")
                        if self._stopped:
                            return
            finally:
                _run_wakes(loop.wakes)


def _guarded(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:
        log.exception("error in an IO-thread callback")
