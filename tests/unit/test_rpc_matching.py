"""Request/reply matching without a broker: a request's correlation id is its conversation
(several requests may share one), a reply finds its request by the id mqkit's responders
name, else by correlation id (what other responders echo)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from mqkit.context import Context
from mqkit.correlation import CAUSATION_ID, handling
from mqkit.messages import Incoming
from mqkit.rpc import REPLY_TO, REQUEST_ID, Pending, answer, request_envelope


class Quote(BaseModel):
    sku: str


def test_a_request_outside_a_handler_is_its_own_conversation():
    request = request_envelope(Quote(sku="MUG"), service="shop")
    assert request.correlation_id == request.message_id
    assert request.reply_to == REPLY_TO and CAUSATION_ID not in request.headers


def test_a_request_takes_headers_and_a_correlation_id():
    request = request_envelope(
        Quote(sku="MUG"), service="shop", correlation_id="conv-1", headers={"x-tenant": "acme"}
    )
    assert request.correlation_id == "conv-1" and request.headers == {"x-tenant": "acme"}


def test_a_request_from_a_handler_joins_its_conversation():
    ctx = Context(message_id="order-1", correlation_id="conv-1", queue="orders")
    with handling(ctx):
        request = request_envelope(Quote(sku="MUG"), service="shop")
    assert request.correlation_id == "conv-1"
    assert request.headers[CAUSATION_ID] == "order-1"


def test_a_request_must_be_a_model():
    with pytest.raises(TypeError, match="pydantic model, got dict"):
        request_envelope({"sku": "MUG"}, service="shop")


def incoming(request_id: str, correlation_id: str | None) -> Incoming:
    return Incoming(
        body=b"{}",
        delivery_tag=1,
        message_id=request_id,
        correlation_id=correlation_id,
        reply_to="amq.rabbitmq.reply-to.abc",
    )


def test_mqkits_replies_name_their_request():
    reply = answer("quotes", incoming("req-1", "conv-1"), service="pricing", result=Quote(sku="x"))
    failed = answer("quotes", incoming("req-2", "conv-1"), service="pricing", failure=KeyError("x"))
    assert reply is not None and failed is not None
    assert reply.envelope.headers[REQUEST_ID] == "req-1"
    assert reply.envelope.correlation_id == "conv-1"
    assert failed.envelope.headers[REQUEST_ID] == "req-2"
    assert failed.envelope.correlation_id == "conv-1"


def test_requests_sharing_a_conversation_each_get_their_own_reply():
    pending: Pending[str] = Pending()
    first = request_envelope(Quote(sku="a"), service="s", correlation_id="conv")
    second = request_envelope(Quote(sku="b"), service="s", correlation_id="conv")
    pending.add(first, "first")
    pending.add(second, "second")
    assert pending.answered({REQUEST_ID: second.message_id}, "conv") == "second"
    assert pending.answered({REQUEST_ID: first.message_id.encode()}, "conv") == "first"
    # a responder that only echoes the correlation id: the oldest request of it
    assert pending.answered(None, "conv") == "first"
    pending.discard(first.message_id)
    assert pending.answered({}, "conv") == "second"
    assert pending.get(first.message_id) is None


def test_a_reply_to_a_request_of_its_own_conversation_matches_by_correlation_id():
    pending: Pending[str] = Pending()
    request = request_envelope(Quote(sku="a"), service="s")
    pending.add(request, "waiter")
    assert pending.answered({}, request.message_id) == "waiter"  # what any responder echoes


def test_late_and_unknown_replies_match_nothing():
    pending: Pending[str] = Pending()
    request = request_envelope(Quote(sku="a"), service="s", correlation_id="conv")
    pending.add(request, "waiter")
    pending.discard(request.message_id)
    pending.discard(request.message_id)  # twice: nothing happens
    assert pending.answered({REQUEST_ID: request.message_id}, "conv") is None
    assert pending.answered({REQUEST_ID: "other"}, "other") is None


def test_requests_sent_for_a_reply_channel_that_is_gone_are_unanswerable():
    from mqkit.errors import ConnectionFailed
    from mqkit.rpc import reply_lost

    pending: Pending[str] = Pending()
    first, second, unsent = (request_envelope(Quote(sku=s), service="shop") for s in "ABC")
    old, new = object(), object()
    pending.add(first, "first")
    pending.add(second, "second")
    pending.add(unsent, "unsent")  # added, not published yet: its reply may still come
    pending.sent(first.message_id, old)
    pending.sent(second.message_id, new)
    assert pending.in_flight == 2
    assert pending.unanswerable(old) == ["first"]
    assert sorted(pending.unanswerable()) == ["first", "second"]
    pending.discard(first.message_id)
    assert pending.unanswerable(old) == [] and pending.in_flight == 1
    pending.sent("never-added", old)  # answered and discarded before it was marked
    assert pending.in_flight == 1
    error = reply_lost("the connection was lost")
    assert isinstance(error, ConnectionFailed)
    assert str(error) == (
        "the connection was lost while waiting for a reply; the request may have been "
        "processed (retry it if it is idempotent)"
    )


def test_why_a_closed_reply_channel_loses_its_replies():
    from mqkit.rpc import CHANNEL_CLOSED, CHANNEL_REPLACED, LINK_LOST, reply_channel_gone

    assert reply_channel_gone(closed_here=True, closed_by_broker=False) == CHANNEL_REPLACED
    assert reply_channel_gone(closed_here=False, closed_by_broker=True) == CHANNEL_CLOSED
    assert reply_channel_gone(closed_here=False, closed_by_broker=False) == LINK_LOST
