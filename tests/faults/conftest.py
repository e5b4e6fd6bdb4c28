"""Fault-test harness: proxies, nodes of our own, and the publish/consume accounting.

A *stream* publishes ``n`` numbered :class:`Tick` messages with confirms while a *chaos*
script breaks things (cuts the proxy, restarts or kills nodes), and a consumer on a separate
client records every delivery. The :class:`Ledger` then says what happened:

    published   messages the test set out to publish (each until one publish was confirmed)
    confirmed   of those, how many the broker confirmed
    consumed    distinct messages the consumer received
    duplicates  deliveries beyond the first of a message (at-least-once allows them)
    lost        confirmed but never consumed — must be 0

A publish that raises ``PublishError`` is re-published, as a user following the shell
contract would (docs/SHELL_CONTRACT.md §3); anything else a publish raises is a contract
violation and fails the test with the list of what was raised.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from mqkit.testing import FaultProxy, RabbitCluster, RabbitNode


class Tick(BaseModel):
    """The stream's message: ``seq`` numbers it within ``run``."""

    run: str
    seq: int


class Ledger:
    """Thread-safe accounting of one stream."""

    def __init__(self, runtime: str, scenario: str) -> None:
        self.runtime = runtime
        self.scenario = scenario
        self.run = uuid.uuid4().hex[:8]
        self.lock = threading.Lock()
        self.published: set[int] = set()
        self.confirmed: set[int] = set()
        self.deliveries: Counter[int] = Counter()
        self.foreign = 0  # deliveries of another run's messages (must stay 0)
        self.errors: Counter[str] = Counter()  # publish errors by type
        self.last_errors: dict[str, str] = {}  # the last message of each type, for the report
        self.violations: list[str] = []  # what publish raised that the contract forbids
        self.attempts = 0
        self.faults: list[str] = []  # what the chaos script did, in order
        self.notes: dict[str, Any] = {}
        self.clients: dict[str, Any] = {}  # "producer"/"consumer" -> the client, for health()

    # -- recording -------------------------------------------------------------------------

    def on_message(self, message: Tick, ctx: Any) -> None:
        """The consumer's handler (sync; the async harness wraps it)."""
        with self.lock:
            if message.run != self.run:
                self.foreign += 1
            else:
                self.deliveries[message.seq] += 1

    def publish_failed(self, seq: int, exc: BaseException, allowed: bool) -> None:
        with self.lock:
            self.errors[type(exc).__name__] += 1
            self.last_errors[type(exc).__name__] = str(exc)[:300]
            if not allowed:
                self.violations.append(f"seq={seq}: {type(exc).__module__}.{exc!r}")

    def health(self, role: str) -> Any:
        """``health()`` of the stream's producer or consumer client (no I/O, any thread)."""
        return self.clients[role].health()

    def fault(self, what: str) -> None:
        with self.lock:
            self.faults.append(f"{time.strftime('%H:%M:%S')} {what}")

    # -- reading ---------------------------------------------------------------------------

    @property
    def consumed(self) -> set[int]:
        with self.lock:
            return set(self.deliveries)

    @property
    def duplicates(self) -> int:
        with self.lock:
            return sum(self.deliveries.values()) - len(self.deliveries)

    @property
    def lost(self) -> set[int]:
        return self.confirmed - self.consumed

    def caught_up(self) -> bool:
        return not self.lost

    def line(self) -> str:
        """The accounting line every fault test prints."""
        errors = ",".join(f"{k}:{v}" for k, v in sorted(self.errors.items())) or "none"
        extra = " ".join(f"{k}={v}" for k, v in self.notes.items())
        return (
            f"ACCOUNTING runtime={self.runtime} scenario={self.scenario} "
            f"published={len(self.published)} confirmed={len(self.confirmed)} "
            f"consumed={len(self.consumed)} duplicates={self.duplicates} "
            f"lost={len(self.lost)} attempts={self.attempts} publish_errors={errors} "
            f"faults={len(self.faults)} {extra}"
        ).rstrip()

    def report(self, record_property: Callable[[str, object], None]) -> None:
        """Print the accounting line (visible with ``-s``) and attach it to the test report."""
        line = self.line()
        print(f"\n{line}")
        record_property("accounting", line)

    def check(self) -> None:
        """Fail the test on any loss, contract violation or stray message."""
        problems = []
        if self.violations:
            problems.append(
                f"publish raised {len(self.violations)} error(s) the contract does not allow "
                f"(only PublishError subclasses may come out of publish): {self.violations[:5]}"
            )
        if self.lost:
            problems.append(
                f"{len(self.lost)} confirmed message(s) never consumed: "
                f"seq {sorted(self.lost)[:20]}"
            )
        if len(self.confirmed) != len(self.published):
            problems.append(
                f"{len(self.published) - len(self.confirmed)} message(s) never confirmed "
                f"despite re-publishing: seq {sorted(self.published - self.confirmed)[:20]}"
            )
        if self.foreign:
            problems.append(f"{self.foreign} delivery(ies) from another run")
        assert not problems, (
            f"{self.line()}\nfaults: {self.faults}\nlast publish errors: {self.last_errors}\n"
            + "\n".join(problems)
        )


