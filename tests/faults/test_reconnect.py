"""Connection loss after connect (docs/SHELL_CONTRACT.md §3), on both runtimes.

Every test goes through a :class:`~mqkit.testing.FaultProxy` or a RabbitMQ node of its own;
the accounting line of each stream is printed (``-s``) and attached to the report.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
import uuid
from typing import Any

import pytest

import mqkit
from mqkit.testing import FaultProxy, RabbitNode

from .conftest import Ledger, Tick, cut_every, run_stream, wait_for

pytestmark = pytest.mark.fault

RUNTIMES = ["sync", "async"]
N_CUTS = 2000  # messages per runtime in the cut storm (at least)
N_CUT_EVENTS = 12  # cuts per runtime, 0.3-0.6 s apart
N_RESTART = 600  # messages per runtime across a node restart
CONFIRM_TIMEOUT = 2.0
SLACK = 1.5  # scheduling noise on a shared 2-core machine


# -- cut storm -----------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_cut_storm_loses_no_confirmed_message(
    runtime: str, proxy: FaultProxy, names: Any, record_property: Any
) -> None:
    """The proxy cuts both clients' links 12 times, 0.3-0.6 s apart, while (at least) 2,000
    messages are published with confirms; nothing confirmed is lost and the consumer resumes
    by itself."""
    ledger = Ledger(runtime, "cut-storm")
    try:
        run_stream(
            runtime,
            ledger,
            queue=names.queue(),
            n=N_CUTS,
            client_kw=dict(
                url=proxy.url, connect_timeout=20, confirm_timeout=5, heartbeat=5, prefetch=100
            ),
            chaos=cut_every(proxy, 0.3, 0.6, times=N_CUT_EVENTS),
            until_chaos_done=True,  # at least N_CUTS messages, and every cut mid-stream
        )
    finally:
        ledger.report(record_property)
    assert len(ledger.faults) == N_CUT_EVENTS, f"the chaos script did not finish: {ledger.faults}"
    ledger.check()


# -- black hole: publish never hangs ---------------------------------------------------------


def _client_kw(url: str, **kw: Any) -> dict[str, Any]:
    # heartbeat 30: the client must not depend on noticing the dead link to give up in time.
    return dict(url=url, connect_timeout=10, confirm_timeout=CONFIRM_TIMEOUT, heartbeat=30) | kw


def _assert_timed_out_in_time(elapsed: float, what: str) -> None:
    assert elapsed <= CONFIRM_TIMEOUT + SLACK, (
        f"{what} raised PublishTimeout only after {elapsed:.2f}s "
        f"(confirm_timeout={CONFIRM_TIMEOUT}s)"
    )
    assert elapsed >= CONFIRM_TIMEOUT * 0.9, (
        f"{what} gave up after {elapsed:.2f}s, before confirm_timeout={CONFIRM_TIMEOUT}s"
    )


def _blackhole_sync(proxy: FaultProxy, queue: str) -> dict[str, Any]:
    with mqkit.Client(**_client_kw(proxy.url)) as client:
        producer = client.producer(Tick, queue=queue)
        producer.publish(Tick(run="bh", seq=0))
        proxy.blackhole()
        try:
            for attempt in (1, 2):  # the second finds the client as the first left it
                started = time.monotonic()
                with pytest.raises(mqkit.PublishTimeout):
                    producer.publish(Tick(run="bh", seq=attempt))
                _assert_timed_out_in_time(time.monotonic() - started, f"publish #{attempt}")
            started = time.monotonic()
            with pytest.raises(mqkit.PublishError) as info:
                producer.publish_many([Tick(run="bh", seq=s) for s in (10, 11, 12)])
            many_elapsed = time.monotonic() - started
            unconfirmed = len(info.value.unconfirmed)
        finally:
            proxy.restore()  # so closing the client cannot hang on a failed assertion
        recovered = _retry_until_confirmed(lambda: producer.publish(Tick(run="bh", seq=99)))
        return dict(many_elapsed=many_elapsed, unconfirmed=unconfirmed, recovered=recovered)


async def _blackhole_async(proxy: FaultProxy, queue: str) -> dict[str, Any]:
    async with mqkit.AsyncClient(**_client_kw(proxy.url)) as client:
        producer = await client.producer(Tick, queue=queue)
        await producer.publish(Tick(run="bh", seq=0))
        proxy.blackhole()
        try:
            for attempt in (1, 2):
                started = time.monotonic()
                with pytest.raises(mqkit.PublishTimeout):
                    # wait_for is a backstop only: a hang fails the test instead of stalling it
                    await asyncio.wait_for(producer.publish(Tick(run="bh", seq=attempt)), 30)
                _assert_timed_out_in_time(time.monotonic() - started, f"publish #{attempt}")
            started = time.monotonic()
            with pytest.raises(mqkit.PublishError) as info:
                await asyncio.wait_for(
                    producer.publish_many([Tick(run="bh", seq=s) for s in (10, 11, 12)]), 30
                )
            many_elapsed = time.monotonic() - started
            unconfirmed = len(info.value.unconfirmed)
        finally:
            proxy.restore()
        deadline = time.monotonic() + 30
        while True:
            try:
                await producer.publish(Tick(run="bh", seq=99))
                break
            except mqkit.PublishError:
                if time.monotonic() > deadline:
                    raise
        recovered = time.monotonic() - (deadline - 30)
        return dict(many_elapsed=many_elapsed, unconfirmed=unconfirmed, recovered=recovered)


def _retry_until_confirmed(publish: Any, timeout: float = 30.0) -> float:
    started = time.monotonic()
    while True:
        try:
            publish()
            return time.monotonic() - started
        except mqkit.PublishError:
            if time.monotonic() - started > timeout:
                raise


@pytest.mark.timeout(120)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_publish_into_a_black_hole_times_out_and_never_hangs(
    runtime: str, proxy: FaultProxy, names: Any
) -> None:
    queue = names.queue()
    if runtime == "sync":
        result = _run_in_thread(lambda: _blackhole_sync(proxy, queue), timeout=90)
    else:
        result = asyncio.run(_blackhole_async(proxy, queue))
    print(f"\nBLACKHOLE runtime={runtime} {result}")
    assert result["many_elapsed"] <= CONFIRM_TIMEOUT + SLACK, (
        f"publish_many raised only after {result['many_elapsed']:.2f}s"
    )
    assert result["unconfirmed"] == 3, (
        f"publish_many's PublishError lists {result['unconfirmed']} unconfirmed ids, not 3"
    )


def _run_in_thread(body: Any, timeout: float) -> Any:
    """Run a blocking body on a thread so a hang fails the test after ``timeout``."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = body()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"the blocking client hung for more than {timeout}s")
    if "error" in out:
        raise out["error"]
    return out["value"]


