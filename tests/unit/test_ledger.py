"""The publish ledger both publishers keep (mqkit.ledger): no broker, the shells' I/O played
by hand (send what next_to_send gives, report the broker's answers)."""

from __future__ import annotations

import logging

import pytest

from mqkit.errors import (
    ConnectionFailed,
    PublishError,
    PublishNacked,
    PublishTimeout,
    PublishTooLarge,
    PublishUnroutable,
    TopologyError,
)
from mqkit.ledger import Batch, Entry, Job, Ledger, stall_cause
from mqkit.lifecycle import LifecycleEvent, Nacked, Pipeline, Returned
from mqkit.messages import Envelope
from mqkit.publishing import CONFIRM_WINDOW
from mqkit.settings import Settings


class Recorder:
    def __init__(self) -> None:
        self.events: list[LifecycleEvent] = []

    def on_event(self, event: LifecycleEvent) -> None:
        self.events.append(event)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def envelope(n: int, size: int = 10) -> Envelope:
    return Envelope(b"x" * size, f"m-{n}", "Order", "test", 1_700_000_000)


def jobs(count: int, *, exchange: str = "", start: int = 0, size: int = 10) -> list[Job]:
    return [(envelope(n, size), exchange, "orders") for n in range(start, start + count)]


def make(**settings: object) -> tuple[Ledger, Recorder]:
    recorder = Recorder()
    values: dict[str, object] = {"service": "billing", "confirm_timeout": 5.0}
    values.update(settings)
    ledger = Ledger(Settings(**values), Pipeline([recorder]))
    return ledger, recorder


def admit(ledger: Ledger, batch_jobs: list[Job], **kwargs: object) -> tuple[Batch, list[Entry]]:
    batch = Batch([env.message_id for env, _, _ in batch_jobs])
    entries = list(ledger.admit(batch, batch_jobs, **kwargs))  # type: ignore[arg-type]
    ledger.add(entries)
    return batch, entries


def send_all(ledger: Ledger) -> list[Entry]:
    """What a shell does: send what the ledger gives, as long as it gives."""
    sent = []
    while (entry := ledger.next_to_send()) is not None:
        ledger.sent(entry)
        sent.append(entry)
    return sent


# -- admitting and sending ---------------------------------------------------------------------


def test_messages_get_the_channels_delivery_tags_in_order() -> None:
    ledger, _ = make()
    batch, _ = admit(ledger, jobs(3))
    sent = send_all(ledger)
    assert [e.tag for e in sent] == [1, 2, 3]
    assert [e.envelope.message_id for e in sent] == ["m-0", "m-1", "m-2"]
    ledger.confirmed(3, multiple=True, nacked=False)
    assert batch.remaining == 0 and not batch.errors and batch.unconfirmed() == []
    assert not ledger.inflight


def test_a_new_channel_numbers_from_one_again() -> None:
    ledger, _ = make()
    admit(ledger, jobs(2))
    send_all(ledger)
    ledger.requeue()
    ledger.opened()
    assert [e.tag for e in send_all(ledger)] == [1, 2]


def test_properties_are_built_by_the_shells_function() -> None:
    ledger, _ = make()
    _, entries = admit(ledger, jobs(2), properties=lambda env: ("props", env.message_id))
    assert [e.properties for e in entries] == [("props", "m-0"), ("props", "m-1")]
    _, plain = admit(ledger, jobs(1, start=5))
    assert plain[0].properties is None


def test_at_most_the_confirm_window_is_in_flight() -> None:
    ledger, _ = make()
    admit(ledger, jobs(CONFIRM_WINDOW + 5))
    assert len(send_all(ledger)) == CONFIRM_WINDOW
    assert not ledger.room() and len(ledger.waiting) == 5
    ledger.confirmed(2, multiple=True, nacked=False)
    assert ledger.room(2) and not ledger.room(3)
    assert len(send_all(ledger)) == 2


def test_a_chunk_taken_is_no_larger_than_the_window_has_room_for() -> None:
    ledger, _ = make()
    admit(ledger, jobs(CONFIRM_WINDOW + 10))
    for entry in ledger.take(CONFIRM_WINDOW - 3):
        ledger.sent(entry)
    chunk = ledger.take(10)
    assert [e.index for e in chunk] == [CONFIRM_WINDOW - 3, CONFIRM_WINDOW - 2, CONFIRM_WINDOW - 1]


