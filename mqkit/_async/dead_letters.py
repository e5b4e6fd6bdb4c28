"""AsyncDeadLetterQueue: look at, replay, export and purge a queue's dead letters."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

import aiormq.abc
import aiormq.exceptions as amqp
from pamqp import commands as spec

from mqkit.dead_letters import DeadLetter, replay_headers
from mqkit.errors import MqkitError, TopologyError
from mqkit.messages import Incoming, to_datetime
from mqkit.topology import dlq_name

from .connection import RPC_ERRORS, RPC_TIMEOUT, describe, translate

if TYPE_CHECKING:
    from .connection import Link

__all__ = ["AsyncDeadLetterQueue"]

log = logging.getLogger("mqkit")

_ERRORS = RPC_ERRORS


def incoming_of(message: aiormq.abc.DeliveredMessage) -> Incoming:
    """An :class:`Incoming` for a basic.get result."""
    props = message.header.properties
    delivery: Any = message.delivery
    return Incoming(
        body=message.body,
        delivery_tag=delivery.delivery_tag,
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        type=props.message_type,
        app_id=props.app_id,
        content_type=props.content_type,
        timestamp=to_datetime(props.timestamp),
        headers=props.headers or {},
        priority=props.priority,
        expiration=props.expiration,
        redelivered=bool(delivery.redelivered),
        exchange=delivery.exchange or "",
        routing_key=delivery.routing_key or "",
    )


class AsyncDeadLetterQueue:
    """The dead letters of ``queue`` (kept in ``f"{queue}.dlq"``); made by
    :meth:`AsyncClient.dead_letters`. Nothing is removed except by :meth:`replay` (after the
    re-publish is confirmed) and :meth:`purge`."""

    def __init__(self, link: Link, queue: str) -> None:
        self._link = link
        self._queue = queue
        self._name = dlq_name(queue)

    def __repr__(self) -> str:
        return f"<AsyncDeadLetterQueue {self._name!r}>"

    @property
    def queue(self) -> str:
        """The work queue these dead letters came from."""
        return self._queue

    @property
    def name(self) -> str:
        """The dead-letter queue's own name."""
        return self._name

    async def _channel(self) -> aiormq.abc.AbstractChannel:
        return await self._link.underlay()

    def _error(self, exc: BaseException, what: str) -> MqkitError:
        if isinstance(exc, amqp.ChannelNotFoundEntity):
            return TopologyError(
                f"dead-letter queue {self._name!r} does not exist; it is declared when a "
                f"consumer of {self._queue!r} starts"
            )
        return translate(exc, what=f"{what} {self._name!r}")

    async def count(self) -> int:
        """How many dead letters are waiting."""
        channel = await self._channel()
        try:
            ok = await channel.queue_declare(self._name, passive=True, timeout=RPC_TIMEOUT)
        except _ERRORS as exc:
            raise self._error(exc, "counting") from exc
        finally:
            await _close(channel)
        return int(ok.message_count or 0)

    async def _take(
        self, channel: aiormq.abc.AbstractChannel, limit: int | None
    ) -> list[tuple[int, Incoming]]:
        """basic.get (unacked) up to ``limit`` messages, bounded by the count at the start."""
        ok = await channel.queue_declare(self._name, passive=True, timeout=RPC_TIMEOUT)
        bound = int(ok.message_count or 0)
        if limit is not None:
            bound = min(bound, limit)
        taken: list[tuple[int, Incoming]] = []
        while len(taken) < bound:
            message = await channel.basic_get(self._name, no_ack=False, timeout=RPC_TIMEOUT)
            if isinstance(message.delivery, spec.Basic.GetEmpty):
                break
            incoming = incoming_of(message)
            taken.append((incoming.delivery_tag, incoming))
        return taken

    async def peek(self, limit: int = 10) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first; nothing is removed."""
        channel = await self._channel()
        try:
            taken = await self._take(channel, limit)
            if taken:
                await channel.basic_nack(taken[-1][0], multiple=True, requeue=True)
        except _ERRORS as exc:
            raise self._error(exc, "peeking at") from exc
        finally:
            await _close(channel)
        return [DeadLetter.from_incoming(incoming, dlq=self._name) for _, incoming in taken]

    async def export(self, fp: IO[str], limit: int | None = None) -> int:
        """Write dead letters to ``fp`` as JSON lines (``DeadLetter.to_json()``); nothing is
        removed. Returns how many were written."""
        channel = await self._channel()
        try:
            taken = await self._take(channel, limit)
            for _, incoming in taken:
                letter = DeadLetter.from_incoming(incoming, dlq=self._name)
                fp.write(json.dumps(letter.to_json(), ensure_ascii=False) + "\n")
            if taken:
                await channel.basic_nack(taken[-1][0], multiple=True, requeue=True)
        except _ERRORS as exc:
            raise self._error(exc, "exporting") from exc
        finally:
            await _close(channel)
        return len(taken)

    async def replay(
        self,
        limit: int | None = None,
        *,
        error_type: str | None = None,
        message_id: str | None = None,
        progress: Callable[[int], Any] | None = None,
    ) -> int:
        """Send dead letters back to their original queue; how many were replayed.

        Each re-publish is confirmed before its dead letter is removed. Only dead letters
        matching ``error_type`` / ``message_id`` (when given) are replayed, at most ``limit``;
        the others stay, untouched. The scan covers the messages present at the start.
        ``progress(done)`` is called after each replayed message. If a re-publish fails, that
        dead letter stays and the error is raised after the others were tried.
        """
        channel = await self._channel()
        replayed = 0
        failure: MqkitError | None = None
        held: list[int] = []  # looked at, not replayed: returned at the end, in order
        try:
            ok = await channel.queue_declare(self._name, passive=True, timeout=RPC_TIMEOUT)
            for _ in range(int(ok.message_count or 0)):
                if limit is not None and replayed >= limit:
                    break
                message = await channel.basic_get(self._name, no_ack=False, timeout=RPC_TIMEOUT)
                if isinstance(message.delivery, spec.Basic.GetEmpty):
                    break
                incoming = incoming_of(message)
                letter = DeadLetter.from_incoming(incoming, dlq=self._name)
                if (error_type is not None and letter.error_type != error_type) or (
                    message_id is not None and letter.message_id != message_id
                ):
                    held.append(incoming.delivery_tag)
                    continue
                envelope = dataclasses.replace(
                    incoming.republished({}), headers=replay_headers(incoming.headers)
                )
                target = letter.original_queue or self._queue
                try:
                    await self._link.publishing.publish(envelope, exchange="", routing_key=target)
                except MqkitError as exc:
                    log.error(
                        "mqkit: could not replay %s to %r: %s", letter.message_id, target, exc
                    )
                    failure = failure or exc
                    held.append(incoming.delivery_tag)
                    continue
                await channel.basic_ack(incoming.delivery_tag)
                replayed += 1
                if progress is not None:
                    progress(replayed)
            for tag in held:
                await channel.basic_nack(tag, requeue=True)
        except _ERRORS as exc:
            raise self._error(exc, "replaying") from exc
        finally:
            await _close(channel)
        if failure is not None:
            raise failure
        return replayed

    async def purge(self) -> int:
        """Delete every dead letter; how many there were."""
        channel = await self._channel()
        try:
            ok = await channel.queue_purge(self._name, timeout=RPC_TIMEOUT)
        except _ERRORS as exc:
            raise self._error(exc, "purging") from exc
        finally:
            await _close(channel)
        return int(ok.message_count or 0)


async def _close(channel: aiormq.abc.AbstractChannel) -> None:
    try:
        if not channel.is_closed:
            await asyncio.wait_for(channel.close(), timeout=5)
    except Exception as exc:  # closing a channel the broker already closed
        log.debug("mqkit: closing a channel failed: %s", describe(exc))
