"""The blocking shell's transport: how it drives pika's I/O, the IO thread that runs pika's
loop, channels the other threads drive through it (:class:`Channel`) and the socket of the
publishing connection (the asyncio twin, ``_async/transport.py``, drives aiormq's frame
writes). Nothing here decides what to send; it moves bytes.

**The IO thread**: a pika ``IOLoop`` on a daemon thread of its own, and handing work to it.

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
time touches pika. :func:`streamline` makes a connection send what it
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

**The publishing connection's socket**, read and written with fewer system calls than pika's.

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
holding the IO loop's lock in its place (:meth:`Loop.run_here`). It uses pika internals
(stable from pika 1.0 to 1.4): the plaintext transport's ``write``, ``_consume``, ``_sock``,
``_tx_buffers``, ``_protocol``, ``_state`` and read limits, and a connection's ``_transport``,
``_output_marshaled_frames``, ``_frame_buffer`` and byte and frame counts (which pika's
heartbeat checker reads). A connection without them (TLS, another pika) keeps pika's way:
:func:`streamline` returns ``False``. ``pyproject.toml`` pins pika to the versions
``tests/unit/test_transport.py`` passed on, and those tests fail loudly if they change.
"""

from __future__ import annotations

import logging
import select
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import pika.channel
from pika.adapters.select_connection import EPollPoller, IOLoop
from pika.adapters.utils import io_services_utils
from pika.exchange_type import ExchangeType
from pika.spec import Basic, BasicProperties

from mqkit.errors import ConnectionFailed, MqkitError
from mqkit.shell import RPC_TIMEOUT

__all__ = [
    "CORKED",
    "Channel",
    "Confirms",
    "IOThread",
    "LinkDown",
    "Loop",
    "Reads",
    "cork",
    "settle",
    "streamline",
    "unwrapped",
    "wake",
]

Got = tuple[Any, BasicProperties, bytes]  # (Basic.GetOk or Basic.Deliver, properties, body)
Callback = Callable[..., None]

log = logging.getLogger("mqkit.connection")


class LinkDown(MqkitError):
    """Internal: the connection (or the channel) went away while an operation was waiting
    for it."""


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


