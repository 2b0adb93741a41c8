"""Why ``adaptive``'s decisions are what they are: replay the served decision layer.

Two steps. ``record`` runs ``tailstream eval`` (same arguments) and saves, for the
adaptive strategy, what its decisions saw: each scored block's outcome-head and river
probabilities with the labels and the running prior at the block's start (``block``),
and, for every promoted candidate, the gate's
held-out window the trainer fits the version's decision layer on (``refit``: the
candidate's head and the river fast path's probabilities, the labels, the stream's mix).
``replay`` re-runs that layer — fitted on each promotion's window, predicting the blocks
until the next — under several ways of combining the two models and prints JSON: PR-AUC
of p(purchase) pooled over the stream (the evaluation's measure), its mean within blocks,
and G-mean of the decisions. Seconds instead of a 15-minute evaluation per idea; the
record is the production code's own inputs (``TransformerStrategy._decide`` and
``routine.fit_decisions`` are wrapped, not copied).

    python bench/decision_layer.py record rec.pkl eval LOG --format taobao --strategies adaptive
    python bench/decision_layer.py replay rec.pkl

Combinations (all then prior-corrected and decided with moved thresholds, as served):
``head`` (what workers serve: a logistic regression over the head's log-probabilities),
``stack`` (head and river stacked, inputs chosen by out-of-fold log-loss: it would need
the river fast path's probabilities for every list candidate), ``stack_both`` (always
both), ``head_raw`` and ``river`` alone uncalibrated, ``log_pool`` (the equal-weight
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
    from tailstream.models.imbalance.decisions import as_prior
    from tailstream.models.training import routine

    calls: Record = []
    on_block, on_fit, on_learn = (t.TransformerStrategy._decide, routine.fit_decisions,
                                  t.TransformerStrategy.learn)
    strategy: list[Any] = [None]

    def rows(items: Sequence[Any], online: Callable[[Any], dict[str, float]]) -> np.ndarray:
        return np.array([[online(x).get(c, 1.0 / len(CLASSES)) for c in CLASSES]
                         for x in items]).reshape(-1, len(CLASSES))

    def on_decide(self: Any, block: Any, head: np.ndarray) -> Any:
        if self.spec.adaptive:
            labels = np.array([CLASSES.index(it.sample.label) for it in block])
            calls.append(("block", head.copy(), rows(block, lambda it: it.online or {}),
                          labels, self.prior.prior()))
        return on_block(self, block, head)

    pending: list[Any] = []

    def on_learning(self: Any, state: Any, block: int) -> Any:
        strategy[0] = self if self.spec.adaptive else None
        pending.clear()
        try:
            cand = on_learn(self, state, block)
        finally:
            strategy[0] = None
        if cand is not None and cand.decision.promote and pending:
            calls.append(pending[-1])  # the window of the candidate that went to the gate
        return cand

    def on_fitting(cand: Any, data: Any, gate: Any) -> Any:
        fitted = on_fit(cand, data, gate)
        self = strategy[0]
        if fitted is not None and self is not None and cand.holdout_proba is not None:
            online = {it.sample.event_id: it.online or {} for it in self.h.stream.interactions}
            pending.append(("refit", cand.holdout_proba.copy(),
                          rows(data.holdout, lambda x: online.get(x.event_id, {})),
                          np.array([CLASSES.index(x.label) for x in data.holdout]),
                          as_prior(data.stream_mix, CLASSES)))
        return fitted

    t.TransformerStrategy._decide = on_decide  # type: ignore[method-assign]
    t.TransformerStrategy.learn = on_learning  # type: ignore[method-assign]
    routine.fit_decisions = on_fitting
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
        return {"head": [head], "head_raw": [head], "river": [river],
                "log_pool": [log_pool([head, river])]}.get(combine, [head, river])

    stack, chooser = d.Stack, d.choose_inputs
    if combine != "stack":  # one input, or both always
        d.choose_inputs = lambda models, y: tuple(range(len(models)))
    if combine not in ("head", "stack", "stack_both"):
        d.Stack = AsIs  # type: ignore[misc]
    ps, ys, preds, per_block = [], [], [], []
    try:
        # The record holds promoted candidates' windows only (after a rejection the
        # served layer stays).
        layer: d.DecisionLayer | None = None
        for kind, head, river, labels, prior in calls:
            models = inputs(head, river)
            if kind == "refit":
                layer = d.DecisionLayer(4, "g_mean", (1, 2, 3)).fit(models, labels,
                                                                    live_prior=prior)
            elif kind == "block":
                if layer is None:
                    p, pred = models[0], models[0].argmax(axis=1)
                else:
                    p, pred = layer.predict(models, prior)
                ps.append(p)
                ys.append(labels)
                preds.append(pred)
                per_block.append(average_precision_score(labels == PURCHASE, p[:, PURCHASE]))
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
               for c in ("head", "stack", "stack_both", "head_raw", "river", "log_pool")}
        print(json.dumps(out, indent=2))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