# -- fail-over -----------------------------------------------------------------------------


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_connect_fails_over_to_the_next_url(runtime: str, make_proxy: Any, names: Any) -> None:
    down, up = make_proxy(), make_proxy()
    down.refuse(True)
    kw = dict(urls=[down.url, up.url], connect_timeout=10, confirm_timeout=5)
    queue = names.queue()

    if runtime == "sync":
        with mqkit.Client(**kw) as client:
            client.producer(Tick, queue=queue).publish(Tick(run="fo", seq=1))
            health = client.health()
    else:

        async def body() -> Any:
            async with mqkit.AsyncClient(**kw) as client:
                producer = await client.producer(Tick, queue=queue)
                await producer.publish(Tick(run="fo", seq=1))
                return client.health()

        health = asyncio.run(body())
    assert down.accepted == 0
    assert up.accepted >= 1
    assert health.connected and _port_of(health.url) == up.port, health
    assert "guest:guest" not in health.url, "health().url shows the password"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_reconnect_fails_over_when_the_first_host_goes_down(
    runtime: str, make_proxy: Any, names: Any
) -> None:
    first, second = make_proxy(), make_proxy()
    kw = dict(urls=[first.url, second.url], connect_timeout=10, confirm_timeout=5)
    queue = names.queue()

    def go_down() -> None:
        first.refuse(True)
        first.cut()

    if runtime == "sync":
        with mqkit.Client(**kw) as client:
            producer = client.producer(Tick, queue=queue)
            producer.publish(Tick(run="fo", seq=1))
            before = client.health()
            go_down()
            _retry_until_confirmed(lambda: producer.publish(Tick(run="fo", seq=2)))
            # The publish proves the publishing connection failed over; the consuming one
            # reconnects on its own schedule.
            deadline = time.monotonic() + 20
            while not client.health().connected and time.monotonic() < deadline:
                time.sleep(0.05)
            after = client.health()
    else:

        async def body() -> tuple[Any, Any]:
            async with mqkit.AsyncClient(**kw) as client:
                producer = await client.producer(Tick, queue=queue)
                await producer.publish(Tick(run="fo", seq=1))
                before = client.health()
                go_down()
                deadline = time.monotonic() + 30
                while True:
                    try:
                        await producer.publish(Tick(run="fo", seq=2))
                        break
                    except mqkit.PublishError:
                        if time.monotonic() > deadline:
                            raise
                # The publish proves the publishing connection failed over; the consuming
                # one reconnects on its own schedule.
                while not client.health().connected and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                return before, client.health()

        before, after = asyncio.run(body())
    assert _port_of(before.url) == first.port, before
    assert _port_of(after.url) == second.port, after
    assert after.connected and after.reconnects >= 1, after
    assert after.last_error, f"health() kept no last error after losing the link: {after}"


