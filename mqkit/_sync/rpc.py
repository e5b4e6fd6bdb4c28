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
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, TypeVar

from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.spec import Basic, BasicProperties
from pydantic import BaseModel

from mqkit.context import Context
from mqkit.errors import MqkitError
from mqkit.messages import Envelope, Incoming
from mqkit.middleware import NO_MIDDLEWARE, MiddlewareStack
from mqkit.retry import GiveUp
from mqkit.rpc import (
    REPLY_TO,
    Pending,
    Reply,
    answer,
    read_reply,
    reply_lost,
    request_envelope,
    request_timeout,
)

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
        self._lock = threading.Lock()
        self._consuming = False
        self._hooked = False  # IO thread
        self._consume_sent: Channel | None = None  # IO thread: basic.consume issued on it
        self._consumed_on: Channel | None = None  # IO thread: consume-ok received on it
        self._waiter: Future[None] | None = None
        self._waiting: Pending[Future[tuple[BasicProperties, bytes]]] = Pending()

    def _ensure_consuming(self) -> None:
        if self._consuming:
            return
        with self._lock:
            if self._consuming:
                return

            def op(_connection: SelectConnection, future: Future[None]) -> None:
                self._waiter = future
                publisher = self._publisher
                if not self._hooked:  # one reply consumer per channel, ever
                    self._hooked = True
                    publisher.add_channel_hook(self._consume)
                    return
                # An earlier call timed out waiting for consume-ok: settle now if it came
                # since, consume if this channel never was asked; else consume-ok is on its
                # way (asking twice would make the broker close the channel).
                channel = publisher.channel
                if channel is None:
                    publisher.reopen()  # the hook consumes once it is open
                elif channel is self._consumed_on:
                    settle(future)
                elif channel is not self._consume_sent:
                    self._consume(channel)

            self._link.call(
                op, self._link.settings.connect_timeout, what="start the RPC reply consumer"
            )
            self._consuming = True

    def _consume(self, channel: Channel) -> None:
        """IO thread: consume replies on the publishing channel (each time it opens)."""
        if self._consume_sent is not None and channel is not self._consume_sent:
            # A new publishing channel (after a nack, or the broker closed the old one):
            # replies to requests sent on the old one went to it and are lost.
            self._fail_sent("the publishing channel was replaced", self._consume_sent)
        self._consume_sent = channel

        def consuming(_frame: object) -> None:
            self._consumed_on = channel
            if self._waiter is not None:
                settle(self._waiter)

        channel.basic_consume(REPLY_TO, self._on_reply, auto_ack=True, callback=consuming)

    def _on_reply(
        self, _channel: Channel, _method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        future = self._waiting.answered(props.headers, props.correlation_id)
        if future is not None:
            settle(future, (props, body))

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
        """Publish ``message`` to ``queue`` and wait up to ``timeout`` s for the typed reply."""
        started = time.monotonic()
        envelope = request_envelope(
            message,
            service=self._link.settings.service,
            correlation_id=correlation_id,
            headers=headers,
        )
        request_id = envelope.message_id
        self._link.ensure_open()
        self._ensure_consuming()
        future: Future[tuple[BasicProperties, bytes]] = Future()
        self._waiting.add(envelope, future)
        try:
            self._middleware.publish_prepared("", [(envelope, queue)], self._send)
            self._waiting.sent(request_id, self._consume_sent)
            left = max(0.0, timeout - (time.monotonic() - started))
            props, body = future.result(left)
        except FutureTimeout:
            raise request_timeout(queue, timeout) from None
        finally:
            self._waiting.discard(request_id)
        return read_reply(props.headers, body, response_type)

    def _send(self, prepared: Sequence[tuple[Envelope, str]]) -> list[str]:
        [(envelope, queue)] = prepared
        self._publisher.publish(envelope, exchange="", routing_key=queue, mandatory=True)
        return [envelope.message_id]

    # -- Restorable --------------------------------------------------------------------------

    def _link_lost(self, reason: BaseException) -> None:
        """IO thread: replies to requests already sent can no longer arrive; fail them now."""
        self._fail_sent("the connection was lost")

    def _fail_sent(self, cause: str, on: Channel | None = None) -> None:
        """IO thread: fail the requests sent for replies on ``on`` (``None``: on any
        channel), whose replies can no longer arrive."""
        for future in self._waiting.unanswerable(on):
            settle(future, exc=reply_lost(cause))

    def _restore(self) -> None:
        """Nothing: the publishing channel's hook consumes again."""


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
