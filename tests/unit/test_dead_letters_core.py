"""Dead letters as data: the x-mqkit-* headers, replay headers and DeadLetter."""

from __future__ import annotations

import base64
import json
import socket
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from mqkit.dead_letters import (
    DEAD_LETTER_HEADERS,
    DeadLetter,
    Replay,
    dead_letter_headers,
    replay_headers,
    retry_headers,
)
from mqkit.messages import Incoming
from mqkit.retry import ATTEMPT_HEADER, MAX_ATTEMPT, GiveUp


def _incoming(**overrides: object) -> Incoming:
    values: dict[str, object] = {
        "body": b'{"order_id": "1"}',
        "delivery_tag": 1,
        "message_id": "mid-1",
        "correlation_id": "corr-1",
        "type": "OrderPlaced",
        "headers": {"tenant": "acme"},
        "exchange": "shop",
        "routing_key": "orders.placed",
    }
    values.update(overrides)
    return Incoming(**values)  # type: ignore[arg-type]


def test_dead_letter_headers_say_why() -> None:
    outcome = GiveUp("ValueError", "amount must be positive", 3, "Traceback (most recent...)")
    before = datetime.now(timezone.utc)
    headers = dead_letter_headers(_incoming(), outcome, queue="orders", service="billing")
    after = datetime.now(timezone.utc)
    assert set(headers) == set(DEAD_LETTER_HEADERS)
    assert headers["x-mqkit-error-type"] == "ValueError"
    assert headers["x-mqkit-error-message"] == "amount must be positive"
    assert headers["x-mqkit-traceback"] == "Traceback (most recent...)"
    assert headers["x-mqkit-attempts"] == 3
    assert headers["x-mqkit-original-queue"] == "orders"
    assert headers["x-mqkit-original-exchange"] == "shop"
    assert headers["x-mqkit-original-routing-key"] == "orders.placed"
    assert headers["x-mqkit-service"] == "billing"
    assert headers["x-mqkit-host"] == socket.gethostname()
    failed_at = datetime.fromisoformat(headers["x-mqkit-failed-at"])
    assert failed_at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= failed_at <= after + timedelta(seconds=1)


def test_every_dead_letter_header_is_an_x_mqkit_header() -> None:
    assert all(name.startswith("x-mqkit-") for name in DEAD_LETTER_HEADERS)
    assert len(set(DEAD_LETTER_HEADERS)) == len(DEAD_LETTER_HEADERS) == 10


def test_dead_letter_headers_keep_the_first_exchange_after_retries() -> None:
    # A retry queue dead-letters back through the default exchange; the original exchange
    # and routing key travel in headers and win over the delivery's own.
    retried = _incoming(
        exchange="",
        routing_key="orders",
        headers={
            "x-mqkit-original-exchange": "shop",
            "x-mqkit-original-routing-key": "orders.placed",
            ATTEMPT_HEADER: 3,
        },
    )
    headers = dead_letter_headers(retried, GiveUp("E", "m", 3), queue="orders", service="s")
    assert headers["x-mqkit-original-exchange"] == "shop"
    assert headers["x-mqkit-original-routing-key"] == "orders.placed"


def test_dead_letter_headers_are_bounded() -> None:
    outcome = GiveUp("ValueError", "m" * 10_000, 1, "t" * 10_000 + "END")
    headers = dead_letter_headers(_incoming(), outcome, queue="q", service="s")
    assert len(headers["x-mqkit-error-message"]) <= 4000
    assert len(headers["x-mqkit-traceback"]) <= 2000
    assert headers["x-mqkit-traceback"].endswith("END")  # the last frames matter most


def test_retry_headers() -> None:
    headers = retry_headers(_incoming(), 2)
    assert headers == {
        ATTEMPT_HEADER: 2,
        "x-mqkit-original-exchange": "shop",
        "x-mqkit-original-routing-key": "orders.placed",
    }


