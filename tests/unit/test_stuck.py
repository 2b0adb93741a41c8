"""The stuck-partition watch: what counts as stuck, and how often it acts."""

from __future__ import annotations

from tailstream.streams.worker.stuck import StuckPartitions


def test_a_partition_held_here_is_never_stuck() -> None:
    w = StuckPartitions[str](after_s=5)
    for t in range(0, 30, 5):
        assert w.observe(t, committed={"p": 0}, ends={"p": t}, held={"p"}) == []


def test_events_waiting_on_a_silent_member_make_it_stuck_after_the_delay() -> None:
    w = StuckPartitions[str](after_s=5)
    stuck = [w.observe(t, committed={"p": 3, "q": t}, ends={"p": 10 + t, "q": 10 + t},
                       held=set()) for t in range(0, 10)]
    # p: committed still while the end grows (from t=1): stuck from t=6. q moves along.
    assert stuck == [[]] * 6 + [["p"]] * 4


def test_an_idle_partition_is_not_stuck_when_one_event_arrives() -> None:
    w = StuckPartitions[str](after_s=5)
    assert w.observe(0, committed={"p": 7}, ends={"p": 7}, held=set()) == []
    assert w.observe(600, committed={"p": 7}, ends={"p": 8}, held=set()) == []  # arrives
    assert w.observe(602, committed={"p": 8}, ends={"p": 8}, held=set()) == []  # read
    assert w.observe(700, committed={"p": 8}, ends={"p": 8}, held=set()) == []


def test_a_never_committed_partition_counts_from_zero() -> None:
    w = StuckPartitions[str](after_s=5)
    w.observe(0, committed={"p": None}, ends={"p": 4}, held=set())
    w.observe(1, committed={"p": None}, ends={"p": 5}, held=set())
    assert w.observe(6, committed={"p": None}, ends={"p": 6}, held=set()) == ["p"]


def test_rejoins_back_off_and_the_backoff_resets_once_nothing_is_stuck() -> None:
    w = StuckPartitions[str](after_s=10, max_backoff_s=40)
    acted = [t for t in range(0, 200) if w.may_act(t)]
    assert acted == [0, 10, 30, 70, 110, 150, 190]  # waits 10, 20, 40, 40, …
    w.observe(200, committed={}, ends={}, held=set())  # nothing stuck: start over
    assert w.may_act(200) and not w.may_act(205) and w.may_act(210)


def test_after_a_rejoin_the_clock_restarts() -> None:
    w = StuckPartitions[str](after_s=5)
    w.observe(0, committed={"p": 0}, ends={"p": 1}, held=set())
    w.observe(1, committed={"p": 0}, ends={"p": 2}, held=set())
    assert w.observe(6, committed={"p": 0}, ends={"p": 3}, held=set()) == ["p"]
    assert w.may_act(6)
    assert w.observe(8, committed={"p": 0}, ends={"p": 4}, held=set()) == []
    assert w.observe(11, committed={"p": 0}, ends={"p": 5}, held=set()) == ["p"]