# -- chaos: a script on a background thread ------------------------------------------------


class Chaos:
    """Runs ``script(ledger, stop)`` on a thread for the duration of a ``with`` block.

    ``stop`` is a threading.Event the script should watch; an exception in the script is
    re-raised when the block ends, so a fault that could not be injected fails the test.
    """

    def __init__(
        self, ledger: Ledger, script: Callable[[Ledger, threading.Event], None] | None
    ) -> None:
        self.ledger = ledger
        self.script = script
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def _run(self) -> None:
        assert self.script is not None
        try:
            self.script(self.ledger, self.stop)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Chaos:
        if self.script is not None:
            self.thread.start()
        return self

    async def __aenter__(self) -> Chaos:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        # Wait for the script without blocking the event loop: the async client must see
        # (and handle) what the script does while it does it.
        self.stop.set()
        deadline = time.monotonic() + 120
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.__exit__(*exc)

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def sequence(self, n: int, until_done: bool, cap: int = 50_000) -> Iterator[int]:
        """0, 1, ... up to ``n``, or further while the script runs (``until_done``), so every
        fault of the script lands mid-stream however fast the stream is."""
        seq = 0
        while seq < n or (until_done and self.running and seq < cap):
            if self.error is not None:
                return  # the script failed (a stalled stream, a node that would not start)
            yield seq
            seq += 1

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.script is not None:
            self.thread.join(120)
            assert not self.thread.is_alive(), "the chaos script did not finish within 120s"
        if self.error is not None and exc[0] is None:
            ledger = self.ledger
            raise AssertionError(
                f"the chaos script failed: {self.error!r}\n{ledger.line()}\n"
                f"faults so far: {ledger.faults}\nlast publish errors: {ledger.last_errors}"
            ) from self.error


def cut_every(
    proxy: FaultProxy, low: float = 0.3, high: float = 0.6, *, times: int | None = None
) -> Callable[..., None]:
    """A chaos script: cut every connection through ``proxy`` every ``low``-``high`` s
    (``times`` times, or until the stream ends)."""

    def script(ledger: Ledger, stop: threading.Event) -> None:
        done = 0
        while (times is None or done < times) and not stop.wait(random.uniform(low, high)):
            cut = proxy.cut()
            done += 1
            ledger.fault(f"cut {cut} connection(s) at confirmed={len(ledger.confirmed)}")

    return script


