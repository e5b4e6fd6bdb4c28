"""Middleware: code of your own around publishing and handling, on both clients.

``Client(..., middleware=[...])`` and ``AsyncClient(..., middleware=[...])`` take a sequence
of :class:`Middleware` objects. Each may override any of its hooks; the others pass through:

- around **publishing** (``publish`` on ``Client``, ``async def publish_async`` on
  ``AsyncClient``): sees each call's messages (:class:`Outgoing`: the envelope with its
  properties and headers, the exchange and the routing key) before they are sent, may add
  headers, and gets the message ids once the broker confirmed them, or the
  :class:`~mqkit.PublishError` saying which it did not;
- around **handling** (``handle`` / ``async def handle_async``): wraps the handler, so it can
  time it, set a context, or turn an exception into another outcome (return normally: acked;
  raise :class:`~mqkit.Reject`: dead-lettered now; raise :class:`~mqkit.Retry`: retried);
- **observing** the lifecycle events the core reports (``on_event``, a plain function on both
  clients: :mod:`mqkit.lifecycle`), after mqkit's own logging.

The first middleware in the list is the outermost: it sees a publish first and its handle
hook wraps all the others. mqkit's own metrics and tracing
(:mod:`mqkit.observability`) are middlewares built on these same hooks.

```python
import time
import mqkit

class Timing(mqkit.Middleware):
    '''Tag every outgoing message with this service's tenant; time handlers.'''

    def publish(self, messages, call_next):
        for message in messages:
            message.headers["x-tenant"] = "acme"
        return call_next(messages)

    def handle(self, message, ctx, call_next):
        started = time.perf_counter()
        try:
            return call_next(message, ctx)
        finally:
            print(ctx.queue, ctx.message_id, time.perf_counter() - started)

client = mqkit.Client(service="billing", middleware=[Timing()])
```

On ``AsyncClient`` the same middleware defines ``async def publish_async`` and
``async def handle_async`` (same arguments, ``await call_next(...)``). One class may define
both pairs and serve both clients (mqkit's own do); a client refuses, with ``TypeError``, a
middleware that defines only the other client's hooks, so none is silently skipped.

What passes through the publish hooks: every message the application publishes (producers,
the event bus, ``request()``) and a responder's reply (published inside the responder's
handle chain). Retry and dead-letter copies and replays are copies of a message that passed
through already, with its headers: they do not pass again.

The shells run the chains with :class:`MiddlewareStack` (one per client):
:meth:`MiddlewareStack.publish_prepared` around each publish call,
:meth:`MiddlewareStack.wrap` around each consumer's handler (``publish_prepared_async`` and
``wrap_async`` on ``AsyncClient``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mqkit import explain
from mqkit.context import Context
from mqkit.lifecycle import LifecycleEvent
from mqkit.messages import Envelope

__all__ = [
    "NO_MIDDLEWARE",
    "AsyncHandleNext",
    "AsyncPublishNext",
    "HandleNext",
    "Middleware",
    "MiddlewareStack",
    "Outgoing",
    "PublishNext",
    "run_handle_chain",
    "run_handle_chain_async",
    "run_publish_chain",
    "run_publish_chain_async",
]

Runtime = Literal["sync", "async"]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message about to be published, as a publish hook sees it.

    ``headers`` is this message's own header table: add to it in place
    (``message.headers["x-tenant"] = "acme"``). To change a property, pass
    ``message.replace(priority=5)`` on to ``call_next`` instead of ``message``. The exchange
    and routing key are fixed: a middleware cannot re-route a message.
    """

    envelope: Envelope
    exchange: str
    routing_key: str

    @property
    def headers(self) -> dict[str, Any]:
        """The message's headers (mutable: what is in them when the chain ends is sent)."""
        return self.envelope.headers

    @property
    def message_id(self) -> str:
        return self.envelope.message_id

    @property
    def correlation_id(self) -> str | None:
        return self.envelope.correlation_id

    @property
    def event_type(self) -> str:
        """The AMQP ``type`` property: the event type, or the model's class name."""
        return self.envelope.type

    def replace(self, **changes: Any) -> Outgoing:
        """This message with some of its envelope's fields changed (``priority=``,
        ``correlation_id=``, ``headers=``, ...); ``message_id`` cannot change (the caller
        gets the id it was given)."""
        if "message_id" in changes and changes["message_id"] != self.envelope.message_id:
            raise ValueError(
                "a publish middleware cannot change message_id: the caller already holds it "
                "(publish(..., message_id=...) sets it)"
            )
        return Outgoing(
            dataclasses.replace(self.envelope, **changes), self.exchange, self.routing_key
        )