def test_replay_headers_strip_failure_and_broker_headers() -> None:
    incoming = _incoming()
    failure = dead_letter_headers(incoming, GiveUp("E", "m", 3), queue="q", service="s")
    headers = {
        "tenant": "acme",
        "trace-id": "abc",
        **failure,
        ATTEMPT_HEADER: 3,
        "x-death": [{"count": 1, "reason": "rejected", "queue": "q"}],
        "x-first-death-queue": "q",
        "x-first-death-reason": "rejected",
        "x-first-death-exchange": "",
        "x-last-death-queue": "q",
        "x-last-death-reason": "rejected",
        "x-last-death-exchange": "",
        "x-delivery-count": 4,
    }
    assert replay_headers(headers) == {"tenant": "acme", "trace-id": "abc"}
    # The input is not modified.
    assert "x-mqkit-error-type" in headers


def _dead(headers: dict[str, object], **overrides: object) -> DeadLetter:
    return DeadLetter.from_incoming(_incoming(headers=headers, **overrides), dlq="orders.dlq")


def test_dead_letter_from_mqkit_headers() -> None:
    headers = dead_letter_headers(
        _incoming(), GiveUp("KeyError", "'sku'", 2, "tb"), queue="orders", service="s"
    )
    dead = _dead(headers)
    assert dead.message_id == "mid-1"
    assert dead.body == b'{"order_id": "1"}'
    assert dead.error_type == "KeyError"
    assert dead.error_message == "'sku'"
    assert dead.attempts == 2
    assert dead.original_queue == "orders"
    assert isinstance(dead.failed_at, datetime)
    assert dead.failed_at.tzinfo is not None
    assert dead.headers["x-mqkit-service"] == "s"


def test_dead_letter_reads_bytes_headers_and_tolerates_garbage() -> None:
    # Some clients hand header strings over as bytes.
    dead = _dead(
        {
            "x-mqkit-error-type": b"ValueError",
            "x-mqkit-error-message": b"bad \xc3\xa9",
            "x-mqkit-attempts": 3,
            "x-mqkit-original-queue": b"orders",
            "x-mqkit-failed-at": "not a date",
        }
    )
    assert dead.error_type == "ValueError"
    assert dead.error_message == "bad \u00e9"
    assert dead.original_queue == "orders"
    assert dead.attempts == 3
    assert dead.failed_at is None


def test_dead_letter_from_broker_x_death() -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    dead = _dead(
        {
            "x-death": [
                {"count": 20, "reason": "delivery_limit", "queue": "orders", "time": when},
                {"count": 1, "reason": "expired", "queue": "orders.retry.1000ms"},
            ]
        }
    )
    assert dead.error_type == "broker:delivery_limit"
    assert "orders" in dead.error_message and "delivery_limit" in dead.error_message
    assert dead.original_queue == "orders"
    assert dead.attempts == 20
    assert dead.failed_at == when


def test_dead_letter_without_any_reason_falls_back_to_the_dlq_name() -> None:
    dead = _dead({"x-delivery-count": 7})
    assert dead.original_queue == "orders"
    assert dead.error_type.startswith("broker:")
    assert dead.attempts == 7
    assert _dead({}).attempts == 1


def test_to_json_is_json_ready() -> None:
    headers = {
        **dead_letter_headers(_incoming(), GiveUp("E", "m", 1), queue="orders", service="s"),
        "raw": b"bytes",
        "when": datetime(2024, 1, 1, tzinfo=timezone.utc),
        "nested": {"list": [b"a", 1, None]},
    }
    data = _dead(headers).to_json()
    decoded = json.loads(json.dumps(data))
    assert decoded["message_id"] == "mid-1"
    assert decoded["error_type"] == "E"
    assert decoded["original_queue"] == "orders"
    assert decoded["attempts"] == 1
    assert decoded["type"] == "OrderPlaced"
    assert decoded["correlation_id"] == "corr-1"
    assert decoded["body"] == '{"order_id": "1"}'
    assert decoded["headers"]["raw"] == "bytes"
    assert decoded["headers"]["nested"] == {"list": ["a", 1, None]}
    assert datetime.fromisoformat(decoded["failed_at"]).tzinfo is not None


