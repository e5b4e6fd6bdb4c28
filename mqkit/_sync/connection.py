"""The link to the broker: one IO thread per client that owns a pika ``SelectConnection``.

pika is not thread-safe, and a ``BlockingConnection`` only answers heartbeats while its thread
is inside pika: a handler slower than the heartbeat makes the broker drop the link and
redeliver (pika #1104, #636, #418). So every :class:`~mqkit.Client` runs one IO thread with a
``SelectConnection`` ioloop, and **every channel operation happens on that thread**. Other
threads hand it work with ``ioloop.add_callback_threadsafe`` and wait on a
``concurrent.futures.Future`` with a timeout (never forever); handlers run on worker threads,
so the ioloop keeps heartbeats going however long they take.

A client holds two links on one IO thread: one for publishing and one for consuming and
declaring (``Link(settings, purpose="publishing", io_from=link)``). A broker in a memory or
disk alarm blocks every connection that publishes until the alarm clears; on a connection of
their own, consumers keep taking and acking messages meanwhile. The link reports the broker's
``connection.blocked`` / ``connection.unblocked`` to the pipeline and keeps the reason in
:attr:`Link.blocked`.

Connecting tries each URL of ``settings.all_urls`` in order, waiting
:data:`mqkit.backoff.LINK_BACKOFF` between rounds, within ``connect_timeout``. After a loss
(reported as :class:`~mqkit.lifecycle.LinkLost`), a supervisor thread does the same without a
deadline (never giving up while the client is open), then restores every registered
:class:`~mqkit.shell.Restorable` (topology, publisher channel, consumers) by issuing operations
to the IO thread, and reports :class:`~mqkit.lifecycle.LinkRestored`. pika exceptions become
mqkit errors in :func:`translate`, the one place that does it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import pika
import pika.exceptions as pex
import tenacity
from pika.adapters.select_connection import SelectConnection

from mqkit import explain, tls
from mqkit.backoff import LINK_BACKOFF, per_try, stop_at
from mqkit.errors import ConnectionFailed, MqkitError
from mqkit.lifecycle import (
    LinkLost,
    LinkRestored,
    LinkUp,
    Pipeline,
    PublishingBlocked,
    PublishingUnblocked,
)
from mqkit.settings import Settings, mask_url
from mqkit.shell import RPC_TIMEOUT, Restorable, connectable, connection_name, link_name

from .lenient import LenientSelectConnection
from .transport import IOThread, LinkDown, settle

__all__ = [
    "RPC_ERRORS",
    "RPC_TIMEOUT",
    "Link",
    "LinkDown",
    "Restorable",
    "connect_error",
    "describe",
    "reply_of",
    "translate",
]

log = logging.getLogger("mqkit.connection")

T = TypeVar("T")


# What a channel operation may raise (see :class:`mqkit._sync.channel.Channel`); translate.
RPC_ERRORS: tuple[type[BaseException], ...] = (pex.AMQPError, LinkDown, TimeoutError)


class _Unreachable(Exception):
    """Internal: every URL failed this round (network-level); worth another try."""


class Link:
    """One connection of a client: its IO thread, (re)connecting, and hand-off of work.

    ``purpose`` names the connection (in the broker's connection list and in log lines);
    ``io_from``: another link whose IO thread this one shares (opened after it, closed with
    it), so that all of a client's pika objects live on one thread. A registered
    :class:`Restorable` hears ``_link_lost`` on the IO thread as soon as the connection is gone,
    and ``_restore`` on the supervisor thread once a new one is up (it may block on
    :meth:`call` to re-create its channels).
    """

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        *,
        purpose: str = "",
        io_from: Link | None = None,
    ) -> None:
        self.settings = settings
        self._pipeline = pipeline
        self.purpose = purpose
        self.connection_name = connection_name(settings.service, purpose)
        self.url = ""  # the broker in use, password masked
        self.reconnects = 0
        self.last_error_at = 0.0  # time.monotonic() of the last error (0.0: none yet)
        self._last_error: str | None = None
        self.blocked: str | None = None  # why the broker blocks this connection, if it does
        self._io_from = io_from
        self._sharers: list[Link] = []  # links on this link's IO thread
        if io_from is not None:
            io_from._sharers.append(self)
        self._io: IOThread | None = None
        self._connection: SelectConnection | None = None  # IO thread only
        self._ready = threading.Event()  # connected and restored
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._opened = False
        self._supervisor: threading.Thread | None = None
        self._restorables: list[Restorable] = []
        self._calls: set[Future[Any]] = set()  # IO thread: calls waiting on the connection
        # IO thread: connections being opened (or given up on) that have not closed yet. Each
        # owns a socket that only the IO loop closes, so close() ends them before stopping it.
        self._attempts: set[SelectConnection] = set()
        self._close_done: threading.Event | None = None

    # -- state -------------------------------------------------------------------------

    @property
    def last_error(self) -> str | None:
        """The last connection-level error, password masked (``None``: none yet)."""
        return self._last_error

    @last_error.setter
    def last_error(self, error: str | None) -> None:
        self._last_error = error
        self.last_error_at = time.monotonic()

    @property
    def name(self) -> str:
        """How log lines name this connection ("the publishing connection to ...")."""
        return link_name(self.purpose)

    @property
    def connected(self) -> bool:
        """Connected and restored (no I/O)."""
        return self._ready.is_set()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed.is_set()

    @property
    def restorables(self) -> tuple[Restorable, ...]:
        """The registered parts (the declarer, the publisher, the started consumers)."""
        with self._lock:
            return tuple(self._restorables)

    def register(self, item: Restorable) -> None:
        """Have ``item`` told about losses and restored after each reconnect."""
        with self._lock:
            self._restorables.append(item)

    def unregister(self, item: Restorable) -> None:
        """Stop restoring ``item``."""
        with self._lock:
            if item in self._restorables:
                self._restorables.remove(item)

    def wait_ready(self, timeout: float) -> bool:
        """Block until connected (``False`` after ``timeout`` seconds or once closed)."""
        if self._closed.is_set():
            return False
        return self._ready.wait(timeout)

    # -- lifecycle ---------------------------------------------------------------------

    def ensure_open(self) -> None:
        """Open this link and the links sharing its IO thread, unless they are open
        (idempotent, thread-safe): the blocking client connects on first use. Raises
        :class:`ConnectionFailed` once closed, or when no broker answers."""
        if self._io_from is not None:
            self._io_from.ensure_open()
            return
        if self._opened:
            return
        with self._open_lock:
            if self._closed.is_set():
                raise explain.closed("connect")
            if self._opened:
                return
            self.open()
            try:
                for sharer in self._sharers:
                    sharer.open()
            except BaseException:
                self.close()  # closes the sharers too
                raise
            self._opened = True

    def open(self) -> None:
        """Start the IO thread (or use ``io_from``'s) and connect; :class:`ConnectionFailed`
        within connect_timeout."""
        if self._io_from is not None:
            self._io = self._io_from._io
            if self._io is None:
                raise explain.closed("connect")  # opened before the link it shares a thread with
        else:
            self._io = IOThread()
            self._io.start()
        try:
            self._connect(deadline=time.monotonic() + self.settings.connect_timeout)
            self._restore_all()
        except ConnectionFailed:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise translate(exc, what=f"connect to {self.url or 'the broker'}") from exc
        except BaseException:
            self.close()
            raise
        self._ready.set()
        self._pipeline.emit(LinkUp(self.url, service=self.settings.service))

    def close(self, timeout: float = 5.0) -> None:
        """Close the connection (and the links sharing its IO thread), then stop the IO
        thread if it is this link's; idempotent."""
        for sharer in self._sharers:
            sharer.close(timeout)
        if self._closed.is_set():
            return
        self._closed.set()
        self._ready.clear()
        io = self._io
        if io is None:
            return
        done = threading.Event()

        def shut() -> None:
            self._close_done = done
            connection = self._connection
            for attempt in list(self._attempts):  # a reconnect in progress, or abandoned
                if attempt is not connection and not (attempt.is_closing or attempt.is_closed):
                    attempt.close()
            if connection is not None and connection.is_open:
                connection.close()
                if self.blocked is not None:  # the broker does not read it: no close-ok
                    _abort(connection)
            else:
                self._lost(LinkDown("the client was closed"))
                done.set()

        def abort() -> None:
            connection = self._connection
            if connection is not None and not connection.is_closed:
                _abort(connection)

        try:
            io.submit(shut)
        except ConnectionFailed:  # the IO thread is gone (its owner closed first)
            done.set()
        if not done.wait(timeout):  # no close-ok: drop the socket rather than leave it open
            with contextlib.suppress(ConnectionFailed):
                io.submit(abort)
                done.wait(1.0)
        # The attempts closed above close their sockets on the IO loop: let it get that far
        # (stopping it first would leave each socket open until garbage collection).
        deadline = time.monotonic() + 2.0
        while self._attempts and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._io_from is None:
            io.stop(timeout)
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(timeout)

    # -- handing work to the IO thread ---------------------------------------------------

    @property
    def connection(self) -> SelectConnection | None:
        """IO thread only: the open connection, if any."""
        connection = self._connection
        return connection if connection is not None and connection.is_open else None

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the IO thread soon (errors are logged, never raised there)."""
        io = self._io
        if io is None or (self._closed.is_set() and self._close_done is not None):
            raise explain.closed("use the connection")
        io.submit(fn)

    def call(
        self,
        fn: Callable[[SelectConnection, Future[T]], None],
        timeout: float,
        *,
        what: str,
        wait_ready: bool = True,
    ) -> T:
        """Run ``fn(connection, future)`` on the IO thread and wait for it to settle ``future``.

        Waits up to ``timeout`` seconds in all, first for the link when ``wait_ready``.
        Returns the result; raises what ``fn`` set (a pika exception: callers translate), or
        :class:`ConnectionFailed` if the link is down or the broker does not answer.
        """
        deadline = time.monotonic() + timeout
        if wait_ready and not self.wait_ready(timeout):
            raise self.down_error(what, timeout)
        future: Future[T] = Future()

        def run() -> None:
            connection = self._connection
            if connection is None or not connection.is_open:
                settle(future, exc=LinkDown("not connected"))
                return
            self._calls.add(future)
            future.add_done_callback(self._calls.discard)
            try:
                fn(connection, future)
            except Exception as exc:
                settle(future, exc=exc)

        self.submit(run)
        try:
            return future.result(max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise explain.no_answer(what, timeout) from None
        except LinkDown as exc:
            raise self.down_error(what, timeout) from exc

    def down_error(self, what: str, timeout: float) -> ConnectionFailed:
        """The error for an operation that found no connection within ``timeout``."""
        if self._closed.is_set():
            return explain.closed(what)
        return explain.not_connected(what, timeout, self.last_error)

    # -- connecting ----------------------------------------------------------------------

    def _connect(self, deadline: float | None) -> None:
        """Connect to the first URL that answers, with back-off; ``deadline=None``: forever."""
        urls, timeout = self.settings.all_urls, self.settings.connect_timeout
        tried: list[str] = []
        last: list[BaseException] = []

        def one_round() -> None:
            for url in urls:
                if self._closed.is_set():
                    raise explain.closed("connect")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                tried.append(url)
                try:
                    return self._attempt(url, per_try(timeout, len(urls), remaining))
                except Exception as exc:
                    fatal = connect_error(url, exc)  # what no retry can fix
                    if fatal is not None:
                        raise fatal from exc
                    last.append(exc)
                    log.debug("connecting to %s failed: %s", mask_url(url), describe(exc))
            self.last_error = describe(last[-1]) if last else "no URL answered"
            raise _Unreachable()

        stop: Any = tenacity.stop_never if deadline is None else stop_at(deadline)
        stop = tenacity.stop_when_event_set(self._closed) | stop  # close() ends the tries too

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Unreachable),
            wait=LINK_BACKOFF.wait(deadline=deadline),  # a last try at the deadline
            stop=stop,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            retrying(one_round)
        except ConnectionFailed as exc:
            self.last_error = mask_url(str(exc))
            raise
        except _Unreachable:
            last_cause = last[-1] if last else None
            error = explain.unreachable(
                tried or urls,
                self.settings.connect_timeout,
                describe(last_cause) if last_cause else None,
            )
            self.last_error = str(error)
            raise error from last_cause

    def _sleep(self, seconds: float) -> None:
        self._closed.wait(seconds)  # closing the client interrupts the back-off

    def _attempt(self, url: str, timeout: float) -> None:
        """Open one connection to ``url`` (caller thread waits; IO thread connects)."""
        future: Future[SelectConnection] = Future()
        params = self._parameters(url, timeout)
        started: list[SelectConnection] = []

        def opened(connection: Any) -> None:
            if future.done() or self._closed.is_set():  # we gave up on it meanwhile
                connection.close()
                settle(future, exc=ConnectionError("the client was closed"))
                return
            self._attempts.discard(connection)  # the link's connection now: close() closes it
            self._connection = connection
            self.url = mask_url(url)
            settle(future, connection)

        def failed(connection: Any, exc: BaseException | str) -> None:
            self._attempts.discard(connection)
            settle(future, exc=exc if isinstance(exc, BaseException) else ConnectionError(exc))

        io = self._io
        assert io is not None

        def start() -> None:
            if self._closed.is_set():  # closed meanwhile: open nothing it would not close
                settle(future, exc=ConnectionError("the client was closed"))
                return
            connection = LenientSelectConnection(  # repairs headers pika cannot decode
                params,
                on_open_callback=opened,
                on_open_error_callback=failed,
                on_close_callback=self._on_connection_closed,
                custom_ioloop=io.loop,
            )
            connection.add_on_connection_blocked_callback(self._on_blocked)
            connection.add_on_connection_unblocked_callback(self._on_unblocked)
            started.append(connection)
            self._attempts.add(connection)

        self.submit(start)
        try:
            future.result(timeout + 1.0)
        except FutureTimeout:
            settle(future, exc=ConnectionError("timed out"))

            def abort() -> None:
                for connection in started:
                    if connection is not self._connection and not connection.is_closed:
                        connection.close()

            self.submit(abort)
            raise ConnectionError(f"no answer within {timeout:g}s") from None

    def _parameters(self, url: str, timeout: float) -> pika.URLParameters:
        params = pika.URLParameters(connectable(url))  # memory://NAME: its loopback URL
        params.heartbeat = self.settings.heartbeat
        params.connection_attempts = 1
        params.socket_timeout = max(0.5, timeout)
        params.stack_timeout = max(1.0, timeout)
        params.blocked_connection_timeout = None
        params.client_properties = {"connection_name": self.connection_name}
        if tls.external(self.settings):
            params.credentials = pika.credentials.ExternalCredentials()
        if tls.uses_tls(url):
            # A TLSSetupError (a file, a pass phrase) is one that connect_error calls fatal.
            context = tls.ssl_context(self.settings)
            params.ssl_options = pika.SSLOptions(context, server_hostname=params.host)
        return params

    # -- blocked by the broker ---------------------------------------------------------------

    def _on_blocked(self, connection: Any, frame: Any) -> None:
        """IO thread: the broker blocks this connection (a memory or disk alarm)."""
        if connection is not self._connection:
            return
        self.blocked = str(getattr(frame.method, "reason", "") or "a resource alarm")
        self._pipeline.emit(PublishingBlocked(self.blocked, service=self.settings.service))

    def _on_unblocked(self, connection: Any, _frame: Any) -> None:
        """IO thread: the broker's alarm cleared."""
        if connection is not self._connection or self.blocked is None:
            return
        self.blocked = None
        self._pipeline.emit(PublishingUnblocked(service=self.settings.service))

    # -- losing and restoring --------------------------------------------------------------

    def _on_connection_closed(self, connection: Any, reason: BaseException) -> None:
        """IO thread: a connection closed (ours on purpose, or lost)."""
        self._attempts.discard(connection)
        if connection is not self._connection:
            return  # an attempt we abandoned
        self._connection = None
        self.blocked = None  # a new connection starts unblocked
        self._ready.clear()
        if self._closed.is_set():
            self._lost(LinkDown("the client was closed"))
            if self._close_done is not None:
                self._close_done.set()
            return
        self.last_error = describe(reason)
        self._pipeline.emit(
            LinkLost(self.url, self.last_error or "", service=self.settings.service)
        )
        self._lost(reason)
        with self._lock:
            if self._supervisor is None:
                self._supervisor = threading.Thread(
                    target=self._supervise, name="mqkit-reconnect", daemon=True
                )
                self._supervisor.start()

    def _lost(self, reason: BaseException) -> None:
        for future in list(self._calls):
            settle(future, exc=LinkDown(str(reason)))
        self._calls.clear()
        for item in self.restorables:
            try:
                item._link_lost(reason)
            except Exception:
                log.exception("error while handling the connection loss")

    def _supervise(self) -> None:
        """Supervisor thread: reconnect (forever, with back-off) and restore, until ready."""
        failures = 0
        while not self._closed.is_set():
            try:
                self._connect(deadline=None)
                self._restore_all()
            except Exception as exc:
                if self._closed.is_set():
                    break
                failures += 1
                if not isinstance(exc, LinkDown):
                    error = str(exc) if isinstance(exc, MqkitError) else describe(exc)
                    self.last_error = mask_url(error)
                    log.warning("reconnecting %s failed (%s); retrying", self.name, self.last_error)
                self._drop_connection()  # start over from a clean slate
                self._closed.wait(LINK_BACKOFF.delay(failures))
                continue
            with self._lock:
                connection = self._connection
                if connection is not None and connection.is_open:
                    self.reconnects += 1
                    self._supervisor = None
                    self._ready.set()
                    restored = LinkRestored(
                        self.url, self.reconnects, service=self.settings.service
                    )
                else:
                    continue
            self._pipeline.emit(restored)
            return
        with self._lock:
            self._supervisor = None

    def _drop_connection(self) -> None:
        """Close the current connection, if any (a restore that failed half-way)."""
        gone = threading.Event()

        def drop() -> None:
            connection = self._connection
            if connection is not None and connection.is_open:
                connection.close()
            gone.set()

        try:
            self.submit(drop)
        except ConnectionFailed:
            return
        gone.wait(5.0)
        deadline = time.monotonic() + 5.0
        while self._connection is not None and time.monotonic() < deadline:
            time.sleep(0.02)

    def _restore_all(self) -> None:
        for item in self.restorables:
            item._restore()


def _abort(connection: SelectConnection) -> None:
    """IO thread: drop ``connection``'s socket at once, without the close handshake (the
    broker does not answer it: it blocks the connection, or it is gone). pika has no public
    call for it; pinned by tests/unit/test_private_hooks.py. Its close callback follows."""
    disconnect = getattr(connection, "_adapter_disconnect_stream", None)
    if callable(disconnect):
        disconnect()


def describe(exc: BaseException | None) -> str:
    """A one-line, password-free description of a pika/OS error."""
    if exc is None:
        return "unknown error"
    tls_problem = tls.ssl_reason(exc)
    if tls_problem is not None:
        return mask_url(tls_problem)
    if isinstance(exc, pex.ConnectionClosedByBroker | pex.ChannelClosedByBroker):
        return mask_url(f"{exc.reply_code} {exc.reply_text}")
    # pika's exceptions say more in repr() than in str()
    pika_error = type(exc).__module__.startswith("pika")
    text = repr(exc) if pika_error else str(exc) or type(exc).__name__
    # pika's workflow errors bury the cause: "... last exception - <cause>; first exception ..."
    match = re.search(r"last exception - (.+?); first exception", text)
    return mask_url(match.group(1) if match else text)


def reply_of(exc: BaseException) -> tuple[int | None, str]:
    """The reply code and text of a channel the broker closed (``None`` and a description
    for any other error, a connection the broker closed included)."""
    if isinstance(exc, pex.ChannelClosedByBroker):
        return exc.reply_code, mask_url(exc.reply_text)
    return None, describe(exc)


def translate(exc: BaseException, *, what: str, missing: str | None = None) -> MqkitError:
    """The mqkit error for a pika exception raised while doing ``what`` (e.g. "declare queue
    'orders'"). The one place where pika's errors are turned into mqkit's; the words come
    from :mod:`mqkit.explain`. ``missing``: the advice when the broker says NOT_FOUND."""
    if isinstance(exc, MqkitError) and not isinstance(exc, LinkDown):
        return exc
    if isinstance(exc, pex.ChannelClosedByBroker):
        code, text = reply_of(exc)
        return explain.broker_refused(code, text, what=what, missing=missing)
    if isinstance(exc, pex.ProbableAuthenticationError):
        return ConnectionFailed(f"{what}: wrong username or password")
    if isinstance(exc, LinkDown | pex.AMQPConnectionError | pex.ChannelWrongStateError):
        return explain.link_lost(what, describe(exc))
    if isinstance(exc, TimeoutError):
        return explain.no_answer(what)
    return ConnectionFailed(f"{what}: {describe(exc)}")


def connect_error(url: str, exc: BaseException) -> ConnectionFailed | None:
    """The error for a connection attempt to ``url`` that failed with ``exc`` in a way
    another attempt cannot fix (TLS, EXTERNAL login, wrong credentials, unknown vhost);
    ``None`` otherwise. The connecting half of :func:`translate`. A plain URL whose port
    closed before the AMQP handshake is probed once: a TLS port is a fatal error too."""
    problem = tls.failure(url, exc)
    if problem is None and tls.probe_needed(url, exc) and tls.speaks_tls(url):
        problem = tls.failure(url, tls.PortSpeaksTLS())
    if problem is not None:
        return problem
    if isinstance(exc, pex.ProbableAuthenticationError) or (
        isinstance(exc, pex.ConnectionClosedByBroker) and exc.reply_code == 403
    ):
        return explain.wrong_credentials(url, describe(exc))
    if isinstance(exc, pex.ProbableAccessDeniedError):
        return explain.unknown_vhost(url, describe(exc))
    return None