def test_a_message_above_the_limit_fails_before_it_is_sent() -> None:
    ledger, _ = make(max_message_size=100)
    batch, entries = admit(ledger, [*jobs(1), *jobs(1, start=1, size=101), *jobs(1, start=2)])
    assert [e.index for e in entries] == [0, 2]  # the large one is never given out
    assert isinstance(batch.errors[1], PublishTooLarge) and batch.remaining == 2


def test_the_brokers_lower_limit_learned_meanwhile_fails_what_waits_above_it() -> None:
    ledger, _ = make(max_message_size=1000)
    batch, _ = admit(ledger, [*jobs(1, size=600), *jobs(1, start=1, size=10)])
    ledger.limit.refused("message size 600 is larger than configured max size 512")
    sent = send_all(ledger)
    assert [e.index for e in sent] == [1]
    error = batch.errors[0]
    assert isinstance(error, PublishTooLarge) and error.limit == 512


def test_abandoned_batches_are_not_sent() -> None:
    ledger, _ = make()
    gone, _ = admit(ledger, jobs(2))
    kept, _ = admit(ledger, jobs(1, start=2))
    gone.abandoned = True
    assert ledger.live()
    assert [e.envelope.message_id for e in send_all(ledger)] == ["m-2"]
    gone2, _ = admit(ledger, jobs(1, start=3))
    gone2.abandoned = True
    assert not ledger.live() and not ledger.waiting
    assert kept.remaining == 1


def test_unsent_messages_go_back_to_the_head_in_order() -> None:
    ledger, _ = make()
    admit(ledger, jobs(4))
    taken = [ledger.next_to_send(), ledger.next_to_send()]
    ledger.unsent([e for e in taken if e is not None])
    assert [e.envelope.message_id for e in ledger.waiting] == ["m-0", "m-1", "m-2", "m-3"]


def test_a_message_the_client_library_refused_fails_alone() -> None:
    ledger, _ = make()
    batch, _ = admit(ledger, jobs(2))
    first = ledger.next_to_send()
    assert first is not None
    ledger.fail(first, ConnectionFailed("boom"))
    send_all(ledger)
    ledger.confirmed(1, multiple=False, nacked=False)
    assert batch.remaining == 0 and list(batch.errors) == [0]


# -- confirms ------------------------------------------------------------------------------------


def test_single_acks_in_any_order_settle_their_message_only() -> None:
    ledger, _ = make()
    batch, _ = admit(ledger, jobs(3))
    send_all(ledger)
    ledger.confirmed(2, multiple=False, nacked=False)
    assert batch.ok == bytearray([0, 1, 0]) and len(ledger.inflight) == 3
    ledger.confirmed(1, multiple=False, nacked=False)
    assert len(ledger.inflight) == 1  # settled ones leave from the head
    ledger.confirmed(7, multiple=False, nacked=False)  # unknown: ignored
    ledger.confirmed(3, multiple=False, nacked=False)
    assert batch.remaining == 0 and not ledger.inflight


def test_a_multiple_ack_settles_every_message_up_to_its_tag() -> None:
    ledger, _ = make()
    first, _ = admit(ledger, jobs(2))
    second, _ = admit(ledger, jobs(2, start=2))
    send_all(ledger)
    ledger.confirmed(3, multiple=True, nacked=False)
    assert first.remaining == 0 and second.ok == bytearray([1, 0])
    assert [e.tag for e in ledger.inflight] == [4]


def test_a_return_then_its_ack_fails_that_message_unroutable_and_is_reported() -> None:
    ledger, recorder = make()
    batch, _ = admit(ledger, jobs(2, exchange="shop"))
    send_all(ledger)
    ledger.returned("m-1", "312 NO_ROUTE")
    ledger.confirmed(2, multiple=True, nacked=False)
    error = batch.errors[1]
    assert isinstance(error, PublishUnroutable) and "312 NO_ROUTE" in str(error)
    assert batch.ok == bytearray([1, 0])
    assert recorder.events == [Returned("shop", "orders", "m-1", "312 NO_ROUTE", "billing")]


