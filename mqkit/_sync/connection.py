"""The link to the broker: one IO thread per client that owns a pika ``SelectConnection``.

pika is not thread-safe, and a ``BlockingConnection`` only answers heartbeats while its thread
is inside pika: a handler slower than the heartbeat makes the broker drop the link and
redeliver (pika #1104, #636, #418). So every :class:`~mqkit.Client` runs one IO thread with a
``SelectConnection`` ioloop, and **every channel operation happens on that thread**. Other
threads hand it work with ``ioloop.add_callback_threadsafe`` and wait on a
``concurrent.futures.Future`` with a timeout (never forever); handlers run on worker threads,
so the ioloop keeps heartbeats going however long they take.

Connecting tries each URL of ``settings.all_urls`` in order, with tenacity back-off, within
``connect_timeout``. After a loss, a supervisor thread does the same without a deadline (back-off
capped at 5 s, never giving up while the client is open), then asks every attached
:class:`Component` to ``restore`` itself (topology, publisher channel, consumers) by issuing
operations to the IO thread. pika exceptions become mqkit errors in :func:`translate`, the one
place that does it.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import pika
import pika.exceptions as pex
import tenacity
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel

from mqkit._sync.io_thread import IOThread, settle
from mqkit.errors import ConnectionFailed, MqkitError, TopologyError
from mqkit.settings import Settings, mask_url

__all__ = ["Component", "Link", "LinkDown", "translate"]

log = logging.getLogger("mqkit")

T = TypeVar("T")

# Back-off between connection rounds: quick at first, capped so a recovered broker is found
# within a few seconds.
_BACKOFF = tenacity.wait_exponential(multiplier=0.1, max=5.0) + tenacity.wait_random(0, 0.1)


class LinkDown(MqkitError):
    """Internal: the connection went away while an operation was waiting for it."""


class _Fatal(Exception):
    """Internal: a connection error that retrying cannot fix (credentials, vhost)."""


class Component(Protocol):
    """Something that keeps state on the connection and must survive a reconnect.

    ``_link_lost`` runs on the IO thread as soon as the connection is gone (channels are dead:
    forget them, requeue what was in flight). ``restore`` runs on the supervisor thread after
    a new connection is up, and may block on :meth:`Link.call` to re-create its channels.
    """

    def _link_lost(self, reason: BaseException) -> None: ...

    def restore(self) -> None: ...


class Link:
    """The connection of one client: its IO thread, (re)connecting, and hand-off of work."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = ""  # the broker in use, password masked
        self.reconnects = 0
        self.last_error: str | None = None
        self._io: IOThread | None = None
        self._connection: SelectConnection | None = None  # IO thread only
        self._ready = threading.Event()  # connected and restored
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self._components: list[Component] = []
        self._calls: set[Future[Any]] = set()  # IO thread: calls waiting on the connection
        self._close_done: threading.Event | None = None

    # -- state -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Connected and restored (no I/O)."""
        return self._ready.is_set()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed.is_set()

    def attach(self, component: Component) -> None:
        """Have ``component`` told about losses and restored after each reconnect."""
        with self._lock:
            self._components.append(component)

    def detach(self, component: Component) -> None:
        """Stop restoring ``component``."""
        with self._lock:
            if component in self._components:
                self._components.remove(component)

    def wait_ready(self, timeout: float) -> bool:
        """Block until connected (``False`` after ``timeout`` seconds or once closed)."""
        if self._closed.is_set():
            return False
        return self._ready.wait(timeout)

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        """Start the IO thread and connect; :class:`ConnectionFailed` within connect_timeout."""
        self._io = IOThread()
        self._io.start()
        try:
            self._connect(deadline=time.monotonic() + self.settings.connect_timeout)
            self._restore_components()
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

    def close(self, timeout: float = 5.0) -> None:
        """Close the connection and stop the IO thread; idempotent."""
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
            if connection is not None and connection.is_open:
                connection.close()
            else:
                self._lost(LinkDown("the client was closed"))
                done.set()

        io.submit(shut)
        done.wait(timeout)
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
            raise ConnectionFailed("the mqkit client is closed; open a new one")
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
            raise ConnectionFailed(
                f"{what}: no answer from the broker within {timeout:g}s; is it overloaded "
                "or unreachable?"
            ) from None
        except LinkDown as exc:
            raise self.down_error(what, timeout) from exc

    def down_error(self, what: str, timeout: float) -> ConnectionFailed:
        """The error for an operation that found no connection within ``timeout``."""
        if self._closed.is_set():
            return ConnectionFailed(f"{what}: the mqkit client is closed")
        cause = f" (last error: {self.last_error})" if self.last_error else ""
        return ConnectionFailed(
            f"{what}: not connected to the broker{cause}; still reconnecting after {timeout:g}s"
        )

    def open_channel(
        self,
        connection: SelectConnection,
        on_open: Callable[[Channel], None],
        on_close: Callable[[Channel, BaseException], None],
    ) -> None:
        """IO thread: open a channel; ``on_close(channel, reason)`` runs once it closes (a
        channel lost while opening goes with its connection: components hear ``_link_lost``)."""

        def opened(channel: Channel) -> None:
            channel.add_on_close_callback(on_close)
            on_open(channel)

        connection.channel(on_open_callback=opened)

    # -- connecting ----------------------------------------------------------------------

    def _connect(self, deadline: float | None) -> None:
        """Connect to the first URL that answers, with back-off; ``deadline=None``: forever."""
        urls = self.settings.all_urls
        last: list[BaseException] = []

        def one_round() -> None:
            for url in urls:
                if self._closed.is_set():
                    raise _Fatal("the client was closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    self._attempt(url, 10.0 if remaining is None else min(remaining, 10.0))
                    return
                except _Fatal:
                    raise
                except Exception as exc:
                    last.append(exc)
                    log.debug("mqkit: connecting to %s failed: %s", mask_url(url), exc)
            raise ConnectionError("no broker answered")

        stop: Any = tenacity.stop_when_event_set(self._closed)
        if deadline is not None:
            stop = stop | tenacity.stop_after_delay(max(0.0, deadline - time.monotonic()))

        def wait(state: tenacity.RetryCallState) -> float:
            backoff = float(_BACKOFF(state))
            if deadline is None:
                return backoff
            return max(0.0, min(backoff, deadline - time.monotonic()))  # a last try at the end

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(ConnectionError),
            wait=wait,
            stop=stop,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            retrying(one_round)
        except _Fatal as exc:
            cause: BaseException = exc.__cause__ or exc
            self.last_error = str(exc)
            if self._closed.is_set():
                raise ConnectionFailed("the mqkit client was closed while connecting") from None
            raise ConnectionFailed(str(exc)) from cause
        except ConnectionError:
            hosts = ", ".join(_host(url) for url in urls)
            last_cause = last[-1] if last else None
            message = (
                f"could not connect to {hosts} within {self.settings.connect_timeout:g}s"
                f"{f': {_describe(last_cause)}' if last_cause else ''}; is the broker running "
                "and reachable?"
            )
            self.last_error = mask_url(message)
            raise ConnectionFailed(mask_url(message)) from last_cause

    def _sleep(self, seconds: float) -> None:
        self._closed.wait(seconds)  # closing the client interrupts the back-off

    def _attempt(self, url: str, timeout: float) -> None:
        """Open one connection to ``url`` (caller thread waits; IO thread connects)."""
        future: Future[SelectConnection] = Future()
        params = self._parameters(url, timeout)
        started: list[SelectConnection] = []

        def opened(connection: Any) -> None:
            if future.done():  # we gave up on it meanwhile
                connection.close()
                return
            self._connection = connection
            self.url = mask_url(url)
            settle(future, connection)

        def failed(_connection: Any, exc: BaseException | str) -> None:
            settle(future, exc=exc if isinstance(exc, BaseException) else ConnectionError(exc))

        io = self._io
        assert io is not None

        def start() -> None:
            started.append(
                SelectConnection(
                    params,
                    on_open_callback=opened,
                    on_open_error_callback=failed,
                    on_close_callback=self._on_connection_closed,
                    custom_ioloop=io.loop,
                )
            )

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
        except (pex.ProbableAuthenticationError, pex.ConnectionClosedByBroker) as exc:
            if isinstance(exc, pex.ProbableAuthenticationError) or exc.reply_code == 403:
                raise _Fatal(
                    f"{mask_url(url)} refused the login: wrong username or password"
                ) from exc
            raise
        except pex.ProbableAccessDeniedError as exc:
            vhost = urlsplit(url).path.lstrip("/") or "/"
            raise _Fatal(
                f"{mask_url(url)}: virtual host {vhost!r} does not exist or the user may not "
                f"use it ({_describe(exc)}); create it or fix the URL"
            ) from exc

    def _parameters(self, url: str, timeout: float) -> pika.URLParameters:
        params = pika.URLParameters(url)
        params.heartbeat = self.settings.heartbeat
        params.connection_attempts = 1
        params.socket_timeout = max(0.5, timeout)
        params.stack_timeout = max(1.0, timeout)
        params.blocked_connection_timeout = None
        params.client_properties = {"connection_name": f"mqkit:{self.settings.service}"}
        if urlsplit(url).scheme == "amqps":
            context = ssl.create_default_context(cafile=self.settings.ca_file)
            if self.settings.cert_file:
                context.load_cert_chain(self.settings.cert_file, self.settings.key_file)
            params.ssl_options = pika.SSLOptions(context, server_hostname=params.host)
        return params

    # -- losing and restoring --------------------------------------------------------------

    def _on_connection_closed(self, connection: Any, reason: BaseException) -> None:
        """IO thread: a connection closed (ours on purpose, or lost)."""
        if connection is not self._connection:
            return  # an attempt we abandoned
        self._connection = None
        self._ready.clear()
        if self._closed.is_set():
            self._lost(LinkDown("the client was closed"))
            if self._close_done is not None:
                self._close_done.set()
            return
        self.last_error = mask_url(_describe(reason))
        log.warning("mqkit: lost the connection to %s (%s); reconnecting", self.url, reason)
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
        for component in list(self._components):
            try:
                component._link_lost(reason)
            except Exception:
                log.exception("mqkit: error while handling the connection loss")

    def _supervise(self) -> None:
        """Supervisor thread: reconnect (forever, with back-off) and restore, until ready."""
        failures = 0
        while not self._closed.is_set():
            try:
                self._connect(deadline=None)
                self._restore_components()
            except Exception as exc:
                if self._closed.is_set():
                    break
                failures += 1
                if not isinstance(exc, LinkDown):
                    error = str(exc) if isinstance(exc, MqkitError) else _describe(exc)
                    self.last_error = mask_url(error)
                    log.warning("mqkit: reconnecting failed (%s); retrying", self.last_error)
                self._drop_connection()  # start over from a clean slate
                self._closed.wait(min(5.0, 0.25 * 2**failures))
                continue
            with self._lock:
                connection = self._connection
                if connection is not None and connection.is_open:
                    self.reconnects += 1
                    self._supervisor = None
                    self._ready.set()
                    log.warning("mqkit: reconnected to %s", self.url)
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

    def _restore_components(self) -> None:
        with self._lock:
            components = list(self._components)
        for component in components:
            component.restore()


def _host(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}"


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, pex.ConnectionClosedByBroker | pex.ChannelClosedByBroker):
        return f"{exc.reply_code} {exc.reply_text}"
    # pika's exceptions say more in repr() than in str()
    pika_error = type(exc).__module__.startswith("pika")
    text = repr(exc) if pika_error else str(exc) or type(exc).__name__
    # pika's workflow errors bury the cause: "... last exception - <cause>; first exception ..."
    match = re.search(r"last exception - (.+?); first exception", text)
    return mask_url(match.group(1) if match else text)


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']+)' "
    r"in vhost '[^']*': received (?P<received>.+) but current is (?P<current>.+)$"
)


