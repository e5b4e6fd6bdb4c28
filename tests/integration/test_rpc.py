"""RPC over direct reply-to: typed replies, timeouts, remote errors, unroutable requests."""

from __future__ import annotations

import threading
import time

import pytest
from pydantic import BaseModel

import mqkit
from mqkit.testing import FaultProxy


class Add(BaseModel):
    a: int
    b: int


class Sum(BaseModel):
    total: int


def add(request, ctx):
    if request.a < 0:
        raise ValueError(f"negative operand {request.a}")
    return Sum(total=request.a + request.b)


def test_round_trip_is_typed(rt, names):
    queue = names.queue()
    with (
        rt.client(service=names.service()) as server,
        rt.client() as caller,
        server.responder(queue, Add, add),
    ):
        reply = caller.request(queue, Add(a=2, b=3), Sum, timeout=5)
        assert isinstance(reply, Sum)
        assert reply == Sum(total=5)
        # Replies are matched to their requests.
        replies = [caller.request(queue, Add(a=i, b=i), Sum, timeout=5) for i in range(5)]
        assert [r.total for r in replies] == [0, 2, 4, 6, 8]


def test_request_and_responder_on_one_client(rt, names):
    queue = names.queue()
    with rt.client() as client, client.responder(queue, Add, add):
        assert client.request(queue, Add(a=20, b=22), Sum) == Sum(total=42)


def test_responder_sees_the_request_context(rt, names):
    queue = names.queue()
    contexts = []

    def echo(request, ctx):
        contexts.append(ctx)
        return Sum(total=request.a)

    with rt.client() as server, rt.client() as caller, server.responder(queue, Add, echo):
        caller.request(queue, Add(a=1, b=0), Sum)
    [ctx] = contexts
    assert ctx.queue == queue
    assert ctx.correlation_id  # the reply is matched by it
    assert ctx.reply_to and ctx.reply_to.startswith("amq.rabbitmq.reply-to")
    assert ctx.event_type == "Add"


def test_timeout_names_queue_and_timeout(rt, names):
    queue = names.queue()
    with rt.client() as client:
        client.declare(mqkit.Queue(queue))  # routable, but nobody answers
        started = time.monotonic()
        with pytest.raises(mqkit.RequestTimeout) as info:
            client.request(queue, Add(a=1, b=2), Sum, timeout=0.5)
        elapsed = time.monotonic() - started
        assert 0.5 - 0.05 <= elapsed < 3
        assert queue in str(info.value)
        assert "0.5" in str(info.value)
        # A timed-out request leaves the client usable.
        other = names.queue()
        with client.responder(other, Add, add):
            assert client.request(other, Add(a=1, b=1), Sum, timeout=5) == Sum(total=2)


def test_handler_error_is_a_remote_error_at_once(rt, names):
    queue = names.queue()
    with rt.client() as server, rt.client() as caller, server.responder(queue, Add, add):
        started = time.monotonic()
        with pytest.raises(mqkit.RemoteError) as info:
            caller.request(queue, Add(a=-1, b=2), Sum, timeout=5)
        assert time.monotonic() - started < 2  # no waiting for the timeout
        assert info.value.error_type == "ValueError"
        assert info.value.error_message == "negative operand -1"
        assert "ValueError" in str(info.value)
        # Not retried, and the responder keeps answering.
        assert caller.request(queue, Add(a=1, b=1), Sum, timeout=5) == Sum(total=2)


def test_responder_returning_the_wrong_type_is_a_remote_error(rt, names):
    queue = names.queue()

    def wrong(request, ctx):
        return request.a + request.b  # an int, not a model

    with rt.client() as server, rt.client() as caller, server.responder(queue, Add, wrong):
        started = time.monotonic()
        with pytest.raises(mqkit.RemoteError) as info:
            caller.request(queue, Add(a=1, b=2), Sum, timeout=5)
        assert time.monotonic() - started < 2
    assert info.value.error_type == "TypeError"
    assert "int" in info.value.error_message


def test_reply_that_does_not_match_the_response_type(rt, names):
    queue = names.queue()

    class Other(BaseModel):
        unrelated: str

    def other(request, ctx):
        return Other(unrelated="x")

    with (
        rt.client() as server,
        rt.client() as caller,
        server.responder(queue, Add, other),
        pytest.raises(mqkit.DecodeError, match="Sum"),
    ):
        caller.request(queue, Add(a=1, b=2), Sum, timeout=5)


def test_request_to_a_queue_nobody_declared_is_unroutable(rt, names):
    queue = names.queue()
    with rt.client() as client:
        started = time.monotonic()
        with pytest.raises(mqkit.PublishUnroutable) as info:
            client.request(queue, Add(a=1, b=2), Sum, timeout=5)
        assert time.monotonic() - started < 3
        assert queue in str(info.value)


def test_a_request_whose_link_is_cut_fails_at_once_on_both_runtimes(rt, names):
    # Direct reply-to sends the reply to the channel the request was published for: once
    # that channel is gone, the reply cannot arrive, so the caller hears it now rather than
    # at its timeout, and is told the request may have been processed. (Nobody answers the
    # queue; the link is cut once the request is published and confirmed.)
    queue = names.queue()

    def cut_once_sent() -> None:  # published and confirmed: it waits for its reply
        requester = getattr(caller, "_target", caller)._requester  # AsyncClient under Blocking
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if requester._waiting.in_flight:
                proxy.cut()
                return
            time.sleep(0.01)

    with (
        FaultProxy(rt.broker_url) as proxy,
        rt.client() as server,
        rt.client(url=proxy.url) as caller,
    ):
        server.declare(mqkit.Queue(queue))
        cutter = threading.Thread(target=cut_once_sent)
        cutter.start()
        started = time.monotonic()
        try:
            with pytest.raises(mqkit.ConnectionFailed, match="may have been processed"):
                caller.request(queue, Add(a=1, b=2), Sum, timeout=30)
            assert time.monotonic() - started < 10
        finally:
            cutter.join(10)


def test_a_request_on_a_link_that_does_not_answer_keeps_its_deadline(rt, names):
    # The publishing channel is opened by the first request; on a black-holed link that
    # must not outlast the caller's timeout, and it is a RequestTimeout on both runtimes.
    queue = names.queue()
    with (
        FaultProxy(rt.broker_url) as proxy,
        rt.client() as server,
        rt.client(url=proxy.url, confirm_timeout=1, connect_timeout=5) as caller,
    ):
        server.declare(mqkit.Queue(queue))
        proxy.blackhole()
        try:
            started = time.monotonic()
            with pytest.raises(mqkit.RequestTimeout):
                caller.request(queue, Add(a=1, b=2), Sum, timeout=1.5)
            assert time.monotonic() - started < 4
        finally:
            proxy.restore()
