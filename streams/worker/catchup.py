"""Reading a backlog first: how long the scoring task rests after a turn while the worker
catches up.

A worker is *catching up* while the newest event of its latest batch is older than
``behind_s`` (``TAILSTREAM_SCORING_CATCHUP_S``, 2 s: eight latency budgets) — after a
restart, an outage or a burst. A list made then, from the middle of the backlog, is stale
when it is written and is replaced as soon as the user's later events in the backlog are
read (the queue is conflated: one place per user). Meanwhile each scoring turn holds the
interpreter the event loop needs to read the backlog (the transformer's thread and the
loop share one GIL). So while catching up, scoring keeps at most ``duty`` of the wall
clock (``TAILSTREAM_SCORING_CATCHUP_DUTY``, 0.25): after a turn of ``t`` seconds it rests
``t · (1 − duty) / duty``. The oldest waiting users are still scored first, so nobody
starves; once the worker reads fresh events again, turns run back to back.

The event age is the producer's create time against this host's clock, as the event →
Redis latency is: both assume the clocks are synchronised (NTP).
"""

from __future__ import annotations


class CatchUp:
    """Whether the worker reads a backlog, and the rest after each scoring turn.

    >>> c = CatchUp(behind_s=2.0, duty=0.25)
    >>> c.observe(newest_ts=100.0, now=101.0)        # events 1 s old: keeping up
    >>> c.rest_s(turn_s=0.1, now=101.0)
    0.0
    >>> c.observe(newest_ts=100.0, now=110.0)        # 10 s old: a backlog
    >>> round(c.rest_s(turn_s=0.1, now=110.0), 3)
    0.3
    >>> c.rest_s(turn_s=0.1, now=112.5)              # no batch for 2.5 s: nothing to read
    0.0
    >>> c.reading = True                             # unless a long batch is being read
    >>> round(c.rest_s(turn_s=0.1, now=112.5), 3)
    0.3
    """

    def __init__(self, behind_s: float, duty: float, *, fresh_for_s: float = 1.0) -> None:
        if not 0.0 < duty <= 1.0:
            raise ValueError("the scoring duty while catching up must be in (0, 1]")
        self.behind_s = behind_s
        self.duty = duty
        self.fresh_for_s = fresh_for_s
        self.age_s = 0.0
        """Age of the newest event of the latest batch, when it was read."""
        self.seen_at = float("-inf")
        self.reading = False
        """A batch is being applied now (set by the pipeline): a batch of envelopes holds
        tens of thousands of events and takes seconds, longer than ``fresh_for_s``."""

    def observe(self, newest_ts: float | None, now: float) -> None:
        """A batch was read whose newest event was created at ``newest_ts`` (seconds)."""
        if newest_ts is None:
            return
        self.age_s = now - newest_ts
        self.seen_at = now

    def catching_up(self, now: float) -> bool:
        """Reading a backlog: the latest batch (being read, or read within
        ``fresh_for_s``) was old."""
        return (self.behind_s > 0 and self.age_s > self.behind_s
                and (self.reading or now - self.seen_at <= self.fresh_for_s))

    def rest_s(self, turn_s: float, now: float) -> float:
        """Seconds the scoring task rests after a turn of ``turn_s`` seconds."""
        if self.duty >= 1.0 or not self.catching_up(now):
            return 0.0
        return turn_s * (1.0 - self.duty) / self.duty
