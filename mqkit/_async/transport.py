"""The publishing channel's frames, written with fewer steps than aiormq's ``basic_publish``.

:func:`send_batch` writes a chunk of publishes (method, header and body frames each) to an
aiormq channel in **one write**, where aiormq's own ``basic_publish`` takes the channel's lock,
builds and queues the frames and registers the confirm once per message. It keeps aiormq's
confirm bookkeeping as ``basic_publish`` does (the delivery tag, the confirmation future, the
message id for returns), so aiormq's own frame handling settles those futures: acks
(``multiple`` included), nacks and returns. Each confirm future (:class:`_Confirm`) hands
itself to the publisher the moment aiormq settles it.

It uses aiormq internals (as of aiormq 7.2): a channel's ``delivery_tag``,
``confirmations``, ``message_id_delivery_tag``, ``write_queue``, ``_split_body``, its lock
and its close event (:data:`_PIPELINE_ATTRS`). A channel without them keeps aiormq's way
(:func:`can_pipeline` is ``False``: one ``basic_publish`` task per message, several times
slower). ``pyproject.toml`` pins aiormq to the versions ``tests/unit/test_private_hooks.py``
passed on, and those tests fail loudly if they change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import aiormq
import aiormq.exceptions as amqp
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.header import ContentHeader

from mqkit.messages import Envelope

__all__ = ["can_pipeline", "idle", "send_batch"]

log = logging.getLogger("mqkit.publisher")

# What the fast path uses of an aiormq channel.
_PIPELINE_ATTRS = (
    "confirmations",
    "create_future",
    "delivery_tag",
    "lock",
    "message_id_delivery_tag",
    "number",
    "publisher_confirms",
    "write_queue",
    "_split_body",
    "_Channel__close_event",
    "_Channel__lock",
)


def can_pipeline(channel: Any) -> bool:
    """Whether ``channel`` is the aiormq 7 channel whose confirm bookkeeping we know."""
    return (
        isinstance(channel, aiormq.Channel)
        and all(hasattr(channel, name) for name in _PIPELINE_ATTRS)
        and bool(channel.publisher_confirms)
    )


def idle(channel: Any) -> bool:
    """Whether ``channel`` is open and a write on it goes out at once: nothing holds its lock
    (another write, or an RPC waiting for its answer) and the writer's queue has room."""
    if channel.is_closed:
        return False
    lock = getattr(channel, "_Channel__lock", None)
    queue = getattr(channel, "write_queue", None)
    return (lock is None or not lock.locked()) and (queue is None or not queue.full())


def _forget(registry: dict[str, int], message_id: str, tag: int, _: Any) -> None:
    if registry.get(message_id) == tag:
        registry.pop(message_id, None)


async def send_batch(
    channel: Any,
    jobs: Sequence[tuple[Envelope, str, str]],
    chunk: Sequence[int],
    mandatory: bool,
    properties: Callable[[Envelope], spec.Basic.Properties],
    settled: Callable[[int, asyncio.Future[Any]], None] | None = None,
) -> list[tuple[int, asyncio.Future[Any]]]:
    """Publish ``chunk`` (indexes into ``jobs``) in one write, with the ``properties`` of each
    envelope, registering each confirm the way aiormq's own ``basic_publish`` does (delivery
    tag, confirmation future, message id for returns).
    ``settled(index, future)`` is told of each confirm the moment aiormq settles it
    (:class:`_Confirm`)."""
    frames: list[Any] = []
    sent: list[tuple[int, asyncio.Future[Any]]] = []
    async with channel.lock:
        # The broker closed the channel and aiormq answered close-ok, but is_closed (which
        # the lock checks) lags behind: a publish frame sent now would make the broker close
        # the whole connection (504 CHANNEL_ERROR).
        if channel._Channel__close_event.is_set():
            raise amqp.ChannelInvalidStateError(f"{channel!r} is closing")
        first = channel.delivery_tag
        for index in chunk:
            envelope, exchange, routing_key = jobs[index]
            channel.delivery_tag += 1
            tag = channel.delivery_tag
            future = (
                channel.create_future()
                if settled is None
                else _Confirm(channel.loop, partial(settled, index))
            )
            channel.confirmations[tag] = future
            channel.message_id_delivery_tag[envelope.message_id] = tag
            future.add_done_callback(
                partial(_forget, channel.message_id_delivery_tag, envelope.message_id, tag)
            )
            frames.append(
                spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
            )
            frames.append(
                ContentHeader(properties=properties(envelope), body_size=len(envelope.body))
            )
            frames.extend(channel._split_body(envelope.body))
            sent.append((index, future))
        try:
            await channel.write_queue.put(
                ChannelFrame.marshall(channel_number=channel.number, frames=frames)
            )
        except BaseException:
            # Never handed to the writer: undo, or the channel's confirm numbering is off.
            for offset, (_, future) in enumerate(sent, start=first + 1):
                channel.confirmations.pop(offset, None)
                future.cancel()
            channel.delivery_tag = first
            raise
    return sent


class _Confirm(asyncio.Future[Any]):
    """The confirmation future of one publish, which hands itself to ``settled`` the moment
    aiormq settles it (ack, nack, return): the publisher's books are kept, and a task waiting
    for it woken, in that same step, as soon as with aiormq's own ``basic_publish`` (a done
    callback would cost a loop iteration per confirm). Closing the channel does not settle
    it: the publisher's close handler takes over what was in flight."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, settled: Callable[[asyncio.Future[Any]], None]
    ) -> None:
        super().__init__(loop=loop)
        self._settled = settled

    def set_result(self, result: Any, /) -> None:
        super().set_result(result)
        self._tell()

    def set_exception(self, exception: Any, /) -> None:
        super().set_exception(exception)
        self._tell()

    def _tell(self) -> None:
        try:  # in aiormq's frame reader: nothing may escape into it
            self._settled(self)
        except Exception:
            log.exception("keeping the books of a publish confirm failed")
