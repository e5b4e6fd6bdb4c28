"""Correlation across messages: what a handler's publishes inherit from the delivery it handles.

While a handler runs, the delivery it handles is the current :class:`Handling` (a context
variable, so it follows the handler's thread or task, and tasks it creates). A message
published from inside the handler, on either runtime, by a producer, the event bus or
``request()``:

- gets the incoming message's correlation id (its message id when it has none), unless the
  publish names its own ``correlation_id=``;
- carries the incoming message's id in the ``x-mqkit-causation-id`` header, unless the
  publish sets that header itself.

:func:`mqkit.messages.encode` applies these defaults (:func:`inherit`), so both clients get
them without code of their own; the shells only enter :func:`handling` around each delivery::

    scope = handling(ctx, service="billing")
    with scope:
        result = run_the_handler(message, ctx)   # publishes inside inherit the correlation
    copy = follow_up(...)
    if copy is not None:
        scope.stamp(copy.envelope.headers)  # what middleware asked a retry copy to carry

A thread the handler starts itself does not inherit the context (``contextvars`` never flows
into a new ``threading.Thread``); run it with ``contextvars.copy_context().run(...)``.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mqkit.context import Context

__all__ = ["CAUSATION_ID", "Handling", "current", "handling", "inherit"]

# The header that names the message whose handler published this one.
CAUSATION_ID = "x-mqkit-causation-id"


@dataclass(slots=True)
class Handling:
    """The delivery a handler is handling, as the messages it publishes see it; a context
    manager that makes it the current one (:func:`handling` makes one).

    ``correlation_id`` is what they inherit: the delivery's correlation id, else its message
    id. ``copy_headers`` are headers a retry or dead-letter copy of the delivery gains beyond
    mqkit's own (middleware fills them while the handler runs: the tracing middleware keeps
    the first attempt's span there, so later attempts can link to it); the scope stays
    readable after the block, for the shell that publishes the copy.
    """

    message_id: str | None
    correlation_id: str | None
    queue: str = ""
    service: str = ""
    attempt: int = 1
    copy_headers: dict[str, Any] = field(default_factory=dict)
    _tokens: list[Token[Handling | None]] = field(default_factory=list, repr=False)

    def __enter__(self) -> Handling:
        self._tokens.append(_current.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._tokens.pop())

    def stamp(self, headers: dict[str, Any]) -> None:
        """Add :attr:`copy_headers` to the headers of a retry or dead-letter copy of the
        delivery (in place: the copy is the shell's own, made by
        :func:`mqkit.delivery.follow_up`)."""
        if self.copy_headers:
            headers.update(self.copy_headers)


_current: ContextVar[Handling | None] = ContextVar("mqkit_handling", default=None)


def current() -> Handling | None:
    """The delivery being handled in this thread or task, or ``None`` outside a handler."""
    return _current.get()


def handling(ctx: Context, *, service: str = "") -> Handling:
    """The :class:`Handling` of ``ctx``'s delivery: ``with handling(ctx) as scope:`` makes it
    the current one while the block runs (the shells wrap each handler call in it; one scope
    may be entered again, e.g. for the handler and then for a responder's reply)."""
    return Handling(
        message_id=ctx.message_id,
        correlation_id=ctx.correlation_id or ctx.message_id,
        queue=ctx.queue,
        service=service,
        attempt=ctx.attempt,
    )


def inherit(correlation_id: str | None, headers: dict[str, Any]) -> str | None:
    """The correlation id of a message built now, with ``x-mqkit-causation-id`` added to
    ``headers`` (in place) when a handler is running: ``correlation_id`` if given, else the
    handled delivery's. Outside a handler: ``correlation_id`` as it is."""
    scope = _current.get()
    if scope is None:
        return correlation_id
    if scope.message_id is not None and CAUSATION_ID not in headers:
        headers[CAUSATION_ID] = scope.message_id
    return correlation_id if correlation_id is not None else scope.correlation_id
