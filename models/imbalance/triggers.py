"""When to ask for a fine-tune: enough new rare samples, drift, or too long without one.

Rare samples are the ones the buffer over-keeps: minority-class interactions and
interactions with tail items (:class:`~tailstream.models.imbalance.buffer.MinorityBuffer`),
so a click-only stream triggers on its tail clicks. The interval needs no sample at all:
checks run once per processed batch, so only while data arrives, and a stream whose news
is all in the head must still be fine-tuned now and then.

Pure decision logic; the worker feeds it and publishes the requests it returns.

Drift uses ADWIN (Bifet & Gavaldà, "Learning from Time-Changing Data with Adaptive
Windowing", SDM 2007) from river, on two signals:

* the class mix: one detector per minority class on the indicator ``1[y = c]``, so a
  change of that class's share is detected (e.g. purchases halving);
* the prequential error of the online model: ``1[ŷ ≠ y]`` (rises only).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from river import drift

REASONS = ("buffer", "drift", "interval")


class DriftMonitor:
    """ADWIN detectors over the class mix and the prequential error."""

    def __init__(self, classes: Iterable[str], delta: float = 0.002, warmup: int = 2000) -> None:
        self.delta = delta
        self.warmup = warmup
        self.n = 0
        self._mix = {c: drift.ADWIN(delta=delta) for c in classes}
        self._error = drift.ADWIN(delta=delta)
        self.detections: Counter[str] = Counter()
        self._pending: list[str] = []

    def update(self, y: str, error: bool | None) -> None:
        self.n += 1
        # While the stream warms up the online model's error falls fast and the class mix
        # estimate is noisy: detectors learn, but report nothing.
        report = self.n > self.warmup
        for c, detector in self._mix.items():
            detector.update(1.0 if y == c else 0.0)
            if detector.drift_detected and report:
                self.detections[f"mix:{c}"] += 1
                self._pending.append(f"mix:{c}")
        if error is not None:
            before = self._error.estimation
            self._error.update(1.0 if error else 0.0)
            # Only a *rise* of the error is drift worth a fine-tune; a fall is the model
            # getting better.
            if self._error.drift_detected and report and self._error.estimation > before:
                self.detections["error"] += 1
                self._pending.append("error")

    def take(self) -> list[str]:
        """Signals detected since the last call."""
        out, self._pending = self._pending, []
        return out

    def share(self, c: str) -> float:
        """ADWIN's current estimate of the share of class ``c``."""
        return float(self._mix[c].estimation) if c in self._mix else 0.0


class TriggerPolicy:
    """Decides when a fine-tune request fires; never more often than ``cooldown_s``.

    >>> t = TriggerPolicy(min_new_samples=100, max_interval_s=600, cooldown_s=60)
    >>> t.check(now=0.0, new_samples=150, drift_signals=[])
    'buffer'
    >>> t.check(now=30.0, new_samples=500, drift_signals=["mix:purchase"]) is None  # cooldown
    True
    >>> t.check(now=90.0, new_samples=0, drift_signals=["mix:purchase"])
    'drift'
    >>> t.check(now=700.0, new_samples=1, drift_signals=[])
    'interval'
    >>> t.check(now=1400.0, new_samples=0, drift_signals=[])   # a click-only stream too
    'interval'
    """

    def __init__(self, min_new_samples: int = 2000, max_interval_s: float = 3600.0,
                 cooldown_s: float = 60.0) -> None:
        self.min_new_samples = min_new_samples
        self.max_interval_s = max_interval_s
        self.cooldown_s = cooldown_s
        self.last_fired: float | None = None
        self.started: float | None = None
        self.fired: Counter[str] = Counter()
        self._drift_seen = False

    def check(self, now: float, new_samples: int, drift_signals: list[str]) -> str | None:
        if self.started is None:
            self.started = now
        # Drift seen during a cooldown is remembered, not lost.
        self._drift_seen = self._drift_seen or bool(drift_signals)
        if self.last_fired is not None and now - self.last_fired < self.cooldown_s:
            return None
        reason: str | None = None
        if new_samples >= self.min_new_samples:
            reason = "buffer"
        elif self._drift_seen:
            reason = "drift"
        elif now - (self.last_fired or self.started) >= self.max_interval_s:
            reason = "interval"
        if reason is not None:
            self.last_fired = now
            self._drift_seen = False
            self.fired[reason] += 1
        return reason

    def to_state(self) -> dict[str, object]:
        return {"last_fired": self.last_fired, "started": self.started,
                "fired": dict(self.fired)}

    def load_state(self, state: dict[str, object]) -> None:
        last, started, fired = state.get("last_fired"), state.get("started"), state.get("fired")
        self.last_fired = float(last) if isinstance(last, int | float) else None
        self.started = float(started) if isinstance(started, int | float) else None
        if isinstance(fired, dict):
            self.fired = Counter({str(k): int(v) for k, v in fired.items()})