def test_a_nack_holds_the_message_for_a_new_channel_and_a_second_fails_it() -> None:
    ledger, recorder = make()
    batch, _ = admit(ledger, jobs(3))
    send_all(ledger)
    ledger.confirmed(2, multiple=False, nacked=True)  # the shell renews the channel
    assert [e.envelope.message_id for e in ledger.held] == ["m-1"] and batch.remaining == 3
    assert not recorder.events
    ledger.renewal.renewed()
    ledger.requeue()  # the channel is replaced: held, then in flight, go first on the new one
    ledger.opened()
    again = send_all(ledger)
    assert [(e.envelope.message_id, e.tag) for e in again] == [("m-1", 1), ("m-0", 2), ("m-2", 3)]
    ledger.confirmed(1, multiple=False, nacked=True)  # nacked again: no more retries
    ledger.confirmed(3, multiple=True, nacked=False)
    assert batch.remaining == 0 and list(batch.errors) == [1]
    assert isinstance(batch.errors[1], PublishNacked)
    assert recorder.events == [Nacked("", "orders", "m-1", "billing")]


def test_a_nack_without_time_for_a_new_channel_fails_at_once() -> None:
    ledger, _ = make(confirm_timeout=0.5)
    clock = Clock()
    ledger.renewal._clock = clock  # the channel was just replaced: the next waits a second
    ledger.renewal.renewed()
    batch, _ = admit(ledger, jobs(1))
    send_all(ledger)
    ledger.confirmed(1, multiple=False, nacked=True)
    assert isinstance(batch.errors[0], PublishNacked) and not ledger.held


def test_a_multiple_nack_holds_each_message() -> None:
    ledger, _ = make()
    admit(ledger, jobs(3))
    send_all(ledger)
    ledger.confirmed(2, multiple=True, nacked=True)
    assert [e.envelope.message_id for e in ledger.held] == ["m-0", "m-1"]
    assert [e.tag for e in ledger.inflight] == [3]
    ledger.release_held()  # the nacking channel was lost meanwhile: they go again
    assert [e.envelope.message_id for e in ledger.waiting] == ["m-0", "m-1"]


def test_pinned_and_abandoned_messages_are_not_sent_again_after_a_nack() -> None:
    ledger, _ = make()
    pinned, _ = admit(ledger, jobs(1), pinned=True)
    gone, _ = admit(ledger, jobs(1, start=1))
    send_all(ledger)
    gone.abandoned = True
    ledger.confirmed(2, multiple=True, nacked=True)
    assert isinstance(pinned.errors[0], PublishNacked)
    assert isinstance(gone.errors[0], PublishNacked)
    assert not ledger.held


# -- channels closed by the broker ---------------------------------------------------------------


def test_a_missing_exchange_fails_only_the_messages_to_it(caplog: pytest.LogCaptureFixture) -> None:
    ledger, _ = make()
    lost, _ = admit(ledger, jobs(2, exchange="gone"))
    kept, _ = admit(ledger, jobs(2, exchange="shop", start=2))
    waiting_lost, _ = admit(ledger, jobs(1, exchange="gone", start=4))
    waiting_kept, _ = admit(ledger, jobs(1, exchange="shop", start=5))
    for _ in range(4):
        entry = ledger.next_to_send()
        assert entry is not None
        ledger.sent(entry)
    with caplog.at_level(logging.WARNING, logger="mqkit.publisher"):
        ledger.closed_by_broker(404, "NOT_FOUND - no exchange 'gone' in vhost '/'")
    assert "closed the publishing channel" in caplog.text
    for batch in (lost, waiting_lost):
        assert batch.remaining == 0
        assert all(isinstance(e, TopologyError) for e in batch.errors.values())
    assert kept.remaining == 2 and waiting_kept.remaining == 1
    assert [e.envelope.message_id for e in ledger.waiting] == ["m-2", "m-3", "m-5"]
    assert not ledger.inflight


def test_another_reason_fails_every_message_in_flight_and_keeps_the_waiting() -> None:
    ledger, _ = make()
    sent_batch, _ = admit(ledger, jobs(2))
    send_all(ledger)
    waiting, _ = admit(ledger, jobs(1, start=2))
    ledger.closed_by_broker(406, "PRECONDITION_FAILED - something")
    assert sent_batch.remaining == 0 and len(sent_batch.errors) == 2
    assert waiting.remaining == 1 and len(ledger.waiting) == 1


