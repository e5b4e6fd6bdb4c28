"""RPC over RabbitMQ's direct reply-to: :class:`Requester` (one per client) and the handler
wrapper behind :meth:`AsyncClient.responder`.

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
from mqkit.dead_letters import ERROR_MESSAGE, ERROR_TYPE
from mqkit.errors import DecodeError, RemoteError, RequestTimeout
from mqkit.messages import Envelope, decode, encode

from .connection import RPC_ERRORS, RPC_TIMEOUT, translate
from .consumer import as_async

if TYPE_CHECKING:
    from .connection import Link
    from .consumer import Handler

__all__ = ["REPLY_TO", "Requester", "Undecodable", "responder_handler"]

log = logging.getLogger("mqkit")

REPLY_TO = "amq.rabbitmq.reply-to"
R = TypeVar("R", bound=BaseModel)


class Requester:
    """Sends requests and routes replies back to their callers."""

    def __init__(self, link: Link, service: str) -> None:
        self._link = link
        self._service = service
        self._waiting: dict[str, asyncio.Future[aiormq.abc.DeliveredMessage]] = {}
        self._consuming_on: aiormq.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def _reply_channel(self, timeout: float) -> aiormq.abc.AbstractChannel:
        channel = await self._link.publishing.channel(timeout)
        if self._consuming_on is channel and not channel.is_closed:
            return channel
        async with self._lock:
            channel = await self._link.publishing.channel(timeout)
            if self._consuming_on is not channel:
                try:
                    await channel.basic_consume(
                        REPLY_TO, self._on_reply, no_ack=True, timeout=RPC_TIMEOUT
                    )
                except RPC_ERRORS as exc:
                    raise translate(exc, what="consuming RPC replies") from exc
                self._consuming_on = channel
        return channel

    async def _on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        correlation_id = message.header.properties.correlation_id
        future = self._waiting.get(correlation_id or "")
        if future is None or future.done():
            log.debug("mqkit: dropping a late or unknown RPC reply (%s)", correlation_id)
            return
        future.set_result(message)

    async def request(
        self, queue: str, message: BaseModel, response_type: type[R], timeout: float
    ) -> R:
        """Send ``message`` to ``queue`` and wait up to ``timeout`` for the typed reply."""
        if not isinstance(message, BaseModel):
            raise TypeError(f"request expected a pydantic model, got {type(message).__name__}")
        deadline = time.monotonic() + timeout
        correlation_id = uuid.uuid4().hex
        envelope = encode(
            message, service=self._service, correlation_id=correlation_id, reply_to=REPLY_TO
        )
        future: asyncio.Future[aiormq.abc.DeliveredMessage] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting[correlation_id] = future
        try:
            budget = max(
                0.001, min(deadline - time.monotonic(), self._link.settings.confirm_timeout)
            )
            channel = await self._reply_channel(budget)
            await self._link.publishing.publish(
                envelope,
                exchange="",
                routing_key=queue,
                mandatory=True,
                channel=channel,
                timeout=max(0.001, deadline - time.monotonic()),
            )
            try:
                reply = await asyncio.wait_for(future, max(0.001, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise RequestTimeout(
                    f"no reply from queue {queue!r} within {timeout:g}s; is a responder running?"
                ) from None
        finally:
            self._waiting.pop(correlation_id, None)
        headers = reply.header.properties.headers or {}
        if ERROR_TYPE in headers:
            raise RemoteError(_text(headers.get(ERROR_TYPE)), _text(headers.get(ERROR_MESSAGE)))
        return decode(reply.body, response_type)


class Undecodable(BaseModel):
    """Stands in for a request body that does not decode: the responder answers with the
    error instead of dead-lettering (an RPC caller is waiting)."""

    error: str


def request_decoder(request_type: type[BaseModel]) -> Any:
    """A decoder that turns a bad body into :class:`Undecodable` instead of raising."""

    def _decode(body: bytes, _type: str | None) -> BaseModel:
        try:
            return decode(body, request_type)
        except DecodeError as exc:
            return Undecodable(error=str(exc))

    return _decode


def responder_handler(link: Link, queue: str, service: str, handler: Handler[Any]) -> Handler[Any]:
    """Wrap a responder's handler: publish its return value (or the error) to the caller."""
    handler = as_async(handler)

    async def respond(request: Any, ctx: Context) -> None:
        error: tuple[str, str] | None = None
        result: Any = None
        if isinstance(request, Undecodable):
            error = ("DecodeError", request.error)
        else:
            try:
                result = await handler(request, ctx)
            except Exception as exc:
                log.warning("mqkit: responder for %r raised %s: %s", queue, type(exc).__name__, exc)
                error = (type(exc).__name__, str(exc))
            else:
                if not isinstance(result, BaseModel):
                    error = (
                        "TypeError",
                        f"responder for {queue!r} returned {type(result).__name__}; "
                        "return a pydantic model",
                    )
        if not ctx.reply_to:
            log.warning(
                "mqkit: request %s on %r has no reply_to; the reply is dropped",
                ctx.message_id,
                queue,
            )
            return
        if error is None:
            envelope = encode(result, service=service, correlation_id=ctx.correlation_id)
        else:
            envelope = _error_envelope(error, service=service, correlation_id=ctx.correlation_id)
        try:
            await link.publishing.publish(
                envelope, exchange="", routing_key=ctx.reply_to, mandatory=False
            )
        except Exception as exc:  # the caller times out; an RPC request is not retried
            log.warning(
                "mqkit: could not reply to request %s on %r: %s", ctx.message_id, queue, exc
            )

    return respond


def _error_envelope(
    error: tuple[str, str], *, service: str, correlation_id: str | None
) -> Envelope:
    error_type, error_message = error
    return Envelope(
        body=b"{}",
        message_id=uuid.uuid4().hex,
        type="mqkit.RemoteError",
        app_id=service,
        timestamp=int(time.time()),
        headers={ERROR_TYPE: error_type, ERROR_MESSAGE: error_message[:4000]},
        correlation_id=correlation_id,
    )


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)
