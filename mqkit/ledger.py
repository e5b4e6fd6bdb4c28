"""The publish ledger: what a publisher has in flight and what each answer of the broker does to
it, written once for both publishers (``_sync/publisher.py``, ``_async/publisher.py``).

A publish call makes a :class:`Batch` (what its caller waits on) and hands its messages to
:meth:`Ledger.admit`, which fails those above the size limit at once. The shell then does only
I/O, and tells the ledger what happened:

- it sends what :meth:`Ledger.next_to_send` gives (at most
  :data:`~mqkit.publishing.CONFIRM_WINDOW` in flight) and reports each as :meth:`~Ledger.sent`
  (the ledger numbers them as the channel does: delivery tags from 1 per channel,
  :meth:`~Ledger.opened`), or :meth:`~Ledger.unsent` if it could not;
- ``basic.ack`` / ``basic.nack`` (``multiple`` included) go to :meth:`~Ledger.confirmed`, a
  ``basic.return`` (which comes before the ack of the same publish) to :meth:`~Ledger.returned`,
  matched by message id: the message fails with ``PublishUnroutable``;
- a nacked message is held (:func:`~mqkit.publishing.retry_nacked`) until the shell has
  replaced the channel (:class:`~mqkit.publishing.ChannelRenewal`, :attr:`Ledger.renewal`) and
  calls :meth:`~Ledger.requeue`; nacked again, it fails with ``PublishNacked``;
- a channel the broker closed goes to :meth:`~Ledger.closed_by_broker`: a missing exchange
  (:func:`~mqkit.publishing.missing_exchange`) fails the messages to it only, a message above
  the broker's size limit (:class:`~mqkit.publishing.SizeLimit`) fails the messages above it
  only, any other reason fails every message in flight; the rest go again on a new channel;
- a lost link, or a replaced channel, is :meth:`~Ledger.requeue`: what was unconfirmed goes
  first in line for the next channel (at-least-once); a closed client is
  :meth:`~Ledger.closed`.

The caller waits as long as confirms keep coming within ``confirm_timeout``; then it abandons
the batch (what was not sent yet is dropped) and raises :meth:`Batch.failure`, a
``PublishTimeout`` naming the messages not confirmed. Returned and nacked publishes are reported
to the pipeline (:class:`~mqkit.lifecycle.Returned`, :class:`~mqkit.lifecycle.Nacked`).

```python
envelope = Envelope(b"{}", "m-1", "Order", "billing", 1_700_000_000)
ledger = Ledger(Settings(), Pipeline())
batch = Batch([envelope.message_id])
ledger.add(ledger.admit(batch, [(envelope, "", "orders")]))
entry = ledger.next_to_send()   # the shell sends it, then:
ledger.sent(entry)              # delivery tag 1
ledger.confirmed(1, multiple=False, nacked=False)
assert batch.remaining == 0 and not batch.errors
```

A ledger is not thread-safe: one thread (the sync IO thread, or a thread holding the IO loop in
its place) or one event loop uses it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from mqkit import explain
from mqkit.errors import ConnectionFailed, MqkitError
from mqkit.lifecycle import Nacked, Pipeline, Returned
from mqkit.messages import Envelope
from mqkit.publishing import (
    CONFIRM_WINDOW,
    ChannelRenewal,
    SizeLimit,
    missing_exchange,
    retry_nacked,
)
from mqkit.settings import Settings

__all__ = ["REPLACED", "Batch", "Entry", "Job", "Ledger", "stall_cause"]

log = logging.getLogger("mqkit.publisher")

Job = tuple[Envelope, str, str]
"""One message to publish: ``(envelope, exchange, routing_key)``."""

REPLACED = "the publishing channel was replaced"  # why a pinned publish fails on requeue


def stall_cause(blocked: str | None, last_error: str | None) -> str | None:
    """Why confirms do not come, when known: the broker blocks publishing (a memory or disk
    alarm; ``blocked`` is its reason), else the link's last error."""
    return explain.publishing_blocked(blocked) if blocked else last_error


