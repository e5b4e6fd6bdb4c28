"""The link to the broker: one aio-pika connection that survives losing it.

aio-pika's "robust" connection restores consumers with known bugs, so a :class:`Link` holds a
plain ``aio_pika`` connection and replaces it itself. Channels are opened in :mod:`.channel`,
topology is declared in :mod:`.declarer`, publishing lives in :mod:`.publisher`, batched
acking in :mod:`.acks`.

A client holds two links: one for publishing and one for consuming and declaring
(``Link(settings, pipeline, purpose="publishing")``). A broker in a memory or disk alarm
blocks every connection that publishes until the alarm clears; on a connection of their own,
consumers keep taking and acking messages meanwhile. The link reports the broker's
``connection.blocked`` / ``connection.unblocked`` to the pipeline and keeps the reason in
:attr:`Link.blocked`.

Connecting tries each URL of ``settings.all_urls`` in order, waiting
:data:`mqkit.backoff.LINK_BACKOFF` between rounds, within ``connect_timeout``. After a loss
(reported as :class:`~mqkit.lifecycle.LinkLost`), a supervisor task does the same without a
deadline (never giving up while the client is open), then restores every registered
:class:`~mqkit.shell.AsyncRestorable` (topology, consumers), and reports
:class:`~mqkit.lifecycle.LinkRestored`. aio-pika and aiormq exceptions become mqkit errors in
:func:`translate`, the one place that does it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions as amqp
import tenacity
from aio_pika.connection import make_url

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
from mqkit.shell import RPC_TIMEOUT, AsyncRestorable, connectable, connection_name, link_name

from . import lenient

__all__ = [
    "AMQP_ERRORS",
    "LINK_ERRORS",
    "RPC_ERRORS",
    "RPC_TIMEOUT",
    "AsyncRestorable",
    "Link",
    "cancelling",
    "connect_error",
    "describe",
    "reply_of",
    "reply_text",
    "returned_reply",
    "translate",
]

log = logging.getLogger("mqkit.connection")


# Errors that mean "the link (connection or channel) went away", not "the broker said no".
LINK_ERRORS: tuple[type[BaseException], ...] = (
    amqp.AMQPConnectionError,
    amqp.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    RuntimeError,  # aio-pika: "Connection was not opened" / "... closed"
)

# What a channel operation may raise besides the broker's answer.
AMQP_ERRORS: tuple[type[BaseException], ...] = (amqp.AMQPError, *LINK_ERRORS)
RPC_ERRORS: tuple[type[BaseException], ...] = (amqp.AMQPError, asyncio.TimeoutError, *LINK_ERRORS)


class _Unreachable(Exception):
    """Internal: every URL failed this round (network-level); worth another try."""


class Link:
    """One connection of a client: (re)connecting, and what depends on it.

    ``purpose`` names the connection in log lines and in the broker's connection list
    (:func:`mqkit.shell.connection_name`). A registered :class:`AsyncRestorable` hears
    ``_link_lost`` as soon as the connection is gone, and ``_restore`` once a new one is up
    (before the link counts as connected again: it opens its channels with
    ``wait_ready=False``).
    """

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        *,
        purpose: str = "",
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
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._ready = asyncio.Event()  # connected and restored
        self._closed = False
        self._opened = False
        self._supervisor: asyncio.Task[None] | None = None
        self._restorables: list[AsyncRestorable] = []
        self._background: set[asyncio.Future[Any]] = set()

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
        return self._ready.is_set() and self._connection is not None

    @property
    def opened(self) -> bool:
        """Whether :meth:`open` succeeded (the link may be down or closed since)."""
        return self._opened

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def restorables(self) -> tuple[AsyncRestorable, ...]:
        """The registered parts (the declarer, the started consumers)."""
        return tuple(self._restorables)

    def register(self, item: AsyncRestorable) -> None:
        """Have ``item`` told about losses and restored after each reconnect."""
        if item not in self._restorables:
            self._restorables.append(item)

    def unregister(self, item: AsyncRestorable) -> None:
        """Stop restoring ``item``."""
        if item in self._restorables:
            self._restorables.remove(item)

    async def wait_ready(self, timeout: float | None) -> bool:
        """Wait until connected (``False`` after ``timeout`` seconds or once closed)."""
        if self._ready.is_set():
            return True
        if self._closed or not self._opened:
            return False
        if timeout is not None and timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return not self._closed

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, trying every URL with back-off; :class:`ConnectionFailed` within
        connect_timeout. Idempotent."""
        if self._opened:
            return
        if self._closed:
            raise explain.closed("connect")
        await self._connect(deadline=time.monotonic() + self.settings.connect_timeout)
        self._opened = True
        try:
            await self._restore_all()
        except BaseException:
            await self.disconnect()
            raise
        self._ready.set()
        self._pipeline.emit(LinkUp(self.url, service=self.settings.service))

    async def disconnect(self) -> None:
        """Back to before :meth:`open` (the client's other link could not connect): a later
        ``open()`` tries again."""
        connection, self._connection = self._connection, None
        self._ready.clear()
        self._opened = False
        if connection is not None:
            await _discard(connection)

    async def close(self) -> None:
        """Close the connection and stop reconnecting; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._ready.clear()
        supervisor = self._supervisor
        if supervisor is not None and not supervisor.done():
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), timeout=10)
            except Exception as exc:  # closing a dead connection may fail; it is closed anyway
                log.debug("error while closing the connection: %s", describe(exc))

    # -- what the parts use --------------------------------------------------------------

    @property
    def connection(self) -> aio_pika.abc.AbstractConnection | None:
        """The open connection, if any (ready or still being restored)."""
        connection = self._connection
        return connection if connection is not None and not connection.is_closed else None

    def require_open(self, what: str) -> None:
        """Raise :class:`ConnectionFailed` unless the link was opened and not closed."""
        if self._closed:
            raise explain.closed(what)
        if not self._opened:
            raise ConnectionFailed(
                f"{what}: the client is not connected; use `async with AsyncClient(...)` "
                "or `await client.connect()` first"
            )

    def down_error(self, what: str, timeout: float) -> ConnectionFailed:
        """The error for an operation that found no connection within ``timeout``."""
        if self._closed:
            return explain.closed(what)
        return explain.not_connected(what, timeout, self.last_error)

    # -- connecting ----------------------------------------------------------------------

    async def _connect(self, deadline: float | None) -> None:
        """Connect to the first URL that answers, with back-off; ``deadline=None``: forever."""
        urls, timeout = self.settings.all_urls, self.settings.connect_timeout
        tried: list[str] = []
        last: list[BaseException] = []

        async def one_round() -> tuple[aio_pika.abc.AbstractConnection, str]:
            for url in urls:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                tried.append(url)
                try:
                    return await self._attempt(url, per_try(timeout, len(urls), remaining)), url
                except Exception as exc:
                    fatal = connect_error(url, exc)  # what no retry can fix
                    if fatal is not None:
                        raise fatal from exc
                    last.append(exc)
                    log.debug("connecting to %s failed: %s", mask_url(url), describe(exc))
            self.last_error = describe(last[-1]) if last else "no URL answered"
            raise _Unreachable()

        stop: Any = tenacity.stop_never if deadline is None else stop_at(deadline)

        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(_Unreachable),
            wait=LINK_BACKOFF.wait(deadline=deadline),  # a last try at the deadline
            stop=stop,
            reraise=True,
        )
        connection: aio_pika.abc.AbstractConnection
        url: str
        try:
            connection, url = await retrying(one_round)
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
        self._install(connection, url)

    async def _attempt(self, url: str, timeout: float) -> aio_pika.abc.AbstractConnection:
        """Open one connection to ``url``."""
        # aio_pika.connect() drops the Connection object when connecting fails, and an
        # unclosed one warns when collected; build it here so a failure closes it.
        options: dict[str, Any] = {"heartbeat": self.settings.heartbeat}
        if tls.external(self.settings):
            # aiormq's switch for SASL EXTERNAL. Settings refuse URLs with parameters of their
            # own, so this is the only one.
            options["auth"] = "external"
        url = connectable(url)  # memory://NAME: the in-process broker's loopback URL
        connection = aio_pika.Connection(
            make_url(url, **options),
            ssl_context=tls.ssl_context(self.settings) if tls.uses_tls(url) else None,
            client_properties={"connection_name": self.connection_name},
        )
        lenient.install(connection, url)  # content headers pamqp cannot decode: repaired
        try:
            await connection.connect(timeout=timeout)
        except BaseException as exc:
            await _discard(connection)
            if (
                isinstance(exc, Exception)
                and tls.probe_needed(url, exc)
                and await asyncio.to_thread(tls.speaks_tls, url)
            ):
                raise tls.PortSpeaksTLS(f"{mask_url(url)} speaks TLS") from exc
            raise
        return connection

    def _install(self, connection: aio_pika.abc.AbstractConnection, url: str) -> None:
        self._connection = connection
        self.url = mask_url(url)
        self.blocked = None  # a new connection starts unblocked
        connection.close_callbacks.add(self._on_connection_closed)
        _watch_blocked(connection, self._on_blocked, self._on_unblocked)

    # -- blocked by the broker ---------------------------------------------------------------

    def _on_blocked(self, connection: aio_pika.abc.AbstractConnection, reason: str) -> None:
        """The broker blocks this connection (a memory or disk alarm)."""
        if connection is not self._connection:
            return
        self.blocked = reason or "a resource alarm"
        self._pipeline.emit(PublishingBlocked(self.blocked, service=self.settings.service))

    def _on_unblocked(self, connection: aio_pika.abc.AbstractConnection) -> None:
        """The broker's alarm cleared."""
        if connection is not self._connection or self.blocked is None:
            return
        self.blocked = None
        self._pipeline.emit(PublishingUnblocked(service=self.settings.service))

    # -- losing and restoring --------------------------------------------------------------

    def _on_connection_closed(self, connection: Any, reason: BaseException | None = None) -> None:
        """A connection closed (ours on purpose, or lost)."""
        current = self._connection
        if current is None or connection is not current or self._closed:
            return  # an old one, or the client was closed
        self.last_error = describe(reason)
        self._drop(current)  # its transport is gone; release the object too
        self._pipeline.emit(
            LinkLost(self.url, self.last_error or "", service=self.settings.service)
        )
        self._lost(reason or ConnectionError(self.last_error))
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    def _lost(self, reason: BaseException) -> None:
        for item in self.restorables:
            try:
                item._link_lost(reason)
            except Exception:
                log.exception("error while handling the connection loss")

    async def _supervise(self) -> None:
        """Supervisor task: reconnect (forever, with back-off) and restore, until ready.

        A connection lost while restoring finds this task still running (so
        ``_on_connection_closed`` starts no other): it loops until the connection it set up
        is still the current, open one after the restore.
        """
        failures = 0
        while not self._closed:
            try:
                await self._connect(deadline=None)
                self.reconnects += 1  # connected again, even if it is lost while restoring
                await self._restore_all()
            except Exception as exc:
                if self._closed:
                    break
                failures += 1
                error = str(exc) if isinstance(exc, MqkitError) else describe(exc)
                self.last_error = mask_url(error)
                log.warning("reconnecting %s failed (%s); retrying", self.name, self.last_error)
                self._drop_connection(exc)  # start over from a clean slate
                await asyncio.sleep(LINK_BACKOFF.delay(failures))
                continue
            if self.connection is not None:
                self._ready.set()
                self._pipeline.emit(
                    LinkRestored(self.url, self.reconnects, service=self.settings.service)
                )
                return

    def _drop_connection(self, reason: BaseException) -> None:
        """Close the current connection, if any (a restore that failed half-way); its
        parts hear that it is lost."""
        connection = self._connection
        if connection is not None:
            self._drop(connection)
            self._lost(reason)

    def _drop(self, connection: aio_pika.abc.AbstractConnection) -> None:
        """Forget ``connection`` (lost) if it is still the current one."""
        if self._connection is connection:
            self._ready.clear()
            self._connection = None
            self.blocked = None
            self._spawn(_discard(connection))

    async def _restore_all(self) -> None:
        for item in self.restorables:
            await item._restore()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _discard(connection: aio_pika.abc.AbstractConnection) -> None:
    """Close a connection that failed or was lost, whatever state it is in."""
    try:
        await asyncio.wait_for(connection.close(), timeout=5)
    except Exception as exc:  # it is dead already; closing is only bookkeeping
        log.debug("closing a dead connection: %s", describe(exc))


