"""How a blocking ``Client``'s publish reaches the broker: sent by the publishing thread itself
while the IO thread waits for I/O (which then, for a lone message, reads its confirm itself
too), else handed over to the IO thread; either way confirmed, stored once and in order.

The paths are the blocking runtime's (``AsyncClient`` has no IO thread); what both runtimes
must do with a publish (confirms, returns, timeouts, sizes) is in the shared suite, whose
tests go through whichever path a publish takes. The nack test runs on both: a nack read in
place replaces the publishing channel from the publishing thread.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

import mqkit
from mqkit._sync.publisher import Publisher


class Order(BaseModel):
    order_id: str
    amount: Decimal


def order(i: int) -> Order:
    return Order(order_id=str(i), amount=Decimal(i))


def client_for(broker_url: str) -> mqkit.Client:
    return mqkit.Client(url=broker_url, connect_timeout=10, confirm_timeout=10)


def record_senders(monkeypatch: Any) -> list[str]:
    """The name of the thread that puts each publish call's messages on the channel."""
    senders: list[str] = []
    enqueue = Publisher._enqueue

    def spy(self: Publisher, messages: Any) -> None:
        senders.append(threading.current_thread().name)
        enqueue(self, messages)

    monkeypatch.setattr(Publisher, "_enqueue", spy)
    return senders


def record_confirm_readers(monkeypatch: Any) -> list[str]:
    """The name of the thread that handles each confirm from the broker."""
    readers: list[str] = []
    confirmed = Publisher._confirmed

    def spy(self: Publisher, channel: Any, tag: int, multiple: bool, nacked: bool) -> None:
        readers.append(threading.current_thread().name)
        confirmed(self, channel, tag, multiple, nacked)

    monkeypatch.setattr(Publisher, "_confirmed", spy)
    return readers


def test_one_publish_at_a_time_is_sent_and_confirmed_on_the_publishing_thread(
    broker_url, names, raw, monkeypatch
) -> None:
    queue = names.queue()
    senders = record_senders(monkeypatch)
    with client_for(broker_url) as client:
        producer = client.producer(Order, queue=queue)
        readers = record_confirm_readers(monkeypatch)  # after the producer's declares
        through_pika: list[Any] = []  # confirms pika decoded and dispatched itself
        on_confirm = Publisher._on_confirm

        def pika_path(self: Publisher, channel: Any, frame: Any) -> None:
            through_pika.append(frame)
            on_confirm(self, channel, frame)

        monkeypatch.setattr(Publisher, "_on_confirm", pika_path)
        ids = [producer.publish(order(i)) for i in range(20)]
    here = threading.current_thread().name
    # The IO thread is idle between two confirmed publishes; something else on the
    # connection (a heartbeat) may keep it busy at the odd moment: most, not all.
    assert senders.count(here) >= 15, senders
    assert readers.count(here) >= 15, readers
    assert len(through_pika) <= 5, through_pika  # a read of confirms only skips pika's frames
    assert [props.message_id for _m, props, _b in raw.drain(queue)] == ids


def test_a_publish_while_the_io_thread_is_busy_is_handed_over_and_confirmed(
    broker_url, names, raw, monkeypatch
) -> None:
    queue = names.queue()
    senders = record_senders(monkeypatch)
    with client_for(broker_url) as client:
        producer = client.producer(Order, queue=queue)
        first = producer.publish(order(0))
        readers = record_confirm_readers(monkeypatch)
        busy, release = threading.Event(), threading.Event()

        def block() -> None:
            busy.set()
            release.wait(10)

        client._link.submit(block)  # the IO thread both links share
        assert busy.wait(5)
        outcome: list[Any] = []
        publishing = threading.Thread(
            target=lambda: outcome.append(producer.publish(order(1))), name="publishing-test"
        )
        publishing.start()
        try:
            time.sleep(0.3)
            assert publishing.is_alive() and not outcome  # not sent past the busy IO thread
        finally:
            release.set()
        publishing.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], str)
    assert senders[-1] == "mqkit-io"  # handed over: the IO thread put it on the channel
    assert readers[-1] == "mqkit-io"  # and read its confirm
    stored = [props.message_id for _m, props, _b in raw.drain(queue)]
    assert stored == [first, outcome[0]]


def test_threads_publishing_at_once_mix_both_paths_and_each_message_is_stored_once(
    broker_url, names, raw, monkeypatch
) -> None:
    queue = names.queue()
    senders = record_senders(monkeypatch)
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []
    with client_for(broker_url) as client:
        producer = client.producer(Order, queue=queue)
        start = threading.Barrier(4)

        def publish(thread: int) -> None:
            start.wait()
            try:
                ids = [producer.publish(order(n)) for n in range(25)]
                ids += producer.publish_many(order(n) for n in range(600))  # chunks
                results[thread] = ids
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=publish, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not errors
    assert "mqkit-io" in senders and len(set(senders)) > 1, Counter(senders)
    stored = [props.message_id for _m, props, _b in raw.drain(queue)]
    assert Counter(stored) == Counter(i for ids in results.values() for i in ids)
    for ids in results.values():  # each thread's messages in the order it published them
        assert [i for i in stored if i in set(ids)] == ids


def test_a_publish_the_broker_nacks_fails_nacked_and_the_client_publishes_on(
    rt, names, raw
) -> None:
    # Both runtimes (a sync publish reads its nack in place; the channel is replaced from
    # there): a full queue with overflow=reject-publish nacks publishes.
    full, other = names.queue(), names.queue()
    with rt.client(confirm_timeout=10) as client:
        client.declare(
            mqkit.Queue(full, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        )
        producer = client.producer(Order, queue=full)
        kept: list[str] = []
        nacked: list[mqkit.PublishNacked] = []
        started = time.monotonic()
        for n in range(6):  # a quorum queue may take one more than its length before it nacks
            try:
                kept.append(producer.publish(order(n)))
            except mqkit.PublishNacked as exc:  # nacked, sent once more on a new channel, again
                nacked.append(exc)
                if len(nacked) == 2:
                    break
        assert len(nacked) == 2 and 1 <= len(kept) <= 2
        assert all(len(exc.unconfirmed) == 1 for exc in nacked)
        assert time.monotonic() - started < 8
        assert client.producer(Order, queue=other).publish(order(9))
    assert [props.message_id for _m, props, _b in raw.drain(full)] == kept
    assert raw.count(other) == 1
