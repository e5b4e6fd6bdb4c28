"""Where a producer publishes and what it sends, as plain values the shells carry out.

Both producers (``_sync/producer.py``, ``_async/producer.py``) and both event buses hold a
:class:`PublishTarget` and ask it for the routing key and the envelope of each message; the
shells only hand the envelope to their publisher. :func:`plan_producer` is what
``client.producer(...)`` decides before any I/O: the target, and what to declare first.

```python
target, declare = plan_producer(Order, queue="orders", exchange=None, routing_key=None,
                                default_type="quorum", delivery_limit=20, declared=())
[(envelope, key)] = target.prepare([order], service="billing")  # TypeError if not an Order
assert key == "orders"
```

After a ``basic.nack`` both publishers replace their channel (:class:`ChannelRenewal`) and
send the nacked message once more on the new one (:func:`retry_nacked`). A message above the
broker's size limit fails alone, before it is sent when the limit is known (:class:`SizeLimit`).
Both publishers apply these through their :class:`mqkit.ledger.Ledger`, which keeps what is in
flight.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from mqkit import explain
from mqkit.errors import ConfigError, PublishTooLarge
from mqkit.messages import Envelope, Event, encode
from mqkit.topology import Entity, Exchange, Queue, QueueType, consumer_topology

__all__ = [
    "CONFIRM_WINDOW",
    "NACK_RETRIES",
    "RENEW_INTERVAL",
    "SEND_CHUNK",
    "ChannelRenewal",
    "PublishTarget",
    "SizeLimit",
    "check_model",
    "missing_exchange",
    "plan_producer",
    "retry_nacked",
]

T = TypeVar("T", bound=BaseModel)

# Publishes in flight (sent, not yet confirmed) per client: enough to keep the broker busy,
# bounded memory. Both publishers hold at most this many.
CONFIRM_WINDOW = 1000
# publish_many hands messages to the I/O side in chunks of this many, so sending starts while
# the rest are still being encoded.
SEND_CHUNK = 256

_MISSING_EXCHANGE = re.compile(r"\bno exchange '(?P<name>[^']*)'")


def missing_exchange(reply_code: int | None, reply_text: str) -> str | None:
    """The exchange the broker says does not exist when it closes a publishing channel
    (``404 NOT_FOUND - no exchange 'orders' in vhost '/'``), else ``None``. Only publishes to
    that exchange fail; the others in flight on the channel go again on a new one."""
    if reply_code not in (None, 404):
        return None
    match = _MISSING_EXCHANGE.search(reply_text)
    return match["name"] if match else None


def check_model(message_type: object, what: str) -> None:
    """Raise :class:`ConfigError` unless ``message_type`` is a pydantic model class
    (``what``: the factory that was given it, e.g. "producer")."""
    if not (isinstance(message_type, type) and issubclass(message_type, BaseModel)):
        raise ConfigError(f"{what} expects a pydantic model class, got {message_type!r}")


@dataclass(frozen=True)
class PublishTarget(Generic[T]):
    """Where ``T`` messages go: a ``queue`` (the default exchange, routing key = the queue)
    or an ``exchange`` with an optional default ``routing_key``.

    ``owner`` names the publisher in a ``TypeError`` ("Producer[Order]", "EventBus").
    """

    message_type: type[T]
    exchange: str = ""
    routing_key: str | None = None
    queue: str | None = None
    owner: str = ""

    @property
    def label(self) -> str:
        """How this publisher is named in messages: ``owner``, else ``Producer[T]``."""
        return self.owner or f"Producer[{self.message_type.__name__}]"

    def describe(self) -> str:
        """ "queue='orders'" or "exchange='shop'", for ``repr()``."""
        if self.queue is not None:
            return f"queue={self.queue!r}"
        return f"exchange={self.exchange!r}"

    def route(self, message: BaseModel, routing_key: str | None = None) -> str:
        """The routing key for ``message``: the queue for a queue producer (a different
        ``routing_key`` is a :class:`ConfigError`); else ``routing_key``, else the target's,
        else the :class:`~mqkit.Event`'s ``event_type``, else ``""``."""
        if self.queue is not None:
            if routing_key is not None and routing_key != self.queue:
                raise ConfigError(
                    f"this producer publishes to queue {self.queue!r}; routing_key does not "
                    "apply (use client.producer(..., exchange=...) to route by key)"
                )
            return self.queue
        if routing_key is not None:
            return routing_key
        if self.routing_key is not None:
            return self.routing_key
        if isinstance(message, Event):
            return type(message).event_type
        return ""

    def check(self, message: object) -> T:
        """``message`` if it is a ``T``; else ``TypeError`` ("Producer[Order].publish expected
        Order, got dict")."""
        if not isinstance(message, self.message_type):
            raise TypeError(
                f"{self.label}.publish expected {self.message_type.__name__}, "
                f"got {type(message).__name__}"
            )
        return message

    def prepare(
        self,
        messages: Iterable[object],
        *,
        service: str,
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        priority: int | None = None,
        expiration: float | None = None,
    ) -> list[tuple[Envelope, str]]:
        """Each message's envelope (:func:`mqkit.messages.encode`, ``expiration`` in seconds)
        and routing key (:meth:`route`). A message that is not a ``T`` raises ``TypeError``
        (:meth:`check`) before anything is published; ``message_id`` with more than one
        message is a :class:`ConfigError` (a returned message is matched to its publish by
        id, so ids in one batch must differ)."""
        checked = [self.check(message) for message in messages]
        if message_id is not None and len(checked) > 1:
            raise ConfigError(
                "message_id= names one message; publish_many gives each message its own id "
                "(leave message_id unset, or publish the messages one by one)"
            )
        prepared = []
        for message in checked:
            envelope = encode(
                message,
                service=service,
                headers=headers,
                message_id=message_id,
                correlation_id=correlation_id,
                priority=priority,
                expiration=expiration,
            )
            prepared.append((envelope, self.route(message, routing_key)))
        return prepared


