"""AckWindow: which deliveries a consumer acks with one multiple ack, which singly."""

from __future__ import annotations

import random
from typing import Any

import pytest

from mqkit.acks import AckWindow


def window_with(*tags: int) -> AckWindow:
    window = AckWindow()
    for tag in tags:
        window.delivered(tag)
    return window


# ---------------------------------------------------------------------------- in order


def test_nothing_finished_nothing_to_ack() -> None:
    window = window_with(1, 2, 3)
    assert window.take(everything=True) == (0, [])
    assert window.take(everything=False) == (0, [])
    assert window.unsettled() == 3
    assert window.waiting() == 0


def test_in_order_run_is_one_multiple_ack() -> None:
    window = window_with(1, 2, 3, 4, 5)
    for tag in (1, 2, 3):
        window.finished(tag)
    assert window.waiting() == 3
    assert window.take(everything=False) == (3, [])
    assert window.unsettled() == 2
    assert window.waiting() == 0
    assert window.take(everything=True) == (0, [])  # settled tags are never returned again
    window.finished(4)
    window.finished(5)
    assert window.take(everything=False) == (5, [])
    assert window.unsettled() == 0
    assert window.last_unsettled() == 0


def test_run_continues_across_takes_and_new_deliveries() -> None:
    window = window_with(1, 2)
    window.finished(1)
    assert window.take(everything=False) == (1, [])
    window.delivered(3)
    window.finished(3)
    assert window.take(everything=True) == (0, [3])  # 2 still runs
    window.finished(2)
    assert window.take(everything=False) == (2, [])  # 3 was settled: the run passes it


# ---------------------------------------------------------------------------- out of order


def test_out_of_order_finishes_wait_for_the_run_without_everything() -> None:
    window = window_with(1, 2, 3, 4)
    window.finished(3)
    window.finished(2)
    assert window.take(everything=False) == (0, [])  # 1 still runs: nothing may be acked
    assert window.waiting() == 2
    window.finished(1)
    assert window.take(everything=False) == (3, [])  # 1..3 in one frame
    assert window.unsettled() == 1


def test_everything_acks_stragglers_singly_in_tag_order() -> None:
    window = window_with(1, 2, 3, 4, 5, 6)
    for tag in (6, 2, 4):
        window.finished(tag)
    assert window.take(everything=True) == (0, [2, 4, 6])
    assert window.waiting() == 0
    assert window.unsettled() == 3  # 1, 3, 5 are still in handlers
    assert window.take(everything=True) == (0, [])
    window.finished(1)
    assert window.take(everything=True) == (1, [])  # 2 was acked singly: not covered again
    window.finished(5)
    window.finished(3)
    assert window.take(everything=True) == (5, [])
    assert window.unsettled() == 0


def test_everything_acks_the_run_and_the_stragglers_behind_a_running_one() -> None:
    window = window_with(1, 2, 3, 4, 5)
    for tag in (1, 2, 4, 5):
        window.finished(tag)
    assert window.take(everything=True) == (2, [4, 5])
    assert window.unsettled() == 1
    assert window.last_unsettled() == 3


def test_multiple_ack_never_covers_a_running_tag() -> None:
    window = window_with(1, 2, 3, 4, 5, 6, 7)
    for tag in (2, 1, 3):
        window.finished(tag)
    assert window.take(everything=False) == (3, [])
    window.finished(5)
    window.finished(7)
    last, singles = window.take(everything=True)
    assert last == 0  # 4 runs, so nothing at or past it goes in a multiple ack
    assert singles == [5, 7]
    window.finished(4)
    assert window.take(everything=True) == (4, [])  # 6 still runs


# ---------------------------------------------------------------------------- nacks


def test_nack_in_the_middle_of_the_run() -> None:
    window = window_with(1, 2, 3, 4)
    window.finished(1)
    assert window.returned(2) is True
    window.finished(3)
    # 2 is settled already: the broker's multiple ack up to 3 covers just 1 and 3
    assert window.take(everything=False) == (3, [])
    assert window.unsettled() == 1
    assert window.last_unsettled() == 4


def test_nack_at_the_end_of_the_run() -> None:
    window = window_with(1, 2, 3)
    window.finished(1)
    assert window.returned(2) is True
    assert window.take(everything=True) == (1, [])
    assert window.last_unsettled() == 3


