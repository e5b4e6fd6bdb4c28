"""The first steps off the happy path (issue 9 items 2-4), on both runtimes.

- A handler that cannot run is refused when it is registered (``TypeError``), on
  ``consumer()``, ``responder()`` and ``bus.subscribe()``; ``AsyncClient`` runs a plain
  function in a worker thread, off the event loop.
- One event class subscribed on two ``event_bus()`` objects of one client is refused, as on
  one bus (each would get half the events).
- A consumer, responder or bus made but never started: one WARNING naming its queue when the
  client closes. ``run(drain_timeout=...)`` says how long it waits; a second SIGINT during
  the drain stops at once, without a traceback (a real process).

The ``rt`` harness turns plain test handlers into ``async def`` for AsyncClient, so what
depends on the handler's kind calls the real client (``real(client)``) directly.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Blocking, wait_until
from pydantic import BaseModel

import mqkit

ROOT = Path(__file__).resolve().parents[2]


class Order(BaseModel):
    order_id: str


class Rate(BaseModel):
    value: int


class Placed(mqkit.Event, event_type="first-use.placed"):
    order_id: str


class Shipped(mqkit.Event, event_type="first-use.shipped"):
    order_id: str


def real(client: Any) -> Any:
    """The client itself: mqkit.Client, or the AsyncClient behind the harness."""
    return client.target if isinstance(client, Blocking) else client


async def async_handler(message: Any, ctx: Any) -> None: ...


class AsyncCallable:
    async def __call__(self, message: Any, ctx: Any) -> None: ...


def plain(message: Any, ctx: Any) -> None: ...


def registrations(client: Any, names: Any) -> dict[str, Any]:
    """Each way to register a handler on ``client``, as ``name: register(handler)``."""
    bus = client.event_bus(exchange=names.exchange())
    return {
        "consumer": lambda handler: client.consumer(names.queue(), Order, handler),
        "responder": lambda handler: client.responder(names.queue(), Order, handler),
        "subscribe": lambda handler: bus.subscribe(Placed, handler),
    }


# -- item 2: handlers that cannot run ------------------------------------------------------


@pytest.mark.parametrize(
    "handler",
    [async_handler, AsyncCallable(), functools.partial(async_handler)],
    ids=["async-def", "async-__call__", "partial"],
)
def test_client_refuses_an_async_handler_everywhere(broker_url, names, handler):
    with mqkit.Client(url=broker_url, service=names.service()) as client:
        for how, register in registrations(client, names).items():
            with pytest.raises(TypeError) as info:
                register(handler)
            text = str(info.value)
            assert "async def" in text, how
            assert "use mqkit.AsyncClient" in text and "plain function" in text, how


@pytest.mark.parametrize(
    ("handler", "words"),
    [
        ("handle_order", "must be a function taking (message, ctx)"),
        (42, "must be a function taking (message, ctx)"),
        (lambda message: None, "cannot be called as handler(message, ctx)"),
        (lambda message, ctx, extra: None, "cannot be called as handler(message, ctx)"),
    ],
    ids=["string", "number", "one-parameter", "three-parameters"],
)
def test_a_handler_that_cannot_run_is_refused_on_both_runtimes(rt, names, handler, words):
    with rt.client(service=names.service()) as client:
        for register in registrations(real(client), names).values():
            with pytest.raises(TypeError, match=re.escape(words)):
                register(handler)


def test_the_refusal_names_what_the_handler_is_for(rt, names):
    queue = names.queue()
    with rt.client(service=names.service()) as client:
        with pytest.raises(TypeError, match=rf"^consumer of queue '{queue}': the handler"):
            real(client).consumer(queue, Order, "nope")
        with pytest.raises(TypeError, match=rf"^responder on queue '{queue}': the handler"):
            real(client).responder(queue, Order, "nope")
        bus = real(client).event_bus(exchange=names.exchange())
        with pytest.raises(TypeError, match=r"^subscription to 'first-use.placed': the handler"):
            bus.subscribe(Placed, "nope")
        with pytest.raises(TypeError, match=r"^subscription to 'first-use.\*': the handler"):
            bus.subscribe("first-use.*")(42)


def test_a_refused_handler_leaves_nothing_behind(rt, names, caplog):
    """Nothing is made: the subscription key stays free, and close() does not warn about a
    refused consumer (only about the bus whose valid subscription never started)."""
    with (
        caplog.at_level(logging.WARNING, logger="mqkit"),
        rt.client(service=names.service()) as client,
    ):
        bus = real(client).event_bus(exchange=names.exchange())
        with pytest.raises(TypeError):
            bus.subscribe(Placed, lambda event: None)
        assert bus.consumers == ()
        bus.subscribe(Placed, plain)  # the key was not taken by the refused one
        with pytest.raises(TypeError):
            real(client).consumer(names.queue(), Order, 42)
    [warning] = never_started(caplog)
    assert "an event bus" in warning.getMessage()


def test_async_client_runs_a_plain_handler_in_a_worker_thread(rt, names):
    """The decision for AsyncClient: a plain function is accepted and runs off the loop,
    so one that blocks does not freeze it (and its messages are handled, not lost). The
    blocking client runs it on a worker thread of its own."""
    queue = names.queue()
    entered = threading.Event()
    release = threading.Event()
    threads: list[threading.Thread] = []

    def blocking_handler(message: Order, ctx: mqkit.Context) -> None:
        threads.append(threading.current_thread())
        entered.set()
        release.wait(10)  # a blocking call, as a database driver makes

    with rt.client() as client:
        consumer = real(client).consumer(queue, Order, blocking_handler)
        if rt.is_async:
            consumer = Blocking(consumer, rt.loop)
        client.producer(Order, queue=queue).publish(Order(order_id="1"))
        consumer.start()
        try:
            assert entered.wait(10), "the handler did not run"
            # While the handler blocks, the event loop (or the client) still answers.
            started = time.monotonic()
            if rt.is_async:
                rt.loop.run(asyncio.sleep(0), timeout=5)
                assert threads[0] is not rt.loop.thread
            client.producer(Order, queue=queue).publish(Order(order_id="2"))
            assert time.monotonic() - started < 2.0
        finally:
            release.set()
            consumer.stop()
    assert threads[0] is not threading.main_thread()


def test_async_client_runs_a_plain_responder_in_a_worker_thread(rt, names):
    queue = names.queue()
    seen: list[threading.Thread] = []

    def double(request: Rate, ctx: mqkit.Context) -> Rate:
        seen.append(threading.current_thread())
        time.sleep(0.05)
        return Rate(value=request.value * 2)

    with rt.client() as client:
        responder = real(client).responder(queue, Rate, double)
        if rt.is_async:
            responder = Blocking(responder, rt.loop)
        with responder:
            assert client.request(queue, Rate(value=21), Rate, timeout=10) == Rate(value=42)
    assert seen and seen[0] is not threading.main_thread()
    if rt.is_async:
        assert seen[0] is not rt.loop.thread


def test_async_client_handler_kinds_all_run(rt, names):
    """async def, an object with async __call__, a partial of an async def, and a plain
    function: each one handles its message on AsyncClient; the plain ones on Client."""
    got: list[str] = []

    async def handle_async(message: Order, ctx: mqkit.Context) -> None:
        got.append(f"async:{message.order_id}")

    class Handler:
        async def __call__(self, message: Order, ctx: mqkit.Context) -> None:
            got.append(f"call:{message.order_id}")

    async def tagged(tag: str, message: Order, ctx: mqkit.Context) -> None:
        got.append(f"{tag}:{message.order_id}")

    def handle_plain(message: Order, ctx: mqkit.Context) -> None:
        got.append(f"plain:{message.order_id}")

    handlers: dict[str, Any] = {"plain": handle_plain}
    if rt.is_async:
        handlers |= {
            "async": handle_async,
            "call": Handler(),
            "partial": functools.partial(tagged, "partial"),
        }
    with rt.client() as client:
        consumers = []
        for tag, handler in handlers.items():
            queue = names.queue()
            consumer = real(client).consumer(queue, Order, handler)
            consumers.append(Blocking(consumer, rt.loop) if rt.is_async else consumer)
            client.producer(Order, queue=queue).publish(Order(order_id=tag))
        for consumer in consumers:
            consumer.start()
        try:
            wait_until(lambda: len(got) == len(handlers), what="every handler ran")
        finally:
            for consumer in consumers:
                consumer.stop()
    assert sorted(got) == sorted(f"{tag}:{tag}" for tag in handlers)


# -- item 3: one event class on two buses of one client ------------------------------------


def test_one_event_on_two_buses_of_one_client_is_refused(rt, names, collector):
    exchange, service = names.exchange(), names.service()
    with rt.client(service=service) as client:
        first, second = client.event_bus(exchange=exchange), client.event_bus(exchange=exchange)
        first.subscribe(Placed, collector().__call__)
        with pytest.raises(mqkit.ConfigError) as info:
            second.subscribe(Placed, collector().__call__)
        text = str(info.value)
        assert f"service {service!r} already subscribes to 'first-use.placed'" in text
        assert "another one of this client" in text and "pass queue=" in text
        # Patterns too; another event type is fine.
        first.subscribe("first-use.#", collector().__call__)
        with pytest.raises(mqkit.ConfigError):
            second.subscribe("first-use.#", collector().__call__)
        second.subscribe(Shipped, collector().__call__)
        assert len(first.consumers) == 2 and len(second.consumers) == 1


def test_two_buses_get_every_event_when_each_has_its_own_queue(rt, names, collector):
    """The ways to two handlers of one event that do not split it: queue=, another
    service, broadcast."""
    exchange, service = names.exchange(), names.service()
    other_queue = f"{service}.first-use.placed.audit"
    names.queues.add(other_queue)
    got = {name: collector() for name in ("first", "queue", "service", "broadcast")}
    with rt.client(service=service) as client:
        first = client.event_bus(exchange=exchange)
        second = client.event_bus(exchange=exchange)
        other = client.event_bus(exchange=exchange, service=names.service())
        first.subscribe(Placed, got["first"].__call__)
        second.subscribe(Placed, got["queue"].__call__, queue=other_queue)
        second.subscribe(Placed, got["broadcast"].__call__, broadcast=True)
        other.subscribe(Placed, got["service"].__call__)
        with first, second, other:
            for i in range(6):
                first.publish(Placed(order_id=str(i)))
            for name, received in got.items():
                received.wait(6, timeout=15)
                assert received.settle(0.3) == 6, name


def test_buses_of_two_clients_of_one_service_compete_as_instances(rt, names, collector):
    """Two clients are two instances: they share the queue on purpose (not refused)."""
    exchange, service = names.exchange(), names.service()
    got = [collector(), collector()]
    with rt.client(service=service) as one, rt.client(service=service) as two:
        buses = [one.event_bus(exchange=exchange), two.event_bus(exchange=exchange)]
        for bus, received in zip(buses, got, strict=True):
            bus.subscribe(Placed, received.__call__)
        with buses[0], buses[1]:
            for i in range(10):
                buses[0].publish(Placed(order_id=str(i)))
            wait_until(lambda: sum(len(g.items) for g in got) == 10, what="10 events")
    assert sum(len(g.items) for g in got) == 10


# -- item 4: never started, drain timeout, second SIGINT -----------------------------------


def never_started(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "was made but never started" in r.getMessage()]


def test_close_warns_once_about_a_consumer_never_started(rt, names, caplog, collector):
    queue, responded, subscribed = names.queue(), names.queue(), names.queue()
    with (
        caplog.at_level(logging.WARNING, logger="mqkit"),
        rt.client(service=names.service()) as client,
    ):
        client.consumer(queue, Order, collector().__call__)
        client.responder(responded, Order, lambda m, c: m)
        bus = client.event_bus(exchange=names.exchange())
        bus.subscribe(Placed, collector().__call__, queue=subscribed)
        client.event_bus(exchange=names.exchange())  # used only to publish: no warning
        client.close()  # idempotent: no second warning
    records = never_started(caplog)
    assert len(records) == 3, [r.getMessage() for r in records]
    consumer, responder, bus_record = records
    assert all(r.levelno == logging.WARNING for r in records)
    assert consumer.getMessage().startswith(f"a consumer of queue {queue!r} was made")
    assert consumer.queue == queue  # type: ignore[attr-defined]
    assert responder.getMessage().startswith(f"a responder of queue {responded!r} was made")
    assert "answered no request" in responder.getMessage()
    assert f"queue {subscribed!r}" in bus_record.getMessage()
    start = "start it with await client.run()" if rt.is_async else "start it with client.run()"
    assert start in consumer.getMessage()
    assert not any(r.getMessage().startswith("mqkit: ") for r in caplog.records)


def test_close_does_not_warn_about_what_was_started_and_stopped(rt, names, caplog, collector):
    with (
        caplog.at_level(logging.WARNING, logger="mqkit"),
        rt.client(service=names.service()) as client,
    ):
        consumer = client.consumer(names.queue(), Order, collector().__call__)
        consumer.start()
        consumer.stop()
        bus = client.event_bus(exchange=names.exchange())
        bus.subscribe(Placed, collector().__call__)
        with bus:
            pass
        with client.consumer(names.queue(), Order, collector().__call__):
            pass
        client.consumer(names.queue(), Order, collector().__call__).start()  # running
    assert never_started(caplog) == []


def test_run_drains_within_its_timeout_and_says_how_long(rt, names, caplog):
    queue = names.queue()
    entered, release = threading.Event(), threading.Event()

    def stuck(message: Order, ctx: mqkit.Context) -> None:
        entered.set()
        release.wait(20)

    async def stuck_async(message: Order, ctx: mqkit.Context) -> None:
        entered.set()
        while not release.is_set():
            await asyncio.sleep(0.02)

    outcome: list[BaseException | None] = []
    with caplog.at_level(logging.INFO, logger="mqkit"), rt.client() as client:
        real(client).consumer(queue, Order, stuck_async if rt.is_async else stuck)
        client.producer(Order, queue=queue).publish(Order(order_id="1"))

        def run() -> None:
            try:
                client.run(drain_timeout=0.5)
            except BaseException as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

        runner = threading.Thread(target=run)
        runner.start()
        try:
            assert entered.wait(10), "the handler did not start"
            stopped = time.monotonic()
            client.stop()
            runner.join(10)
            took = time.monotonic() - stopped
        finally:
            release.set()
            runner.join(10)
    assert outcome == [None]
    assert 0.4 < took < 4.0, took
    lines = [r.getMessage() for r in caplog.records]
    assert any("waiting up to 0.5s for running handlers to finish" in line for line in lines)


def test_run_rejects_a_bad_drain_timeout(rt):
    with rt.client() as client:
        for bad in (-1, float("nan"), "soon"):
            with pytest.raises(mqkit.ConfigError, match="drain_timeout"):
                client.run(drain_timeout=bad)


def test_the_drain_timeout_defaults_to_the_setting(rt, names, caplog):
    with caplog.at_level(logging.INFO, logger="mqkit"), rt.client(drain_timeout=7) as client:
        assert client.settings.drain_timeout == 7
        client.stop()
        client.run()  # stop() before run(): that run ends at once
    assert any("waiting up to 7s" in r.getMessage() for r in caplog.records)
    assert mqkit.Settings().drain_timeout == 30


SERVICE_SCRIPT = """
import asyncio, logging, sys, time
from pydantic import BaseModel
import mqkit

