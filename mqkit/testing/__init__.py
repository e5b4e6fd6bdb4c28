"""Test tooling for services built on mqkit: network faults and RabbitMQ nodes of your own.

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
from mqkit.testing.nodes import RabbitNode
from mqkit.testing.proxy import FaultProxy

__all__ = ["FaultProxy", "RabbitCluster", "RabbitNode"]
