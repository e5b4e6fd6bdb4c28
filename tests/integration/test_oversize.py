"""A message too large for the broker fails alone, as ``PublishTooLarge`` (issue 13, item 4).

Above the ``max_message_size`` setting a message fails before it is sent (the test broker).
When the broker's own limit is lower (a node of the module's own with a 1 MiB limit, the
client's limit left at its default), the broker closes the publishing channel over it: only
that message fails, publishes in flight beside it are sent again and confirmed, and
``publish_many`` names exactly the message that was not stored.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from pydantic import BaseModel

import mqkit
from mqkit.testing import RabbitNode

BROKER_LIMIT = 1024 * 1024


class Blob(BaseModel):
    data: str


def blob(size: int) -> Blob:
    """A Blob whose JSON body is about ``size`` bytes."""
    return Blob(data="x" * size)


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    with RabbitNode(f"mqkit-size-{uuid.uuid4().hex[:4]}") as rabbit:
        # Channels opened from now on refuse bodies above 1 MiB (rabbitmq.conf's
        # max_message_size, set at run time).
        rabbit.eval(f"application:set_env(rabbit, max_message_size, {BROKER_LIMIT}).")
        yield rabbit


def stored(url: str, queue: str) -> list[tuple[str, int]]:
    """``(message_id, body size)`` of every message in ``queue`` (removing them)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        found = []
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((props.message_id, len(body)))
    finally:
        connection.close()


def delete_queues(url: str, *queues: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for queue in queues:
            channel.queue_delete(queue)
    finally:
        connection.close()


def test_a_message_above_the_setting_fails_before_it_is_sent(rt: Any, names: Any) -> None:
    queue = names.queue()
    with rt.client(max_message_size=4096) as client:
        producer = client.producer(Blob, queue=queue)
        with pytest.raises(mqkit.PublishTooLarge) as caught:
            producer.publish(blob(5000), message_id="big-1")
        error = caught.value
        assert isinstance(error, mqkit.PublishError)
        assert error.unconfirmed == ["big-1"] and error.limit == 4096
        assert error.size is not None and error.size > 4096
        text = str(error)
        assert "message big-1" in text and "too large" in text
        assert f"{error.size} bytes" in text and "max_message_size setting of 4096" in text

        with pytest.raises(mqkit.PublishTooLarge) as caught:
            producer.publish_many([blob(10), blob(5000), blob(20)])
        (big,) = caught.value.unconfirmed  # only the large one was not stored
        assert producer.publish(blob(30))  # nothing disturbed the publishing channel
        found = stored(rt.broker_url, queue)
        assert sorted(size for _, size in found) == sorted(
            len(blob(n).model_dump_json()) for n in (10, 20, 30)
        )
        assert big not in {mid for mid, _ in found}


def test_the_brokers_refusal_fails_only_the_message_too_large(
    rt: Any, node: RabbitNode, names: Any
) -> None:
    """The client's limit is the default 128 MiB, the broker's 1 MiB: the broker closes the
    publishing channel over the large message while another thread keeps publishing on it."""
    queue = names.queue()
    confirmed: list[str] = []
    streaming, done = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def stream(producer: Any) -> None:  # batches of small messages until the large one is done
        try:
            while not done.is_set():
                confirmed.extend(producer.publish_many([blob(100) for _ in range(200)]))
                streaming.set()
        except Exception as exc:
            results["stream"] = exc
        finally:
            streaming.set()

    try:
        with rt.client(url=node.url) as client:
            producer = client.producer(Blob, queue=queue)
            streamer = threading.Thread(target=stream, args=(producer,))
            streamer.start()
            try:
                assert streaming.wait(30)
                with pytest.raises(mqkit.PublishTooLarge) as caught:
                    producer.publish(blob(2 * BROKER_LIMIT))
            finally:
                done.set()
                streamer.join(60)
            assert "stream" not in results, results  # the other publishes were not disturbed
            big = caught.value
            assert big.limit == BROKER_LIMIT and big.size is not None and big.size > BROKER_LIMIT
            text = str(big)
            assert (
                "too large" in text and f"the broker's max_message_size of {BROKER_LIMIT}" in text
            )

            # The broker's limit is known now: the next large one fails before it is sent.
            with pytest.raises(mqkit.PublishTooLarge) as caught:
                producer.publish_many([blob(10), blob(2 * BROKER_LIMIT), blob(20)])
            (refused,) = caught.value.unconfirmed
            assert "broker's max_message_size" in str(caught.value)

            found = stored(node.url, queue)
            found_ids = {mid for mid, _ in found}
            # Every small message was stored (some maybe twice: those in flight when the
            # channel closed were sent again), and neither large one.
            assert set(confirmed) <= found_ids
            assert big.unconfirmed[0] not in found_ids and refused not in found_ids
            assert len(found_ids) == len(confirmed) + 2
            assert all(size < BROKER_LIMIT for _, size in found)
    finally:
        delete_queues(node.url, queue, f"{queue}.dlq")


def test_publish_many_names_the_one_message_the_broker_refused(
    rt: Any, node: RabbitNode, names: Any
) -> None:
    queue = names.queue()
    try:
        with rt.client(url=node.url) as client:
            producer = client.producer(Blob, queue=queue)
            batch = [blob(10), blob(20), blob(2 * BROKER_LIMIT), blob(30), blob(40)]
            with pytest.raises(mqkit.PublishTooLarge) as caught:
                producer.publish_many(batch)
            (refused,) = caught.value.unconfirmed
            assert "the broker's max_message_size" in str(caught.value)
            found = stored(node.url, queue)
            assert refused not in {mid for mid, _ in found}
            sizes = {size for _, size in found}
            assert sizes == {len(batch[i].model_dump_json()) for i in (0, 1, 3, 4)}
    finally:
        delete_queues(node.url, queue, f"{queue}.dlq")
