"""Correlation without a broker: what a message built inside a handler inherits, on threads
and tasks, through every way the core builds an outgoing envelope."""

from __future__ import annotations

import asyncio
import contextvars
import threading

from pydantic import BaseModel

from mqkit import correlation
from mqkit.context import Context
from mqkit.correlation import CAUSATION_ID, handling
from mqkit.messages import Incoming, encode
from mqkit.publishing import PublishTarget
from mqkit.rpc import answer


class Order(BaseModel):
    order_id: str


ORDER = Order(order_id="42")


def ctx(message_id: str | None = "in-1", correlation_id: str | None = "conv-1") -> Context:
    return Context(message_id=message_id, correlation_id=correlation_id, queue="orders")


def test_outside_a_handler_nothing_is_added():
    envelope = encode(ORDER, service="shop")
    assert envelope.correlation_id is None
    assert CAUSATION_ID not in envelope.headers
    assert correlation.current() is None


def test_inside_a_handler_a_message_inherits_the_correlation_and_names_its_cause():
    with handling(ctx()):
        envelope = encode(ORDER, service="shop")
    assert envelope.correlation_id == "conv-1"
    assert envelope.headers[CAUSATION_ID] == "in-1"


def test_a_delivery_without_a_correlation_id_passes_on_its_message_id():
    with handling(ctx(correlation_id=None)):
        envelope = encode(ORDER, service="shop")
    assert envelope.correlation_id == "in-1"
    assert envelope.headers[CAUSATION_ID] == "in-1"


def test_a_delivery_without_any_id_adds_nothing():
    with handling(ctx(message_id=None, correlation_id=None)):
        envelope = encode(ORDER, service="shop")
    assert envelope.correlation_id is None and CAUSATION_ID not in envelope.headers


def test_an_explicit_correlation_id_or_causation_header_wins():
    with handling(ctx()):
        own = encode(ORDER, service="shop", correlation_id="mine")
        caused = encode(ORDER, service="shop", headers={CAUSATION_ID: "other"})
    assert own.correlation_id == "mine" and own.headers[CAUSATION_ID] == "in-1"
    assert caused.headers[CAUSATION_ID] == "other" and caused.correlation_id == "conv-1"


def test_the_callers_headers_are_not_changed():
    headers = {"x-tenant": "acme"}
    with handling(ctx()):
        envelope = encode(ORDER, service="shop", headers=headers)
    assert headers == {"x-tenant": "acme"}
    assert envelope.headers == {"x-tenant": "acme", CAUSATION_ID: "in-1"}


def test_producers_and_the_bus_inherit_it_through_their_target():
    target = PublishTarget(Order, queue="orders")
    with handling(ctx()):
        [(envelope, key)] = target.prepare([ORDER], service="shop")
    assert key == "orders"
    assert envelope.correlation_id == "conv-1" and envelope.headers[CAUSATION_ID] == "in-1"


def test_a_reply_keeps_the_requests_correlation_and_names_it_as_its_cause():
    request = Incoming(
        body=b"{}", delivery_tag=1, message_id="req-1", correlation_id="conv-9", reply_to="r"
    )
    with handling(ctx(message_id="req-1", correlation_id="conv-9")):
        reply = answer("quotes", request, service="pricing", result=ORDER)
    assert reply is not None
    assert reply.envelope.correlation_id == "conv-9"
    assert reply.envelope.headers[CAUSATION_ID] == "req-1"


def test_scopes_nest_and_the_outer_one_comes_back():
    with handling(ctx("outer", "c-outer")) as outer:
        with handling(ctx("inner", "c-inner")):
            assert encode(ORDER, service="s").correlation_id == "c-inner"
        assert correlation.current() is outer
        assert encode(ORDER, service="s").correlation_id == "c-outer"
    assert correlation.current() is None


def test_the_scope_says_which_delivery_and_stays_readable_after_the_block():
    delivery = Context(message_id="m", correlation_id=None, queue="q", attempt=3)
    with handling(delivery, service="billing") as scope:
        scope.copy_headers["x-extra"] = "1"
    assert (scope.message_id, scope.correlation_id) == ("m", "m")
    assert (scope.queue, scope.service, scope.attempt) == ("q", "billing", 3)
    assert scope.copy_headers == {"x-extra": "1"}


def test_each_thread_sees_only_its_own_delivery():
    seen: dict[str, str | None] = {}
    barrier = threading.Barrier(2)

    def handle(name: str) -> None:
        with handling(ctx(message_id=name, correlation_id=f"conv-{name}")):
            barrier.wait()  # both scopes are open at once
            seen[name] = encode(ORDER, service="s").correlation_id

    threads = [threading.Thread(target=handle, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": "conv-a", "b": "conv-b"}


def test_a_thread_the_handler_starts_inherits_only_through_copy_context():
    seen: list[str | None] = []
    with handling(ctx()):
        plain = threading.Thread(
            target=lambda: seen.append(encode(ORDER, service="s").correlation_id)
        )
        plain.start()
        plain.join()
        context = contextvars.copy_context()
        copied = threading.Thread(
            target=context.run,
            args=(lambda: seen.append(encode(ORDER, service="s").correlation_id),),
        )
        copied.start()
        copied.join()
    assert seen == [None, "conv-1"]


async def test_concurrent_tasks_each_see_their_own_delivery_and_tasks_they_create_inherit():
    async def build() -> str | None:
        await asyncio.sleep(0.01)
        return encode(ORDER, service="s").correlation_id

    async def handle(name: str) -> tuple[str | None, str | None]:
        with handling(ctx(message_id=name, correlation_id=f"conv-{name}")):
            await asyncio.sleep(0.01)  # interleave with the other task
            child = asyncio.create_task(build())  # a task copies the context it starts in
            return encode(ORDER, service="s").correlation_id, await child

    results = await asyncio.gather(handle("a"), handle("b"))
    assert results == [("conv-a", "conv-a"), ("conv-b", "conv-b")]


def test_one_scope_can_be_entered_again_and_nested_in_itself():
    scope = handling(ctx())
    assert correlation.current() is None  # made, not entered
    with scope:
        with scope:
            assert correlation.current() is scope
        assert correlation.current() is scope
    assert correlation.current() is None
    with scope:
        assert encode(ORDER, service="s").correlation_id == "conv-1"
    assert correlation.current() is None
