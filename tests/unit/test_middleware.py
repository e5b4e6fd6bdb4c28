"""The middleware interface and its chains, without a broker: order, pass-through, headers,
outcomes, and the checks a client makes when it is given its middlewares."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

import mqkit
from mqkit import lifecycle as lc
from mqkit.context import Context
from mqkit.errors import PublishUnroutable
from mqkit.messages import encode
from mqkit.middleware import (
    Middleware,
    MiddlewareStack,
    Outgoing,
    run_handle_chain,
    run_handle_chain_async,
    run_publish_chain,
    run_publish_chain_async,
)


class Order(BaseModel):
    order_id: str


def outgoing(n: int = 1, exchange: str = "", key: str = "orders") -> list[Outgoing]:
    return [
        Outgoing(encode(Order(order_id=str(i)), service="shop"), exchange, key) for i in range(n)
    ]


CTX = Context(message_id="m-1", correlation_id=None, queue="orders", headers={})


class Recorder(Middleware):
    """Records where it runs, and tags messages with its name."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def publish(self, messages, call_next):
        self.log.append(f"{self.name}>")
        for message in messages:
            message.headers.setdefault("x-path", []).append(self.name)
        ids = call_next(messages)
        self.log.append(f"<{self.name}")
        return ids

    async def publish_async(self, messages, call_next):
        self.log.append(f"{self.name}>")
        for message in messages:
            message.headers.setdefault("x-path", []).append(self.name)
        ids = await call_next(messages)
        self.log.append(f"<{self.name}")
        return ids

    def handle(self, message, ctx, call_next):
        self.log.append(f"{self.name}>")
        result = call_next(message, ctx)
        self.log.append(f"<{self.name}")
        return result

    async def handle_async(self, message, ctx, call_next):
        self.log.append(f"{self.name}>")
        result = await call_next(message, ctx)
        self.log.append(f"<{self.name}")
        return result


def test_publish_chain_runs_the_first_middleware_outermost_and_sends_what_they_added():
    log: list[str] = []
    sent: list[list[Outgoing]] = []

    def send(messages: list[Outgoing]) -> list[str]:
        log.append("send")
        sent.append(messages)
        return [m.message_id for m in messages]

    messages = outgoing(2)
    ids = run_publish_chain([Recorder("a", log), Recorder("b", log)], messages, send)
    assert log == ["a>", "b>", "send", "<b", "<a"]
    assert ids == [m.message_id for m in messages]
    assert [m.headers["x-path"] for m in sent[0]] == [["a", "b"], ["a", "b"]]


async def test_async_publish_chain_runs_in_the_same_order():
    log: list[str] = []

    async def send(messages: list[Outgoing]) -> list[str]:
        log.append("send")
        return [m.message_id for m in messages]

    messages = outgoing(1)
    ids = await run_publish_chain_async([Recorder("a", log), Recorder("b", log)], messages, send)
    assert log == ["a>", "b>", "send", "<b", "<a"]
    assert ids == [messages[0].message_id]
    assert messages[0].headers["x-path"] == ["a", "b"]


def test_handle_chain_wraps_the_handler_first_middleware_outermost():
    log: list[str] = []

    def handler(message: Any, ctx: Context) -> str:
        log.append(f"handler {message} {ctx.message_id}")
        return "reply"

    result = run_handle_chain([Recorder("a", log), Recorder("b", log)], handler, "hi", CTX)
    assert result == "reply"
    assert log == ["a>", "b>", "handler hi m-1", "<b", "<a"]


async def test_async_handle_chain_wraps_the_handler():
    log: list[str] = []

    async def handler(message: Any, ctx: Context) -> str:
        log.append("handler")
        return "reply"

    chain = [Recorder("a", log), Recorder("b", log)]
    assert await run_handle_chain_async(chain, handler, "hi", CTX) == "reply"
    assert log == ["a>", "b>", "handler", "<b", "<a"]


def test_the_base_class_passes_everything_through_on_both_runtimes():
    plain = Middleware()
    messages = outgoing(1)
    assert run_publish_chain([plain], messages, lambda ms: ["id"]) == ["id"]
    assert run_handle_chain([plain], lambda m, c: m * 2, 21, CTX) == 42

    async def both() -> None:
        async def send(ms: list[Outgoing]) -> list[str]:
            return ["id"]

        async def handler(m: int, c: Context) -> int:
            return m * 2

        assert await run_publish_chain_async([plain], messages, send) == ["id"]
        assert await run_handle_chain_async([plain], handler, 21, CTX) == 42

    asyncio.run(both())
    plain.on_event(lc.LinkLost("amqp://x", "reset"))  # observes nothing, raises nothing


class Forgiving(Middleware):
    """Turns a KeyError into an ack, and any other failure into a Reject."""

    def handle(self, message, ctx, call_next):
        try:
            return call_next(message, ctx)
        except KeyError:
            return None
        except Exception as exc:
            raise mqkit.Reject(f"refused: {exc}") from exc


