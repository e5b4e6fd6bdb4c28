"""mqkit: typed, reliable-by-default RabbitMQ messaging for Python services.

Two runtimes with one contract: :class:`Client` (blocking, on pika) and
:class:`AsyncClient` (asyncio, on aio-pika)::

    import mqkit
    from pydantic import BaseModel

    class ChargeCard(BaseModel):
        order_id: str

    with mqkit.Client(service="billing") as client:
        client.producer(ChargeCard, queue="charges").publish(ChargeCard(order_id="42"))
"""

from mqkit._async.bus import AsyncEventBus
from mqkit._async.client import AsyncClient
from mqkit._async.consumer import AsyncConsumer
from mqkit._async.dead_letters import AsyncDeadLetterQueue
from mqkit._async.producer import AsyncProducer
from mqkit._sync.bus import EventBus
from mqkit._sync.client import Client
from mqkit._sync.consumer import Consumer
from mqkit._sync.dead_letters import DeadLetterQueue
from mqkit._sync.producer import Producer
from mqkit.context import Context
from mqkit.dead_letters import DeadLetter
from mqkit.errors import (
    ConfigError,
    ConnectionFailed,
    DecodeError,
    MqkitError,
    PublishError,
    PublishNacked,
    PublishTimeout,
    PublishTooLarge,
    PublishUnroutable,
    RemoteError,
    RequestTimeout,
    TopologyError,
)
from mqkit.health import Health
from mqkit.logs import install as _install_logging
from mqkit.messages import Event
from mqkit.middleware import Middleware, Outgoing
from mqkit.retry import Reject, Retry, RetryPolicy
from mqkit.settings import Settings
from mqkit.topology import Binding, Exchange, Queue

__version__ = "0.1.0"

_install_logging()  # a NullHandler on "mqkit"; pika's and aiormq's chatter quiet (mqkit.logs)

__all__ = [
    "AsyncClient",
    "AsyncConsumer",
    "AsyncDeadLetterQueue",
    "AsyncEventBus",
    "AsyncProducer",
    "Binding",
    "Client",
    "ConfigError",
    "ConnectionFailed",
    "Consumer",
    "Context",
    "DeadLetter",
    "DeadLetterQueue",
    "DecodeError",
    "Event",
    "EventBus",
    "Exchange",
    "Health",
    "Middleware",
    "MqkitError",
    "Outgoing",
    "Producer",
    "PublishError",
    "PublishNacked",
    "PublishTimeout",
    "PublishTooLarge",
    "PublishUnroutable",
    "Queue",
    "Reject",
    "RemoteError",
    "RequestTimeout",
    "Retry",
    "RetryPolicy",
    "Settings",
    "TopologyError",
    "__version__",
]