# -- a node of our own restarted mid-stream ------------------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_node_restart_mid_stream_loses_nothing(
    runtime: str, rabbit_node: RabbitNode, record_property: Any
) -> None:
    if not rabbit_node.running:  # the other runtime's test failed half-way through a restart
        rabbit_node.start()
    ledger = Ledger(runtime, "node-restart")

    def restart_at_a_third(ledger: Ledger, stop: threading.Event) -> None:
        if wait_for(ledger, stop, N_RESTART // 3):
            ledger.fault(f"restart {rabbit_node.name} at confirmed={len(ledger.confirmed)}")
            started = time.monotonic()
            rabbit_node.restart()
            ledger.notes["restart_s"] = round(time.monotonic() - started, 1)

    try:
        run_stream(
            runtime,
            ledger,
            queue=f"mqkit-fault-{uuid.uuid4().hex[:8]}",  # lives and dies with the node
            n=N_RESTART,
            client_kw=dict(url=rabbit_node.url, connect_timeout=30, confirm_timeout=5, heartbeat=5),
            chaos=restart_at_a_third,
            until_chaos_done=True,
        )
    finally:
        ledger.report(record_property)
    assert ledger.faults, "the node was never restarted"
    ledger.check()


# -- closed while reconnecting ---------------------------------------------------------------


def test_a_sync_client_closed_while_reconnecting_closes_the_attempts_socket(
    proxy: FaultProxy,
) -> None:
    """A reconnect attempt owns a socket only the IO loop closes: closing the client must end
    the attempt before it stops that loop. (Left to the garbage collector, the socket's
    ResourceWarning would fail whichever later test happened to collect it.)"""
    client = mqkit.Client(url=proxy.url, connect_timeout=10, heartbeat=5)
    with client:
        accepted = proxy.accepted
        proxy.blackhole()  # the attempt's TCP connect succeeds, its handshake never does
        proxy.cut()
        deadline = time.monotonic() + 10
        while proxy.accepted <= accepted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proxy.accepted > accepted, "the client did not try to reconnect"
        started = time.monotonic()
    took = time.monotonic() - started
    gc.collect()
    left = [
        sock
        for sock in gc.get_objects()
        if isinstance(sock, socket.socket)
        and sock.fileno() != -1
        and _peer_port(sock) == proxy.port
    ]
    assert not left, f"sockets left open after close: {left}"
    assert took < 4.0, f"closing a reconnecting client took {took:.1f}s"


def _peer_port(sock: socket.socket) -> int | None:
    try:
        return int(sock.getpeername()[1])
    except (OSError, IndexError, TypeError):
        return None