def test_a_handle_hook_can_turn_an_exception_into_another_outcome():
    def missing(message: Any, ctx: Context) -> None:
        raise KeyError("card")

    def broken(message: Any, ctx: Context) -> None:
        raise ValueError("bad amount")

    assert run_handle_chain([Forgiving()], missing, None, CTX) is None
    with pytest.raises(mqkit.Reject, match="refused: bad amount"):
        run_handle_chain([Forgiving()], broken, None, CTX)


def test_a_publish_hook_sees_the_publish_error_and_which_messages_it_names():
    seen: list[BaseException] = []

    class Watch(Middleware):
        def publish(self, messages, call_next):
            try:
                return call_next(messages)
            except mqkit.PublishError as exc:
                seen.append(exc)
                raise

    messages = outgoing(2)

    def send(ms: list[Outgoing]) -> list[str]:
        raise PublishUnroutable("no route", unconfirmed=[ms[1].message_id])

    with pytest.raises(PublishUnroutable):
        run_publish_chain([Watch()], messages, send)
    assert isinstance(seen[0], PublishUnroutable)
    assert seen[0].unconfirmed == [messages[1].message_id]


def test_a_publish_hook_may_pass_on_changed_messages():
    class Urgent(Middleware):
        def publish(self, messages, call_next):
            return call_next([m.replace(priority=9) for m in messages])

    sent: list[Outgoing] = []

    def send(ms: list[Outgoing]) -> list[str]:
        sent.extend(ms)
        return [m.message_id for m in ms]

    run_publish_chain([Urgent()], outgoing(1), send)
    assert sent[0].envelope.priority == 9


def test_outgoing_shows_the_message_and_keeps_its_id_and_destination():
    [message] = outgoing(1, exchange="shop", key="orders.placed")
    assert message.exchange == "shop" and message.routing_key == "orders.placed"
    assert message.event_type == "Order" and message.correlation_id is None
    assert message.headers is message.envelope.headers
    with pytest.raises(ValueError, match="cannot change message_id"):
        message.replace(message_id="other")
    assert message.replace(message_id=message.message_id).message_id == message.message_id


def test_a_publish_hook_that_forgets_to_return_the_ids_is_named():
    class Forgetful(Middleware):
        def publish(self, messages, call_next):
            call_next(messages)  # no return

    with pytest.raises(TypeError, match=r"Forgetful: publish hook returned None.*call_next"):
        run_publish_chain([Forgetful()], outgoing(1), lambda ms: ["id"])


# -- what a client accepts --------------------------------------------------------------------


class SyncOnly(Middleware):
    def handle(self, message, ctx, call_next):
        return call_next(message, ctx)


class AsyncOnly(Middleware):
    async def publish_async(self, messages, call_next):
        return await call_next(messages)


class Watcher(Middleware):
    def __init__(self) -> None:
        self.events: list[lc.LifecycleEvent] = []

    def on_event(self, event):
        self.events.append(event)


def test_the_stack_keeps_only_the_middlewares_that_take_part_in_each_chain():
    watcher, sync_only = Watcher(), SyncOnly()
    stack = MiddlewareStack([watcher, sync_only], runtime="sync")
    assert stack.middlewares == (watcher, sync_only)
    assert stack.observers == (watcher,)
    assert stack.wraps_handling and not stack.wraps_publishing
    assert bool(stack) and not MiddlewareStack(None, runtime="sync")
    assert repr(stack) == "MiddlewareStack([Watcher, SyncOnly])"
    # observers go after mqkit's own logging in the client's pipeline
    pipeline = lc.Pipeline([lc.LogObserver(), *stack.observers])
    pipeline.emit(lc.LinkRestored("amqp://x", reconnects=1))
    assert [e.name for e in watcher.events] == ["link_restored"]


def test_a_stack_without_hooks_calls_straight_through():
    stack = MiddlewareStack([Watcher()], runtime="sync")
    assert stack.publish(outgoing(1), lambda ms: ["id"]) == ["id"]
    assert stack.handle(lambda m, c: m, "x", CTX) == "x"


async def test_an_async_stack_runs_its_chains():
    log: list[str] = []
    stack = MiddlewareStack([Recorder("a", log)], runtime="async")

    async def send(ms: list[Outgoing]) -> list[str]:
        return ["id"]

    async def handler(m: Any, c: Context) -> Any:
        return m

    assert await stack.publish_async(outgoing(1), send) == ["id"]
    assert await stack.handle_async(handler, "x", CTX) == "x"
    assert log == ["a>", "<a", "a>", "<a"]
    empty = MiddlewareStack([], runtime="async")
    assert await empty.publish_async(outgoing(1), send) == ["id"]
    assert await empty.handle_async(handler, "y", CTX) == "y"


def test_asyncclient_refuses_a_middleware_with_only_clients_hooks():
    with pytest.raises(
        TypeError, match=r"SyncOnly defines handle\(\).*define `async def handle_async"
    ):
        MiddlewareStack([SyncOnly()], runtime="async")


def test_client_refuses_a_middleware_with_only_asyncclients_hooks():
    with pytest.raises(TypeError, match=r"AsyncOnly defines publish_async\(\).*plain `def publish"):
        MiddlewareStack([AsyncOnly()], runtime="sync")


