"""A throw-away RabbitMQ cluster for fault tests.

:class:`RabbitCluster` starts ``n`` :class:`~mqkit.testing.nodes.RabbitNode` s and joins them
into one cluster, so a test can kill the node a client is on, or a quorum queue's leader::

    from mqkit.testing import RabbitCluster

    with RabbitCluster(3) as cluster:
        with mqkit.Client(urls=cluster.urls) as client:
            ...
            cluster.leader_of("orders").kill()     # a quorum queue elects a new leader

Like the nodes it is made of, it needs a local RabbitMQ installation and uses only the
standard library.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from mqkit.testing.nodes import RabbitNode

__all__ = ["RabbitCluster"]


class RabbitCluster:
    """``n`` :class:`RabbitNode` s joined into one cluster (nodes 2..n join node 1).

    All nodes share one Erlang cookie and live under one ``base_dir``, removed by
    :meth:`cleanup` — which the context manager runs even when the test fails.

    Example::

        with RabbitCluster(3) as cluster:
            with mqkit.Client(urls=cluster.urls, queue_type="quorum") as client:
                client.declare(mqkit.Queue("orders"))
                cluster.leader_of("orders").kill()
    """

    def __init__(
        self,
        n: int = 3,
        *,
        name: str = "mqkit-c",
        base_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 180.0,
    ) -> None:
        if n < 1:
            raise ValueError(f"a cluster needs at least one node, got n={n}")
        self._owns_dir = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix=f"{name}-") if base_dir is None else base_dir)
        cookie = secrets.token_hex(20).upper()
        tag = secrets.token_hex(2)  # two sessions on one host never share node names
        self.nodes: list[RabbitNode] = [
            RabbitNode(
                f"{name}-{tag}-{i}",
                base_dir=self.base_dir / f"node{i}",
                cookie=cookie,
                startup_timeout=startup_timeout,
            )
            for i in range(1, n + 1)
        ]

    @property
    def urls(self) -> list[str]:
        """Every node's AMQP URL, node 1 first."""
        return [node.url for node in self.nodes]

    def start(self) -> RabbitCluster:
        """Boot every node (in parallel), then join nodes 2..n to node 1."""
        _in_parallel([node.start for node in self.nodes])
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            _join(node, seed)
        return self

    def stop(self) -> None:
        """Stop every running node gracefully (all at once)."""
        _in_parallel([node.stop for node in self.nodes])

    def cleanup(self) -> None:
        """Kill every node and remove the cluster's ``base_dir`` (if the cluster made it)."""
        for node in self.nodes:
            node.cleanup()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def running_nodes(self) -> list[RabbitNode]:
        """The nodes whose VM is running now."""
        return [node for node in self.nodes if node.running]

    def node_for(self, url: str) -> RabbitNode:
        """The node an AMQP URL points at (matched by port; passwords may be masked)."""
        for node in self.nodes:
            if f":{node.port}/" in url or url.rstrip("/").endswith(f":{node.port}"):
                return node
        raise LookupError(f"no node of this cluster listens at {url}")

    def leader_of(self, queue: str, *, vhost: str = "/", timeout: float = 30.0) -> RabbitNode:
        """The node that hosts the leader of quorum queue ``queue`` right now.

        Asks a running node (``rabbitmq-queues quorum_status``, on RabbitMQ 3.8 to 4.x) and
        waits up to ``timeout`` seconds while an election is still in progress.
        """
        deadline = time.monotonic() + timeout
        last = "no running node to ask"
        while True:
            for node in self.running_nodes():
                try:
                    leader = _leader_reported_by(node, queue, vhost)
                except RuntimeError as exc:
                    last = str(exc)
                    continue
                if leader is not None:
                    for candidate in self.nodes:
                        # A member that was just killed can still be reported as leader
                        # until the others notice; only a live leader is an answer.
                        if candidate.name == leader and candidate.running:
                            return candidate
                    last = f"leader {leader} is not a running node of this cluster"
                else:
                    last = "no member reports itself leader yet"
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no leader found for quorum queue {queue!r}: {last}")
            time.sleep(0.5)

    def __enter__(self) -> RabbitCluster:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"RabbitCluster({self.nodes!r})"


def _in_parallel(calls: Sequence[Callable[[], object]]) -> None:
    """Run every call on a thread of its own; re-raise the first failure (in list order)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()


def _join(node: RabbitNode, seed: RabbitNode) -> None:
    """Make the running ``node`` a member of ``seed``'s cluster."""
    node.ctl("stop_app")
    node.ctl("join_cluster", seed.name)
    node.ctl("start_app")


def _leader_reported_by(node: RabbitNode, queue: str, vhost: str) -> str | None:
    """The leader of quorum queue ``queue`` as ``node`` sees it; raises if the CLI fails."""
    return _leader_from_status(
        node.ctl(
            "quorum_status",
            queue,
            "--vhost",
            vhost,
            "--formatter",
            "json",
            tool="rabbitmq-queues",
            timeout=30,
        )
    )


def _leader_from_status(output: str) -> str | None:
    """The leader's node name from ``rabbitmq-queues quorum_status --formatter json``.

    3.x prints ``[{"Node Name": ..., "Raft State": "leader", ...}, ...]``; 4.x adds columns
    and may print the membership as ``voter``/``promotable`` in another one, so match any
    key that names the Raft state.
    """
    start = output.find("[")
    if start < 0:
        return None
    try:
        rows = json.loads(output[start:])
    except json.JSONDecodeError:
        return None
    if not isinstance(rows, Sequence):
        return None
    for row in rows:
        if not isinstance(row, dict):
            continue
        name = row.get("Node Name") or row.get("node_name") or row.get("node")
        states = [str(v).lower() for k, v in row.items() if "state" in str(k).lower()]
        if name and "leader" in states:
            return str(name)
    return None
