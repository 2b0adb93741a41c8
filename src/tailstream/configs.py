"""The one config boundary: :class:`~tailstream.settings.Settings` → the typed configs
every stage takes.

The settings object is flat (one ``TAILSTREAM_*`` variable per field); stages take small
frozen configs instead, built here and nowhere else, so two processes built from the same
settings can never disagree on a policy, a limit or a model shape:

* :class:`~tailstream.contract.Limits` — what the event decoder accepts;
* :class:`Policy` — the imbalance loop's loss-weight policy and its parameters;
* :class:`TowerConfig` — the shape of the two-tower model (stored in every checkpoint);
* :class:`RankingConfig` — how the scorer turns retrieval into a list;
* :class:`FineTuneConfig` — one fine-tuning run's knobs (recorded in the manifest);
* :class:`GateConfig` — what the promotion gate demands of a candidate;
* :class:`SelectionConfig` — which policies the trainer tries at a trigger, and how it
  chooses among them across triggers;
* :class:`AttributionConfig` — how served lists are credited with what users do next;
* :class:`CanaryConfig` — the online check between the offline gate and a promotion.

Also here: how model versions are named (:func:`version_number`,
:func:`base_version_name`).

This module imports nothing heavy (no torch, no Kafka or Redis client), so every stage
can use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from tailstream.contract import CLASSES, RARE_CLASSES, TRANSACTION_CLASSES, Limits

if TYPE_CHECKING:
    from tailstream.settings import Settings

BASE_VERSION = "base"
"""The model store's name for the untrained base model (seeded towers, pretrained encoder)."""
BASELINE_VERSION = "baseline-1"
"""How lists made without the transformer (category affinity × popularity) are labelled."""
HEAD_PRIOR: dict[str, float] = {"click": 0.9, "cart": 0.05, "fav": 0.03, "purchase": 0.02}
"""A typical shop's interaction mix (Taobao: 89 / 5.5 / 3 / 2.2 %): the untrained outcome
head starts from it."""


# --------------------------------------------------------------------------- version names
def version_number(version: str) -> int:
    """``v00012`` → 12; anything else (the base) → 0.

    >>> version_number("v00012"), version_number("base-53aa5117")
    (12, 0)
    """
    return int(version[1:]) if version.startswith("v") and version[1:].isdigit() else 0


def base_version_name(fingerprint: str) -> str:
    """How lists made by the untrained base model are labelled: ``base-`` + the first 8
    hex digits of the encoder's weights fingerprint.

    >>> base_version_name("53aa5117c0ffee")
    'base-53aa5117'
    """
    return f"{BASE_VERSION}-{fingerprint[:8]}"


# --------------------------------------------------------------------------- the configs
@dataclass(frozen=True)
class Policy:
    """A named loss-weight policy with its parameters (see
    :mod:`tailstream.models.imbalance.policies` for the formulas).

    The worker decides it and publishes it with its live weights; the trainer trains with
    the published one (:meth:`to_dict` / :meth:`from_dict` round-trip).

    >>> p = Policy("focal", gamma=1.5)
    >>> Policy.from_dict(p.to_dict()) == p, p.describe()
    (True, {'policy': 'focal', 'beta': 0.999, 'gamma': 1.5})
    """

    name: str
    beta: float = 0.999
    gamma: float = 2.0
    tau: float = 1.0
    min_weight: float = 0.05
    max_weight: float = 50.0

    def describe(self) -> dict[str, float | str]:
        """Parameters that matter for this policy (for summaries and metrics)."""
        out: dict[str, float | str] = {"policy": self.name}
        if self.name in ("class_balanced", "focal"):
            out["beta"] = self.beta
        if self.name == "focal":
            out["gamma"] = self.gamma
        if self.name == "logit_adjusted":
            out["tau"] = self.tau
        return out

    def to_dict(self) -> dict[str, float | str]:
        """Every parameter, under the names of :meth:`describe` (``policy`` = the name)."""
        return {"policy": self.name, "beta": self.beta, "gamma": self.gamma, "tau": self.tau,
                "min_weight": self.min_weight, "max_weight": self.max_weight}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        """The inverse of :meth:`to_dict`; parameters left out take their defaults (what an
        older worker published with :meth:`describe`)."""
        if not isinstance(d.get("policy"), str) or not d["policy"]:
            raise ValueError(f"a policy needs a name under 'policy': {dict(d)!r}")
        defaults = cls(str(d["policy"]))
        return cls(str(d["policy"]), **{f: float(d.get(f, getattr(defaults, f)))
                                        for f in ("beta", "gamma", "tau", "min_weight",
                                                  "max_weight")})


