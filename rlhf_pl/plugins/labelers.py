"""Labelers (plugin kind ``labelers``): the interface, the simulated ``rule`` labeler and ``human``.

A labeler ranks K completions of one prompt the way a person in the labelling app would, so that
RLHF can be studied without people (Gao et al.: a fixed "gold" labeler ranks samples, a proxy
reward model learns from its rankings). Interface (:class:`Labeler`)::

    rank(prompt, completions)  -> ((2,), (0, 3), (1,))   # completion indices, best group first;
                                                          # a group of several indices is a tie
    score(prompt, completion)  -> float                   # higher is better
    rank_batch(tasks)          -> [Ranking, ...]          # optional (BatchLabeler): many LabelTasks at once

Callers rank through :func:`rank_all` (``rank_batch`` when the labeler has it, else ``rank`` per
task), which checks every ranking it gets back: a plugin's mistake is a :class:`LabelerError`
naming the labeler and the task, not a silently wrong data set. A :class:`LabelTask` (built by
:func:`make_task`) carries a stable ``id``, a hash of the prompt's messages and the completions.

``human`` (:class:`rlhf_pl.plugins.human_labeler.HumanLabeler`, config
:class:`~rlhf_pl.plugins.labeler_specs.HumanLabelerConfig`) hands the tasks to people through a
directory (written and read atomically)::

    <queue_dir>/pending/<id>.json  {"id", "prompt": [{"role", "content"}, ...], "completions": [...],
                                    "meta": {...}, "origin": "..."}       written by rank_batch
    <queue_dir>/done/<id>.json     {"id", "ranking": [2, [0, 3], 1], "labeler": "<who>", ...}
                                    written by whoever ranks (the feedback app, python -m rlhf_pl.plugins.label_queue)

``ranking`` has the format of the data files' K-wise records (best first, an inner list is a tie),
except that one group (all K tie) is a valid answer here, as :func:`rank_all` allows it; it compares
nothing, so whoever writes a data set drops it. Writers must write answers atomically (a temp file
renamed over ``done/<id>.json``, as :func:`rlhf_pl.io.write_json` does): a half-written file is
reported as a bad answer. Nothing is ever moved or deleted: an answer in ``done/`` is used by every
later run that meets the same task.

Built-in ``rule`` (:class:`RuleLabeler`, config :class:`~rlhf_pl.plugins.labeler_specs.RuleLabelerConfig`)
scores a completion of a prompt of the embedded default task, whose ``prompt.meta`` holds
``{"task": ..., "answer": ...}`` (the machine-checkable truth for the last user turn):

**Is the answer given?** The rule depends on the form of ``meta["answer"]``:

* *numbers* (``"23000"``, ``"3, 17, 42"``): the completion's **last n numbers** equal the answer's n
  numbers, in order. Numbers are digit runs (``23000``, ``23,000`` with thousands commas, ``2.5``;
  a ``-`` directly before a number that does not follow a letter or digit makes it negative, so
  ``18-10`` is 18 and 10 but ``= -3`` is −3) and the words zero … twenty. So ``"6 * 3 = 18."``
  answers 18, ``"18 is the answer, not 17."`` does not.
* *spelled letters* (``"a-p-p-l-e"``): those letters in order, separated by dashes, spaces, commas
  or dots, not glued to other letters (case-insensitive): ``"A - P - P - L - E"`` counts, ``"apple"``
  does not.
* *text* (``"Santiago"``, ``"FRESH BREAD"``, ``"enigne"``): the answer's words appear as a
  contiguous run of the completion's words (words are runs of letters/digits, so punctuation and
  quotes do not matter); case-insensitive except for the tasks in ``case_sensitive_tasks``
  (``uppercase``, ``lowercase``), where ``"fresh bread"`` does not answer ``"FRESH BREAD"``.

**Then brevity and directness**, with the weights of the config (see
:mod:`rlhf_pl.plugins.labeler_specs` for the formula): a bonus when the answer starts within the
first ``direct_words`` words; penalties for words beyond ``max_words``, for repeated text (the
fraction of word trigrams that repeat an earlier one), for unfinished output (more than
``short_words`` words and no ``.``, ``!``, ``?`` or ``…`` at the end, possibly followed by closing
quotes/brackets; an empty completion counts as unfinished), and for non-English garbage (the
fraction of non-space characters outside printable ASCII and common typographic marks).

Scores are rounded to ``decimals`` places; completions with equal rounded scores are a tie. With
``noise > 0`` a prompt's ranking is, with that probability, replaced by a uniformly random
permutation (no ties) — simulated disagreeing labelers. The draw depends only on ``(seed, prompt,
completions)``, so a ranking is reproducible whatever order prompts are labelled in.
"""
from __future__ import annotations

