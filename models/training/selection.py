"""Adaptive = policy selection: at every trigger the trainer trains the current policy and
challengers from a registry, the gate judges the best of them, and the choice of
challengers across triggers is a bandit or successive halving over the policies, so the
loop tracks the best *fixed* policy for each stream instead of betting on one.

Pure and torch-free: :func:`~tailstream.models.training.routine.fine_tune` trains the
candidates; this module says which (:meth:`PolicySelector.plan`), how one becomes a run
config (:func:`arm_config`), which candidate is best (:func:`choose`) and what the
selector learned (:meth:`PolicySelector.record`); its state is JSON
(:meth:`PolicySelector.to_dict` / :meth:`PolicySelector.from_dict`), kept by the trainer.

**Policies** (:data:`ARMS`) mirror the evaluation's fixed strategies: the loss policies of
:data:`~tailstream.models.training.losses.LOSS_MAPPING` (``none`` = plain cross-entropy,
alias ``ce``; ``inverse``, ``sqrt_inverse``, ``class_balanced``, ``focal``,
``logit_adjusted``, ``importance``) with the configured batch builder, the re-sampling
builders ``oversample`` / ``undersample`` and the synthetic samplers ``smote`` / ``adasyn``
(imbalanced-learn, in the outcome head's input space), each with unweighted
cross-entropy. A policy's class weights come from the live class counts with the
published policy's parameters (β, γ, τ, bounds).

**Reward.** A candidate's held-out objective ``J`` (G-mean, macro-F1 or minority recall
at a precision floor; :func:`~tailstream.models.imbalance.decisions.score`) minus the
served model's on the same window: ``r = J(candidate) − J(served)``. Windows differ in
difficulty from one trigger to the next; the served model, scored on the same window,
takes that out (a paired comparison).

**Rules** (river's ``model_selection`` is the anchor: ``BanditClassifier`` with
``bandit.EpsilonGreedy`` and its burn-in, ``SuccessiveHalvingClassifier``; here one "pull"
is one trigger, and the state must survive a restart as JSON):

* ``bandit``: every policy is tried ``burn_in`` times (fewest tries first); after that,
  each challenger slot takes, with probability ε, a random policy, otherwise the policy
  with the best mean reward (ε-greedy; Sutton & Barto, *Reinforcement Learning*, §2.2;
  Auer et al., "Finite-time Analysis of the Multiarmed Bandit Problem", MLJ 2002).
* ``halving``: successive halving over triggers (Jamieson & Talwalkar, "Non-stochastic
  Best Arm Identification and Hyperparameter Optimization", AISTATS 2016): at rung ``k``
  every policy still in the running is tried until it has ``burn_in · eta^k`` rewards,
  then the best ``⌈n / eta⌉`` by mean reward stay. Once one is left, the best of the
  others by mean reward keeps challenging it.

The current policy (the one whose candidate was last promoted; until then the one the
workers published) is trained at every trigger as well; it is never its own challenger.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tailstream.configs import FineTuneConfig, Policy, SelectionConfig

RULES: tuple[str, ...] = ("bandit", "halving")
ALIASES: dict[str, str] = {"ce": "none"}
HISTORY = 50
"""Triggers remembered in the state (for reports; the statistics cover all of them)."""


@dataclass(frozen=True)
class Arm:
    """What a selectable policy trains with."""

    loss: str
    """The outcome loss (a weight policy name)."""
    builder: str | None = None
    """A re-sampling batch builder; None: the configured one."""
    sampler: str | None = None
    """``smote`` / ``adasyn``: synthetic minority pairs in every batch."""


ARMS: dict[str, Arm] = {
    **{name: Arm(name) for name in ("none", "inverse", "sqrt_inverse", "class_balanced",
                                    "focal", "logit_adjusted", "importance")},
    "oversample": Arm("none", builder="oversample"),
    "undersample": Arm("none", builder="undersample"),
    "smote": Arm("none", sampler="smote"),
    "adasyn": Arm("none", sampler="adasyn"),
}
"""Every policy selection can try, by name."""


def arm_name(name: str) -> str:
    """The registry's name of a policy (``ce`` is ``none``); unknown names are an error.

    >>> arm_name("ce"), arm_name("focal")
    ('none', 'focal')
    """
    canonical = ALIASES.get(name, name)
    if canonical not in ARMS:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted([*ARMS, *ALIASES])}")
    return canonical


def arm_config(cfg: FineTuneConfig, arm: str, policy: Policy, synthetic_share: float
               ) -> tuple[FineTuneConfig, Policy]:
    """The run config and the weight policy of ``arm``: ``cfg`` with the arm's loss (the
    published ``policy``'s parameters), builder and synthetic sampler.

    >>> cfg, p = arm_config(FineTuneConfig(), "adasyn", Policy("focal", gamma=1.0), 0.25)
    >>> cfg.policy, cfg.builder, cfg.sampler, cfg.smote_share, p.name, p.gamma
    ('none', 'none', 'adasyn', 0.25, 'none', 1.0)
    """
    spec = ARMS[arm_name(arm)]
    weights = dataclasses.replace(policy, name=spec.loss)
    out = cfg.with_policy(weights)
    if spec.builder is not None:
        out = dataclasses.replace(out, builder=spec.builder)
    if spec.sampler is not None:
        out = dataclasses.replace(out, sampler=spec.sampler, smote_share=synthetic_share)
    return out, weights


def describe_arm(arm: str, policy: Policy, cfg: FineTuneConfig) -> dict[str, Any]:
    """How a manifest names the policy a model trained with: the loss policy's own
    description, or the builder / sampler with the loss it used.

    >>> describe_arm("oversample", Policy("none"), FineTuneConfig(builder="oversample"))
    {'policy': 'oversample', 'loss': 'none', 'builder': 'oversample'}
    """
    arm = arm_name(arm)
    spec = ARMS[arm]
    if spec.builder is None and spec.sampler is None:
        return dict(policy.describe())
    out: dict[str, Any] = {"policy": arm, "loss": policy.name}
    if spec.builder is not None:
        out["builder"] = cfg.builder
    if spec.sampler is not None:
        out.update(sampler=cfg.sampler, synthetic_share=cfg.smote_share)
    return out


# --------------------------------------------------------------------------- one trigger
@dataclass(frozen=True)
class Trial:
    """One policy's candidate at one trigger, on the held-out window."""

    policy: str
    objective: float
    """``J(candidate)``."""
    served: float
    """``J(served)`` on the same window."""
    steps: int = 0
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    """The candidate's held-out metrics."""
    failed: str = ""
    """Why the challenger's run failed (a non-finite loss, out of memory); empty if not."""
    se: float = 0.0
    """Bootstrap standard error of ``objective`` on the held-out window (0: unknown)."""

    @property
    def lift(self) -> float:
        """The reward: ``J(candidate) − J(served)``; a failed run gets −1, the worst lift
        any objective in [0, 1] can have.

        >>> Trial("focal", 0.5, 0.25).lift, Trial("importance", 0.0, 0.3, failed="nan").lift
        (0.25, -1.0)
        """
        return -1.0 if self.failed else self.objective - self.served

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "objective": None if self.failed else self.objective,
                "served": self.served, "lift": self.lift, "steps": self.steps,
                "seconds": round(self.seconds, 3), "se": self.se,
                **({"failed": self.failed} if self.failed else {}),
                **{k: self.metrics[k] for k in ("macro_f1", "hit_at_10",
                                                "minority_macro_recall") if k in self.metrics}}


