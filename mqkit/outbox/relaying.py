"""What the outbox relay decides, for both runtimes: its policy, which claimed rows go in one
publish, what a failure does to a row (try again later, or park it), and when to look at
the table next. The SQL is in :mod:`mqkit.outbox.store`; the I/O in ``_sync.py`` (a thread
and :class:`mqkit.Client`) and ``_async.py`` (a task and :class:`mqkit.AsyncClient`).

One pass of a relay: claim committed unsent rows (:func:`mqkit.outbox.store.claim`) in a
transaction, publish them with confirms, then, in the same transaction, mark the confirmed
ones sent and record the failures (:func:`settle`). A relay killed anywhere in between leaves
the rows unsent: they are claimed again and sent again with the same message id.

```python
policy = RelayPolicy(max_attempts=3, retry_delays=(1.0, 5.0))
result = settle(rows, {rows[0].id: PublishUnroutable("...")}, now=time.time(), policy=policy)
assert result.sent == [r.id for r in rows[1:]] and not result.failures[0].park
```
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from mqkit import explain
from mqkit.errors import ConnectionFailed, PublishError, PublishTimeout, PublishTooLarge
from mqkit.ledger import Job
from mqkit.messages import Envelope
from mqkit.outbox.rows import MAX_ERROR, Pending
from mqkit.settings import Settings
from mqkit.topology import Entity, Exchange, Queue

__all__ = [
    "CLEAN_BATCH",
    "CLEAN_ROUNDS",
    "FINAL_PASSES",
    "MAX_BACKOFF",
    "RECHECKS",
    "AsyncRelayClient",
    "Failure",
    "Group",
    "Pace",
    "PassResult",
    "PublishMany",
    "PublishManyAsync",
    "RelayClient",
    "RelayPolicy",
    "Settlement",
    "Timer",
    "declarations",
    "describe",
    "failed_rows",
    "groups",
    "one_by_one",
    "report",
    "seconds",
    "settle",
    "split",
]


class RelayClient(Protocol):
    """What a relay needs of its :class:`mqkit.Client` (the outbox never imports the client
    modules: they make relays, ``client.outbox_relay(outbox)``)."""

    @property
    def settings(self) -> Settings: ...

    def connect(self) -> None: ...

    def declare(self, *entities: Entity) -> None: ...


class AsyncRelayClient(Protocol):
    """:class:`RelayClient` of an :class:`mqkit.AsyncClient`."""

    @property
    def settings(self) -> Settings: ...

    async def connect(self) -> None: ...

    async def declare(self, *entities: Entity) -> None: ...


class PublishMany(Protocol):
    """How a relay publishes: its client's own publisher (confirmed; ``mandatory`` as the
    row says), handed over by ``client.outbox_relay(outbox)``."""

    def __call__(self, jobs: Sequence[Job], *, mandatory: bool) -> None: ...


class PublishManyAsync(Protocol):
    """:class:`PublishMany` of an ``AsyncClient``."""

    async def __call__(self, jobs: Sequence[Job], *, mandatory: bool) -> None: ...


@dataclass(frozen=True)
class PassResult:
    """What one pass of a relay did: rows ``claimed`` and ``sent``, whether the batch was
    ``full`` (look again at once), and the ``trouble`` that ended it early, if any."""

    claimed: int
    sent: int
    full: bool
    trouble: BaseException | None


# After a commit in this process wakes the relay, the rows may not be visible yet (the
# notification comes as the commit starts): look again after these many seconds.
RECHECKS = (0.005, 0.02, 0.1)
MAX_BACKOFF = 30.0  # seconds between passes while the broker or the database is unreachable
FINAL_PASSES = 10  # passes a stopping relay makes, at most, to publish what was committed
CLEAN_BATCH = 1000  # sent rows deleted per statement
CLEAN_ROUNDS = 10  # statements per cleanup, at most


def seconds(value: float | timedelta, what: str, *, positive: bool = True) -> float:
    """``value`` in seconds; a :class:`~mqkit.ConfigError` if it is negative (or zero, when
    ``positive``) or not a number."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise explain.outbox_bad_value(what, value, "seconds (a number or a timedelta)")
    if value < 0 or (positive and value == 0) or value != value:
        need = "more than 0 seconds" if positive else "0 seconds or more"
        raise explain.outbox_bad_value(what, value, need)
    return float(value)


