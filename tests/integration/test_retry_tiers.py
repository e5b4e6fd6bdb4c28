"""Retry tiers shared by a service (issue 14, item 1), on both runtimes.

A service has one tier per delay, ``<service>.retries.<n>ms``: a fanout exchange and a queue
whose TTL dead-letters each message to the default exchange with its own routing key, the
work queue it was published for. Every consumer and bus subscription of the service retries
through them; a consumer holds only its work queue and its DLQ.

The upgrade from the per-queue retry queues of earlier versions (``<queue>.retry.<n>ms``,
dead-lettering to ``x-dead-letter-routing-key=<queue>``): the messages waiting there come
back to their queue by themselves, and mqkit leaves those queues alone (an instance of the
earlier version may still publish to them during a rolling upgrade, and quorum queues refuse
``queue.delete(if_empty=True)``, so emptiness cannot be checked and acted on in one step).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from conftest import wait_until
from pydantic import BaseModel

import mqkit
from mqkit.retry import ATTEMPT_HEADER
from mqkit.testing import RabbitNode
from mqkit.topology import dlq_name, retry_queue_name, retry_tier_name


class Job(BaseModel):
    job_id: str


class JobQueued(mqkit.Event, event_type="tiers.job.queued"):
    job_id: str


class Calls:
    """Every handler call: (queue, job id, attempt, monotonic time)."""

    def __init__(self, fail: Any = None) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[str, str, int, float]] = []
        self.fail = fail  # (job_id, attempt) -> an exception to raise, or None

    def handler(self, message: Any, ctx: mqkit.Context) -> None:
        with self.lock:
            self.items.append((ctx.queue, message.job_id, ctx.attempt, time.monotonic()))
        error = self.fail(message.job_id, ctx.attempt) if self.fail else None
        if error is not None:
            raise error

    def of(self, job_id: str) -> list[tuple[str, int, float]]:
        with self.lock:
            return [(q, a, t) for q, j, a, t in self.items if j == job_id]

    def jobs(self) -> set[tuple[str, int]]:
        with self.lock:
            return {(j, a) for _, j, a, _ in self.items}


def queue_names(client: Any) -> list[str]:
    return sorted({e.name for e in client.topology if isinstance(e, mqkit.Queue)})


def exchange_names(client: Any) -> list[str]:
    return sorted({e.name for e in client.topology if isinstance(e, mqkit.Exchange)})


# --------------------------------------------------------------------------- sharing


def test_consumers_and_subscriptions_of_a_service_share_its_tiers(rt, names, raw):
    service, first, second = names.service(), names.queue(), names.queue()
    exchange = names.exchange()
    calls = Calls(lambda job, attempt: RuntimeError("once") if attempt == 1 else None)
    policy = mqkit.RetryPolicy(max_attempts=2, delays=(0.2,))
    tier = retry_tier_name(service, 0.2)
    with rt.client(service=service) as client:
        bus = client.event_bus(exchange=exchange)
        bus.subscribe(JobQueued, calls.handler, retry=policy)
        subscription = f"{service}.{JobQueued.event_type}"
        with (
            client.consumer(first, Job, calls.handler, retry=policy),
            client.consumer(second, Job, calls.handler, retry=policy),
            bus,
        ):
            client.producer(Job, queue=first).publish(Job(job_id="a"))
            client.producer(Job, queue=second).publish(Job(job_id="b"))
            bus.publish(JobQueued(job_id="c"))
            wait_until(lambda: len(calls.jobs()) == 6, timeout=15, what="3 jobs, 2 attempts each")
            # Each came back to the queue it was published for, through the one tier.
            assert [(q, a) for q, a, _ in calls.of("a")] == [(first, 1), (first, 2)]
            assert [(q, a) for q, a, _ in calls.of("b")] == [(second, 1), (second, 2)]
            assert [(q, a) for q, a, _ in calls.of("c")] == [(subscription, 1), (subscription, 2)]
            queues = queue_names(client)
            exchanges = exchange_names(client)
        time.sleep(0.3)
    # Per consumer: its work queue and its DLQ. Per service and delay: one tier.
    own = [first, dlq_name(first), second, dlq_name(second), subscription, dlq_name(subscription)]
    assert queues == sorted([*own, tier])
    assert exchanges == sorted([exchange, tier])
    assert not any(".retry." in name for name in queues)
    for queue in (first, second, subscription):
        assert raw.count(queue) == 0 and raw.count(dlq_name(queue)) == 0
    assert raw.count(tier) == 0
    assert len(calls.items) == 6  # nothing came back twice, nothing went to another queue


def test_a_retry_waits_in_the_services_tier_not_in_the_process(rt, names, raw):
    queue, service = names.queue(), names.service()
    tier = retry_tier_name(service, 1.5)
    calls = Calls(lambda job, attempt: RuntimeError("down") if attempt == 1 else None)
    policy = mqkit.RetryPolicy(max_attempts=2, delays=(1.5,))
    with (
        rt.client(service=service) as client,
        client.consumer(queue, Job, calls.handler, retry=policy),
    ):
        client.producer(Job, queue=queue).publish(Job(job_id="1"))
        wait_until(lambda: len(calls.items) == 1, what="the first attempt")
        # The broker holds it: in the tier, not in the work queue nor unacked in the client.
        wait_until(lambda: raw.count(tier) == 1, timeout=1.0, what="the copy in the tier")
        assert raw.count(queue) == 0
        wait_until(lambda: len(calls.items) == 2, timeout=10, what="the retry")
        assert raw.count(tier) == 0
    [(_, _, first), (_, attempt, second)] = calls.of("1")
    assert attempt == 2
    assert second - first >= 1.5 - 0.05


def test_a_short_delay_never_waits_behind_a_long_one(rt, names):
    # Both delays are tiers of the same service: the long one is published first, and the
    # short one comes back first, on time (one queue per delay, so no head-of-line wait).
    queue = names.queue()

    def fail(job: str, attempt: int) -> Exception | None:
        if attempt > 1:
            return None
        return mqkit.Retry(delay=3.0 if job == "slow" else 0.2)

    calls = Calls(fail)
    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.2, 3.0))  # both delays are tiers
    with (
        rt.client(service=names.service()) as client,
        client.consumer(queue, Job, calls.handler, retry=policy),
    ):
        producer = client.producer(Job, queue=queue)
        producer.publish(Job(job_id="slow"))
        wait_until(lambda: len(calls.of("slow")) == 1, what="the slow job's first attempt")
        producer.publish(Job(job_id="fast"))
        wait_until(lambda: len(calls.of("fast")) == 2, timeout=10, what="the fast job's retry")
        fast_back = time.monotonic()
        assert len(calls.of("slow")) == 1, "the short delay waited behind the long one"
        wait_until(lambda: len(calls.of("slow")) == 2, timeout=10, what="the slow job's retry")
    [(_, _, fast_first), (_, _, fast_second)] = calls.of("fast")
    [(_, _, slow_first), (_, _, slow_second)] = calls.of("slow")
    assert 0.2 - 0.05 <= fast_second - fast_first < 1.5
    assert fast_back < slow_second
    assert slow_second - slow_first >= 3.0 - 0.05


def test_a_retry_goes_back_to_its_queue_only(rt, names, raw):
    # Published with a CC header naming another queue, the message reached both; its retry
    # comes back to the queue that failed it, not to the one CC named (the tier dead-letters
    # by the message's routing keys, CC among them, so mqkit's copy does not carry CC).
    queue, other = names.queue(), names.queue()
    calls = Calls(lambda job, attempt: RuntimeError("once") if attempt == 1 else None)
    policy = mqkit.RetryPolicy(max_attempts=2, delays=(0.2,))
    with (
        rt.client(service=names.service()) as client,
        client.consumer(queue, Job, calls.handler, retry=policy),
    ):
        client.declare(mqkit.Queue(other))
        raw.publish(
            queue,
            b'{"job_id": "cc"}',
            properties=pika.BasicProperties(
                content_type="application/json", delivery_mode=2, headers={"CC": [other]}
            ),
        )
        wait_until(lambda: len(calls.items) == 2, timeout=10, what="the retry")
        time.sleep(0.3)
        assert raw.count(other) == 1  # the publisher's copy, and no retry
    assert [(q, a) for q, a, _ in calls.of("cc")] == [(queue, 1), (queue, 2)]


def test_tiers_are_declared_with_the_services_type_and_at_least_once(rt, names, broker_ctl):
    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.2, 0.4))
    with (
        rt.client(service=names.service(), queue_type="classic") as classic,
        rt.client(service=names.service()) as quorum,
    ):
        with classic.consumer(names.queue(), Job, lambda m, c: None, retry=policy):
            pass
        with quorum.consumer(names.queue(), Job, lambda m, c: None, retry=policy):
            pass
        listed = _arguments(broker_ctl)
        for delay in policy.tiers:
            quorum_tier = listed[retry_tier_name(quorum.settings.service, delay)]
            assert quorum_tier == {
                "x-queue-type": "quorum",
                "x-message-ttl": str(round(delay * 1000)),
                "x-dead-letter-exchange": "",
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
            classic_tier = listed[retry_tier_name(classic.settings.service, delay)]
            assert classic_tier == {
                "x-queue-type": "classic",
                "x-message-ttl": str(round(delay * 1000)),
                "x-dead-letter-exchange": "",
            }


def _arguments(ctl: Any) -> dict[str, dict[str, str]]:
    """Every queue's declared arguments, from ``rabbitmqctl list_queues name arguments``
    (``[{"x-queue-type","quorum"},{"x-message-ttl",200},{"x-dead-letter-exchange",[]}]``)."""
    out: dict[str, dict[str, str]] = {}
    for line in ctl.run(
        "-q", "--no-table-headers", "list_queues", "name", "arguments"
    ).splitlines():
        name, _, args = line.partition("\t")
        pairs = re.findall(r'\{"([^"]+)",("(?:[^"]*)"|\[\]|[^}]*)\}', args)
        out[name.strip()] = {k: "" if v == "[]" else v.strip('"') for k, v in pairs}
    return out


# --------------------------------------------------------------------------- at least once


@pytest.fixture(scope="module")
def short_settle_node() -> Iterator[RabbitNode]:
    """A node of the module's own whose at-least-once dead-lettering tries again after half
    a second (the default is minutes), so a test can watch it."""
    with RabbitNode(f"mqkit-tiers-{uuid.uuid4().hex[:4]}") as node:
        node.eval("application:set_env(rabbit, dead_letter_worker_publisher_confirm_timeout, 500).")
        yield node


def test_a_quorum_tier_keeps_a_retry_its_queue_cannot_take_yet(rt, short_settle_node):
    # At least once: the tier's TTL expires while the work queue is gone (deleted by hand,
    # say); the tier keeps the message and delivers it once the queue is back. A tier that
    # dead-lettered at most once would have dropped it.
    node = short_settle_node
    queue, service = f"tiers-{uuid.uuid4().hex[:6]}", f"svc-{uuid.uuid4().hex[:6]}"
    calls = Calls(lambda job, attempt: RuntimeError("later") if attempt == 1 else None)
    policy = mqkit.RetryPolicy(max_attempts=2, delays=(2.0,))
    tier = retry_tier_name(service, 2.0)
    raw = _Plain(node.url)
    with rt.client(url=node.url, service=service) as client:
        consumer = client.consumer(queue, Job, calls.handler, retry=policy)
        consumer.start()
        client.producer(Job, queue=queue).publish(Job(job_id="kept"))
        wait_until(lambda: raw.count(tier) == 1, timeout=5, what="the copy in the tier")
        copied = time.monotonic()
        consumer.stop()
    raw.delete(queue)
    assert time.monotonic() - copied < 2.0, "too slow: the copy came back before the delete"
    time.sleep(2.0 - (time.monotonic() - copied) + 1.0)  # the TTL expires: nowhere to go
    assert raw.count(tier) == 0  # out of the tier's queue, held by its dead-lettering
    with (
        rt.client(url=node.url, service=service) as client,
        client.consumer(queue, Job, calls.handler, retry=policy),
    ):
        wait_until(lambda: len(calls.items) == 2, timeout=10, what="the kept retry")
    assert calls.jobs() == {("kept", 1), ("kept", 2)}
    raw.delete(queue, dlq_name(queue), tier)


class _Plain:
    """A plain pika client on a node of the test's own."""

    def __init__(self, url: str) -> None:
        self.url = url

    def count(self, queue: str) -> int:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            declared = connection.channel().queue_declare(queue, passive=True)
            return int(declared.method.message_count)  # type: ignore[arg-type]
        finally:
            connection.close()

    def delete(self, *queues: str) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            for queue in queues:
                connection.channel().queue_delete(queue)
        finally:
            connection.close()