def choose(trials: Sequence[Trial], margin_se: float = 0.0) -> int:
    """Index of the best trial that did not fail: highest objective, then highest macro-F1
    (G-mean is 0 for every candidate that misses one class entirely), then the earliest —
    the current policy comes first, so a tie keeps it.

    A challenger displaces the current policy (``trials[0]``) only when its lead is more
    than ``margin_se`` standard errors of the difference, ``√(se_0² + se_i²)`` (the
    one-standard-error rule: Breiman et al., *Classification and Regression Trees*, 1984,
    §3.4.3). On a window where the policies' objectives differ by less than their noise,
    the loop keeps one policy instead of switching at every trigger on a coin flip.

    >>> t = [Trial("class_balanced", 0.40, 0.3), Trial("focal", 0.45, 0.3),
    ...      Trial("none", 0.45, 0.3)]
    >>> choose(t), choose([Trial("a", 0.0, 0.0, metrics={"macro_f1": 0.2}),
    ...                    Trial("b", 0.0, 0.0, metrics={"macro_f1": 0.3})])
    (1, 1)
    >>> noisy = [Trial("inverse", 0.30, 0.29, se=0.02), Trial("focal", 0.32, 0.29, se=0.02)]
    >>> choose(noisy, margin_se=1.0), choose(noisy)
    (0, 1)
    """
    if not trials:
        raise ValueError("no trials to choose from")
    best = 0
    for i, t in enumerate(trials[1:], start=1):
        key = (t.objective, t.metrics.get("macro_f1", 0.0))
        top = trials[best]
        if t.failed or not (top.failed or key > (top.objective,
                                                 top.metrics.get("macro_f1", 0.0))):
            continue
        current = trials[0]
        noise = math.hypot(current.se, t.se)
        if current.failed or noise == 0.0 or t.objective - current.objective > margin_se * noise:
            best = i
    return best


