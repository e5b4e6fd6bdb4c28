"""Fixtures every test may use: the broker URL (never skipped) and unique names."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pika
import pytest

LOCAL_URL = "amqp://guest:guest@localhost:5672/"
NO_BROKER = """no RabbitMQ broker could be had for the integration tests.
Tried, in order:
  1. MQKIT_TEST_URL            (not set, or it did not answer)
  2. {local}   (nothing answered)
  3. testcontainers RabbitMQ   ({docker})
Do one of:
  - run `make broker` (starts one with docker compose, or a local rabbitmq-server), or
  - start RabbitMQ yourself and export MQKIT_TEST_URL=amqp://user:pass@host:5672/"""


def broker_answers(url: str, timeout: float = 3.0) -> bool:
    """Whether an AMQP broker at ``url`` accepts a connection (credentials included)."""
    try:
        params = pika.URLParameters(url)
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


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """The URL of a real broker: MQKIT_TEST_URL, else localhost:5672, else testcontainers.

    Fails (never skips) when none can be had.
    """
    explicit = os.environ.get("MQKIT_TEST_URL")
    if explicit and broker_answers(explicit):
        yield explicit
        return
    if broker_answers(LOCAL_URL):
        yield LOCAL_URL
        return
    why_not = _docker_engine()
    if why_not is None:
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:4.0-management") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/"
        return
    pytest.fail(NO_BROKER.format(local=LOCAL_URL, docker=why_not), pytrace=False)


SESSION_PREFIX = f"mqkit-test-{uuid.uuid4().hex[:8]}"


class Names:
    """Unique entity names for one test; every name starts with the session prefix."""

    def __init__(self) -> None:
        self.base = f"{SESSION_PREFIX}-{uuid.uuid4().hex[:6]}"
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()
        self._n = 0

    def _next(self, kind: str) -> str:
        self._n += 1
        return f"{self.base}-{kind}{self._n}"

    def queue(self) -> str:
        name = self._next("q")
        self.queues.add(name)
        return name

    def exchange(self) -> str:
        name = self._next("x")
        self.exchanges.add(name)
        return name

    def service(self) -> str:
        return self._next("svc")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def names(broker_url: str, _sweep: None) -> Iterator[Names]:
    """Unique names; afterwards the test's queues (with their DLQs) and exchanges go."""
    names = Names()
    yield names
    queues = [*names.queues, *(f"{q}.dlq" for q in names.queues)]
    delete_entities(broker_url, queues, sorted(names.exchanges))


@pytest.fixture(scope="session")
def _sweep(broker_url: str) -> Iterator[None]:
    """At the end of the session, delete whatever else this session declared (retry
    queues, bus queues): every entity whose name starts with the session prefix."""
    yield
    queues, exchanges = _list_entities(SESSION_PREFIX)
    delete_entities(broker_url, queues, exchanges)


def delete_entities(url: str, queues: list[str], exchanges: list[str]) -> None:
    """Delete these queues and exchanges (missing ones are fine)."""
    if not queues and not exchanges:
        return
    params = pika.URLParameters(url)
    connection = pika.BlockingConnection(params)
    try:
        for queue in queues:
            channel = connection.channel()
            channel.queue_delete(queue)
            channel.close()
        for exchange in exchanges:
            channel = connection.channel()
            channel.exchange_delete(exchange)
            channel.close()
    finally:
        connection.close()


def _list_entities(prefix: str) -> tuple[list[str], list[str]]:
    """Names starting with ``prefix``, listed by ``rabbitmqctl`` (a local broker only: mqkit
    derives retry queues and DLQs whose names a test never spells out)."""
    if shutil.which("rabbitmqctl") is None:
        return [], []
    out: dict[str, list[str]] = {}
    for kind in ("list_queues", "list_exchanges"):
        result = subprocess.run(
            ["rabbitmqctl", "-q", "--no-table-headers", kind, "name"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        out[kind] = [
            line.strip() for line in result.stdout.splitlines() if line.strip().startswith(prefix)
        ]
    return out["list_queues"], out["list_exchanges"]


class Raw:
    """A plain pika client for tests to look at the broker behind mqkit's back."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _channel(self) -> tuple[pika.BlockingConnection, object]:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        return connection, connection.channel()

    def count(self, queue: str) -> int:
        """Messages ready in ``queue`` (passive declare)."""
        connection, channel = self._channel()
        try:
            return int(channel.queue_declare(queue, passive=True).method.message_count)  # type: ignore[attr-defined]
        finally:
            connection.close()

    def exists(self, queue: str) -> bool:
        connection, channel = self._channel()
        try:
            channel.queue_declare(queue, passive=True)  # type: ignore[attr-defined]
            return True
        except pika.exceptions.ChannelClosedByBroker:
            return False
        finally:
            if connection.is_open:
                connection.close()

    def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        exchange: str = "",
        properties: pika.BasicProperties | None = None,
    ) -> None:
        """Publish with a confirm (as any non-mqkit service might)."""
        connection, channel = self._channel()
        try:
            channel.confirm_delivery()  # type: ignore[attr-defined]
            channel.basic_publish(  # type: ignore[attr-defined]
                exchange,
                routing_key,
                body,
                properties
                or pika.BasicProperties(content_type="application/json", delivery_mode=2),
                mandatory=True,
            )
        finally:
            connection.close()

    def drain(
        self, queue: str, limit: int = 10_000
    ) -> list[tuple[object, pika.BasicProperties, bytes]]:
        """Take (and ack) every message in ``queue``."""
        connection, channel = self._channel()
        out = []
        try:
            while len(out) < limit:
                method, props, body = channel.basic_get(queue, auto_ack=True)  # type: ignore[attr-defined]
                if method is None:
                    break
                out.append((method, props, body))
        finally:
            connection.close()
        return out


@pytest.fixture
def raw(broker_url: str) -> Raw:
    """A plain pika client on the test broker."""
    return Raw(broker_url)
