"""Acknowledging a consumer's deliveries in batches, from the IO thread.

Workers report finished deliveries with :meth:`Acks.finish` (any thread, cheap: a queue put
and, at most once per flush, a wake-up of the IO thread). The IO thread then acks the
contiguous run from the oldest unacked delivery with one ``basic.ack(multiple=True)`` and the
stragglers (finished out of order by concurrent handlers) one by one. ``multiple=True`` is
only ever sent for a tag that is itself still unacked, and never covers a delivery still in a
handler.

Every channel gets a new *generation*: reports about deliveries of an earlier channel are
dropped (that channel is gone, the broker redelivers its unacked messages).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from queue import Empty, SimpleQueue

from pika.channel import Channel

from mqkit.errors import MqkitError

__all__ = ["Acks"]


class Acks:
    """The delivery tags of one consumer's current channel and what became of them."""

    def __init__(self, submit: Callable[[Callable[[], None]], None]) -> None:
        self._submit = submit  # runs a function on the IO thread
        self.channel: Channel | None = None  # IO thread: the consumer's current channel
        self.generation = 0
        self._outstanding: deque[int] = deque()  # IO thread: delivered, unacked, tag order
        self._finished: dict[int, bool] = {}  # IO thread: tag -> True: ack it; False: settled
        self._done: SimpleQueue[tuple[int, int, bool]] = SimpleQueue()
        self._flush_pending = False

    def reset(self) -> None:
        """IO thread: no channel any more; what was delivered on it is stale."""
        self.channel = None
        self.generation += 1
        self._outstanding.clear()
        self._finished.clear()

    def delivered(self, tag: int) -> None:
        """IO thread: ``tag`` was delivered on the current channel."""
        self._outstanding.append(tag)

    def settled(self, tag: int) -> None:
        """IO thread: ``tag`` was nacked directly (a prefetched message returned on stop)."""
        self._finished[tag] = False

    def finish(self, generation: int, tag: int, ack: bool) -> None:
        """Any thread: a handler is done with ``tag`` (``ack`` False: return it to the queue)."""
        self._done.put((generation, tag, ack))
        if not self._flush_pending:
            self._flush_pending = True
            # closed: nothing to ack on; the broker requeues what was not acked
            with contextlib.suppress(MqkitError):
                self._submit(self._run_flush)

    def _run_flush(self) -> None:
        self._flush_pending = False  # before draining: a later finish() schedules again
        self.flush()

    def flush(self) -> None:
        """IO thread: send the acks (and requeue-nacks) of what finished so far."""
        channel = self.channel
        usable = channel is not None and channel.is_open
        generation, finished = self.generation, self._finished
        while True:
            try:
                item_generation, tag, ack = self._done.get_nowait()
            except Empty:
                break
            if item_generation != generation or not usable:
                continue
            if ack:
                finished[tag] = True
            else:
                assert channel is not None
                channel.basic_nack(tag, requeue=True)
                finished[tag] = False
        if not usable or not finished:
            return
        assert channel is not None
        outstanding = self._outstanding
        last = 0
        while outstanding and outstanding[0] in finished:
            tag = outstanding.popleft()
            if finished.pop(tag):
                last = tag
        if last:
            channel.basic_ack(last, multiple=True)
        for tag, pending in finished.items():  # finished out of order: one by one
            if pending:
                channel.basic_ack(tag)
                finished[tag] = False