def summary(trials: Sequence[Trial], chosen: int, objective: str) -> str:
    """One line for reasons and logs.

    >>> summary([Trial("class_balanced", 0.40, 0.3), Trial("focal", 0.45, 0.3)], 1, "g_mean")
    'selection by g_mean (served 0.300): class_balanced 0.400, focal 0.450 (best)'
    """
    if not trials:
        return ""
    tried = ", ".join(f"{t.policy} " + ("failed" if t.failed else f"{t.objective:.3f}")
                      + (" (best)" if i == chosen else "") for i, t in enumerate(trials))
    return f"selection by {objective} (served {trials[0].served:.3f}): {tried}"


# --------------------------------------------------------------------------- across triggers
@dataclass
class PolicySelector:
    """Which policies to train at a trigger, learned from the rewards of earlier ones.

    >>> sel = PolicySelector(["class_balanced", "focal", "none"], challengers=1, seed=0)
    >>> sel.plan("class_balanced")              # burn-in: untried policies first
    ['class_balanced', 'focal']
    >>> sel.record({"class_balanced": 0.01, "focal": 0.05}, promoted="focal")
    >>> sel.plan("class_balanced")              # focal now serves; none is still untried
    ['focal', 'none']
    >>> PolicySelector.from_dict(sel.to_dict()) == sel
    True
    """

    arms: list[str]
    rule: str = "bandit"
    challengers: int = 1
    epsilon: float = 0.1
    burn_in: int = 1
    eta: int = 2
    synthetic_share: float = 0.25
    seed: int = 0
    margin_se: float = 1.0
    """A challenger must lead the current policy by this many standard errors (:func:`choose`)."""
    incumbent: str | None = None
    """The policy of the last promoted candidate (None: the workers' policy)."""
    pulls: dict[str, int] = field(default_factory=dict)
    rewards: dict[str, float] = field(default_factory=dict)
    """Sum of the rewards of each policy."""
    triggers: int = 0
    rung: int = 0
    active: list[str] = field(default_factory=list)
    """Successive halving: the policies still in the running."""
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.arms = list(dict.fromkeys(arm_name(a) for a in self.arms))
        if self.rule not in RULES:
            raise ValueError(f"unknown selection rule {self.rule!r}; choose from {RULES}")
        if self.challengers < 0 or self.burn_in < 0 or self.eta < 2:
            raise ValueError("need challengers >= 0, burn_in >= 0 and eta >= 2")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        self.active = [a for a in self.active if a in self.arms] or list(self.arms)

    @classmethod
    def from_config(cls, cfg: SelectionConfig, state: Mapping[str, Any] | None = None
                    ) -> PolicySelector:
        """A selector for ``cfg``, carrying on from a saved ``state`` (its statistics are
        kept; policies no longer configured leave the running, new ones join it)."""
        knobs: dict[str, Any] = {
            "arms": list(cfg.policies), "rule": cfg.rule, "challengers": cfg.challengers,
            "epsilon": cfg.epsilon, "burn_in": cfg.burn_in, "eta": cfg.eta,
            "synthetic_share": cfg.synthetic_share, "seed": cfg.seed,
            "margin_se": cfg.margin_se}
        if not state:
            return cls(**knobs)
        before = set(state.get("arms", []))
        joining = [a for a in knobs["arms"] if arm_name(a) not in before]
        active = [*state.get("active", []), *(arm_name(a) for a in joining)]
        return cls.from_dict({**state, **knobs, "active": active})

    # ------------------------------------------------------------------ statistics
    def mean(self, arm: str) -> float:
        """Mean reward of ``arm`` (−inf when never tried)."""
        n = self.pulls.get(arm, 0)
        return self.rewards.get(arm, 0.0) / n if n else -math.inf

    def best(self) -> str | None:
        """The policy with the best mean reward so far (None before any reward)."""
        tried = [a for a in self.arms if self.pulls.get(a, 0)]
        return max(tried, key=self.mean) if tried else None

    # ------------------------------------------------------------------ one trigger
    def plan(self, current: str) -> list[str]:
        """The policies to train now: the current one first, then the challengers."""
        incumbent = self.incumbent or arm_name(current)
        others = [a for a in self.arms if a != incumbent]
        n = min(self.challengers, len(others))
        if self.rule == "halving":
            return [incumbent, *self._halving(others, n)]
        return [incumbent, *self._bandit(others, n)]

    def _bandit(self, others: list[str], n: int) -> list[str]:
        # Burn-in: the least-tried first (in the configured order), as river's burn_in.
        picked = sorted((a for a in others if self.pulls.get(a, 0) < self.burn_in),
                        key=lambda a: self.pulls.get(a, 0))[:n]
        rng = random.Random(f"{self.seed}:{self.triggers}")
        while len(picked) < n:
            left = [a for a in others if a not in picked]
            explore = rng.random() < self.epsilon
            picked.append(rng.choice(left) if explore else max(left, key=self.mean))
        return picked

    def _halving(self, others: list[str], n: int) -> list[str]:
        running = [a for a in self.active if a in others]
        if len(self.active) > 1:
            need = self._rung_tries()
            short = sorted((a for a in running if self.pulls.get(a, 0) < need),
                           key=lambda a: self.pulls.get(a, 0))
            picked = short[:n]
        else:
            picked = []
        # Converged (or the rung's tries are done): the best of the rest challenge.
        rest = sorted((a for a in others if a not in picked), key=self.mean, reverse=True)
        return picked + rest[:n - len(picked)]

    def record(self, rewards: Mapping[str, float], promoted: str | None) -> None:
        """Learn from one trigger: each tried policy's reward, and the policy whose
        candidate the gate promoted (None: the current policy stays)."""
        for arm, r in rewards.items():
            if not math.isfinite(r):
                continue
            self.pulls[arm] = self.pulls.get(arm, 0) + 1
            self.rewards[arm] = self.rewards.get(arm, 0.0) + float(r)
        if promoted is not None:
            self.incumbent = arm_name(promoted)
        self.triggers += 1
        self.history = [*self.history, {"trigger": self.triggers, "rewards": dict(rewards),
                                        "promoted": promoted}][-HISTORY:]
        if self.rule == "halving":
            self._advance()

    def _rung_tries(self) -> int:
        """Rewards each running policy needs before rung ``k`` closes:
        ``max(burn_in, 1) · eta^k``."""
        return max(self.burn_in, 1) * self.eta ** self.rung

    def _advance(self) -> None:
        """Close every rung whose tries are done: keep the best ``⌈n / eta⌉``."""
        while len(self.active) > 1:
            need = self._rung_tries()
            if any(self.pulls.get(a, 0) < need for a in self.active):
                return
            keep = math.ceil(len(self.active) / self.eta)
            ranked = sorted(self.active, key=self.mean, reverse=True)
            self.active = [a for a in self.active if a in ranked[:keep]]
            self.rung += 1

    # ------------------------------------------------------------------ state
    def to_dict(self) -> dict[str, Any]:
        """The whole state as JSON-able values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PolicySelector:
        """The inverse of :meth:`to_dict`; unknown keys are ignored."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["pulls"] = {str(k): int(v) for k, v in dict(known.get("pulls", {})).items()}
        known["rewards"] = {str(k): float(v) for k, v in dict(known.get("rewards", {})).items()}
        return cls(**known)

    def report(self) -> dict[str, Any]:
        """For run reports: rule, trigger count, and each policy's tries and mean reward."""
        return {"rule": self.rule, "triggers": self.triggers, "incumbent": self.incumbent,
                "best": self.best(),
                **({"active": list(self.active), "rung": self.rung}
                   if self.rule == "halving" else {}),
                "policies": {a: {"tries": self.pulls[a], "mean_lift": round(self.mean(a), 6)}
                             for a in self.pulls}}
