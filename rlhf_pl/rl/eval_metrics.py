"""The math of evaluation against a gold labeler: win rates, best-of-n, and Gao et al.'s
over-optimisation forms. Plain floats and sequences; no models.

- best-of-n: of n samples from the initial policy, keep the one the proxy reward model scores
  highest. Its KL to the initial policy is exactly ``log n − (n − 1)/n`` (Stiennon et al. 2020,
  appendix; Gao et al. 2022), whatever the reward model.
- Gao et al. (2022) fit the gold score's change against ``d = √KL``: ``d (α − β d)`` for best-of-n
  and ``d (α − β log d)`` for RL. Both are linear in (α, β), so they are fitted by least squares.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple


def best_of_n_kl(n: int) -> float:
    """KL (nats) of best-of-n sampling to the sampled policy: log n − (n − 1)/n; 0 for n = 1."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n(proxy: Sequence[Sequence[float]], gold: Sequence[Sequence[float]], n: int) -> float:
    """Mean over prompts of the gold score of the proxy-best of each prompt's first ``n`` samples
    (ties: the first). Shapes: P lists of ≥ n proxy scores and the P lists of their gold scores."""
    if not proxy or len(proxy) != len(gold):
        raise ValueError(f"best_of_n needs equally many proxy and gold rows (>= 1), got {len(proxy)} and {len(gold)}")
    picked = []
    for p, g in zip(proxy, gold):
        if len(p) < n or len(g) < n:
            raise ValueError(f"best-of-{n} needs >= {n} samples per prompt, got {min(len(p), len(g))}")
        best = max(range(n), key=lambda i: p[i])
        picked.append(g[best])
    return sum(picked) / len(picked)


def win_rate(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """Fraction of prompts on which ``ours`` scores higher than ``theirs``, ties counted half."""
    if not ours or len(ours) != len(theirs):
        raise ValueError(f"win_rate needs two equally long non-empty score lists, got {len(ours)} and {len(theirs)}")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs)) / len(ours)


class PairedGain(NamedTuple):
    """Mean per-prompt difference of two policies' figures on the same prompts, the half-width of its
    95% interval (None from a single prompt) and the number of prompts."""

    mean: float
    ci: float | None
    prompts: int


def paired_gain(ours: Sequence[float], theirs: Sequence[float]) -> PairedGain:
    """Mean of ``ours[i] − theirs[i]`` over prompts with the normal-approximation 95% interval
    1.96·s/√P, s the sample standard deviation of the differences. Pairing takes the prompts'
    difficulty out of the interval: two policies right on the same prompts differ by exactly 0 ± 0,
    where their separate intervals (each ±0.12 on 64 prompts) would overlap whatever they do.
    Shapes: two lists of P figures of the same prompts (e.g. 0/1: greedy answer correct)."""
    if not ours or len(ours) != len(theirs):
        raise ValueError(f"paired_gain needs two equally long non-empty lists, got {len(ours)} and {len(theirs)}")
    diffs = [a - b for a, b in zip(ours, theirs)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return PairedGain(mean, None, 1)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return PairedGain(mean, 1.96 * math.sqrt(var / len(diffs)), len(diffs))


def pairwise_agreement(proxy: Sequence[Sequence[float]], gold: Sequence[Sequence[float]]) -> tuple[float, int]:
    """How often the proxy orders two answers to the same prompt as the gold labeler does: over
    every pair with different gold scores, the fraction the proxy puts the gold-better one above
    (a proxy tie counts half) — the reward model's accuracy on on-policy comparisons it never saw.
    Shapes: P lists of answers' proxy scores and the P lists of their gold scores. Returns
    (accuracy, pairs); (nan, 0) when no pair differs in gold."""
    if len(proxy) != len(gold):
        raise ValueError(f"pairwise_agreement needs equally many proxy and gold rows, got {len(proxy)} and {len(gold)}")
    agree, pairs = 0.0, 0
    for p, g in zip(proxy, gold):
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                if g[i] == g[j]:
                    continue
                pairs += 1
                diff = (p[i] - p[j]) * (1 if g[i] > g[j] else -1)
                agree += 1.0 if diff > 0 else 0.5 if diff == 0 else 0.0
    return (agree / pairs, pairs) if pairs else (math.nan, 0)


class GaoFit(NamedTuple):
    """``gain(d) = d (alpha − beta f(d))`` with f(d) = d (best-of-n) or log d (RL); ``d = √KL``."""

    form: str  # "bon" | "rl"
    alpha: float
    beta: float
    points: int

    def gain(self, d: float) -> float:
        if d <= 0:
            return 0.0
        return d * (self.alpha - self.beta * (d if self.form == "bon" else math.log(d)))


def fit_gao(d: Sequence[float], gain: Sequence[float], form: str) -> GaoFit | None:
    """Least-squares α, β of ``gain ≈ α d − β d f(d)`` over the points with d > 0 (the form passes
    through 0 at d = 0). None with fewer than 2 such points (nothing to fit)."""
    if form not in ("bon", "rl"):
        raise ValueError(f"form={form!r}; valid: bon, rl")
    pts = [(x, y) for x, y in zip(d, gain) if x > 0]
    if len(pts) < 2:
        return None
    f = (lambda x: x) if form == "bon" else math.log
    a = [(x, -x * f(x)) for x, _ in pts]  # columns: α, β
    s11 = sum(u * u for u, _ in a)
    s12 = sum(u * v for u, v in a)
    s22 = sum(v * v for _, v in a)
    t1 = sum(u * y for (u, _), (_, y) in zip(a, pts))
    t2 = sum(v * y for (_, v), (_, y) in zip(a, pts))
    det = s11 * s22 - s12 * s12
    if abs(det) < 1e-12:
        return None
    return GaoFit(form, (s22 * t1 - s12 * t2) / det, (s11 * t2 - s12 * t1) / det, len(pts))