@dataclass(frozen=True)
class TowerConfig:
    """Shape of the towers and heads (stored in every checkpoint manifest)."""

    embed_dim: int = 128
    """Size of user and item vectors (index memory: 4 · embed_dim bytes per item in fp32)."""
    max_context: int = 20
    """Recent texts pooled by the user tower."""
    context_half_life: float = 2.0
    """Initial recency prior of the user tower's pooling, in positions: entry j starts
    with weight ``2^(−j / half_life)`` (0: all alike, a plain mean); training moves it."""
    max_len: int = 48
    """Tokens per text (titles and queries are short; longer texts are truncated)."""
    temperature: float = 0.05
    head_hidden: int = 256
    classes: tuple[str, ...] = field(default=CLASSES)
    head_prior: dict[str, float] = field(default_factory=lambda: dict(HEAD_PRIOR))
    """Class mix the untrained outcome head starts from."""
    seed: int = 0
    id_buckets: int = 0
    """Slots of the item-id memory (0: none; ``models/towers/ids.py``)."""
    id_dim: int = 32
    wide_features: int = 13
    """Inputs of the outcome head's wide part: ``len(FEATURE_NAMES)`` of
    ``models/imbalance/features.py`` (the ground does not import the models; a unit test
    holds the two equal)."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["classes"] = list(self.classes)
        out["head_prior"] = dict(self.head_prior)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TowerConfig:
        """A manifest's tower; unknown keys (from a newer version) are ignored.

        >>> TowerConfig.from_dict(TowerConfig(embed_dim=32).to_dict()).embed_dim
        32
        """
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "classes" in known:
            known["classes"] = tuple(known["classes"])
        return cls(**known)


@dataclass(frozen=True)
class RankingConfig:
    """How the scorer ranks retrieved candidates (see :mod:`tailstream.models.serving.scorer`)."""

    k: int = 20
    candidates: int = 100
    head_candidates: int = 40
    engagement_weight: float = 1.0
    popularity_weight: float = 0.5
    online_blend: float = 0.0
    tail_share: float = 0.3
    tail_margin: float = 2.0
    max_per_category: float = 1.0
    reason_min_similarity: float = 0.2
    mode: str = "hybrid"
    """``hybrid`` (towers + stateful sources, online blender) or ``towers``."""
    blend_lr: float = 0.3


@dataclass(frozen=True)
class DecisionConfig:
    """How outcome probabilities become decisions (:mod:`tailstream.models.imbalance.
    decisions`): stacked, corrected to the live prior, thresholds moved to ``objective``."""

    objective: str = "g_mean"
    precision_floor: float = 0.05
    prior_half_life: float = 2000.0


@dataclass(frozen=True)
class SignalsConfig:
    """The stateful candidate sources beside the towers
    (:mod:`tailstream.models.serving.signals`)."""

    trending_half_life: float = 10_000.0
    """Interactions after which an interaction counts half in trending."""
    covisitation_half_life: float = 20_000.0
    """Interactions after which a co-visit counts half."""
    covisitation_window: int = 5
    depth: int = 100
    """Candidates taken from each source."""
    recent: int = 5
    """The user's most recent items: never recommended (they just saw them)."""
    query_follow_s: float = 1800.0
    """A search steers lists for this long (event time) after it was made."""


