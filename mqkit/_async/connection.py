"""The asyncio link to RabbitMQ: connect with fail-over, reconnect in the background, open
channels, declare topology, and translate aio-pika / aiormq errors (in one place).
Publishing lives in :mod:`.publisher`, batched acking in :mod:`.acks`.

A :class:`Link` owns one ``aio_pika`` connection (plain, not "robust": its consumer restore has
known bugs) and a supervisor that replaces it when it is lost: it tries ``settings.all_urls`` in
order with tenacity backoff, re-declares everything in :attr:`Link.topology`, then asks every
registered :class:`Restorable` (the started consumers) to attach again.

A client's link publishes on a second link of its own (:attr:`Link.publish_link`), as RabbitMQ
advises: a broker in a memory or disk alarm blocks every connection that publishes until the
alarm clears, and consumers and declares on the other connection keep going meanwhile. Each
link logs the broker's ``connection.blocked`` / ``connection.unblocked`` and keeps the reason
in :attr:`Link.blocked`.

Hot paths (publishing, acking) talk to the aiormq channel under the aio-pika channel: the same
protocol objects aio-pika itself uses, without building an aio-pika message per delivery.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import aio_pika
import aio_pika.abc
import aiormq
import aiormq.abc
import aiormq.exceptions as amqp
from aio_pika.connection import make_url
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from mqkit import explain, tls
from mqkit.declaring import DeclareMode, checks_only, missing_advice, use_existing
from mqkit.errors import ConnectionFailed, MqkitError, TopologyError
from mqkit.messages import Incoming, to_datetime
from mqkit.settings import Settings, mask_url
from mqkit.topology import Binding, Entity, Exchange, Queue, queue_arguments

from . import lenient

__all__ = [
    "AMQP_ERRORS",
    "LINK_ERRORS",
    "RPC_ERRORS",
    "Link",
    "Restorable",
    "cancelling",
    "connect_error",
    "describe",
    "incoming_of",
    "reply_text",
    "translate",
]

log = logging.getLogger("mqkit")

RECONNECT_MAX_DELAY = 5.0
RPC_TIMEOUT = 30.0

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


class Restorable(Protocol):
    """Something attached to the broker that must attach again after a reconnect.

    ``_restore`` is private: the link calls it, users never do.
    """

    async def _restore(self) -> None:
        """Attach again on the (new) connection; idempotent."""

    @property
    def attached(self) -> bool:
        """Whether it is attached to the broker right now."""


# --------------------------------------------------------------------------- error translation


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


def translate(exc: BaseException, *, what: str, missing: str | None = None) -> MqkitError:
    """Turn an aio-pika/aiormq exception into the mqkit error for ``what`` was being done
    (e.g. "declare queue 'orders'"); ``missing``: the advice when the broker says NOT_FOUND.

    This is the one place the async shell maps client errors (the words come from
    :mod:`mqkit.explain`); callers ``raise ... from exc``.
    """
    if isinstance(exc, MqkitError):
        return exc
    if isinstance(exc, amqp.PublishError):  # a mandatory publish came back (basic.return)
        returned: Any = exc.message.delivery if exc.message is not None else None
        reply = f"{returned.reply_code} {returned.reply_text}" if returned else reply_text(exc)
        return explain.unroutable(what, reply)
    if isinstance(exc, amqp.DeliveryError):
        return explain.nacked(what)
    if isinstance(exc, amqp.AMQPChannelError):
        code, text = _reply(exc)
        return explain.broker_refused(code, text, what=what, missing=missing)
    if isinstance(exc, asyncio.TimeoutError):
        return explain.no_answer(what)
    return explain.link_lost(what, describe(exc))


_CODES: tuple[tuple[type[amqp.AMQPChannelError], int], ...] = (
    (amqp.ChannelPreconditionFailed, explain.PRECONDITION_FAILED),
    (amqp.ChannelNotFoundEntity, explain.NOT_FOUND),
    (amqp.ChannelLockedResource, explain.RESOURCE_LOCKED),
    (amqp.ChannelAccessRefused, explain.ACCESS_REFUSED),
)


def _reply(exc: amqp.AMQPChannelError) -> tuple[int | None, str]:
    """The reply code and text of a channel the broker closed (aiormq raises one class per
    known code, with the text as its argument; others as ``ChannelClosed(code, text)``)."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, reply_text(exc)
    if len(exc.args) == 2 and isinstance(exc.args[0], int):
        return exc.args[0], mask_url(str(exc.args[1]))
    return None, reply_text(exc)


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


# --------------------------------------------------------------------------- wire helpers