def test_a_middleware_with_both_pairs_serves_both_clients():
    log: list[str] = []
    MiddlewareStack([Recorder("a", log)], runtime="sync")
    MiddlewareStack([Recorder("a", log)], runtime="async")


def test_hooks_of_the_wrong_kind_are_refused_with_what_to_do():
    class AsyncPublish(Middleware):
        async def publish(self, messages, call_next):  # type: ignore[override]
            return call_next(messages)

    class PlainHandleAsync(Middleware):
        def handle_async(self, message, ctx, call_next):  # type: ignore[override]
            return call_next(message, ctx)

    class AsyncObserver(Middleware):
        async def on_event(self, event):  # type: ignore[override]
            pass

    with pytest.raises(TypeError, match=r"publish\(\) is an async def function.*publish_async"):
        MiddlewareStack([AsyncPublish()], runtime="async")
    with pytest.raises(TypeError, match=r"handle_async\(\) is a plain function.*async def"):
        MiddlewareStack([PlainHandleAsync()], runtime="async")
    with pytest.raises(TypeError, match="on_event is an async def function"):
        MiddlewareStack([AsyncObserver()], runtime="sync")


@pytest.mark.parametrize("bad", [object(), "logging", lambda m, c, n: n(m, c)])
def test_something_that_is_not_a_middleware_is_refused(bad):
    with pytest.raises(TypeError, match=r"Client\(middleware=...\) takes mqkit.Middleware"):
        MiddlewareStack([bad], runtime="sync")


def test_a_single_middleware_instead_of_a_list_is_refused():
    with pytest.raises(TypeError, match=r"AsyncClient\(middleware=...\) takes a list.*\[\.\.\.\]"):
        MiddlewareStack(Watcher(), runtime="async")  # type: ignore[arg-type]


def test_middleware_is_exported_at_the_top():
    assert mqkit.Middleware is Middleware and mqkit.Outgoing is Outgoing


# -- what the shells call --------------------------------------------------------------------


def test_publish_prepared_builds_nothing_without_publish_hooks():
    prepared = [(encode(Order(order_id="1"), service="shop"), "orders")]
    seen: list[object] = []

    def send(pairs):
        seen.append(pairs)
        return [envelope.message_id for envelope, _ in pairs]

    stack = MiddlewareStack([Watcher()], runtime="sync")
    assert stack.publish_prepared("", prepared, send) == [prepared[0][0].message_id]
    assert seen == [prepared]  # the very list: no Outgoing made


def test_publish_prepared_sends_what_the_hooks_passed_on():
    log: list[str] = []
    prepared = [(encode(Order(order_id=str(n)), service="shop"), f"key{n}") for n in range(2)]
    sent: list[list[tuple[object, str]]] = []

    def send(pairs):
        sent.append(list(pairs))
        return [envelope.message_id for envelope, _ in pairs]

    stack = MiddlewareStack([Recorder("a", log)], runtime="sync")
    stack.publish_prepared("shop", prepared, send)
    assert [key for _, key in sent[0]] == ["key0", "key1"]
    assert all(envelope.headers["x-path"] == ["a"] for envelope, _ in sent[0])


async def test_async_publish_prepared_and_wrap():
    log: list[str] = []
    stack = MiddlewareStack([Recorder("a", log), Recorder("b", log)], runtime="async")
    prepared = [(encode(Order(order_id="1"), service="shop"), "orders")]

    async def send(pairs):
        log.append("send")
        return [envelope.message_id for envelope, _ in pairs]

    await stack.publish_prepared_async("", prepared, send)

    async def handler(message, ctx):
        log.append("handler")
        return message

    assert await stack.wrap_async(handler)("m", CTX) == "m"
    assert log == ["a>", "b>", "send", "<b", "<a", "a>", "b>", "handler", "<b", "<a"]
    empty = MiddlewareStack((), runtime="async")
    assert empty.wrap_async(handler) is handler
    assert await empty.publish_prepared_async("", prepared, send) == [prepared[0][0].message_id]


def test_wrap_puts_the_chain_together_once_and_is_the_handler_without_hooks():
    log: list[str] = []

    def handler(message, ctx):
        log.append("handler")
        return message

    assert MiddlewareStack((), runtime="sync").wrap(handler) is handler
    wrapped = MiddlewareStack([Recorder("a", log)], runtime="sync").wrap(handler)
    assert wrapped("x", CTX) == "x" and wrapped("y", CTX) == "y"
    assert log == ["a>", "handler", "<a", "a>", "handler", "<a"]


def test_the_scope_stamps_a_copy_with_what_middleware_asked():
    from mqkit.correlation import handling

    copy = encode(Order(order_id="1"), service="shop", headers={"x-old": "1"})
    scope = handling(CTX)
    scope.stamp(copy.headers)
    assert copy.headers == {"x-old": "1"}
    scope.copy_headers["x-first"] = "00-abc"
    scope.stamp(copy.headers)
    assert copy.headers == {"x-old": "1", "x-first": "00-abc"}
