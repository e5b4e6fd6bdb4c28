"""Request/reply as plain decisions: the request envelope, the responder's reply, and what
a reply means to the caller. Both shells (``_sync/rpc.py``, ``_async/rpc.py``) do only the
I/O: publish the request over direct reply-to and wait, or run the responder's handler and
publish what :func:`answer` returns.

A reply that carries ``x-mqkit-error-type`` / ``x-mqkit-error-message`` says the responder
failed; the caller gets :class:`~mqkit.RemoteError`. Its body is a small JSON object with the
same two fields, for callers that are not mqkit.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from mqkit.dead_letters import ERROR_MESSAGE, ERROR_TYPE
from mqkit.errors import RemoteError, RequestTimeout
from mqkit.messages import Envelope, Incoming, decode, encode
from mqkit.retry import GiveUp

__all__ = [
    "ERROR_REPLY_TYPE",
    "REPLY_TO",
    "Reply",
    "answer",
    "read_reply",
    "request_envelope",
    "request_timeout",
]

R = TypeVar("R", bound=BaseModel)

REPLY_TO = "amq.rabbitmq.reply-to"
ERROR_REPLY_TYPE = "mqkit.error"  # the AMQP ``type`` of an error reply


def request_envelope(message: object, *, service: str, correlation_id: str) -> Envelope:
    """The request to publish (``reply_to`` = direct reply-to); ``TypeError`` if ``message``
    is not a pydantic model."""
    if not isinstance(message, BaseModel):
        raise TypeError(f"request expected a pydantic model, got {type(message).__name__}")
    return encode(message, service=service, correlation_id=correlation_id, reply_to=REPLY_TO)


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
    if error is not None:
        return Reply(request.reply_to, _error_envelope(error, service, correlation_id))
    assert isinstance(result, BaseModel)
    return Reply(request.reply_to, encode(result, service=service, correlation_id=correlation_id))


def _error_envelope(error: tuple[str, str], service: str, correlation_id: str | None) -> Envelope:
    error_type, message = error
    return Envelope(
        body=json.dumps({"error_type": error_type, "error_message": message}).encode(),
        message_id=uuid.uuid4().hex,
        type=ERROR_REPLY_TYPE,
        app_id=service,
        timestamp=int(time.time()),
        headers={ERROR_TYPE: error_type, ERROR_MESSAGE: message[:4000]},
        correlation_id=correlation_id,
    )


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)
