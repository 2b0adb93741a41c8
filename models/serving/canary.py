"""The canary's pure maths (torch-free): which users see the candidate, and whether the
candidate's online hit rate was worse than the serving version's.

* **Who sees the candidate** (:func:`in_canary`): a user is in the canary when the first
  8 bytes of ``blake2b(salt ":" user_id)``, read as a number in [0, 1), fall below the
  share. The salt is the candidate's version, so a user stays in one arm for the whole
  canary (sticky) while each canary draws its own users.
* **Whether it did worse** (:func:`one_sided_z`, :func:`judge_canary`): a list is *judged*
  by its user's next interaction within the attribution window — a *hit* when that
  interaction is on an item of the list. The online hit rate of a version is hits /
  judged lists. The candidate is rolled back when a one-sided pooled two-proportion
  z-test finds its hit rate lower than the serving version's at the configured
  confidence; otherwise it is promoted (not worse, which includes "no difference seen").
  A candidate with fewer judged lists than the minimum is not judged yet.

Limits, said where they matter (docs/model.md, "The canary"): lists of one user are not
independent (a heavy user's lists share their taste), so the test's variance is an
under-estimate and its false alarms somewhat more frequent than ``1 − confidence``; and
"not worse" is not "better": a candidate that is a little worse passes when the window is
too short to see it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

_SCALE = float(1 << 64)


def canary_bucket(user_id: str, salt: str) -> float:
    """The user's place in [0, 1) for the canary salted ``salt`` (uniform, stable).

    >>> canary_bucket("u1", "v00003") == canary_bucket("u1", "v00003")
    True
    >>> 0.0 <= canary_bucket("u1", "v00003") < 1.0
    True
    """
    digest = hashlib.blake2b(f"{salt}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def in_canary(user_id: str, share: float, salt: str) -> bool:
    """Whether ``user_id`` is served the candidate of the canary salted ``salt``.

    >>> users = [f"u{i}" for i in range(10_000)]
    >>> round(sum(in_canary(u, 0.1, "v00003") for u in users) / len(users), 2)
    0.1
    >>> in_canary("u1", 0.0, "v00003"), in_canary("u1", 1.0, "v00003")
    (False, True)
    """
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    return canary_bucket(user_id, salt) < share


def normal_cdf(z: float) -> float:
    """Φ(z), the standard normal distribution function: ``½ · erfc(−z / √2)``.

    >>> round(normal_cdf(0.0), 3), round(normal_cdf(-1.6449), 3)
    (0.5, 0.05)
    """
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def one_sided_z(hits_c: int, n_c: int, hits_s: int, n_s: int) -> tuple[float, float]:
    """The pooled two-proportion z statistic of candidate c against serving s, and its
    one-sided p-value for "the candidate's hit rate is lower":

        p̂_c = h_c / n_c,  p̂_s = h_s / n_s,  p̂ = (h_c + h_s) / (n_c + n_s)
        z = (p̂_c − p̂_s) / sqrt(p̂ (1 − p̂) (1/n_c + 1/n_s)),   p-value = Φ(z)

    (H0: p_c ≥ p_s, H1: p_c < p_s; a small p-value says the candidate is worse). With no
    spread at all (every list a hit, or none) the rates are equal: z = 0, p-value ½.

    >>> z, p = one_sided_z(30, 200, 300, 1000)
    >>> round(z, 3), round(p, 4)
    (-4.337, 0.0)
    >>> z, p = one_sided_z(62, 200, 300, 1000)
    >>> round(z, 3), round(p, 3)
    (0.281, 0.611)
    >>> one_sided_z(5, 5, 10, 10)
    (0.0, 0.5)
    """
    if n_c <= 0 or n_s <= 0:
        raise ValueError("both arms need judged lists")
    p_c, p_s = hits_c / n_c, hits_s / n_s
    pooled = (hits_c + hits_s) / (n_c + n_s)
    var = pooled * (1.0 - pooled) * (1.0 / n_c + 1.0 / n_s)
    if var <= 0.0:
        return 0.0, 0.5
    z = (p_c - p_s) / math.sqrt(var)
    return z, normal_cdf(z)


@dataclass(frozen=True)
class CanaryVerdict:
    """What the online check decided, with its figures (kept in the manifest)."""

    decision: str
    """``promote``, ``roll_back`` or ``wait`` (too few judged lists yet)."""
    code: str
    """``not_worse``, ``worse``, ``too_few_lists``."""
    reason: str
    candidate_hits: int
    candidate_lists: int
    serving_hits: int
    serving_lists: int
    z: float | None = None
    p_value: float | None = None
    confidence: float = 0.95

    @property
    def candidate_rate(self) -> float | None:
        return self.candidate_hits / self.candidate_lists if self.candidate_lists else None

    @property
    def serving_rate(self) -> float | None:
        return self.serving_hits / self.serving_lists if self.serving_lists else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["candidate_rate"] = _round(self.candidate_rate)
        out["serving_rate"] = _round(self.serving_rate)
        out["z"] = _round(self.z)
        out["p_value"] = _round(self.p_value)
        return out


def judge_canary(candidate: tuple[int, int], serving: tuple[int, int], *,
                 confidence: float, min_lists: int, final: bool) -> CanaryVerdict:
    """Judge a canary from (hits, judged lists) of the candidate and of the serving
    version over the canary's window: ``roll_back`` when :func:`one_sided_z` finds the
    candidate worse (p-value < 1 − ``confidence``), else ``promote``. With fewer than
    ``min_lists`` judged lists in either arm the verdict is ``wait``, or ``roll_back``
    when ``final`` (the canary ran out of time: a version nobody could judge online is
    not promoted).

    >>> v = judge_canary((30, 200), (300, 1000), confidence=0.95, min_lists=100,
    ...                  final=False)
    >>> v.decision, v.code, round(v.z, 2)
    ('roll_back', 'worse', -4.34)
    >>> print(v.reason)  # doctest: +NORMALIZE_WHITESPACE
    worse online: hit rate 0.150 (30/200) vs 0.300 (300/1000) of the serving version,
    z = -4.34, one-sided p = 0.0000 < 0.050
    >>> judge_canary((62, 200), (300, 1000), confidence=0.95, min_lists=100,
    ...              final=False).decision
    'promote'
    >>> v = judge_canary((6, 20), (300, 1000), confidence=0.95, min_lists=100, final=False)
    >>> v.decision, judge_canary((6, 20), (300, 1000), confidence=0.95, min_lists=100,
    ...                          final=True).code
    ('wait', 'too_few_lists')
    """
    (h_c, n_c), (h_s, n_s) = candidate, serving

    def verdict(decision: str, code: str, reason: str, z: float | None = None,
                p: float | None = None) -> CanaryVerdict:
        return CanaryVerdict(decision, code, reason, h_c, n_c, h_s, n_s, z=z, p_value=p,
                             confidence=confidence)

    if min(n_c, n_s) < min_lists:
        short, n = ("the candidate", n_c) if n_c < min_lists else ("the serving version", n_s)
        return verdict("roll_back" if final else "wait", "too_few_lists",
                       f"too few judged lists online: {short} has {n} < {min_lists}")
    z, p = one_sided_z(h_c, n_c, h_s, n_s)
    alpha = 1.0 - confidence
    rates = (f"hit rate {h_c / n_c:.3f} ({h_c}/{n_c}) vs {h_s / n_s:.3f} ({h_s}/{n_s}) "
             f"of the serving version, z = {z:.2f}, one-sided p = {p:.4f}")
    if p < alpha:
        return verdict("roll_back", "worse", f"worse online: {rates} < {alpha:.3f}", z, p)
    return verdict("promote", "not_worse", f"not worse online: {rates} ≥ {alpha:.3f}", z, p)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)
