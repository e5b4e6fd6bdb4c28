"""How a client's two connections make one :class:`Health` (:func:`health_of`)."""

from __future__ import annotations

from dataclasses import dataclass

from mqkit.health import Health, health_of


@dataclass
class State:
    connected: bool = True
    url: str = "amqp://guest:***@localhost:5672/"
    reconnects: int = 0
    last_error: str | None = None
    last_error_at: float = 0.0
    blocked: str | None = None


def test_connected_only_when_both_connections_are_up() -> None:
    up = health_of(State(), State(), consumers=2, consumers_attached=2)
    assert up.connected and up.ready and up.url.startswith("amqp://")
    down = health_of(State(), State(connected=False), consumers=0, consumers_attached=0)
    assert not down.connected and not down.ready and down.url == ""
    down = health_of(State(connected=False), State(), consumers=0, consumers_attached=0)
    assert not down.connected


def test_reconnects_of_both_connections_count_and_the_latest_error_shows() -> None:
    consuming = State(reconnects=2, last_error="consuming lost", last_error_at=10.0)
    publishing = State(reconnects=1, last_error="publishing lost", last_error_at=20.0)
    health = health_of(consuming, publishing, consumers=0, consumers_attached=0)
    assert health.reconnects == 3 and health.last_error == "publishing lost"
    publishing.last_error_at = 5.0
    assert health_of(consuming, publishing, consumers=0, consumers_attached=0).last_error == (
        "consuming lost"
    )
    assert health_of(State(), State(), consumers=0, consumers_attached=0).last_error is None


def test_a_blocked_publishing_connection_shows_but_keeps_the_client_ready() -> None:
    health = health_of(State(), State(blocked="low on memory"), consumers=1, consumers_attached=1)
    assert health.publishing_blocked and health.blocked_reason == "low on memory"
    assert health.ready  # consumers keep going during an alarm


def test_health_built_by_hand_is_not_blocked() -> None:
    health = Health(
        connected=True, url="", consumers=0, consumers_attached=0, reconnects=0, last_error=None
    )
    assert not health.publishing_blocked and health.blocked_reason is None