@dataclass(frozen=True)
class FineTuneConfig:
    """One run's knobs (from the settings; recorded in the checkpoint manifest)."""

    policy: str = "class_balanced"
    gamma: float = 2.0
    tau: float = 1.0
    builder: str = "none"
    target_mix: str = "balanced"
    """Target of re-sampling builders: ``balanced`` (uniform) or ``sqrt`` (∝ √π_c)."""
    batch_size: int = 256
    max_steps: int = 200
    max_seconds: float = 120.0
    lr: float = 1e-3
    """Learning rate of the towers and the head."""
    wide_lr: float = 1e-2
    """Learning rate of the outcome head's wide part."""
    encoder_lr: float = 3e-5
    weight_decay: float = 0.01
    retrieval_weight: float = 1.0
    replay_share: float = 0.25
    id_min_count: int = 20
    """Frequency filter of the item-id memory: appearances in the training data before an
    item gets a slot."""
    replay_capacity: int = 20_000
    """Samples kept in the replay memory (a promotion adds a quarter of that at most)."""
    holdout_share: float = 0.2
    augment_share: float = 0.0
    """Share of minority samples whose texts get EDA augmentation in a batch."""
    smote_share: float = 0.0
    """Synthetic minority pairs per batch (SMOTE on [u, v] pair vectors), as a share of B."""
    sampler: str = "smote"
    """How the synthetic pairs are made: ``smote`` or ``adasyn`` (imbalanced-learn)."""
    minority_classes: tuple[str, ...] = RARE_CLASSES
    layers: str = "auto"
    """Encoder layers trained: ``auto`` (all on CUDA, 0 on CPU), ``all`` or a number."""
    lora_rank: int = 0
    """> 0: LoRA adapters of this rank on those layers instead of their weights."""
    grad_clip: float = 1.0
    bf16: bool = True
    compile: bool = False
    pad_to_max_len: bool = False
    """Pad every text to exactly ``max_len`` tokens (benchmarks at a set sequence length)."""
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["minority_classes"] = list(self.minority_classes)
        return out

    def with_policy(self, policy: Policy) -> FineTuneConfig:
        """This config training with ``policy``'s loss (name, γ, τ).

        >>> FineTuneConfig().with_policy(Policy("focal", gamma=1.0)).gamma
        1.0
        """
        return dataclasses.replace(self, policy=policy.name, gamma=policy.gamma,
                                   tau=policy.tau)


@dataclass(frozen=True)
class GateConfig:
    """What the promotion gate demands (see :mod:`tailstream.models.training.gate`)."""

    classes: tuple[str, ...] = TRANSACTION_CLASSES
    """Minority classes whose held-out recall must improve or hold."""
    recall_tolerance: float = 0.01
    quality_tolerance: float = 0.02
    noise_z: float = 2.0
    """A metric with a standard error may fall by ``z`` standard errors of the difference
    (:func:`~tailstream.models.training.gate.noise_tolerance`); 0: the fixed tolerance."""
    objective: str = "g_mean"
    """The decision objective scored on the held-out window (``g_mean``, ``macro_f1``,
    ``minority_recall``): what picks the best candidate, and a gated quality metric."""
    precision_floor: float = 0.0
    """``minority_recall`` counts a class below this held-out precision as a failure."""
    move_to: str | None = "g_mean"
    """Judge the head's decisions as the workers make them: thresholds moved to this
    decision objective (``TAILSTREAM_DECISION_OBJECTIVE``; None: the plain argmax)."""
    move_precision_floor: float = 0.05
    """``TAILSTREAM_DECISION_PRECISION_FLOOR``: the floor of ``move_to=minority_recall`` in
    the decision layer the trainer fits for the workers."""
    stack_fast: bool = False
    """``TAILSTREAM_DECISION_STACK_FAST``: offer the samples' river fast-path probabilities
    to the decision layer beside the head's."""
    refresh_decisions: bool = True
    """``TAILSTREAM_DECISION_REFRESH``: a trigger whose candidate is not promoted outright
    (rejected, or sent to a canary) refits the served model's decision layer on the
    held-out window (no new weights)."""


@dataclass(frozen=True)
class AttributionConfig:
    """How the worker attributes interactions to the lists it served
    (:mod:`tailstream.streams.worker.attribution`)."""

    window_s: float = 1800.0
    """An interaction counts for a list only this long after the list was published."""
    max_users: int = 100_000
    """Users whose last list is kept in memory (oldest forgotten first; Redis keeps the
    rest for the window)."""
    tail_target: float = 0.2
    """The tail-exposure SLO: the share of impressions that should go to tail items."""


@dataclass(frozen=True)
class CanaryConfig:
    """The online check between the offline gate and a promotion
    (:mod:`tailstream.models.serving.canary`, :mod:`tailstream.streams.trainer.canary`).

    >>> CanaryConfig(share=0.0).enabled
    False
    """

    share: float = 0.1
    """Share of users (hashed ids) served the candidate."""
    window_s: float = 600.0
    """How long the candidate serves before it is judged."""
    confidence: float = 0.95
    """Confidence of the one-sided test that finds the candidate worse."""
    min_lists: int = 200
    """Judged lists of the candidate needed to judge it."""
    max_windows: float = 3.0
    """A canary short of judged lists waits up to this many windows, then is rolled back."""

    @property
    def enabled(self) -> bool:
        return self.share > 0.0


