"""RPC over RabbitMQ's direct reply-to: :class:`Requester` (one per client) and the reply
step behind :meth:`AsyncClient.responder`. What to send and what a reply means is decided
in :mod:`mqkit.rpc`; this module does the I/O.

Requests are published (mandatory, confirmed) on the client's publishing channel with
``reply_to="amq.rabbitmq.reply-to"``; replies come back on that same channel to a no-ack
consumer of the pseudo-queue and are matched to waiting futures by ``correlation_id``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, TypeVar

import aiormq.abc
from pydantic import BaseModel

from mqkit.context import Context
from mqkit.errors import MqkitError, PublishTimeout
from mqkit.messages import Incoming
from mqkit.retry import GiveUp
from mqkit.rpc import REPLY_TO, answer, read_reply, request_envelope, request_timeout

from .connection import RPC_ERRORS, RPC_TIMEOUT, cancelling, translate
from .consumer import as_async

if TYPE_CHECKING:
    from .connection import Link
    from .consumer import Handler, ReplyStep
    from .publisher import Publisher

__all__ = ["Requester", "reply_step"]

log = logging.getLogger("mqkit.rpc")

R = TypeVar("R", bound=BaseModel)


class Requester:
    """The client's RPC caller: one direct reply-to consumer (on the publishing channel of
    ``publisher``), futures by correlation id."""

    def __init__(self, link: Link, publisher: Publisher) -> None:
        self._link = link
        self._publisher = publisher
        self._waiting: dict[str, asyncio.Future[aiormq.abc.DeliveredMessage]] = {}
        self._consuming_on: aiormq.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def _reply_channel(self, timeout: float) -> aiormq.abc.AbstractChannel:
        """The publishing channel, consuming replies; within ``timeout`` (else TimeoutError)."""
        deadline = time.monotonic() + timeout
        channel = await self._publisher.channel(timeout)
        if self._consuming_on is channel and not channel.is_closed:
            return channel
        await asyncio.wait_for(self._lock.acquire(), max(0.001, deadline - time.monotonic()))
        try:
            left = max(0.001, deadline - time.monotonic())
            channel = await self._publisher.channel(left)
            if self._consuming_on is not channel:
                left = min(RPC_TIMEOUT, max(0.001, deadline - time.monotonic()))
                try:
                    await channel.basic_consume(REPLY_TO, self._on_reply, no_ack=True, timeout=left)
                except asyncio.TimeoutError:
                    raise
                except RPC_ERRORS as exc:
                    raise translate(exc, what="consuming RPC replies") from exc
                self._consuming_on = channel
        finally:
            self._lock.release()
        return channel

    async def _on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        correlation_id = message.header.properties.correlation_id
        future = self._waiting.get(correlation_id or "")
        if future is None or future.done():
            log.debug("dropping a late or unknown RPC reply (%s)", correlation_id)
            return
        future.set_result(message)

    async def request(
        self, queue: str, message: BaseModel, response_type: type[R], timeout: float
    ) -> R:
        """Send ``message`` to ``queue`` and wait up to ``timeout`` for the typed reply."""
        deadline = time.monotonic() + timeout
        correlation_id = uuid.uuid4().hex
        envelope = request_envelope(
            message, service=self._link.settings.service, correlation_id=correlation_id
        )
        future: asyncio.Future[aiormq.abc.DeliveredMessage] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting[correlation_id] = future
        try:
            budget = max(
                0.001, min(deadline - time.monotonic(), self._link.settings.confirm_timeout)
            )
            try:
                channel = await self._reply_channel(budget)
                await self._publisher.publish(
                    envelope,
                    exchange="",
                    routing_key=queue,
                    mandatory=True,
                    channel=channel,
                    timeout=max(0.001, deadline - time.monotonic()),
                )
            except (PublishTimeout, asyncio.TimeoutError) as exc:
                # The link does not answer: to the caller that is a request without a reply.
                raise request_timeout(queue, timeout) from exc
            try:
                reply = await asyncio.wait_for(future, max(0.001, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise request_timeout(queue, timeout) from None
        finally:
            self._waiting.pop(correlation_id, None)
        return read_reply(reply.header.properties.headers, reply.body, response_type)


def reply_step(link: Link, publisher: Publisher, queue: str, handler: Handler[Any]) -> ReplyStep:
    """What a responder does with a request instead of the usual ack/retry/dead-letter: run
    the handler and publish :func:`mqkit.rpc.answer`'s reply (never raises)."""
    handler = as_async(handler)
    service = link.settings.service

    async def step(incoming: Incoming, message: Any, ctx: Context, failure: GiveUp | None) -> None:
        outcome: GiveUp | Exception | None = failure
        result: object = None
        if failure is None:
            try:
                result = await handler(message, ctx)
            except asyncio.CancelledError as exc:
                if cancelling():
                    raise
                log.warning("responder for %r raised %r", queue, exc, exc_info=exc)
                # answer() describes Exceptions; the caller sees an error reply either way.
                outcome = RuntimeError("the handler raised CancelledError")
            except Exception as exc:
                log.warning("responder for %r raised %r", queue, exc, exc_info=exc)
                outcome = exc
        reply = answer(queue, incoming, service=service, result=result, failure=outcome)
        if reply is None:
            log.warning(
                "request %s on %r has no reply_to; dropping the reply", ctx.message_id, queue
            )
            return
        try:
            await publisher.publish(
                reply.envelope, exchange="", routing_key=reply.reply_to, mandatory=False
            )
        except MqkitError as exc:  # the caller times out; an RPC request is not retried
            log.error("could not reply to request %s on %r: %s", ctx.message_id, queue, exc)

    return step