def plan_producer(
    message_type: type[T],
    *,
    queue: str | Queue | None,
    exchange: str | Exchange | None,
    routing_key: str | None,
    default_type: QueueType,
    delivery_limit: int,
    declared: Iterable[Entity],
) -> tuple[PublishTarget[T], tuple[Entity, ...]]:
    """What ``client.producer(...)`` makes: the target, and the entities to declare first.

    Exactly one of ``queue`` / ``exchange`` (else :class:`ConfigError`). A ``queue`` gets its
    DLQ and the work queue with exactly the arguments its consumer will use, unless this
    client ``declared`` a queue of that name itself (declaring it again with the consumer's
    arguments would conflict with what the user chose). An :class:`Exchange` is declared; an
    exchange name is used as it is.
    """
    if (queue is None) == (exchange is None):
        raise ConfigError("producer() needs exactly one of queue= or exchange=")
    check_model(message_type, "producer")
    if queue is not None:
        work = queue if isinstance(queue, Queue) else Queue(queue)
        if routing_key is not None:
            raise ConfigError(
                f"producer(queue={work.name!r}) publishes to that queue; routing_key applies "
                "to exchange producers only"
            )
        target: PublishTarget[T] = PublishTarget(message_type, queue=work.name)
        if any(isinstance(e, Queue) and e.name == work.name for e in declared):
            return target, ()
        entities = consumer_topology(
            work, None, default_type=default_type, delivery_limit=delivery_limit
        )
        return target, tuple(entities)
    if isinstance(exchange, Exchange):
        return PublishTarget(message_type, exchange.name, routing_key), (exchange,)
    assert exchange is not None
    return PublishTarget(message_type, exchange, routing_key), ()


# -- after a nack ----------------------------------------------------------------------------
#
# RabbitMQ 3.10 nacks every later publish of a channel to a quorum queue when that channel's
# first publish to it landed while the queue's leader was down: the channel's queue session
# keeps asking the dead node and never learns the new leader. A new channel asks afresh. So a
# nack makes both publishers replace their publishing channel (at most once per
# RENEW_INTERVAL, so a queue that nacks for good reasons, e.g. a full one with
# overflow=reject-publish, does not make them open a channel per message), and a nacked
# publish is sent once more on the new channel before PublishNacked is raised.

