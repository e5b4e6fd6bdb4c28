"""The fault toolkit itself, proven with raw pika before any mqkit client is involved."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from mqkit.testing import FaultProxy


def connect(url: str, **kw: object) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = 5
    for key, value in kw.items():
        setattr(params, key, value)
    return pika.BlockingConnection(params)


@pytest.fixture
def queue(names, raw) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A classic queue on the test broker (removed by ``names`` afterwards)."""
    name = names.queue()
    connection = pika.BlockingConnection(pika.URLParameters(raw.url))
    connection.channel().queue_declare(name, durable=False, auto_delete=False)
    connection.close()
    yield name


def test_url_goes_through_the_proxy_with_the_same_credentials(proxy: FaultProxy, queue: str):
    assert proxy.url == f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
    connection = connect(proxy.url)
    try:
        assert proxy.connections == 1
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", queue, b"through the proxy", mandatory=True)
        method, _, body = channel.basic_get(queue, auto_ack=True)
        assert method is not None and body == b"through the proxy"
    finally:
        connection.close()
    assert proxy.forwarded_bytes > 0


def test_url_keeps_vhost_and_query(broker_url: str):
    with FaultProxy("amqp://u:secret@localhost:5672/some%2Fvhost?heartbeat=5") as p:
        assert p.url == f"amqp://u:secret@127.0.0.1:{p.port}/some%2Fvhost?heartbeat=5"
        assert "secret" not in repr(p)


def test_cut_kills_every_connection_both_ways(proxy: FaultProxy):
    first, second = connect(proxy.url), connect(proxy.url)
    assert proxy.connections == 2
    assert proxy.cut() == 2
    assert proxy.connections == 0
    for connection in (first, second):
        with pytest.raises(pika.exceptions.AMQPError):
            connection.channel()
    # New connections are welcome after a cut.
    again = connect(proxy.url)
    assert again.channel().is_open
    again.close()
    assert proxy.accepted == 3


def test_cut_is_seen_by_the_broker_too(proxy: FaultProxy, names, raw):  # type: ignore[no-untyped-def]
    """The upstream side is closed as well: the broker drops the connection at once, so its
    exclusive queue goes (and unacked deliveries would be requeued)."""
    name = names.queue()
    connection = connect(proxy.url)
    connection.channel().queue_declare(name, exclusive=True)
    assert _exclusive_state(raw.url, name) == "locked"
    proxy.cut()
    deadline = time.monotonic() + 15
    while _exclusive_state(raw.url, name) != "gone":
        if time.monotonic() > deadline:
            pytest.fail("the broker still holds the proxied connection 15s after the cut")
        time.sleep(0.1)
    with pytest.raises(pika.exceptions.AMQPError):
        connection.channel()


def _exclusive_state(url: str, queue: str) -> str:
    """ "locked" while another connection owns exclusive ``queue``, "gone" once it is deleted."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_declare(queue, passive=True)
        return "open"
    except pika.exceptions.ChannelClosedByBroker as exc:
        return {405: "locked", 404: "gone"}.get(exc.reply_code, str(exc))
    finally:
        connection.close()


def _round_trip_in_thread(connection: pika.BlockingConnection, queue: str) -> threading.Event:
    done = threading.Event()

    def work() -> None:
        try:
            connection.channel().queue_declare(queue, passive=True)
        except Exception:
            return  # done stays unset: the round trip did not complete
        done.set()

    threading.Thread(target=work, daemon=True).start()
    return done


def test_blackhole_stalls_until_restore(proxy: FaultProxy, queue: str):
    connection = connect(proxy.url, heartbeat=0)
    try:
        proxy.blackhole()
        done = _round_trip_in_thread(connection, queue)
        assert not done.wait(1.5), "a round trip completed through a black hole"
        assert proxy.connections == 1, "a black hole must leave the connection open"
        proxy.restore()
        assert done.wait(10), "the held bytes did not flow after restore()"
    finally:
        connection.close()


def test_blackhole_for_some_seconds_restores_by_itself(proxy: FaultProxy, queue: str):
    connection = connect(proxy.url, heartbeat=0)
    try:
        proxy.blackhole(1.0)
        started = time.monotonic()
        done = _round_trip_in_thread(connection, queue)
        assert done.wait(10)
        assert time.monotonic() - started >= 0.9
    finally:
        connection.close()


def test_blackhole_also_holds_new_connections(proxy: FaultProxy):
    proxy.blackhole()
    # The TCP connect succeeds (the proxy accepts) but the AMQP handshake never completes.
    with pytest.raises((pika.exceptions.AMQPError, AMQPConnectorException)):
        connect(proxy.url, socket_timeout=1.0, stack_timeout=2.0)
    proxy.restore()
    connect(proxy.url).close()


def test_refuse_refuses_like_a_down_host(proxy: FaultProxy):
    kept = connect(proxy.url)
    proxy.refuse(True)
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", proxy.port))
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        connect(proxy.url)
    assert kept.channel().is_open, "refuse() must leave open connections alone"
    proxy.refuse(False)
    connect(proxy.url).close()
    kept.close()


def test_latency_delays_each_chunk(proxy: FaultProxy, queue: str):
    connection = connect(proxy.url, heartbeat=0)
    try:
        channel = connection.channel()
        proxy.latency(0.25)
        started = time.monotonic()
        channel.queue_declare(queue, passive=True)  # one chunk each way
        assert time.monotonic() - started >= 0.45
        proxy.latency(0)
    finally:
        connection.close()


def test_stop_leaves_nothing_running(broker_url: str):
    p = FaultProxy(broker_url).start()
    connection = connect(p.url)
    port = p.port
    p.blackhole(30)  # a pending timer that stop() must cancel
    p.stop()
    p.stop()  # idempotent
    assert not [t for t in threading.enumerate() if t.name == "mqkit-fault-proxy"]
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))
    with pytest.raises(pika.exceptions.AMQPError):
        connection.channel()
    with pytest.raises(RuntimeError, match="not started"):
        p.cut()


def test_only_loopback_brokers():
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("amqp://guest:guest@10.20.30.40:5672/")


def test_usable_from_async_code(proxy: FaultProxy, queue: str):
    """Plain calls from inside a running event loop (an async test) work too."""
    import asyncio

    async def body() -> int:
        connection = connect(proxy.url)
        cut = proxy.cut()
        await asyncio.sleep(0)
        with pytest.raises(pika.exceptions.AMQPError):
            connection.channel()
        return cut

    assert asyncio.run(body()) == 1
