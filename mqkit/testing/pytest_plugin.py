"""mqkit's pytest plugin: fixtures to test a service built on mqkit, on the in-memory broker
or on RabbitMQ, with the same test code. Installing ``mqkit[test]`` registers it (the
``pytest11`` entry point ``mqkit``); nothing to import.

Fixtures:

- ``mqkit_memory``: a fresh :class:`~mqkit.testing.memory.MemoryBroker` for the test, closed
  after it (``mqkit_memory.url`` is ``memory://<unique>``).
- ``mqkit_broker_url`` (session): a real RabbitMQ: ``MQKIT_TEST_URL``, else a local broker
  that answers at ``amqp://guest:guest@localhost:5672/``, else a RabbitMQ container
  (testcontainers) where a Docker engine runs, else the test fails saying what to do.
- ``mqkit_url``: the URL to give the service's client: the memory broker by default;
  ``@pytest.mark.parametrize("mqkit_url", ["memory", "rabbitmq"], indirect=True)`` runs the
  test on both.
- ``mqkit_names``: unique names (``mqkit_names.queue()``, ``.exchange()``, ``.service()``);
  on RabbitMQ, what was declared under them (with the DLQs, bus queues and retry tiers mqkit
  derives, as the test's clients declared them) is deleted after the test.

Helpers: :class:`Recorder` (a handler that records what it handled and can wait for N of
them, for ``Client`` and ``AsyncClient`` alike) and :func:`published` (the messages waiting
in a queue, decoded, without taking them).

```python
import mqkit
import pytest
from mqkit.testing.pytest_plugin import Recorder, published


@pytest.mark.parametrize("mqkit_url", ["memory", "rabbitmq"], indirect=True)
def test_orders_are_confirmed(mqkit_url, mqkit_names):
    queue = mqkit_names.queue()
    with mqkit.Client(url=mqkit_url, service=mqkit_names.service()) as client:
        client.producer(Order, queue=queue).publish(Order(id=1))
        assert published(mqkit_url, queue, Order) == [Order(id=1)]
        handled = Recorder()
        with client.consumer(queue, Order, handled):
            assert handled.wait(1) == [Order(id=1)]
```
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pika
import pika.exceptions
import pytest
from pydantic import BaseModel

from mqkit.messages import decode
from mqkit.shell import connectable
from mqkit.testing.memory import MemoryBroker, memory_broker
from mqkit.urls import memory_name

__all__ = [
    "LOCAL_URL",
    "Names",
    "Recorder",
    "broker_answers",
    "find_broker",
    "published",
]

M = TypeVar("M", bound=BaseModel)

LOCAL_URL = "amqp://guest:guest@localhost:5672/"
NO_BROKER = """no RabbitMQ broker could be had for the tests.
Tried, in order:
  1. MQKIT_TEST_URL            ({explicit})
  2. {local}   (nothing answered)
  3. testcontainers RabbitMQ   ({docker})
Do one of:
  - start RabbitMQ (e.g. `docker compose up -d rabbitmq`, or `rabbitmq-server -detached`), or
  - export MQKIT_TEST_URL=amqp://user:pass@host:5672/ for a broker that answers, or
  - test on the in-memory broker instead (the mqkit_memory fixture, url="memory://")."""


def broker_answers(url: str, timeout: float = 3.0) -> bool:
    """Whether an AMQP broker at ``url`` accepts a connection (credentials included)."""
    try:
        params = pika.URLParameters(connectable(url))
        params.socket_timeout = timeout
        params.blocked_connection_timeout = timeout
        params.connection_attempts = 1
        connection = pika.BlockingConnection(params)
    except Exception:
        return False
    connection.close()
    return True


def _docker_engine() -> str | None:
    """None when a Docker engine answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker client"
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info failed: {exc}"
    return None if result.returncode == 0 else "no Docker engine answers"


def find_broker(image: str = "rabbitmq:4.0-management") -> Iterator[str]:
    """Yield the URL of a real broker (see ``mqkit_broker_url``) for as long as it is used;
    fail the test (never skip it) when none can be had."""
    explicit = os.environ.get("MQKIT_TEST_URL", "").strip()
    if explicit and broker_answers(explicit):
        yield explicit
        return
    if broker_answers(LOCAL_URL):
        yield LOCAL_URL
        return
    why_not = _docker_engine()
    if why_not is None:
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer(image) as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/"
        return
    pytest.fail(
        NO_BROKER.format(
            explicit="it did not answer" if explicit else "not set",
            local=LOCAL_URL,
            docker=why_not,
        ),
        pytrace=False,
    )


