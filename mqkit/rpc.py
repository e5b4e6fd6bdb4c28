"""Request/reply as plain decisions: the request envelope, the responder's reply, and what
a reply means to the caller. Both shells (``_sync/rpc.py``, ``_async/rpc.py``) do only the
I/O: publish the request over direct reply-to and wait, or run the responder's handler and
publish what :func:`answer` returns.

A reply that carries ``x-mqkit-error-type`` / ``x-mqkit-error-message`` says the responder
failed; the caller gets :class:`~mqkit.RemoteError`. Its body is a small JSON object with the
same two fields, for callers that are not mqkit.

A request's ``correlation_id`` is the conversation it belongs to (given, or inherited when
it is sent from inside a handler, :mod:`mqkit.correlation`), so several requests may share
one: a reply is matched to its request by the ``x-mqkit-request-id`` header mqkit's
responders set (the request's message id), and else by its correlation id (what any other
responder echoes; a request without a conversation carries its own message id there).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from mqkit.dead_letters import ERROR_MESSAGE, ERROR_TYPE
from mqkit.errors import ConnectionFailed, RemoteError, RequestTimeout
from mqkit.messages import Envelope, Incoming, decode, encode
from mqkit.retry import GiveUp

__all__ = [
    "CHANNEL_CLOSED",
    "CHANNEL_REPLACED",
    "ERROR_REPLY_TYPE",
    "LINK_LOST",
    "REPLY_TO",
    "REQUEST_ID",
    "Pending",
    "Reply",
    "answer",
    "read_reply",
    "reply_channel_gone",
    "reply_lost",
    "request_envelope",
    "request_timeout",
]

R = TypeVar("R", bound=BaseModel)
F = TypeVar("F")

REPLY_TO = "amq.rabbitmq.reply-to"
# Why a published request's reply can no longer arrive (reply_lost's cause):
LINK_LOST = "the connection was lost"
CHANNEL_REPLACED = "the publishing channel was replaced"  # mqkit closed it to open another
CHANNEL_CLOSED = "the broker closed the publishing channel"
ERROR_REPLY_TYPE = "mqkit.error"  # the AMQP ``type`` of an error reply
REQUEST_ID = "x-mqkit-request-id"  # a reply's header: the message id of its request


def request_envelope(
    message: object,
    *,
    service: str,
    correlation_id: str | None = None,
    headers: Mapping[str, Any] | None = None,
) -> Envelope:
    """The request to publish (``reply_to`` = direct reply-to); ``TypeError`` if ``message``
    is not a pydantic model. Its correlation id: ``correlation_id``, else the handled
    delivery's (inside a handler), else its own message id."""
    if not isinstance(message, BaseModel):
        raise TypeError(f"request expected a pydantic model, got {type(message).__name__}")
    envelope = encode(
        message,
        service=service,
        headers=headers,
        correlation_id=correlation_id,
        reply_to=REPLY_TO,
    )
    if envelope.correlation_id is None:
        envelope = dataclasses.replace(envelope, correlation_id=envelope.message_id)
    return envelope


class Pending(Generic[F]):
    """The requests of one requester waiting for their replies (``F``: what a reply
    completes, e.g. a future), by request message id; thread-safe.

    ```python
    pending: Pending[str] = Pending()
    pending.add(request, "waiter")
    assert pending.answered({REQUEST_ID: request.message_id}, "anything") == "waiter"
    pending.discard(request.message_id)
    ```
    """

    __slots__ = ("_by_correlation", "_by_id", "_lock", "_sent")

    def __init__(self) -> None:
        self._by_id: dict[str, F] = {}
        self._by_correlation: dict[str, list[str]] = {}
        self._sent: dict[str, object] = {}  # published: the reply channel they were sent for
        self._lock = threading.Lock()

    def add(self, request: Envelope, waiter: F) -> None:
        with self._lock:
            self._by_id[request.message_id] = waiter
            key = request.correlation_id or request.message_id
            self._by_correlation.setdefault(key, []).append(request.message_id)

    def sent(self, message_id: str, on: object) -> None:
        """The request ``message_id`` is published for replies on the channel ``on`` (the
        one that consumes replies): its reply can only come there."""
        with self._lock:
            if message_id in self._by_id:
                self._sent[message_id] = on

    @property
    def in_flight(self) -> int:
        """How many requests are published and wait for their reply."""
        with self._lock:
            return len(self._sent)

    def unanswerable(self, on: object = None) -> list[F]:
        """The waiters of the requests published for replies on the channel ``on`` (``None``:
        on any channel), for the moment it is gone (closed, replaced, or lost with its
        connection): their replies went to it and can no longer arrive. Fail them with
        :func:`reply_lost`."""
        with self._lock:
            return [
                self._by_id[message_id]
                for message_id, channel in self._sent.items()
                if on is None or channel is on
            ]

    def discard(self, message_id: str) -> None:
        """Forget the request ``message_id`` (answered, timed out or failed)."""
        with self._lock:
            self._sent.pop(message_id, None)
            if self._by_id.pop(message_id, None) is None:
                return
            for key, ids in list(self._by_correlation.items()):
                if message_id in ids:
                    ids.remove(message_id)
                    if not ids:
                        del self._by_correlation[key]
                    return

    def get(self, message_id: str) -> F | None:
        with self._lock:
            return self._by_id.get(message_id)

    def answered(self, headers: Mapping[str, Any] | None, correlation_id: str | None) -> F | None:
        """The waiter of the request a reply answers: the one its ``x-mqkit-request-id``
        names, else the oldest one waiting with its correlation id; ``None`` for a late or
        unknown reply."""
        request_id = _text((headers or {}).get(REQUEST_ID))
        with self._lock:
            waiter = self._by_id.get(request_id) if request_id else None
            if waiter is not None:
                return waiter
            ids = self._by_correlation.get(correlation_id or "")
            return self._by_id.get(ids[0]) if ids else None


