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


def decide(current: Mapping[str, float], candidate: Mapping[str, float],
           gated_classes: Sequence[str] = TRANSACTION_CLASSES, *,
           recall_tolerance: float = 0.01, quality_tolerance: float = 0.02,
           quality_metrics: Sequence[str] = QUALITY_METRICS) -> GateDecision:
    """Promote or reject, with a reason that names the numbers.

    >>> cur = {"recall_cart": 0.30, "recall_purchase": 0.20, "macro_f1": 0.40, "hit_at_10": 0.5,
    ...        "support_cart": 50, "support_purchase": 20}
    >>> decide(cur, {**cur, "recall_purchase": 0.35}).promote
    True
    >>> d = decide(cur, {**cur, "recall_purchase": 0.35, "macro_f1": 0.30})
    >>> d.promote, d.reason
    (False, 'rejected: macro_f1 fell 0.400 → 0.300 (tolerance 0.020)')
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
        notes.append(f"{key} {a:.3f} → {b:.3f}")
        if b < a - quality_tolerance:
            problems.append(f"{key} fell {a:.3f} → {b:.3f} (tolerance {quality_tolerance:.3f})")
            codes.append("quality_fell")
        improved |= b > a + 1e-9
    if problems:
        return GateDecision(False, "rejected: " + "; ".join(problems), deltas, codes[0])
    if not improved:
        return GateDecision(False, "rejected: no metric improved (" + ", ".join(notes) + ")",
                            deltas, "no_improvement")
    return GateDecision(True, "promoted: " + ", ".join(notes), deltas, "improved")