import hashlib
import json
import logging
import numbers
import random
import re
from typing import Any, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

from rlhf_pl.data.formats import Message, Prompt
from rlhf_pl.errors import UserError
from rlhf_pl.plugins.labeler_specs import RuleLabelerConfig

KIND = "labelers"
Ranking = tuple[tuple[int, ...], ...]
log = logging.getLogger(__name__)


class LabelerError(UserError, ValueError):
    """A labeler cannot label this prompt or these completions."""


class LabelTask(NamedTuple):
    """K completions of one prompt to rank. ``id`` is stable: a hash of the prompt's messages and the
    completions (not of ``meta`` or ``origin``), so a re-run meets the same ids (see :func:`make_task`)."""

    id: str
    prompt: Prompt
    completions: tuple[str, ...]


def task_id(messages: Sequence[Message], completions: Sequence[str]) -> str:
    """16 hex digits of the sha256 of ``[[role, content], ...]`` and the completions."""
    key = json.dumps([[[m.role, m.content] for m in messages], list(completions)], ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def make_task(prompt: Prompt, completions: Sequence[str]) -> LabelTask:
    """The :class:`LabelTask` of K >= 1 completions (str) of ``prompt``."""
    if isinstance(completions, str) or len(completions) < 1:
        raise LabelerError(f"{prompt.origin}: expected a list of K >= 1 completions, got {completions!r:.80}")
    bad = [i for i, c in enumerate(completions) if not isinstance(c, str)]
    if bad:
        raise LabelerError(f"{prompt.origin}: completion {bad[0]} is a {type(completions[bad[0]]).__name__}, "
                           "expected a str")
    texts = tuple(completions)
    return LabelTask(task_id(prompt.messages, texts), prompt, texts)


@runtime_checkable
class Labeler(Protocol):
    """Interface of a labeler. Built as ``factory(config)`` from its plugin spec.

    A labeler may also have ``rank_batch(tasks)`` (:class:`BatchLabeler`), which :func:`rank_all`
    then uses instead of calling ``rank`` once per task.
    """

    def rank(self, prompt: Prompt, completions: list[str]) -> Ranking:
        """Groups of completion indices, best first; every index exactly once; a group of > 1 is a tie."""
        ...

    def score(self, prompt: Prompt, completion: str) -> float:
        """How good one completion is (higher is better); comparable across completions of a prompt."""
        ...


@runtime_checkable
class BatchLabeler(Labeler, Protocol):
    """A labeler that ranks many tasks at once (people, a remote service)."""

    def rank_batch(self, tasks: Sequence[LabelTask]) -> list[Ranking]:
        """One ranking per task, in task order (each as :meth:`Labeler.rank` would return it)."""
        ...


# --- checking rankings -----------------------------------------------------------------------


def _is_index(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def ranking_problem(ranking: Any, k: int) -> Optional[str]:
    """What is wrong with ``ranking`` as best-first groups of the indices 0..k-1, or None when nothing is.

    Groups are sequences (tuple or list) of ints; every index appears exactly once; at least one group.
    """
    if isinstance(ranking, (str, bytes)) or not isinstance(ranking, Sequence):
        return f"a sequence of groups, got a {type(ranking).__name__}"
    if len(ranking) == 0:
        return "at least one group"
    seen: dict[int, int] = {}
    for g, group in enumerate(ranking):
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence):
            return f"group {g} to be a tuple of indices, got {group!r:.40}"
        if len(group) == 0:
            return f"group {g} to be non-empty"
        for x in group:
            if not _is_index(x):
                return f"int indices, got {x!r:.40} ({type(x).__name__}) in group {g}"
            if not 0 <= x < k:
                return f"indices in 0..{k - 1}, got {x} in group {g}"
            if x in seen:
                return f"each index once, got {x} in group {seen[x]} and in group {g}"
            seen[int(x)] = g
    missing = [i for i in range(k) if i not in seen]
    if missing:
        return f"every index 0..{k - 1}, missing {', '.join(map(str, missing))}"
    return None


def check_ranking(ranking: Any, k: int, where: str, *, shown: Any = None) -> Ranking:
    """``ranking`` as a tuple of int tuples, or a :class:`LabelerError` that starts with ``where``
    (and shows ``shown``, default ``ranking``, as the bad value)."""
    problem = ranking_problem(ranking, k)
    if problem:
        got = ranking if shown is None else shown
        raise LabelerError(f"{where}: expected best-first groups of the completion indices 0..{k - 1}, each index "
                           f"exactly once (a group of several is a tie): {problem}; got {got!r:.200}")
    return tuple(tuple(int(x) for x in group) for group in ranking)


def ranking_from_json(value: Any, k: int, where: str) -> Ranking:
    """The data files' format (``[2, [0, 3], 1]``: an int is a group of one, a list a tie) as a :data:`Ranking`."""
    if not isinstance(value, list):
        raise LabelerError(f"{where}: expected a best-first list of the completion indices 0..{k - 1} "
                           f"(inner lists are ties), got {value!r:.200}")
    return check_ranking([item if isinstance(item, list) else [item] for item in value], k, where, shown=value)


def ranking_to_json(ranking: Ranking) -> list:
    """``((2,), (0, 3), (1,))`` -> ``[2, [0, 3], 1]`` (the data files' format)."""
    return [group[0] if len(group) == 1 else list(group) for group in ranking]


def _labeler_name(labeler: Any) -> str:
    return f"{type(labeler).__qualname__} ({type(labeler).__module__})"


def rank_all(labeler: Labeler, tasks: Sequence[LabelTask]) -> list[Ranking]:
    """Rankings of ``tasks`` in order, through ``labeler.rank_batch`` when it has one, else ``rank``
    per task; every ranking is checked (:func:`ranking_problem`), a bad one is a :class:`LabelerError`."""
    tasks = list(tasks)
    for task in tasks:
        if not isinstance(task, LabelTask):
            raise TypeError(f"rank_all takes LabelTasks (see make_task), got a {type(task).__name__}")
    name = _labeler_name(labeler)
    batch = getattr(labeler, "rank_batch", None)
    if callable(batch):
        rankings = batch(tasks)
        if isinstance(rankings, (str, bytes)) or not isinstance(rankings, Sequence) or len(rankings) != len(tasks):
            got = f"{len(rankings)} rankings" if isinstance(rankings, Sequence) else f"a {type(rankings).__name__}"
            raise LabelerError(f"labeler {name}: rank_batch of {len(tasks)} tasks must return a list of "
                               f"{len(tasks)} rankings, got {got}")
    else:
        rankings = [labeler.rank(task.prompt, list(task.completions)) for task in tasks]
    return [check_ranking(r, len(t.completions), f"labeler {name} ranked task {t.id} ({t.prompt.origin}, "
                          f"K = {len(t.completions)}) wrongly")
            for t, r in zip(tasks, rankings)]


# --- rankings --------------------------------------------------------------------------------


def ranking_from_scores(scores: Sequence[float]) -> Ranking:
    """Best-first groups of indices with equal scores, indices ascending inside a group.

    ``[1.0, 3.0, 1.0, 2.0]`` -> ``((1,), (3,), (0, 2))``.
    """
    order = sorted(set(scores), reverse=True)
    return tuple(tuple(i for i, s in enumerate(scores) if s == value) for value in order)


def noise_rng(seed: int, prompt: Prompt, completions: Sequence[str]) -> random.Random:
    """A random generator determined by ``(seed, prompt messages, completions)`` only."""
    key = json.dumps([seed, [[m.role, m.content] for m in prompt.messages], list(completions)], ensure_ascii=False)
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# --- answer matching -------------------------------------------------------------------------

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
_NUMBER = re.compile(
    r"(?<![\w.])(\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?)|\b(" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE
)
_NUMBERS_ANSWER = re.compile(r"^\s*-?\d+(?:\s*,\s*-?\d+)*\s*$")
_LETTERS_ANSWER = re.compile(r"^[A-Za-z](?:-[A-Za-z])+$")
_LETTER_SEPARATOR = r"[\s,.\-–—]+"
_WORD = re.compile(r"[^\W_]+")


class NumberToken(NamedTuple):
    value: float
    start: int  # character offset in the completion


class AnswerMatch(NamedTuple):
    """Whether a completion gives the answer, and where."""

    correct: bool
    start: Optional[int]  # character offset where the matched answer starts (None when not correct)
    rule: str  # "numbers" | "letters" | "text"


def answer_rule(answer: str) -> str:
    """Which matching rule applies to ``answer``: ``numbers``, ``letters`` or ``text``."""
    if _NUMBERS_ANSWER.match(answer):
        return "numbers"
    if _LETTERS_ANSWER.match(answer):
        return "letters"
    return "text"


def find_numbers(text: str) -> list[NumberToken]:
    """Numbers written in ``text`` (digits or the words zero … twenty), in order of appearance."""
    out = []
    for m in _NUMBER.finditer(text):
        if m.group(2) is not None:
            out.append(NumberToken(float(NUMBER_WORDS.index(m.group(2).lower())), m.start()))
            continue
        value = float(m.group(1).replace(",", ""))
        start = m.start()
        if start >= 1 and text[start - 1] == "-" and (start == 1 or not text[start - 2].isalnum()):
            value, start = -value, start - 1
        out.append(NumberToken(value, start))
    return out


def _match_numbers(answer: str, completion: str) -> AnswerMatch:
    wanted = [float(x) for x in answer.split(",")]
    found = find_numbers(completion)
    tail = found[-len(wanted):] if len(found) >= len(wanted) else []
    if tail and [t.value for t in tail] == wanted:
        return AnswerMatch(True, tail[0].start, "numbers")
    return AnswerMatch(False, None, "numbers")


def _match_letters(answer: str, completion: str) -> AnswerMatch:
    letters = answer.split("-")
    pattern = r"(?<![A-Za-z])" + _LETTER_SEPARATOR.join(re.escape(c) for c in letters) + r"(?![A-Za-z])"
    m = re.search(pattern, completion, re.IGNORECASE)
    return AnswerMatch(m is not None, m.start() if m else None, "letters")


def _match_text(answer: str, completion: str, case_sensitive: bool) -> AnswerMatch:
    fold = (lambda s: s) if case_sensitive else str.casefold
    wanted = [fold(w) for w in _WORD.findall(answer)]
    words = list(_WORD.finditer(completion))
    folded = [fold(w.group()) for w in words]
    n = len(wanted)
    for i in range(len(folded) - n + 1):
        if n and folded[i:i + n] == wanted:
            return AnswerMatch(True, words[i].start(), "text")
    return AnswerMatch(False, None, "text")


def match_answer(answer: str, completion: str, *, case_sensitive: bool = False) -> AnswerMatch:
    """Apply the rule for ``answer``'s form (module docstring) to ``completion``."""
    rule = answer_rule(answer)
    if rule == "numbers":
        return _match_numbers(answer, completion)
    if rule == "letters":
        return _match_letters(answer, completion)
    return _match_text(answer, completion, case_sensitive)


# --- quality features ------------------------------------------------------------------------

_CLOSED = re.compile(r"[.!?…][\"'’”)\]*_`]*$")
_TYPOGRAPHIC = set("‘’“”–—…°×÷")


def repetition_fraction(text: str) -> float:
    """Fraction of word trigrams (case-folded) that repeat an earlier trigram; 0 under 3 words."""
    words = text.casefold().split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def garbage_fraction(text: str) -> float:
    """Fraction of non-space characters outside printable ASCII and common typographic marks."""
    chars = [c for c in text if not c.isspace()]
    bad = sum(1 for c in chars if not (" " <= c <= "~" or c in _TYPOGRAPHIC))
    return bad / len(chars) if chars else 0.0


def is_unfinished(text: str, short_words: int) -> bool:
    """Empty, or more than ``short_words`` words without closing punctuation at the end."""
    stripped = text.strip()
    if not stripped:
        return True
    return len(stripped.split()) > short_words and not _CLOSED.search(stripped)


def _penalty(amount: float) -> float:
    """``-amount`` as a penalty (0.0, not -0.0, when there is nothing to take off)."""
    return -float(amount) if amount else 0.0


class ScoreBreakdown(NamedTuple):
    """The parts of one completion's score (points are signed: penalties are <= 0)."""

    correct: bool
    words: int
    answer: float  # +correct when the answer is given
    direct: float  # +direct when it is given within the first direct_words words
    length: float  # -length · words beyond max_words
    repetition: float  # -repetition · repeated trigram fraction
    unfinished: float  # -unfinished when the output stops mid-sentence (or is empty)
    garbage: float  # -garbage · non-English character fraction
    total: float  # sum, rounded to `decimals`


class Labeling(NamedTuple):
    """Everything :meth:`RuleLabeler.label` decided for one prompt's completions."""

    ranking: Ranking  # what rank() returns (after noise)
    scores: tuple[float, ...]  # (K,) rounded scores
    breakdowns: tuple[ScoreBreakdown, ...]  # (K,)
    noisy: bool  # True when the ranking was replaced by a random permutation


# --- the rule labeler ------------------------------------------------------------------------


class RuleLabeler:
    """Rule-based simulated labeler for the embedded default task (see the module docstring)."""

    def __init__(self, config: RuleLabelerConfig) -> None:
        if not isinstance(config, RuleLabelerConfig):
            raise LabelerError(f"labeler 'rule' expects a RuleLabelerConfig, got {type(config).__name__}")
        config.__post_init__()  # re-validate: the dataclass may have been mutated after construction
        self.config = config
        self._case_sensitive = frozenset(config.case_sensitive_tasks)

    def _truth(self, prompt: Prompt) -> tuple[str, bool]:
        """(answer, case_sensitive) from ``prompt.meta``; a prompt without an answer is an error."""
        answer = prompt.meta.get("answer")
        if answer is None or not str(answer).strip():
            raise LabelerError(
                f"{prompt.origin}: the rule labeler needs the prompt's answer in key 'answer' "
                f"(prompt.meta = {sorted(prompt.meta)}); it labels prompts of the embedded task "
                "(embedded:prompts) or data with 'task'/'answer' keys"
            )
        return str(answer).strip(), str(prompt.meta.get("task", "")) in self._case_sensitive

    def breakdown(self, prompt: Prompt, completion: str) -> ScoreBreakdown:
        """Every part of the score of one completion."""
        if not isinstance(completion, str):
            raise LabelerError(f"{prompt.origin}: a completion must be a str, got {type(completion).__name__}")
        c = self.config
        answer, case_sensitive = self._truth(prompt)
        match = match_answer(answer, completion, case_sensitive=case_sensitive)
        words = len(completion.split())
        early = match.correct and len(completion[: match.start].split()) < c.direct_words
        parts = (
            c.correct if match.correct else 0.0,
            c.direct if early else 0.0,
            _penalty(c.length * max(0, words - c.max_words)),
            _penalty(c.repetition * repetition_fraction(completion)),
            _penalty(c.unfinished if is_unfinished(completion, c.short_words) else 0.0),
            _penalty(c.garbage * garbage_fraction(completion)),
        )
        return ScoreBreakdown(match.correct, words, *parts, round(sum(parts), c.decimals))

    def score(self, prompt: Prompt, completion: str) -> float:
        """The rounded total score of one completion."""
        return self.breakdown(prompt, completion).total

    def label(self, prompt: Prompt, completions: Sequence[str]) -> Labeling:
        """Scores, breakdowns and the (possibly noise-replaced) ranking of K >= 1 completions."""
        if isinstance(completions, str) or len(completions) < 1:
            raise LabelerError(f"{prompt.origin}: expected a list of K >= 1 completions, got {completions!r:.80}")
        breakdowns = tuple(self.breakdown(prompt, text) for text in completions)
        scores = tuple(b.total for b in breakdowns)
        ranking, noisy = ranking_from_scores(scores), False
        if self.config.noise > 0:
            rng = noise_rng(self.config.seed, prompt, completions)
            if rng.random() < self.config.noise:
                order = list(range(len(completions)))
                rng.shuffle(order)
                ranking, noisy = tuple((i,) for i in order), True
        return Labeling(ranking, scores, breakdowns, noisy)

    def rank(self, prompt: Prompt, completions: list[str]) -> Ranking:
        """Best-first groups of completion indices (equal scores tie; see ``noise``)."""
        return self.label(prompt, completions).ranking

    def __repr__(self) -> str:
        return f"RuleLabeler(noise={self.config.noise}, seed={self.config.seed})"