def _guarded(fn: Callback, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("error in an IO-thread callback")


# -- channels, blocking ------------------------------------------------------------------

# What opentelemetry-instrumentation-pika (and the like) put on a channel instance, over
# pika's own methods: mqkit's channels use pika's, so such instrumentation sees none of their
# traffic. Its spans would duplicate mqkit.observability.TracingMiddleware's, and made on the
# IO thread, outside the caller's trace, they would start new traces and overwrite the
# traceparent header mqkit's tracing writes (tests/integration/test_observability.py).
_INSTANCE_WRAPPED = ("basic_publish", "basic_consume")


def unwrapped(channel: pika.channel.Channel) -> None:
    """Drop per-instance wrappers of pika's methods from ``channel`` (pika sets none)."""
    for name in _INSTANCE_WRAPPED:
        vars(channel).pop(name, None)


class Channel:
    """A pika channel driven from any thread but the IO thread, with the names and arguments
    of aiormq's channel: each method hands its call to the IO thread and waits for the
    broker's answer (``timeout`` seconds, default RPC_TIMEOUT). Errors are those of
    ``RPC_ERRORS`` (:func:`translate` words them): pika's ``ChannelClosedByBroker`` when the
    broker answers by closing the channel, :class:`LinkDown` when the channel or its
    connection is gone, ``TimeoutError`` when no answer came in time.

    ``close_callbacks`` run as ``callback(channel, reason)`` and
    ``on_consumer_cancel_callbacks`` as ``callback(frame)``, on the IO thread: like pika's,
    they must not block.
    """

    def __init__(
        self, submit: Callable[[Callable[[], None]], None], underlay: pika.channel.Channel
    ) -> None:
        unwrapped(underlay)
        self._submit = submit  # runs a function on the IO thread
        self.underlay = underlay  # IO thread only
        self.close_callbacks: set[Callback] = set()
        self.on_consumer_cancel_callbacks: set[Callback] = set()
        self._reason: BaseException | None = None  # why it closed
        self._waiting: set[Future[Any]] = set()  # IO thread
        self._got: Callable[..., None] | None = None  # IO thread: a basic.get under way
        underlay.add_on_close_callback(self._on_close)
        underlay.add_on_cancel_callback(self._on_cancel)
        underlay.add_callback(self._on_get_empty, [Basic.GetEmpty], one_shot=False)

    def __repr__(self) -> str:
        return f"<Channel {self.underlay.channel_number} {'closed' if self.is_closed else 'open'}>"

    @property
    def is_closed(self) -> bool:
        return self._reason is not None or not self.underlay.is_open

    def queue_declare(
        self,
        queue: str,
        *,
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """``queue.declare``; its ``Queue.DeclareOk`` (``message_count``)."""
        return self._call(
            lambda done: self.underlay.queue_declare(
                queue,
                passive=passive,
                durable=durable,
                exclusive=exclusive,
                auto_delete=auto_delete,
                arguments=arguments,
                callback=lambda frame: done(frame.method),
            ),
            timeout,
        )

    def exchange_declare(
        self,
        exchange: str,
        *,
        exchange_type: str = "direct",
        passive: bool = False,
        durable: bool = False,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        return self._call(
            lambda done: self.underlay.exchange_declare(
                exchange,
                exchange_type=ExchangeType(exchange_type),
                passive=passive,
                durable=durable,
                auto_delete=auto_delete,
                arguments=arguments,
                callback=lambda frame: done(frame.method),
            ),
            timeout,
        )

    def queue_bind(
        self,
        queue: str,
        exchange: str,
        *,
        routing_key: str | None = None,
        arguments: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        return self._call(
            lambda done: self.underlay.queue_bind(
                queue,
                exchange,
                routing_key=routing_key,
                arguments=arguments,
                callback=lambda frame: done(frame.method),
            ),
            timeout,
        )

    def queue_purge(self, queue: str, *, timeout: float | None = None) -> Any:
        """``queue.purge``; its ``Queue.PurgeOk`` (``message_count``)."""
        return self._call(
            lambda done: self.underlay.queue_purge(
                queue, callback=lambda frame: done(frame.method)
            ),
            timeout,
        )

    def basic_qos(self, *, prefetch_count: int, timeout: float | None = None) -> None:
        self._call(
            lambda done: self.underlay.basic_qos(
                prefetch_count=prefetch_count, callback=lambda _frame: done()
            ),
            timeout,
        )

    def basic_consume(
        self,
        queue: str,
        callback: Callable[[pika.channel.Channel, Any, BasicProperties, bytes], None],
        *,
        consumer_tag: str | None = None,
        no_ack: bool = False,
        timeout: float | None = None,
    ) -> None:
        """``basic.consume``, returning on consume-ok; pika calls ``callback(channel,
        method, properties, body)`` on the IO thread for each delivery."""
        self._call(
            lambda done: self.underlay.basic_consume(
                queue,
                callback,
                auto_ack=no_ack,
                consumer_tag=consumer_tag,
                callback=lambda _frame: done(),
            ),
            timeout,
        )

    def basic_get(
        self, queue: str, *, no_ack: bool = False, timeout: float | None = None
    ) -> Got | None:
        """``basic.get``: a message, or ``None`` when the queue is empty."""

        def start(done: Callable[..., None]) -> None:
            self._got = done

            def got(_ch: Any, method: Basic.GetOk, props: BasicProperties, body: bytes) -> None:
                self._got = None
                done((method, props, body))

            self.underlay.basic_get(queue, got, auto_ack=no_ack)

        result: Got | None = self._call(start, timeout)
        return result

    def basic_ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        def start(done: Callable[..., None]) -> None:
            self.underlay.basic_ack(delivery_tag, multiple=multiple)
            done()

        self._call(start, None)

    def close(self, *, timeout: float = 5.0) -> None:
        """Close the channel and wait for the broker's close-ok (unacked messages go back to
        their queue)."""
        if self.is_closed:
            return
        closed = threading.Event()

        def start() -> None:
            if self.is_closed:
                closed.set()
                return
            self.close_callbacks.add(lambda _channel, _reason: closed.set())
            self.underlay.close()

        self._submit(start)
        if not closed.wait(timeout):
            raise TimeoutError("no close-ok")

    # -- IO thread -------------------------------------------------------------------------

    def _call(self, start: Callable[[Callable[..., None]], object], timeout: float | None) -> Any:
        """Run ``start(done)`` on the IO thread and wait until the broker's answer calls
        ``done(result)`` (or the channel closes, or ``timeout`` passes)."""
        future: Future[Any] = Future()

        def done(result: Any = None) -> None:
            settle(future, result)

        def run() -> None:
            if self.is_closed:
                settle(future, exc=self._reason or LinkDown("the channel is closed"))
                return
            self._waiting.add(future)
            future.add_done_callback(self._waiting.discard)
            try:
                start(done)
            except Exception as exc:
                settle(future, exc=exc)

        self._submit(run)
        return future.result(RPC_TIMEOUT if timeout is None else timeout)

    def _on_get_empty(self, _frame: Any) -> None:
        done, self._got = self._got, None
        if done is not None:
            done(None)

    def _on_cancel(self, frame: Any) -> None:
        for callback in list(self.on_consumer_cancel_callbacks):
            _guarded(callback, frame)

    def _on_close(self, _underlay: pika.channel.Channel, reason: BaseException) -> None:
        self._reason = reason
        for future in list(self._waiting):
            settle(future, exc=reason)
        self._waiting.clear()
        for callback in list(self.close_callbacks):
            _guarded(callback, self, reason)


# -- the publishing connection's socket --------------------------------------------------

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
