"""RPC over RabbitMQ's direct reply-to: :class:`Requester` (one per client) and the reply
step behind :meth:`AsyncClient.responder`. What to send and what a reply means is decided
in :mod:`mqkit.rpc`; this module does the I/O.

Requests are published (mandatory, confirmed) on the client's publishing channel with
``reply_to="amq.rabbitmq.reply-to"``; replies come back on that same channel to a no-ack
consumer of the pseudo-queue and are matched to waiting futures
(:class:`mqkit.rpc.Pending`: by the request's id a reply names, else by ``correlation_id``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import aiormq.abc
import aiormq.exceptions as amqp
from pydantic import BaseModel

from mqkit.context import Context
from mqkit.errors import MqkitError, PublishTimeout
from mqkit.messages import Envelope, Incoming
from mqkit.middleware import NO_MIDDLEWARE, MiddlewareStack
from mqkit.retry import GiveUp
from mqkit.rpc import (
    LINK_LOST,
    REPLY_TO,
    Pending,
    Reply,
    answer,
    read_reply,
    reply_channel_gone,
    reply_lost,
    request_envelope,
    request_timeout,
)

from .channel import Channel
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
    ``publisher``), futures by request (:class:`mqkit.rpc.Pending`); requests go through
    ``middleware``'s publish hooks."""

    def __init__(
        self, link: Link, publisher: Publisher, *, middleware: MiddlewareStack = NO_MIDDLEWARE
    ) -> None:
        self._link = link
        self._publisher = publisher
        self._middleware = middleware
        self._waiting: Pending[asyncio.Future[aiormq.abc.DeliveredMessage]] = Pending()
        self._consuming_on: Channel | None = None
        self._lock = asyncio.Lock()

    async def _reply_channel(self, timeout: float) -> Channel:
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
                channel.closing.add_done_callback(partial(self._reply_channel_closed, channel))
        finally:
            self._lock.release()
        return channel

    def _reply_channel_closed(self, channel: Channel, closing: asyncio.Future[Any]) -> None:
        """Replies to requests already sent went to the closed channel: fail them now."""
        exc = None if closing.cancelled() else closing.exception()
        cause = reply_channel_gone(
            closed_here=exc is None or isinstance(exc, asyncio.CancelledError),
            closed_by_broker=isinstance(exc, amqp.AMQPChannelError),
        )
        self._fail_sent(cause, channel)

    def _fail_sent(self, cause: str, on: Channel | None = None) -> None:
        """Fail the requests sent for replies on ``on`` (``None``: on any channel), whose
        replies can no longer arrive."""
        for future in self._waiting.unanswerable(on):
            if not future.done():
                future.set_exception(reply_lost(cause))

    # -- AsyncRestorable -----------------------------------------------------------------

    def _link_lost(self, reason: BaseException) -> None:
        """Replies to requests already sent can no longer arrive; fail them now."""
        self._fail_sent(LINK_LOST)

    async def _restore(self) -> None:
        """Nothing: the next request consumes replies on the new publishing channel."""

    async def _on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        properties = message.header.properties
        future = self._waiting.answered(properties.headers, properties.correlation_id)
        if future is None or future.done():
            log.debug("dropping a late or unknown RPC reply (%s)", properties.correlation_id)
            return
        future.set_result(message)

    async def request(
        self,
        queue: str,
        message: BaseModel,
        response_type: type[R],
        timeout: float,
        *,
        headers: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
    ) -> R:
        """Send ``message`` to ``queue`` and wait up to ``timeout`` for the typed reply."""
        deadline = time.monotonic() + timeout
        envelope = request_envelope(
            message,
            service=self._link.settings.service,
            correlation_id=correlation_id,
            headers=headers,
        )
        future: asyncio.Future[aiormq.abc.DeliveredMessage] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting.add(envelope, future)
        try:
            budget = max(
                0.001, min(deadline - time.monotonic(), self._link.settings.confirm_timeout)
            )
            try:
                channel = await self._reply_channel(budget)

                async def send(prepared: Sequence[tuple[Envelope, str]]) -> list[str]:
                    [(request, queue)] = prepared
                    await self._publisher.publish(
                        request,
                        exchange="",
                        routing_key=queue,
                        mandatory=True,
                        channel=channel,
                        timeout=max(0.001, deadline - time.monotonic()),
                    )
                    return [request.message_id]

                await self._middleware.publish_prepared_async("", [(envelope, queue)], send)
                self._waiting.sent(envelope.message_id, channel)
            except (PublishTimeout, asyncio.TimeoutError) as exc:
                # The link does not answer: to the caller that is a request without a reply.
                raise request_timeout(queue, timeout) from exc
            try:
                reply = await asyncio.wait_for(future, max(0.001, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise request_timeout(queue, timeout) from None
        finally:
            self._waiting.discard(envelope.message_id)
        return read_reply(reply.header.properties.headers, reply.body, response_type)


def reply_step(
    link: Link,
    publisher: Publisher,
    queue: str,
    handler: Handler[Any],
    *,
    middleware: MiddlewareStack = NO_MIDDLEWARE,
) -> ReplyStep:
    """What a responder does with a request instead of the usual ack/retry/dead-letter: run
    the handler and publish :func:`mqkit.rpc.answer`'s reply (never raises). The reply is
    published inside ``middleware``'s handle chain (a trace has it under the handling span),
    through its publish hooks."""
    handler = as_async(handler)
    service = link.settings.service

    async def send(prepared: Sequence[tuple[Envelope, str]]) -> list[str]:
        [(envelope, reply_to)] = prepared
        await publisher.publish(envelope, exchange="", routing_key=reply_to, mandatory=False)
        return [envelope.message_id]

    async def publish(reply: Reply | None, ctx: Context) -> None:
        if reply is None:
            log.warning(
                "request %s on %r has no reply_to; dropping the reply", ctx.message_id, queue
            )
            return
        try:
            await middleware.publish_prepared_async("", [(reply.envelope, reply.reply_to)], send)
        except MqkitError as exc:  # the caller times out; an RPC request is not retried
            log.error("could not reply to request %s on %r: %s", ctx.message_id, queue, exc)

    async def step(incoming: Incoming, message: Any, ctx: Context, failure: GiveUp | None) -> None:
        if failure is not None:
            await publish(answer(queue, incoming, service=service, failure=failure), ctx)
            return
        replied = False

        async def respond(message: Any, ctx: Context) -> object:
            nonlocal replied
            try:
                result = await handler(message, ctx)
            except asyncio.CancelledError:
                if cancelling():
                    raise
                # answer() describes Exceptions; the caller sees an error reply either way.
                error = RuntimeError("the handler raised CancelledError")
                replied = True
                await publish(answer(queue, incoming, service=service, failure=error), ctx)
                raise error from None
            except Exception as exc:
                replied = True
                await publish(answer(queue, incoming, service=service, failure=exc), ctx)
                raise
            replied = True
            await publish(answer(queue, incoming, service=service, result=result), ctx)
            return result

        try:
            await middleware.wrap_async(respond)(message, ctx)
        except asyncio.CancelledError:
            if cancelling():
                raise
            log.warning("responder for %r: a middleware raised CancelledError", queue)
        except Exception as exc:
            log.warning("responder for %r raised %r", queue, exc, exc_info=exc)
            if not replied:  # a middleware raised before the handler ran
                await publish(answer(queue, incoming, service=service, failure=exc), ctx)

    return step
