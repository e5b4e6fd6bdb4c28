"""How run() and close() end, decided once for both clients (mqkit.running)."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import pytest

from mqkit import ConfigError, Settings, running


@dataclass
class Consumer:
    queue: str
    ever_started: bool = False


@dataclass
class Bus:
    service: str = "billing"
    exchange: str = "mqkit.events"
    ever_started: bool = False
    consumers: list[Consumer] = field(default_factory=list)


class Records:
    """The records logged under ``mqkit`` during the test (caplog's list is per phase)."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self._caplog = caplog

    def __iter__(self) -> Any:
        return iter(self._caplog.records)

    def __len__(self) -> int:
        return len(self._caplog.records)


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> Records:
    caplog.set_level(logging.DEBUG, logger="mqkit")
    return Records(caplog)


def messages(records: Records) -> list[str]:
    return [record.getMessage() for record in records]


def test_the_drain_timeout_defaults_to_the_setting() -> None:
    assert running.drain_timeout(None, Settings()) == 30.0
    assert running.drain_timeout(None, Settings(drain_timeout=2.5)) == 2.5
    assert running.drain_timeout(0, Settings()) == 0.0
    assert running.drain_timeout(7, Settings()) == 7.0


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), "30", True])
def test_a_bad_drain_timeout_is_a_config_error(bad: Any) -> None:
    with pytest.raises(ConfigError) as info:
        running.drain_timeout(bad, Settings())
    text = str(info.value)
    assert f"run(drain_timeout={bad!r})" in text
    assert "give a number >= 0" in text


def test_a_negative_drain_timeout_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match="drain_timeout"):
        Settings(drain_timeout=-1)


def test_the_lines_of_a_run(records: Records) -> None:
    running.started(3)
    running.signalled(signal.SIGTERM)
    running.stopping(3, 30.0, signals=True)
    running.stopping(1, 0.5, signals=False)
    assert messages(records) == [
        "running 3 consumer(s) and bus(es); waiting for stop(), SIGINT or SIGTERM",
        "SIGTERM received; stopping",
        "stopping 3 consumer(s) and bus(es): waiting up to 30s for running handlers to "
        "finish; send SIGINT again to stop at once",
        "stopping 1 consumer(s) and bus(es): waiting up to 0.5s for running handlers to finish",
    ]
    assert all(record.levelno == logging.INFO for record in records)
    assert all(record.name == "mqkit.client" for record in records)


def test_a_second_signal_is_one_warning_and_the_exit_status(
    records: Records,
) -> None:
    assert running.abandoning(signal.SIGINT) == 130
    assert running.abandoning(signal.SIGTERM) == 143
    first, second = records
    assert first.levelno == logging.WARNING
    assert first.getMessage().startswith("SIGINT received again: stopping at once")
    assert "go back to their queues" in first.getMessage()
    assert second.getMessage().startswith("SIGTERM received again")


def test_never_started_names_each_queue_once(records: Records) -> None:
    running.warn_never_started(
        [
            ("consumer", Consumer("orders")),
            ("responder", Consumer("rates")),
            ("consumer", Consumer("done", ever_started=True)),
        ],
        [
            Bus(consumers=[Consumer("billing.orders.placed"), Consumer("billing.audit")]),
            Bus(consumers=[]),  # used only to publish
            Bus(ever_started=True, consumers=[Consumer("billing.x")]),
        ],
        runtime="sync",
    )
    orders, rates, bus = records
    assert all(record.levelno == logging.WARNING for record in records)
    assert orders.getMessage() == (
        "a consumer of queue 'orders' was made but never started, so it handled no message; "
        "start it with client.run() or consumer.start() before closing the client"
    )
    assert orders.queue == "orders"  # type: ignore[attr-defined]
    assert rates.getMessage().startswith("a responder of queue 'rates' was made")
    assert "answered no request" in rates.getMessage()
    assert "responder.start()" in rates.getMessage()
    assert bus.getMessage() == (
        "an event bus (service 'billing', exchange 'mqkit.events') was made but never "
        "started, so its subscriptions (queues 'billing.orders.placed', 'billing.audit') "
        "handled no event; start it with client.run() or bus.start() before closing the client"
    )


def test_never_started_on_the_async_client_says_await(records: Records) -> None:
    running.warn_never_started([("consumer", Consumer("q"))], [], runtime="async")
    [record] = records
    assert "start it with await client.run() or await consumer.start()" in record.getMessage()
