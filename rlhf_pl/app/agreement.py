"""Rankings with ties: merging several labelers' rankings, and how much labelers agree.

A ranking is a list of tie groups, best first, over completions ``0..k-1``: ``[[2], [0, 3], [1]]``
means 2 is best, 0 and 3 tie, 1 is worst. Pure functions, no database.

- :func:`merge`: the rule that turns the rankings of one task by several labelers into one (the
  human labeler hands it to collect; the export's ``merged`` mode writes it): every completion's
  **mean rank position** over the labelers (a tie group shares the mean of the positions it
  spans), then completions sorted by it, equal means tied. With one labeler it is that ranking.
- :func:`pairwise_agreement`: the fraction of the k(k−1)/2 completion pairs on which two rankings
  give the same verdict (better, worse or tie).
- :func:`kendall_tau_b`: Kendall's τ_b between two rankings (ties corrected), in [−1, 1]; None
  when it is undefined (a ranking that ties everything).
- :func:`agreement_report`: both, per labeler and overall, over every task ranked by two or more.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

Groups = Sequence[Sequence[int]]


def check_groups(groups: Groups, k: int) -> list[list[int]]:
    """``groups`` as lists of ints if they partition ``0..k-1`` into non-empty groups, else ValueError."""
    flat = [i for g in groups for i in g]
    if any(not g for g in groups) or sorted(flat) != list(range(k)) or not all(isinstance(i, int) for i in flat):
        raise ValueError(f"ranking {list(map(list, groups))!r} is not a ranking of completions 0..{k - 1} "
                         "(every index exactly once, in non-empty tie groups, best first)")
    return [list(g) for g in groups]


def positions(groups: Groups, k: int) -> list[float]:
    """Each completion's rank position (0 = best); a tie group shares the mean of its positions.
    ``[[2], [0, 3], [1]]`` -> ``[1.5, 3.0, 0.0, 1.5]``."""
    out = [0.0] * k
    start = 0
    for group in check_groups(groups, k):
        mean = start + (len(group) - 1) / 2
        for i in group:
            out[i] = mean
        start += len(group)
    return out


def verdicts(groups: Groups, k: int) -> list[int]:
    """For each pair i < j (in ``itertools.combinations`` order): +1 if i is ranked better, −1 if j, 0 if tied."""
    pos = positions(groups, k)
    return [(pos[j] > pos[i]) - (pos[j] < pos[i]) for i, j in itertools.combinations(range(k), 2)]


def pairwise_agreement(a: Groups, b: Groups, k: int) -> float:
    """Fraction of the completion pairs on which ``a`` and ``b`` give the same verdict."""
    va, vb = verdicts(a, k), verdicts(b, k)
    return sum(x == y for x, y in zip(va, vb)) / len(va)


def kendall_tau_b(a: Groups, b: Groups, k: int) -> Optional[float]:
    """τ_b = (C − D) / √((n0 − t_a)(n0 − t_b)) over the pairs: C concordant, D discordant, t_a / t_b
    the pairs tied in a / b, n0 all pairs. None when a denominator factor is 0."""
    va, vb = verdicts(a, k), verdicts(b, k)
    concordant = sum(x * y > 0 for x, y in zip(va, vb))
    discordant = sum(x * y < 0 for x, y in zip(va, vb))
    n0 = len(va)
    untied_a, untied_b = n0 - va.count(0), n0 - vb.count(0)
    if untied_a == 0 or untied_b == 0:
        return None
    return (concordant - discordant) / math.sqrt(untied_a * untied_b)


def merge(rankings: Sequence[Groups], k: int) -> list[list[int]]:
    """One ranking from several of the same k completions: sorted by mean rank position, equal means tied."""
    if not rankings:
        raise ValueError("merge needs at least one ranking")
    per = [positions(r, k) for r in rankings]
    mean = [sum(p[i] for p in per) / len(per) for i in range(k)]
    out: list[list[int]] = []
    for i in sorted(range(k), key=lambda i: (mean[i], i)):
        if out and math.isclose(mean[out[-1][0]], mean[i], abs_tol=1e-9):
            out[-1].append(i)
        else:
            out.append([i])
    return out


@dataclass(frozen=True)
class Agreement:
    """Agreement over ``pairs`` (labeler pairs on a shared task) from ``tasks`` shared tasks."""

    tasks: int
    pairs: int
    agreement: Optional[float]  # mean pairwise agreement (None: no pair)
    tau: Optional[float]  # mean Kendall τ_b over the pairs where it is defined (None: none)


@dataclass(frozen=True)
class AgreementReport:
    overall: Agreement
    per_labeler: dict[str, Agreement]  # each labeler against everyone who ranked the same tasks


def _summary(tasks: set[str], values: list[tuple[float, Optional[float]]]) -> Agreement:
    taus = [t for _, t in values if t is not None]
    return Agreement(tasks=len(tasks), pairs=len(values),
                     agreement=sum(a for a, _ in values) / len(values) if values else None,
                     tau=sum(taus) / len(taus) if taus else None)


def agreement_report(answers: Mapping[str, Mapping[str, Groups]], ks: Mapping[str, int]) -> AgreementReport:
    """``answers``: task id -> labeler -> ranking; ``ks``: task id -> k. Tasks with one ranking are ignored."""
    overall: list[tuple[float, Optional[float]]] = []
    shared: set[str] = set()
    mine: dict[str, list[tuple[float, Optional[float]]]] = {}
    my_tasks: dict[str, set[str]] = {}
    for task, by_labeler in answers.items():
        if len(by_labeler) < 2:
            continue
        shared.add(task)
        for (u, a), (v, b) in itertools.combinations(sorted(by_labeler.items()), 2):
            value = (pairwise_agreement(a, b, ks[task]), kendall_tau_b(a, b, ks[task]))
            overall.append(value)
            for who in (u, v):
                mine.setdefault(who, []).append(value)
                my_tasks.setdefault(who, set()).add(task)
    return AgreementReport(_summary(shared, overall),
                           {who: _summary(my_tasks[who], values) for who, values in sorted(mine.items())})
