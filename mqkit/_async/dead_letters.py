"""Looking at and replaying a queue's dead letters: :class:`AsyncDeadLetterQueue`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Generator
from typing import IO, TYPE_CHECKING, Any

from mqkit import explain
from mqkit.dead_letters import RETURN_WAIT, DeadLetter, Replay, scan_bound
from mqkit.errors import MqkitError
from mqkit.topology import dlq_name

from .channel import Channel, ChannelHandle, incoming_of
from .connection import RPC_TIMEOUT

if TYPE_CHECKING:
    from .connection import Link
    from .declarer import Declarer
    from .publisher import Publisher

__all__ = ["AsyncDeadLetterQueue"]

log = logging.getLogger("mqkit.dlq")


class AsyncDeadLetterQueue:
    """The DLQ of ``queue`` (named ``f"{queue}.dlq"``): count, peek, replay, purge, export;
    made by :meth:`AsyncClient.dead_letters`.

    Reading never removes anything: messages are fetched without an ack and go back when the
    scan ends. :meth:`replay` removes a dead letter only after its re-publish was confirmed.
    """

    def __init__(self, link: Link, declarer: Declarer, publisher: Publisher, queue: str) -> None:
        self._link = link
        self._declarer = declarer
        self._publisher = publisher
        self._queue = queue
        self._dlq = dlq_name(queue)

    def __await__(self) -> Generator[None, None, AsyncDeadLetterQueue]:
        """``await client.dead_letters(...)`` works too. Making one does no I/O, so the client
        returns it directly; awaiting it gives the same object, for code that awaits every
        AsyncClient method."""
        return self
        yield  # a generator that returns at once

    def __repr__(self) -> str:
        return f"<AsyncDeadLetterQueue {self._dlq!r}>"

    @property
    def queue(self) -> str:
        """The work queue these dead letters came from, where :meth:`replay` sends them."""
        return self._queue

    @property
    def name(self) -> str:
        """The dead-letter queue's own name, ``f"{queue}.dlq"`` (to inspect or alert on it
        with other tools)."""
        return self._dlq

    async def count(self) -> int:
        """Dead letters waiting (the DLQ's ready messages)."""

        async def op(channel: Channel) -> int:
            ok = await channel.queue_declare(self._dlq, passive=True, timeout=RPC_TIMEOUT)
            return int(ok.message_count or 0)

        return await self._run(op, "count")

    async def peek(self, limit: int = 10) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first; nothing is removed."""
        return await self._scan(limit, lambda letter: None)

    async def export(self, fp: IO[str], limit: int | None = None) -> int:
        """Write dead letters as JSON lines (``DeadLetter.to_json()``) to ``fp``; nothing is
        removed. Returns how many were written."""

        def write(letter: DeadLetter) -> None:
            fp.write(json.dumps(letter.to_json(), ensure_ascii=False) + "\n")

        return len(await self._scan(limit, write))

    async def purge(self) -> int:
        """Delete every dead letter; return how many there were."""

        async def op(channel: Channel) -> int:
            ok = await channel.queue_purge(self._dlq, timeout=RPC_TIMEOUT)
            return int(ok.message_count or 0)

        return await self._run(op, "purge")

    async def replay(
        self,
        limit: int | None = None,
        *,
        error_type: str | None = None,
        message_id: str | None = None,
        progress: Callable[[int], object] | None = None,
        to: str | None = None,
    ) -> int:
        """Send dead letters back to :attr:`queue` (or to ``to``); return how many were
        replayed. A dead letter's ``x-mqkit-original-queue`` header is not trusted: it could
        be forged to send it anywhere.

        Only those matching ``error_type`` / ``message_id`` (when given) are replayed, at most
        ``limit``; the rest stay untouched. Each re-publish is confirmed before its dead letter
        is removed. A re-publish that fails leaves the dead letter in place, and the error is
        raised after the scan. ``progress(done)`` is called after each replay.
        """
        replay = Replay(
            self._queue,
            self._dlq,
            count=await self.count(),
            limit=limit,
            error_type=error_type,
            message_id=message_id,
            progress=progress,
            to=to,
        )
        handle = ChannelHandle(self._link, reopen=False)
        publisher = self._publisher
        what, missing = (
            explain.on_dead_letters("replay", self._dlq),
            explain.missing_dlq(self._queue),
        )
        try:
            # Messages we skip stay unacked on our channel until it closes (in order).
            while not replay.finished:
                got = await handle.get(self._dlq, what=what, missing=missing)
                if got is None:
                    break
                letter = replay.letter(incoming_of(got))
                if not replay.wants(letter):
                    continue
                try:
                    await publisher.publish(
                        replay.envelope(letter), exchange="", routing_key=replay.target(letter)
                    )
                except MqkitError as exc:
                    replay.failed(letter, exc)
                    continue
                await handle.ack(letter.incoming.delivery_tag, what=what)
                replay.replayed()
        finally:
            await handle.close()
        await self._returned(replay.left)
        return replay.result()

    async def _run(self, op: Callable[[Channel], Awaitable[int]], action: str) -> int:
        """Run ``op`` on the client's control channel."""
        what = explain.on_dead_letters(action, self._dlq)
        self._link.require_open(what)
        return await self._declarer.handle.run(
            op, what=what, missing=explain.missing_dlq(self._queue)
        )

    async def _returned(self, expected: int) -> None:
        """Wait (at most RETURN_WAIT) until the DLQ counts ``expected`` letters again."""
        deadline = time.monotonic() + RETURN_WAIT
        while await self.count() < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _scan(self, limit: int | None, each: Callable[[DeadLetter], Any]) -> list[DeadLetter]:
        count = await self.count()
        bound = scan_bound(count, limit)
        handle = ChannelHandle(self._link, reopen=False)
        what = explain.on_dead_letters("read", self._dlq)
        letters: list[DeadLetter] = []
        try:
            for _ in range(bound):
                got = await handle.get(
                    self._dlq, what=what, missing=explain.missing_dlq(self._queue)
                )
                if got is None:
                    break
                letter = DeadLetter.from_incoming(incoming_of(got), dlq=self._dlq)
                each(letter)
                letters.append(letter)
        finally:
            await handle.close()  # unacked: everything goes back, in order
        if letters:
            await self._returned(count)
        return letters
