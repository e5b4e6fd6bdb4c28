"""The decisions and bookkeeping of a dead-letter replay (mqkit.dead_letters.Replay)."""

from __future__ import annotations

import pytest

from mqkit.dead_letters import Replay, scan_bound
from mqkit.errors import PublishError, PublishUnroutable
from mqkit.messages import Incoming


def _dead(message_id: str, error_type: str = "ValueError", queue: str = "orders") -> Incoming:
    return Incoming(
        body=b"{}",
        delivery_tag=1,
        message_id=message_id,
        headers={
            "x-mqkit-error-type": error_type,
            "x-mqkit-error-message": "nope",
            "x-mqkit-attempts": 3,
            "x-mqkit-original-queue": queue,
            "mqkit-attempt": 3,
            "tenant": "acme",
        },
    )


def test_scan_bound() -> None:
    assert scan_bound(5, None) == 5
    assert scan_bound(5, 2) == 2
    assert scan_bound(1, 10) == 1


def test_the_scan_ends_at_the_count_or_the_limit() -> None:
    replay = Replay("orders", "orders.dlq", count=2)
    assert not replay.finished
    replay.letter(_dead("a"))
    replay.letter(_dead("b"))
    assert replay.finished  # both looked at: what was left must not be seen again
    limited = Replay("orders", "orders.dlq", count=10, limit=1)
    limited.replayed()
    assert limited.finished


def test_filters_target_and_envelope() -> None:
    replay = Replay("orders", "orders.dlq", count=3, error_type="ValueError", message_id="a")
    assert replay.wants(replay.letter(_dead("a")))
    assert not replay.wants(replay.letter(_dead("b")))
    assert not replay.wants(replay.letter(_dead("a", error_type="Reject")))
    letter = Replay("orders", "orders.dlq", count=1).letter(_dead("c", queue=""))
    assert Replay("orders", "orders.dlq", count=1).target(letter) == "orders"
    envelope = replay.envelope(letter)
    assert envelope.message_id == "c"
    assert envelope.headers == {"tenant": "acme"}  # failure headers and attempt count go


def test_progress_and_result() -> None:
    seen: list[int] = []
    replay = Replay("orders", "orders.dlq", count=3, progress=seen.append)
    replay.replayed()
    replay.replayed()
    assert seen == [1, 2] and replay.result() == 2
    assert replay.left == 1  # what the DLQ holds again once the scan returned the rest


def test_one_failure_is_raised_as_it_is_several_are_summed_up() -> None:
    replay = Replay("orders", "orders.dlq", count=3)
    gone = PublishUnroutable("no queue 'gone'")
    replay.failed(replay.letter(_dead("a")), gone)
    with pytest.raises(PublishUnroutable):
        replay.result()
    replay.failed(replay.letter(_dead("b")), PublishUnroutable("no queue 'gone2'"))
    replay.replayed()
    with pytest.raises(PublishError) as info:
        replay.result()
    assert info.value.unconfirmed == ["a", "b"]
    assert "2 dead letter(s) of 'orders.dlq' could not be replayed" in str(info.value)
    assert "(1 replayed)" in str(info.value)
