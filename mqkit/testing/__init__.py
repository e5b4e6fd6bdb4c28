"""Test tooling for services built on mqkit: an in-memory broker, network faults and RabbitMQ
nodes of your own (and a pytest plugin, :mod:`mqkit.testing.pytest_plugin`).

- :func:`memory_broker` / :class:`MemoryBroker` — the in-memory broker behind
  ``memory://NAME`` URLs (:mod:`mqkit.testing.memory`): RabbitMQ's routing, confirms,
  acks, TTL and dead-lettering in the test's process, on a virtual clock.
- :class:`FaultProxy` — a TCP proxy in front of a broker that cuts, black-holes, slows down
  or refuses connections on demand.
- :class:`RabbitNode` / :class:`RabbitCluster` — start and stop throw-away RabbitMQ nodes
  (and a cluster of them) on free loopback ports, to restart or kill them mid-test.
  ``RabbitNode(tls=True)`` adds an ``amqps`` listener with a CA, a client certificate and
  EXTERNAL login; ``node.add_user(name, password, configure=..., write=..., read=...)``
  makes a user with limited permissions and returns its URL.

```python
from mqkit.testing import FaultProxy

with FaultProxy("amqp://guest:guest@localhost:5672/") as proxy:
    with mqkit.Client(url=proxy.url) as client:
        proxy.cut()   # the client reconnects on its own
```
"""

from mqkit.testing.cluster import RabbitCluster
from mqkit.testing.memory import MemoryBroker, MemoryMessage, memory_broker
from mqkit.testing.nodes import RabbitNode
from mqkit.testing.proxy import FaultProxy

__all__ = [
    "FaultProxy",
    "MemoryBroker",
    "MemoryMessage",
    "RabbitCluster",
    "RabbitNode",
    "memory_broker",
]
