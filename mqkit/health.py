"""The :class:`Health` report a client gives for liveness and readiness probes.

A client holds two connections to the broker, one for publishing and one for consuming and
declaring (RabbitMQ's advice: a broker in a memory or disk alarm blocks connections that
publish, and a consumer on a connection of its own keeps going). :func:`health_of` folds the
state of both into one report, the same way on both runtimes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Health", "LinkState", "health_of"]


@dataclass(frozen=True, slots=True)
class Health:
    """A snapshot of a client's state; building one does no I/O.

    ``ready`` is what a readiness probe wants: connected, and every started consumer
    attached to its queue. A broker that blocks publishing (``publishing_blocked``, during a
    memory or disk alarm) does not make a client unready: its consumers keep going, and
    publishes raise :class:`~mqkit.PublishTimeout` until the alarm clears.
    """

    connected: bool  # both connections (publishing, and consuming/declaring) are up
    url: str  # the broker in use, password masked ("" when not connected)
    consumers: int  # consumers started on this client
    consumers_attached: int  # of those, attached to their queue right now
    reconnects: int  # successful reconnects since the client was opened (both connections)
    last_error: str | None  # the latest connection-level error of either, password masked
    publishing_blocked: bool = False  # the broker blocks publishing (memory or disk alarm)
    blocked_reason: str | None = None  # the broker's reason, e.g. "low on memory"

    @property
    def ready(self) -> bool:
        return self.connected and self.consumers_attached == self.consumers


class LinkState(Protocol):
    """What :func:`health_of` reads from one connection of a client (no I/O)."""

    @property
    def connected(self) -> bool: ...

    @property
    def url(self) -> str: ...

    @property
    def reconnects(self) -> int: ...

    @property
    def last_error(self) -> str | None: ...

    @property
    def last_error_at(self) -> float: ...

    @property
    def blocked(self) -> str | None: ...


def health_of(
    consuming: LinkState, publishing: LinkState, *, consumers: int, consumers_attached: int
) -> Health:
    """The :class:`Health` of a client whose connections are ``consuming`` (consumers and
    declares) and ``publishing``: connected when both are, reconnects of both, the latest
    error of either, and blocked when the broker blocks the publishing one."""
    connected = consuming.connected and publishing.connected
    failed = [link for link in (consuming, publishing) if link.last_error is not None]
    latest = max(failed, key=lambda link: link.last_error_at) if failed else None
    return Health(
        connected=connected,
        url=consuming.url if connected else "",
        consumers=consumers,
        consumers_attached=consumers_attached,
        reconnects=consuming.reconnects + publishing.reconnects,
        last_error=latest.last_error if latest is not None else None,
        publishing_blocked=publishing.blocked is not None,
        blocked_reason=publishing.blocked,
    )
