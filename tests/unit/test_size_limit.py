"""The message size check both publishers make before sending (:class:`SizeLimit`)."""

from __future__ import annotations

from functools import partial

import pytest

import mqkit
from mqkit import explain
from mqkit.errors import PublishError, PublishTooLarge
from mqkit.publishing import SizeLimit

REFUSAL = "PRECONDITION_FAILED - message size 2097152 is larger than configured max size 1048576"


def what() -> str:
    return explain.publishing("m-1", "", "orders")


def test_a_body_up_to_the_limit_may_be_sent() -> None:
    limit = SizeLimit(1024)
    assert limit.check(0, what) is None
    assert limit.check(1024, what) is None


def test_a_body_above_the_limit_is_too_large_and_says_so() -> None:
    error = SizeLimit(1024).check(1025, what, ["m-1"])
    assert isinstance(error, PublishTooLarge) and isinstance(error, PublishError)
    assert (error.size, error.limit, error.unconfirmed) == (1025, 1024, ["m-1"])
    text = str(error)
    assert "publish message m-1 to queue 'orders'" in text
    assert "too large" in text and "1025 bytes" in text and "1024 bytes" in text
    assert "max_message_size setting" in text and "not sent" in text


def test_what_is_built_only_for_a_message_too_large() -> None:
    def never() -> str:
        raise AssertionError("built for a message that may be sent")

    assert SizeLimit(10).check(10, never) is None


def test_a_refusal_by_the_broker_lowers_the_limit_to_the_brokers() -> None:
    limit = SizeLimit(134_217_728)
    assert limit.refused(REFUSAL) == 1_048_576
    assert (limit.limit, limit.from_broker) == (1_048_576, True)
    error = limit.check(2_000_000, what)
    assert error is not None and "the broker's max_message_size of 1048576 bytes" in str(error)


def test_a_refusal_never_raises_a_lower_setting() -> None:
    limit = SizeLimit(1000)
    assert limit.refused(REFUSAL) == 1_048_576
    assert (limit.limit, limit.from_broker) == (1000, False)


@pytest.mark.parametrize(
    "reply",
    [
        "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/'",
        "NOT_FOUND - no exchange 'x' in vhost '/'",
        "",
    ],
)
def test_other_channel_errors_are_not_about_size(reply: str) -> None:
    limit = SizeLimit(1024)
    assert limit.refused(reply) is None
    assert (limit.limit, limit.from_broker) == (1024, False)


def test_the_setting_defaults_to_rabbitmq_3s_limit_and_is_checked() -> None:
    assert mqkit.Settings().max_message_size == 134_217_728
    assert mqkit.Settings(max_message_size=1024).max_message_size == 1024
    for bad in (0, -1, 536_870_913):
        with pytest.raises(mqkit.ConfigError, match="max_message_size"):
            mqkit.Settings(max_message_size=bad)


def test_many_messages_too_large_give_one_error_of_that_kind() -> None:
    errors = [SizeLimit(10).check(11, partial(explain.publishing, i, "", "q")) for i in "ab"]
    error = explain.many_failed(
        [e for e in errors if e is not None], total=5, unconfirmed=["a", "b"]
    )
    assert isinstance(error, PublishTooLarge) and error.unconfirmed == ["a", "b"]
    assert "too large" in str(error)


def test_a_timeout_says_the_message_may_have_been_stored_and_how_to_resend_it() -> None:
    cause = explain.publishing_blocked("low on memory")
    error = explain.confirm_timeout(what(), 2, cause, unconfirmed=["m-1"])
    text = str(error)
    assert "low on memory" in text and "alarm" in text
    assert "may have been stored after all" in text
    assert "same message_id" in text and "idempotent consumer drops the duplicate" in text
    assert error.unconfirmed == ["m-1"]
