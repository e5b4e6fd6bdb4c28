"""Retry policy, handler signals, and the decision of what happens to a delivery.

Pure values and functions: the shells run the handler, ask :func:`decide` what to do with
the outcome, and carry that out on the broker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mqkit.errors import ConfigError, DecodeError

__all__ = [
    "ATTEMPT_HEADER",
    "MAX_ATTEMPT",
    "Ack",
    "GiveUp",
    "Outcome",
    "Reject",
    "Retry",
    "RetryLater",
    "RetryPolicy",
    "attempt_of",
    "decide",
]

# The attempt count travels in a header of mqkit's own. Not x-death: RabbitMQ 4 no longer
# interprets a client-set x-death, and its docs advise a custom non-"x-" header for counting.
ATTEMPT_HEADER = "mqkit-attempt"


class Reject(Exception):
    """Handler signal: dead-letter this message now, with ``reason``. Not an error."""

    def __init__(self, reason: str = "rejected by handler") -> None:
        super().__init__(reason)
        self.reason = reason


class Retry(Exception):
    """Handler signal: retry this message (counts as an attempt). Not an error.

    ``delay`` (seconds) picks the shortest retry tier that waits at least that long (the
    longest tier if none does); ``None`` uses the policy's delay for this attempt.
    """

    def __init__(self, delay: float | None = None) -> None:
        super().__init__(f"retry requested (delay={delay})")
        self.delay = delay


@dataclass(frozen=True)
class RetryPolicy:
    """How a failing handler is retried before its message is dead-lettered.

    Attempt ``n`` that fails (``n < max_attempts``) is retried after
    ``delays[min(n-1, len(delays)-1)]`` seconds, held by the broker in a retry tier of the
    consumer's service (one queue per delay with a per-queue TTL, shared by the service's
    consumers: ``billing.retries.1000ms``), not in process memory. ``immediate`` quick
    in-process retries come first and do not count as attempts. Exceptions in
    ``give_up_on`` (and :class:`Reject`) dead-letter at once; exceptions outside ``retry_on``
    too.

    ``RetryPolicy(max_attempts=1)`` dead-letters on the first failure.
    """

    max_attempts: int = 3
    delays: tuple[float, ...] = (1.0, 10.0, 60.0)
    immediate: int = 0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    give_up_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.immediate < 0:
            raise ConfigError(f"RetryPolicy.immediate must be >= 0, got {self.immediate}")
        object.__setattr__(self, "delays", tuple(float(d) for d in self.delays))
        if not self.delays and self.max_attempts > 1:
            raise ConfigError("RetryPolicy.delays must not be empty when max_attempts > 1")
        if any(d <= 0 for d in self.delays):
            raise ConfigError(f"RetryPolicy.delays must be > 0 seconds, got {self.delays}")

    def delay_for(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        return self.delays[min(attempt - 1, len(self.delays) - 1)]

    @property
    def tiers(self) -> tuple[float, ...]:
        """The distinct delays in use, shortest first: one retry tier each."""
        if self.max_attempts == 1:
            return ()
        used = {self.delay_for(n) for n in range(1, self.max_attempts)}
        return tuple(sorted(used))

    def tier_for(self, delay: float) -> float:
        """The tier for a requested delay: the shortest that waits at least ``delay``."""
        tiers = self.tiers or self.delays
        for tier in tiers:
            if tier >= delay:
                return tier
        return tiers[-1]

    def retries_immediately(self, exc: BaseException) -> bool:
        """Whether an in-process immediate retry applies to ``exc``."""
        return _retryable(self, exc) and not isinstance(exc, Retry)

    def immediate_delay(self, retry: int) -> float:
        """Seconds to wait before quick in-process retry number ``retry`` (1-based): none
        before the first, then 0.05 s, doubling, at most 1 s (a transient error often needs
        a moment, but a handler must not sit on its message long)."""
        return 0.0 if retry <= 1 else min(1.0, 0.05 * 2 ** (retry - 2))


DEFAULT_POLICY = RetryPolicy()


@dataclass(frozen=True, slots=True)
class Ack:
    """The handler succeeded: acknowledge."""


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Publish a copy to the retry tier ``delay`` with attempt ``attempt``, then ack."""

    delay: float
    attempt: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Publish a copy to the DLQ with the reason, then ack."""

    error_type: str
    error_message: str
    attempts: int
    traceback: str = ""


Outcome = Ack | RetryLater | GiveUp


def _retryable(policy: RetryPolicy, exc: BaseException) -> bool:
    if isinstance(exc, (Reject, DecodeError)):
        return False
    if isinstance(exc, Retry):
        return True
    if policy.give_up_on and isinstance(exc, policy.give_up_on):
        return False
    return isinstance(exc, policy.retry_on)


def decide(
    exc: BaseException | None, attempt: int, policy: RetryPolicy, traceback: str = ""
) -> Outcome:
    """What to do with a delivery whose handler (attempt ``attempt``) ended with ``exc``."""
    if exc is None:
        return Ack()
    if _retryable(policy, exc) and attempt < policy.max_attempts:
        requested = exc.delay if isinstance(exc, Retry) else None
        delay = policy.delay_for(attempt) if requested is None else policy.tier_for(requested)
        return RetryLater(delay=delay, attempt=attempt + 1)
    if isinstance(exc, Reject):
        message = exc.reason
    elif isinstance(exc, Retry):
        message = f"retry requested but max_attempts={policy.max_attempts} reached"
    else:
        message = str(exc)
    return GiveUp(
        error_type=type(exc).__name__,
        error_message=message,
        attempts=attempt,
        traceback=traceback,
    )


# The most attempts a header is believed to count when the policy is not known.
MAX_ATTEMPT = 10_000


def attempt_of(headers: dict[str, Any], max_attempts: int = MAX_ATTEMPT) -> int:
    """The attempt number a delivery carries, 1 when the header is absent or not one mqkit
    could have written under a policy of ``max_attempts``.

    The header comes from the wire: anyone who may publish to the queue can set it. mqkit
    writes 2 to ``max_attempts``; anything else (garbage, 0, negative, ``10**12``, a float
    that is not whole) reads as 1, so a forged count never skips the retries.
    """
    value = headers.get(ATTEMPT_HEADER)
    if value is None or isinstance(value, bool):
        return 1
    try:
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("ascii")
        number = int(value)
        if isinstance(value, float) and number != value:
            return 1
    except (TypeError, ValueError, OverflowError, UnicodeDecodeError):
        return 1
    return number if 1 <= number <= min(max_attempts, MAX_ATTEMPT) else 1