PublishNext = Callable[[list[Outgoing]], list[str]]
AsyncPublishNext = Callable[[list[Outgoing]], Awaitable[list[str]]]
HandleNext = Callable[[Any, Context], Any]
AsyncHandleNext = Callable[[Any, Context], Awaitable[Any]]
# What a shell's publish does with (envelope, routing key) pairs to one exchange: their ids.
PreparedSend = Callable[[Sequence[tuple[Envelope, str]]], list[str]]
AsyncPreparedSend = Callable[[Sequence[tuple[Envelope, str]]], Awaitable[list[str]]]


class Middleware:
    """Base of every middleware: override the hooks you need; the others pass through.

    ``publish`` / ``handle`` run on :class:`~mqkit.Client` (plain functions, on the thread
    that publishes or handles); ``publish_async`` / ``handle_async`` on
    :class:`~mqkit.AsyncClient` (coroutines, on the event loop); ``on_event`` on both (a plain
    function: it must be quick and must not block, and an exception it raises is logged and
    ignored). See the module's docstring for an example.
    """

    def publish(self, messages: list[Outgoing], call_next: PublishNext) -> list[str]:
        """Around one publish call (``publish`` or ``publish_many``) on ``Client``: return
        ``call_next(messages)``, the confirmed message ids in order (it raises the
        :class:`~mqkit.PublishError` the publish raises)."""
        return call_next(messages)

    async def publish_async(
        self, messages: list[Outgoing], call_next: AsyncPublishNext
    ) -> list[str]:
        """``publish`` for ``AsyncClient``: ``return await call_next(messages)``."""
        return await call_next(messages)

    def handle(self, message: Any, ctx: Context, call_next: HandleNext) -> Any:
        """Around one handler call on ``Client``: return ``call_next(message, ctx)`` (the
        handler's result: a responder's reply) or raise."""
        return call_next(message, ctx)

    async def handle_async(self, message: Any, ctx: Context, call_next: AsyncHandleNext) -> Any:
        """``handle`` for ``AsyncClient``: ``return await call_next(message, ctx)``."""
        return await call_next(message, ctx)

    def on_event(self, event: LifecycleEvent) -> None:
        """One lifecycle event (:mod:`mqkit.lifecycle`) of the client, on both clients."""


_SYNC_HOOKS = ("publish", "handle")
_ASYNC_HOOKS = ("publish_async", "handle_async")


def _overrides(middleware: Middleware, hook: str) -> bool:
    return getattr(type(middleware), hook, None) is not getattr(Middleware, hook)


def _name(middleware: object) -> str:
    return type(middleware).__name__


def _check(middleware: object, runtime: Runtime, client: str) -> Middleware:
    """``middleware`` if ``client`` (of ``runtime``) can run every hook it overrides."""
    if not isinstance(middleware, Middleware):
        raise explain.middleware_not_middleware(middleware, client)
    name = _name(middleware)
    for hook in (*_SYNC_HOOKS, "on_event"):
        if _overrides(middleware, hook) and inspect.iscoroutinefunction(getattr(middleware, hook)):
            raise explain.middleware_coroutine_hook(name, hook)
    for hook in _ASYNC_HOOKS:
        if _overrides(middleware, hook) and not inspect.iscoroutinefunction(
            getattr(middleware, hook)
        ):
            raise explain.middleware_plain_async_hook(name, hook)
    mine, theirs = (_SYNC_HOOKS, _ASYNC_HOOKS) if runtime == "sync" else (_ASYNC_HOOKS, _SYNC_HOOKS)
    for own, other in zip(mine, theirs, strict=True):
        if _overrides(middleware, other) and not _overrides(middleware, own):
            raise explain.middleware_runtime(name, other, client)
    return middleware


def _ids(middleware: Middleware, result: object, count: int) -> list[str]:
    if type(result) is not list or len(result) != count:
        raise explain.middleware_publish_result(_name(middleware), result, count)
    return result