def test_nack_of_the_oldest_lets_the_run_start_behind_it() -> None:
    window = window_with(1, 2, 3)
    assert window.returned(1) is True
    window.finished(2)
    assert window.take(everything=False) == (2, [])


def test_nack_of_a_finished_tag_withdraws_its_ack() -> None:
    window = window_with(1, 2, 3)
    window.finished(2)
    window.finished(3)
    assert window.returned(3) is True
    assert window.waiting() == 1
    assert window.take(everything=True) == (0, [2])
    window.finished(1)
    assert window.take(everything=True) == (1, [])
    assert window.unsettled() == 0


def test_only_nacks_settled_a_window_without_acks() -> None:
    window = window_with(1, 2)
    assert window.returned(1) is True
    assert window.returned(2) is True
    assert window.take(everything=True) == (0, [])
    assert window.unsettled() == 0
    assert window.last_unsettled() == 0


# ----------------------------------------------------------------- duplicates, unknown tags


def test_duplicate_finish_is_one_ack() -> None:
    window = window_with(1, 2)
    window.finished(2)
    window.finished(2)
    assert window.waiting() == 1
    assert window.take(everything=True) == (0, [2])
    window.finished(2)  # already acked
    assert window.waiting() == 0
    assert window.take(everything=True) == (0, [])


def test_finish_after_the_ack_or_the_nack_is_ignored() -> None:
    window = window_with(1, 2, 3)
    window.finished(1)
    assert window.take(everything=True) == (1, [])
    window.finished(1)
    assert window.returned(2) is True
    window.finished(2)
    assert window.waiting() == 0
    assert window.take(everything=True) == (0, [])
    assert window.unsettled() == 1


def test_second_nack_and_nack_after_ack_say_false() -> None:
    window = window_with(1, 2, 3)
    assert window.returned(2) is True
    assert window.returned(2) is False
    window.finished(1)
    window.finished(3)
    assert window.take(everything=True) == (3, [])
    assert window.returned(1) is False
    assert window.returned(3) is False


def test_unknown_tags_are_ignored() -> None:
    window = window_with(1, 2)
    window.finished(99)
    assert window.returned(98) is False
    assert window.waiting() == 0
    assert window.take(everything=True) == (0, [])
    assert AckWindow().returned(1) is False
    assert AckWindow().take(everything=True) == (0, [])


def test_duplicate_delivery_report_is_harmless() -> None:
    window = window_with(1, 1, 2)
    assert window.unsettled() == 2
    window.finished(1)
    window.finished(2)
    assert window.take(everything=False) == (2, [])
    assert window.unsettled() == 0
    assert window.last_unsettled() == 0


# ------------------------------------------------------------ counts, last_unsettled, clear


def test_counts_follow_deliveries_finishes_and_settling() -> None:
    window = window_with(1, 2, 3, 4)
    window.finished(2)
    window.finished(4)
    assert (window.unsettled(), window.waiting()) == (4, 2)
    window.returned(3)
    assert (window.unsettled(), window.waiting()) == (3, 2)
    window.take(everything=True)
    assert (window.unsettled(), window.waiting()) == (1, 0)


def test_last_unsettled_skips_settled_newest_tags() -> None:
    window = window_with(1, 2, 3, 4)
    window.finished(4)
    window.take(everything=True)  # 4 acked singly
    assert window.returned(3) is True
    assert window.last_unsettled() == 2
    window.finished(2)
    assert window.last_unsettled() == 2  # finished but not acked: still unsettled
    window.delivered(5)
    assert window.last_unsettled() == 5


def test_clear_forgets_everything() -> None:
    window = window_with(1, 2, 3)
    window.finished(2)
    window.clear()
    assert (window.unsettled(), window.waiting(), window.last_unsettled()) == (0, 0, 0)
    assert window.take(everything=True) == (0, [])
    window.finished(2)  # a report about the old channel
    assert window.returned(3) is False
    assert window.take(everything=True) == (0, [])
    window.delivered(1)  # a new channel starts over at tag 1
    window.finished(1)
    assert window.take(everything=False) == (1, [])


