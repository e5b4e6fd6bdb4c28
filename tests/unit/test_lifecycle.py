"""The event pipeline and the one logging policy of both runtimes."""

from __future__ import annotations

import logging

import pytest

from mqkit import lifecycle as lc

DELIVERY = lc.Delivery(
    queue="orders", message_id="m-1", correlation_id="c-1", attempt=2, service="billing"
)


def test_every_event_has_a_log_rule():
    events = {
        cls
        for cls in vars(lc).values()
        if isinstance(cls, type)
        and issubclass(cls, lc.LifecycleEvent)
        and cls is not lc.LifecycleEvent
    }
    assert events == set(lc.LOG_POLICY)


def test_fields_are_flat_for_logs_and_middleware():
    event = lc.Retried(DELIVERY, delay=10.0, next_attempt=3, error_type="KeyError", error="x")
    fields = event.fields()
    assert fields["queue"] == "orders" and fields["attempt"] == 2 and fields["delay"] == 10.0
    assert "delivery" not in fields


@pytest.mark.parametrize(
    ("event", "level"),
    [
        (lc.Handled(DELIVERY), logging.DEBUG),
        (lc.Retried(DELIVERY, 1.0, 3, "E", "e"), logging.WARNING),
        (lc.DeadLettered(DELIVERY, "orders.dlq", "E", "e"), logging.ERROR),
        (lc.DeadLettered(DELIVERY, "orders.dlq", "Reject", "no", rejected=True), logging.WARNING),
        (lc.Undecodable(DELIVERY, "bad json"), logging.WARNING),
        (lc.ConsumerAttached("orders"), logging.INFO),
        (lc.ConsumerDetached("orders"), logging.INFO),
        (lc.ConsumerDetached("orders", reason="channel closed"), logging.WARNING),
        (lc.LinkUp("amqp://x"), logging.INFO),
        (lc.LinkLost("amqp://x", "reset"), logging.WARNING),
        (lc.LinkRestored("amqp://x"), logging.INFO),
        (lc.PublishingBlocked("low on memory"), logging.WARNING),
        (lc.PublishingUnblocked(), logging.INFO),
    ],
)
def test_one_level_policy(event, level):
    assert lc.level_of(event) == level


def test_log_observer_puts_every_field_in_extra_and_the_traceback_at_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="mqkit")
    event = lc.Retried(
        DELIVERY, 10.0, 3, "KeyError", "'card'", traceback="Traceback (most recent call last)"
    )
    lc.LogObserver().on_event(event)
    warning, debug = caplog.records
    assert warning.name == "mqkit.retry" and warning.levelno == logging.WARNING
    assert "Traceback" not in warning.getMessage()
    assert "'orders'" in warning.getMessage() and "retrying in 10s" in warning.getMessage()
    assert warning.queue == "orders" and warning.message_id == "m-1"  # type: ignore[attr-defined]
    assert warning.correlation_id == "c-1" and warning.mqkit_event == "retried"  # type: ignore[attr-defined]
    assert debug.levelno == logging.DEBUG and "Traceback" in debug.getMessage()
    assert not warning.getMessage().startswith("mqkit:")


def test_an_observer_that_fails_changes_nothing(caplog):
    seen: list[str] = []

    class Broken:
        def on_event(self, event: lc.LifecycleEvent) -> None:
            raise RuntimeError("boom")

    class Recorder:
        def on_event(self, event: lc.LifecycleEvent) -> None:
            seen.append(event.name)

    lc.Pipeline([Broken(), Recorder()]).emit(lc.ConsumerAttached("orders"))
    assert seen == ["consumer_attached"]
    assert "an observer failed on consumer_attached" in caplog.text


def test_outcome_events_say_how_a_delivery_ended():
    from mqkit.retry import Ack, GiveUp, Reject, RetryLater

    try:
        raise KeyError("card")
    except KeyError as exc:
        error = exc
    retried = lc.outcome_event(DELIVERY, RetryLater(10.0, 3), dlq="orders.dlq", error=error)
    assert isinstance(retried, lc.Retried) and retried.delay == 10.0 and retried.next_attempt == 3
    assert retried.error_type == "KeyError" and "raise KeyError" in retried.traceback
    dead = lc.outcome_event(
        DELIVERY, GiveUp("KeyError", "'card'", 3), dlq="orders.dlq", error=error
    )
    assert isinstance(dead, lc.DeadLettered) and dead.dlq == "orders.dlq" and not dead.rejected
    rejected = lc.outcome_event(
        DELIVERY, GiveUp("Reject", "no", 1), dlq="orders.dlq", error=Reject("no")
    )
    assert isinstance(rejected, lc.DeadLettered) and rejected.rejected
    assert lc.level_of(rejected) == logging.WARNING
    handled = lc.outcome_event(DELIVERY, Ack(), dlq="orders.dlq", seconds=0.5)
    assert isinstance(handled, lc.Handled) and handled.seconds == 0.5


def test_the_first_connect_is_logged_at_info(caplog):
    caplog.set_level(logging.INFO, logger="mqkit")
    lc.LogObserver().on_event(lc.LinkUp("amqp://guest:***@h:5672/", service="billing"))
    [record] = caplog.records
    assert (record.name, record.levelno) == ("mqkit.connection", logging.INFO)
    assert record.getMessage() == "connected to amqp://guest:***@h:5672/"
    assert record.mqkit_event == "link_up" and record.service == "billing"  # type: ignore[attr-defined]


def test_an_event_filtered_out_by_its_logger_builds_no_record(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="mqkit")
    monkeypatch.setattr(lc.Handled, "fields", lambda self: pytest.fail("fields() was built"))
    lc.LogObserver().on_event(lc.Handled(DELIVERY, seconds=0.1))  # DEBUG: filtered out
    assert caplog.records == []


def test_fields_spread_the_delivery_and_keep_the_values():
    event = lc.DeadLettered(DELIVERY, "orders.dlq", "Reject", "no", rejected=True, seconds=0.5)
    assert event.fields() == {
        "queue": "orders",
        "message_id": "m-1",
        "correlation_id": "c-1",
        "event_type": None,
        "attempt": 2,
        "exchange": "",
        "routing_key": "",
        "service": "billing",
        "dlq": "orders.dlq",
        "error_type": "Reject",
        "error": "no",
        "rejected": True,
        "traceback": "",
        "seconds": 0.5,
    }
