"""Which handlers each runtime can run (mqkit.handlers), decided without a broker."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import pytest

from mqkit import Event, Queue
from mqkit.handlers import check_handler, is_async_handler, role

ROLE = "consumer of queue 'orders'"


def plain(message: Any, ctx: Any) -> None: ...


async def coroutine(message: Any, ctx: Any) -> None: ...


def generator(message: Any, ctx: Any) -> Any:
    yield message


async def async_generator(message: Any, ctx: Any) -> Any:
    yield message


class AsyncCallable:
    async def __call__(self, message: Any, ctx: Any) -> None: ...


class PlainCallable:
    def __call__(self, message: Any, ctx: Any) -> None: ...


class Methods:
    def handle(self, message: Any, ctx: Any) -> None: ...

    async def handle_async(self, message: Any, ctx: Any) -> None: ...


class Order(Event, event_type="test-handlers.order"):
    order_id: str


ASYNC = [
    pytest.param(coroutine, id="async-def"),
    pytest.param(AsyncCallable(), id="async-__call__"),
    pytest.param(functools.partial(coroutine), id="partial-of-async-def"),
    pytest.param(functools.partial(AsyncCallable()), id="partial-of-async-__call__"),
    pytest.param(functools.partial(functools.partial(coroutine)), id="nested-partial"),
    pytest.param(Methods().handle_async, id="async-method"),
]
PLAIN = [
    pytest.param(plain, id="function"),
    pytest.param(PlainCallable(), id="__call__"),
    pytest.param(functools.partial(plain), id="partial"),
    pytest.param(Methods().handle, id="method"),
    pytest.param(lambda message, ctx: None, id="lambda"),
    pytest.param(lambda *args: None, id="varargs"),
    pytest.param(lambda message, ctx, extra=1: None, id="defaulted-extra"),
    pytest.param(functools.partial(lambda tag, message, ctx: None, "t"), id="partial-binding"),
]


@pytest.mark.parametrize("handler", ASYNC)
def test_async_handlers_are_recognised(handler: Any) -> None:
    assert is_async_handler(handler)


@pytest.mark.parametrize("handler", PLAIN)
def test_plain_handlers_are_not_async(handler: Any) -> None:
    assert not is_async_handler(handler)


def test_a_class_is_not_an_async_handler_whatever_its_call() -> None:
    # Calling the class makes an instance; it does not return a coroutine.
    assert not is_async_handler(AsyncCallable)


@pytest.mark.parametrize("handler", ASYNC)
def test_the_blocking_runtime_refuses_async_handlers(handler: Any) -> None:
    with pytest.raises(TypeError) as info:
        check_handler(handler, runtime="sync", role=ROLE)
    text = str(info.value)
    assert text.startswith(f"{ROLE}: ")
    assert "async def" in text and "never be awaited" in text
    assert "mqkit.AsyncClient" in text and "plain function" in text


@pytest.mark.parametrize("handler", ASYNC + PLAIN)
def test_the_async_runtime_takes_async_and_plain_handlers(handler: Any) -> None:
    check_handler(handler, runtime="async", role=ROLE)


@pytest.mark.parametrize("handler", PLAIN)
def test_the_blocking_runtime_takes_plain_handlers(handler: Any) -> None:
    check_handler(handler, runtime="sync", role=ROLE)


@pytest.mark.parametrize("runtime", ["sync", "async"])
@pytest.mark.parametrize("handler", ["handle_order", 42, None, Order(order_id="1")])
def test_a_non_callable_is_refused(runtime: Any, handler: Any) -> None:
    with pytest.raises(TypeError) as info:
        check_handler(handler, runtime=runtime, role=ROLE)
    text = str(info.value)
    assert text.startswith(f"{ROLE}: the handler must be a function taking (message, ctx)")
    assert repr(handler) in text and type(handler).__name__ in text


@pytest.mark.parametrize("runtime", ["sync", "async"])
@pytest.mark.parametrize(
    ("handler", "name"),
    [
        (lambda: None, "<lambda>"),
        (lambda message: None, "<lambda>"),
        (lambda message, ctx, extra: None, "<lambda>"),
        (lambda message, ctx, *, flag: None, "<lambda>"),
        (functools.partial(plain, 1, 2), "plain"),
        (Methods.handle, "Methods.handle"),  # unbound: takes (self, message, ctx)
    ],
)
def test_a_callable_that_cannot_take_message_and_ctx_is_refused(
    runtime: Any, handler: Any, name: str
) -> None:
    with pytest.raises(TypeError) as info:
        check_handler(handler, runtime=runtime, role=ROLE)
    text = str(info.value)
    assert text.startswith(f"{ROLE}: the handler {name}(")
    assert "cannot be called as handler(message, ctx)" in text
    assert "two positional parameters" in text


def test_the_signature_is_named_in_the_message() -> None:
    def charge(order):  # type: ignore[no-untyped-def]
        ...

    with pytest.raises(TypeError, match=r"the handler .*charge\(order\) cannot be called"):
        check_handler(charge, runtime="sync", role=ROLE)


@pytest.mark.parametrize("runtime", ["sync", "async"])
@pytest.mark.parametrize("handler", [generator, async_generator], ids=["sync", "async"])
def test_generator_functions_are_refused(runtime: Any, handler: Any) -> None:
    with pytest.raises(TypeError, match="is a generator function"):
        check_handler(handler, runtime=runtime, role=ROLE)


@pytest.mark.parametrize("runtime", ["sync", "async"])
def test_a_callable_without_an_inspectable_signature_is_accepted(runtime: Any) -> None:
    class Opaque:
        """A callable whose signature inspect cannot read (as some C callables)."""

        def __call__(self, *args: Any) -> None: ...

        @property
        def __signature__(self) -> Any:
            raise ValueError("no signature")

    check_handler(Opaque(), runtime=runtime, role=ROLE)
    with pytest.raises(ValueError):
        inspect.signature(max)  # a builtin Python cannot read the signature of
    check_handler(max, runtime=runtime, role=ROLE)


def test_roles_name_the_queue_or_the_subscription() -> None:
    assert role("consumer", "orders") == "consumer of queue 'orders'"
    assert role("consumer", Queue("orders")) == "consumer of queue 'orders'"
    assert role("responder", "rates") == "responder on queue 'rates'"
    assert role("subscription", Order) == "subscription to 'test-handlers.order'"
    assert role("subscription", "orders.*") == "subscription to 'orders.*'"