logging.basicConfig(
    level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s"
)
url, queue, runtime, drain = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

class Order(BaseModel):
    order_id: str

def slow(message, ctx):
    print("handling", flush=True)
    time.sleep(60)

async def slow_async(message, ctx):
    print("handling", flush=True)
    await asyncio.sleep(60)

if runtime == "sync":
    with mqkit.Client(url=url) as client:
        client.producer(Order, queue=queue).publish(Order(order_id="1"))
        client.consumer(queue, Order, slow)
        client.run(drain_timeout=drain)
else:
    async def main():
        async with mqkit.AsyncClient(url=url) as client:
            producer = await client.producer(Order, queue=queue)
            await producer.publish(Order(order_id="1"))
            client.consumer(queue, Order, slow_async)
            await client.run(drain_timeout=drain)
    asyncio.run(main())
print("exited normally", flush=True)
"""


def start_service(tmp_path: Path, url: str, queue: str, runtime: str, drain: float) -> Any:
    script = tmp_path / "service.py"
    script.write_text(textwrap.dedent(SERVICE_SCRIPT))
    # No MQKIT_* settings but the test's own service (its retry tiers go with its names).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQKIT_")}
    env["MQKIT_SERVICE"] = os.environ["MQKIT_SERVICE"]
    process = subprocess.Popen(
        [sys.executable, str(script), url, queue, runtime, str(drain)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until the handler runs (or the script died)
    if line.strip() != "handling":
        process.kill()
        _, err = process.communicate(timeout=10)
        pytest.fail(f"the service did not start handling: {line!r}\n{err}")
    return process


@pytest.mark.parametrize("runtime", ["sync", "async"])
def test_a_second_sigint_during_the_drain_stops_at_once(broker_url, names, raw, tmp_path, runtime):
    queue = names.queue()
    process = start_service(tmp_path, broker_url, queue, runtime, drain=60)
    try:
        process.send_signal(signal.SIGINT)
        time.sleep(1.0)  # the drain has begun: it would wait up to 60 s for the handler
        assert process.poll() is None, "the first SIGINT should wait for the handler"
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=15)
        took = time.monotonic() - interrupted
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert took < 5.0, f"took {took:.1f}s to stop after the second SIGINT:\n{err}"
    assert process.returncode == 130, err
    assert "Traceback" not in err, err
    again = [line for line in err.splitlines() if "received again" in line]
    assert len(again) == 1, err
    assert again[0].startswith("mqkit.client WARNING SIGINT received again: stopping at once")
    assert "waiting up to 60s for running handlers to finish" in err
    assert "send SIGINT again to stop at once" in err
    assert "exited normally" not in out
    assert "mqkit: mqkit:" not in err
    # The message that was being handled went back to its queue.
    wait_until(lambda: raw.count(queue) == 1, timeout=15, what="the message back in its queue")


@pytest.mark.parametrize("runtime", ["sync", "async"])
def test_one_sigint_drains_for_the_drain_timeout_then_exits(
    broker_url, names, raw, tmp_path, runtime
):
    queue = names.queue()
    process = start_service(tmp_path, broker_url, queue, runtime, drain=1)
    try:
        signalled = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        took = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "exited normally" in out
    assert 0.8 < took < 10.0, f"took {took:.1f}s\n{err}"
    assert "SIGINT received; stopping" in err
    assert "waiting up to 1s for running handlers to finish" in err
    assert "Traceback" not in err, err
    wait_until(lambda: raw.count(queue) == 1, timeout=15, what="the message back in its queue")
