"""A small shop built on mqkit: five services, each its own process.

```
python -m examples.pricing        # async: answers PriceQuote over RPC
python -m examples.inventory      # async: OrderPlaced -> StockReserved, broker-held retries
python -m examples.billing        # sync:  ChargeCard from billing.charges, DLQ on decline
python -m examples.notifications  # sync:  "orders.*", StockReserved, CacheCleared broadcast
python -m examples.orders         # sync:  places orders (RPC, OrderPlaced, ChargeCard), exits
python -m examples.demo           # runs all of the above and tells the story (`make demo`)
```

Every service reads the broker and the rest from ``MQKIT_*`` (:class:`mqkit.Settings`) and
sets its own service name. Two more variables let the demo keep runs apart:
``DEMO_PREFIX`` is put in front of every queue name a service chooses, and
``DEMO_TOPOLOGY_FILE`` names a file where each service records what it declared, so the demo
can delete it afterwards. ``DEMO_INSTANCE`` tells instances of one service apart in output.
Every service records Prometheus metrics (:func:`middleware`); ``DEMO_METRICS_PORT`` serves
them at ``/metrics`` on that port (docker-compose.yml sets 9100, and its "observability"
profile's Prometheus scrapes them).

This module holds the few helpers the services share: names, output, logging.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import mqkit

__all__ = [
    "exit_on_failure",
    "label",
    "middleware",
    "queue_name",
    "record_topology",
    "say",
    "setup_logging",
]


def queue_name(name: str) -> str:
    """``name`` with this run's ``DEMO_PREFIX`` (empty outside the demo) in front."""
    return os.environ.get("DEMO_PREFIX", "") + name


def label(service: str) -> str:
    """How ``service`` appears in output: its name, and ``-<n>`` if ``DEMO_INSTANCE`` is set."""
    instance = os.environ.get("DEMO_INSTANCE")
    return f"{service}-{instance}" if instance else service


_SAYING = threading.Lock()


def say(service: str, text: str) -> None:
    """Print one line of the story: ``[service] text``, flushed at once (output is a pipe).

    One write under a lock: handlers print from several threads, and ``print`` writes the
    text and its newline apart, so two lines could run into one."""
    line = f"[{label(service)}] {text}\n"
    with _SAYING:
        sys.stdout.write(line)
        sys.stdout.flush()


class _OneLine(logging.Formatter):
    """Log records on one line: a traceback becomes ``(ExcType: message)``.

    A handler that fails on purpose (a declined card) would otherwise fill the screen.
    """

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and str(exc) not in text:
            text = f"{text} ({type(exc).__name__}: {exc})"
        tag = f"{label(self.service)}:{record.name}"
        return f"[{tag}] {record.levelname.lower()}: {text}".replace("\n", " | ")


def setup_logging(service: str, level: int = logging.WARNING) -> None:
    """Send log records (mqkit's included) to stderr, one line each, tagged with ``service``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # mqkit reports what went wrong (and raises ConnectionFailed); the client libraries'
    # own logs would repeat each failed connection attempt several times over.
    for noisy in ("pika", "aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)


def middleware(service: str) -> list[mqkit.Middleware]:
    """The middleware every service runs with: mqkit's Prometheus metrics, served on
    ``DEMO_METRICS_PORT`` when it is set. Without the ``prometheus`` extra, none (and a
    WARNING saying how to get them)."""
    try:
        from prometheus_client import start_http_server

        from mqkit.observability import PrometheusMiddleware
    except ImportError as exc:
        logging.getLogger("examples").warning("%s: metrics are off (%s)", service, exc)
        return []
    port = os.environ.get("DEMO_METRICS_PORT")
    if port:
        start_http_server(int(port))
    return [PrometheusMiddleware()]


@contextmanager
def exit_on_failure(service: str) -> Iterator[None]:
    """Turn mqkit's errors at start-up (no broker, conflicting topology) into a one-line
    message on stderr and exit status 1, instead of a traceback."""
    try:
        yield
    except (mqkit.ConnectionFailed, mqkit.TopologyError, mqkit.ConfigError) as exc:
        raise SystemExit(f"[{label(service)}] cannot run: {type(exc).__name__}: {exc}") from exc


def record_topology(entities: Iterable[object]) -> None:
    """Append the names of the queues and exchanges a client declared to
    ``DEMO_TOPOLOGY_FILE`` (if set), one ``queue <name>`` / ``exchange <name>`` per line."""
    path = os.environ.get("DEMO_TOPOLOGY_FILE")
    if not path:
        return
    lines = []
    for entity in entities:
        if isinstance(entity, mqkit.Queue):
            lines.append(f"queue {entity.name}\n")
        elif isinstance(entity, mqkit.Exchange):
            lines.append(f"exchange {entity.name}\n")
    with open(path, "a", encoding="utf-8") as fp:
        fp.writelines(lines)
