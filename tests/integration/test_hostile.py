"""Hostile messages from the wire (issue 13, items 1, 2 and 6), on both runtimes and on
classic and quorum queues: whatever properties and headers a message carries, it ends acked,
retried or dead-lettered with a reason, and never costs the consumer its connection.

A plain pika publisher makes what mqkit never would: :class:`HostileProperties` patches the
encoded content header (a timestamp header value beyond the year 9999, a short string that
is not UTF-8), and header values mqkit's own headers would never hold are set directly.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from conftest import wait_until
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from pydantic import BaseModel, field_validator

import mqkit
from mqkit.retry import DEFAULT_POLICY, RetryPolicy
from mqkit.subscriptions import subscription_queue_name
from mqkit.topology import retry_tier_name

ROOT = Path(__file__).resolve().parents[2]
QUEUE_TYPES = pytest.mark.parametrize("queue_type", ["classic", "quorum"])

PLACEHOLDER = datetime(2001, 9, 9, 1, 46, 40, tzinfo=timezone.utc)  # 1_000_000_000 s
PLACEHOLDER_BYTES = b"T" + struct.pack(">Q", 1_000_000_000)
HUGE = 2**62  # the year 146 million in milliseconds


class Order(BaseModel):
    order_id: str


class HostileProperties(pika.BasicProperties):
    """BasicProperties whose encoded content header gets ``patches`` (old, new) applied."""

    def __init__(self, *, patches: tuple[tuple[bytes, bytes], ...] = (), **kwargs: Any) -> None:
        kwargs.setdefault("content_type", "application/json")
        super().__init__(**kwargs)
        self._patches = patches

    def encode(self) -> list[bytes]:
        blob = b"".join(super().encode())
        for old, new in self._patches:
            assert old in blob, old
            blob = blob.replace(old, new)
        return [blob]


def stamp(value: int) -> tuple[bytes, bytes]:
    """A patch: every PLACEHOLDER header value becomes the raw timestamp ``value``."""
    return PLACEHOLDER_BYTES, b"T" + struct.pack(">Q", value)


def order(order_id: str) -> bytes:
    return json.dumps({"order_id": order_id}).encode()


def text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def delete_queues(url: str, *queues: str) -> None:
    """Delete what a test declared beyond what the ``names`` fixture removes (retry queues,
    bus queues); missing ones are fine."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for queue in queues:
            channel = connection.channel()
            channel.queue_delete(queue)
            channel.close()
    finally:
        connection.close()


def own_headers(props: pika.BasicProperties) -> dict[str, Any]:
    """A message's headers without the one a quorum queue adds (x-delivery-count)."""
    return {k: v for k, v in (props.headers or {}).items() if k != "x-delivery-count"}


def retry_queues(service: str, policy: RetryPolicy) -> list[str]:
    """The retry tiers of ``service`` that ``policy`` uses (queues; the exchanges go with
    the client's topology after the test)."""
    return [retry_tier_name(service, delay) for delay in policy.tiers]


# --------------------------------------------------------------------------- item 1


HOSTILE_FORMS: dict[str, dict[str, Any]] = {
    "timestamp-property": {"timestamp": HUGE},
    "timestamp-header": {"headers": {"when": PLACEHOLDER}, "patches": (stamp(HUGE),)},
    "nested-timestamp-header": {
        "headers": {"a": {"b": [PLACEHOLDER, 1]}},
        "patches": (stamp(2**64 - 1),),
    },
    # Milliseconds, as some clients send them: pamqp reads them, pika cannot.
    "millisecond-header": {
        "headers": {"when": PLACEHOLDER},
        "patches": (stamp(1_700_000_000_000),),
    },
    "not-utf8": {
        "message_id": "MSGID",
        "headers": {"kkkk": "v"},
        "patches": ((b"\x05MSGID", b"\x05\xff\xfe-id"), (b"\x04kkkk", b"\x04k\xffkk")),
    },
}