def reply_channel_gone(*, closed_here: bool, closed_by_broker: bool) -> str:
    """Why the replies to a closed reply channel can no longer arrive (a cause for
    :func:`reply_lost`): mqkit closed it to replace it, the broker closed it, or else the
    connection went with it."""
    if closed_here:
        return CHANNEL_REPLACED
    return CHANNEL_CLOSED if closed_by_broker else LINK_LOST


def reply_lost(cause: str) -> ConnectionFailed:
    """A published request whose reply can no longer arrive (see
    :meth:`Pending.unanswerable`); ``cause`` says why, e.g. "the connection was lost"."""
    return ConnectionFailed(
        f"{cause} while waiting for a reply; the request may have been processed (retry it "
        "if it is idempotent)"
    )


def request_timeout(queue: str, timeout: float) -> RequestTimeout:
    """No reply from ``queue`` within ``timeout`` seconds."""
    return RequestTimeout(
        f"no reply from queue {queue!r} within {timeout:g}s; is a responder running?"
    )


def read_reply(headers: Mapping[str, Any] | None, body: bytes, response_type: type[R]) -> R:
    """The caller's result: :class:`RemoteError` for an error reply, else ``body`` decoded
    into ``response_type`` (:class:`~mqkit.DecodeError` if it does not fit)."""
    headers = headers or {}
    if ERROR_TYPE in headers:
        raise RemoteError(_text(headers.get(ERROR_TYPE)), _text(headers.get(ERROR_MESSAGE)))
    return decode(body, response_type)


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply to publish: default exchange, routing key ``reply_to`` (not mandatory: the
    caller may be gone)."""

    reply_to: str
    envelope: Envelope


def answer(
    queue: str,
    request: Incoming,
    *,
    service: str,
    result: object = None,
    failure: GiveUp | Exception | None = None,
) -> Reply | None:
    """The reply to ``request`` on ``queue``: the handler's ``result`` (a pydantic model), or
    the ``failure``: the request did not decode (a :class:`~mqkit.retry.GiveUp`) or the
    handler raised (the exception). A ``result`` that is not a model is a ``TypeError``
    reply. ``None`` when the request named no ``reply_to``: there is no one to answer.
    """
    if not request.reply_to:
        return None
    error: tuple[str, str] | None = None
    if isinstance(failure, GiveUp):
        error = (failure.error_type, failure.error_message)
    elif failure is not None:
        error = (type(failure).__name__, str(failure))
    elif not isinstance(result, BaseModel):
        error = (
            "TypeError",
            f"responder for {queue!r} returned {type(result).__name__}; return a pydantic model",
        )
    correlation_id = request.correlation_id
    names = {REQUEST_ID: request.message_id} if request.message_id else {}
    if error is not None:
        return Reply(request.reply_to, _error_envelope(error, service, correlation_id, names))
    assert isinstance(result, BaseModel)
    envelope = encode(result, service=service, headers=names, correlation_id=correlation_id)
    return Reply(request.reply_to, envelope)


def _error_envelope(
    error: tuple[str, str], service: str, correlation_id: str | None, names: dict[str, str]
) -> Envelope:
    error_type, message = error
    return Envelope(
        body=json.dumps({"error_type": error_type, "error_message": message}).encode(),
        message_id=uuid.uuid4().hex,
        type=ERROR_REPLY_TYPE,
        app_id=service,
        timestamp=int(time.time()),
        headers={**names, ERROR_TYPE: error_type, ERROR_MESSAGE: message[:4000]},
        correlation_id=correlation_id,
    )


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)
