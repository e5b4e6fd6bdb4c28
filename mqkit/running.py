"""How a client's ``run()`` and ``close()`` end, decided once for both clients.

``run()`` starts what was made on the client and waits for ``stop()``, SIGINT or SIGTERM;
then it drains: it stops everything at once, letting running handlers finish for up to
``drain_timeout`` seconds (default ``settings.drain_timeout``), and says so in one line. A
second SIGINT or SIGTERM during the drain stops at once: one WARNING, the connection is
closed (the messages still being handled go back to their queues, unacked), and ``run()``
raises ``SystemExit(128 + signal)`` (130 for SIGINT), so the process ends without a
traceback.

``close()`` warns once about each consumer, responder or event bus made on the client that
was never started: a newcomer's usual "why does nothing arrive?".
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable, Sequence
from typing import Literal, Protocol

from mqkit.errors import ConfigError
from mqkit.settings import Settings

__all__ = [
    "abandoning",
    "drain_timeout",
    "signalled",
    "started",
    "stopping",
    "warn_never_started",
]

log = logging.getLogger("mqkit.client")

Runtime = Literal["sync", "async"]


class Startable(Protocol):
    """A consumer (or responder) as :func:`warn_never_started` sees it."""

    @property
    def ever_started(self) -> bool: ...

    @property
    def queue(self) -> str: ...


class Bus(Protocol):
    """An event bus as :func:`warn_never_started` sees it."""

    @property
    def ever_started(self) -> bool: ...

    @property
    def service(self) -> str: ...

    @property
    def exchange(self) -> str: ...

    @property
    def consumers(self) -> Sequence[Startable]: ...


def drain_timeout(value: float | None, settings: Settings) -> float:
    """``run(drain_timeout=value)``'s seconds: ``settings.drain_timeout`` when ``None``."""
    if value is None:
        return settings.drain_timeout
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ConfigError(
            f"run(drain_timeout={value!r}): the drain timeout is the seconds running handlers "
            "get to finish when stopping; give a number >= 0 (0: do not wait)"
        )
    return float(value)


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def started(count: int) -> None:
    """The line once everything made on the client is started."""
    log.info("running %d consumer(s) and bus(es); waiting for stop(), SIGINT or SIGTERM", count)


def signalled(signum: int) -> None:
    """The line for the first SIGINT or SIGTERM."""
    log.info("%s received; stopping", _name(signum))


def stopping(count: int, timeout: float, *, signals: bool) -> None:
    """The line as the drain begins: how long it waits (``signals``: whether a second
    signal can cut it short)."""
    log.info(
        "stopping %d consumer(s) and bus(es): waiting up to %gs for running handlers to finish%s",
        count,
        timeout,
        "; send SIGINT again to stop at once" if signals else "",
    )


def abandoning(signum: int) -> int:
    """The one line for a second signal during the drain; the exit status to stop with."""
    log.warning(
        "%s received again: stopping at once, without waiting for running handlers; the "
        "messages they were handling go back to their queues",
        _name(signum),
    )
    return 128 + signum


def warn_never_started(
    consumers: Iterable[tuple[Literal["consumer", "responder"], Startable]],
    buses: Iterable[Bus],
    *,
    runtime: Runtime,
) -> None:
    """When a client closes: one WARNING for each consumer, responder or bus (with at least
    one subscription) made on it that never started, naming its queue(s). One that was
    started and stopped is not warned about."""
    wait = "await " if runtime == "async" else ""
    for kind, consumer in consumers:
        if consumer.ever_started:
            continue
        did = "handled no message" if kind == "consumer" else "answered no request"
        log.warning(
            "a %s of queue %r was made but never started, so it %s; start it with %sclient.run() "
            "or %s%s.start() before closing the client",
            kind,
            consumer.queue,
            did,
            wait,
            wait,
            kind,
            extra={"queue": consumer.queue},
        )
    for bus in buses:
        queues = [c.queue for c in bus.consumers]
        if bus.ever_started or not queues:  # a bus used only to publish needs no start
            continue
        names = ", ".join(repr(queue) for queue in queues)
        log.warning(
            "an event bus (service %r, exchange %r) was made but never started, so its "
            "subscriptions (queue%s %s) handled no event; start it with "
            "%sclient.run() or %sbus.start() before closing the client",
            bus.service,
            bus.exchange,
            "" if len(queues) == 1 else "s",
            names,
            wait,
            wait,
            extra={"queue": names},
        )