# --------------------------------------------------------------------------- the upgrade


def _old_retry_queue_arguments(queue: str, delay: float) -> dict[str, Any]:
    """A queue's own retry queue, exactly as mqkit declared it before the tiers were shared
    (quorum; see ``git show <earlier commit>:mqkit/topology.py``)."""
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": round(delay * 1000),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def _declare_old_topology(url: str, queue: str, delays: tuple[float, ...]) -> list[str]:
    """The work queue, its DLQ and its own retry queues as the earlier version declared them
    (the work queue's arguments did not change); the retry queues' names."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.queue_declare(
            dlq_name(queue),
            durable=True,
            arguments={"x-queue-type": "quorum", "x-delivery-limit": 1_000_000},
        )
        olds = []
        for delay in delays:
            old = retry_queue_name(queue, delay)
            channel.queue_declare(
                old, durable=True, arguments=_old_retry_queue_arguments(queue, delay)
            )
            olds.append(old)
        channel.queue_declare(
            queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": dlq_name(queue),
                "x-delivery-limit": 20,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        return olds
    finally:
        connection.close()


def _publish_old_retry(url: str, old_retry_queue: str, job_id: str, attempt: int) -> None:
    """What a consumer of the earlier version published when attempt ``attempt - 1`` failed:
    a copy by the default exchange into the queue's own retry queue, with the attempt
    header, confirmed."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            "",
            old_retry_queue,
            json.dumps({"job_id": job_id}).encode(),
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=f"old-{job_id}",
                type="Job",
                timestamp=int(time.time()),
                headers={
                    ATTEMPT_HEADER: attempt,
                    "x-mqkit-original-exchange": "",
                    "x-mqkit-original-routing-key": "",
                },
            ),
            mandatory=True,
        )
    finally:
        connection.close()