SELECTION_POLICIES: tuple[str, ...] = (
    "class_balanced", "focal", "logit_adjusted", "inverse", "none", "oversample",
    "undersample", "smote", "adasyn", "importance")
"""The registry policy selection draws from by default (see
:mod:`tailstream.models.training.selection`)."""


@dataclass(frozen=True)
class SelectionConfig:
    """Policy selection in the trainer (see :mod:`tailstream.models.training.selection`).

    >>> SelectionConfig(challengers=0).enabled
    False
    """

    policies: tuple[str, ...] = SELECTION_POLICIES
    """Challengers are drawn from these."""
    challengers: int = 1
    """Challengers trained beside the current policy at each trigger (0: no selection)."""
    rule: str = "bandit"
    """``bandit`` (ε-greedy after a burn-in) or ``halving`` (successive halving)."""
    epsilon: float = 0.1
    burn_in: int = 1
    """Tries of each policy before the bandit exploits (halving: per policy and rung)."""
    eta: int = 2
    """Successive halving keeps ``⌈n / eta⌉`` of ``n`` policies at each rung."""
    synthetic_share: float = 0.25
    """Synthetic pairs per batch of the ``smote`` and ``adasyn`` policies (share of B)."""
    margin_se: float = 1.0
    """Standard errors by which a challenger must lead the current policy to displace it."""
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.challengers > 0


# --------------------------------------------------------------------------- from settings
def limits(settings: Settings, *, future_skew: bool = True) -> Limits:
    """The decoder's bounds. ``future_skew=False`` accepts any future timestamp (an
    offline replay's "now" is the log's, not the wall clock's).

    >>> from tailstream.settings import Settings
    >>> limits(Settings().replace(max_string_chars=64)).max_string_chars
    64
    """
    return Limits(max_event_bytes=settings.max_event_bytes,
                  max_envelope_bytes=settings.max_envelope_bytes,
                  max_envelope_events=settings.max_envelope_events,
                  max_string_chars=settings.max_string_chars,
                  max_future_skew_s=(float(settings.max_future_skew_s) if future_skew
                                     else float("inf")))


def policy(settings: Settings) -> Policy:
    """The loss-weight policy a worker runs (``TAILSTREAM_WEIGHT_*``).

    >>> from tailstream.settings import Settings
    >>> policy(Settings().replace(weight_policy="focal", weight_gamma="1.5")).describe()
    {'policy': 'focal', 'beta': 0.9999, 'gamma': 1.5}
    """
    return Policy(settings.weight_policy, beta=settings.weight_beta,
                  gamma=settings.weight_gamma, tau=settings.weight_tau,
                  min_weight=settings.weight_min, max_weight=settings.weight_max)


def tower_config(settings: Settings, seed: int = 0) -> TowerConfig:
    return TowerConfig(embed_dim=settings.embed_dim, max_context=settings.max_context,
                       context_half_life=settings.context_half_life,
                       max_len=settings.text_max_len, seed=seed,
                       id_buckets=4 * settings.heavy_hitters if settings.id_memory else 0,
                       id_dim=settings.id_dim)


def ranking_config(settings: Settings) -> RankingConfig:
    return RankingConfig(k=settings.recs_k, candidates=settings.rank_candidates,
                         head_candidates=settings.rank_head_candidates,
                         engagement_weight=settings.rank_engagement_weight,
                         popularity_weight=settings.rank_popularity_weight,
                         online_blend=settings.rank_online_blend,
                         tail_share=settings.tail_share, tail_margin=settings.tail_margin,
                         max_per_category=settings.max_per_category, mode=settings.rank_mode,
                         blend_lr=settings.rank_blend_lr)


def decision_config(settings: Settings) -> DecisionConfig:
    return DecisionConfig(objective=settings.decision_objective,
                          precision_floor=settings.decision_precision_floor,
                          prior_half_life=settings.decision_prior_half_life)


