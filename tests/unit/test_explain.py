"""The words of the errors both runtimes raise (mqkit.explain)."""

from __future__ import annotations

import pytest

from mqkit import explain
from mqkit.errors import (
    ConnectionFailed,
    PublishError,
    PublishNacked,
    PublishTimeout,
    PublishUnroutable,
    TopologyError,
)
from mqkit.topology import Binding, Exchange, Queue

URL = "amqp://guest:s3cret@broker.example:5672/shop"


def test_unreachable_names_every_masked_url_the_timeout_and_the_cause() -> None:
    error = explain.unreachable(
        [URL, "amqp://u:pw2@10.0.0.2:5673/", URL], 1.5, "refused amqp://x:pw3@h/"
    )
    assert isinstance(error, ConnectionFailed)
    text = str(error)
    assert "broker.example:5672" in text and "10.0.0.2:5673" in text
    assert text.count("broker.example") == 1  # a URL tried twice is named once
    assert "1.5s" in text and "last error: refused" in text
    assert "s3cret" not in text and "pw2" not in text and "pw3" not in text


def test_unreachable_without_a_cause() -> None:
    assert "no attempt finished in time" in str(explain.unreachable([URL], 2, None))


def test_wrong_credentials_and_unknown_vhost() -> None:
    wrong = explain.wrong_credentials(URL, "ACCESS_REFUSED")
    assert isinstance(wrong, ConnectionFailed)
    assert "wrong username or password" in str(wrong)
    assert "***" in str(wrong) and "s3cret" not in str(wrong)
    vhost = explain.unknown_vhost(URL, "NOT_ALLOWED")
    assert "virtual host 'shop'" in str(vhost) and "s3cret" not in str(vhost)
    assert "virtual host '/'" in str(explain.unknown_vhost("amqp://h:5672/", "x"))


@pytest.mark.parametrize(
    ("current", "queue_type"),
    [("none", "classic"), ("the value 'classic' of type 'longstr'", "classic")],
)
def test_precondition_failed_on_queue_type_says_how_to_declare_it(current, queue_type) -> None:
    text = (
        "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'orders' in vhost '/': "
        f"received the value 'quorum' of type 'longstr' but current is {current}"
    )
    error = explain.broker_refused(406, text, what="declare queue 'orders'")
    assert isinstance(error, TopologyError)
    message = str(error)
    assert message.startswith("queue 'orders' already exists with other arguments")
    assert "x-queue-type" in message and "quorum" in message
    assert message.endswith(f"delete it, or declare it as it is (queue_type={queue_type!r})")


def test_other_precondition_failures_keep_the_broker_text() -> None:
    error = explain.broker_refused(406, "PRECONDITION_FAILED - unknown", what="purge 'q'")
    assert str(error) == "purge 'q': precondition failed (PRECONDITION_FAILED - unknown)"


def test_not_found_locked_refused_and_other_codes() -> None:
    text = "NOT_FOUND - no queue 'q.dlq' in vhost '/'"
    assert str(explain.broker_refused(404, text, what="count")).endswith("; declare it first")
    hint = explain.missing_dlq("q")
    missing = str(explain.broker_refused(404, text, what="count", missing=hint))
    assert "not found" in missing and "does not exist until a consumer of 'q'" in missing
    assert "exclusive" in str(explain.broker_refused(405, "RESOURCE_LOCKED", what="x"))
    assert "permission" in str(explain.broker_refused(403, "ACCESS_REFUSED", what="x"))
    assert "(541 INTERNAL)" in str(explain.broker_refused(541, "INTERNAL", what="x"))
    assert "(odd)" in str(explain.broker_refused(None, "odd", what="x"))


def test_declaring_names_the_entity() -> None:
    assert explain.declaring(Queue("orders")) == "declare queue 'orders'"
    assert explain.declaring(Exchange("shop")) == "declare exchange 'shop'"
    assert explain.declaring(Binding("shop", "orders", "orders.*")) == (
        "bind queue 'orders' to exchange 'shop' with routing key 'orders.*'"
    )


def test_publish_errors_name_the_message_and_where_it_went() -> None:
    to_queue = explain.publishing("m-1", "", "orders")
    assert to_queue == "publish message m-1 to queue 'orders'"
    to_exchange = explain.publishing("m-2", "shop", "orders.new")
    assert to_exchange == "publish message m-2 to exchange 'shop' (routing key 'orders.new')"
    returned = explain.unroutable(to_exchange, "312 NO_ROUTE")
    assert isinstance(returned, PublishUnroutable) and "312 NO_ROUTE" in str(returned)
    assert isinstance(explain.nacked(to_queue), PublishNacked)
    timeout = explain.confirm_timeout(to_queue, 2, "link down", unconfirmed=["m-1"])
    assert isinstance(timeout, PublishTimeout) and timeout.unconfirmed == ["m-1"]
    assert "2s" in str(timeout) and "link down" in str(timeout)


def test_many_failed_keeps_a_single_error_and_names_the_common_kind() -> None:
    one = explain.nacked("publish message a to queue 'q'")
    assert explain.many_failed([one], total=1, unconfirmed=["a"]) is one
    assert one.unconfirmed == ["a"]
    missing = TopologyError("no exchange")
    assert explain.many_failed([missing, missing], total=5, unconfirmed=["a", "b"]) is missing
    same = explain.many_failed(
        [explain.nacked("x"), explain.nacked("y")], total=5, unconfirmed=["a", "b"]
    )
    assert type(same) is PublishNacked and same.unconfirmed == ["a", "b"]
    assert str(same).startswith("2 of 5 messages were not confirmed")
    mixed = explain.many_failed(
        [explain.nacked("x"), explain.unroutable("y", "312")], total=3, unconfirmed=["a", "b"]
    )
    assert type(mixed) is PublishError


def test_connection_texts() -> None:
    assert "within 3s" in str(explain.no_answer("declare", 3))
    assert "in time" in str(explain.no_answer("declare"))
    down = str(explain.not_connected("publish", 5, "amqp://u:pw@h/ refused"))
    assert "5s" in down and "pw" not in down
    assert "closed" in str(explain.closed("connect"))
    assert "lost" in str(explain.link_lost("consume", "reset"))