# -- the chains ----------------------------------------------------------------------------
#
# Each runs the middlewares in order (the first is the outermost) around the innermost step:
# the function that sends, or the handler. They are plain functions of their arguments, so
# the two clients run the same chain and a test can run it without a broker.


def run_publish_chain(
    middlewares: Sequence[Middleware], messages: list[Outgoing], send: PublishNext
) -> list[str]:
    """Run ``middlewares``' ``publish`` hooks around ``send(messages)`` (``Client``)."""
    call_next = send
    for middleware in reversed(middlewares):
        call_next = _publish_step(middleware, call_next, len(messages))
    return call_next(messages)


def _publish_step(middleware: Middleware, call_next: PublishNext, count: int) -> PublishNext:
    hook = middleware.publish

    def step(batch: list[Outgoing]) -> list[str]:
        return _ids(middleware, hook(batch, call_next), count)

    return step


async def run_publish_chain_async(
    middlewares: Sequence[Middleware], messages: list[Outgoing], send: AsyncPublishNext
) -> list[str]:
    """Run ``middlewares``' ``publish_async`` hooks around ``await send(messages)``
    (``AsyncClient``)."""
    count = len(messages)

    async def step(index: int, batch: list[Outgoing]) -> list[str]:
        if index == len(middlewares):
            return await send(batch)
        middleware = middlewares[index]
        result = await middleware.publish_async(batch, lambda b: step(index + 1, b))
        return _ids(middleware, result, count)

    return await step(0, messages)


def run_handle_chain(
    middlewares: Sequence[Middleware], handler: HandleNext, message: Any, ctx: Context
) -> Any:
    """Run ``middlewares``' ``handle`` hooks around ``handler(message, ctx)`` (``Client``)."""

    def step(index: int, message: Any, ctx: Context) -> Any:
        if index == len(middlewares):
            return handler(message, ctx)
        return middlewares[index].handle(message, ctx, lambda m, c: step(index + 1, m, c))

    return step(0, message, ctx)


async def run_handle_chain_async(
    middlewares: Sequence[Middleware], handler: AsyncHandleNext, message: Any, ctx: Context
) -> Any:
    """Run ``middlewares``' ``handle_async`` hooks around ``await handler(message, ctx)``
    (``AsyncClient``)."""

    async def step(index: int, message: Any, ctx: Context) -> Any:
        if index == len(middlewares):
            return await handler(message, ctx)
        return await middlewares[index].handle_async(
            message, ctx, lambda m, c: step(index + 1, m, c)
        )

    return await step(0, message, ctx)


