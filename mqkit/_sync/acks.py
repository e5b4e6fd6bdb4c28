"""Acknowledging one consumer channel's deliveries in batches.

Handled deliveries are acked as :class:`mqkit.acks.AckWindow` decides: the contiguous run
from the oldest unsettled one with one ``basic.ack(multiple=True)`` for a tag that is itself
unacked (never covering a delivery still in a handler), and the stragglers (finished out of
order by concurrent handlers) one by one. Delivery tags mean something only on their
channel, so an :class:`Acks` lives and dies with one channel; reports about a dead channel's
deliveries are dropped (the broker redelivers).

Workers report finished deliveries with :meth:`Acks.finish` (any thread, cheap: a queue put
and, at most once per flush, a wake-up of the IO thread); everything else runs on the IO
thread, which owns the window and the channel.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from queue import Empty, SimpleQueue

from pika.channel import Channel

from mqkit.acks import ACK, REQUEUE, AckWindow, Settle
from mqkit.errors import MqkitError

__all__ = ["Acks"]


class Acks:
    """The deliveries of one channel: delivery tags are only meaningful on their channel, so
    everything about acking lives here and dies with the channel."""

    __slots__ = ("_done", "_flush_pending", "_submit", "alive", "owner", "tag", "window")

    def __init__(self, owner: Channel, submit: Callable[[Callable[[], None]], None]) -> None:
        self.owner = owner
        self.tag = f"mqkit.{uuid.uuid4().hex[:12]}"
        self.alive = True
        # IO thread: the consumer records deliveries (window.delivered) here directly.
        self.window = AckWindow()
        self._submit = submit  # runs a function on the IO thread
        self._done: SimpleQueue[tuple[int, Settle]] = SimpleQueue()
        self._flush_pending = False

    def finish(self, tag: int, settle: Settle) -> None:
        """Any thread: a handler is done with ``tag``: ack it, requeue it or reject it."""
        if not self.alive:
            return  # its channel is gone: the broker redelivers it
        self._done.put((tag, settle))
        if not self._flush_pending:
            self._flush_pending = True
            # closed: nothing to ack on; the broker requeues what was not acked
            with contextlib.suppress(MqkitError):
                self._submit(self._run_flush)

    def _run_flush(self) -> None:
        self._flush_pending = False  # before draining: a later finish() schedules again
        self.flush(everything=True)

    def flush(self, *, everything: bool) -> None:
        """IO thread: ack the finished prefix with one ``multiple=True`` ack; with
        ``everything``, also the finished deliveries behind a still-running one, one by one
        (and send the nacks reported so far)."""
        while True:
            try:
                tag, settle = self._done.get_nowait()
            except Empty:
                break
            if settle == ACK:
                self.window.finished(tag)
            else:
                self.nack(tag, requeue=settle == REQUEUE)
        if not self.window.waiting():
            return
        last, singles = self.window.take(everything=everything)
        if not self.alive or not self.owner.is_open:
            return
        if last:
            self.owner.basic_ack(last, multiple=True)
        for tag in singles:  # finished out of order: one by one
            self.owner.basic_ack(tag)

    def nack(self, tag: int, *, requeue: bool = True) -> None:
        """IO thread: return one delivery to its queue; ``requeue=False``: reject it (the
        broker dead-letters it by the queue's DLX, or drops it if the queue has none)."""
        if not self.window.returned(tag):
            return
        if self.alive and self.owner.is_open:
            self.owner.basic_nack(tag, requeue=requeue)