def wait_for(ledger: Ledger, stop: threading.Event, confirmed: int, timeout: float = 120.0) -> bool:
    """In a chaos script: wait until ``confirmed`` messages are confirmed (False if stopped)."""
    deadline = time.monotonic() + timeout
    while len(ledger.confirmed) < confirmed:
        if stop.wait(0.05):
            return False
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the stream stalled: {len(ledger.confirmed)} of {confirmed} confirmed "
                f"after {timeout}s"
            )
    return True


# -- the stream, on each runtime ----------------------------------------------------------

_MAX_ATTEMPTS = 40  # per message; a publish that keeps failing this often is a bug
_NACK_BACKOFF = 0.05


def _health_notes(ledger: Ledger, role: str, health: Any) -> None:
    ledger.notes[f"{role}_reconnects"] = health.reconnects


def stream_sync(
    ledger: Ledger,
    *,
    queue: Any,
    n: int,
    client_kw: dict[str, Any],
    chaos: Callable[[Ledger, threading.Event], None] | None = None,
    consume_timeout: float = 60.0,
    expect_reconnects: bool = True,
    until_chaos_done: bool = False,
    pace: float = 0.0,
) -> None:
    """Publish ``n`` Ticks with ``mqkit.Client`` under ``chaos``; consume them on another.

    ``until_chaos_done``: keep publishing past ``n`` until the chaos script has finished.
    ``pace``: seconds to sleep between two messages.
    """
    import mqkit

    with mqkit.Client(**client_kw) as pub_client, mqkit.Client(**client_kw) as sub_client:
        ledger.clients.update(producer=pub_client, consumer=sub_client)
        producer = pub_client.producer(Tick, queue=queue)
        consumer = sub_client.consumer(queue, Tick, ledger.on_message)
        consumer.start()
        try:
            with Chaos(ledger, chaos) as running:
                for seq in running.sequence(n, until_chaos_done):
                    if pace:
                        time.sleep(pace)
                    ledger.published.add(seq)
                    for _ in range(_MAX_ATTEMPTS):
                        ledger.attempts += 1
                        try:
                            producer.publish(Tick(run=ledger.run, seq=seq))
                        except mqkit.PublishError as exc:
                            ledger.publish_failed(seq, exc, allowed=True)
                            if isinstance(exc, mqkit.PublishNacked):
                                time.sleep(_NACK_BACKOFF)  # a nack comes at once: no busy loop
                            continue
                        except Exception as exc:
                            ledger.publish_failed(seq, exc, allowed=False)
                            time.sleep(0.1)
                            continue
                        ledger.confirmed.add(seq)
                        break
            deadline = time.monotonic() + consume_timeout
            while not ledger.caught_up() and time.monotonic() < deadline:
                time.sleep(0.05)
            pub_health, sub_health = pub_client.health(), sub_client.health()
            _health_notes(ledger, "producer", pub_health)
            _health_notes(ledger, "consumer", sub_health)
            attached = _wait_attached(sub_client.health)
        finally:
            consumer.stop()
    _check_consumer(ledger, attached, expect_reconnects)