@dataclass(frozen=True)
class RelayPolicy:
    """How a relay works through an outbox (set on :class:`~mqkit.outbox.Outbox`).

    ``batch_size`` rows are claimed and published per pass, with their confirms in flight
    together. Without a commit in this process to wake it, the relay looks every
    ``poll_interval`` seconds. A row whose publish fails is tried again after
    ``retry_delays[n - 1]`` seconds (the last delay repeats), and parked after
    ``max_attempts`` failed publishes; a message larger than the broker accepts is parked at
    once. Failures that are not the row's fault (the broker unreachable, no confirm in time)
    do not count. Sent rows are deleted ``retention`` seconds after they were sent, checked
    every ``cleanup_interval`` seconds.
    """

    batch_size: int = 100
    poll_interval: float = 1.0
    max_attempts: int = 10
    retry_delays: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
    retention: float = 86400.0
    cleanup_interval: float = 60.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_attempts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise explain.outbox_bad_value(name, value, "a whole number, 1 or more")
        seconds(self.poll_interval, "poll_interval")
        seconds(self.retention, "retention", positive=False)
        seconds(self.cleanup_interval, "cleanup_interval")
        if not isinstance(self.retry_delays, tuple) or not self.retry_delays:
            raise explain.outbox_bad_value(
                "retry_delays", self.retry_delays, "a non-empty tuple of seconds"
            )
        for delay in self.retry_delays:
            seconds(delay, "retry_delays", positive=False)

    def delay(self, attempts: int) -> float:
        """Seconds to wait before publishing a row again after its ``attempts``-th failure."""
        return float(self.retry_delays[min(attempts, len(self.retry_delays)) - 1])


# -- one publish -------------------------------------------------------------------------------


def split(rows: Sequence[Pending]) -> tuple[list[Pending], list[Pending]]:
    """The rows to publish in this pass, and those to leave for the next: a message id
    appears once per publish (the broker names a returned message by its id only)."""
    now: list[Pending] = []
    later: list[Pending] = []
    seen: set[str] = set()
    for row in rows:
        (later if row.message_id in seen else now).append(row)
        seen.add(row.message_id)
    return now, later


def declarations(
    rows: Sequence[Pending], events_exchange: str, done: set[object]
) -> dict[Queue | Exchange, list[int]]:
    """What to declare before publishing ``rows`` (and which rows need it), leaving out what
    is in ``done``: each queue a row is addressed to, declared as a producer declares it
    (with its DLQ), so a message for a consumer that has not started yet waits in its
    queue; and the event bus's exchange, as ``client.event_bus()`` declares it. An exchange a
    row names is used as it is, as by a producer given an exchange name."""
    needed: dict[Queue | Exchange, list[int]] = {}
    for row in rows:
        entity: Queue | Exchange | None = None
        if row.exchange is None:
            entity = Exchange(events_exchange)
        elif row.queue is not None:
            entity = Queue(row.queue)
        if entity is not None and entity not in done:
            needed.setdefault(entity, []).append(row.id)
    return needed


@dataclass
class Group:
    """Rows published in one call: one exchange, one ``mandatory``, each with its key."""

    exchange: str
    mandatory: bool
    rows: list[Pending] = field(default_factory=list)
    envelopes: list[Envelope] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        """The routing key of each row, in order."""
        return [row.routing_key for row in self.rows]


def groups(
    rows: Sequence[Pending], *, service: str, events_exchange: str
) -> tuple[list[Group], dict[int, BaseException]]:
    """The publish calls for ``rows`` (in the order the rows came), each row's envelope made
    with ``service`` as ``app_id``; and the rows that cannot be made into an envelope (a
    damaged row), with why."""
    made: dict[tuple[str, bool], Group] = {}
    broken: dict[int, BaseException] = {}
    for row in rows:
        try:
            envelope = row.envelope(service)
        except ValueError as exc:
            broken[row.id] = exc
            continue
        key = (row.exchange_name(events_exchange), row.mandatory)
        group = made.setdefault(key, Group(*key))
        group.rows.append(row)
        group.envelopes.append(envelope)
    return list(made.values()), broken


def one_by_one(rows: Sequence[Pending], failed: Mapping[int, BaseException]) -> list[Pending]:
    """The rows to publish again, each alone, after a publish of ``rows`` together failed
    for the ``failed`` ones: the error of a batch sums up its failures, and each row should
    record (and be judged by) its own. None when one row was published, or when the error is
    not the rows' fault (each would only wait for the same outage)."""
    if len(rows) < 2 or not failed or any(_not_the_rows_fault(e) for e in failed.values()):
        return []
    return [row for row in rows if row.id in failed]


def failed_rows(rows: Sequence[Pending], error: BaseException) -> dict[int, BaseException]:
    """Which of ``rows``, published together, ``error`` is about: those whose ids a
    :class:`~mqkit.PublishError` lists as unconfirmed, else all of them."""
    unconfirmed = set(error.unconfirmed) if isinstance(error, PublishError) else set()
    if unconfirmed:
        return {row.id: error for row in rows if row.message_id in unconfirmed}
    return {row.id: error for row in rows}


# -- after a publish ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """What to write on a row whose publish failed."""

    id: int
    attempts: int
    error: str
    park: bool
    delay: float
    available_at: float