def incoming_of(message: aiormq.abc.DeliveredMessage) -> Incoming:
    """A delivery (basic.deliver or basic.get-ok) as the core sees it."""
    props = message.header.properties
    delivery: Any = message.delivery
    return Incoming(
        body=message.body,
        delivery_tag=delivery.delivery_tag,
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        type=props.message_type,
        app_id=props.app_id,
        content_type=props.content_type,
        timestamp=to_datetime(props.timestamp),
        headers=lenient.encodable(props.headers) if props.headers else {},
        priority=props.priority,
        expiration=props.expiration,
        redelivered=bool(delivery.redelivered),
        exchange=delivery.exchange or "",
        routing_key=delivery.routing_key or "",
    )


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context for an amqps:// URL (raises tls.TLSSetupError; see :mod:`mqkit.tls`)."""
    return tls.ssl_context(settings)


async def _discard(connection: aio_pika.abc.AbstractConnection) -> None:
    """Close a connection that failed or was lost, whatever state it is in."""
    try:
        await asyncio.wait_for(connection.close(), timeout=5)
    except Exception as exc:  # it is dead already; closing is only bookkeeping
        log.debug("mqkit: closing a dead connection: %s", describe(exc))


class _Unreachable(Exception):
    """Every URL failed this round (network-level); worth another try."""


# --------------------------------------------------------------------------- the link


