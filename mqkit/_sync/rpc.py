"""Request/reply over RabbitMQ's direct reply-to (``amq.rabbitmq.reply-to``).

The requesting side consumes replies no-ack on the client's publishing channel (direct
reply-to requires the channel that publishes the request), one reply consumer per client,
and matches replies to waiting callers (:class:`mqkit.rpc.Pending`: by the request's id a
reply names, else by ``correlation_id``). The responding side is a
consumer whose handler's return value is published to the request's ``reply_to``; if the
handler raises (or returns something that is not a pydantic model) the reply carries
``x-mqkit-error-type`` / ``x-mqkit-error-message`` and the caller gets
:class:`~mqkit.RemoteError`. Requests are never retried. What to send and what a reply means
is decided in :mod:`mqkit.rpc`; this module does the I/O.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

import pika.exceptions as pex
from pika.spec import Basic, BasicProperties
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

from .channel import Channel, Got
from .connection import RPC_ERRORS, RPC_TIMEOUT, translate
from .transport import settle

if TYPE_CHECKING:
    from .connection import Link
    from .consumer import ReplyStep
    from .publisher import Publisher

__all__ = ["Requester", "reply_step"]

log = logging.getLogger("mqkit.rpc")

R = TypeVar("R", bound=BaseModel)


class Requester:
    """The client's RPC caller: one direct reply-to consumer (on the publishing channel of
    ``publisher``), futures by request (:class:`mqkit.rpc.Pending`). ``link`` connects the
    client on first use; requests go through ``middleware``'s publish hooks."""

    def __init__(
        self, link: Link, publisher: Publisher, *, middleware: MiddlewareStack = NO_MIDDLEWARE
    ) -> None:
        self._link = link
        self._publisher = publisher
        self._middleware = middleware
        self._waiting: Pending[Future[Got]] = Pending()
        self._consuming_on: Channel | None = None
        self._lock = threading.Lock()

    def _reply_channel(self, timeout: float) -> Channel:
        """The publishing channel, consuming replies; within ``timeout`` (else TimeoutError)."""
        deadline = time.monotonic() + timeout
        channel = self._publisher.channel(timeout)
        if self._consuming_on is channel and not channel.is_closed:
            return channel
        if not self._lock.acquire(timeout=max(0.001, deadline - time.monotonic())):
            raise TimeoutError("another request is starting the reply consumer")
        try:
            left = max(0.001, deadline - time.monotonic())
            channel = self._publisher.channel(left)
            if self._consuming_on is not channel:
                left = min(RPC_TIMEOUT, max(0.001, deadline - time.monotonic()))
                try:
                    channel.basic_consume(REPLY_TO, self._on_reply, no_ack=True, timeout=left)
                except TimeoutError:
                    raise
                except RPC_ERRORS as exc:
                    raise translate(exc, what="consuming RPC replies") from exc
                self._consuming_on = channel
                channel.close_callbacks.add(self._reply_channel_closed)
        finally:
            self._lock.release()
        return channel

    def _reply_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        """IO thread: replies to requests already sent went to the closed channel: fail
        them now."""
        cause = reply_channel_gone(
            closed_here=isinstance(reason, pex.ChannelClosedByClient),
            closed_by_broker=isinstance(reason, pex.ChannelClosedByBroker),
        )
        self._fail_sent(cause, channel)

    def _fail_sent(self, cause: str, on: Channel | None = None) -> None:
        """Fail the requests sent for replies on ``on`` (``None``: on any channel), whose
        replies can no longer arrive."""
        for future in self._waiting.unanswerable(on):
            settle(future, exc=reply_lost(cause))

    # -- Restorable --------------------------------------------------------------------------

    def _link_lost(self, reason: BaseException) -> None:
        """IO thread: replies to requests already sent can no longer arrive; fail them now."""
        self._fail_sent(LINK_LOST)

    def _restore(self) -> None:
        """Nothing: the next request consumes replies on the new publishing channel."""

    def _on_reply(
        self, _channel: Any, method: Basic.Deliver, properties: BasicProperties, body: bytes
    ) -> None:
        future = self._waiting.answered(properties.headers, properties.correlation_id)
        if future is None or future.done():
            log.debug("dropping a late or unknown RPC reply (%s)", properties.correlation_id)
            return
        settle(future, (method, properties, body))

    def request(
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
        self._link.ensure_open()
        future: Future[Got] = Future()
        self._waiting.add(envelope, future)
        try:
            budget = max(
                0.001, min(deadline - time.monotonic(), self._link.settings.confirm_timeout)
            )
            try:
                channel = self._reply_channel(budget)

                def send(prepared: Sequence[tuple[Envelope, str]]) -> list[str]:
                    [(request, queue)] = prepared
                    self._publisher.publish(
                        request,
                        exchange="",
                        routing_key=queue,
                        mandatory=True,
                        channel=channel,
                        timeout=max(0.001, deadline - time.monotonic()),
                    )
                    return [request.message_id]

                self._middleware.publish_prepared("", [(envelope, queue)], send)
                self._waiting.sent(envelope.message_id, channel)
            except (PublishTimeout, TimeoutError) as exc:
                # The link does not answer: to the caller that is a request without a reply.
                raise request_timeout(queue, timeout) from exc
            try:
                _, properties, body = future.result(max(0.001, deadline - time.monotonic()))
            except TimeoutError:
                raise request_timeout(queue, timeout) from None
        finally:
            self._waiting.discard(envelope.message_id)
        return read_reply(properties.headers, body, response_type)


def reply_step(
    link: Link,
    publisher: Publisher,
    queue: str,
    handler: Callable[[Any, Context], object],
    *,
    middleware: MiddlewareStack = NO_MIDDLEWARE,
) -> ReplyStep:
    """What a responder does with a request instead of the usual ack/retry/dead-letter: run
    the handler and publish :func:`mqkit.rpc.answer`'s reply (never raises). The reply is
    published inside ``middleware``'s handle chain (a trace has it under the handling span),
    through its publish hooks."""
    service = link.settings.service

    def send(prepared: Sequence[tuple[Envelope, str]]) -> list[str]:
        [(envelope, reply_to)] = prepared
        publisher.publish(envelope, exchange="", routing_key=reply_to, mandatory=False)
        return [envelope.message_id]

    def publish(reply: Reply | None, ctx: Context) -> None:
        if reply is None:
            log.warning(
                "request %s on %r has no reply_to; dropping the reply", ctx.message_id, queue
            )
            return
        try:
            middleware.publish_prepared("", [(reply.envelope, reply.reply_to)], send)
        except MqkitError as exc:
            log.error("could not reply to request %s on %r: %s", ctx.message_id, queue, exc)

    def step(incoming: Incoming, message: Any, ctx: Context, failure: GiveUp | None) -> None:
        if failure is not None:
            publish(answer(queue, incoming, service=service, failure=failure), ctx)
            return
        replied = False

        def respond(message: Any, ctx: Context) -> object:
            nonlocal replied
            try:
                result = handler(message, ctx)
            except Exception as exc:
                replied = True
                publish(answer(queue, incoming, service=service, failure=exc), ctx)
                raise
            replied = True
            publish(answer(queue, incoming, service=service, result=result), ctx)
            return result

        try:
            middleware.wrap(respond)(message, ctx)
        except Exception as exc:
            log.warning("responder for %r raised %r", queue, exc, exc_info=exc)
            if not replied:  # a middleware raised before the handler ran
                publish(answer(queue, incoming, service=service, failure=exc), ctx)

    return step
