"""Looking at and replaying a queue's dead letters: :class:`DeadLetterQueue`."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import IO, TYPE_CHECKING, Any

from pika.channel import Channel

from mqkit._sync.channel import ChannelHandle, to_incoming
from mqkit._sync.io_thread import settle
from mqkit.dead_letters import DeadLetter, replay_headers
from mqkit.errors import MqkitError, PublishError
from mqkit.topology import dlq_name

if TYPE_CHECKING:
    from mqkit._sync.client import Client

__all__ = ["DeadLetterQueue"]

log = logging.getLogger("mqkit")


class DeadLetterQueue:
    """The DLQ of ``queue`` (named ``f"{queue}.dlq"``): count, peek, replay, purge, export.

    Reading never removes anything: messages are fetched without an ack and go back when the
    scan ends. :meth:`replay` removes a dead letter only after its re-publish was confirmed.
    """

    def __init__(self, client: Client, queue: str) -> None:
        self._client = client
        self._queue = queue
        self._dlq = dlq_name(queue)

    def __repr__(self) -> str:
        return f"DeadLetterQueue({self._dlq!r})"

    @property
    def queue(self) -> str:
        """The work queue these dead letters came from."""
        return self._queue

    @property
    def name(self) -> str:
        """The dead-letter queue's own name."""
        return self._dlq

    def count(self) -> int:
        """Dead letters waiting (the DLQ's ready messages)."""

        def op(channel: Channel, future: Future[int]) -> None:
            channel.queue_declare(
                self._dlq,
                passive=True,
                callback=lambda frame: settle(future, frame.method.message_count),
            )

        return self._handle().run(op, what=f"count dead letters in {self._dlq!r}")

    def peek(self, limit: int = 10) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first; nothing is removed."""
        return self._scan(limit, lambda letter: None)

    def export(self, fp: IO[str], limit: int | None = None) -> int:
        """Write dead letters as JSON lines (``DeadLetter.to_json()``) to ``fp``; nothing is
        removed. Returns how many were written."""

        def write(letter: DeadLetter) -> None:
            fp.write(json.dumps(letter.to_json(), ensure_ascii=False) + "\n")

        return len(self._scan(limit, write))

    def purge(self) -> int:
        """Delete every dead letter; return how many there were."""

        def op(channel: Channel, future: Future[int]) -> None:
            channel.queue_purge(
                self._dlq, callback=lambda frame: settle(future, frame.method.message_count)
            )

        return self._handle().run(op, what=f"purge {self._dlq!r}")

    def replay(
        self,
        limit: int | None = None,
        *,
        error_type: str | None = None,
        message_id: str | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> int:
        """Send dead letters back to their original queue; return how many were replayed.

        Only those matching ``error_type`` / ``message_id`` (when given) are replayed, at most
        ``limit``; the rest stay untouched. Each re-publish is confirmed before its dead letter
        is removed. A re-publish that fails leaves the dead letter in place, and the error is
        raised after the scan. ``progress(done)`` is called after each replay.
        """
        total = self.count()
        handle = ChannelHandle(self._client._link, reopen=False)
        publisher = self._client._publisher
        replayed = 0
        failures: list[tuple[str, MqkitError]] = []
        what = f"replay dead letters of {self._dlq!r}"
        try:
            # Bounded by the count at the start: messages we skip stay unacked on our channel,
            # so the scan never sees one twice.
            for _ in range(total):
                if limit is not None and replayed >= limit:
                    break
                got = handle.get(self._dlq, what=what)
                if got is None:
                    break
                incoming = to_incoming(*got)
                letter = DeadLetter.from_incoming(incoming, dlq=self._dlq)
                if (error_type is not None and letter.error_type != error_type) or (
                    message_id is not None and letter.message_id != message_id
                ):
                    continue
                envelope = dataclasses.replace(
                    incoming.republished({}), headers=replay_headers(incoming.headers)
                )
                try:
                    publisher.publish("", letter.original_queue, [envelope], mandatory=True)
                except MqkitError as exc:
                    failures.append((letter.message_id or "?", exc))
                    continue
                handle.ack(incoming.delivery_tag, what=what)
                replayed += 1
                if progress is not None:
                    progress(replayed)
        finally:
            handle.close()
        if failures:
            if len(failures) == 1:
                raise failures[0][1]
            summary = "; ".join(sorted({str(exc) for _, exc in failures})[:3])
            raise PublishError(
                f"{len(failures)} dead letter(s) of {self._dlq!r} could not be replayed and "
                f"stay in the DLQ ({replayed} replayed): {summary}",
                unconfirmed=[mid for mid, _ in failures],
            )
        return replayed

    def _handle(self) -> ChannelHandle:
        self._client._ensure_open()
        return self._client._declarer.handle

    def _scan(self, limit: int | None, each: Callable[[DeadLetter], Any]) -> list[DeadLetter]:
        total = self.count()
        bound = total if limit is None else min(total, limit)
        handle = ChannelHandle(self._client._link, reopen=False)
        letters: list[DeadLetter] = []
        try:
            for _ in range(bound):
                got = handle.get(self._dlq, what=f"read dead letters of {self._dlq!r}")
                if got is None:
                    break
                letter = DeadLetter.from_incoming(to_incoming(*got), dlq=self._dlq)
                each(letter)
                letters.append(letter)
        finally:
            handle.close()  # unacked: everything goes back, in order
        return letters
