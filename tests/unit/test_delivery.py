"""What a consumer does with one delivery: prepare (decode + Context) and follow_up."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest
from pydantic import BaseModel, field_validator

from mqkit.context import Context
from mqkit.delivery import (
    FollowUp,
    follow_up,
    format_traceback,
    prepare,
    registry_decoder,
    typed_decoder,
)
from mqkit.messages import Event, Incoming
from mqkit.retry import ATTEMPT_HEADER, Ack, GiveUp, Retry, RetryLater, RetryPolicy, decide
from mqkit.topology import Exchange, Queue, consumer_topology


class Refund(BaseModel):
    order_id: str
    amount: Decimal


class UnitRefunded(Event, event_type="unit.delivery.refunded"):
    order_id: str


WHEN = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def _incoming(**overrides: object) -> Incoming:
    values: dict[str, object] = {
        "body": b'{"order_id": "9", "amount": "2.50"}',
        "delivery_tag": 4,
        "message_id": "mid-9",
        "correlation_id": "corr-9",
        "reply_to": "amq.rabbitmq.reply-to.abc",
        "type": "Refund",
        "app_id": "shop",
        "content_type": "application/json",
        "timestamp": WHEN,
        "headers": {"tenant": "acme"},
        "redelivered": True,
        "exchange": "shop",
        "routing_key": "refunds.new",
    }
    values.update(overrides)
    return Incoming(**values)  # type: ignore[arg-type]


def test_prepare_decodes_and_builds_the_context() -> None:
    message, ctx, failure = prepare(_incoming(), queue="refunds", decoder=typed_decoder(Refund))
    assert failure is None
    assert message == Refund(order_id="9", amount=Decimal("2.50"))
    assert ctx == Context(
        message_id="mid-9",
        correlation_id="corr-9",
        headers={"tenant": "acme"},
        attempt=1,
        redelivered=True,
        exchange="shop",
        routing_key="refunds.new",
        queue="refunds",
        event_type="Refund",
        timestamp=WHEN,
        reply_to="amq.rabbitmq.reply-to.abc",
    )


def test_prepare_reads_the_attempt_and_takes_the_route_of_the_delivery() -> None:
    # A retried copy comes back through the default exchange from the retry queue. The
    # route is the delivery's: headers a publisher can set are not trusted for it.
    retried = _incoming(
        exchange="",
        routing_key="refunds",
        headers={
            ATTEMPT_HEADER: 3,
            "x-mqkit-original-exchange": "shop",
            "x-mqkit-original-routing-key": "refunds.new",
        },
    )
    _, ctx, failure = prepare(retried, queue="refunds", decoder=typed_decoder(Refund))
    assert failure is None
    assert ctx.attempt == 3
    assert (ctx.exchange, ctx.routing_key) == ("", "refunds")
    assert ctx.headers["x-mqkit-original-routing-key"] == "refunds.new"  # for information


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{oops", "not valid JSON"),
        (b'{"order_id": "9"}', "amount"),
        (b"\xff\xfe", "Refund"),
    ],
)
def test_prepare_gives_up_on_a_bad_body(body: bytes, reason: str) -> None:
    incoming = _incoming(body=body, headers={ATTEMPT_HEADER: 2})
    message, ctx, failure = prepare(incoming, queue="refunds", decoder=typed_decoder(Refund))
    assert message is None
    assert ctx.message_id == "mid-9"
    assert isinstance(failure, GiveUp)
    assert failure.error_type == "DecodeError"
    assert reason in failure.error_message
    assert failure.attempts == 2


def test_typed_decoder_ignores_the_type_property() -> None:
    message, _, failure = prepare(
        _incoming(type="something.else"), queue="q", decoder=typed_decoder(Refund)
    )
    assert failure is None and isinstance(message, Refund)


def test_registry_decoder_picks_the_class_by_type() -> None:
    incoming = _incoming(body=b'{"order_id": "3"}', type="unit.delivery.refunded")
    message, ctx, failure = prepare(incoming, queue="audit", decoder=registry_decoder)
    assert failure is None
    assert isinstance(message, UnitRefunded) and message.order_id == "3"
    assert ctx.event_type == "unit.delivery.refunded"


def test_registry_decoder_unknown_type_is_a_decode_failure() -> None:
    incoming = _incoming(body=b"{}", type="unit.delivery.nobody-knows")
    message, _, failure = prepare(incoming, queue="audit", decoder=registry_decoder)
    assert message is None
    assert isinstance(failure, GiveUp)
    assert failure.error_type == "DecodeError"
    assert "unit.delivery.nobody-knows" in failure.error_message


def test_follow_up_ack_needs_no_copy() -> None:
    assert follow_up(_incoming(), Ack(), queue="refunds", service="s") is None


def test_follow_up_retry_goes_to_the_services_tier_routed_by_the_queue() -> None:
    incoming = _incoming()
    copy = follow_up(incoming, RetryLater(delay=0.3, attempt=2), queue="refunds", service="s")
    assert isinstance(copy, FollowUp)
    # The tier of service "s" for 0.3 s, keyed by the work queue: the tier dead-letters it
    # to the default exchange with that key, back to "refunds".
    assert (copy.exchange, copy.routing_key) == ("s.retries.300ms", "refunds")
    assert copy.target == "'refunds' by 's.retries.300ms'"
    envelope = copy.envelope
    assert envelope.body == incoming.body
    assert envelope.message_id == "mid-9"
    assert envelope.correlation_id == "corr-9"
    assert envelope.type == "Refund"
    assert envelope.headers[ATTEMPT_HEADER] == 2
    assert envelope.headers["x-mqkit-original-exchange"] == "shop"
    assert envelope.headers["x-mqkit-original-routing-key"] == "refunds.new"
    assert envelope.headers["tenant"] == "acme"
    assert not any(k.startswith("x-mqkit-error") for k in envelope.headers)


def test_follow_up_give_up_goes_to_the_dlq_with_reasons() -> None:
    incoming = _incoming(headers={"tenant": "acme", ATTEMPT_HEADER: 3})
    outcome = GiveUp("ValueError", "nope", 3, "tb")
    copy = follow_up(incoming, outcome, queue="refunds", service="billing")
    assert copy is not None
    assert (copy.exchange, copy.routing_key) == ("", "refunds.dlq")  # the default exchange
    assert copy.target == "'refunds.dlq'"
    headers = copy.envelope.headers
    assert headers["x-mqkit-error-type"] == "ValueError"
    assert headers["x-mqkit-error-message"] == "nope"
    assert headers["x-mqkit-attempts"] == 3
    assert headers["x-mqkit-original-queue"] == "refunds"
    assert headers["x-mqkit-service"] == "billing"
    assert headers["tenant"] == "acme"
    assert copy.envelope.message_id == "mid-9"
    assert copy.envelope.body == incoming.body


def test_follow_up_retries_go_to_tiers_the_consumer_declares() -> None:
    # Whatever delay decide() picks (the policy's, or a Retry(delay=...) rounded up to a
    # tier), the copy's exchange is one of the tiers consumer_topology declares.
    policy = RetryPolicy(max_attempts=5, delays=(0.1, 0.5, 2.0))
    declared = {
        e.name
        for e in consumer_topology(
            Queue("refunds"), policy, default_type="quorum", delivery_limit=20, service="s"
        )
        if isinstance(e, Exchange)
    }
    exchanges = set()
    for attempt in range(1, policy.max_attempts):
        for exc in (RuntimeError("x"), Retry(), Retry(delay=0.3), Retry(delay=99.0)):
            outcome = decide(exc, attempt, policy)
            copy = follow_up(_incoming(), outcome, queue="refunds", service="s")
            assert copy is not None and copy.routing_key == "refunds"
            exchanges.add(copy.exchange)
    assert exchanges == declared == {"s.retries.100ms", "s.retries.500ms", "s.retries.2000ms"}


def test_follow_up_copies_are_for_one_queue_only() -> None:
    # A CC header makes the broker route a message to the queues it names too: a retry that
    # kept it would come back to each of them after the delay, a dead letter be copied there.
    incoming = _incoming(headers={"CC": ["elsewhere"], "BCC": ["hidden"], "tenant": "acme"})
    retry = follow_up(incoming, RetryLater(delay=0.3, attempt=2), queue="refunds", service="s")
    dead = follow_up(incoming, GiveUp("E", "m", 3), queue="refunds", service="s")
    for copy in (retry, dead):
        assert copy is not None
        assert "CC" not in copy.envelope.headers and "BCC" not in copy.envelope.headers
        assert copy.envelope.headers["tenant"] == "acme"


def test_follow_up_dlq_override_for_broadcast_queues() -> None:
    copy = follow_up(
        _incoming(),
        GiveUp("E", "m", 1),
        queue="svc.cache.cleared.ab12cd34",
        service="svc",
        dlq="svc.cache.cleared.dlq",
    )
    assert copy is not None
    assert (copy.exchange, copy.routing_key) == ("", "svc.cache.cleared.dlq")
    assert copy.envelope.headers["x-mqkit-original-queue"] == "svc.cache.cleared.ab12cd34"


def _fail_deep(n: int) -> None:
    if n == 0:
        raise ValueError("deep failure 17")
    _fail_deep(n - 1)


def test_format_traceback_keeps_the_last_frames() -> None:
    try:
        _fail_deep(20)
    except ValueError as exc:
        text = format_traceback(exc, limit=3)
    assert "ValueError: deep failure 17" in text
    assert "_fail_deep" in text
    assert text.count("_fail_deep") <= 3 * 2  # at most `limit` frames (name + source line)


class Validated(BaseModel):
    order_id: str

    @field_validator("order_id")
    @classmethod
    def _explode(cls, value: str) -> str:
        raise TypeError(f"cannot take {value!r}")  # pydantic does not wrap a TypeError


def test_any_exception_while_validating_is_a_bad_body() -> None:
    incoming = _incoming(body=b'{"order_id": "1"}')
    message, _, failure = prepare(incoming, queue="q", decoder=typed_decoder(Validated))
    assert message is None
    assert isinstance(failure, GiveUp)
    assert failure.error_type == "DecodeError"
    assert "TypeError" in failure.error_message and "cannot take '1'" in failure.error_message
    assert failure.attempts == 1
    assert "_explode" in failure.traceback  # where it was raised goes to the DLQ too


def test_any_exception_of_a_decoder_is_a_bad_body() -> None:
    def decoder(body: bytes, event_type: str | None) -> BaseModel:
        raise RuntimeError("decoder bug")

    message, ctx, failure = prepare(_incoming(), queue="q", decoder=decoder)
    assert message is None and ctx.message_id == "mid-9"
    assert isinstance(failure, GiveUp) and failure.error_type == "DecodeError"
    assert "RuntimeError" in failure.error_message and "decoder bug" in failure.error_message


def test_the_route_in_the_context_is_the_deliverys_not_the_headers() -> None:
    forged = _incoming(
        exchange="public",
        routing_key="orders.new",
        headers={
            "x-mqkit-original-exchange": "admin",
            "x-mqkit-original-routing-key": "admin.grant",
        },
    )
    _, ctx, _ = prepare(forged, queue="q", decoder=typed_decoder(Refund))
    assert (ctx.exchange, ctx.routing_key) == ("public", "orders.new")


@pytest.mark.parametrize(
    ("value", "attempt"),
    [(2, 2), (3, 3), (10**12, 1), (4, 1), (0, 1), (-5, 1), ("abc", 1), (b"2", 2), (2.5, 1)],
)
def test_the_attempt_header_is_read_within_the_policy(value: object, attempt: int) -> None:
    policy = RetryPolicy(max_attempts=3, delays=(1.0,))
    incoming = _incoming(headers={ATTEMPT_HEADER: value})
    _, ctx, _ = prepare(incoming, queue="q", decoder=typed_decoder(Refund), policy=policy)
    assert ctx.attempt == attempt


def test_a_forged_attempt_does_not_skip_the_retries() -> None:
    policy = RetryPolicy(max_attempts=3, delays=(1.0,))
    incoming = _incoming(headers={ATTEMPT_HEADER: 10**12})
    _, ctx, _ = prepare(incoming, queue="q", decoder=typed_decoder(Refund), policy=policy)
    assert decide(RuntimeError("x"), ctx.attempt, policy) == RetryLater(delay=1.0, attempt=2)


def test_a_first_delivery_records_its_own_route_not_forged_headers() -> None:
    forged = _incoming(
        exchange="shop",
        routing_key="refunds.new",
        headers={"x-mqkit-original-exchange": "elsewhere"},
    )
    copy = follow_up(forged, GiveUp("E", "m", 1), queue="refunds", service="s")
    assert copy is not None
    assert copy.envelope.headers["x-mqkit-original-exchange"] == "shop"
    assert copy.envelope.headers["x-mqkit-original-routing-key"] == "refunds.new"
