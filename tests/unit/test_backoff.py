"""The one back-off policy of the link (connect, reconnect, re-attach)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from mqkit.backoff import LINK_BACKOFF, Backoff, per_try, stop_at


def test_grows_exponentially_up_to_the_cap():
    backoff = Backoff(initial=0.1, factor=2.0, cap=1.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(6)] == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.8, 1.0])
    assert backoff.delay(10_000) == 1.0  # no overflow after a long outage


def test_jitter_stays_within_its_bound():
    delays = [LINK_BACKOFF.delay(1) for _ in range(200)]
    assert all(0.1 <= d <= 0.2 for d in delays)
    assert len(set(delays)) > 1


def test_never_waits_past_the_deadline():
    deadline = time.monotonic() + 0.05
    assert LINK_BACKOFF.delay(20, deadline=deadline) <= 0.05
    assert LINK_BACKOFF.delay(20, deadline=time.monotonic() - 1) == 0.0


def test_as_a_tenacity_wait():
    wait = Backoff(jitter=0.0).wait()
    assert wait(SimpleNamespace(attempt_number=3)) == pytest.approx(0.4)


def test_each_url_gets_a_share_of_the_connect_timeout():
    assert per_try(10.0, 1, remaining=10.0) == 10.0
    assert per_try(10.0, 2, remaining=10.0) == 5.0  # a dead first URL leaves time for the next
    assert per_try(10.0, 2, remaining=3.0) == 3.0  # never past the deadline
    assert per_try(3.0, 4, remaining=3.0) == 2.0  # at least 2 s, if there is time for it
    assert per_try(3.0, 2, remaining=None) == 5.0  # reconnecting: no deadline, at least 5 s
    assert per_try(30.0, 2, remaining=None) == 30.0


def test_stop_at_ends_the_tries_at_the_deadline():
    assert stop_at(time.monotonic() + 5)(None) is False
    assert stop_at(time.monotonic())(None) is True