def _wait_attached(health: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    h = health()
    while not (h.consumers >= 1 and h.consumers_attached == h.consumers):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
        h = health()
    return h


async def _await_attached(health: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    h = await _maybe(health())
    while not (h.consumers >= 1 and h.consumers_attached == h.consumers):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
        h = await _maybe(health())
    return h


def _check_consumer(ledger: Ledger, health: Any, expect_reconnects: bool) -> None:
    ledger.notes["consumers_attached"] = f"{health.consumers_attached}/{health.consumers}"
    assert health.consumers == 1 and health.consumers_attached == 1, (
        f"the consumer did not resume by itself after the faults: {health}; {ledger.line()}"
    )
    if expect_reconnects:
        assert ledger.notes["consumer_reconnects"] >= 1, (
            f"the consumer client counted no reconnect although its link was broken: {health}"
        )
        assert ledger.notes["producer_reconnects"] >= 1, (
            f"the producer client counted no reconnect although its link was broken; "
            f"{ledger.line()}"
        )


async def _maybe(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def stream_async(
    ledger: Ledger,
    *,
    queue: Any,
    n: int,
    client_kw: dict[str, Any],
    chaos: Callable[[Ledger, threading.Event], None] | None = None,
    consume_timeout: float = 60.0,
    expect_reconnects: bool = True,
    until_chaos_done: bool = False,
    pace: float = 0.0,
    publishers: int = 4,
) -> None:
    """The same stream with ``mqkit.AsyncClient``; ``publishers`` tasks publish at once."""
    import mqkit

    async def handler(message: Tick, ctx: Any) -> None:
        ledger.on_message(message, ctx)

    async with (
        mqkit.AsyncClient(**client_kw) as pub_client,
        mqkit.AsyncClient(**client_kw) as sub_client,
    ):
        ledger.clients.update(producer=pub_client, consumer=sub_client)
        producer = await _maybe(pub_client.producer(Tick, queue=queue))
        consumer = sub_client.consumer(queue, Tick, handler)
        await consumer.start()
        try:
            chaos_run = Chaos(ledger, chaos)
            todo = chaos_run.sequence(n, until_chaos_done)

            async def publisher() -> None:
                for seq in todo:
                    if pace:
                        await asyncio.sleep(pace)
                    ledger.published.add(seq)
                    for _ in range(_MAX_ATTEMPTS):
                        ledger.attempts += 1
                        try:
                            await producer.publish(Tick(run=ledger.run, seq=seq))
                        except mqkit.PublishError as exc:
                            ledger.publish_failed(seq, exc, allowed=True)
                            if isinstance(exc, mqkit.PublishNacked):
                                await asyncio.sleep(_NACK_BACKOFF)
                            continue
                        except Exception as exc:
                            ledger.publish_failed(seq, exc, allowed=False)
                            await asyncio.sleep(0.1)
                            continue
                        ledger.confirmed.add(seq)
                        break

            async with chaos_run:
                await asyncio.gather(*(publisher() for _ in range(publishers)))
            deadline = time.monotonic() + consume_timeout
            while not ledger.caught_up() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            _health_notes(ledger, "producer", await _maybe(pub_client.health()))
            _health_notes(ledger, "consumer", await _maybe(sub_client.health()))
            attached = await _await_attached(sub_client.health)
        finally:
            await consumer.stop()
    _check_consumer(ledger, attached, expect_reconnects)


def run_stream(runtime: str, ledger: Ledger, **kw: Any) -> None:
    """Run the stream on ``runtime`` ("sync" or "async")."""
    if runtime == "sync":
        stream_sync(ledger, **kw)
    else:
        asyncio.run(stream_async(ledger, **kw))


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def proxy(broker_url: str) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the test broker, stopped after the test."""
    with FaultProxy(broker_url) as p:
        yield p


@pytest.fixture
def make_proxy(broker_url: str) -> Iterator[Callable[[], FaultProxy]]:
    """``make_proxy()`` starts another FaultProxy in front of the test broker."""
    made: list[FaultProxy] = []

    def make() -> FaultProxy:
        p = FaultProxy(broker_url).start()
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


@pytest.fixture(scope="module")
def rabbit_node() -> Iterator[RabbitNode]:
    """A RabbitMQ node of this module's own (not the test broker): free to restart or kill."""
    node = RabbitNode(f"mqkit-t-{uuid.uuid4().hex[:4]}")
    started = time.monotonic()
    with node:
        print(f"\n[{node.name} started in {time.monotonic() - started:.1f}s]")
        yield node


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    """A 3-node cluster of this module's own; every node is killed and removed at the end."""
    cluster = RabbitCluster(3, startup_timeout=90)  # a node boots in 5-10 s here
    started = time.monotonic()
    with cluster:
        print(f"\n[3-node cluster started in {time.monotonic() - started:.1f}s]")
        yield cluster
