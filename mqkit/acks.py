"""Which deliveries of one channel to ack, and how: the decision both consumer shells share.

A consumer's handlers finish in any order, but acking one frame per message is slow. The
shells therefore ack in batches: one ``basic.ack(multiple=True)`` for the contiguous finished
run from the oldest unsettled delivery, and the stragglers (finished behind a delivery still
in a handler) one by one. :class:`AckWindow` keeps the bookkeeping and says what to send;
the shells (``_sync/acks.py``, ``_async/acks.py``) send it and own threading and locking::

    window.delivered(tag)                  # the broker delivered ``tag``
    window.finished(tag)                   # its handler is done: ack it soon
    if window.returned(tag): nack(tag)     # return it to the queue now
    last, singles = window.take(everything=True)
    if last: ack(last, multiple=True)
    for tag in singles: ack(tag)
"""

from __future__ import annotations

from collections import deque
from typing import Literal

__all__ = ["ACK", "REJECT", "REQUEUE", "AckWindow", "Settle"]


class AckWindow:
    """The delivery tags of one channel and which of them are finished, settled or running.

    Invariant, relied on by the shells: a tag that :meth:`take` returns is delivered and not
    settled yet (acking it cannot fail with "unknown delivery tag"), and
    ``ack(last, multiple=True)`` never covers a delivery still in a handler: every unsettled
    tag up to ``last`` is finished. Once :meth:`take` returned a tag, or :meth:`returned`
    said True for it, the tag is settled and no later call returns it again; reports about
    unknown, settled or already finished tags are ignored.

    Delivery tags increase on a channel, so delivery order is tag order. Per delivery the
    cost is O(1) amortised: a deque in delivery order whose settled entries are dropped
    lazily once they reach its head, and two sets. Not thread-safe; the shells serialise
    calls (sync: the IO thread; async: the event loop).
    """

    __slots__ = ("_done", "_open", "_order")

    def __init__(self) -> None:
        self._order: deque[int] = deque()  # delivered tags in order; may hold settled ones
        self._open: set[int] = set()  # delivered, not acked or nacked yet
        self._done: set[int] = set()  # open and finished: waiting for their ack

    def delivered(self, tag: int) -> None:
        """The broker delivered ``tag`` (tags arrive in increasing order)."""
        self._order.append(tag)
        self._open.add(tag)

    def finished(self, tag: int) -> None:
        """The handler of ``tag`` is done: :meth:`take` will return it for an ack."""
        if tag in self._open:
            self._done.add(tag)

    def returned(self, tag: int) -> bool:
        """``tag`` goes back to the queue: True if the caller must nack it now.

        False when ``tag`` is unknown or already settled (nacking it again would close the
        channel).
        """
        if tag not in self._open:
            return False
        self._open.remove(tag)
        self._done.discard(tag)
        return True

    def take(self, *, everything: bool) -> tuple[int, list[int]]:
        """Settle what can be acked now: ``(multiple_up_to, singles)``.

        ``multiple_up_to`` (0: none) ends the finished run from the oldest unsettled
        delivery, to be acked with ``multiple=True``. With ``everything``, ``singles`` are
        the finished deliveries behind a running one, ascending, to be acked one by one;
        without it they wait (an empty list) until the run reaches them.
        """
        done = self._done
        if not done:
            return 0, []
        order, unsettled = self._order, self._open
        last = 0
        while order:
            tag = order[0]
            if tag in done:
                done.remove(tag)
                unsettled.remove(tag)
                last = tag
            elif tag in unsettled:
                break  # still in a handler: the run ends here
            order.popleft()
        singles: list[int] = []
        if everything and done:
            singles = sorted(done)
            unsettled.difference_update(singles)
            done.clear()
        return last, singles

    def unsettled(self) -> int:
        """How many deliveries are neither acked nor nacked (running or finished)."""
        return len(self._open)

    def waiting(self) -> int:
        """How many finished deliveries wait for their ack."""
        return len(self._done)

    def last_unsettled(self) -> int:
        """The newest delivery not acked or nacked yet (0: none), for a ``multiple=True``
        nack that returns every unsettled delivery at once."""
        order = self._order
        while order and order[-1] not in self._open:
            order.pop()
        return order[-1] if order else 0

    def clear(self) -> None:
        """Forget every delivery (their channel is gone, or they were all settled)."""
        self._order.clear()
        self._open.clear()
        self._done.clear()


# What becomes of a finished delivery, as a consumer's handling decided it: acked, returned to
# its queue, or rejected (not requeued: the broker dead-letters it by the queue's DLX, or drops
# it if it has none). The shells' ``Acks`` turn it into frames.
Settle = Literal["ack", "requeue", "reject"]
ACK: Settle = "ack"
REQUEUE: Settle = "requeue"
REJECT: Settle = "reject"