def test_retries_waiting_in_old_per_queue_retry_queues_come_back_after_the_upgrade(
    rt, names, raw, caplog
):
    queue, service = names.queue(), names.service()
    policy = mqkit.RetryPolicy(max_attempts=3, delays=(0.5, 2.0))
    olds = _declare_old_topology(rt.broker_url, queue, policy.tiers)
    try:
        # Retries the earlier version left waiting: two short, two long, and one more that
        # fails again (its next retry goes through the new tier).
        for job in ("s1", "s2", "again"):
            _publish_old_retry(rt.broker_url, olds[0], job, 2)
        for job in ("l1", "l2"):
            _publish_old_retry(rt.broker_url, olds[1], job, 2)
        assert [raw.count(old) for old in olds] == [3, 2]
        calls = Calls(
            lambda job, attempt: RuntimeError("again") if job == "again" and attempt == 2 else None
        )
        caplog.set_level("WARNING", logger="mqkit")
        with (
            rt.client(service=service) as client,
            client.consumer(queue, Job, calls.handler, retry=policy),
        ):
            wait_until(lambda: len(calls.items) == 6, timeout=15, what="every old retry handled")
            # During a rolling upgrade an instance of the earlier version still retries into
            # the old queue: that copy comes back too.
            _publish_old_retry(rt.broker_url, olds[0], "late", 2)
            wait_until(lambda: len(calls.items) == 7, timeout=10, what="the late old retry")
            declared = queue_names(client)
            time.sleep(0.3)
        assert calls.jobs() == {
            ("s1", 2),
            ("s2", 2),
            ("l1", 2),
            ("l2", 2),
            ("again", 2),
            ("again", 3),  # failed again: retried through the service's new tier
            ("late", 2),
        }
        assert all(q == queue for q, _, _, _ in calls.items)
        assert raw.count(queue) == 0 and raw.count(dlq_name(queue)) == 0
        # The work queue kept its shape (no WARNING about using it as it is), the consumer
        # declared the service's tiers, not the queue's own, and left the old ones in place.
        assert not [r for r in caplog.records if "using the existing queue" in r.getMessage()]
        assert declared == sorted(
            [queue, dlq_name(queue), *(retry_tier_name(service, d) for d in policy.tiers)]
        )
        assert [raw.exists(old) for old in olds] == [True, True]
        assert [raw.count(old) for old in olds] == [0, 0]
    finally:
        delete = pika.BlockingConnection(pika.URLParameters(rt.broker_url))
        try:
            for old in olds:
                delete.channel().queue_delete(old)
        finally:
            delete.close()