class Names:
    """Unique entity names for one test (``queue()``, ``exchange()``, ``service()``), all
    starting with :attr:`base`."""

    def __init__(self, prefix: str = "mqkit-test") -> None:
        self.base = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.queues: list[str] = []
        self.exchanges: list[str] = []
        self.services: list[str] = []
        self.clients: list[Any] = []

    def _next(self, kind: str, made: list[str]) -> str:
        name = f"{self.base}-{kind}{len(self.queues) + len(self.exchanges) + len(self.services)}"
        made.append(name)
        return name

    def queue(self) -> str:
        return self._next("q", self.queues)

    def exchange(self) -> str:
        return self._next("x", self.exchanges)

    def service(self) -> str:
        return self._next("svc", self.services)

    def derived(self) -> tuple[list[str], list[str]]:
        """The queues and exchanges mqkit may have declared under these names: each queue
        with its DLQ, each exchange, each service's retry tiers (an exchange and a queue)."""
        from mqkit.retry import DEFAULT_POLICY
        from mqkit.topology import Queue, consumer_topology, retry_tier_name

        queues: list[str] = []
        for queue in self.queues:
            topology = consumer_topology(
                Queue(queue), DEFAULT_POLICY, default_type="quorum", delivery_limit=20
            )
            queues += [q.name for q in topology if isinstance(q, Queue)]
        tiers = [
            retry_tier_name(service, delay)
            for service in self.services
            for delay in DEFAULT_POLICY.tiers
        ]
        return queues + tiers, [*self.exchanges, *tiers]

    def watch(self, client: Any) -> None:
        """Also delete, after the test, what ``client`` declared under these names (bus
        queues, the retry tiers of its own policies...)."""
        self.clients.append(client)

    def delete(self, url: str) -> None:
        """Delete what :meth:`derived` names, and what the watched clients declared under
        :attr:`base`, on the broker at ``url`` (missing ones are fine)."""
        queues, exchanges = self.derived()
        for client in self.clients:
            try:
                declared = tuple(client.topology)
            except Exception:  # a client whose construction failed half-way
                continue
            for entity in declared:
                name = getattr(entity, "name", "")
                if not name.startswith(self.base) or getattr(entity, "exclusive", False):
                    continue
                kind = type(entity).__name__
                if kind == "Queue" and name not in queues:
                    queues.append(name)
                elif kind == "Exchange" and name not in exchanges:
                    exchanges.append(name)
        connection = pika.BlockingConnection(pika.URLParameters(connectable(url)))
        try:
            channel = connection.channel()
            for name in queues:
                channel.queue_delete(name)
            for name in exchanges:
                channel.exchange_delete(name)
        finally:
            connection.close()


