"""How entities are declared (mqkit.declaring): the decisions both shells follow."""

from __future__ import annotations

import pytest

from mqkit import explain
from mqkit.declaring import checks_only, expand, is_derived, missing_advice, use_existing
from mqkit.errors import TopologyError
from mqkit.topology import Binding, Exchange, Queue, consumer_topology

QUEUE, EXCHANGE, BINDING = Queue("orders"), Exchange("events"), Binding("events", "orders", "#")


def test_passive_mode_checks_queues_and_exchanges_but_still_binds():
    assert checks_only(QUEUE, "passive") and checks_only(EXCHANGE, "passive")
    assert not checks_only(BINDING, "passive")
    assert not checks_only(QUEUE, "auto") and not checks_only(QUEUE, "strict")


def test_a_queue_found_in_another_shape_is_only_checked_afterwards():
    assert checks_only(QUEUE, "auto", known=True)
    assert not checks_only(BINDING, "auto", known=True)


@pytest.mark.parametrize(
    ("entity", "mode", "code", "expected"),
    [
        (QUEUE, "auto", explain.PRECONDITION_FAILED, True),
        (QUEUE, "auto", explain.ACCESS_REFUSED, True),
        (EXCHANGE, "auto", explain.ACCESS_REFUSED, True),
        # an exchange of another type would change routing: stays an error
        (EXCHANGE, "auto", explain.PRECONDITION_FAILED, False),
        (BINDING, "auto", explain.ACCESS_REFUSED, False),
        (QUEUE, "strict", explain.PRECONDITION_FAILED, False),
        (QUEUE, "auto", explain.RESOURCE_LOCKED, False),
        (QUEUE, "auto", None, False),
    ],
)
def test_which_refusals_fall_back_to_what_exists(entity, mode, code, expected):
    assert use_existing(entity, mode, code) is expected


def test_declare_gives_a_queue_the_shape_every_part_declares():
    shaped = expand([QUEUE], default_type="quorum", delivery_limit=20)
    assert shaped == consumer_topology(QUEUE, None, default_type="quorum", delivery_limit=20)
    assert [q.name for q in shaped] == ["orders.dlq", "orders"]  # type: ignore[union-attr]


def test_declare_leaves_temporary_and_derived_queues_exchanges_and_bindings_alone():
    temporary = Queue("tmp", exclusive=True)
    given = [temporary, Queue("orders.dlq"), Queue("orders.retry.1000ms"), EXCHANGE, BINDING]
    assert expand(given, default_type="quorum", delivery_limit=20) == given


def test_expanding_is_idempotent_and_deduplicates():
    once = expand([QUEUE, QUEUE], default_type="classic", delivery_limit=20)
    assert expand(once, default_type="classic", delivery_limit=20) == once
    assert len(once) == 2


def test_derived_names():
    assert is_derived("a.dlq") and is_derived("a.retry.1000ms")
    assert not is_derived("a.retry.soon") and not is_derived("retry.10ms") and not is_derived("a")


def test_advice_for_missing_entities_says_what_to_do():
    assert "declare='passive' declares nothing" in missing_advice(QUEUE, "passive")
    assert "configure permission" in missing_advice(EXCHANGE, "auto")


def test_warning_for_an_existing_queue_says_what_is_not_guaranteed():
    refused = explain.broker_refused(
        406,
        "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-exchange' for queue 'orders' "
        "in vhost '/': received the value '' of type 'longstr' but current is none",
        what="declare queue 'orders'",
    )
    assert isinstance(refused, TopologyError) and refused.reply_code == 406
    text = explain.using_existing(QUEUE, refused)
    assert "existing queue 'orders'" in text and "x-dead-letter-exchange" in text
    assert "will not park" in text and "declare='strict'" in text
    assert "delete it" not in text  # the advice of the error does not fit a warning
    denied = explain.broker_refused(403, "ACCESS_REFUSED", what="declare queue 'orders'")
    assert "may not configure" in explain.using_existing(QUEUE, denied)