def test_an_old_retry_queue_is_left_alone_while_it_holds_messages(rt, names, raw):
    # mqkit never deletes an old retry queue: here one still holds a retry (a long delay)
    # while a new consumer starts, handles new messages and stops; the retry is still there
    # and comes back after its TTL, to a consumer started later.
    queue = names.queue()
    policy = mqkit.RetryPolicy(max_attempts=2, delays=(3.0,))
    [old] = _declare_old_topology(rt.broker_url, queue, policy.tiers)
    try:
        _publish_old_retry(rt.broker_url, old, "waiting", 2)
        calls = Calls()
        with rt.client(service=names.service()) as client:
            with client.consumer(queue, Job, calls.handler, retry=policy):
                client.producer(Job, queue=queue).publish(Job(job_id="new"))
                wait_until(lambda: calls.jobs() == {("new", 1)}, what="the new job")
            assert raw.exists(old) and raw.count(old) == 1
            with client.consumer(queue, Job, calls.handler, retry=policy):
                wait_until(lambda: len(calls.items) == 2, timeout=10, what="the old retry")
        assert calls.jobs() == {("new", 1), ("waiting", 2)}
        assert raw.exists(old) and raw.count(old) == 0
    finally:
        delete = pika.BlockingConnection(pika.URLParameters(rt.broker_url))
        try:
            delete.channel().queue_delete(old)
        finally:
            delete.close()
