"""A TCP proxy that injects network faults between a client and a broker.

:class:`FaultProxy` listens on ``127.0.0.1`` (a free port) and forwards every connection to
the broker of the URL it was given. Tests point a client at :attr:`FaultProxy.url` and then
break the link on purpose: cut it, black-hole it, slow it down, or refuse new connections.
The proxy runs its own event loop on a daemon thread, so blocking tests and asyncio tests
drive it with the same plain method calls::

    from mqkit.testing import FaultProxy

    with FaultProxy("amqp://guest:guest@localhost:5672/") as proxy:
        with mqkit.Client(url=proxy.url) as client:
            ...
            proxy.cut()               # every connection drops, both directions, at once
            proxy.blackhole(3.0)      # nothing passes for 3 s; connections stay open
            proxy.refuse(True)        # new connections are refused, like a down host

It has no dependency on the rest of mqkit (standard library only).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FaultProxy"]

_T = TypeVar("_T")
_CHUNK = 64 * 1024
_LISTEN_HOST = "127.0.0.1"
_CALL_TIMEOUT = 10.0


class _Link:
    """One proxied connection: the client side, the upstream side and their two pumps."""

    def __init__(self, client_writer: asyncio.StreamWriter) -> None:
        self.client_writer = client_writer
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[Any]] = []  # the connection's handler and its pumps

    def abort(self) -> None:
        # abort() (not close()) so both peers see the link die at once, with no graceful
        # FIN handshake and no buffered bytes flushed: a cut cable, not a polite goodbye.
        for writer in (self.client_writer, self.upstream_writer):
            if writer is not None:
                writer.transport.abort()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class FaultProxy:
    """A fault-injecting TCP proxy in front of the broker named by ``upstream_url``.

    Loopback only: it listens on ``127.0.0.1`` and forwards to a loopback broker. Every
    control method is a plain, thread-safe call that returns once the fault is in effect;
    :meth:`stop` leaves nothing running (no task, no timer, no thread).

    ``url`` is ``upstream_url`` with host and port replaced by the proxy's, so credentials,
    vhost and query parameters carry over. (Do not use it with TLS hostname verification.)

    Example::

        proxy = FaultProxy("amqp://guest:guest@localhost:5672/").start()
        try:
            conn = pika.BlockingConnection(pika.URLParameters(proxy.url))
            proxy.cut()                       # conn is dead now
        finally:
            proxy.stop()
    """

    def __init__(self, upstream_url: str, *, port: int = 0) -> None:
        parts = urlsplit(upstream_url)
        if not parts.hostname:
            raise ValueError(f"upstream URL names no host: {_mask(upstream_url)!r}")
        if not _is_loopback(parts.hostname):
            # Fault injection is for tests on one machine; a proxy that forwarded to a remote
            # host would be an open relay on the test box.
            raise ValueError(
                f"FaultProxy forwards to loopback brokers only; {parts.hostname!r} is not "
                "a loopback host (use localhost or 127.0.0.1)"
            )
        self._upstream_url = upstream_url
        self._upstream_host = parts.hostname
        default_port = 5671 if parts.scheme == "amqps" else 5672
        self._upstream_port = parts.port or default_port
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing: asyncio.Event | None = None
        self._restore_timer: asyncio.TimerHandle | None = None
        self._latency = 0.0
        self._refusing = False
        self._accepted = 0
        self._bytes = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Start listening; returns ``self``. Starting a started proxy does nothing."""
        if self._loop is not None:
            return self
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="mqkit-fault-proxy", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._call(self._open())
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def stop(self) -> None:
        """Close the listener and every connection, cancel every timer, end the thread.

        Idempotent; after it returns nothing of the proxy runs any more.
        """
        if self._loop is None:
            return
        try:
            self._call(self._close())
        finally:
            self._shutdown_loop()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._loop is None else f"listening on {_LISTEN_HOST}:{self._port}"
        return (
            f"FaultProxy({state} -> {self._upstream_host}:{self._upstream_port}, "
            f"connections={len(self._links)})"
        )

    # -- what tests read -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on (``127.0.0.1``)."""
        self._require_started()
        return self._port

    @property
    def url(self) -> str:
        """The upstream URL, pointing through the proxy (same credentials, vhost, query)."""
        self._require_started()
        parts = urlsplit(self._upstream_url)
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@" if userinfo else ""
        netloc += f"{_LISTEN_HOST}:{self._port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @property
    def connections(self) -> int:
        """How many client connections are open through the proxy right now."""
        return len(self._links)

    @property
    def accepted(self) -> int:
        """How many client connections the proxy has accepted since it started."""
        return self._accepted

    @property
    def forwarded_bytes(self) -> int:
        """Bytes forwarded so far, both directions together."""
        return self._bytes

    # -- faults ----------------------------------------------------------------------------

    def cut(self) -> int:
        """Close every current connection, both directions, at once; returns how many.

        New connections are accepted as before (combine with :meth:`refuse` for a host that
        goes down and stays down).
        """
        return self._call(self._cut())

    def blackhole(self, seconds: float | None = None) -> None:
        """Stop forwarding bytes, silently: connections stay open but nothing passes.

        Lasts until :meth:`restore`, or ``seconds`` if given. Bytes sent meanwhile are held
        (as TCP would retransmit them) and flow once the link is restored; new connections
        are accepted but not connected upstream until then.
        """
        if seconds is not None and seconds < 0:
            raise ValueError(f"blackhole seconds must be >= 0, got {seconds}")
        self._call(self._blackhole(seconds))

    def restore(self) -> None:
        """End a black hole and any latency: bytes flow at full speed again."""
        self._call(self._restore())

    def latency(self, seconds: float) -> None:
        """Delay each forwarded chunk by ``seconds`` (0 turns the delay off)."""
        if seconds < 0:
            raise ValueError(f"latency must be >= 0 seconds, got {seconds}")
        self._latency = float(seconds)

    def refuse(self, refusing: bool = True) -> None:
        """Refuse new connections (``True``) like a host that is down, or accept them again.

        The listening socket is closed while refusing, so a client gets a real
        "connection refused"; connections already open are left alone (see :meth:`cut`).
        """
        self._call(self._refuse(refusing))

    # -- internals (on the proxy's loop) ---------------------------------------------------

    async def _open(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, _LISTEN_HOST, self._port, reuse_address=True
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        if self._restore_timer is not None:
            self._restore_timer.cancel()
            self._restore_timer = None
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._cut()
        # Whatever is left (a connect still in progress, a pump between two awaits) ends here.
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _cut(self) -> int:
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.difference_update(links)
        tasks = [task for link in links for task in link.tasks]
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(links)

    async def _blackhole(self, seconds: float | None) -> None:
        assert self._flowing is not None
        self._flowing.clear()
        if self._restore_timer is not None:
            self._restore_timer.cancel()
            self._restore_timer = None
        if seconds is not None:
            loop = asyncio.get_running_loop()
            self._restore_timer = loop.call_later(seconds, self._flowing.set)

    async def _restore(self) -> None:
        assert self._flowing is not None
        if self._restore_timer is not None:
            self._restore_timer.cancel()
            self._restore_timer = None
        self._latency = 0.0
        self._flowing.set()

    async def _refuse(self, refusing: bool) -> None:
        if refusing == self._refusing:
            return
        self._refusing = refusing
        if refusing:
            assert self._server is not None
            # close() stops listening at once. No wait_closed(): on Python >= 3.12 it also
            # waits for the open connections, which refusing must leave alone.
            self._server.close()
            self._server = None
        else:
            await self._listen()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        link = _Link(writer)
        self._links.add(link)
        current = asyncio.current_task()
        if current is not None:
            link.tasks.append(current)
        try:
            await self._wait_flowing()
            up_reader, up_writer = await asyncio.open_connection(
                self._upstream_host, self._upstream_port
            )
            link.upstream_writer = up_writer
            if link not in self._links:  # cut while connecting upstream
                up_writer.transport.abort()
                return
            pumps = [
                asyncio.create_task(self._pump(reader, up_writer)),
                asyncio.create_task(self._pump(up_reader, writer)),
            ]
            link.tasks.extend(pumps)
            # When either direction ends (EOF or error), the whole link goes: an AMQP peer
            # never half-closes, and a dangling half would hide a fault from the test.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    return
                if self._latency:
                    await asyncio.sleep(self._latency)
                await self._wait_flowing()
                writer.write(data)
                await writer.drain()
                self._bytes += len(data)

    async def _wait_flowing(self) -> None:
        assert self._flowing is not None
        if not self._flowing.is_set():
            await self._flowing.wait()

    # -- plumbing --------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("FaultProxy is not started: call start() or use it in a with")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("FaultProxy methods cannot be called from the proxy's own loop")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(_CALL_TIMEOUT)

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(_CALL_TIMEOUT)
        if not loop.is_running():
            loop.close()

    def _require_started(self) -> None:
        if self._loop is None:
            raise RuntimeError("FaultProxy is not started: call start() or use it in a with")


def _mask(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) resolves only to loopback addresses."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
