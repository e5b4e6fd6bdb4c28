"""Whether a handler can run: checked when it is registered, not when a message arrives.

``consumer()``, ``responder()`` and ``bus.subscribe()`` of both clients call
:func:`check_handler` first, so a handler that could never run raises ``TypeError`` at once
instead of failing on every delivery until its messages are dead-lettered, or (an
``async def`` on the blocking client) being called, never awaited, and its messages acked.

What each runtime runs:

- :class:`~mqkit.Client`: plain functions (and other callables), on the consumer's worker
  threads. An ``async def`` handler is refused: use :class:`~mqkit.AsyncClient`.
- :class:`~mqkit.AsyncClient`: ``async def`` functions (an object with an ``async def
  __call__``, a ``functools.partial`` of either) are awaited on the event loop. A plain
  function is accepted too and runs in a worker thread, so a blocking call in it (a database
  driver, ``time.sleep``) never freezes the loop; it must not use the loop itself.

Both refuse what is not callable, a generator function (its body would never run), and a
callable whose signature cannot take ``(message, ctx)``. A callable whose signature cannot be
inspected (some builtins and C extensions) is accepted.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Literal

from mqkit import explain
from mqkit.messages import Event
from mqkit.topology import Queue

__all__ = ["check_handler", "is_async_handler", "role"]


def _target(handler: object) -> object:
    """What calling ``handler`` runs: a partial's function (however deeply nested)."""
    while isinstance(handler, functools.partial):
        handler = handler.func
    return handler


def _is(test: Callable[[object], bool], handler: object) -> bool:
    """Whether ``handler`` (or, for an object that is not a function, its ``__call__``)
    passes ``test``, e.g. :func:`inspect.iscoroutinefunction`."""
    target = _target(handler)
    if inspect.isclass(target):  # calling a class makes an instance, whatever __call__ is
        return False
    if test(target):
        return True
    if inspect.isroutine(target):
        return False
    call = getattr(target, "__call__", None)  # noqa: B004 - an object with a __call__ method
    return call is not None and test(call)


def is_async_handler(handler: object) -> bool:
    """Whether calling ``handler`` returns a coroutine to await: an ``async def`` function,
    an object whose ``__call__`` is one, or a ``functools.partial`` of either."""
    return _is(inspect.iscoroutinefunction, handler)


def _name(handler: object) -> str:
    target = _target(handler)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if isinstance(name, str) and not inspect.isclass(target):
        return name
    return type(target).__name__ if not inspect.isclass(target) else target.__name__


def role(kind: Literal["consumer", "responder", "subscription"], target: object) -> str:
    """What a handler is for, in words that start :func:`check_handler`'s messages:
    "consumer of queue 'orders'", "responder on queue 'rates'", "subscription to
    'orders.placed'" (``target``: a queue or its name, an event class or a pattern)."""
    if isinstance(target, Queue):
        target = target.name
    elif isinstance(target, type) and issubclass(target, Event):
        target = target.event_type
    if kind == "consumer":
        return f"consumer of queue {target!r}"
    if kind == "responder":
        return f"responder on queue {target!r}"
    return f"subscription to {target!r}"


def check_handler(handler: object, *, runtime: Literal["sync", "async"], role: str) -> None:
    """Raise ``TypeError`` unless ``runtime`` can run ``handler(message, ctx)``.

    ``role`` says what the handler is for, and starts the message: "consumer of queue
    'orders'", "responder on queue 'rates'", "subscription to 'orders.placed'".

    ```python
    async def handle(message, ctx): ...
    check_handler(handle, runtime="sync", role="consumer of queue 'q'")   # TypeError
    check_handler(handle, runtime="async", role="consumer of queue 'q'")  # fine
    ```
    """
    if not callable(handler):
        raise explain.handler_not_callable(role, handler)
    name = _name(handler)
    if _is(inspect.isgeneratorfunction, handler) or _is(inspect.isasyncgenfunction, handler):
        raise explain.handler_is_generator(role, name)
    if runtime == "sync" and is_async_handler(handler):
        raise explain.handler_is_async(role, name)
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):  # a builtin or C callable without one: give it a chance
        return
    try:
        signature.bind(None, None)
    except TypeError as exc:
        raise explain.handler_signature(role, name, str(signature), str(exc)) from None