@QUEUE_TYPES
@pytest.mark.parametrize("form", HOSTILE_FORMS)
def test_a_hostile_message_never_costs_the_connection(rt, names, raw, collector, queue_type, form):
    queue = names.queue()
    received = collector()
    with (
        rt.client(queue_type=queue_type) as client,
        client.consumer(queue, Order, received.__call__, prefetch=2),
    ):
        raw.publish(queue, order("hostile"), properties=HostileProperties(**HOSTILE_FORMS[form]))
        for n in range(3):
            raw.publish(queue, order(str(n)))
        received.wait(4)
        assert received.settle(0.3) == 4
        health = client.health()
    assert health.connected and health.reconnects == 0
    [(_, ctx)] = [(m, c) for m, c in received.items if m.order_id == "hostile"]
    assert not ctx.redelivered  # handled at the first delivery: no connection was lost
    if form == "timestamp-property":
        assert ctx.timestamp is None  # beyond the year 9999: as if it had none
    elif form == "timestamp-header":
        assert ctx.headers["when"] == HUGE  # the raw value, as an integer
    elif form == "nested-timestamp-header":
        assert ctx.headers["a"] == {"b": [2**63 - 1, 1]}  # capped at 64 signed bits
    elif form == "millisecond-header":
        assert ctx.headers["when"] in (
            1_700_000_000_000,  # pika: the raw value
            datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc),  # pamqp: as ms
        )
    else:
        assert ctx.message_id == "\ufffd\ufffd-id"
        assert ctx.headers == {"k\ufffdkk": "v"}
    assert raw.count(queue) == 0
    assert raw.count(f"{queue}.dlq") == 0


def failing(message: Order, ctx: mqkit.Context) -> None:
    raise RuntimeError(f"cannot handle {message.order_id}")


@QUEUE_TYPES
def test_a_hostile_message_is_retried_dead_lettered_peeked_and_replayed(
    rt, names, raw, queue_type, broker_url
):
    queue, service = names.queue(), names.service()
    policy = RetryPolicy(max_attempts=2, delays=(0.1,))
    hostile = HostileProperties(
        message_id="hostile-1",
        timestamp=HUGE,
        headers={"when": PLACEHOLDER, "tenant": "acme"},
        patches=(stamp(HUGE),),
    )
    try:
        with rt.client(queue_type=queue_type, service=service) as client:
            with client.consumer(queue, Order, failing, retry=policy):
                raw.publish(queue, order("hostile"), properties=hostile)
                wait_until(lambda: raw.count(f"{queue}.dlq") == 1, what="the dead letter")
                health = client.health()
            assert health.reconnects == 0
            dead = client.dead_letters(queue)
            [letter] = dead.peek()
            assert letter.message_id == "hostile-1"
            assert letter.error_type == "RuntimeError"
            assert "cannot handle hostile" in letter.error_message
            assert letter.attempts == 2
            assert letter.headers["when"] == HUGE and letter.headers["tenant"] == "acme"
            assert dead.replay() == 1
        wait_until(lambda: raw.count(queue) == 1, what="the replayed message")
        [(_, props, body)] = raw.drain(queue)
        assert body == order("hostile") and props.message_id == "hostile-1"
        assert own_headers(props) == {"when": HUGE, "tenant": "acme"}
    finally:
        delete_queues(broker_url, *retry_queues(service, policy))


@QUEUE_TYPES
def test_a_hostile_dead_letter_can_be_peeked_and_replayed(rt, names, raw, queue_type, broker_url):
    # Put into the DLQ by someone else, with headers that lie: a timestamp beyond the year
    # 9999, attempts "abc", an original queue that is not the DLQ's.
    queue, elsewhere = names.queue(), names.queue()
    try:
        with rt.client(queue_type=queue_type) as client:
            client.declare(mqkit.Queue(elsewhere))
            with client.consumer(queue, Order, failing):
                pass  # declares the queue and its DLQ
            for n in (1, 2):
                raw.publish(
                    f"{queue}.dlq", order(f"dead-{n}"), properties=forged_letter(n, elsewhere)
                )
            dead = client.dead_letters(queue)
            letters = dead.peek()
            assert [letter.message_id for letter in letters] == ["forged-1", "forged-2"]
            for letter in letters:
                assert letter.attempts == 1  # "abc": read leniently
                assert letter.original_queue == elsewhere  # shown as it came...
                assert letter.failed_at is None
                assert letter.incoming.timestamp is None
                assert letter.headers["x-mqkit-failed-at"] == HUGE
                json.dumps(letter.to_json())
            # ...but a replay goes to the DLQ's own queue, unless the caller names another.
            assert dead.replay(message_id="forged-1", to=elsewhere) == 1
            assert dead.replay() == 1
        wait_until(lambda: raw.count(queue) == 1 and raw.count(elsewhere) == 1, what="replays")
        [(_, props, _)] = raw.drain(queue)
        assert props.message_id == "forged-2"
        assert not any(str(k).startswith("x-mqkit-") for k in props.headers or {})
        [(_, props, _)] = raw.drain(elsewhere)
        assert props.message_id == "forged-1"
    finally:
        delete_queues(broker_url, elsewhere, f"{elsewhere}.dlq")