@dataclass(frozen=True)
class Settlement:
    """The outcome of one pass: rows to mark sent, failures to record, and the error that was
    not the rows' fault (``trouble``: those rows are left as they were)."""

    sent: list[int]
    failures: list[Failure]
    trouble: BaseException | None = None

    @property
    def parked(self) -> list[Failure]:
        """The failures that park their row."""
        return [f for f in self.failures if f.park]


def describe(error: BaseException) -> str:
    """``"PublishUnroutable: ..."``, cut to what ``last_error`` keeps."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 1] + "…"


def _not_the_rows_fault(error: BaseException) -> bool:
    # The broker unreachable or blocked, a confirm that did not come: sending again later
    # may well work, and an outage must not park every row it touches.
    return isinstance(error, (ConnectionFailed, PublishTimeout))


def settle(
    rows: Sequence[Pending],
    errors: Mapping[int, BaseException],
    *,
    now: float,
    policy: RelayPolicy,
) -> Settlement:
    """What to write after publishing ``rows``, given the ``errors`` of those that failed.

    A row without an error was confirmed: sent. A row whose error is not its fault (see
    :class:`Settlement`) is left as it is. Any other failure counts an attempt and either
    parks the row (``max_attempts`` reached, or a :class:`~mqkit.PublishTooLarge` or a
    damaged row, which fail the same way every time) or makes it wait its retry delay.
    """
    sent: list[int] = []
    failures: list[Failure] = []
    trouble: BaseException | None = None
    for row in rows:
        error = errors.get(row.id)
        if error is None:
            sent.append(row.id)
            continue
        if _not_the_rows_fault(error):
            trouble = error
            continue
        attempts = row.attempts + 1
        hopeless = isinstance(error, (PublishTooLarge, ValueError))
        park = hopeless or attempts >= policy.max_attempts
        delay = 0.0 if park else policy.delay(attempts)
        failures.append(
            Failure(
                id=row.id,
                attempts=attempts,
                error=describe(error),
                park=park,
                delay=delay,
                available_at=now + delay,
            )
        )
    return Settlement(sent, failures, trouble)


def report(log: logging.Logger, outcome: Settlement) -> None:
    """Log a pass's outcome: a parked row at WARNING, a row to try again at INFO, what was
    sent at DEBUG (the same words on both runtimes)."""
    for failure in outcome.failures:
        extra = {"outbox_id": failure.id, "attempts": failure.attempts}
        if failure.park:
            log.warning(
                "outbox row %d parked after %d failed publish(es): %s; see `mqkit outbox list`",
                failure.id,
                failure.attempts,
                failure.error,
                extra=extra,
            )
        else:
            log.info(
                "outbox row %d not published (attempt %d): %s; trying again in %gs",
                failure.id,
                failure.attempts,
                failure.error,
                failure.delay,
                extra=extra,
            )
    if outcome.sent:
        log.debug("published %d outbox row(s)", len(outcome.sent))


# -- when to look again ------------------------------------------------------------------------


class Pace:
    """How long a relay waits before its next pass.

    At once after a pass that sent something (there may be more: a full batch, or rows its
    rows held back by their ordering key); :data:`RECHECKS` after a wake-up that found
    nothing (the waking commit may not have landed yet); ``poll_interval`` otherwise; and
    doubling up to :data:`MAX_BACKOFF` while passes fail for a reason that is not a row's.

    ```python
    pace = Pace(poll_interval=1.0)
    assert pace.after(sent=100, full=True) == 0.0
    assert pace.after(sent=0, full=False) == 1.0
    pace.woken()
    assert pace.after(sent=0, full=False) == RECHECKS[0]
    ```
    """

    def __init__(self, poll_interval: float) -> None:
        self.poll_interval = poll_interval
        self._rechecks: list[float] = []
        self._troubles = 0

    def woken(self) -> None:
        """A commit in this process wrote rows: look now, and again shortly if need be."""
        self._rechecks = list(RECHECKS)

    def after(self, *, sent: int, full: bool, trouble: bool = False) -> float:
        """Seconds to wait after a pass that sent ``sent`` rows (``full``: as many as it
        could claim); ``trouble``: it failed for a reason that is not a row's."""
        if trouble:
            self._troubles += 1
            backoff: float = self.poll_interval * 2.0 ** (self._troubles - 1)
            return min(backoff, MAX_BACKOFF)
        self._troubles = 0
        if full or sent:
            # Rows sent may have held back later rows of their ordering keys: claimable now.
            self._rechecks = []
            return 0.0
        if self._rechecks:
            return self._rechecks.pop(0)
        return self.poll_interval


class Timer:
    """Whether a periodic job (cleaning up) is due: at most once per ``interval`` seconds,
    the first time right away."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: float | None = None

    def due(self) -> bool:
        """True (and restarts the interval) when the job should run now."""
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return True
