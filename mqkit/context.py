"""The :class:`Context` a handler receives beside its message."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["Context"]


@dataclass(frozen=True, slots=True)
class Context:
    """Delivery details for a handler: ``handler(message, ctx)``.

    ``attempt`` is 1 on first delivery and grows with each retry; ``redelivered`` is the
    broker's flag (set after a consumer died holding the message).
    """

    message_id: str | None
    correlation_id: str | None
    headers: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1
    redelivered: bool = False
    exchange: str = ""
    routing_key: str = ""
    queue: str = ""
    event_type: str | None = None
    timestamp: datetime | None = None
    reply_to: str | None = None
