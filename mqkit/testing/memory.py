"""An in-memory RabbitMQ for tests: ``mqkit.Client(url="memory://")``.

A :class:`MemoryBroker` is a small AMQP 0-9-1 broker that runs in the test's own process,
on a thread of its own, listening on a loopback port. Both clients reach it through their
usual AMQP stacks (pika for ``Client``, aio-pika for ``AsyncClient``), so a service under
test runs exactly the code it runs in production, and so do raw pika or aio-pika clients a
test uses. ``memory://NAME`` names a broker of the process (created on first use);
``memory://`` is the one named ``""``.

It models what mqkit relies on, with RabbitMQ's semantics: the default, direct, fanout,
topic and headers exchanges (and exchange-to-exchange bindings, alternate exchanges);
mandatory returns; publisher confirms (a ``reject-publish`` queue nacks); prefetch
(per consumer, or per channel with ``global``), acks, nacks and requeues with
``redelivered``; durable, exclusive and auto-delete queues; the queue arguments
``x-queue-type`` (classic, quorum), ``x-message-ttl``, per-message ``expiration``,
``x-dead-letter-exchange``, ``x-dead-letter-routing-key``, ``x-delivery-limit`` (with the
``x-delivery-count`` header; 20 on a quorum queue declared without one, as in RabbitMQ 4),
``x-max-length`` with ``x-overflow``; dead-lettering with ``x-death`` and
``x-first-death-*``, a dead-letter cycle without a rejection dropped; declare conflicts
and their reply codes and texts; ``basic.get``; direct reply-to; a message size limit.

It does not model: persistence and broker restarts, clustering, memory and disk alarms,
connection/channel limits, permissions (a user of ``broker.users``, ``guest``/``guest`` by
default, may do anything in the one vhost ``/``), streams, priorities, ``x-expires``,
``x-max-length-bytes``, transactions, TLS. Messages that expire are dead-lettered when they
reach the head of the queue, as RabbitMQ's classic queues do.

Its clock is virtual: :meth:`MemoryBroker.advance` moves it forward, so messages held by a
TTL (mqkit's broker-held retries) come back at once; :meth:`MemoryBroker.run_until_idle`
delivers and advances until nothing is left to do.

```python
from mqkit.testing import memory_broker

broker = memory_broker("billing-test")         # memory://billing-test
with mqkit.Client(url=broker.url, service="billing") as client:
    client.producer(Order, queue="orders").publish(Order(id=1))
    assert broker.count("orders") == 1
    [message] = broker.peek("orders")
    assert message.decode(Order) == Order(id=1)
broker.close()
```
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fnmatch
import itertools
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

from pamqp import commands as spec
from pamqp import frame as amqp_frame
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from mqkit.urls import MEMORY_SCHEME as SCHEME
from mqkit.urls import memory_name

__all__ = [
    "MemoryBroker",
    "MemoryMessage",
    "memory_broker",
    "memory_name",
]

T = TypeVar("T")

_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
_FRAME_END = b"\xce"
_FRAME_MAX = 131072
_CHANNEL_MAX = 2047
# RabbitMQ 4.0's delivery limit of a quorum queue declared without x-delivery-limit.
QUORUM_DELIVERY_LIMIT = 20
# RabbitMQ 4.0's default max_message_size.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
_REPLY_TO = "amq.rabbitmq.reply-to"
# Queue arguments RabbitMQ compares on a redeclare (others are ignored).
_COMPARED_ARGS = frozenset(
    {
        "x-dead-letter-exchange",
        "x-dead-letter-routing-key",
        "x-dead-letter-strategy",
        "x-delivery-limit",
        "x-expires",
        "x-max-length",
        "x-max-length-bytes",
        "x-max-priority",
        "x-message-ttl",
        "x-overflow",
        "x-queue-mode",
        "x-queue-type",
        "x-single-active-consumer",
    }
)
_OVERFLOWS = ("drop-head", "reject-publish", "reject-publish-dlx")
_QUEUE_TYPES = ("classic", "quorum")

# Reply codes (AMQP 0-9-1).
NO_ROUTE = 312
ACCESS_REFUSED = 403
NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406
CONNECTION_FORCED = 320
NOT_ALLOWED = 530
COMMAND_INVALID = 503
CHANNEL_ERROR = 504
NOT_IMPLEMENTED = 540
FRAME_ERROR = 501


_BROKERS: dict[str, MemoryBroker] = {}
_BROKERS_LOCK = threading.Lock()


def memory_broker(name: str = "") -> MemoryBroker:
    """The in-memory broker ``memory://NAME`` of this process, started on first use (again
    after :meth:`MemoryBroker.close`)."""
    if memory_name(f"{SCHEME}{name}") != name:
        raise ValueError(f"invalid memory broker name {name!r}")
    with _BROKERS_LOCK:
        broker = _BROKERS.get(name)
        if broker is None or broker.closed:
            broker = _BROKERS[name] = MemoryBroker(name)
        return broker


def amqp_url(url: str) -> str:
    """The AMQP URL that reaches the broker a ``memory://NAME`` URL names (``url`` itself
    when it is not a memory URL)."""
    name = memory_name(url)
    return url if name is None else memory_broker(name).amqp_url


# -- messages ------------------------------------------------------------------------------------


@dataclass
class MemoryMessage:
    """A message as the broker holds it. ``properties`` are pamqp's ``Basic.Properties``
    (``None`` when the client sent a content header that could not be parsed: it is kept as
    bytes and delivered as it came)."""

    exchange: str
    routing_key: str
    body: bytes
    properties: spec.Basic.Properties | None
    raw_header: bytes | None = None
    redelivered: bool = False
    delivery_count: int = 0
    seq: int = 0
    expires_at: float | None = None  # on the broker's clock, while in a queue
    # (queue, reason) of each dead-lettering by this broker, latest first: its cycle check
    # (what a client put in x-death does not count, as in RabbitMQ 4.0).
    dead_path: tuple[tuple[str, str], ...] = ()

    @property
    def headers(self) -> dict[str, Any]:
        return dict((self.properties.headers if self.properties else None) or {})

    @property
    def message_id(self) -> str | None:
        return self.properties.message_id if self.properties else None

    def decode(self, model: type[T]) -> T:
        """The body as ``model`` (a pydantic model class), as a consumer of it would see it."""
        from mqkit.messages import decode

        return decode(self.body, model)  # type: ignore[type-var]

    def copy(self) -> MemoryMessage:
        return MemoryMessage(
            self.exchange,
            self.routing_key,
            self.body,
            self.properties,
            self.raw_header,
            self.redelivered,
            self.delivery_count,
            self.seq,
            dead_path=self.dead_path,
        )


# -- topology ------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Binding:
    destination: str
    routing_key: str
    arguments: dict[str, Any]
    to_exchange: bool = False


@dataclass(eq=False)
class _Exchange:
    name: str
    type: str
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)
    bindings: list[_Binding] = field(default_factory=list)


@dataclass(eq=False)
class _Consumer:
    tag: str
    queue: _Queue
    channel: _Channel
    no_ack: bool
    exclusive: bool
    prefetch: int  # 0: no limit
    unacked: int = 0

    def has_room(self) -> bool:
        if self.no_ack:
            return True
        if self.prefetch and self.unacked >= self.prefetch:
            return False
        return self.channel.has_room()


@dataclass(eq=False)
class _Queue:
    name: str
    durable: bool
    exclusive_owner: _Connection | None
    auto_delete: bool
    arguments: dict[str, Any]
    messages: list[MemoryMessage] = field(default_factory=list)
    consumers: list[_Consumer] = field(default_factory=list)
    next_consumer: int = 0
    had_consumer: bool = False
    timer: asyncio.TimerHandle | None = None
    deleted: bool = False
    in_flight: int = 0  # delivered (to a consumer or basic.get) and not yet settled

    @property
    def quorum(self) -> bool:
        return self.arguments.get("x-queue-type") == "quorum"

    @property
    def ttl_ms(self) -> int | None:
        value = self.arguments.get("x-message-ttl")
        return value if isinstance(value, int) else None

    @property
    def delivery_limit(self) -> int | None:
        if not self.quorum:
            return None
        value = self.arguments.get("x-delivery-limit")
        return value if isinstance(value, int) else QUORUM_DELIVERY_LIMIT

    def unacked(self) -> int:
        """Deliveries of this queue not yet acked (consumers', cancelled ones' and gets')."""
        return self.in_flight


class _ChannelError(Exception):
    """The broker closes the channel (or, with ``connection=True``, the connection)."""

    def __init__(self, code: int, text: str, method: Any = None, *, connection: bool = False):
        super().__init__(text)
        self.code = code
        self.text = text
        frame_id: int = getattr(method, "frame_id", 0) or 0
        self.class_id: int = frame_id >> 16
        self.method_id: int = frame_id & 0xFFFF
        self.connection = connection


def _precondition(text: str, method: Any) -> _ChannelError:
    return _ChannelError(PRECONDITION_FAILED, f"PRECONDITION_FAILED - {text}", method)


def _not_found(what: str, name: str, method: Any) -> _ChannelError:
    return _ChannelError(NOT_FOUND, f"NOT_FOUND - no {what} '{name}' in vhost '/'", method)


def _described(value: Any) -> str:
    """A value as RabbitMQ describes it in an ``inequivalent arg`` text."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"the value '{str(value).lower()}' of type 'bool'"
    if isinstance(value, int):
        kind = "signedint" if -(2**31) <= value < 2**31 else "long"
        return f"the value '{value}' of type '{kind}'"
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    return f"the value '{value}' of type 'longstr'"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (bytes, bytearray)):
        a = bytes(a).decode("utf-8", "replace")
    if isinstance(b, (bytes, bytearray)):
        b = bytes(b).decode("utf-8", "replace")
    return bool(a == b)


def _topic_matches(pattern: str, key: str) -> bool:
    words, keys = pattern.split("."), key.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(words):
            return j == len(keys)
        if words[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(keys) + 1))
        if j == len(keys):
            return False
        return (words[i] == "*" or words[i] == keys[j]) and match(i + 1, j + 1)

    return match(0, 0)


def _cycle(path: tuple[tuple[str, str], ...], target: str) -> bool:
    """Whether dead-lettering to ``target`` closes a cycle RabbitMQ drops: ``target`` was
    dead-lettered from before, with no rejection (a consumer's decision) since."""
    for queue, reason in path:
        if reason == "rejected":
            return False
        if queue == target:
            return True
    return False


def _keys(value: Any) -> list[str]:
    """The routing keys of a ``CC``/``BCC`` header value."""
    values = value if isinstance(value, list) else [value]
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _routing_keys(message: MemoryMessage, bcc: list[str] | None = None) -> list[str]:
    keys = [message.routing_key]
    headers = message.headers
    if "CC" in headers:
        keys += _keys(headers["CC"])
    return list(dict.fromkeys(keys + (bcc or [])))


def _headers_match(arguments: dict[str, Any], headers: dict[str, Any]) -> bool:
    wanted = {k: v for k, v in arguments.items() if not k.startswith("x-")}
    mode = arguments.get("x-match", "all")
    if not wanted:
        return True
    hits = [k in headers and (v is None or _same(headers[k], v)) for k, v in wanted.items()]
    return any(hits) if str(mode).startswith("any") else all(hits)


# -- connections and channels --------------------------------------------------------------------


class _Channel:
    def __init__(self, connection: _Connection, number: int) -> None:
        self.connection = connection
        self.number = number
        self.confirm = False
        self.publish_seq = 0
        self.prefetch = 0  # for consumers created from now on (per consumer)
        self.global_prefetch = 0
        self.consumers: dict[str, _Consumer] = {}
        self.unacked: dict[int, tuple[_Queue | None, MemoryMessage, _Consumer | None]] = {}
        self.next_tag = 1
        self.closing = False
        self.reply_consumer: str | None = None
        self.reply_token = secrets.token_hex(8)
        self.pending: tuple[spec.Basic.Publish, MemoryMessage | None, int, list[bytes]] | None
        self.pending = None

    def has_room(self) -> bool:
        if not self.global_prefetch:
            return True
        counted = sum(1 for queue, _, consumer in self.unacked.values() if consumer is not None)
        return counted < self.global_prefetch


class _Connection:
    def __init__(
        self, broker: MemoryBroker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.broker = broker
        self.reader = reader
        self.writer = writer
        self.id = next(broker._ids)
        self.channels: dict[int, _Channel] = {}
        self.frame_max = _FRAME_MAX
        self.heartbeat = 0
        self.client_properties: dict[str, Any] = {}
        self.closed = False
        self.closing = False
        self.heartbeat_task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        value = self.client_properties.get("connection_name", "")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return str(value)

    def cancel_notify(self) -> bool:
        capabilities = self.client_properties.get("capabilities") or {}
        return bool(capabilities.get("consumer_cancel_notify"))

    def send(self, value: Any, channel: int = 0) -> None:
        if self.closed:
            return
        self.writer.write(amqp_frame.marshal(value, channel))

    def send_content(
        self, channel: int, method: Frame, message: MemoryMessage, extra: dict[str, Any]
    ) -> None:
        """A method with content: the method, the header, the body in frame_max pieces."""
        if self.closed:
            return
        out = [amqp_frame.marshal(method, channel)]
        if message.raw_header is not None and message.properties is None:
            payload = message.raw_header
            out.append(struct.pack(">BHI", 2, channel, len(payload)) + payload + _FRAME_END)
        else:
            properties = message.properties or spec.Basic.Properties()
            if extra:
                headers = dict(properties.headers or {})
                headers.update(extra)
                properties = _with(properties, headers=headers)
            out.append(amqp_frame.marshal(ContentHeader(0, len(message.body), properties), channel))
        step = max(1, self.frame_max - 8)
        body = message.body
        for start in range(0, len(body), step):
            out.append(amqp_frame.marshal(ContentBody(body[start : start + step]), channel))
        self.writer.write(b"".join(out))


def _with(properties: spec.Basic.Properties, **changes: Any) -> spec.Basic.Properties:
    values = {
        name: getattr(properties, name)
        for name in (
            "content_type",
            "content_encoding",
            "headers",
            "delivery_mode",
            "priority",
            "correlation_id",
            "reply_to",
            "expiration",
            "message_id",
            "timestamp",
            "message_type",
            "user_id",
            "app_id",
        )
    }
    values.update(changes)
    return spec.Basic.Properties(**values)


# -- the broker ----------------------------------------------------------------------------------


class MemoryBroker:
    """One in-memory broker (see the module's docstring). Use :func:`memory_broker` to get
    one by name; ``url`` (``memory://NAME``) is what a client is given."""

    def __init__(self, name: str = "", *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE):
        self.name = name
        self.max_message_size = max_message_size
        self.closed = False
        # Who may log in (PLAIN): user -> password.
        self.users: dict[str, str] = {"guest": "guest"}
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._offset = 0.0  # virtual clock = loop time + offset
        self._exchanges: dict[str, _Exchange] = {}
        self._queues: dict[str, _Queue] = {}
        self._connections: dict[int, _Connection] = {}
        self._reply_channels: dict[str, _Channel] = {}
        self._serving: set[asyncio.Task[None]] = set()  # a task per client connection
        self._all_connections: set[_Connection] = set()  # also those closing
        self._declare_defaults()
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name=f"mqkit-memory[{name}]", daemon=True
        )
        self._thread.start()
        started.wait()
        self._server = self._call_async(
            asyncio.start_server(self._serve, "127.0.0.1", 0, limit=2**20)
        )
        self.port: int = self._server.sockets[0].getsockname()[1]

    # -- public ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``memory://NAME``: the URL to give a client."""
        return f"{SCHEME}{self.name}"

    @property
    def amqp_url(self) -> str:
        """The loopback AMQP URL a raw pika or aio-pika client can use."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def now(self) -> float:
        """The broker's clock (seconds; only differences mean anything)."""
        return self._loop.time() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward: messages whose TTL runs out meanwhile expire
        (and are dead-lettered, e.g. back to their queue for a retry) at once."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")

        def move() -> None:
            self._offset += seconds
            for queue in list(self._queues.values()):
                self._expire(queue)

        self._call(move)

    def count(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting those delivered and not yet acked);
        raise ``KeyError`` if there is no such queue."""
        return self._call(lambda: len(self._queue_named(queue).messages))

    def unacked(self, queue: str) -> int:
        """Messages of ``queue`` delivered to a consumer and not yet acked."""
        return self._call(lambda: self._queue_named(queue).unacked())

    def consumers(self, queue: str) -> int:
        return self._call(lambda: len(self._queue_named(queue).consumers))

    def peek(self, queue: str, limit: int | None = None) -> list[MemoryMessage]:
        """The messages ready in ``queue``, oldest first (copies: the queue keeps them)."""

        def look() -> list[MemoryMessage]:
            messages = self._queue_named(queue).messages
            return [m.copy() for m in messages[: limit if limit is not None else len(messages)]]

        return self._call(look)

    def queues(self) -> dict[str, int]:
        """Every queue and its ready messages."""
        return self._call(lambda: {q.name: len(q.messages) for q in self._queues.values()})

    def exchanges(self) -> dict[str, str]:
        """Every exchange (but the default one) and its type."""
        return self._call(lambda: {e.name: e.type for e in self._exchanges.values() if e.name})

    def connections(self) -> dict[int, str]:
        """The open connections: id -> name (the ``connection_name`` client property)."""
        return self._call(lambda: {c.id: c.name for c in self._connections.values()})

    def close_connections(self, name_contains: str = "", reason: str = "closed by test") -> int:
        """Close (broker side, CONNECTION_FORCED) every connection whose name contains
        ``name_contains``; return how many."""

        return self.close_connection(lambda c: name_contains in c.name, reason)

    def close_connection(self, which: int | Callable[[Any], bool], reason: str = "closed") -> int:
        """Close the connection with id ``which`` (see :meth:`connections`), or each one
        ``which(connection)`` is true for; return how many."""

        def close() -> int:
            doomed = [
                c
                for c in self._connections.values()
                if (c.id == which if isinstance(which, int) else which(c))
            ]
            for connection in doomed:
                self._close_connection(
                    connection, CONNECTION_FORCED, f"CONNECTION_FORCED - {reason}"
                )
            return len(doomed)

        return self._call(close)

    def delete_queue(self, queue: str) -> int:
        """Delete ``queue`` (as an operator would); return the messages it held."""

        def delete() -> int:
            found = self._queues.get(queue)
            return self._delete_queue(found) if found else 0

        return self._call(delete)

    def purge(self, queue: str) -> int:
        def purge() -> int:
            found = self._queue_named(queue)
            count = len(found.messages)
            found.messages.clear()
            return count

        return self._call(purge)

    def idle(self) -> bool:
        """Nothing to deliver now: no message is delivered and unacked, and no ready message
        has a consumer with room for it. (Messages waiting for their TTL may remain.)"""
        return self._call(self._idle)

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until :meth:`idle` (the clients have handled all they were given); raise
        ``TimeoutError`` after ``timeout`` seconds. Blocks: in asyncio code, use
        ``await broker.settle_async()``."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while quiet < 3:  # idle three polls in a row: a handler's publish has arrived
            quiet = quiet + 1 if self.idle() else 0
            if time.monotonic() > deadline:
                raise TimeoutError(f"memory broker {self.name!r} not idle after {timeout}s")
            time.sleep(0.005)

    async def settle_async(self, timeout: float = 10.0) -> None:
        """:meth:`settle` for asyncio code."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while quiet < 3:
            quiet = quiet + 1 if self.idle() else 0
            if time.monotonic() > deadline:
                raise TimeoutError(f"memory broker {self.name!r} not idle after {timeout}s")
            await asyncio.sleep(0.005)

    def next_expiry(self) -> float | None:
        """Seconds until the next message held by a TTL expires (``None``: none is held)."""

        def soonest() -> float | None:
            times = [m.expires_at for q in self._queues.values() for m in q.messages[:1]]
            known = [t for t in times if t is not None]
            return max(0.0, min(known) - self.now()) if known else None

        return self._call(soonest)

    def run_until_idle(self, timeout: float = 10.0) -> None:
        """Deliver, and move the clock to each next expiry, until nothing is left to do:
        every retry held by the broker has come back and been handled."""
        deadline = time.monotonic() + timeout
        while True:
            self.settle(max(0.01, deadline - time.monotonic()))
            wait = self.next_expiry()
            if wait is None:
                return
            self.advance(wait)

    async def run_until_idle_async(self, timeout: float = 10.0) -> None:
        """:meth:`run_until_idle` for asyncio code."""
        deadline = time.monotonic() + timeout
        while True:
            await self.settle_async(max(0.01, deadline - time.monotonic()))
            wait = self.next_expiry()
            if wait is None:
                return
            self.advance(wait)

    def reset(self) -> None:
        """Close every connection and forget every queue and exchange."""

        def reset() -> None:
            for connection in list(self._connections.values()):
                self._close_connection(connection, CONNECTION_FORCED, "CONNECTION_FORCED - reset")
            for queue in self._queues.values():
                if queue.timer:
                    queue.timer.cancel()
            self._queues.clear()
            self._exchanges.clear()
            self._declare_defaults()

        self._call(reset)

    def close(self) -> None:
        """Stop the broker: its connections close, and ``memory://NAME`` is a new, empty
        broker the next time it is used."""
        if self.closed:
            return
        self.closed = True

        async def stop() -> None:
            self._server.close()
            for connection in list(self._connections.values()):
                self._close_connection(connection, CONNECTION_FORCED, "CONNECTION_FORCED - stop")
            await asyncio.sleep(0.05)  # the close frames go out
            tasks = [t for t in self._serving if not t.done()]
            for connection in list(self._all_connections):
                with contextlib.suppress(Exception):
                    connection.writer.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

        with contextlib.suppress(Exception):
            self._call_async(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()  # an unclosed loop is a ResourceWarning
        with _BROKERS_LOCK:
            if _BROKERS.get(self.name) is self:
                del _BROKERS[self.name]

    def __enter__(self) -> MemoryBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MemoryBroker {self.url} at 127.0.0.1:{self.port}>"

    # -- the loop --------------------------------------------------------------------------------

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(started.set)
        self._loop.run_forever()

    def _call(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return fn()
        if self.closed and not self._loop.is_running():
            raise RuntimeError(f"memory broker {self.name!r} is closed")

        async def run() -> T:
            return fn()

        result: T = self._call_async(run())
        return result

    def _call_async(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def _queue_named(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            raise KeyError(f"no queue {name!r} on memory broker {self.name!r}")
        return queue

    def _declare_defaults(self) -> None:
        for name, kind in (
            ("", "direct"),
            ("amq.direct", "direct"),
            ("amq.fanout", "fanout"),
            ("amq.topic", "topic"),
            ("amq.headers", "headers"),
            ("amq.match", "headers"),
        ):
            self._exchanges[name] = _Exchange(name, kind)

    def _idle(self) -> bool:
        for queue in self._queues.values():
            if queue.unacked():
                return False
            if queue.messages and any(c.has_room() for c in queue.consumers):
                return False
        return all(
            not channel.unacked and channel.pending is None
            for connection in self._connections.values()
            for channel in connection.channels.values()
        )

    # -- serving a connection --------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(self, reader, writer)
        task = asyncio.current_task()
        if task is not None:
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)
        self._all_connections.add(connection)
        try:
            header = await reader.readexactly(8)
            if header != _PROTOCOL_HEADER:
                writer.write(_PROTOCOL_HEADER)
                return
            self._connections[connection.id] = connection
            connection.send(
                spec.Connection.Start(
                    server_properties={
                        "product": "mqkit memory broker",
                        "version": "4.0.5",
                        "platform": "Python",
                        "capabilities": {
                            "publisher_confirms": True,
                            "exchange_exchange_bindings": True,
                            "basic.nack": True,
                            "consumer_cancel_notify": True,
                            "connection.blocked": True,
                            "consumer_priorities": True,
                            "authentication_failure_close": True,
                            "per_consumer_qos": True,
                            "direct_reply_to": True,
                        },
                    },
                    mechanisms="PLAIN",
                )
            )
            while not connection.closed:
                head = await reader.readexactly(7)
                kind, channel, size = struct.unpack(">BHI", head)
                payload = await reader.readexactly(size + 1)
                if payload[-1:] != _FRAME_END:
                    raise _ChannelError(FRAME_ERROR, "FRAME_ERROR", connection=True)
                self._on_frame(connection, kind, channel, head + payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except _ChannelError as error:
            self._close_connection(connection, error.code, error.text)
        finally:
            self._connection_gone(connection)
            self._all_connections.discard(connection)
            with contextlib.suppress(Exception):
                writer.close()

    def _on_frame(self, connection: _Connection, kind: int, number: int, data: bytes) -> None:
        if kind == 8:  # heartbeat
            return
        if connection.closing:  # after Connection.Close: only close and close-ok count
            if kind == 1 and number == 0:
                with contextlib.suppress(Exception):
                    _, _, method = amqp_frame.unmarshal(data)
                    if isinstance(method, (spec.Connection.Close, spec.Connection.CloseOk)):
                        if isinstance(method, spec.Connection.Close):
                            connection.send(spec.Connection.CloseOk())
                        connection.closed = True
                        connection.writer.close()
            return
        if kind == 2:
            try:
                _, _, value = amqp_frame.unmarshal(data)
            except Exception:  # a header pamqp cannot read: keep it as it came
                value = None
            self._on_content_header(connection, number, value, data[7:-1])
            return
        if kind == 3:
            self._on_content_body(connection, number, data[7:-1])
            return
        try:
            _, _, method = amqp_frame.unmarshal(data)
        except Exception as exc:
            raise _ChannelError(
                FRAME_ERROR, f"FRAME_ERROR - cannot read a frame: {exc}", connection=True
            ) from exc
        if number == 0:
            self._on_connection_method(connection, method)
            return
        channel = connection.channels.get(number)
        if isinstance(method, spec.Channel.Open):
            if channel is not None:
                raise _ChannelError(
                    CHANNEL_ERROR, "CHANNEL_ERROR - second 'channel.open' seen", connection=True
                )
            connection.channels[number] = _Channel(connection, number)
            connection.send(spec.Channel.OpenOk(), number)
            return
        if channel is None:
            if isinstance(method, (spec.Channel.Close, spec.Channel.CloseOk)):
                return
            raise _ChannelError(
                CHANNEL_ERROR,
                f"CHANNEL_ERROR - expected 'channel.open' on {number}",
                connection=True,
            )
        if channel.closing:
            if isinstance(method, spec.Channel.CloseOk):
                connection.channels.pop(number, None)
            elif isinstance(method, spec.Channel.Close):
                connection.send(spec.Channel.CloseOk(), number)
            return
        try:
            self._on_channel_method(channel, method)
        except _ChannelError as error:
            if error.connection:
                raise
            self._close_channel(channel, error)

    def _on_connection_method(self, connection: _Connection, method: Any) -> None:
        if isinstance(method, spec.Connection.StartOk):
            connection.client_properties = dict(method.client_properties or {})
            if method.mechanism != "PLAIN":
                raise _ChannelError(
                    ACCESS_REFUSED,
                    f"ACCESS_REFUSED - mechanism {method.mechanism} is not supported",
                    connection=True,
                )
            response = method.response
            if isinstance(response, bytes):
                response = response.decode("utf-8", "replace")
            _, user, password = [*str(response).split("\0"), "", ""][:3]
            if self.users.get(user) != password:
                raise _ChannelError(
                    ACCESS_REFUSED,
                    "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. "
                    "For details see the broker logfile.",
                    connection=True,
                )
            connection.send(
                spec.Connection.Tune(channel_max=_CHANNEL_MAX, frame_max=_FRAME_MAX, heartbeat=60)
            )
        elif isinstance(method, spec.Connection.TuneOk):
            connection.frame_max = method.frame_max or _FRAME_MAX
            connection.heartbeat = method.heartbeat
            if method.heartbeat:
                connection.heartbeat_task = self._loop.create_task(self._beat(connection))
        elif isinstance(method, spec.Connection.Open):
            if method.virtual_host not in ("/", ""):
                raise _ChannelError(
                    NOT_ALLOWED,
                    f"NOT_ALLOWED - vhost {method.virtual_host} not found",
                    connection=True,
                )
            connection.send(spec.Connection.OpenOk())
        elif isinstance(method, spec.Connection.Close):
            connection.send(spec.Connection.CloseOk())
            connection.closed = True
            self._loop.call_soon(connection.writer.close)
        elif isinstance(method, spec.Connection.CloseOk):
            connection.closed = True
            connection.writer.close()
        elif isinstance(method, (spec.Connection.Blocked, spec.Connection.Unblocked)):
            pass
        else:
            raise _ChannelError(
                NOT_IMPLEMENTED, f"NOT_IMPLEMENTED - {method.name}", connection=True
            )

    async def _beat(self, connection: _Connection) -> None:
        with contextlib.suppress(Exception):
            while not connection.closed:
                await asyncio.sleep(max(0.5, connection.heartbeat / 2))
                connection.send(Heartbeat())

    def _close_connection(self, connection: _Connection, code: int, text: str) -> None:
        if connection.closed or connection.closing:
            return
        connection.closing = True
        connection.send(
            spec.Connection.Close(reply_code=code, reply_text=text, class_id=0, method_id=0)
        )
        self._connection_gone(connection)
        self._loop.call_later(1.0, connection.writer.close)

    def _connection_gone(self, connection: _Connection) -> None:
        if connection.id not in self._connections:
            return
        del self._connections[connection.id]
        if connection.heartbeat_task:
            connection.heartbeat_task.cancel()
        for channel in list(connection.channels.values()):
            self._release_channel(channel)
        connection.channels.clear()
        for queue in [q for q in self._queues.values() if q.exclusive_owner is connection]:
            self._delete_queue(queue)

    def _close_channel(self, channel: _Channel, error: _ChannelError) -> None:
        """Close ``channel`` from the broker side (an error of the client's)."""
        self._release_channel(channel)
        channel.closing = True
        channel.connection.send(
            spec.Channel.Close(
                reply_code=error.code,
                reply_text=error.text,
                class_id=error.class_id,
                method_id=error.method_id,
            ),
            channel.number,
        )

    def _release_channel(self, channel: _Channel) -> None:
        """What a closed channel held goes back: its consumers end, its unacked messages
        are requeued (``redelivered``)."""
        channel.pending = None
        if channel.reply_consumer is not None:
            self._reply_channels.pop(channel.reply_token, None)
            channel.reply_consumer = None
        for consumer in list(channel.consumers.values()):
            self._remove_consumer(consumer, notify=False)
        self._release_unacked(channel)

    # -- channel methods -------------------------------------------------------------------------

    def _on_channel_method(self, channel: _Channel, method: Any) -> None:
        connection = channel.connection
        number = channel.number
        send = connection.send
        if isinstance(method, spec.Basic.Publish):
            channel.pending = (method, None, 0, [])
        elif isinstance(method, spec.Basic.Ack):
            self._settle(channel, method, method.delivery_tag, method.multiple, None)
        elif isinstance(method, spec.Basic.Nack):
            self._settle(channel, method, method.delivery_tag, method.multiple, method.requeue)
        elif isinstance(method, spec.Basic.Reject):
            self._settle(channel, method, method.delivery_tag or 0, False, method.requeue)
        elif isinstance(method, spec.Channel.Close):
            self._release_channel(channel)
            connection.channels.pop(number, None)
            send(spec.Channel.CloseOk(), number)
        elif isinstance(method, spec.Channel.Flow):
            send(spec.Channel.FlowOk(active=method.active), number)
        elif isinstance(method, spec.Confirm.Select):
            channel.confirm = True
            if not method.nowait:
                send(spec.Confirm.SelectOk(), number)
        elif isinstance(method, spec.Basic.Qos):
            if method.global_:
                channel.global_prefetch = method.prefetch_count
            else:
                channel.prefetch = method.prefetch_count
            send(spec.Basic.QosOk(), number)
            for queue in list(self._queues.values()):
                self._pump(queue)
        elif isinstance(method, spec.Queue.Declare):
            self._queue_declare(channel, method)
        elif isinstance(method, spec.Queue.Bind):
            self._bind(channel, method, method.queue, method.exchange, method.routing_key)
            if not method.nowait:
                send(spec.Queue.BindOk(), number)
        elif isinstance(method, spec.Queue.Unbind):
            self._unbind(method, method.queue, method.exchange, method.routing_key, False)
            send(spec.Queue.UnbindOk(), number)
        elif isinstance(method, spec.Queue.Purge):
            queue = self._accessible_queue(channel, method.queue, method)
            count = len(queue.messages)
            queue.messages.clear()
            if not method.nowait:
                send(spec.Queue.PurgeOk(message_count=count), number)
        elif isinstance(method, spec.Queue.Delete):
            self._queue_delete(channel, method)
        elif isinstance(method, spec.Exchange.Declare):
            self._exchange_declare(method)
            if not method.nowait:
                send(spec.Exchange.DeclareOk(), number)
        elif isinstance(method, spec.Exchange.Delete):
            self._exchange_delete(method)
            if not method.nowait:
                send(spec.Exchange.DeleteOk(), number)
        elif isinstance(method, spec.Exchange.Bind):
            self._bind(channel, method, method.destination, method.source, method.routing_key, True)
            if not method.nowait:
                send(spec.Exchange.BindOk(), number)
        elif isinstance(method, spec.Exchange.Unbind):
            self._unbind(method, method.destination, method.source, method.routing_key, True)
            if not method.nowait:
                send(spec.Exchange.UnbindOk(), number)
        elif isinstance(method, spec.Basic.Consume):
            self._consume(channel, method)
        elif isinstance(method, spec.Basic.Cancel):
            consumer = channel.consumers.get(method.consumer_tag or "")
            if consumer is not None:
                self._remove_consumer(consumer, notify=False)
            elif method.consumer_tag == channel.reply_consumer:
                self._reply_channels.pop(channel.reply_token, None)
                channel.reply_consumer = None
            if not method.nowait:
                send(spec.Basic.CancelOk(consumer_tag=method.consumer_tag), number)
        elif isinstance(method, spec.Basic.Get):
            self._get(channel, method)
        elif isinstance(method, spec.Basic.Recover):
            self._release_unacked(channel)
            send(spec.Basic.RecoverOk(), number)
        else:
            raise _ChannelError(
                NOT_IMPLEMENTED,
                f"NOT_IMPLEMENTED - {method.name} is not modelled by the memory broker",
                method,
                connection=True,
            )

    def _release_unacked(self, channel: _Channel) -> None:
        """Requeue (``redelivered``) every delivery of ``channel`` not yet settled, then
        deliver again from the queues they went back to."""
        unacked, channel.unacked = channel.unacked, {}
        touched: dict[str, _Queue] = {}
        for queue, message, consumer in unacked.values():
            if consumer is not None:
                consumer.unacked -= 1
            if queue is not None:
                queue.in_flight -= 1
                if not queue.deleted:
                    self._requeue(queue, message)
                    touched[queue.name] = queue
        for queue in touched.values():
            if not queue.deleted:
                self._pump(queue)

    # -- declaring -------------------------------------------------------------------------------

    def _queue_declare(self, channel: _Channel, method: spec.Queue.Declare) -> None:
        connection = channel.connection
        name = method.queue or ""
        arguments = dict(method.arguments or {})
        if method.passive:
            if name == _REPLY_TO:
                connection.send(spec.Queue.DeclareOk(name, 0, 0), channel.number)
                return
            queue = self._accessible_queue(channel, name, method)
            connection.send(
                spec.Queue.DeclareOk(name, len(queue.messages), len(queue.consumers)),
                channel.number,
            )
            return
        if not name:
            name = "amq.gen-" + secrets.token_urlsafe(16)
        elif name.startswith("amq."):
            raise _ChannelError(
                ACCESS_REFUSED,
                f"ACCESS_REFUSED - queue name '{name}' contains reserved prefix 'amq.*'",
                method,
            )
        self._check_queue_arguments(name, method, arguments)
        existing = self._queues.get(name)
        if existing is not None:
            self._check_exclusive(existing, connection, method)
            self._check_equivalent_queue(existing, method, arguments)
            queue = existing
        else:
            queue = _Queue(
                name,
                durable=method.durable,
                exclusive_owner=connection if method.exclusive else None,
                auto_delete=method.auto_delete,
                arguments=arguments,
            )
            self._queues[name] = queue
        if not method.nowait:
            connection.send(
                spec.Queue.DeclareOk(name, len(queue.messages), len(queue.consumers)),
                channel.number,
            )

    def _check_queue_arguments(
        self, name: str, method: spec.Queue.Declare, arguments: dict[str, Any]
    ) -> None:
        def invalid(arg: str, why: str) -> _ChannelError:
            return _precondition(
                f"invalid arg '{arg}' for queue '{name}' in vhost '/': {why}", method
            )

        kind = arguments.get("x-queue-type", "classic")
        if isinstance(kind, bytes):
            kind = kind.decode()
        if kind not in _QUEUE_TYPES:
            raise invalid("x-queue-type", f"{{unsupported_queue_type,{kind}}}")
        for arg in ("x-message-ttl", "x-max-length", "x-delivery-limit"):
            value = arguments.get(arg)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise invalid(arg, f"{{value_negative_or_not_an_integer,{value!r}}}")
        overflow = arguments.get("x-overflow")
        if overflow is not None and str(overflow) not in _OVERFLOWS:
            raise invalid("x-overflow", f"{{unknown_overflow_type,{overflow}}}")
        if kind == "quorum":
            for flag, word in (
                (method.exclusive, "exclusive"),
                (not method.durable, "non-durable"),
                (method.auto_delete, "auto-delete"),
            ):
                if flag:
                    raise _precondition(
                        f"invalid property '{word}' for queue '{name}' in vhost '/'", method
                    )

    def _check_exclusive(self, queue: _Queue, connection: _Connection, method: Any) -> None:
        if queue.exclusive_owner is not None and queue.exclusive_owner is not connection:
            raise _ChannelError(
                RESOURCE_LOCKED,
                f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue "
                f"'{queue.name}' in vhost '/'. It could be originally declared on another "
                "connection or the exclusive property value does not match that of the "
                "original declaration.",
                method,
            )

    def _check_equivalent_queue(
        self, queue: _Queue, method: spec.Queue.Declare, arguments: dict[str, Any]
    ) -> None:
        def inequivalent(arg: str, received: str, current: str) -> _ChannelError:
            return _precondition(
                f"inequivalent arg '{arg}' for queue '{queue.name}' in vhost '/': "
                f"received {received} but current is {current}",
                method,
            )

        flags: tuple[tuple[str, bool, bool], ...] = (
            ("durable", method.durable, queue.durable),
            ("exclusive", method.exclusive, queue.exclusive_owner is not None),
            ("auto_delete", method.auto_delete, queue.auto_delete),
        )
        for arg, received, current in flags:
            if received != current:
                raise inequivalent(arg, f"'{str(received).lower()}'", f"'{str(current).lower()}'")
        # The queue type first (RabbitMQ checks it before the other arguments).
        for arg in sorted(_COMPARED_ARGS, key=lambda a: (a != "x-queue-type", a)):
            given, existing = arguments.get(arg), queue.arguments.get(arg)
            if not _same(given, existing):
                raise inequivalent(arg, _described(given), _described(existing))

    def _accessible_queue(self, channel: _Channel, name: str, method: Any) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            raise _not_found("queue", name, method)
        self._check_exclusive(queue, channel.connection, method)
        return queue

    def _queue_delete(self, channel: _Channel, method: spec.Queue.Delete) -> None:
        queue = self._queues.get(method.queue)
        count = 0
        if queue is not None:
            self._check_exclusive(queue, channel.connection, method)
            if method.if_unused and queue.consumers:
                raise _precondition(f"queue '{queue.name}' in vhost '/' in use", method)
            if method.if_empty and queue.messages:
                raise _precondition(f"queue '{queue.name}' in vhost '/' is not empty", method)
            count = self._delete_queue(queue)
        if not method.nowait:
            channel.connection.send(spec.Queue.DeleteOk(message_count=count), channel.number)

    def _delete_queue(self, queue: _Queue) -> int:
        if queue.deleted:
            return 0
        queue.deleted = True
        self._queues.pop(queue.name, None)
        if queue.timer:
            queue.timer.cancel()
        for consumer in list(queue.consumers):
            self._remove_consumer(consumer, notify=True)
        for exchange in self._exchanges.values():
            exchange.bindings = [
                b for b in exchange.bindings if b.to_exchange or b.destination != queue.name
            ]
        count = len(queue.messages)
        queue.messages.clear()
        return count

    def _exchange_declare(self, method: spec.Exchange.Declare) -> None:
        name = method.exchange
        existing = self._exchanges.get(name)
        if method.passive:
            if existing is None:
                raise _not_found("exchange", name, method)
            return
        if method.exchange_type not in ("direct", "fanout", "topic", "headers"):
            raise _ChannelError(
                COMMAND_INVALID,
                f"COMMAND_INVALID - invalid exchange type '{method.exchange_type}'",
                method,
                connection=True,
            )
        if name == "" or name.startswith("amq."):
            raise _ChannelError(
                ACCESS_REFUSED,
                f"ACCESS_REFUSED - exchange name '{name}' contains reserved prefix 'amq.*'",
                method,
            )
        arguments = dict(method.arguments or {})
        if existing is None:
            self._exchanges[name] = _Exchange(
                name,
                method.exchange_type,
                method.durable,
                method.auto_delete,
                method.internal,
                arguments,
            )
            return

        def inequivalent(arg: str, received: str, current: str) -> _ChannelError:
            return _precondition(
                f"inequivalent arg '{arg}' for exchange '{name}' in vhost '/': "
                f"received {received} but current is {current}",
                method,
            )

        if method.exchange_type != existing.type:
            raise inequivalent("type", f"'{method.exchange_type}'", f"'{existing.type}'")
        for arg, received, current in (
            ("durable", method.durable, existing.durable),
            ("auto_delete", method.auto_delete, existing.auto_delete),
            ("internal", method.internal, existing.internal),
        ):
            if received != current:
                raise inequivalent(arg, f"'{str(received).lower()}'", f"'{str(current).lower()}'")
        for arg in sorted(set(arguments) | set(existing.arguments)):
            if not _same(arguments.get(arg), existing.arguments.get(arg)):
                raise inequivalent(
                    arg, _described(arguments.get(arg)), _described(existing.arguments.get(arg))
                )

    def _exchange_delete(self, method: spec.Exchange.Delete) -> None:
        name = method.exchange
        if name == "" or name.startswith("amq."):
            raise _ChannelError(
                ACCESS_REFUSED,
                f"ACCESS_REFUSED - operation not permitted on exchange '{name}'",
                method,
            )
        exchange = self._exchanges.get(name)
        if exchange is None:
            return
        if method.if_unused and exchange.bindings:
            raise _precondition(f"exchange '{name}' in vhost '/' in use", method)
        del self._exchanges[name]
        for other in self._exchanges.values():
            other.bindings = [
                b for b in other.bindings if not (b.to_exchange and b.destination == name)
            ]

    def _bind(
        self,
        channel: _Channel,
        method: Any,
        destination: str,
        source: str,
        routing_key: str,
        to_exchange: bool = False,
    ) -> None:
        if source == "":
            raise _ChannelError(
                ACCESS_REFUSED,
                "ACCESS_REFUSED - operation not permitted on the default exchange",
                method,
            )
        if to_exchange:
            if destination not in self._exchanges:
                raise _not_found("exchange", destination, method)
        else:
            self._accessible_queue(channel, destination, method)
        exchange = self._exchanges.get(source)
        if exchange is None:
            raise _not_found("exchange", source, method)
        arguments = dict(method.arguments or {})
        for binding in exchange.bindings:
            if (
                binding.destination == destination
                and binding.to_exchange == to_exchange
                and binding.routing_key == routing_key
                and binding.arguments == arguments
            ):
                return
        exchange.bindings.append(_Binding(destination, routing_key, arguments, to_exchange))

    def _unbind(
        self, method: Any, destination: str, source: str, routing_key: str, to_exchange: bool
    ) -> None:
        exchange = self._exchanges.get(source)
        if exchange is None:
            return
        arguments = dict(method.arguments or {})
        exchange.bindings = [
            b
            for b in exchange.bindings
            if not (
                b.destination == destination
                and b.to_exchange == to_exchange
                and b.routing_key == routing_key
                and b.arguments == arguments
            )
        ]

    # -- publishing ------------------------------------------------------------------------------

    def _on_content_header(
        self, connection: _Connection, number: int, header: Any, raw: bytes
    ) -> None:
        channel = connection.channels.get(number)
        if channel is None or channel.closing:
            return
        if channel.pending is None:
            raise _ChannelError(
                COMMAND_INVALID, "COMMAND_INVALID - unexpected content header", connection=True
            )
        method = channel.pending[0]
        if isinstance(header, ContentHeader):
            size = header.body_size
            message = MemoryMessage(method.exchange, method.routing_key, b"", header.properties)
        else:
            (size,) = struct.unpack(">Q", raw[4:12])
            message = MemoryMessage(method.exchange, method.routing_key, b"", None, raw)
        channel.pending = (method, message, size, [])
        if size == 0:
            self._published(channel)

    def _on_content_body(self, connection: _Connection, number: int, data: bytes) -> None:
        channel = connection.channels.get(number)
        if channel is None or channel.closing or channel.pending is None:
            return
        _, _, size, parts = channel.pending
        parts.append(data)
        if sum(map(len, parts)) >= size:
            self._published(channel)

    def _published(self, channel: _Channel) -> None:
        assert channel.pending is not None
        method, message, _, parts = channel.pending
        channel.pending = None
        assert message is not None
        message.body = b"".join(parts)
        if channel.confirm:
            channel.publish_seq += 1
        try:
            accepted = self._publish(channel, method, message)
        except _ChannelError as error:
            self._close_channel(channel, error)
            return
        if channel.confirm:
            reply: Frame = (
                spec.Basic.Ack(delivery_tag=channel.publish_seq)
                if accepted
                else spec.Basic.Nack(delivery_tag=channel.publish_seq, requeue=False)
            )
            channel.connection.send(reply, channel.number)

    def _publish(
        self, channel: _Channel, method: spec.Basic.Publish, message: MemoryMessage
    ) -> bool:
        """Route one message; return whether every queue took it (else: nack)."""
        if len(message.body) > self.max_message_size:
            raise _precondition(
                f"message size {len(message.body)} is larger than configured max size "
                f"{self.max_message_size}",
                method,
            )
        exchange = self._exchanges.get(method.exchange)
        if exchange is None:
            raise _not_found("exchange", method.exchange, method)
        properties = message.properties
        if properties is not None and properties.reply_to == _REPLY_TO:
            if channel.reply_consumer is None:
                raise _precondition("fast reply consumer does not exist", method)
            self._reply_channels[channel.reply_token] = channel
            message.properties = _with(properties, reply_to=f"{_REPLY_TO}.{channel.reply_token}")
        if method.exchange == "" and method.routing_key.startswith(_REPLY_TO + "."):
            target = self._reply_channels.get(method.routing_key[len(_REPLY_TO) + 1 :])
            if target is not None and target.reply_consumer is not None and not target.closing:
                message.seq = next(self._seq)
                target.connection.send_content(
                    target.number,
                    spec.Basic.Deliver(
                        consumer_tag=target.reply_consumer,
                        delivery_tag=self._next_tag(target),
                        redelivered=False,
                        exchange="",
                        routing_key=method.routing_key,
                    ),
                    message,
                    {},
                )
                return True
            queues: list[_Queue] = []
        else:
            bcc: list[str] = []
            if properties is not None and properties.headers and "BCC" in properties.headers:
                headers = dict(properties.headers)
                bcc = _keys(headers.pop("BCC"))
                message.properties = _with(message.properties or properties, headers=headers)
            queues = self._route(exchange, message, bcc)
        if not queues:
            if method.mandatory:
                channel.connection.send_content(
                    channel.number,
                    spec.Basic.Return(
                        reply_code=NO_ROUTE,
                        reply_text="NO_ROUTE",
                        exchange=method.exchange,
                        routing_key=method.routing_key,
                    ),
                    message,
                    {},
                )
            return True
        accepted = True
        for queue in queues:
            accepted = self._enqueue(queue, message.copy()) and accepted
        return accepted

    def _route(
        self, exchange: _Exchange, message: MemoryMessage, bcc: list[str] | None = None
    ) -> list[_Queue]:
        """The queues ``message`` goes to: by its routing key and the keys in its ``CC``
        header (and ``bcc``)."""
        found: dict[str, _Queue] = {}
        seen: set[str] = set()
        keys = _routing_keys(message, bcc)

        def route(current: _Exchange) -> None:
            if current.name in seen:
                return
            seen.add(current.name)
            before = len(found)
            if current.name == "":
                for key in keys:
                    queue = self._queues.get(key)
                    if queue is not None:
                        found.setdefault(queue.name, queue)
                return
            for binding in current.bindings:
                if current.type == "fanout":
                    hit = True
                elif current.type == "topic":
                    hit = any(_topic_matches(binding.routing_key, key) for key in keys)
                elif current.type == "headers":
                    hit = _headers_match(binding.arguments, message.headers)
                else:
                    hit = binding.routing_key in keys
                if not hit:
                    continue
                if binding.to_exchange:
                    target = self._exchanges.get(binding.destination)
                    if target is not None:
                        route(target)
                else:
                    queue = self._queues.get(binding.destination)
                    if queue is not None:
                        found.setdefault(queue.name, queue)
            alternate = current.arguments.get("alternate-exchange")
            if len(found) == before and alternate is not None:
                target = self._exchanges.get(
                    alternate.decode() if isinstance(alternate, bytes) else str(alternate)
                )
                if target is not None:
                    route(target)

        route(exchange)
        return list(found.values())

    def _enqueue(self, queue: _Queue, message: MemoryMessage) -> bool:
        """Put ``message`` at the tail of ``queue``; ``False`` if the queue refused it."""
        limit = queue.arguments.get("x-max-length")
        overflow = str(queue.arguments.get("x-overflow", "drop-head"))
        if isinstance(limit, int) and len(queue.messages) >= limit:
            if overflow == "reject-publish":
                return False
            if overflow == "reject-publish-dlx":
                self._dead_letter(queue, message, "maxlen")
                return False
        message.seq = next(self._seq)
        message.redelivered = False
        message.delivery_count = 0
        message.expires_at = self._expiry(queue, message)
        queue.messages.append(message)
        if isinstance(limit, int):
            while len(queue.messages) > limit:
                self._dead_letter(queue, queue.messages.pop(0), "maxlen")
        self._pump(queue)
        self._expire(queue)
        return True

    def _expiry(self, queue: _Queue, message: MemoryMessage) -> float | None:
        ttls = []
        if queue.ttl_ms is not None:
            ttls.append(queue.ttl_ms)
        expiration = message.properties.expiration if message.properties else None
        if expiration not in (None, ""):
            with contextlib.suppress(ValueError):
                ttls.append(int(str(expiration)))
        return self.now() + min(ttls) / 1000 if ttls else None

    def _requeue(self, queue: _Queue, message: MemoryMessage) -> None:
        message.redelivered = True
        if queue.quorum:
            message.delivery_count += 1
            limit = queue.delivery_limit
            if limit is not None and message.delivery_count > limit:
                self._dead_letter(queue, message, "delivery_limit")
                return
        position = bisect.bisect(queue.messages, message.seq, key=lambda m: m.seq)
        queue.messages.insert(position, message)
        if position == 0 and message.expires_at is not None:
            self._expire(queue)  # the new head may expire before the armed timer

    # -- expiry and dead-lettering ---------------------------------------------------------------

    def _expire(self, queue: _Queue) -> None:
        """Dead-letter the expired messages at the head of ``queue``; arm the timer for the
        next one."""
        self._expire_head_only(queue)
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        if queue.messages and queue.messages[0].expires_at is not None and not queue.deleted:
            when = queue.messages[0].expires_at - self._offset
            queue.timer = self._loop.call_at(when, self._expire, queue)

    def _dead_letter(self, queue: _Queue, message: MemoryMessage, reason: str) -> None:
        target = queue.arguments.get("x-dead-letter-exchange")
        if target is None:
            return
        exchange_name = target.decode() if isinstance(target, bytes) else str(target)
        exchange = self._exchanges.get(exchange_name)
        if exchange is None:
            return
        key = queue.arguments.get("x-dead-letter-routing-key")
        properties = message.properties or spec.Basic.Properties()
        headers = dict(properties.headers or {})
        previous = headers.get("x-death")
        deaths: list[dict[str, Any]] = [
            dict(d) for d in (previous if isinstance(previous, list) else []) if isinstance(d, dict)
        ]
        routing_keys = _routing_keys(message)
        entry: dict[str, Any] | None = None
        for death in deaths:
            if death.get("queue") == queue.name and death.get("reason") == reason:
                entry = death
                break
        if entry is not None:
            deaths.remove(entry)
            entry["count"] = int(entry.get("count", 0)) + 1
            entry["time"] = datetime.now(timezone.utc).replace(microsecond=0)
        else:
            entry = {
                "count": 1,
                "reason": reason,
                "queue": queue.name,
                "time": datetime.now(timezone.utc).replace(microsecond=0),
                "exchange": message.exchange,
                "routing-keys": routing_keys,
            }
            if properties.expiration:
                entry["original-expiration"] = properties.expiration
        deaths.insert(0, entry)
        headers["x-death"] = deaths  # type: ignore[assignment]
        headers.setdefault("x-first-death-reason", reason)
        headers.setdefault("x-first-death-queue", queue.name)
        headers.setdefault("x-first-death-exchange", message.exchange)
        headers["x-last-death-reason"] = reason
        headers["x-last-death-queue"] = queue.name
        headers["x-last-death-exchange"] = message.exchange
        headers.pop("x-delivery-count", None)
        if key is not None:  # a dead-letter routing key replaces the CC keys too
            headers.pop("CC", None)
        copy = MemoryMessage(
            exchange_name,
            key.decode()
            if isinstance(key, bytes)
            else (key if key is not None else message.routing_key),
            message.body,
            _with(properties, headers=headers, expiration=None),
        )
        copy.dead_path = ((queue.name, reason), *message.dead_path)
        for target_queue in self._route(exchange, copy):
            if _cycle(copy.dead_path, target_queue.name):
                continue  # RabbitMQ drops it: it would go round without end
            self._enqueue(target_queue, copy.copy())

    # -- consuming -------------------------------------------------------------------------------

    def _consume(self, channel: _Channel, method: spec.Basic.Consume) -> None:
        connection = channel.connection
        tag = method.consumer_tag or f"amq.ctag-{secrets.token_urlsafe(16)}"
        if tag in channel.consumers or tag == channel.reply_consumer:
            raise _ChannelError(
                NOT_ALLOWED,
                f"NOT_ALLOWED - attempt to reuse consumer tag '{tag}'",
                method,
                connection=True,
            )
        if method.queue == _REPLY_TO:
            if not method.no_ack:
                raise _precondition("reply consumer cannot acknowledge", method)
            channel.reply_consumer = tag
            self._reply_channels[channel.reply_token] = channel
            if not method.nowait:
                connection.send(spec.Basic.ConsumeOk(consumer_tag=tag), channel.number)
            return
        queue = self._accessible_queue(channel, method.queue, method)
        if queue.consumers and (method.exclusive or any(c.exclusive for c in queue.consumers)):
            raise _ChannelError(
                ACCESS_REFUSED,
                f"ACCESS_REFUSED - queue '{queue.name}' in vhost '/' in exclusive use",
                method,
            )
        consumer = _Consumer(tag, queue, channel, method.no_ack, method.exclusive, channel.prefetch)
        channel.consumers[tag] = consumer
        queue.consumers.append(consumer)
        queue.had_consumer = True
        if not method.nowait:
            connection.send(spec.Basic.ConsumeOk(consumer_tag=tag), channel.number)
        self._pump(queue)

    def _remove_consumer(self, consumer: _Consumer, *, notify: bool) -> None:
        queue, channel = consumer.queue, consumer.channel
        channel.consumers.pop(consumer.tag, None)
        if consumer in queue.consumers:
            queue.consumers.remove(consumer)
        if notify and channel.connection.cancel_notify() and not channel.closing:
            channel.connection.send(
                spec.Basic.Cancel(consumer_tag=consumer.tag, nowait=True), channel.number
            )
        if queue.auto_delete and queue.had_consumer and not queue.consumers and not queue.deleted:
            self._delete_queue(queue)

    def _next_tag(self, channel: _Channel) -> int:
        tag = channel.next_tag
        channel.next_tag += 1
        return tag

    def _pump(self, queue: _Queue) -> None:
        """Deliver ready messages of ``queue`` to its consumers, round robin, while they
        have room."""
        self._expire_head_only(queue)
        while queue.messages and queue.consumers:
            count = len(queue.consumers)
            for step in range(count):
                consumer = queue.consumers[(queue.next_consumer + step) % count]
                if consumer.has_room():
                    queue.next_consumer = (queue.next_consumer + step + 1) % count
                    break
            else:
                return
            message = queue.messages.pop(0)
            self._deliver(queue, consumer, message)
            self._expire_head_only(queue)
        if queue.timer is None and queue.messages and queue.messages[0].expires_at is not None:
            self._expire(queue)

    def _expire_head_only(self, queue: _Queue) -> None:
        now = self.now()
        while queue.messages:
            head = queue.messages[0]
            if head.expires_at is None or head.expires_at > now + 1e-9:
                return
            queue.messages.pop(0)
            self._dead_letter(queue, head, "expired")

    def _deliver(self, queue: _Queue, consumer: _Consumer, message: MemoryMessage) -> None:
        channel = consumer.channel
        tag = self._next_tag(channel)
        if not consumer.no_ack:
            consumer.unacked += 1
            channel.unacked[tag] = (queue, message, consumer)
            queue.in_flight += 1
        self._send_message(
            channel,
            spec.Basic.Deliver(
                consumer_tag=consumer.tag,
                delivery_tag=tag,
                redelivered=message.redelivered,
                exchange=message.exchange,
                routing_key=message.routing_key,
            ),
            message,
        )

    @staticmethod
    def _send_message(channel: _Channel, method: Any, message: MemoryMessage) -> None:
        """``method`` (a basic.deliver or basic.get-ok) and ``message``, with the delivery
        count a quorum queue adds once the message was returned."""
        extra = {"x-delivery-count": message.delivery_count} if message.delivery_count else {}
        channel.connection.send_content(channel.number, method, message, extra)

    def _get(self, channel: _Channel, method: spec.Basic.Get) -> None:
        queue = self._accessible_queue(channel, method.queue, method)
        self._expire_head_only(queue)
        if not queue.messages:
            channel.connection.send(spec.Basic.GetEmpty(), channel.number)
            return
        message = queue.messages.pop(0)
        tag = self._next_tag(channel)
        if not method.no_ack:
            channel.unacked[tag] = (queue, message, None)
            queue.in_flight += 1
        self._send_message(
            channel,
            spec.Basic.GetOk(
                delivery_tag=tag,
                redelivered=message.redelivered,
                exchange=message.exchange,
                routing_key=message.routing_key,
                message_count=len(queue.messages),
            ),
            message,
        )
        self._expire(queue)

    def _settle(
        self,
        channel: _Channel,
        method: Any,
        delivery_tag: int,
        multiple: bool,
        requeue: bool | None,
    ) -> None:
        """An ack (``requeue`` None), nack or reject of ``delivery_tag`` (and, with
        ``multiple``, every earlier one; tag 0 with ``multiple``: all)."""
        if multiple:
            if delivery_tag and delivery_tag not in channel.unacked:
                raise _precondition(f"unknown delivery tag {delivery_tag}", method)
            tags = [t for t in channel.unacked if delivery_tag == 0 or t <= delivery_tag]
        else:
            if delivery_tag not in channel.unacked:
                raise _precondition(f"unknown delivery tag {delivery_tag}", method)
            tags = [delivery_tag]
        touched: dict[str, _Queue] = {}
        for tag in sorted(tags):
            queue, message, consumer = channel.unacked.pop(tag)
            if consumer is not None:
                consumer.unacked -= 1
            if queue is not None:
                queue.in_flight -= 1
            if queue is None or queue.deleted:
                continue
            touched[queue.name] = queue
            if requeue is None:
                continue
            if requeue:
                self._requeue(queue, message)
            else:
                self._dead_letter(queue, message, "rejected")
        for queue in touched.values():
            self._pump(queue)
        if channel.global_prefetch:
            for queue in list(self._queues.values()):
                self._pump(queue)

    # -- introspection for tests -----------------------------------------------------------------

    def iter_queues(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Each queue's name and arguments (what ``rabbitmqctl list_queues`` would show)."""
        yield from self._call(lambda: [(q.name, dict(q.arguments)) for q in self._queues.values()])

    def matching_queues(self, pattern: str) -> list[str]:
        """Names of queues matching the shell-style ``pattern``."""
        return [name for name, _ in self.iter_queues() if fnmatch.fnmatchcase(name, pattern)]
