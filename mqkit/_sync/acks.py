"""Acknowledging a consumer's deliveries in batches, from the IO thread.

Workers report finished deliveries with :meth:`Acks.finish` (any thread, cheap: a queue put
and, at most once per flush, a wake-up of the IO thread). The IO thread then sends what
:class:`mqkit.acks.AckWindow` decides: one ``basic.ack(multiple=True)`` for the contiguous
finished run from the oldest unacked delivery, and the stragglers (finished out of order by
concurrent handlers) one by one.

Every channel gets a new *generation*: reports about deliveries of an earlier channel are
dropped (that channel is gone, the broker redelivers its unacked messages).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from queue import Empty, SimpleQueue

from pika.channel import Channel

from mqkit.acks import ACK, REQUEUE, AckWindow, Settle
from mqkit.errors import MqkitError

__all__ = ["Acks"]


class Acks:
    """The delivery tags of one consumer's current channel and what became of them."""

    def __init__(self, submit: Callable[[Callable[[], None]], None]) -> None:
        self._submit = submit  # runs a function on the IO thread
        self.channel: Channel | None = None  # IO thread: the consumer's current channel
        self.generation = 0
        # IO thread: the current channel's deliveries (delivered, finished, settled).
        self.window = AckWindow()
        self._done: SimpleQueue[tuple[int, int, Settle]] = SimpleQueue()
        self._flush_pending = False

    def reset(self) -> None:
        """IO thread: no channel any more; what was delivered on it is stale."""
        self.channel = None
        self.generation += 1
        self.window.clear()

    def delivered(self, tag: int) -> None:
        """IO thread: ``tag`` was delivered on the current channel."""
        self.window.delivered(tag)

    def finish(self, generation: int, tag: int, settle: Settle) -> None:
        """Any thread: a handler is done with ``tag``: ack it, requeue it or reject it."""
        self._done.put((generation, tag, settle))
        if not self._flush_pending:
            self._flush_pending = True
            # closed: nothing to ack on; the broker requeues what was not acked
            with contextlib.suppress(MqkitError):
                self._submit(self._run_flush)

    def _run_flush(self) -> None:
        self._flush_pending = False  # before draining: a later finish() schedules again
        self.flush()

    def flush(self) -> None:
        """IO thread: send the acks (and nacks) of what finished so far."""
        generation = self.generation
        while True:
            try:
                item_generation, tag, settle = self._done.get_nowait()
            except Empty:
                break
            if item_generation != generation:
                continue  # delivered on an earlier channel: the broker redelivers it
            if settle == ACK:
                self.window.finished(tag)
            else:
                self.nack(tag, requeue=settle == REQUEUE)
        channel = self.channel
        if channel is None or not channel.is_open:
            return
        last, singles = self.window.take(everything=True)
        if last:
            channel.basic_ack(last, multiple=True)
        for tag in singles:  # finished out of order: one by one
            channel.basic_ack(tag)

    def nack(self, tag: int, *, requeue: bool = True) -> None:
        """IO thread: return one delivery to its queue; ``requeue=False``: reject it (the
        broker dead-letters it by the queue's DLX, or drops it if the queue has none)."""
        if not self.window.returned(tag):
            return
        channel = self.channel
        if channel is not None and channel.is_open:
            channel.basic_nack(tag, requeue=requeue)
