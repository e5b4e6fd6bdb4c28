"""The :class:`Health` report a client gives for liveness and readiness probes."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Health"]


@dataclass(frozen=True, slots=True)
class Health:
    """A snapshot of a client's state; building one does no I/O.

    ``ready`` is what a readiness probe wants: connected, and every started consumer
    attached to its queue.
    """

    connected: bool
    url: str  # the broker in use, password masked ("" when not connected)
    consumers: int  # consumers started on this client
    consumers_attached: int  # of those, attached to their queue right now
    reconnects: int  # successful reconnects since the client was opened
    last_error: str | None  # the last connection-level error, password masked

    @property
    def ready(self) -> bool:
        return self.connected and self.consumers_attached == self.consumers