# aiormq handles the broker's connection.blocked / connection.unblocked frames in private
# methods and offers no callback: wrap them, per connection. Tested against the aiormq
# versions pyproject.toml allows (tests/unit/test_private_hooks.py fails loudly if the names
# go away); without them the link still works, it only cannot report a block.
_BLOCKED_HOOKS = (
    "_Connection__handle_connection_blocked",
    "_Connection__handle_connection_unblocked",
)


def _watch_blocked(
    connection: aio_pika.abc.AbstractConnection,
    on_blocked: Callable[[aio_pika.abc.AbstractConnection, str], None],
    on_unblocked: Callable[[aio_pika.abc.AbstractConnection], None],
) -> bool:
    """Have ``on_blocked(connection, reason)`` / ``on_unblocked(connection)`` called when
    the broker blocks / unblocks ``connection``; whether that could be arranged."""
    underlay = getattr(connection, "transport", None)  # aio-pika's UnderlayConnection
    amqp_connection: Any = getattr(underlay, "connection", None)  # aiormq's Connection
    hooks: list[Any] = [getattr(amqp_connection, name, None) for name in _BLOCKED_HOOKS]
    if amqp_connection is None or not all(callable(hook) for hook in hooks):
        log.debug("cannot watch %r for connection.blocked (aiormq changed?)", connection)
        return False
    handle_blocked, handle_unblocked = hooks

    async def blocked(frame: Any) -> None:
        await handle_blocked(frame)
        on_blocked(connection, str(getattr(frame, "reason", "") or ""))

    async def unblocked(frame: Any) -> None:
        await handle_unblocked(frame)
        on_unblocked(connection)

    setattr(amqp_connection, _BLOCKED_HOOKS[0], blocked)
    setattr(amqp_connection, _BLOCKED_HOOKS[1], unblocked)
    return True


