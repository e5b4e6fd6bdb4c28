"""RetryPolicy, the handler signals and the retry decision."""

from __future__ import annotations

import dataclasses

import pytest

from mqkit.errors import ConfigError, DecodeError, MqkitError
from mqkit.retry import (
    ATTEMPT_HEADER,
    DEFAULT_POLICY,
    MAX_ATTEMPT,
    Ack,
    GiveUp,
    Reject,
    Retry,
    RetryLater,
    RetryPolicy,
    attempt_of,
    decide,
)


def test_defaults_match_the_api() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 3
    assert policy.delays == (1.0, 10.0, 60.0)
    assert policy.immediate == 0
    assert policy.retry_on == (Exception,)
    assert policy.give_up_on == ()
    assert policy == DEFAULT_POLICY


def test_policy_is_a_frozen_value() -> None:
    policy = RetryPolicy(max_attempts=2, delays=(1, 2))
    assert policy.delays == (1.0, 2.0) and all(isinstance(d, float) for d in policy.delays)
    assert policy == RetryPolicy(max_attempts=2, delays=(1.0, 2.0))
    assert hash(policy) == hash(RetryPolicy(max_attempts=2, delays=(1.0, 2.0)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": -1}, "max_attempts"),
        ({"immediate": -1}, "immediate"),
        ({"delays": ()}, "delays"),
        ({"delays": (1.0, 0.0)}, "delays"),
        ({"delays": (-1.0,)}, "delays"),
    ],
)
def test_invalid_policy_is_a_config_error(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_single_attempt_needs_no_delays() -> None:
    policy = RetryPolicy(max_attempts=1, delays=())
    assert policy.tiers == ()
    assert isinstance(decide(ValueError("x"), 1, policy), GiveUp)


def test_delay_for() -> None:
    policy = RetryPolicy(max_attempts=10, delays=(1.0, 10.0, 60.0))
    assert [policy.delay_for(n) for n in (1, 2, 3, 4, 9)] == [1.0, 10.0, 60.0, 60.0, 60.0]


def test_tiers_are_the_delays_in_use() -> None:
    # max_attempts=3: attempts 1 and 2 can be retried, so only the first two delays are used.
    assert RetryPolicy().tiers == (1.0, 10.0)
    assert RetryPolicy(max_attempts=5).tiers == (1.0, 10.0, 60.0)
    assert RetryPolicy(max_attempts=2, delays=(0.5, 9.0)).tiers == (0.5,)
    assert RetryPolicy(max_attempts=1).tiers == ()
    # Distinct and sorted, whatever the order of the delays.
    assert RetryPolicy(max_attempts=4, delays=(0.5, 0.1, 0.5)).tiers == (0.1, 0.5)


def test_tier_for_picks_the_shortest_tier_that_waits_long_enough() -> None:
    policy = RetryPolicy(max_attempts=4, delays=(1.0, 10.0, 60.0))
    assert policy.tier_for(0.0) == 1.0
    assert policy.tier_for(1.0) == 1.0
    assert policy.tier_for(1.5) == 10.0
    assert policy.tier_for(30) == 60.0
    assert policy.tier_for(600) == 60.0  # longer than any tier: the longest


def test_decide_success_is_ack() -> None:
    assert decide(None, 1, RetryPolicy()) == Ack()
    assert decide(None, 3, RetryPolicy()) == Ack()


def test_decide_retries_until_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3, delays=(0.3, 0.6))
    assert decide(ValueError("x"), 1, policy) == RetryLater(delay=0.3, attempt=2)
    assert decide(ValueError("x"), 2, policy) == RetryLater(delay=0.6, attempt=3)
    outcome = decide(ValueError("boom"), 3, policy, "Traceback ...")
    assert outcome == GiveUp(
        error_type="ValueError", error_message="boom", attempts=3, traceback="Traceback ..."
    )


def test_decide_reject_gives_up_at_once() -> None:
    outcome = decide(Reject("bad order"), 1, RetryPolicy(max_attempts=5, delays=(0.1,)))
    assert isinstance(outcome, GiveUp)
    assert (outcome.error_type, outcome.error_message, outcome.attempts) == (
        "Reject",
        "bad order",
        1,
    )


def test_reject_default_reason() -> None:
    signal = Reject()
    assert signal.reason and str(signal) == signal.reason
    outcome = decide(signal, 2, RetryPolicy())
    assert isinstance(outcome, GiveUp) and outcome.error_message == signal.reason


def test_decode_error_gives_up_at_once() -> None:
    outcome = decide(DecodeError("body is not valid JSON"), 1, RetryPolicy())
    assert isinstance(outcome, GiveUp)
    assert outcome.error_type == "DecodeError" and outcome.attempts == 1


def test_give_up_on_dead_letters_at_once_including_subclasses() -> None:
    policy = RetryPolicy(max_attempts=5, delays=(0.1,), give_up_on=(LookupError,))
    outcome = decide(KeyError("sku"), 1, policy)
    assert isinstance(outcome, GiveUp)
    assert outcome.error_type == "KeyError" and outcome.attempts == 1
    assert isinstance(decide(ValueError("x"), 1, policy), RetryLater)


