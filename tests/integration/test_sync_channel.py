"""The blocking shell's channel (``mqkit._sync.transport.Channel``): a pika channel that any
thread but the IO thread drives with aiormq's method names, each call waited for. The parts
built on it (declaring, consuming, dead letters) are covered by the shared suite; this pins
what they rely on: answers come back as values, a channel the broker closes fails the call
and every later one, and a broker that does not answer is a TimeoutError, never a hang."""

from __future__ import annotations

import time

import pika.exceptions as pex
import pytest
from pydantic import BaseModel

import mqkit
from mqkit._sync.channel import ChannelHandle, close_channel, open_channel
from mqkit._sync.connection import RPC_ERRORS, LinkDown
from mqkit.testing import FaultProxy


class Note(BaseModel):
    n: int


def test_calls_return_the_brokers_answers(broker_url: str, names) -> None:
    queue = names.queue()
    with mqkit.Client(url=broker_url) as client:
        channel = open_channel(client._link)
        try:
            ok = channel.queue_declare(queue, durable=True, timeout=5)
            assert ok.message_count == 0
            channel.basic_qos(prefetch_count=5)
            assert channel.basic_get(queue, timeout=5) is None  # empty: basic.get-empty
            client.producer(Note, queue=queue).publish(Note(n=1))
            got = channel.basic_get(queue, timeout=5)
            assert got is not None
            method, properties, body = got
            assert body == b'{"n":1}' and properties.content_type == "application/json"
            channel.basic_ack(method.delivery_tag)
            assert channel.queue_purge(queue).message_count == 0
        finally:
            close_channel(channel)
        assert channel.is_closed


def test_a_channel_the_broker_closes_fails_this_call_and_every_later_one(
    broker_url: str, names
) -> None:
    closed: list[BaseException] = []
    with mqkit.Client(url=broker_url) as client:
        channel = open_channel(client._link)
        channel.close_callbacks.add(lambda _channel, reason: closed.append(reason))
        with pytest.raises(pex.ChannelClosedByBroker) as info:
            channel.queue_declare(names.queue(), passive=True)  # no such queue
        assert info.value.reply_code == 404
        assert channel.is_closed and closed == [info.value]
        started = time.monotonic()
        with pytest.raises(pex.ChannelClosedByBroker):
            channel.queue_declare(names.queue(), passive=True)  # at once: it is closed
        assert time.monotonic() - started < 1
        # ChannelHandle opens another for the next operation: a conflict never poisons it.
        handle = ChannelHandle(client._link)
        with pytest.raises(mqkit.TopologyError, match="NOT_FOUND"):
            handle.run(lambda ch: ch.queue_declare(names.queue(), passive=True), what="check")
        assert handle.run(lambda ch: ch.queue_declare(names.queue()), what="declare")
        handle.close()


def test_a_broker_that_does_not_answer_is_a_timeout_and_a_lost_link_fails_the_call(
    broker_url: str, names
) -> None:
    with (
        FaultProxy(broker_url) as proxy,
        mqkit.Client(url=proxy.url, heartbeat=30) as client,
    ):
        channel = open_channel(client._link)
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            channel.queue_declare(names.queue(), timeout=0.5)
        assert 0.4 < time.monotonic() - started < 3
        proxy.restore()
        proxy.cut()
        with pytest.raises(RPC_ERRORS) as info:
            channel.queue_declare(names.queue(), timeout=5)
        assert isinstance(info.value, pex.AMQPError | LinkDown)