class MiddlewareStack:
    """A client's middlewares, checked once for its runtime, and the chains its parts run.

    Only the middlewares that override a hook take part in its chain, so a client without
    middleware (or with observers only) publishes and handles at no cost beyond one test.

    ```python
    stack = MiddlewareStack([Timing()], runtime="sync", client="Client")
    ids = stack.publish(outgoing, send)            # the producer, the bus, request()
    result = stack.handle(handler, message, ctx)   # a consumer, per delivery
    pipeline = Pipeline([LogObserver(), *stack.observers])
    ```
    """

    __slots__ = ("_handlers", "_publishers", "middlewares", "observers")

    def __init__(
        self,
        middlewares: Sequence[Middleware] | None = (),
        *,
        runtime: Runtime,
        client: str | None = None,
    ) -> None:
        client = client or ("Client" if runtime == "sync" else "AsyncClient")
        if middlewares is None:
            middlewares = ()
        if isinstance(middlewares, (Middleware, str, bytes)) or not isinstance(
            middlewares, Sequence
        ):
            raise TypeError(
                f"{client}(middleware=...) takes a list of mqkit.Middleware objects, got "
                f"{middlewares!r}; pass middleware=[...]"
            )
        checked = tuple(_check(m, runtime, client) for m in middlewares)
        publish, handle = ("publish", "handle") if runtime == "sync" else _ASYNC_HOOKS
        self.middlewares: tuple[Middleware, ...] = checked
        self._publishers = tuple(m for m in checked if _overrides(m, publish))
        self._handlers = tuple(m for m in checked if _overrides(m, handle))
        self.observers: tuple[Middleware, ...] = tuple(
            m for m in checked if _overrides(m, "on_event")
        )

    def __bool__(self) -> bool:
        return bool(self.middlewares)

    def __repr__(self) -> str:
        return f"MiddlewareStack([{', '.join(_name(m) for m in self.middlewares)}])"

    @property
    def wraps_publishing(self) -> bool:
        return bool(self._publishers)

    @property
    def wraps_handling(self) -> bool:
        return bool(self._handlers)

    def publish(self, messages: list[Outgoing], send: PublishNext) -> list[str]:
        """``send(messages)`` through the publish hooks (``Client``)."""
        if not self._publishers:
            return send(messages)
        return run_publish_chain(self._publishers, messages, send)

    async def publish_async(self, messages: list[Outgoing], send: AsyncPublishNext) -> list[str]:
        """``await send(messages)`` through the ``publish_async`` hooks (``AsyncClient``)."""
        if not self._publishers:
            return await send(messages)
        return await run_publish_chain_async(self._publishers, messages, send)

    def publish_prepared(
        self, exchange: str, prepared: Sequence[tuple[Envelope, str]], send: PreparedSend
    ) -> list[str]:
        """``send(prepared)`` (``(envelope, routing key)`` pairs to ``exchange``, as
        :meth:`mqkit.publishing.PublishTarget.prepare` makes them) through the publish hooks:
        what the producers, the bus and ``request()`` of ``Client`` call. Without publish
        hooks nothing is built per message."""
        if not self._publishers:
            return send(prepared)
        messages = [Outgoing(envelope, exchange, key) for envelope, key in prepared]
        return run_publish_chain(self._publishers, messages, lambda ms: send(_pairs(ms)))

    async def publish_prepared_async(
        self, exchange: str, prepared: Sequence[tuple[Envelope, str]], send: AsyncPreparedSend
    ) -> list[str]:
        """:meth:`publish_prepared` for ``AsyncClient``."""
        if not self._publishers:
            return await send(prepared)
        messages = [Outgoing(envelope, exchange, key) for envelope, key in prepared]
        return await run_publish_chain_async(
            self._publishers, messages, lambda ms: send(_pairs(ms))
        )

    def wrap(self, handler: HandleNext) -> HandleNext:
        """``handler`` run through the handle hooks (``handler`` itself without any): what
        a consumer of ``Client`` calls per delivery. The chain is put together here, once,
        so a delivery costs one call per middleware."""
        wrapped = handler
        for middleware in reversed(self._handlers):
            wrapped = _bind(middleware, wrapped)
        return wrapped

    def wrap_async(self, handler: AsyncHandleNext) -> AsyncHandleNext:
        """:meth:`wrap` for ``AsyncClient`` (``handler`` is a coroutine function)."""
        wrapped = handler
        for middleware in reversed(self._handlers):
            wrapped = _bind_async(middleware, wrapped)
        return wrapped

    def handle(self, handler: HandleNext, message: Any, ctx: Context) -> Any:
        """``handler(message, ctx)`` through the handle hooks (``Client``)."""
        if not self._handlers:
            return handler(message, ctx)
        return run_handle_chain(self._handlers, handler, message, ctx)

    async def handle_async(self, handler: AsyncHandleNext, message: Any, ctx: Context) -> Any:
        """``await handler(message, ctx)`` through the ``handle_async`` hooks
        (``AsyncClient``)."""
        if not self._handlers:
            return await handler(message, ctx)
        return await run_handle_chain_async(self._handlers, handler, message, ctx)


def _bind(middleware: Middleware, call_next: HandleNext) -> HandleNext:
    hook = middleware.handle

    def handle(message: Any, ctx: Context) -> Any:
        return hook(message, ctx, call_next)

    return handle


def _bind_async(middleware: Middleware, call_next: AsyncHandleNext) -> AsyncHandleNext:
    hook = middleware.handle_async

    def handle(message: Any, ctx: Context) -> Awaitable[Any]:
        return hook(message, ctx, call_next)  # the hook's coroutine: no frame of our own

    return handle


def _pairs(messages: Sequence[Outgoing]) -> list[tuple[Envelope, str]]:
    return [(message.envelope, message.routing_key) for message in messages]


# The stack of a part made without one (a client always passes its own): no middleware.
NO_MIDDLEWARE = MiddlewareStack((), runtime="sync")