def signals_config(settings: Settings) -> SignalsConfig:
    return SignalsConfig(trending_half_life=settings.rank_trending_half_life,
                         covisitation_half_life=settings.rank_covisitation_half_life,
                         depth=settings.rank_source_depth)


def finetune_config(settings: Settings, with_policy: Policy | None = None) -> FineTuneConfig:
    """The trainer's run config; the loss follows ``with_policy`` (the policy the workers
    published) when given, else the settings' own policy.

    >>> from tailstream.settings import Settings
    >>> finetune_config(Settings(), Policy("inverse")).policy
    'inverse'
    """
    cfg = FineTuneConfig(
        builder=settings.finetune_builder, target_mix=settings.finetune_target_mix,
        batch_size=settings.finetune_batch_size, max_steps=settings.finetune_max_steps,
        max_seconds=settings.finetune_max_seconds, lr=settings.finetune_lr,
        encoder_lr=settings.finetune_encoder_lr, wide_lr=settings.finetune_wide_lr,
        retrieval_weight=settings.finetune_retrieval_weight,
        replay_share=settings.finetune_replay_share,
        replay_capacity=settings.finetune_replay_capacity,
        id_min_count=settings.id_min_count,
        holdout_share=settings.finetune_holdout_share,
        augment_share=settings.finetune_augment_share,
        smote_share=settings.finetune_smote_share, sampler=settings.finetune_sampler,
        layers=settings.finetune_layers,
        lora_rank=settings.finetune_lora_rank, bf16=settings.finetune_bf16,
        compile=settings.finetune_compile)
    return cfg.with_policy(with_policy or policy(settings))


def gate_config(settings: Settings) -> GateConfig:
    """The promotion gate's demands (``TAILSTREAM_GATE_*``).

    >>> from tailstream.settings import Settings
    >>> gate_config(Settings().replace(gate_classes="purchase, cart")).classes
    ('purchase', 'cart')
    """
    return GateConfig(tuple(c.strip() for c in settings.gate_classes.split(",") if c.strip()),
                      recall_tolerance=settings.gate_recall_tolerance,
                      quality_tolerance=settings.gate_quality_tolerance,
                      noise_z=settings.gate_noise_z,
                      objective=settings.selection_objective,
                      precision_floor=settings.selection_precision_floor,
                      move_to=settings.decision_objective or None,
                      move_precision_floor=settings.decision_precision_floor,
                      refresh_decisions=settings.decision_refresh,
                      stack_fast=settings.decision_stack_fast)


def selection_config(settings: Settings) -> SelectionConfig:
    """Policy selection in the trainer (``TAILSTREAM_SELECTION_*``).

    >>> from tailstream.settings import Settings
    >>> cfg = selection_config(Settings().replace(selection_policies="focal, ce"))
    >>> cfg.policies, cfg.challengers, cfg.rule
    (('focal', 'ce'), 1, 'bandit')
    """
    return SelectionConfig(
        policies=tuple(p.strip() for p in settings.selection_policies.split(",") if p.strip()),
        challengers=settings.selection_challengers, rule=settings.selection_rule,
        epsilon=settings.selection_epsilon, burn_in=settings.selection_burn_in,
        synthetic_share=settings.selection_synthetic_share,
        margin_se=settings.selection_margin_se)


def attribution_config(settings: Settings) -> AttributionConfig:
    """The worker's attribution of interactions to served lists.

    >>> from tailstream.settings import Settings
    >>> attribution_config(Settings().replace(attribution_window_s="60")).window_s
    60.0
    """
    return AttributionConfig(window_s=settings.attribution_window_s,
                             max_users=settings.active_users_max,
                             tail_target=settings.tail_exposure_target)


def canary_config(settings: Settings) -> CanaryConfig:
    """The canary before a promotion (``TAILSTREAM_CANARY_*``), its share clipped to
    [0, 1] and its confidence to (0.5, 1).

    >>> from tailstream.settings import Settings
    >>> cfg = canary_config(Settings().replace(canary_share="0.25", canary_window_s="30"))
    >>> cfg.share, cfg.window_s, cfg.enabled
    (0.25, 30.0, True)
    """
    return CanaryConfig(share=min(max(settings.canary_share, 0.0), 1.0),
                        window_s=max(settings.canary_window_s, 0.0),
                        confidence=min(max(settings.canary_confidence, 0.5), 0.999999),
                        min_lists=max(settings.canary_min_lists, 1))