def translate(exc: BaseException, *, what: str) -> MqkitError:
    """The mqkit error for a pika exception raised while doing ``what`` (e.g. "declare queue
    'orders'"). The one place where pika's errors are turned into mqkit's."""
    if isinstance(exc, MqkitError) and not isinstance(exc, LinkDown):
        return exc
    if isinstance(exc, pex.ChannelClosedByBroker):
        text = exc.reply_text
        if exc.reply_code == 406:
            return TopologyError(_precondition(text, what))
        if exc.reply_code == 404:
            return TopologyError(f"{what}: {text}; declare it first")
        if exc.reply_code == 405:
            return TopologyError(
                f"{what}: {text}; an exclusive queue belongs to the connection that declared it"
            )
        if exc.reply_code == 403:
            return TopologyError(f"{what}: {text}; grant the user permission or use another name")
        return TopologyError(f"{what}: the broker closed the channel ({exc.reply_code} {text})")
    if isinstance(exc, pex.ProbableAuthenticationError):
        return ConnectionFailed(f"{what}: wrong username or password")
    if isinstance(exc, LinkDown | pex.AMQPConnectionError | pex.ChannelWrongStateError):
        return ConnectionFailed(f"{what}: the connection to the broker was lost ({exc})")
    return ConnectionFailed(f"{what}: {_describe(exc)}")


def _precondition(text: str, what: str) -> str:
    match = _INEQUIVALENT.search(text)
    if match is None:
        return f"{what}: {text}"
    kind, name, arg = match["kind"], match["name"], match["arg"]
    current = match["current"].strip()
    detail = f"inequivalent arg {arg!r}: received {match['received']} but current is {current}"
    advice = "delete it, or declare it as it is"
    if arg == "x-queue-type":
        value = re.search(r"'([^']*)'\s*$", current)
        existing = value.group(1) if value else "classic"  # no x-queue-type means classic
        advice += f" (queue_type={existing!r})"
    return f"{kind} {name!r} already exists with other arguments ({detail}); {advice}"