NACK_RETRIES = 1  # times a nacked publish is sent again, on a new channel, before it fails
RENEW_INTERVAL = 1.0  # seconds between two replacements of a publishing channel that nacks


def retry_nacked(nacks: int, wait: float, budget: float) -> bool:
    """Whether a publish the broker has nacked ``nacks`` times is sent again, on a channel
    that can be opened in ``wait`` seconds, with ``budget`` seconds left to confirm it.

    ```python
    assert retry_nacked(1, wait=0.0, budget=5.0)      # the first nack: once more
    assert not retry_nacked(2, wait=0.0, budget=5.0)  # nacked again: PublishNacked
    assert not retry_nacked(1, wait=1.0, budget=0.5)  # no time left: PublishNacked
    ```
    """
    return nacks <= NACK_RETRIES and wait < budget


class ChannelRenewal:
    """When a publishing channel the broker nacked on may be replaced: at once the first
    time, then at most once per ``interval`` seconds.

    ```python
    renewal = ChannelRenewal()
    assert renewal.wait() == 0.0   # replace it now
    renewal.renewed()
    assert renewal.wait() > 0.0    # another nack soon after: wait before replacing again
    ```
    """

    def __init__(
        self, interval: float = RENEW_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._last: float | None = None

    def wait(self) -> float:
        """Seconds to wait before the channel may be replaced (0: now)."""
        if self._last is None:
            return 0.0
        return max(0.0, self._last + self.interval - self._clock())

    def renewed(self) -> None:
        """Record that the channel was replaced just now."""
        self._last = self._clock()


# -- message size ----------------------------------------------------------------------------
#
# RabbitMQ refuses a message whose body is above its max_message_size by closing the channel
# ("406 PRECONDITION_FAILED - message size N is larger than configured max size M"), and every
# publish in flight on that channel goes with it. So both publishers check each body against
# a SizeLimit before sending it: a message that cannot be stored costs no I/O and disturbs no
# other publish. When the broker refuses one anyway (its limit is below the setting), the
# publishers fail only the messages in flight above the limit it names, send the others again
# on a new channel, and check against the broker's limit from then on.

_TOO_LARGE = re.compile(
    r"message size (?P<size>\d+) is larger than configured max size (?P<limit>\d+)"
)


class SizeLimit:
    """The largest message body a publisher sends: ``max_message_size`` (a setting), lowered
    to the broker's own limit once the broker has refused a message for its size.

    ```python
    limit = SizeLimit(1024)
    assert limit.check(100, lambda: "publish message m") is None
    assert isinstance(limit.check(2048, lambda: "publish message m"), PublishTooLarge)
    reply = "PRECONDITION_FAILED - message size 900 is larger than configured max size 512"
    assert limit.refused(reply) == 512 and limit.limit == 512
    ```
    """

    __slots__ = ("from_broker", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.from_broker = False  # the limit is the broker's (learned from a refusal)

    def check(
        self, size: int, what: Callable[[], str], unconfirmed: Sequence[str] = ()
    ) -> PublishTooLarge | None:
        """The error for a body of ``size`` bytes above the limit (``what()``: what
        publishing it means, built only then), or ``None`` when it may be sent."""
        if size <= self.limit:
            return None
        return explain.too_large(
            what(), size, self.limit, broker=self.from_broker, unconfirmed=unconfirmed
        )

    def refused(self, reply_text: str) -> int | None:
        """If ``reply_text`` (of a channel the broker closed) says a message was too large,
        lower the limit to the broker's and return it; else ``None``."""
        match = _TOO_LARGE.search(reply_text)
        if match is None:
            return None
        broker = int(match["limit"])
        if broker <= self.limit:
            self.limit = broker
            self.from_broker = True
        return broker