class Recorder:
    """A handler that records what it handled: ``client.consumer(queue, Order, recorder)``.

    A plain callable, so it serves ``Client`` and ``AsyncClient`` alike (``AsyncClient`` runs
    a plain function off its event loop). ``behaviour(message, ctx)``, when given, runs
    first: raise from it to make the handler fail. :meth:`wait` blocks until N messages were
    handled; in asyncio code, ``await recorder.wait_async(n)``.
    """

    def __init__(self, behaviour: Callable[[Any, Any], Any] | None = None) -> None:
        self.items: list[tuple[Any, Any]] = []
        self._behaviour = behaviour
        self._changed = threading.Condition()

    def __call__(self, message: Any, ctx: Any) -> Any:
        result = self._behaviour(message, ctx) if self._behaviour is not None else None
        with self._changed:
            self.items.append((message, ctx))
            self._changed.notify_all()
        return result

    @property
    def messages(self) -> list[Any]:
        with self._changed:
            return [m for m, _ in self.items]

    @property
    def contexts(self) -> list[Any]:
        with self._changed:
            return [c for _, c in self.items]

    def wait(self, count: int, timeout: float = 10.0) -> list[Any]:
        """The messages handled, once there are ``count``; fail the test after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.items) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"handled {len(self.items)} of {count} messages in {timeout}s")
                self._changed.wait(left)
            return [m for m, _ in self.items]

    async def wait_async(self, count: int, timeout: float = 10.0) -> list[Any]:
        """:meth:`wait` for asyncio code."""
        import asyncio

        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"handled {len(self.messages)} of {count} messages in {timeout}s")
            await asyncio.sleep(0.01)
        return self.messages


def published(source: str | MemoryBroker, queue: str, model: type[M]) -> list[M]:
    """The messages waiting in ``queue``, oldest first, decoded as ``model``, left in the
    queue. ``source``: a broker URL (``amqp://...`` or ``memory://NAME``) or a
    :class:`~mqkit.testing.memory.MemoryBroker`. A body that is not a ``model`` fails the
    test, saying why.

    On the memory broker it only looks. On RabbitMQ it takes the messages without acking and
    lets the broker put them back: they are then ``redelivered``, and on a quorum queue each
    look counts as a delivery towards its delivery limit (20 by default on RabbitMQ 4)."""
    if isinstance(source, MemoryBroker):
        bodies = [m.body for m in source.peek(queue)]
    elif memory_name(source) is not None:
        bodies = [m.body for m in memory_broker(memory_name(source) or "").peek(queue)]
    else:
        bodies = _peek_bodies(source, queue)
    out = []
    for index, body in enumerate(bodies):
        try:
            out.append(decode(body, model))
        except Exception as exc:
            pytest.fail(f"message {index} in {queue!r} is not a {model.__name__}: {exc}")
    return out


def _peek_bodies(url: str, queue: str) -> list[bytes]:
    """Take every message of ``queue`` without acking, then close: the broker puts them
    all back in their places."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    bodies: list[bytes] = []
    try:
        channel = connection.channel()
        while True:
            method, _, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                return bodies
            bodies.append(body.encode() if isinstance(body, str) else bytes(body or b""))
    finally:
        connection.close()


# -- fixtures ------------------------------------------------------------------------------------


@contextmanager
def _fresh_memory_broker() -> Iterator[MemoryBroker]:
    broker = memory_broker(f"test-{uuid.uuid4().hex[:12]}")
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def mqkit_memory() -> Iterator[MemoryBroker]:
    """A fresh in-memory broker for the test (``mqkit_memory.url``: ``memory://<unique>``)."""
    with _fresh_memory_broker() as broker:
        yield broker


@pytest.fixture(scope="session")
def mqkit_broker_url() -> Iterator[str]:
    """A real RabbitMQ's URL: MQKIT_TEST_URL, else localhost:5672, else testcontainers."""
    yield from find_broker()


@pytest.fixture
def mqkit_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL for the service's client: ``memory`` (default, a fresh memory broker) or
    ``rabbitmq`` (``mqkit_broker_url``), chosen with ``indirect`` parametrization."""
    kind = getattr(request, "param", "memory")
    if kind == "memory":
        with _fresh_memory_broker() as broker:
            yield broker.url
    elif kind == "rabbitmq":
        yield request.getfixturevalue("mqkit_broker_url")
    else:
        raise ValueError(f"mqkit_url: {kind!r} is neither 'memory' nor 'rabbitmq'")


@pytest.fixture
def mqkit_names(request: pytest.FixtureRequest) -> Iterator[Names]:
    """Unique names; on a real broker (the test's ``mqkit_url``, or ``mqkit_broker_url``),
    what was declared under them is deleted after the test."""
    names = Names()
    # The broker to clean up, resolved now: pytest then tears it down after this fixture.
    url = None
    if "mqkit_url" in request.fixturenames:
        url = request.getfixturevalue("mqkit_url")
    elif "mqkit_broker_url" in request.fixturenames:
        url = request.getfixturevalue("mqkit_broker_url")
    # Every client made during the test: what it declared under the names is deleted too.
    import mqkit

    monkeypatch = request.getfixturevalue("monkeypatch")
    for cls in (mqkit.Client, mqkit.AsyncClient):
        original = cls.__init__

        def init(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> None:
            names.watch(self)
            __original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", init)
    yield names
    if url is not None and memory_name(url) is None:
        names.delete(url)
