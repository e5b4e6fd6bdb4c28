"""A broker resource alarm blocks publishing, never consuming (issue 13, item 3).

A client publishes on a connection of its own, so when the broker blocks publishers (a memory
or disk alarm) its consumers keep taking and acking what is queued, declares still work,
``health()`` says publishing is blocked and why, a publish raises ``PublishTimeout`` within
``confirm_timeout`` (saying it may have been stored after all), and once the alarm clears
publishing works again. A node of the module's own: the alarm is raised with ``rabbitmqctl``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from conftest import wait_until
from pydantic import BaseModel

import mqkit
from mqkit.testing import RabbitNode

pytestmark = pytest.mark.fault

CONFIRM_TIMEOUT = 2.0
SLACK = 2.0  # scheduling noise on a shared 2-core machine
POISON = 13


class Job(BaseModel):
    n: int


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    with RabbitNode(f"mqkit-alarm-{uuid.uuid4().hex[:4]}") as rabbit:
        yield rabbit


@contextlib.contextmanager
def alarm(node: RabbitNode, kind: str) -> Iterator[None]:
    """A memory or disk alarm on ``node`` while the block runs (cleared even if it fails)."""
    if kind == "memory":
        raise_it, clear_it = ("set_vm_memory_high_watermark", "0.0000001"), ("0.4",)
    else:
        raise_it, clear_it = ("set_disk_free_limit", "100000GB"), ("50MB",)
    node.ctl(*raise_it)
    wait_until(lambda: kind in node.eval("rabbit_alarm:get_alarms()."), 30, f"a {kind} alarm")
    try:
        yield
    finally:
        node.ctl(raise_it[0], *clear_it)
        wait_until(lambda: node.eval("rabbit_alarm:get_alarms().") == "[]", 30, "no alarm")


def delete_queues(node: RabbitNode, prefix: str) -> None:
    """Delete every queue of ``node`` whose name starts with ``prefix`` (DLQ, retry queues)."""
    listed = node.ctl("list_queues", "name", "--no-table-headers", "--quiet").split()
    connection = pika.BlockingConnection(pika.URLParameters(node.url))
    try:
        channel = connection.channel()
        for name in listed:
            if name.startswith(prefix):
                channel.queue_delete(name)
    finally:
        connection.close()


def messages_in(node: RabbitNode, queue: str) -> int:
    for line in node.ctl("list_queues", "name", "messages", "--no-table-headers").splitlines():
        name, _, count = line.strip().partition("\t")
        if name == queue:
            return int(count)
    raise AssertionError(f"no queue {queue!r} on {node.name}")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_an_alarm_blocks_publishing_but_consumers_keep_going(
    rt: Any, node: RabbitNode, names: Any, collector: Any, caplog: Any, kind: str
) -> None:
    queue, other = names.queue(), names.queue()
    attempts: list[int] = []

    def handle(job: Job, ctx: mqkit.Context) -> None:
        if job.n == POISON:
            attempts.append(job.n)
            raise mqkit.Reject("poison")  # its copy to the DLQ cannot be published now

    handled = collector(handle)
    caplog.set_level(logging.INFO, logger="mqkit")
    try:
        with rt.client(url=node.url, confirm_timeout=CONFIRM_TIMEOUT) as client:
            producer = client.producer(Job, queue=queue)
            for n in [1, 2, 3, 4, 5, POISON]:
                producer.publish(Job(n=n))
            consumer = client.consumer(queue, Job, handled)
            with alarm(node, kind):
                started = time.monotonic()
                with pytest.raises(mqkit.PublishTimeout) as caught:
                    producer.publish(Job(n=99))
                elapsed = time.monotonic() - started
                assert elapsed <= CONFIRM_TIMEOUT + SLACK, f"PublishTimeout after {elapsed:.1f}s"
                text = str(caught.value)
                assert "blocking this client's publishing connection" in text, text
                assert "may have been stored after all" in text and "same message_id" in text
                (late,) = caught.value.unconfirmed

                health = client.health()
                assert health.publishing_blocked and health.blocked_reason, health
                assert kind in health.blocked_reason, health
                assert health.connected and health.ready, health

                client.declare(mqkit.Queue(other))  # declaring goes on
                consumer.start()  # so does consuming: declares its queues, then consumes
                handled.wait(5, timeout=10)
                wait_until(
                    lambda: len(attempts) >= 2,
                    4 * CONFIRM_TIMEOUT + SLACK,
                    "the poison message back in the queue, not a consumer stuck on it",
                )
                # Everything but the poison message was acked during the alarm.
                wait_until(lambda: messages_in(node, queue) == 1, 10, "the acks")
                assert client.health().ready
            wait_until(lambda: not client.health().publishing_blocked, 30, "the unblock")
            producer.publish(Job(n=100))
            dlq = client.dead_letters(queue)
            wait_until(lambda: dlq.count() >= 1, 30, "the poison message in the DLQ")
            handled.wait(7, timeout=15)  # 1-5, then 99 (stored after all) and 100
            ids = {ctx.message_id for ctx in handled.contexts}
            assert late in ids, "the publish that timed out during the alarm was stored after all"
            health = client.health()
            assert not health.publishing_blocked and health.blocked_reason is None
            consumer.stop()
    finally:
        delete_queues(node, names.base)
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("mqkit")]
    blocked = [m for level, m in logged if level == logging.WARNING and "blocks publishing" in m]
    assert blocked and kind in blocked[0], logged
    assert any(level == logging.INFO and "unblocked" in m for level, m in logged), logged


def test_a_client_closes_at_once_while_the_broker_blocks_it(
    rt: Any, node: RabbitNode, names: Any
) -> None:
    """The broker does not read a blocked connection, so it never answers its close: the
    client drops the socket instead of waiting (a leaked socket would fail the test with a
    ResourceWarning)."""
    queue = names.queue()
    try:
        with alarm(node, "memory"):
            client = rt.make_client(url=node.url, confirm_timeout=CONFIRM_TIMEOUT)
            with client:
                producer = client.producer(Job, queue=queue)
                with pytest.raises(mqkit.PublishTimeout):
                    producer.publish(Job(n=1))
                assert client.health().publishing_blocked
                started = time.monotonic()
            took = time.monotonic() - started
            assert took < 4.0, f"closing a blocked client took {took:.1f}s"
    finally:
        delete_queues(node, names.base)