def forged_letter(n: int, original_queue: str) -> HostileProperties:
    return HostileProperties(
        message_id=f"forged-{n}",
        timestamp=HUGE,
        headers={
            "x-mqkit-error-type": "ValueError",
            "x-mqkit-error-message": "forged",
            "x-mqkit-attempts": "abc",
            "x-mqkit-original-queue": original_queue,
            "x-mqkit-failed-at": PLACEHOLDER,
        },
        patches=(stamp(HUGE),),
    )


def test_mqkit_dlq_peek_shows_a_hostile_dead_letter(rt, names, raw, broker_url):
    queue = names.queue()
    with rt.client(queue_type="quorum") as client, client.consumer(queue, Order, failing):
        pass  # declares the queue and its DLQ
    raw.publish(f"{queue}.dlq", order("dead"), properties=forged_letter(1, "elsewhere"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQKIT_")}
    env.update(COLUMNS="250", PYTHONIOENCODING="utf-8")
    for extra in ([], ["--json"]):
        result = subprocess.run(
            [sys.executable, "-m", "mqkit.cli", "dlq", "peek", queue, "--url", broker_url, *extra],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "forged-1" in result.stdout
    [letter] = json.loads(result.stdout)
    assert letter["attempts"] == 1 and letter["headers"]["x-mqkit-attempts"] == "abc"
    assert raw.count(f"{queue}.dlq") == 1  # peeking removes nothing


# --------------------------------------------------------------------------- item 2


class Picky(BaseModel):
    """A model whose validator raises TypeError, which pydantic does not wrap."""

    order_id: str

    @field_validator("order_id")
    @classmethod
    def _not_bad(cls, value: str) -> str:
        if value == "bad":
            PICKY_CALLS.append(value)
            raise TypeError("picky validator refuses 'bad'")
        return value


PICKY_CALLS: list[str] = []


@QUEUE_TYPES
def test_a_validator_raising_type_error_dead_letters_at_once(rt, names, raw, collector, queue_type):
    queue = names.queue()
    received = collector()
    PICKY_CALLS.clear()
    with (
        rt.client(queue_type=queue_type) as client,
        client.consumer(queue, Picky, received.__call__, prefetch=3),
    ):
        raw.publish(queue, order("bad"), properties=HostileProperties(message_id="bad-1"))
        for n in range(5):
            raw.publish(queue, order(str(n)))
        received.wait(5)  # the good ones all get through (no stall behind the bad one)
        wait_until(lambda: raw.count(f"{queue}.dlq") == 1, what="the dead letter")
        assert client.health().ready
    assert sorted(m.order_id for m in received.messages) == [str(n) for n in range(5)]
    assert PICKY_CALLS == ["bad"]  # decoded once: never requeued, never retried
    [(_, props, body)] = raw.drain(f"{queue}.dlq")
    assert body == order("bad") and props.message_id == "bad-1"
    assert text(props.headers["x-mqkit-error-type"]) == "DecodeError"
    reason = text(props.headers["x-mqkit-error-message"])
    assert "TypeError" in reason and "picky validator refuses 'bad'" in reason
    assert int(props.headers["x-mqkit-attempts"]) == 1
    assert raw.count(queue) == 0


# --------------------------------------------------------------------------- item 6


@QUEUE_TYPES
@pytest.mark.parametrize("forged", [10**12, "abc", -1])
def test_a_forged_attempt_count_does_not_skip_the_retries(
    rt, names, raw, queue_type, forged, broker_url
):
    queue, service = names.queue(), names.service()
    policy = RetryPolicy(max_attempts=3, delays=(0.1,))
    attempts: list[int] = []
    lock = threading.Lock()

    def record(message: Order, ctx: mqkit.Context) -> None:
        with lock:
            attempts.append(ctx.attempt)
        raise RuntimeError("always fails")

    try:
        with (
            rt.client(queue_type=queue_type, service=service) as client,
            client.consumer(queue, Order, record, retry=policy),
        ):
            props = HostileProperties(headers={"mqkit-attempt": forged})
            raw.publish(queue, order("1"), properties=props)
            wait_until(lambda: raw.count(f"{queue}.dlq") == 1, timeout=15, what="dead letter")
        assert attempts == [1, 2, 3]
        [(_, props, _)] = raw.drain(f"{queue}.dlq")
        assert int(props.headers["x-mqkit-attempts"]) == 3
    finally:
        delete_queues(broker_url, *retry_queues(service, policy))


@QUEUE_TYPES
def test_the_context_route_comes_from_the_delivery_not_from_headers(
    rt, names, collector, raw, queue_type
):
    exchange, queue = names.exchange(), names.queue()
    received = collector()
    forged = {
        "x-mqkit-original-exchange": "admin",
        "x-mqkit-original-routing-key": "admin.grant",
    }
    with rt.client(queue_type=queue_type) as client:
        client.declare(mqkit.Exchange(exchange))
        with client.consumer(queue, Order, received.__call__):
            client.declare(mqkit.Binding(exchange, queue, "orders.#"))
            props = HostileProperties(headers=forged)
            raw.publish("orders.new", order("1"), exchange=exchange, properties=props)
            raw.publish(queue, order("2"), properties=props)  # straight to the queue
            received.wait(2)
    routes = sorted((c.exchange, c.routing_key) for c in received.contexts)
    assert routes == sorted([(exchange, "orders.new"), ("", queue)])


class HostileOrderPlaced(mqkit.Event, event_type="hostile-orders.placed"):
    order_id: str


class HostileAdminGrant(mqkit.Event, event_type="hostile-admin.grant"):
    user: str


@QUEUE_TYPES
def test_a_pattern_subscription_dead_letters_a_type_outside_its_pattern(
    rt, names, collector, raw, queue_type, broker_url
):
    exchange, service = names.exchange(), names.service()
    pattern = "hostile-orders.*"
    queue = subscription_queue_name(service, pattern)
    received = collector()
    grant = b'{"user": "mallory"}'
    try:
        with rt.client(service=service, queue_type=queue_type) as client:
            bus = client.event_bus(exchange=exchange)
            bus.subscribe(pattern, received.__call__)
            with bus:
                # A registered type from elsewhere, by the exchange with a routing key the
                # pattern covers, and straight into the subscription's queue.
                raw.publish(
                    "hostile-orders.x",
                    grant,
                    exchange=exchange,
                    properties=HostileProperties(type="hostile-admin.grant", message_id="g1"),
                )
                raw.publish(queue, grant, properties=HostileProperties(type="hostile-admin.grant"))
                bus.publish(HostileOrderPlaced(order_id="1"))
                received.wait(1)
                wait_until(lambda: raw.count(f"{queue}.dlq") == 2, what="the dead letters")
                assert received.settle(0.3) == 1
        assert received.messages == [HostileOrderPlaced(order_id="1")]
        letters = raw.drain(f"{queue}.dlq")
        assert len(letters) == 2
        for _, props, body in letters:
            assert body == grant
            assert text(props.headers["x-mqkit-error-type"]) == "DecodeError"
            reason = text(props.headers["x-mqkit-error-message"])
            assert "'hostile-admin.grant'" in reason and pattern in reason
    finally:
        delete_queues(broker_url, queue, f"{queue}.dlq", *retry_queues(service, DEFAULT_POLICY))


# --------------------------------------------------------------------------- properties

_SHORT_TEXT = st.text(max_size=30) | st.binary(min_size=1, max_size=30)  # bytes: any octets
_KEYS = (
    st.sampled_from(["mqkit-attempt", "x-mqkit-original-exchange", "x-mqkit-error-type", "tenant"])
    | st.text(min_size=1, max_size=12)
    | st.binary(min_size=1, max_size=12)
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=10)
    | st.builds(Decimal, st.integers(-(2**31), 2**31 - 1)).map(lambda d: d.scaleb(-2))
    | st.just(PLACEHOLDER)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)


@st.composite
def wire_properties(draw: st.DrawFn) -> HostileProperties:
    """Any properties and headers pika can put on the wire, timestamps of any size."""
    optional = lambda strategy: st.none() | strategy  # noqa: E731
    headers = draw(optional(st.dictionaries(_KEYS, _VALUES, max_size=5)))
    raw_stamp = draw(st.integers(0, 2**64 - 1))
    encoded: list[bytes] = []
    pika.data.encode_table(encoded, headers or {})
    return HostileProperties(
        content_type=draw(optional(_SHORT_TEXT)),
        content_encoding=draw(optional(_SHORT_TEXT)),
        headers=headers,
        delivery_mode=draw(st.sampled_from([None, 1, 2])),  # the broker takes no other
        priority=draw(optional(st.integers(0, 255))),
        correlation_id=draw(optional(_SHORT_TEXT)),
        reply_to=draw(optional(_SHORT_TEXT)),
        expiration=draw(st.sampled_from([None, "3600000"])),
        message_id=draw(optional(_SHORT_TEXT)),
        timestamp=draw(optional(st.integers(0, 2**64 - 1))),
        type=draw(optional(_SHORT_TEXT)),
        user_id=draw(st.sampled_from([None, "guest"])),  # the broker checks it
        app_id=draw(optional(_SHORT_TEXT)),
        cluster_id=draw(optional(_SHORT_TEXT)),
        patches=(stamp(raw_stamp),) if PLACEHOLDER_BYTES in b"".join(encoded) else (),
    )


@QUEUE_TYPES
def test_any_properties_and_headers_end_acked_retried_or_dead_lettered(
    rt, names, raw, queue_type, broker_url, caplog
):
    """For any properties and headers the broker accepts, the consumer keeps its connection
    and each message ends handled (acked), or in the DLQ, after retries or at once."""
    queue, service = names.queue(), names.service()
    policy = RetryPolicy(max_attempts=2, delays=(0.05,))
    handled: set[str] = set()
    lock = threading.Lock()

    def handler(message: Order, ctx: mqkit.Context) -> None:
        if message.order_id.startswith("fail"):
            raise RuntimeError("this one fails")
        with lock:
            handled.add(message.order_id)

    counter = iter(range(10**6))
    published: list[str] = []
    expected_dead: set[str] = set()
    try:
        with (
            rt.client(queue_type=queue_type, service=service) as client,
            client.consumer(queue, Order, handler, retry=policy, prefetch=5),
        ):

            @settings(
                max_examples=50,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(props=wire_properties(), fails=st.booleans())
            def check(props: HostileProperties, fails: bool) -> None:
                order_id = f"{'fail' if fails else 'ok'}-{next(counter)}"
                try:
                    raw.publish(queue, order(order_id), properties=props)
                except pika.exceptions.AMQPError:
                    reject()  # the broker refused it: not a message a consumer can get
                published.append(order_id)
                if fails:
                    expected_dead.add(order_id)
                    wait_until(
                        lambda: raw.count(f"{queue}.dlq") == len(expected_dead),
                        what=f"{order_id} dead-lettered",
                    )
                else:
                    wait_until(lambda: order_id in handled, what=f"{order_id} handled")

            check()
            assert len(published) >= 30, f"only {len(published)} examples reached the broker"
            health = client.health()
            assert health.connected and health.reconnects == 0, health
            dead = client.dead_letters(queue)
            letters = dead.peek(limit=1000)
        assert {Order.model_validate_json(letter.body).order_id for letter in letters} == (
            expected_dead
        )
        assert all(letter.error_type == "RuntimeError" for letter in letters)
        assert all(letter.attempts == 2 for letter in letters)
        assert raw.count(queue) == 0
        unexpected = [
            r.getMessage()
            for r in caplog.records
            if "unexpected error" in r.getMessage() or "cannot copy" in r.getMessage()
        ]
        assert unexpected == []
    finally:
        delete_queues(broker_url, *retry_queues(service, policy))
