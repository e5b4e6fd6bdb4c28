"""What a consumer does with one delivery, as plain decisions the shells carry out.

The shells (``_sync/consumer.py``, ``_async/consumer.py``) only do I/O::

    message, ctx, failure = prepare(incoming, queue=..., decoder=...)
    outcome = failure or decide(<handler's exception or None>, ctx.attempt, policy)
    copy = follow_up(incoming, outcome, queue=..., service=...)
    if copy: publish copy to copy.exchange, copy.routing_key (confirmed, mandatory), then ack;
             if that publish fails: nack(requeue=True)
    else:    ack

so a message is never acked before its retry or dead-letter copy is safely stored.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from mqkit.context import Context
from mqkit.dead_letters import dead_letter_headers, retry_headers
from mqkit.errors import DecodeError
from mqkit.messages import Envelope, Incoming, bad_body, decode, decode_event
from mqkit.retry import DEFAULT_POLICY, GiveUp, Outcome, RetryLater, RetryPolicy, attempt_of
from mqkit.topology import dlq_name, retry_tier_name

__all__ = ["Decoder", "FollowUp", "follow_up", "format_traceback", "prepare"]

Decoder = Callable[[bytes, "str | None"], BaseModel]


def typed_decoder(message_type: type[BaseModel]) -> Decoder:
    """A decoder for one message type (the ``type`` property is not consulted)."""

    def _decode(body: bytes, _type: str | None) -> BaseModel:
        return decode(body, message_type)

    return _decode


def registry_decoder(body: bytes, event_type: str | None) -> BaseModel:
    """A decoder that picks the :class:`~mqkit.Event` class by the ``type`` property."""
    return decode_event(body, event_type)


@dataclass(frozen=True, slots=True)
class FollowUp:
    """A copy to publish to ``exchange`` with ``routing_key`` before the ack.

    A dead letter goes by the default exchange (``""``), routed by the DLQ's name; a retry
    goes to its tier's exchange (:func:`~mqkit.topology.retry_tier_name`), routed by the
    work queue's name, which is where the tier dead-letters it back to after the delay.
    """

    routing_key: str
    envelope: Envelope
    exchange: str = ""

    @property
    def target(self) -> str:
        """Where the copy goes, for a log line: ``'orders.dlq'``, or
        ``'orders' by 'billing.retries.1000ms'`` for a retry."""
        if not self.exchange:
            return repr(self.routing_key)
        return f"{self.routing_key!r} by {self.exchange!r}"


def prepare(
    incoming: Incoming,
    *,
    queue: str,
    decoder: Decoder,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> tuple[Any, Context, GiveUp | None]:
    """Decode a delivery and build its :class:`Context`.

    Returns ``(message, ctx, None)``, or ``(None, ctx, GiveUp(...))`` when the body cannot
    be decoded: such a message is dead-lettered at once, with the reason. Whatever decoding
    raises counts (a model validator's ``TypeError`` too): a body is never retried.

    Nothing in the context is taken from headers a publisher can set: ``exchange`` and
    ``routing_key`` are the delivery's (a retried copy comes back by the default exchange,
    routed by the queue's name; the first route is in its ``x-mqkit-original-*`` headers,
    for information), and the attempt is read within ``policy`` (:func:`attempt_of`).
    """
    attempt = attempt_of(incoming.headers, policy.max_attempts)
    ctx = Context(
        message_id=incoming.message_id,
        correlation_id=incoming.correlation_id,
        headers=incoming.headers,
        attempt=attempt,
        redelivered=incoming.redelivered,
        exchange=incoming.exchange,
        routing_key=incoming.routing_key,
        queue=queue,
        event_type=incoming.type,
        timestamp=incoming.timestamp,
        reply_to=incoming.reply_to,
    )
    try:
        return decoder(incoming.body, incoming.type), ctx, None
    except DecodeError as exc:
        cause = exc.__cause__  # not a validation error: where it was raised helps
        trace = "" if cause is None or isinstance(cause, ValueError) else format_traceback(cause)
        return None, ctx, GiveUp("DecodeError", str(exc), attempt, trace)
    except Exception as exc:  # a decoder of the caller's that does not raise DecodeError
        reason = bad_body(exc, incoming.type or "the message type")
        return None, ctx, GiveUp("DecodeError", reason, attempt, format_traceback(exc))


# Sender-selected distribution: the broker routes a message to the queues its CC (and BCC)
# headers name as well. A copy mqkit moves goes to one queue only, so they are dropped (None
# removes a header); a tier would otherwise deliver a retry to every queue its CC names.
_ONE_QUEUE_ONLY: dict[str, Any] = {"CC": None, "BCC": None}


def follow_up(
    incoming: Incoming, outcome: Outcome, *, queue: str, service: str, dlq: str | None = None
) -> FollowUp | None:
    """The copy to publish before acking, or ``None`` when a plain ack will do.

    A retry goes to the tier of ``service`` for its delay, with ``queue`` as the routing key
    (the tier sends it back there); a dead letter to ``queue``'s DLQ. Either keeps the
    message's headers but ``CC`` and ``BCC`` (the copy is for one queue). ``dlq`` overrides the
    dead-letter queue (a broadcast subscriber's queue is temporary, so its dead letters go to
    a durable queue shared by the service's instances).
    """
    if isinstance(outcome, RetryLater):
        headers = {**retry_headers(incoming, outcome.attempt), **_ONE_QUEUE_ONLY}
        return FollowUp(
            queue,
            incoming.republished(headers),
            exchange=retry_tier_name(service, outcome.delay),
        )
    if isinstance(outcome, GiveUp):
        headers = dead_letter_headers(incoming, outcome, queue=queue, service=service)
        return FollowUp(
            dlq or dlq_name(queue), incoming.republished({**headers, **_ONE_QUEUE_ONLY})
        )
    return None


def format_traceback(exc: BaseException, limit: int = 5) -> str:
    """The last ``limit`` frames of ``exc``'s traceback, for the DLQ's headers."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-limit))
