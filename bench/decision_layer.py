"""Why ``adaptive``'s PR-AUC of p(purchase) is what it is: replay the decision layer.

Two steps. ``record`` runs ``tailstream eval`` (same arguments) and saves, for the
adaptive strategy, what its decision layer saw: each block's outcome-head and river
probabilities with the labels and the live prior, and each refit window after a
promotion. ``replay`` re-runs the layer's test-then-train on that record under several
ways of combining the two models and prints JSON: PR-AUC of p(purchase) pooled over the
stream (the evaluation's measure), its mean within blocks, and G-mean of the decisions
(warm-up blocks, which the layer learns from but the evaluation does not score, are
recorded as ``warm``).
Seconds instead of a 15-minute evaluation per idea; the record is the production code's
own inputs (``TransformerStrategy._decide`` and ``_refit_decisions`` are wrapped, not
copied).

    python bench/decision_layer.py record rec.pkl eval LOG --format taobao --strategies adaptive
    python bench/decision_layer.py replay rec.pkl

Combinations (all then prior-corrected and decided with moved thresholds, as served):
``stack`` (the production layer: a logistic regression over both models' log-probabilities,
inputs chosen by out-of-fold log-loss, refit on every window), ``stack_both`` (always both
inputs), ``head`` and ``river`` alone uncalibrated, ``log_pool`` (the equal-weight
logarithmic opinion pool of the two, Genest & Zidek 1986 — nothing fitted but the
thresholds).
"""

from __future__ import annotations

import json
import pickle
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Record = list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
PURCHASE = 3


def record(out: Path, argv: Sequence[str]) -> int:
    from tailstream.cli import main
    from tailstream.contract import CLASSES
    from tailstream.evaluation import transformer as t

    calls: Record = []
    on_block, on_window = t.TransformerStrategy._decide, t.TransformerStrategy._refit_decisions
    on_warm = t.TransformerStrategy._warm_decisions
    warming = [False]

    def rows(items: Sequence[Any], online: Callable[[Any], dict[str, float]]) -> np.ndarray:
        return np.array([[online(x).get(c, 1.0 / len(CLASSES)) for c in CLASSES]
                         for x in items]).reshape(-1, len(CLASSES))

    def on_decide(self: Any, block: Any, head: np.ndarray) -> Any:
        if self.decisions is not None:
            labels = np.array([CLASSES.index(it.sample.label) for it in block])
            calls.append(("warm" if warming[0] else "block", head.copy(),
                          rows(block, lambda it: it.online or {}), labels, self.prior.prior()))
        return on_block(self, block, head)

    def on_warm_block(self: Any, block: Any) -> None:
        warming[0] = True
        try:
            on_warm(self, block)
        finally:
            warming[0] = False

    def on_refit(self: Any, holdout: Any) -> None:
        if self.decisions is not None and len(holdout) >= 50:
            online = self._online_by_event()
            calls.append(("refit", t.outcome_probs(self.scorer, holdout),
                          rows(holdout, lambda x: online.get(x.event_id, {})),
                          np.array([CLASSES.index(x.label) for x in holdout]),
                          self.prior.prior()))
        on_window(self, holdout)

    t.TransformerStrategy._decide = on_decide  # type: ignore[method-assign]
    t.TransformerStrategy._refit_decisions = on_refit  # type: ignore[method-assign]
    t.TransformerStrategy._warm_decisions = on_warm_block  # type: ignore[method-assign]
    code = main(list(argv))
    out.write_bytes(pickle.dumps(calls))
    return code


def log_pool(models: Sequence[np.ndarray]) -> np.ndarray:
    """Normalised geometric mean of the models' class probabilities."""
    z = np.mean([np.log(np.maximum(np.asarray(m, float), 1e-9)) for m in models], axis=0)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def replay(calls: Record, combine: str) -> dict[str, float]:
    from sklearn.metrics import average_precision_score

    from tailstream.models.imbalance import decisions as d

    class AsIs(d.Stack):
        """A 'stack' that fits nothing: the one input's probabilities as they come."""

        def fit(self, models: Sequence[np.ndarray], y: np.ndarray, c: float = 0.3) -> AsIs:
            self.coef, self.intercept = np.ones(1), np.zeros(1)
            return self

        def predict(self, models: Sequence[np.ndarray]) -> np.ndarray:
            return np.asarray(models[0], dtype=float)

    def inputs(head: np.ndarray, river: np.ndarray) -> list[np.ndarray]:
        return {"head": [head], "river": [river],
                "log_pool": [log_pool([head, river])]}.get(combine, [head, river])

    stack, chooser = d.Stack, d.choose_inputs
    if combine != "stack":  # one input, or both always
        d.choose_inputs = lambda models, y: tuple(range(len(models)))
    if not combine.startswith("stack"):
        d.Stack = AsIs  # type: ignore[misc]
    ps, ys, preds, per_block = [], [], [], []
    try:
        layer = d.DecisionLayer(4, "g_mean", (1, 2, 3))
        for kind, head, river, labels, prior in calls:
            models = inputs(head, river)
            if kind == "block":
                p, pred = layer.predict(models, prior)
                ps.append(p)
                ys.append(labels)
                preds.append(pred)
                per_block.append(average_precision_score(labels == PURCHASE, p[:, PURCHASE]))
            # A warm-up block is only learned from (the evaluation does not score it).
            layer.add(models, labels, reset=kind == "refit", live_prior=prior)
    finally:
        d.Stack, d.choose_inputs = stack, chooser  # type: ignore[misc]
    p, y, pred = np.concatenate(ps), np.concatenate(ys), np.concatenate(preds)
    return {"pr_auc_pooled": round(float(average_precision_score(y == PURCHASE,
                                                                 p[:, PURCHASE])), 4),
            "pr_auc_mean_within_blocks": round(float(np.mean(per_block)), 4),
            "g_mean": round(d.score(y, pred, 4, "g_mean"), 4), "rows": len(y)}


def main(argv: Sequence[str]) -> int:
    if len(argv) >= 2 and argv[0] == "record":
        return record(Path(argv[1]), argv[2:])
    if len(argv) == 2 and argv[0] == "replay":
        warnings.filterwarnings("ignore")  # lbfgs convergence notes on tiny windows
        calls: Record = pickle.loads(Path(argv[1]).read_bytes())  # noqa: S301 - own file
        out = {c: replay(calls, c)
               for c in ("stack", "stack_both", "head", "river", "log_pool")}
        print(json.dumps(out, indent=2))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
