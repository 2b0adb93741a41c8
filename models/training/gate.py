"""The promotion gate: a candidate replaces the served model only if it is not worse.

Both models are evaluated on the same held-out recent window (events the candidate did
not train on, :func:`~tailstream.models.training.finetune.evaluate`). The candidate is promoted when

1. the recall of every gated minority class (``TAILSTREAM_GATE_CLASSES``, default cart
   and purchase) improves or holds: ``recall_c(cand) ≥ recall_c(cur) − ε_r``, with a small
   ``ε_r`` (``TAILSTREAM_GATE_RECALL_TOLERANCE``) so that evaluation noise on a few dozen
   held-out purchases does not block every run; and
2. overall quality does not drop beyond a tolerance ``ε_q``
   (``TAILSTREAM_GATE_QUALITY_TOLERANCE``) on each quality metric: macro-F1 of the outcome
   head and HitRate@10 of next-item retrieval;

and at least one of them actually improved (a candidate equal to the current model is
not worth a new version). Otherwise it is kept as *rejected*, with the reason.

A quality metric that comes with its bootstrap standard error (``<metric>_se``, the
decision objectives) is held to the larger of ``ε_q`` and ``z · √(se_cur² + se_cand²)``
(``TAILSTREAM_GATE_NOISE_Z``, 2): a G-mean over a window of four purchases moves by
a few tenths from one draw of events to the next (one class without a hit zeroes it), and
a fall inside that noise is not evidence that the candidate is worse. The two standard
errors are taken as independent although both models are scored on the same window, which
overstates the noise of the difference; a candidate let through on noise still serves a
canary share first and is judged online before it serves everyone.

The routine adds the configured decision objective (``TAILSTREAM_SELECTION_OBJECTIVE``,
held-out metric :func:`objective_metric`, e.g. ``objective_g_mean``) to the quality
metrics: policy selection picks the candidate that is best on it, and the gate makes sure
that candidate is not worse on it than the served model either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tailstream.contract import TRANSACTION_CLASSES

QUALITY_METRICS: tuple[str, ...] = ("macro_f1", "hit_at_10")


def objective_metric(objective: str) -> str:
    """The held-out metric that carries a decision objective's value.

    >>> objective_metric("g_mean")
    'objective_g_mean'
    """
    return f"objective_{objective}"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    """Human-readable, with the numbers."""
    deltas: dict[str, float]
    code: str = "improved"
    """Low-cardinality reason for metrics: improved, minority_recall_fell, quality_fell,
    no_improvement."""


def noise_tolerance(current: Mapping[str, float], candidate: Mapping[str, float], key: str,
                    tolerance: float, z: float) -> float:
    """The fall of ``key`` the gate allows: ``max(ε, z · √(se_cur² + se_cand²))`` where
    the metrics carry ``<key>_se`` (a normal-approximation test of the difference of two
    estimates, independent errors assumed; a side without one counts 0), else ``ε``.

    >>> noise_tolerance({"g": 0.23, "g_se": 0.144}, {"g": 0.0, "g_se": 0.0}, "g", 0.02, 2.0)
    0.288
    >>> noise_tolerance({"h": 0.8}, {"h": 0.7}, "h", 0.02, 2.0)
    0.02
    """
    se = f"{key}_se"
    if z <= 0 or (se not in current and se not in candidate):
        return tolerance
    a, b = float(current.get(se, 0.0)), float(candidate.get(se, 0.0))
    return max(tolerance, round(z * (a * a + b * b) ** 0.5, 6))


def decide(current: Mapping[str, float], candidate: Mapping[str, float],
           gated_classes: Sequence[str] = TRANSACTION_CLASSES, *,
           recall_tolerance: float = 0.01, quality_tolerance: float = 0.02,
           quality_metrics: Sequence[str] = QUALITY_METRICS,
           noise_z: float = 0.0) -> GateDecision:
    """Promote or reject, with a reason that names the numbers. With ``noise_z`` > 0 a
    metric with standard errors may fall by :func:`noise_tolerance`.

    >>> cur = {"recall_cart": 0.30, "recall_purchase": 0.20, "macro_f1": 0.40, "hit_at_10": 0.5,
    ...        "support_cart": 50, "support_purchase": 20}
    >>> decide(cur, {**cur, "recall_purchase": 0.35}).promote
    True
    >>> d = decide(cur, {**cur, "recall_purchase": 0.35, "macro_f1": 0.30})
    >>> d.promote, d.reason
    (False, 'rejected: macro_f1 fell 0.400 → 0.300 (tolerance 0.020)')
    >>> noisy = {**cur, "objective_g_mean": 0.23, "objective_g_mean_se": 0.14}
    >>> decide(noisy, {**noisy, "objective_g_mean": 0.0, "objective_g_mean_se": 0.0,
    ...                "hit_at_10": 0.6}, noise_z=2.0,
    ...        quality_metrics=("hit_at_10", "objective_g_mean")).promote
    True
    """
    deltas: dict[str, float] = {}
    problems: list[str] = []
    codes: list[str] = []
    notes: list[str] = []
    improved = False
    for c in gated_classes:
        key = f"recall_{c}"
        if candidate.get(f"support_{c}", current.get(f"support_{c}", 0.0)) <= 0:
            continue  # no held-out sample of this class: nothing to judge on
        a, b = float(current.get(key, 0.0)), float(candidate.get(key, 0.0))
        deltas[key] = b - a
        notes.append(f"{c} recall {a:.3f} → {b:.3f}")
        if b < a - recall_tolerance:
            problems.append(f"{c} recall fell {a:.3f} → {b:.3f} (tolerance {recall_tolerance:.3f})")
            codes.append("minority_recall_fell")
        improved |= b > a + 1e-9
    for key in quality_metrics:
        if key not in candidate and key not in current:
            continue
        a, b = float(current.get(key, 0.0)), float(candidate.get(key, 0.0))
        deltas[key] = b - a
        tolerance = noise_tolerance(current, candidate, key, quality_tolerance, noise_z)
        noise = "" if tolerance == quality_tolerance else f", within noise {tolerance:.3f}"
        notes.append(f"{key} {a:.3f} → {b:.3f}{noise if b < a else ''}")
        if b < a - tolerance:
            problems.append(f"{key} fell {a:.3f} → {b:.3f} (tolerance {tolerance:.3f})")
            codes.append("quality_fell")
        improved |= b > a + 1e-9
    if problems:
        return GateDecision(False, "rejected: " + "; ".join(problems), deltas, codes[0])
    if not improved:
        return GateDecision(False, "rejected: no metric improved (" + ", ".join(notes) + ")",
                            deltas, "no_improvement")
    return GateDecision(True, "promoted: " + ", ".join(notes), deltas, "improved")