def test_a_refusal_over_size_fails_the_messages_above_the_brokers_limit_only() -> None:
    ledger, _ = make(max_message_size=10_000)
    batch, _ = admit(ledger, [*jobs(1, size=600), *jobs(1, start=1, size=100)])
    send_all(ledger)
    ledger.closed_by_broker(
        406, "PRECONDITION_FAILED - message size 600 is larger than configured max size 512"
    )
    error = batch.errors[0]
    assert isinstance(error, PublishTooLarge) and error.limit == 512
    assert [e.index for e in ledger.waiting] == [1] and ledger.limit.limit == 512


# -- lost links ------------------------------------------------------------------------------------


def test_a_lost_link_puts_the_unconfirmed_first_in_line_in_order() -> None:
    ledger, _ = make()
    batch, _ = admit(ledger, jobs(4))
    for _ in range(3):
        entry = ledger.next_to_send()
        assert entry is not None
        ledger.sent(entry)
    ledger.returned("m-1", "312 NO_ROUTE")  # on the old channel: forgotten
    ledger.confirmed(1, multiple=False, nacked=False)
    ledger.requeue()
    assert [e.envelope.message_id for e in ledger.waiting] == ["m-1", "m-2", "m-3"]
    ledger.opened()
    send_all(ledger)
    ledger.confirmed(3, multiple=True, nacked=False)
    assert batch.remaining == 0 and not batch.errors


def test_pinned_messages_fail_instead_of_going_on_another_channel() -> None:
    ledger, _ = make()
    sent, _ = admit(ledger, jobs(1), pinned=True)
    send_all(ledger)
    waiting, _ = admit(ledger, jobs(1, start=1), pinned=True)
    other, _ = admit(ledger, jobs(1, start=2))
    ledger.requeue("ConnectionResetError")
    for batch in (sent, waiting):
        error = batch.errors[0]
        assert isinstance(error, ConnectionFailed) and "ConnectionResetError" in str(error)
    assert [e.envelope.message_id for e in ledger.waiting] == ["m-2"] and other.remaining == 1


def test_a_closed_client_fails_everything_not_settled() -> None:
    ledger, _ = make()
    batch, _ = admit(ledger, jobs(3))
    entry = ledger.next_to_send()
    assert entry is not None
    ledger.sent(entry)
    ledger.next_to_send()  # taken, then held after a nack, say
    ledger.closed()
    assert batch.remaining == 1  # the one taken and never reported back stays open
    assert all("closed before the confirm" in str(e) for e in batch.errors.values())
    assert not ledger.waiting and not ledger.inflight and not ledger.held


# -- what the caller raises ------------------------------------------------------------------------


def test_a_single_message_raises_its_own_error_with_its_id() -> None:
    ledger, _ = make()
    batch, _ = admit(ledger, jobs(1))
    send_all(ledger)
    ledger.confirmed(1, multiple=False, nacked=True)
    ledger.requeue()
    ledger.opened()
    send_all(ledger)
    ledger.confirmed(1, multiple=False, nacked=True)
    error = batch.failure("", "orders")
    assert isinstance(error, PublishNacked) and error.unconfirmed == ["m-0"]


def test_a_timeout_names_the_unconfirmed_messages_and_why() -> None:
    batch = Batch(["m-0"])
    error = batch.failure("", "orders", timeout=2.0, cause=stall_cause("low on memory", None))
    assert isinstance(error, PublishTimeout) and error.unconfirmed == ["m-0"]
    assert "m-0" in str(error) and "within 2s" in str(error) and "low on memory" in str(error)
    many = Batch(["a", "b", "c"])
    many.settle(0)
    error = many.failure("shop", "k", timeout=2.0, cause=stall_cause(None, "connection reset"))
    assert isinstance(error, PublishTimeout) and error.unconfirmed == ["b", "c"]
    assert "2 message(s) to exchange 'shop'" in str(error) and "connection reset" in str(error)


def test_failures_of_several_kinds_make_a_publish_error() -> None:
    batch = Batch(["a", "b", "c"])
    batch.settle(0)
    batch.settle(1, PublishNacked("b nacked"))
    batch.settle(2, PublishUnroutable("c returned"))
    error = batch.failure("", "orders")
    assert type(error) is PublishError and error.unconfirmed == ["b", "c"]


def test_stall_cause() -> None:
    assert stall_cause(None, None) is None
    assert stall_cause(None, "reset") == "reset"
    cause = stall_cause("low on disk", "reset")
    assert cause is not None and "low on disk" in cause
