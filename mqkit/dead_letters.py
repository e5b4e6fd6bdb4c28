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
import dataclasses
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from mqkit.errors import MqkitError, PublishError
from mqkit.messages import Envelope, Incoming
from mqkit.retry import ATTEMPT_HEADER, MAX_ATTEMPT, GiveUp

__all__ = [
    "DEAD_LETTER_HEADERS",
    "RETURN_WAIT",
    "DeadLetter",
    "Replay",
    "dead_letter_headers",
    "replay_headers",
    "retry_headers",
    "scan_bound",
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
    original_exchange, original_key = _first_route(incoming)
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
    """Headers for a copy sent to a retry tier: the next attempt number, and where the
    message was first published (the tier dead-letters it back by the default exchange,
    which would otherwise be all a later dead letter could name)."""
    original_exchange, original_key = _first_route(incoming)
    return {
        ATTEMPT_HEADER: attempt,
        ORIGINAL_EXCHANGE: original_exchange,
        ORIGINAL_ROUTING_KEY: original_key,
    }


def _first_route(incoming: Incoming) -> tuple[str, str]:
    """Where ``incoming`` was first published, for the record: its own route, unless it came
    by the default exchange, the way a retried copy comes back from its retry tier (then the
    route its ``x-mqkit-original-*`` headers name, if any). Information only: nothing is
    routed by it."""
    headers = incoming.headers
    if incoming.exchange or ORIGINAL_EXCHANGE not in headers:
        return incoming.exchange, incoming.routing_key
    return _text(headers.get(ORIGINAL_EXCHANGE)), _text(headers.get(ORIGINAL_ROUTING_KEY))


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
    """A header value as text, whatever type it arrived as."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return "" if value is None else str(value)


def _count(value: Any) -> int:
    """A count from a header (``x-mqkit-attempts``, ``x-death``'s ``count``): at least 1,
    whatever arrived (a forged ``"abc"`` reads as 1)."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    if isinstance(value, bool) or value is None:
        return 1
    try:
        return max(1, min(int(value), MAX_ATTEMPT))
    except (TypeError, ValueError, OverflowError):
        return 1


def _when(value: Any) -> datetime | None:
    """``x-mqkit-failed-at`` (ISO 8601 text) or ``x-death``'s ``time`` as an aware datetime,
    or ``None``."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    try:
        when = datetime.fromisoformat(_text(value))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


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
        """Read the failure headers (or the broker's ``x-death``) of a DLQ delivery.

        Headers come from the wire and are read leniently: one of the wrong type or out of
        range gives a default (attempts 1, no time), never an error, so one forged dead
        letter cannot break a peek or a replay. They are shown, not trusted: :class:`Replay`
        sends a dead letter back to the DLQ's own queue, whatever ``original_queue`` says.
        """
        headers = incoming.headers
        if ERROR_TYPE in headers:
            return cls(
                message_id=incoming.message_id,
                body=incoming.body,
                headers=headers,
                error_type=_text(headers.get(ERROR_TYPE)),
                error_message=_text(headers.get(ERROR_MESSAGE)),
                attempts=_count(headers.get(ATTEMPTS)),
                original_queue=_text(headers.get(ORIGINAL_QUEUE)),
                failed_at=_when(headers.get(FAILED_AT)),
                incoming=incoming,
            )
        death = _first_death(headers)
        reason = _text(death.get("reason")) or "dead-lettered by the broker"
        original = _text(death.get("queue")) or dlq.removesuffix(".dlq")
        count = death.get("count")
        return cls(
            message_id=incoming.message_id,
            body=incoming.body,
            headers=headers,
            error_type=f"broker:{reason}",
            error_message=f"the broker dead-lettered it from {original!r} ({reason})",
            attempts=_count(count if count is not None else headers.get("x-delivery-count")),
            original_queue=original,
            failed_at=_when(death.get("time")) if death.get("time") is not None else None,
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
            "headers": {_text(k): _jsonable(v) for k, v in self.headers.items()},
            "body": body,
        }


def _first_death(headers: dict[str, Any]) -> dict[str, Any]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no NaN or infinity
    if isinstance(value, dict):
        return {_text(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# -------------------------------------------------------------------------- the DLQ tools


# A quorum DLQ takes back the letters a scan returns (nack, or closing the channel)
# asynchronously: a count right after the scan can miss them, and a replay bounded by that
# count would skip them. So a scan waits, at most this long, until they are counted again.
RETURN_WAIT = 2.0


def scan_bound(count: int, limit: int | None) -> int:
    """How many messages a DLQ scan may take: the count at the start (messages a scan
    returns must not be seen again), and at most ``limit``."""
    return count if limit is None else max(0, min(count, limit))


class Replay:
    """The decisions and bookkeeping of one :meth:`DeadLetterQueue.replay` of ``queue``'s DLQ
    ``dlq``; the shells only get, publish and ack.

    ``count`` is how many dead letters the DLQ held at the start: the scan stops there, since
    a dead letter that is looked at and left goes back to the queue and must not be seen
    again. While not :attr:`finished`: get one (unacked) and make it a :meth:`letter`; if
    :meth:`wants` it, publish :meth:`envelope` to the default exchange with routing key
    :meth:`target` (mandatory, confirmed), then ack it and call :meth:`replayed`; if that
    publish fails, call :meth:`failed` and leave it. At the end :meth:`result` returns how
    many were replayed, or raises what failed.

    Every dead letter goes back to ``queue`` (the DLQ's own), or to ``to`` when the caller
    names another, never to the queue a dead letter's ``x-mqkit-original-queue`` header
    names: anyone who may publish to the DLQ could forge that and have a replay deliver to a
    queue of their choosing.
    """

    def __init__(
        self,
        queue: str,
        dlq: str,
        *,
        count: int,
        limit: int | None = None,
        error_type: str | None = None,
        message_id: str | None = None,
        progress: Callable[[int], object] | None = None,
        to: str | None = None,
    ) -> None:
        self.queue = queue
        self.to = to or queue
        self.dlq = dlq
        self.limit = limit
        self.error_type = error_type
        self.message_id = message_id
        self.progress = progress
        self.count = count
        self.seen = 0
        self.done = 0
        self.failures: list[tuple[str, MqkitError]] = []

    @property
    def finished(self) -> bool:
        """Whether the scan is over: ``count`` looked at, or ``limit`` replayed."""
        return self.seen >= self.count or (self.limit is not None and self.done >= self.limit)

    def letter(self, incoming: Incoming) -> DeadLetter:
        """The dead letter of a delivery got from the DLQ (counted as looked at)."""
        self.seen += 1
        return DeadLetter.from_incoming(incoming, dlq=self.dlq)

    def wants(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` matches the ``error_type`` / ``message_id`` filters."""
        if self.error_type is not None and letter.error_type != self.error_type:
            return False
        return self.message_id is None or letter.message_id == self.message_id

    def target(self, letter: DeadLetter) -> str:
        """The queue to send ``letter`` back to: the DLQ's own queue, or the caller's ``to``
        (never the one its headers name; see the class)."""
        return self.to

    def envelope(self, letter: DeadLetter) -> Envelope:
        """``letter`` as it was published: the failure headers and attempt count go."""
        incoming = letter.incoming
        return dataclasses.replace(
            incoming.republished({}), headers=replay_headers(incoming.headers)
        )

    @property
    def left(self) -> int:
        """How many dead letters the DLQ holds again once the scan returned what it left
        (at least; new ones may have come)."""
        return self.count - self.done

    def replayed(self) -> None:
        """One more was replayed (confirmed, then acked): count it, report progress."""
        self.done += 1
        if self.progress is not None:
            self.progress(self.done)

    def failed(self, letter: DeadLetter, exc: MqkitError) -> None:
        """Re-publishing ``letter`` failed; it stays in the DLQ."""
        self.failures.append((letter.message_id or "?", exc))

    def result(self) -> int:
        """How many were replayed; raises the failure (one), or a :class:`PublishError`
        listing the dead letters that stay (several)."""
        if not self.failures:
            return self.done
        if len(self.failures) == 1:
            raise self.failures[0][1]
        summary = "; ".join(sorted({str(exc) for _, exc in self.failures})[:3])
        raise PublishError(
            f"{len(self.failures)} dead letter(s) of {self.dlq!r} could not be replayed and "
            f"stay in the DLQ ({self.done} replayed): {summary}",
            unconfirmed=[message_id for message_id, _ in self.failures],
        )
