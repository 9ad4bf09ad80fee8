"""Specs of the built-in labelers (entry-point group ``rlhf_pl.labelers``): ``rule`` (simulated) and ``human``.

Light on purpose: the config dataclass and the :class:`~rlhf_pl.registry.PluginSpec` only (no
torch). The labeler itself lives in :mod:`rlhf_pl.plugins.labelers` and is imported when one is
selected (``labeler=rule labeler.noise=0.1``). The ranges are field metadata, checked when the
config is composed (:func:`rlhf_pl.config.validate_config`); the config also validates itself when
it is built (``OmegaConf.to_object`` calls ``__post_init__``). Errors name the offending key, the
bad value and the valid range.

The ``rule`` labeler's score of one completion (see :mod:`rlhf_pl.plugins.labelers` for the
answer-matching rule)::

    score =  correct             if the prompt's answer is given (meta["answer"])
           + direct              if, in addition, it is given within the first direct_words words
           - length     · max(0, words - max_words)
           - repetition · (fraction of repeated word trigrams)
           - unfinished          if more than short_words words and no closing punctuation at the end
           - garbage    · (fraction of characters that are not plain English text)

rounded to ``decimals`` places; equal rounded scores are ties.

The ``human`` labeler (:class:`HumanLabelerConfig`) hands each task to people: with ``database_url``
to the feedback app's database (its Rank page, ``overlap`` labelers per task, rankings merged), else
to a file queue, ``<queue_dir>/pending/<id>.json``, answered into ``<queue_dir>/done/<id>.json``
(``python -m rlhf_pl.plugins.label_queue <queue_dir>``); see :class:`rlhf_pl.plugins.human_labeler.HumanLabeler`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from rlhf_pl.config import setting
from rlhf_pl.registry import PluginSpec

_GROUP = "labeler"


def _require(ok: bool, key: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{_GROUP}.{key} must be {rule}, got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class RuleLabelerConfig:
    """A transparent rule-based simulated labeler for the embedded default task (Gao et al.'s
    "gold" labeler): correctness first, then brevity and directness. Weights are points of score."""

    correct: float = setting(4.0, ge=0)  # points for giving the prompt's answer (meta["answer"]); dominates the rest
    direct: float = setting(0.5, ge=0)  # extra points when the answer comes within the first `direct_words` words
    direct_words: int = setting(12, ge=1)  # how early (in words) a direct answer must appear
    max_words: int = setting(15, ge=1)  # words allowed before the length penalty starts (a right answer takes 1-10)
    length: float = setting(0.05, ge=0)  # penalty per word beyond max_words (48 tokens ≈ 35 words: at most ~1)
    repetition: float = setting(2.0, ge=0)  # penalty × fraction of word trigrams that repeat an earlier trigram
    unfinished: float = setting(1.0, ge=0)  # penalty for an answer that stops mid-sentence (see short_words)
    short_words: int = setting(6, ge=1)  # answers up to this many words need no closing punctuation ("FRESH BREAD")
    garbage: float = setting(3.0, ge=0)  # penalty × fraction of characters that are not plain English text
    decimals: int = setting(2, ge=0, le=6)  # scores are rounded to this many decimals; equal rounded scores tie
    # tasks whose text answers must match in case
    case_sensitive_tasks: List[str] = field(default_factory=lambda: ["uppercase", "lowercase"])
    noise: float = setting(0.0, ge=0, le=1)  # chance a prompt's ranking is replaced by a uniformly random permutation
    seed: int = 0  # seeds the noise; the draw for a prompt depends only on (seed, prompt, completions)

    def __post_init__(self) -> None:
        for key in ("correct", "direct", "length", "repetition", "unfinished", "garbage"):
            value = getattr(self, key)
            _require(_is_number(value) and value >= 0, key, value, "a finite number >= 0")
        for key in ("direct_words", "max_words", "short_words"):
            value = getattr(self, key)
            _require(_is_int(value) and value >= 1, key, value, "an integer >= 1")
        _require(_is_int(self.decimals) and 0 <= self.decimals <= 6, "decimals", self.decimals, "an integer in [0, 6]")
        _require(_is_number(self.noise) and 0.0 <= self.noise <= 1.0, "noise", self.noise, "in [0, 1]")
        _require(_is_int(self.seed), "seed", self.seed, "an integer")
        tasks = list(self.case_sensitive_tasks)
        _require(all(isinstance(t, str) and t for t in tasks), "case_sensitive_tasks", tasks, "a list of task names")


RULE = PluginSpec(
    "rule", RuleLabelerConfig, "rlhf_pl.plugins.labelers:RuleLabeler",
    "rule-based simulated labeler for the embedded task: correct answer, then brevity/directness; label noise",
)


@dataclass
class HumanLabelerConfig:
    """People rank the completions. Two ways, chosen by ``database_url``:

    - ``database_url: null`` — a file queue: tasks wait in ``<queue_dir>/pending``, answers land in
      ``<queue_dir>/done`` and stay there, so re-running the same command picks them up.
    - ``database_url`` set (``labeler.database_url=sqlite:///outputs/app/app.db``, or the
      ``postgresql://…`` URL of the feedback app's database) — the tasks go to the feedback app's Rank
      page, in queue ``queue``, each to ``overlap`` different labelers; their rankings are merged by
      mean rank position. Rankings stay in the database: re-running picks them up too.
    """

    # the queue directory; a relative path is relative to the current directory (Hydra does not chdir),
    # e.g. labeler.queue_dir='${paths.output_root}/label_queue' keeps it beside the runs
    queue_dir: str = "label_queue"
    # seconds rank_batch waits for all answers before it fails naming what is still pending (answers are
    # kept); 0 = do not wait: use the answers already given, fail for the rest
    timeout_s: float = setting(3600.0, ge=0)
    poll_s: float = setting(1.0, gt=0, le=60)  # seconds between two looks into <queue_dir>/done (or the database)
    # null: the file queue above; else the feedback app's database URL (sqlite:///<file> or postgresql://...)
    database_url: Optional[str] = None
    overlap: int = setting(1, ge=1, le=16)  # with database_url: labelers per task (each a different person)
    # with database_url: the queue name the app shows; null: the run directory's name (else "collect")
    queue: Optional[str] = None

    def __post_init__(self) -> None:
        _require(isinstance(self.queue_dir, str) and bool(self.queue_dir.strip()), "queue_dir", self.queue_dir,
                 "a non-empty path")
        _require(_is_number(self.timeout_s) and self.timeout_s >= 0, "timeout_s", self.timeout_s,
                 "a finite number >= 0")
        _require(_is_number(self.poll_s) and 0 < self.poll_s <= 60, "poll_s", self.poll_s, "in (0, 60]")
        _require(self.database_url is None or (isinstance(self.database_url, str) and bool(self.database_url.strip())),
                 "database_url", self.database_url, "null (the file queue) or a database URL such as "
                 "sqlite:///outputs/app/app.db or postgresql://user@host/db")
        _require(_is_int(self.overlap) and 1 <= self.overlap <= 16, "overlap", self.overlap, "an integer in [1, 16]")
        _require(self.queue is None or (isinstance(self.queue, str) and 1 <= len(self.queue.strip()) <= 200),
                 "queue", self.queue, "null or a name of 1 to 200 characters")


HUMAN = PluginSpec(
    "human", HumanLabelerConfig, "rlhf_pl.plugins.human_labeler:HumanLabeler",
    "people rank: in the feedback app (labeler.database_url=<its database>) or a file queue (<queue_dir>)",
)