def test_to_json_base64_for_binary_bodies() -> None:
    dead = _dead({}, body=b"\xff\x00\xfe")
    assert dead.to_json()["body"] == {"base64": base64.b64encode(b"\xff\x00\xfe").decode()}


@pytest.mark.parametrize(
    "forged", ["abc", b"abc", -3, 0, 10**12, 2.5, float("nan"), None, [1], {"n": 1}, True]
)
def test_forged_attempts_never_break_reading_a_dead_letter(forged: object) -> None:
    dead = _dead({"x-mqkit-error-type": "E", "x-mqkit-attempts": forged})
    assert 1 <= dead.attempts <= MAX_ATTEMPT
    json.dumps(dead.to_json())  # and it can be shown


def test_every_header_of_a_dead_letter_is_read_leniently() -> None:
    dead = _dead(
        {
            "x-mqkit-error-type": {"not": "text"},
            "x-mqkit-error-message": [1, 2],
            "x-mqkit-original-queue": 42,
            "x-mqkit-failed-at": datetime(2024, 1, 1),  # a datetime, naive
        }
    )
    assert dead.error_type == "{'not': 'text'}"
    assert dead.original_queue == "42"
    assert dead.failed_at == datetime(2024, 1, 1, tzinfo=timezone.utc)
    broker = _dead({"x-death": [{"count": "lots", "reason": b"rejected", "time": "?"}]})
    assert broker.attempts == 1 and broker.error_type == "broker:rejected"
    assert broker.failed_at is None


def test_to_json_survives_whatever_the_wire_held() -> None:
    headers = {
        "x-mqkit-error-type": "E",
        b"\xffkey": bytearray(b"\xfe"),
        "n": float("inf"),
        "d": Decimal("1.5"),
    }
    incoming = Incoming(body=b"{}", delivery_tag=1, headers={})
    incoming.headers = headers  # as a client library might hand them over
    data = json.loads(json.dumps(DeadLetter.from_incoming(incoming, dlq="q.dlq").to_json()))
    assert data["headers"]["\ufffdkey"] == "\ufffd"
    assert data["headers"]["n"] == "inf" and data["headers"]["d"] == "1.5"


def _replay(**kwargs: object) -> Replay:
    return Replay("orders", "orders.dlq", count=1, **kwargs)  # type: ignore[arg-type]


def test_replay_sends_back_to_the_dlqs_own_queue_whatever_the_headers_say() -> None:
    forged = _dead({"x-mqkit-error-type": "E", "x-mqkit-original-queue": "payments"})
    assert forged.original_queue == "payments"  # shown as it came...
    assert _replay().target(forged) == "orders"  # ...but not trusted
    broker = _dead({"x-death": [{"reason": "rejected", "queue": "payments"}]})
    assert _replay().target(broker) == "orders"
    assert _replay(to="orders-v2").target(forged) == "orders-v2"  # the caller may choose


def test_the_first_route_is_the_deliverys_unless_it_came_back_from_a_retry_queue() -> None:
    forged = _incoming(
        exchange="shop",
        routing_key="orders.placed",
        headers={"x-mqkit-original-exchange": "admin", "x-mqkit-original-routing-key": "x"},
    )
    assert retry_headers(forged, 2)["x-mqkit-original-exchange"] == "shop"
    back = _incoming(
        exchange="",
        routing_key="orders",
        headers={"x-mqkit-original-exchange": b"shop", "x-mqkit-original-routing-key": 7},
    )
    headers = retry_headers(back, 3)
    assert headers["x-mqkit-original-exchange"] == "shop"
    assert headers["x-mqkit-original-routing-key"] == "7"
