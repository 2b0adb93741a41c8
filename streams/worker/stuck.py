"""Input partitions that nobody reads: held by a group member that makes no progress.

A consumer group heals a dead member when the broker expires its session. When that does
not happen (a member the coordinator still counts as alive but that consumes nothing: a
hung process, or a dead member the coordinator failed to expire), its partitions stop
with no error anywhere: their events are never processed. Every worker therefore watches
the partitions it does *not* hold. One whose committed offset has not moved for
``after_s`` while new events arrived is stuck; the watcher then asks for a rebalance
(rejoins the group). A rebalance drops members that do not rejoin within the rebalance
timeout, so a hung or phantom member loses its partitions to live ones.

Rejoins back off (doubling up to ``max_backoff_s``) so that a member legitimately stalled
for longer, e.g. restoring a large table, is not rebalanced over and over.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class StuckPartitions(Generic[K]):
    """Tracks, per partition not held here, whether events arrived that its committed
    offset has not moved past for ``after_s`` seconds.

    Only *growth* of the log end is compared, never its value against the committed
    offset: Tansu reports the last record batch's base offset + 1 as a partition's end, which
    grows with every batch but is not comparable with committed offsets.

    >>> w = StuckPartitions[str](after_s=10)
    >>> w.observe(0, committed={"p": 5}, ends={"p": 9}, held=set())
    []
    >>> w.observe(100, committed={"p": 5}, ends={"p": 9}, held=set())  # idle, no new data
    []
    >>> w.observe(101, committed={"p": 5}, ends={"p": 12}, held=set())  # new data arrives
    []
    >>> w.observe(111, committed={"p": 5}, ends={"p": 15}, held=set())  # unread for 10 s
    ['p']
    >>> w.observe(112, committed={"p": 15}, ends={"p": 15}, held=set())  # read: moving
    []
    """

    after_s: float
    max_backoff_s: float = 600.0
    #: partition → (committed offset, log end when it was last seen moving, first time
    #: since then that the log end grew)
    _seen: dict[K, tuple[int, int, float | None]] = field(default_factory=dict)
    _next_action: float = 0.0
    _backoff: float = 0.0

    def observe(self, now: float, committed: Mapping[K, int | None], ends: Mapping[K, int],
                held: Collection[K]) -> list[K]:
        """The partitions stuck at ``now``: not held here, and events arrived more than
        ``after_s`` seconds ago that the committed offset has not moved past since.
        A partition never committed counts as committed at 0."""
        stuck: list[K] = []
        for tp, end in ends.items():
            if tp in held:
                self._seen.pop(tp, None)
                continue
            at = max(committed.get(tp) or 0, 0)
            seen = self._seen.get(tp)
            if seen is None or seen[0] != at:
                self._seen[tp] = (at, end, None)
                continue
            grew = seen[2]
            if grew is None:
                if end != seen[1]:
                    self._seen[tp] = (at, seen[1], now)
            elif now - grew >= self.after_s:
                stuck.append(tp)
        for tp in [tp for tp in self._seen if tp not in ends]:
            del self._seen[tp]
        if not stuck:  # healthy again: the next stuck partition is acted on at once
            self._backoff = self._next_action = 0.0
        return sorted(stuck, key=repr)

    def may_act(self, now: float) -> bool:
        """Whether to rejoin now; if so, the next rejoin waits twice as long (at least
        ``after_s``, at most ``max_backoff_s``) and the clocks restart.

        >>> w = StuckPartitions[str](after_s=10, max_backoff_s=25)
        >>> [w.may_act(t) for t in (0, 5, 10, 29, 30, 54, 55)]
        [True, False, True, False, True, False, True]
        """
        if now < self._next_action:
            return False
        self._backoff = min(max(self._backoff * 2, self.after_s), self.max_backoff_s)
        self._next_action = now + self._backoff
        # The rebalance takes a while: count afresh from now.
        self._seen = {tp: (at, end, None if grew is None else now)
                      for tp, (at, end, grew) in self._seen.items()}
        return True