class Batch:
    """The messages of one publish call, which one caller waits on: how many are left, which
    were confirmed, why the others failed. Settled by the ledger; a shell's subclass adds the
    waiting (:meth:`done` wakes the caller)."""

    __slots__ = ("abandoned", "errors", "ids", "ok", "progress", "remaining")

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.remaining = len(ids)
        self.progress = 0
        self.ok = bytearray(len(ids))  # 1 once confirmed
        self.errors: dict[int, MqkitError] = {}
        self.abandoned = False  # the caller gave up: what is not sent yet is dropped

    def settle(self, index: int, error: MqkitError | None = None) -> None:
        """Message ``index`` was confirmed (or failed with ``error``)."""
        if error is None:
            self.ok[index] = 1
        else:
            self.errors[index] = error
        self.progress += 1
        self.remaining -= 1
        if self.remaining == 0:
            self.done()

    def done(self) -> None:
        """Every message is settled: wake the caller (the shells' subclasses)."""

    def unconfirmed(self) -> list[str]:
        """Ids of the messages not confirmed (failed or still open)."""
        return [mid for mid, ok in zip(self.ids, self.ok, strict=True) if not ok]

    def failure(
        self,
        exchange: str,
        routing_key: str,
        *,
        timeout: float | None = None,
        cause: str | None = None,
    ) -> MqkitError:
        """The error the caller raises: the failure of a single message, else one whose
        ``unconfirmed`` lists the ids not confirmed. ``timeout``: the caller stopped waiting
        after that many seconds without a confirm (``cause``: why, when known)."""
        errors = list(self.errors.values())
        unconfirmed = self.unconfirmed()
        if timeout is not None:
            pending = len(unconfirmed) - len(errors)
            what = (
                explain.publishing(unconfirmed[-1], exchange, routing_key)
                if len(self.ids) == 1
                else f"publish {pending} message(s) to {explain.target(exchange, routing_key)}"
            )
            errors.append(explain.confirm_timeout(what, timeout, cause))
        return explain.many_failed(errors, total=len(self.ids), unconfirmed=unconfirmed)


@dataclass(slots=True, eq=False)
class Entry:
    """One message in the ledger, from its admission until it is settled."""

    envelope: Envelope
    exchange: str
    routing_key: str
    properties: Any  # the shell's own form of the envelope's properties, if built beforehand
    mandatory: bool
    batch: Batch
    index: int  # in its batch
    pinned: bool = False  # sent on one channel only: fails instead of going again on another
    tag: int = 0  # delivery tag on the channel it was last sent on
    settled: bool = False
    returned: str | None = None  # the broker's reply to a basic.return ("312 NO_ROUTE")
    nacks: int = 0
    held: bool = False  # nacked, waiting for a new channel to be sent again on

    @property
    def what(self) -> str:
        """What publishing this message means, for error messages."""
        return explain.publishing(self.envelope.message_id, self.exchange, self.routing_key)


