"""AsyncDeadLetterQueue: look at, replay, export and purge a queue's dead letters."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Generator
from typing import IO, TYPE_CHECKING, Any

import aiormq.abc
from pamqp import commands as spec

from mqkit import explain
from mqkit.dead_letters import RETURN_WAIT, DeadLetter, Replay, scan_bound
from mqkit.errors import MqkitError
from mqkit.topology import dlq_name

from .connection import RPC_ERRORS, RPC_TIMEOUT, describe, incoming_of, translate

if TYPE_CHECKING:
    from .connection import Link

__all__ = ["AsyncDeadLetterQueue"]

log = logging.getLogger("mqkit")

_ERRORS = RPC_ERRORS


class AsyncDeadLetterQueue:
    """The dead letters of ``queue`` (kept in ``f"{queue}.dlq"``); made by
    :meth:`AsyncClient.dead_letters`. Nothing is removed except by :meth:`replay` (after the
    re-publish is confirmed) and :meth:`purge`."""

    def __init__(self, link: Link, queue: str) -> None:
        self._link = link
        self._queue = queue
        self._name = dlq_name(queue)

    def __await__(self) -> Generator[None, None, AsyncDeadLetterQueue]:
        """``await client.dead_letters(...)`` works too. Making one does no I/O, so the client
        returns it directly; awaiting it gives the same object, for code that awaits every
        AsyncClient method."""
        return self
        yield  # a generator that returns at once

    def __repr__(self) -> str:
        return f"<AsyncDeadLetterQueue {self._name!r}>"

    @property
    def queue(self) -> str:
        """The work queue these dead letters came from, where :meth:`replay` sends them."""
        return self._queue

    @property
    def name(self) -> str:
        """The dead-letter queue's own name, ``f"{queue}.dlq"`` (to inspect or alert on it
        with other tools)."""
        return self._name

    async def _channel(self) -> aiormq.abc.AbstractChannel:
        return await self._link.underlay()

    def _error(self, exc: BaseException, action: str) -> MqkitError:
        what = explain.on_dead_letters(action, self._name)
        return translate(exc, what=what, missing=explain.missing_dlq(self._queue))

    async def count(self) -> int:
        """How many dead letters are waiting."""
        channel = await self._channel()
        try:
            ok = await channel.queue_declare(self._name, passive=True, timeout=RPC_TIMEOUT)
        except _ERRORS as exc:
            raise self._error(exc, "count") from exc
        finally:
            await _close(channel)
        return int(ok.message_count or 0)

    async def peek(self, limit: int = 10) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first; nothing is removed."""
        return await self._read(limit)

    async def export(self, fp: IO[str], limit: int | None = None) -> int:
        """Write dead letters to ``fp`` as JSON lines (``DeadLetter.to_json()``); nothing is
        removed. Returns how many were written."""
        letters = await self._read(limit)
        for letter in letters:
            fp.write(json.dumps(letter.to_json(), ensure_ascii=False) + "\n")
        return len(letters)

    async def _read(self, limit: int | None) -> list[DeadLetter]:
        """basic.get (unacked) up to ``limit`` dead letters, bounded by the count at the
        start, then return them all to the DLQ, in order."""
        channel = await self._channel()
        letters: list[DeadLetter] = []
        try:
            ok = await channel.queue_declare(self._name, passive=True, timeout=RPC_TIMEOUT)
            count = int(ok.message_count or 0)
            for _ in range(scan_bound(count, limit)):
                message = await channel.basic_get(self._name, no_ack=False, timeout=RPC_TIMEOUT)
                if isinstance(message.delivery, spec.Basic.GetEmpty):
                    break
                letters.append(DeadLetter.from_incoming(incoming_of(message), dlq=self._name))
            if letters:
                last = letters[-1].incoming.delivery_tag
                await channel.basic_nack(last, multiple=True, requeue=True)
        except _ERRORS as exc:
            raise self._error(exc, "read") from exc
        finally:
            await _close(channel)
        if letters:
            await self._returned(count)
        return letters

    async def replay(
        self,
        limit: int | None = None,
        *,
        error_type: str | None = None,
        message_id: str | None = None,
        progress: Callable[[int], Any] | None = None,
        to: str | None = None,
    ) -> int:
        """Send dead letters back to :attr:`queue` (or to ``to``); how many were replayed.
        A dead letter's ``x-mqkit-original-queue`` header is not trusted: it could be forged
        to send it anywhere.

        Each re-publish is confirmed before its dead letter is removed. Only dead letters
        matching ``error_type`` / ``message_id`` (when given) are replayed, at most ``limit``;
        the others stay, untouched. The scan covers the messages present at the start.
        ``progress(done)`` is called after each replayed message. If a re-publish fails, that
        dead letter stays and the error is raised after the others were tried.
        """
        channel = await self._channel()
        held: list[int] = []  # looked at, not replayed: returned at the end, in order
        try:
            ok = await channel.queue_declare(self._name, passive=True, timeout=RPC_TIMEOUT)
            replay = Replay(
                self._queue,
                self._name,
                count=int(ok.message_count or 0),
                limit=limit,
                error_type=error_type,
                message_id=message_id,
                progress=progress,
                to=to,
            )
            while not replay.finished:
                message = await channel.basic_get(self._name, no_ack=False, timeout=RPC_TIMEOUT)
                if isinstance(message.delivery, spec.Basic.GetEmpty):
                    break
                letter = replay.letter(incoming_of(message))
                tag = letter.incoming.delivery_tag
                if not replay.wants(letter):
                    held.append(tag)
                    continue
                try:
                    await self._link.publishing.publish(
                        replay.envelope(letter), exchange="", routing_key=replay.target(letter)
                    )
                except MqkitError as exc:
                    replay.failed(letter, exc)
                    held.append(tag)
                    continue
                await channel.basic_ack(tag)
                replay.replayed()
            for tag in held:
                await channel.basic_nack(tag, requeue=True)
        except _ERRORS as exc:
            raise self._error(exc, "replay") from exc
        finally:
            await _close(channel)
        await self._returned(replay.left)
        return replay.result()

    async def _returned(self, expected: int) -> None:
        """Wait (at most RETURN_WAIT) until the DLQ counts ``expected`` letters again."""
        deadline = time.monotonic() + RETURN_WAIT
        while await self.count() < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def purge(self) -> int:
        """Delete every dead letter; how many there were."""
        channel = await self._channel()
        try:
            ok = await channel.queue_purge(self._name, timeout=RPC_TIMEOUT)
        except _ERRORS as exc:
            raise self._error(exc, "purge") from exc
        finally:
            await _close(channel)
        return int(ok.message_count or 0)


async def _close(channel: aiormq.abc.AbstractChannel) -> None:
    try:
        if not channel.is_closed:
            await asyncio.wait_for(channel.close(), timeout=5)
    except Exception as exc:  # closing a channel the broker already closed
        log.debug("mqkit: closing a channel failed: %s", describe(exc))