class Link:
    """One connection to the broker that survives losing it.

    ``open()`` connects (raising :class:`ConnectionFailed` within ``connect_timeout``);
    afterwards the link reconnects by itself until ``close()``.

    ``purpose`` names the connection in log lines. ``separate_publishing`` (the default) gives
    the link a second link, :attr:`publish_link`, opened and closed with it, on which
    :attr:`publishing` publishes; without it the link publishes on its own connection.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        purpose: str = "consuming",
        separate_publishing: bool = True,
    ) -> None:
        self.settings = settings
        self.name = name
        self.purpose = purpose
        self.reconnects = 0
        self.last_error_at = 0.0  # loop-independent time.monotonic() of the last error
        self._last_error: str | None = None
        self.blocked: str | None = None  # why the broker blocks this connection, if it does
        self.url = ""
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self._opened = False
        self._reconnector: asyncio.Task[None] | None = None
        # The import is here because publisher.py builds on this module.
        from .publisher import Publisher

        self.publish_link = self
        if separate_publishing:
            self.publish_link = Link(
                settings, name=f"{name} publishing", purpose="publishing", separate_publishing=False
            )
            self.publishing: Publisher = self.publish_link.publishing
        else:
            self.publishing = Publisher(self)
        self._declarer: aiormq.abc.AbstractChannel | None = None
        self._declare_lock = asyncio.Lock()
        self._topology: dict[Entity, None] = {}
        self._existing: set[Entity] = set()  # found in another shape: checked, not declared
        self._restorables: dict[Restorable, None] = {}
        self._background: set[asyncio.Future[Any]] = set()

    # ----------------------------------------------------------------- state

    @property
    def last_error(self) -> str | None:
        """The last connection-level error, password masked (``None``: none yet)."""
        return self._last_error

    @last_error.setter
    def last_error(self, error: str | None) -> None:
        self._last_error = error
        self.last_error_at = time.monotonic()

    @property
    def connected(self) -> bool:
        """Connected and the topology re-declared."""
        return self._ready.is_set() and self._connection is not None

    @property
    def opened(self) -> bool:
        """``open()`` succeeded (the link may be down or closed since)."""
        return self._opened

    @property
    def closed(self) -> bool:
        """``close()`` was called."""
        return self._closing

    @property
    def topology(self) -> tuple[Entity, ...]:
        """Every entity declared so far, in declaration order."""
        return tuple(self._topology)

    @property
    def restorables(self) -> tuple[Restorable, ...]:
        """The started consumers."""
        return tuple(self._restorables)

    def forget(self, entities: Iterable[Entity]) -> None:
        """Stop re-declaring ``entities`` (temporary ones that went away with a consumer)."""
        for entity in entities:
            self._topology.pop(entity, None)
            self._existing.discard(entity)

    def register(self, item: Restorable) -> None:
        """Restore ``item`` after every reconnect (until :meth:`unregister`)."""
        self._restorables[item] = None

    def unregister(self, item: Restorable) -> None:
        """Stop restoring ``item``."""
        self._restorables.pop(item, None)

    # ----------------------------------------------------------------- connect / close

    async def open(self) -> None:
        """Connect, trying every URL with backoff until ``connect_timeout``."""
        if self._opened:
            return
        deadline = time.monotonic() + self.settings.connect_timeout
        urls = self.settings.all_urls
        tried: list[str] = []
        last: list[BaseException] = []

        def wait(state: RetryCallState) -> float:
            delay = wait_exponential(multiplier=0.1, min=0.05, max=2.0)(state)
            return float(max(0.0, min(delay, deadline - time.monotonic())))

        def stop(state: RetryCallState) -> bool:
            return time.monotonic() >= deadline - 0.02

        try:
            async for attempt in AsyncRetrying(
                wait=wait, stop=stop, retry=retry_if_exception_type(_Unreachable), reraise=True
            ):
                with attempt:
                    connection, url = await self._connect_any(urls, deadline, tried, last)
        except _Unreachable:
            cause = describe(last[-1]) if last else None
            error = explain.unreachable(tried or urls, self.settings.connect_timeout, cause)
            self.last_error = str(error)
            raise error from (last[-1] if last else None)
        self._install(connection, url)
        self._opened = True
        self._ready.set()
        if self.publish_link is not self:
            try:
                await self.publish_link.open()
            except BaseException:
                await self._unopen()
                raise

    async def _unopen(self) -> None:
        """Back to before :meth:`open` (the publishing link could not connect): a later
        ``open()`` tries again."""
        connection, self._connection = self._connection, None
        self._ready.clear()
        self._opened = False
        if connection is not None:
            await _discard(connection)

    async def _connect_any(
        self,
        urls: Sequence[str],
        deadline: float | None,
        tried: list[str],
        last: list[BaseException],
    ) -> tuple[aio_pika.abc.AbstractConnection, str]:
        """Try each URL once; fatal errors raise ConnectionFailed, the rest _Unreachable."""
        for url in urls:
            if deadline is None:
                per_try = max(5.0, self.settings.connect_timeout)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                per_try = min(left, max(2.0, self.settings.connect_timeout / len(urls)))
            tried.append(url)
            try:
                return await self._connect_one(url, per_try), url
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                last.append(exc)
                fatal = connect_error(url, exc)
                if fatal is not None:
                    raise fatal from exc
                log.debug("mqkit: cannot connect to %s: %s", mask_url(url), describe(exc))
        raise _Unreachable()

    async def _connect_one(self, url: str, timeout: float) -> aio_pika.abc.AbstractConnection:
        # aio_pika.connect() drops the Connection object when connecting fails, and an
        # unclosed one warns when collected; build it here so a failure closes it.
        options: dict[str, Any] = {"heartbeat": self.settings.heartbeat}
        if tls.external(self.settings):
            # aiormq's switch for SASL EXTERNAL. Settings refuse URLs with parameters of their
            # own, so this is the only one.
            options["auth"] = "external"
        connection = aio_pika.Connection(
            make_url(url, **options),
            ssl_context=_ssl_context(self.settings) if tls.uses_tls(url) else None,
            client_properties={"connection_name": self.name},
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
        self._declarer = None
        self.blocked = None
        connection.close_callbacks.add(self._on_connection_closed)
        _watch_blocked(connection, self._on_blocked, self._on_unblocked)

    def _on_blocked(self, connection: aio_pika.abc.AbstractConnection, reason: str) -> None:
        """The broker blocks this connection (a memory or disk alarm)."""
        if connection is not self._connection:
            return
        self.blocked = reason or "a resource alarm"
        log.warning(
            "the broker blocked the %s connection to %s (%s): publishes get no confirm until "
            "its memory or disk alarm clears",
            self.purpose,
            self.url,
            self.blocked,
        )

    def _on_unblocked(self, connection: aio_pika.abc.AbstractConnection) -> None:
        """The broker's alarm cleared."""
        if connection is not self._connection:
            return
        if self.blocked is not None:
            self.blocked = None
            log.info(
                "the broker unblocked the %s connection to %s; publishing resumes",
                self.purpose,
                self.url,
            )

    def _on_connection_closed(self, sender: Any, exc: BaseException | None = None) -> None:
        connection = self._connection
        if connection is None or sender is not connection or self._closing:
            return
        self.last_error = describe(exc)
        self._drop(connection)  # its transport is gone; release the object too
        log.warning(
            "lost the %s connection to %s (%s); reconnecting",
            self.purpose,
            self.url,
            self.last_error,
        )
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = asyncio.get_running_loop().create_task(self._reconnect())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reconnect(self) -> None:
        """Reconnect until it works or the link is closed; then replay topology and consumers.

        Loops until the connection it set up is still the current, open one after the replay:
        a connection lost while re-declaring or restoring consumers finds this task still
        running (so ``_on_connection_closed`` starts no other) and must be replaced here.
        """
        while not self._closing:
            connection, url = await self._connect_until_up()
            if self._closing:
                await _discard(connection)
                return
            self._install(connection, url)
            for entity in list(self._topology):
                if not self._is_current(connection):
                    break
                try:
                    await self._declare_entity(entity)
                except Exception as exc:  # keep going: one bad entity must not block the rest
                    log.error("mqkit: could not re-declare after reconnecting: %s", exc)
            if self._is_current(connection):
                self.reconnects += 1
                # Restoring consumers opens channels, which waits for the link to be ready.
                self._ready.set()
                log.warning(
                    "reconnected the %s connection to %s (reconnect #%d)",
                    self.purpose,
                    self.url,
                    self.reconnects,
                )
                for item in list(self._restorables):
                    try:
                        await item._restore()
                    except Exception as exc:
                        log.error(
                            "mqkit: could not restore %r after reconnecting: %s",
                            item,
                            describe(exc),
                        )
            if self._is_current(connection):
                return
            self._drop(connection)
            log.warning(
                "mqkit: lost the connection to %s again while restoring (%s); reconnecting",
                self.url,
                self.last_error,
            )

    def _is_current(self, connection: aio_pika.abc.AbstractConnection) -> bool:
        return self._connection is connection and not connection.is_closed

    def _drop(self, connection: aio_pika.abc.AbstractConnection) -> None:
        """Forget ``connection`` (lost) if it is still the current one."""
        if self._connection is connection:
            self._ready.clear()
            self._connection = None
            self._declarer = None
            self.blocked = None
            self._spawn(_discard(connection))

    async def _connect_until_up(self) -> tuple[aio_pika.abc.AbstractConnection, str]:
        """Try every URL with backoff until one answers (or the task is cancelled)."""
        urls = self.settings.all_urls
        async for attempt in AsyncRetrying(
            wait=wait_exponential(multiplier=0.2, min=0.1, max=RECONNECT_MAX_DELAY),
            retry=retry_if_exception_type(Exception),
        ):
            with attempt:
                last: list[BaseException] = []
                try:
                    return await self._connect_any(urls, None, [], last)
                except _Unreachable:
                    self.last_error = describe(last[-1]) if last else "no URL answered"
                    raise
                except ConnectionFailed as exc:  # credentials or vhost: may be fixed later
                    self.last_error = mask_url(str(exc))
                    raise
        raise AssertionError("unreachable: tenacity retries until success")

    async def close(self) -> None:
        """Close the connection (and :attr:`publish_link`'s) and stop reconnecting;
        idempotent."""
        if self.publish_link is not self:
            await self.publish_link.close()
        if self._closing:
            return
        self._closing = True
        self._ready.clear()
        if self._reconnector is not None and not self._reconnector.done():
            self._reconnector.cancel()
            await asyncio.gather(self._reconnector, return_exceptions=True)
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), timeout=10)
            except Exception as exc:  # closing a dead connection may fail; it is closed anyway
                log.debug("mqkit: error while closing the connection: %s", describe(exc))

    # ----------------------------------------------------------------- channels

    async def wait_ready(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for the link; whether it is up."""
        if self._ready.is_set():
            return True
        if self._closing or not self._opened:
            return False
        if timeout is not None and timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return not self._closing

    def require_open(self, what: str) -> None:
        """Raise ConnectionFailed unless the link was opened and not closed."""
        if self._closing:
            raise explain.closed(what)
        if not self._opened:
            raise ConnectionFailed(
                f"{what}: the client is not connected; use `async with AsyncClient(...)` "
                "or `await client.connect()` first"
            )

    async def channel(
        self, *, confirms: bool = False, timeout: float | None = None
    ) -> aio_pika.abc.AbstractChannel:
        """A new aio-pika channel (waiting up to ``timeout`` in all, for the link and for the
        broker to open it; default ``connect_timeout`` for the link, RPC_TIMEOUT to open)."""
        self.require_open("open a channel")
        wait = self.settings.connect_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        if not await self.wait_ready(wait):
            raise explain.not_connected("open a channel", wait, self.last_error)
        left = None if timeout is None else max(0.001, deadline - time.monotonic())
        return await self._open_channel(confirms, left)

    async def _open_channel(
        self, confirms: bool, timeout: float | None = None
    ) -> aio_pika.abc.AbstractChannel:
        """A channel on the current connection, ready or not (topology replay uses it);
        the broker has ``timeout`` (at most RPC_TIMEOUT) seconds to open it."""
        connection = self._connection
        if connection is None:
            raise explain.link_lost("open a channel", self.last_error or "connection closed")
        wait = RPC_TIMEOUT if timeout is None else min(timeout, RPC_TIMEOUT)
        try:
            channel = connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
            await asyncio.wait_for(channel.initialize(), wait)
        except AMQP_ERRORS as exc:
            raise translate(exc, what="open a channel") from exc
        except asyncio.TimeoutError as exc:
            raise explain.no_answer("open a channel", wait) from exc
        return channel

    async def underlay(
        self, *, confirms: bool = False, timeout: float | None = None
    ) -> aiormq.abc.AbstractChannel:
        """A new aiormq channel (the protocol object under an aio-pika channel), within
        ``timeout`` seconds (see :meth:`channel`)."""
        channel = await self.channel(confirms=confirms, timeout=timeout)
        return await channel.get_underlay_channel()

    # ----------------------------------------------------------------- declare

    async def declare(self, entities: Iterable[Entity], *, force: bool = False) -> None:
        """Declare what is not declared yet (``force``: all of it); cache it for replay."""
        todo = [e for e in entities if force or e not in self._topology]
        if not todo:
            return
        self.require_open("declare topology")
        if not await self.wait_ready(self.settings.connect_timeout):
            raise explain.not_connected(
                "declare topology", self.settings.connect_timeout, self.last_error
            )
        async with self._declare_lock:
            for entity in todo:
                if not force and entity in self._topology:
                    continue
                await self._declare_entity(entity)
                self._topology[entity] = None

    async def _declare_entity(self, entity: Entity) -> None:
        """Declare (or check) ``entity`` as ``settings.declare`` says
        (:mod:`mqkit.declaring`); remember one found in another shape, to check it only."""
        mode = self.settings.declare
        if checks_only(entity, mode, known=entity in self._existing):
            await self._declare_once(entity, passive=True, missing=mode)
            return
        try:
            await self._declare_once(entity, passive=False)
        except TopologyError as exc:
            if not use_existing(entity, mode, exc.reply_code):
                raise
            await self._declare_once(entity, passive=True, missing=mode)
            log.warning(explain.using_existing(entity, exc))
            self._existing.add(entity)

    async def _declare_once(
        self, entity: Entity, *, passive: bool, missing: DeclareMode | None = None
    ) -> None:
        what = explain.declaring(entity, passive=passive)
        channel = self._declarer
        if channel is None or channel.is_closed:
            opened = await self._open_channel(confirms=False)
            channel = self._declarer = await opened.get_underlay_channel()
        try:
            if isinstance(entity, Queue):
                if passive:
                    await channel.queue_declare(entity.name, passive=True, timeout=RPC_TIMEOUT)
                    return
                await channel.queue_declare(
                    entity.name,
                    durable=entity.durable,
                    exclusive=entity.exclusive,
                    auto_delete=entity.auto_delete,
                    arguments=queue_arguments(entity, self.settings.queue_type),
                    timeout=RPC_TIMEOUT,
                )
            elif isinstance(entity, Exchange):
                if passive:
                    await channel.exchange_declare(entity.name, passive=True, timeout=RPC_TIMEOUT)
                    return
                await channel.exchange_declare(
                    entity.name,
                    exchange_type=entity.type,
                    durable=entity.durable,
                    auto_delete=entity.auto_delete,
                    timeout=RPC_TIMEOUT,
                )
            else:
                assert isinstance(entity, Binding)
                await channel.queue_bind(
                    entity.queue,
                    entity.exchange,
                    routing_key=entity.routing_key,
                    timeout=RPC_TIMEOUT,
                )
        except RPC_ERRORS as exc:
            self._declarer = None  # a channel error closed it; the next declare opens another
            advice = missing_advice(entity, missing) if missing else None
            raise translate(exc, what=what, missing=advice) from exc


# aiormq handles the broker's connection.blocked / connection.unblocked frames in private
# methods and offers no callback: wrap them, per connection. Tested against aiormq 7.2 (see
# tests/unit/test_private_hooks.py, which fails loudly if the names go away); without them the
# link still works, it only cannot report a block.
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


def cancelling() -> bool:
    """Whether the current task is being cancelled, rather than merely seeing a
    CancelledError that something it awaited raised (a handler's inner task, a future the
    closing channel rejected)."""
    task = asyncio.current_task()
    count = getattr(task, "cancelling", None)  # Python 3.11+
    return bool(count()) if count is not None else True