class Ledger:
    """The messages of one publisher: waiting to be sent, in flight on its channel (by
    delivery tag), or held after a nack; see the module's docstring for who calls what."""

    def __init__(self, settings: Settings, pipeline: Pipeline) -> None:
        self.limit = SizeLimit(settings.max_message_size)
        self.renewal = ChannelRenewal()
        self.waiting: deque[Entry] = deque()
        self.inflight: deque[Entry] = deque()  # sent, in delivery-tag order
        self.held: list[Entry] = []  # nacked once: sent again on the next channel
        self._next_tag = 1
        self._pipeline = pipeline
        self._service = settings.service
        self._confirm_timeout = settings.confirm_timeout

    # -- taking messages in ----------------------------------------------------------------

    def admit(
        self,
        batch: Batch,
        jobs: Sequence[Job],
        *,
        mandatory: bool = True,
        properties: Callable[[Envelope], Any] | None = None,
        pinned: bool = False,
    ) -> Iterator[Entry]:
        """The entries of ``batch`` to send, one per job (``properties``: the shell's form
        of each envelope's properties, built as they are taken). Jobs above the size limit
        are settled failed first, before any entry is given out."""
        limit = self.limit.limit
        too_large = {i for i, (envelope, _, _) in enumerate(jobs) if len(envelope.body) > limit}
        for index in sorted(too_large):
            envelope, exchange, routing_key = jobs[index]
            what = partial(explain.publishing, envelope.message_id, exchange, routing_key)
            error = self.limit.check(len(envelope.body), what)
            assert error is not None
            batch.settle(index, error)
        for index, (envelope, exchange, routing_key) in enumerate(jobs):
            if too_large and index in too_large:
                continue
            props = None if properties is None else properties(envelope)
            yield Entry(envelope, exchange, routing_key, props, mandatory, batch, index, pinned)

    def add(self, entries: Iterable[Entry]) -> None:
        """Put ``entries`` in line to be sent, after those waiting."""
        self.waiting.extend(entries)

    # -- sending ---------------------------------------------------------------------------

    def room(self, count: int = 1) -> bool:
        """Whether ``count`` more messages fit in the confirm window."""
        return len(self.inflight) + count <= CONFIRM_WINDOW

    def next_to_send(self) -> Entry | None:
        """The next message to send, if the confirm window has room (``None``: nothing to
        send now). Messages of abandoned batches are dropped; one above the broker's size
        limit, learned since it was admitted, fails."""
        waiting, inflight = self.waiting, self.inflight
        while waiting and len(inflight) < CONFIRM_WINDOW:
            entry = waiting.popleft()
            if entry.batch.abandoned:
                continue
            if len(entry.envelope.body) > self.limit.limit:
                self._fail_too_large(entry)
                continue
            return entry
        return None

    def take(self, count: int) -> list[Entry]:
        """Up to ``count`` next messages to send (:meth:`next_to_send`), no more than the
        confirm window has room for."""
        room = min(count, CONFIRM_WINDOW - len(self.inflight))
        taken: list[Entry] = []
        while len(taken) < room and (entry := self.next_to_send()) is not None:
            taken.append(entry)
        return taken

    def live(self) -> bool:
        """Whether a message waits to be sent for a caller still waiting (messages of
        abandoned batches are dropped)."""
        waiting = self.waiting
        if any(entry.batch.abandoned for entry in waiting):
            self.waiting = deque(entry for entry in waiting if not entry.batch.abandoned)
        return bool(self.waiting)

    def sent(self, entry: Entry) -> None:
        """``entry`` went out on the channel: it has the channel's next delivery tag."""
        entry.tag = self._next_tag
        self._next_tag += 1
        self.inflight.append(entry)

    def unsent(self, entries: Sequence[Entry]) -> None:
        """``entries`` (taken with :meth:`next_to_send`) could not be sent: back at the head
        of the line, in order."""
        self.waiting.extendleft(reversed(entries))

    def fail(self, entry: Entry, error: MqkitError) -> None:
        """``entry`` failed with ``error`` (e.g. the client library refused to send it)."""
        entry.settled = True
        entry.batch.settle(entry.index, error)

    def opened(self) -> None:
        """A new channel: its delivery tags start again at 1."""
        self._next_tag = 1

    # -- what the broker says ----------------------------------------------------------------

    def confirmed(self, tag: int, multiple: bool, nacked: bool) -> None:
        """``basic.ack`` (or ``basic.nack``) of delivery ``tag`` (``multiple``: and of every
        one before it)."""
        inflight = self.inflight
        if not inflight:
            return
        if multiple:
            while inflight and inflight[0].tag <= tag:
                self._settle(inflight.popleft(), nacked)
        else:
            offset = tag - inflight[0].tag
            if 0 <= offset < len(inflight):
                self._settle(inflight[offset], nacked)
            while inflight and (inflight[0].settled or inflight[0].held):
                inflight.popleft()

    def returned(self, message_id: str | None, reply: str) -> None:
        """A ``basic.return`` of the message ``message_id`` in flight (``reply``: "312
        NO_ROUTE"): its confirm, which follows, fails it."""
        for entry in self.inflight:
            if (
                not entry.settled
                and not entry.held
                and entry.returned is None
                and entry.envelope.message_id == message_id
            ):
                entry.returned = reply
                return

    def closed_by_broker(self, reply_code: int | None, reply_text: str) -> None:
        """The broker closed the channel: fail the messages it names (above its size limit,
        or to a missing exchange; else every one in flight), put the others back in line."""
        if self.limit.refused(reply_text) is not None:
            self._refused_too_large()
            return
        log.warning("the broker closed the publishing channel: %s %s", reply_code, reply_text)
        # A missing exchange fails the messages to it (sent or not); the others go again on a
        # new channel. Any other reason cannot be pinned on one message: all sent ones fail.
        missing = missing_exchange(reply_code, reply_text)
        for entry in (*self.inflight, *(self.waiting if missing else ())):
            if entry.settled or entry.held:
                continue
            if missing is None or entry.exchange == missing:
                self.fail(entry, explain.broker_refused(reply_code, reply_text, what=entry.what))
        self.requeue()
        if missing:
            self.waiting = deque(entry for entry in self.waiting if not entry.settled)

    # -- channels and links ----------------------------------------------------------------

    def requeue(self, cause: str = REPLACED) -> None:
        """The channel is gone (lost with the link, closed, or replaced after a nack): what
        was in flight, and the nacked messages held for a retry, go first in line for the
        next channel. Pinned messages fail instead (the link lost, for ``cause``)."""
        survivors = []
        for entry in self.inflight:
            if entry.settled or entry.held:
                continue
            if entry.pinned:
                self.fail(entry, explain.link_lost(entry.what, cause))
                continue
            entry.returned = None
            survivors.append(entry)
        self.inflight.clear()
        if any(entry.pinned for entry in self.waiting):
            for entry in self.waiting:
                if entry.pinned and not entry.settled:
                    self.fail(entry, explain.link_lost(entry.what, cause))
            self.waiting = deque(entry for entry in self.waiting if not entry.settled)
        self.waiting.extendleft(reversed(survivors))
        self.release_held()

    def renew(self, current: bool) -> bool:
        """A channel that nacked is due to be replaced; ``current``: it is still the one in
        use. ``True``: replace it now (what was in flight on it, and the nacked messages held
        for a retry, go first on the new one); ``False``: it was lost or replaced meanwhile,
        and what it held was put back in line then (the held messages are released)."""
        if not current:
            self.release_held()
            return False
        self.renewal.renewed()
        log.warning(
            "the broker nacked a publish; replacing the publishing channel (a quorum "
            "queue may have elected a new leader)"
        )
        self.requeue()
        return True

    def release_held(self) -> None:
        """Put the nacked messages held for a retry back at the head of the line."""
        held, self.held = self.held, []
        for entry in held:
            entry.held = False
        self.waiting.extendleft(reversed([entry for entry in held if not entry.settled]))

    def closed(self) -> None:
        """The client was closed: fail every message not settled yet."""
        self.fail_all(ConnectionFailed("the mqkit client was closed before the confirm"))

    def fail_all(self, error: MqkitError) -> None:
        """Fail every message not settled yet with ``error``."""
        for entry in (*self.held, *self.inflight, *self.waiting):
            if not entry.settled:
                self.fail(entry, error)
        self.held.clear()
        self.inflight.clear()
        self.waiting.clear()

    # -- inside ----------------------------------------------------------------------------

    def _settle(self, entry: Entry, nacked: bool) -> None:
        if entry.settled or entry.held:
            return
        if nacked:
            entry.nacks += 1
            if (
                not entry.batch.abandoned
                and not entry.pinned
                and retry_nacked(entry.nacks, self.renewal.wait(), self._confirm_timeout)
            ):
                entry.held = True
                entry.returned = None
                self.held.append(entry)
                return
        entry.settled = True
        error: MqkitError | None = None
        if nacked:
            error = explain.nacked(entry.what)
        elif entry.returned is not None:
            error = explain.unroutable(entry.what, entry.returned)
        if error is not None:
            self._report(entry, nacked)
        entry.batch.settle(entry.index, error)

    def _report(self, entry: Entry, nacked: bool) -> None:
        """Tell the pipeline that ``entry`` failed, nacked or returned."""
        message_id = entry.envelope.message_id or "?"
        if nacked:
            event: Nacked | Returned = Nacked(
                entry.exchange, entry.routing_key, message_id, service=self._service
            )
        else:
            event = Returned(
                entry.exchange,
                entry.routing_key,
                message_id,
                reply=entry.returned or "",
                service=self._service,
            )
        self._pipeline.emit(event)

    def _refused_too_large(self) -> None:
        """The broker closed the channel over a message above its size limit (now
        :attr:`limit`): fail the messages in flight above it, put the others back in line."""
        limit = self.limit.limit
        log.warning(
            "the broker refused a message above its max_message_size (%d bytes); failing "
            "the messages above it, sending the others again on a new channel (set "
            "max_message_size=%d to fail such messages before sending them)",
            limit,
            limit,
        )
        for entry in self.inflight:
            if not entry.settled and not entry.held and len(entry.envelope.body) > limit:
                self._fail_too_large(entry)
        self.requeue()

    def _fail_too_large(self, entry: Entry) -> None:
        error = self.limit.check(len(entry.envelope.body), lambda: entry.what)
        assert error is not None
        self.fail(entry, error)
