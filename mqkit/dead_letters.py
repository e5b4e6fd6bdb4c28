"""Dead letters as data: the ``x-mqkit-*`` headers that say why a message failed, and the
:class:`DeadLetter` value the tools show.

A dead-lettered message keeps its body and properties (``message_id`` included) and gains:

=============================  ==========================================================
header                         value
=============================  ==========================================================
``x-mqkit-error-type``         the exception's class name (``DecodeError`` for bad bodies)
``x-mqkit-error-message``      its message
``x-mqkit-traceback``          the last frames of the traceback (at most 2,000 characters)
``x-mqkit-attempts``           how many attempts were made
``x-mqkit-original-queue``     the queue it was consumed from (replay sends it back there)
``x-mqkit-original-exchange``  the exchange it was first published to
``x-mqkit-original-routing-key``  and its routing key
``x-mqkit-service``            the service that gave up on it
``x-mqkit-host``               that service's host name
``x-mqkit-failed-at``          when, ISO 8601 UTC
=============================  ==========================================================

A message the broker dead-lettered itself (a quorum queue's delivery limit, for a message
that crashed its consumer again and again) has no ``x-mqkit-*`` headers; its ``x-death``
header gives the reason and queue instead, and :class:`DeadLetter` reads that.
"""

from __future__ import annotations

import base64
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from mqkit.messages import Incoming
from mqkit.retry import ATTEMPT_HEADER, GiveUp

__all__ = [
    "DEAD_LETTER_HEADERS",
    "DeadLetter",
    "dead_letter_headers",
    "replay_headers",
    "retry_headers",
]

ERROR_TYPE = "x-mqkit-error-type"
ERROR_MESSAGE = "x-mqkit-error-message"
TRACEBACK = "x-mqkit-traceback"
ATTEMPTS = "x-mqkit-attempts"
ORIGINAL_QUEUE = "x-mqkit-original-queue"
ORIGINAL_EXCHANGE = "x-mqkit-original-exchange"
ORIGINAL_ROUTING_KEY = "x-mqkit-original-routing-key"
SERVICE = "x-mqkit-service"
HOST = "x-mqkit-host"
FAILED_AT = "x-mqkit-failed-at"

DEAD_LETTER_HEADERS = (
    ERROR_TYPE,
    ERROR_MESSAGE,
    TRACEBACK,
    ATTEMPTS,
    ORIGINAL_QUEUE,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    SERVICE,
    HOST,
    FAILED_AT,
)

_HOST = socket.gethostname()


def dead_letter_headers(
    incoming: Incoming, outcome: GiveUp, *, queue: str, service: str
) -> dict[str, Any]:
    """The headers added to a message sent to ``queue``'s DLQ."""
    original_exchange = incoming.headers.get(ORIGINAL_EXCHANGE, incoming.exchange)
    original_key = incoming.headers.get(ORIGINAL_ROUTING_KEY, incoming.routing_key)
    return {
        ERROR_TYPE: outcome.error_type,
        ERROR_MESSAGE: outcome.error_message[:4000],
        TRACEBACK: outcome.traceback[-2000:],
        ATTEMPTS: outcome.attempts,
        ORIGINAL_QUEUE: queue,
        ORIGINAL_EXCHANGE: original_exchange,
        ORIGINAL_ROUTING_KEY: original_key,
        SERVICE: service,
        HOST: _HOST,
        FAILED_AT: datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
    }


def retry_headers(incoming: Incoming, attempt: int) -> dict[str, Any]:
    """Headers for a copy sent to a retry queue: the next attempt number, and where the
    message was first published (a retry queue dead-letters it back by the default
    exchange, which would otherwise be all a later dead letter could name)."""
    return {
        ATTEMPT_HEADER: attempt,
        ORIGINAL_EXCHANGE: incoming.headers.get(ORIGINAL_EXCHANGE, incoming.exchange),
        ORIGINAL_ROUTING_KEY: incoming.headers.get(ORIGINAL_ROUTING_KEY, incoming.routing_key),
    }


def replay_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """Headers for a replayed dead letter: the failure headers and the attempt count go
    (a replay starts afresh at attempt 1); ``x-death`` goes too."""
    drop = {
        *DEAD_LETTER_HEADERS,
        ATTEMPT_HEADER,
        "x-death",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-first-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-last-death-exchange",
        "x-delivery-count",
    }
    return {k: v for k, v in headers.items() if k not in drop}


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


@dataclass(frozen=True)
class DeadLetter:
    """A message in a DLQ and why it is there (from :meth:`DeadLetterQueue.peek`)."""

    message_id: str | None
    body: bytes
    headers: dict[str, Any]
    error_type: str
    error_message: str
    attempts: int
    original_queue: str
    failed_at: datetime | None
    incoming: Incoming

    @classmethod
    def from_incoming(cls, incoming: Incoming, *, dlq: str) -> DeadLetter:
        """Read the failure headers (or the broker's ``x-death``) of a DLQ delivery."""
        headers = incoming.headers
        if ERROR_TYPE in headers:
            failed_at_text = _text(headers.get(FAILED_AT))
            try:
                failed_at: datetime | None = datetime.fromisoformat(failed_at_text)
            except ValueError:
                failed_at = None
            return cls(
                message_id=incoming.message_id,
                body=incoming.body,
                headers=headers,
                error_type=_text(headers.get(ERROR_TYPE)),
                error_message=_text(headers.get(ERROR_MESSAGE)),
                attempts=int(headers.get(ATTEMPTS) or 1),
                original_queue=_text(headers.get(ORIGINAL_QUEUE)),
                failed_at=failed_at,
                incoming=incoming,
            )
        death = _first_death(headers)
        reason = _text(death.get("reason")) or "dead-lettered by the broker"
        original = _text(death.get("queue")) or dlq.removesuffix(".dlq")
        when = death.get("time")
        return cls(
            message_id=incoming.message_id,
            body=incoming.body,
            headers=headers,
            error_type=f"broker:{reason}",
            error_message=f"the broker dead-lettered it from {original!r} ({reason})",
            attempts=int(death.get("count") or headers.get("x-delivery-count") or 1),
            original_queue=original,
            failed_at=when if isinstance(when, datetime) else None,
            incoming=incoming,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for ``mqkit dlq export``); the body as text when it is UTF-8."""
        try:
            body: Any = self.body.decode("utf-8")
        except UnicodeDecodeError:
            body = {"base64": base64.b64encode(self.body).decode()}
        return {
            "message_id": self.message_id,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "attempts": self.attempts,
            "original_queue": self.original_queue,
            "failed_at": self.failed_at.isoformat() if self.failed_at else None,
            "type": self.incoming.type,
            "correlation_id": self.incoming.correlation_id,
            "headers": {k: _jsonable(v) for k, v in self.headers.items()},
            "body": body,
        }


def _first_death(headers: dict[str, Any]) -> dict[str, Any]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
