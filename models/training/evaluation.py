"""Held-out evaluation of a two-tower model, for the promotion gate.

:func:`evaluate` scores a model on the held-out recent window (events neither model
trained on): the outcome head's per-class precision/recall/F1 with counts reweighted to
the *stream's* class mix (the held-out window over-keeps rare classes, as the buffer
does), macro-F1, minority macro-recall, and next-item retrieval among all distinct
held-out items (HitRate@K, NDCG@K, MRR; ties broken at random in expectation).

Given a decision ``objective`` it also scores the head's decisions with
:func:`~tailstream.models.imbalance.decisions.score` (G-mean of the class recalls,
macro-F1, or minority recall at a precision floor) as ``objective_<name>``: the metric
policy selection and the gate compare. G-mean uses recalls only, so it does not depend on
the class mix of the window; the precisions inside that macro-F1 and the floor are those
of the held-out window, whose mix over-keeps rare classes (the reweighted ``macro_f1``
beside it is the stream's).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from tailstream.contract import RARE_CLASSES
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.imbalance.decisions import (
    crossfit_calibrate,
    crossfit_decisions,
    prior_correct,
    score,
    score_se,
)
from tailstream.models.towers.context import kind_codes, split_context
from tailstream.models.towers.two_tower import TextBatch, TwoTowerRecommender, pack_contexts
from tailstream.models.training.gate import objective_metric
from tailstream.models.training.metrics import classification_report, macro_recall, rank_metrics


@torch.no_grad()
def evaluate(model: TwoTowerRecommender, vectors: Callable[[Sequence[str]], torch.Tensor],
             samples: Sequence[Sample], stream_mix: Mapping[str, float], *,
             minority_classes: Sequence[str] = RARE_CLASSES,
             ks: Sequence[int] = (10, 20), chunk: int = 512, objective: str | None = None,
             precision_floor: float = 0.0, move_to: str | None = None,
             proba_out: list[np.ndarray] | None = None) -> dict[str, float]:
    """Held-out metrics of ``model``: outcome-head precision/recall/F1 per class (counts
    reweighted to the stream's class mix), ``macro_f1``, ``minority_macro_recall`` and
    next-item ranking (``hit_at_K``, ``ndcg_at_K``, ``mrr``) of each sample's item among
    all distinct held-out items; with an ``objective``, its value ``objective_<name>``
    (see the module docstring). ``vectors`` maps texts to pooled encoder vectors. With
    ``move_to`` (the serving decision objective) the head's decisions are made as the
    workers make them, with thresholds moved to that objective (cross-fitted on the window:
    :func:`~tailstream.models.imbalance.decisions.crossfit_decisions`); the argmax's
    macro-F1 stays as ``argmax_macro_f1``. ``proba_out`` (a list) receives the head's
    class probabilities ``[N, K]`` of the samples (the decision layer is fitted on them)."""
    model.eval()
    classes = list(model.config.classes)
    if not samples:
        return {"n": 0.0}
    c = model.config.max_context
    items = list(dict.fromkeys(s.item_id for s in samples))
    text_of = {s.item_id: s.item_text or f"item {s.item_id}" for s in samples}
    item_vecs = torch.cat([model.item_vectors(vectors([text_of[i] for i in items[k:k + chunk]]))
                           for k in range(0, len(items), chunk)])
    memory = model.item_memory(items)
    col = {i: k for k, i in enumerate(items)}
    preds: list[str] = []
    probs: list[np.ndarray] = []
    ranks: list[int] = []
    for start in range(0, len(samples), chunk):
        part = samples[start:start + chunk]
        contexts = [split_context(s.user_text, c) for s in part]
        flat = TextBatch([t for ctx in contexts for t in ctx])
        vecs = vectors(flat.texts) if flat.texts else None
        ctx_t, mask, kinds, at = pack_contexts(contexts, vecs, flat, c,
                                               model.empty_context.shape[0],
                                               model.empty_context.device,
                                               [kind_codes(s.user_kinds, c) for s in part])
        users = model.user_vectors(ctx_t, mask, kinds)
        idx = torch.tensor([col[s.item_id] for s in part], device=item_vecs.device)
        counts = model.count_rows([s.features for s in part], model.empty_context.device)
        logits = model.outcome_logits(users, item_vecs[idx], model.context_items_at(vecs, at),
                                      mask, counts, kinds)
        preds.extend(classes[int(k)] for k in logits.argmax(-1))
        probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
        scores = model.retrieval_scores(users, item_vecs, memory)
        own = scores.gather(1, idx.unsqueeze(1))
        # Ties are broken at random in expectation: an untrained model scores every item
        # 0 for a user without context, and counting ties as hits would rank each of
        # their items first (a base model would then look unbeatable to the gate).
        ties = (scores == own).sum(1) - 1
        ranks.extend(((scores > own).sum(1) + 1 + ties // 2).tolist())
    if proba_out is not None and probs:
        proba_out.append(np.concatenate(probs))
    truth = [s.label for s in samples]
    held_mix = Counter(truth)
    n = len(truth)
    weights = [stream_mix.get(y, 0.0) / (held_mix[y] / n) if stream_mix.get(y) else 1.0
               for y in truth]
    argmax_f1 = None
    if move_to is not None:
        argmax_f1 = classification_report(truth, preds, classes, weights)["macro_f1"]
        index = {c: i for i, c in enumerate(classes)}
        moved = crossfit_decisions(np.concatenate(probs), np.array([index[t] for t in truth]),
                                   move_to, minority=[index[m] for m in minority_classes
                                                      if m in index],
                                   precision_floor=precision_floor)
        preds = [classes[int(k)] for k in moved]
    report = classification_report(truth, preds, classes, weights)
    if argmax_f1 is not None:
        report["argmax_macro_f1"] = argmax_f1
    report["minority_macro_recall"] = macro_recall(report, minority_classes)
    report.update(rank_metrics(ranks, ks))
    for name in {objective, move_to} - {None}:
        assert name is not None
        report[objective_metric(name)] = decision_objective(
            truth, preds, classes, name, minority_classes, precision_floor)
        report[objective_metric(name) + "_se"] = decision_objective(
            truth, preds, classes, name, minority_classes, precision_floor, se=True)
    if probs:
        report["neg_log_loss"] = calibrated_log_loss(np.concatenate(probs), truth, classes,
                                                     stream_mix, weights)
    report["n"] = float(n)
    return report


def calibrated_log_loss(proba: np.ndarray, truth: Sequence[str], classes: Sequence[str],
                        stream_mix: Mapping[str, float], weights: Sequence[float]) -> float:
    """:func:`neg_log_loss` of the probabilities as the workers use them: calibrated out of
    fold on the window (:func:`~tailstream.models.imbalance.decisions.crossfit_calibrate`),
    then moved from the window's class mix to the stream's (prior correction) — so a
    class-weighted loss is judged on what its probabilities tell apart, not on the offset
    it puts in them on purpose."""
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[t] for t in truth])
    cal = crossfit_calibrate(proba, y)
    window = np.bincount(y, minlength=len(classes)) / max(len(y), 1)
    stream = np.array([float(stream_mix.get(c, 0.0)) for c in classes])
    if stream.sum() > 0:
        cal = prior_correct(cal, np.maximum(window, 1e-4), np.maximum(stream, 1e-4))
    return neg_log_loss(cal, truth, classes, weights)


def neg_log_loss(proba: np.ndarray, truth: Sequence[str], classes: Sequence[str],
                 weights: Sequence[float]) -> float:
    """``−Σ_i w_i log p_i(y_i) / Σ_i w_i``: the (negated, so higher is better) log-loss of
    the head's probabilities, each sample weighted to the stream's class mix — a proper
    scoring rule, smooth where recall-based scores jump on a handful of rare samples.

    >>> round(neg_log_loss(np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"], ["a", "b"],
    ...                    [1.0, 1.0]), 4)   # (log 0.9 + log 0.8) / 2
    -0.1643
    """
    index = {c: i for i, c in enumerate(classes)}
    p = np.array([proba[i, index[t]] for i, t in enumerate(truth)])
    w = np.asarray(weights, dtype=float)
    return float((w * np.log(np.maximum(p, 1e-12))).sum() / max(w.sum(), 1e-12))


def decision_objective(truth: Sequence[str], preds: Sequence[str], classes: Sequence[str],
                       objective: str, minority_classes: Sequence[str] = RARE_CLASSES,
                       precision_floor: float = 0.0, se: bool = False) -> float:
    """:func:`~tailstream.models.imbalance.decisions.score` of predicted labels (``se``:
    its bootstrap standard error, :func:`~tailstream.models.imbalance.decisions.score_se`).

    >>> round(decision_objective(["a", "a", "a", "b"], ["a", "a", "b", "b"], ["a", "b"],
    ...                          "g_mean", ["b"]), 4)   # √(2/3 · 1)
    0.8165
    """
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in truth])
    pred = np.array([index[c] for c in preds])
    minority = [index[c] for c in minority_classes if c in index]
    if se:
        return score_se(y, pred, len(classes), objective, minority, precision_floor)
    return score(y, pred, len(classes), objective, minority, precision_floor)