def test_settled_tags_do_not_pile_up() -> None:
    window = AckWindow()
    for tag in range(1, 10_001):
        window.delivered(tag)
        if tag % 3 == 0:
            window.returned(tag)
        else:
            window.finished(tag)
        if tag % 100 == 0:
            window.take(everything=tag % 200 == 0)
    window.take(everything=True)
    assert window.unsettled() == 0
    assert window.last_unsettled() == 0
    assert len(window._order) == 0  # settled entries were dropped, not kept forever


# ---------------------------------------------------------------------------- a model of the broker


@pytest.mark.parametrize("seed", range(20))
def test_random_interleavings_settle_each_delivery_exactly_once(seed: int) -> None:
    """Whatever the order of events, every frame is valid for the broker and none covers a
    running delivery; in the end each delivery is settled exactly once."""
    rng = random.Random(seed)
    window = AckWindow()
    unacked: set[int] = set()  # what the broker considers delivered and unsettled
    running: list[int] = []
    finished: set[int] = set()
    outcome: dict[int, str] = {}
    frames = {"multiple": 0, "single": 0, "nack": 0}
    next_tag = 1

    def send_acks(last: int, singles: list[int]) -> None:
        if last:
            assert last in unacked  # else: PRECONDITION_FAILED, unknown delivery tag
            covered = {tag for tag in unacked if tag <= last}
            assert covered <= finished  # never a delivery still in a handler
            for tag in covered:
                outcome[tag] = "ack"
            unacked.difference_update(covered)
            frames["multiple"] += 1
        for tag in singles:
            assert tag in unacked and tag in finished
            assert tag > last
            outcome[tag] = "ack"
            unacked.discard(tag)
            frames["single"] += 1

    for _ in range(400):
        step = rng.random()
        if step < 0.35 or not running:
            window.delivered(next_tag)
            unacked.add(next_tag)
            running.append(next_tag)
            next_tag += 1
        elif step < 0.75:
            tag = running.pop(rng.randrange(len(running)))
            if rng.random() < 0.15:
                assert window.returned(tag) is True  # running, so unsettled: nack it
                outcome[tag] = "nack"
                unacked.discard(tag)
                frames["nack"] += 1
            else:
                finished.add(tag)
                window.finished(tag)
            if rng.random() < 0.1:  # stray duplicate reports change nothing
                window.finished(tag)
                if outcome.get(tag) == "nack":
                    assert window.returned(tag) is False
                assert window.returned(next_tag + 5) is False
        else:
            send_acks(*window.take(everything=rng.random() < 0.5))
        assert window.unsettled() == len(unacked)
    for tag in running:
        finished.add(tag)
        window.finished(tag)
    send_acks(*window.take(everything=rng.random() < 0.5))
    send_acks(*window.take(everything=True))
    assert unacked == set()
    assert sorted(outcome) == list(range(1, next_tag))
    assert window.take(everything=True) == (0, [])
    assert all(frames.values()), frames  # the run exercised every kind of frame


# ---------------------------------------------------------------------------- the async shell


class FakeUnderlay:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bool]] = []

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.sent.append(("ack", tag, multiple))

    async def basic_nack(
        self, tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True
    ) -> None:
        self.sent.append(("nack", tag, multiple))


async def test_async_acks_sends_what_the_window_decides() -> None:
    from mqkit._async.acks import Acks

    underlay = FakeUnderlay()
    owner: Any = object()
    acks = Acks(owner, underlay)  # type: ignore[arg-type]
    for tag in range(1, 7):
        acks.window.delivered(tag)  # what the consumer does on each delivery
    assert acks.window.unsettled() == 6
    assert not acks.window.waiting()
    for tag in (2, 1, 4):
        acks.window.finished(tag)
    assert acks.window.waiting() == 3
    await acks.flush(everything=False)
    assert underlay.sent == [("ack", 2, True)]
    assert acks.window.waiting() == 1
    await acks.nack(3)
    await acks.nack(3)  # settled already: no second frame
    await acks.flush(everything=True)
    assert underlay.sent[1:] == [("nack", 3, False), ("ack", 4, True)]
    acks.window.finished(6)
    await acks.flush(everything=True)
    assert underlay.sent[-1] == ("ack", 6, False)  # 5 still runs
    assert acks.window.unsettled() == 1
    await acks.requeue_rest()
    assert underlay.sent[-1] == ("nack", 5, True)
    assert acks.window.unsettled() == 0
    await acks.requeue_rest()
    await acks.flush(everything=True)
    assert len(underlay.sent) == 5