def test_retry_on_limits_what_is_retried() -> None:
    policy = RetryPolicy(max_attempts=5, delays=(0.1,), retry_on=(ConnectionError,))
    assert decide(ConnectionResetError("peer"), 1, policy) == RetryLater(delay=0.1, attempt=2)
    outcome = decide(ValueError("bug"), 1, policy)
    assert isinstance(outcome, GiveUp) and outcome.attempts == 1


def test_give_up_on_beats_retry_on() -> None:
    policy = RetryPolicy(delays=(0.1,), retry_on=(Exception,), give_up_on=(ValueError,))
    assert isinstance(decide(ValueError("x"), 1, policy), GiveUp)


def test_retry_signal_uses_the_policy_delay_or_the_requested_tier() -> None:
    policy = RetryPolicy(max_attempts=4, delays=(1.0, 10.0, 60.0))
    assert decide(Retry(), 1, policy) == RetryLater(delay=1.0, attempt=2)
    assert decide(Retry(), 2, policy) == RetryLater(delay=10.0, attempt=3)
    assert decide(Retry(delay=5), 1, policy) == RetryLater(delay=10.0, attempt=2)
    assert decide(Retry(delay=0.2), 3, policy) == RetryLater(delay=1.0, attempt=4)
    assert decide(Retry(delay=3600), 1, policy) == RetryLater(delay=60.0, attempt=2)


def test_retry_signal_counts_as_an_attempt() -> None:
    policy = RetryPolicy(max_attempts=2, delays=(0.1,))
    outcome = decide(Retry(delay=0.1), 2, policy)
    assert isinstance(outcome, GiveUp)
    assert outcome.error_type == "Retry" and outcome.attempts == 2
    assert "max_attempts=2" in outcome.error_message


def test_retry_signal_is_honoured_outside_retry_on() -> None:
    policy = RetryPolicy(max_attempts=3, delays=(0.1,), retry_on=(ConnectionError,))
    assert decide(Retry(), 1, policy) == RetryLater(delay=0.1, attempt=2)


def test_retries_immediately() -> None:
    policy = RetryPolicy(immediate=2, give_up_on=(KeyError,))
    assert policy.retries_immediately(ValueError("x"))
    # Signals and give-ups are never retried in process.
    assert not policy.retries_immediately(Retry())
    assert not policy.retries_immediately(Reject("no"))
    assert not policy.retries_immediately(KeyError("k"))
    assert not policy.retries_immediately(DecodeError("bad"))
    narrow = RetryPolicy(immediate=1, retry_on=(ConnectionError,))
    assert not narrow.retries_immediately(ValueError("x"))


def test_signals_are_not_errors() -> None:
    assert not isinstance(Reject("x"), MqkitError)
    assert not isinstance(Retry(), MqkitError)
    assert Retry(delay=2.5).delay == 2.5
    assert Retry().delay is None


def test_attempt_of() -> None:
    # A header of mqkit's own: RabbitMQ 4 ignores client-set x- headers.
    assert not ATTEMPT_HEADER.startswith("x-")
    assert attempt_of({}) == 1
    assert attempt_of({ATTEMPT_HEADER: 3}) == 3
    assert attempt_of({ATTEMPT_HEADER: "2"}) == 2
    assert attempt_of({ATTEMPT_HEADER: None}) == 1
    assert attempt_of({ATTEMPT_HEADER: "garbled"}) == 1
    assert attempt_of({ATTEMPT_HEADER: 0}) == 1
    assert attempt_of({ATTEMPT_HEADER: -4}) == 1
    assert attempt_of({"x-death": [{"count": 5}]}) == 1  # x-death is not trusted


@pytest.mark.parametrize(
    "forged",
    [10**12, 2**63, "9" * 5000, float("inf"), float("nan"), 2.5, True, b"\xff", [3], {"n": 3}],
)
def test_attempt_of_reads_a_forged_count_as_a_first_attempt(forged: object) -> None:
    # The header comes from the wire: a count mqkit could not have written must not skip
    # the retries (10**12 would dead-letter at the first failure).
    assert attempt_of({ATTEMPT_HEADER: forged}) == 1


def test_attempt_of_is_bounded_by_the_policy() -> None:
    assert attempt_of({ATTEMPT_HEADER: 3}, max_attempts=3) == 3
    assert attempt_of({ATTEMPT_HEADER: 4}, max_attempts=3) == 1
    assert attempt_of({ATTEMPT_HEADER: b"2"}, max_attempts=3) == 2
    assert attempt_of({ATTEMPT_HEADER: 2.0}, max_attempts=3) == 2
    assert attempt_of({ATTEMPT_HEADER: MAX_ATTEMPT}) == MAX_ATTEMPT
    assert attempt_of({ATTEMPT_HEADER: MAX_ATTEMPT + 1}) == 1


def test_immediate_delay_paces_quick_retries() -> None:
    policy = RetryPolicy(immediate=8)
    delays = [policy.immediate_delay(n) for n in range(1, 9)]
    assert delays[:4] == [0.0, 0.05, 0.1, 0.2]
    assert max(delays) == 1.0  # capped: a handler must not sit on its message long