def describe(exc: BaseException | None) -> str:
    """A one-line, password-free description of an aio-pika/aiormq/OS error."""
    if exc is None:
        return "connection closed"
    tls_problem = tls.ssl_reason(exc)
    if tls_problem is not None:
        return mask_url(tls_problem)
    if isinstance(exc, amqp.DeliveryError):
        text = str(exc)
    elif isinstance(exc, amqp.AMQPError) and exc.args:
        text = " ".join(str(a) for a in exc.args if a is not None)
    else:
        text = str(exc) or type(exc).__name__
    return mask_url(f"{type(exc).__name__}: {text}")


def reply_text(exc: BaseException) -> str:
    """The broker's reply text of an aiormq error (password-free)."""
    args = [str(a) for a in getattr(exc, "args", ()) if a is not None]
    return mask_url(" ".join(args) or str(exc))


def returned_reply(exc: amqp.PublishError) -> str:
    """The broker's reply code and text of a mandatory publish that came back."""
    returned: Any = exc.message.delivery if exc.message is not None else None
    return f"{returned.reply_code} {returned.reply_text}" if returned else reply_text(exc)


def reply_of(exc: amqp.AMQPChannelError) -> tuple[int | None, str]:
    """The reply code and text of a channel the broker closed (aiormq raises one class per
    known code, with the text as its argument; others as ``ChannelClosed(code, text)``)."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, reply_text(exc)
    if len(exc.args) == 2 and isinstance(exc.args[0], int):
        return exc.args[0], mask_url(str(exc.args[1]))
    return None, reply_text(exc)


_CODES: tuple[tuple[type[amqp.AMQPChannelError], int], ...] = (
    (amqp.ChannelPreconditionFailed, explain.PRECONDITION_FAILED),
    (amqp.ChannelNotFoundEntity, explain.NOT_FOUND),
    (amqp.ChannelLockedResource, explain.RESOURCE_LOCKED),
    (amqp.ChannelAccessRefused, explain.ACCESS_REFUSED),
)


def translate(exc: BaseException, *, what: str, missing: str | None = None) -> MqkitError:
    """The mqkit error for an aio-pika/aiormq exception raised while doing ``what`` (e.g.
    "declare queue 'orders'"). The one place where aiormq's errors are turned into mqkit's;
    the words come from :mod:`mqkit.explain`. ``missing``: the advice when the broker says
    NOT_FOUND."""
    if isinstance(exc, MqkitError):
        return exc
    if isinstance(exc, amqp.PublishError):  # a mandatory publish came back (basic.return)
        return explain.unroutable(what, returned_reply(exc))
    if isinstance(exc, amqp.DeliveryError):
        return explain.nacked(what)
    if isinstance(exc, amqp.AMQPChannelError):
        code, text = reply_of(exc)
        return explain.broker_refused(code, text, what=what, missing=missing)
    if isinstance(exc, asyncio.TimeoutError):
        return explain.no_answer(what)
    return explain.link_lost(what, describe(exc))


def connect_error(url: str, exc: BaseException) -> ConnectionFailed | None:
    """The error for a connection attempt to ``url`` that failed with ``exc`` in a way
    another attempt cannot fix (TLS, EXTERNAL login, wrong credentials, unknown vhost);
    ``None`` otherwise. The connecting half of :func:`translate`."""
    problem = tls.failure(url, exc)
    if problem is not None:
        return problem
    if isinstance(exc, (amqp.ProbableAuthenticationError, amqp.AuthenticationError)):
        return explain.wrong_credentials(url, describe(exc))
    text = reply_text(exc)
    if isinstance(exc, amqp.InvalidFrameError):
        # aiormq reports the broker's Connection.Close in answer to Connection.Open (unknown
        # vhost, or no permission on it) as an unexpected frame.
        vhost = "Connection.OpenOk" in text and "Connection.Close" in text
    else:
        vhost = isinstance(exc, amqp.ConnectionClosed) and "vhost" in text.lower()
    return explain.unknown_vhost(url, describe(exc)) if vhost else None


def cancelling() -> bool:
    """Whether the current task is being cancelled, rather than merely seeing a
    CancelledError that something it awaited raised (a handler's inner task, a future the
    closing channel rejected)."""
    task = asyncio.current_task()
    count = getattr(task, "cancelling", None)  # Python 3.11+
    return bool(count()) if count is not None else True
