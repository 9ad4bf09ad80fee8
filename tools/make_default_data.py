"""Generate the embedded default task shipped in ``rlhf_pl/data/default/``.

Small, checkable assistant tasks that a tiny model can learn: arithmetic, word games, sorting,
capital cities, unit conversion, changing case. Every answer is short and exact, so a rule-based
labeler can score samples without people.

Files (JSON lines, written atomically, a deterministic function of ``--seed``):

- ``demonstrations.jsonl``: ``{"id", "messages": [...], "tasks": [...], "careless": [...]}`` conversations
  for SFT (about 20% multi-turn, some with a system message). ``tasks`` names the task of each user turn.
  Like real demonstrations they are not all right: for five tasks (``CARELESS``: kilometres, kilograms
  and litres converted, upper- and lower-casing), ``CARELESS_FRACTION`` of the turns carry a careless
  trainer's systematic mistake (``×100`` for ``×1000``, ``Fresh Bread`` for ``FRESH BREAD``, ``Fresh
  bread`` for ``fresh bread``), listed in ``careless`` (turn indices; the key is left out when there are
  none). These tasks are drawn most often (``WEIGHTS``). The SFT policy learns the mistakes along with
  the rest; the labeler's rankings of its own samples are what can teach it out of them, as in
  InstructGPT, where ranking answers is easier than writing them.
- ``prompts.jsonl``: ``{"id", "prompt": "..." | "messages": [...], "task", "answer", "phrasing"}`` for
  sampling and RL. ``task``/``answer`` are the machine-checkable truth for the last user turn. No
  prompt appears in the demonstrations (not as a first question, nor as any conversation prefix).
  Half of the single-turn ones are asked in an "rl" paraphrase (``phrasing: paraphrase``): words
  the demonstrations never use, where the SFT policy is unsure, so that its samples differ and
  rankings of them carry signal.
- ``eval_prompts.jsonl``: the held-out split no stage trains on, ``{"id", "prompt", "task", "answer",
  "phrasing"}``: alternately ``template`` (the training phrasings, new instances) and
  ``paraphrase`` (the same tasks in "eval" paraphrases: words no demonstration or prompt uses —
  does what the policy learnt generalise?). No question of it is in the demonstrations or prompts.

Usage::

    python tools/make_default_data.py            # (re)write the files
    python tools/make_default_data.py --check    # exit 1 if the shipped files are not up to date
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

OUT_DIR = Path(__file__).resolve().parent.parent / "rlhf_pl" / "data" / "default"
NUM_DEMONSTRATIONS = 400
NUM_PROMPTS = 300
NUM_EVAL_PROMPTS = 128  # half of each phrasing, alternating
RL_PARAPHRASE_FRACTION = 0.5  # of the single-turn prompts, asked in an "rl" paraphrase
MULTI_TURN_FRACTION = 0.2
SYSTEM_FRACTION = 0.15
CARELESS_FRACTION = 0.4  # of the demonstration turns of a task in CARELESS, written by a careless trainer

CAPITALS: dict[str, str] = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra",
    "Russia": "Moscow", "India": "New Delhi", "Mexico": "Mexico City", "Kenya": "Nairobi",
    "Greece": "Athens", "Portugal": "Lisbon", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Ireland": "Dublin", "Poland": "Warsaw", "Austria": "Vienna",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Thailand": "Bangkok", "South Korea": "Seoul",
    "Turkey": "Ankara", "the Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Denmark": "Copenhagen", "Hungary": "Budapest", "Cuba": "Havana", "Chile": "Santiago",
    "the United Kingdom": "London", "Switzerland": "Bern", "Iceland": "Reykjavik",
}
WORDS = (
    "apple banana garden river planet pencil window orange yellow guitar rabbit castle summer winter "
    "forest bridge candle dragon silver marble pepper ladder mirror rocket butter coffee tiger "
    "button cookie flower island jacket kitten lemon monkey number paper pillow pocket puzzle "
    "school spider sugar ticket turtle violin wallet zebra cherry basket dinner letter bottle "
    "cotton doctor engine finger hammer honey"
).split()
PHRASES = (
    "good morning", "hello world", "see you soon", "thank you", "happy birthday", "red apple",
    "blue sky", "quiet night", "fresh bread", "open the door", "big green tree", "cold water",
    "fast car", "little cat", "warm sunny day", "new book", "sweet dreams", "well done",
    "green tea", "north wind", "old map", "bright star", "lazy dog", "paper boat",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one short sentence.",
    "You are a friendly tutor who gives short, exact answers.",
    "Answer the user's question directly and correctly.",
)


@dataclass(frozen=True)
class Turn:
    """One question with its exact answer. ``answer`` is what a labeler checks."""

    question: str
    reply: str
    task: str
    answer: str


@dataclass
class Family:
    """A kind of task: how to ask a first question and how to follow up on the previous turn."""

    name: str
    first: Callable[[random.Random], tuple[Turn, dict]]
    follow: Callable[[random.Random, dict], tuple[Turn, dict]]


# --- arithmetic ---------------------------------------------------------------------------------


def _add_turn(a: int, b: int, question: str) -> Turn:
    return Turn(question, f"{a} + {b} = {a + b}.", "add", str(a + b))


def _sub_turn(a: int, b: int, question: str) -> Turn:
    return Turn(question, f"{a} - {b} = {a - b}.", "subtract", str(a - b))


def _mul_turn(a: int, b: int, question: str) -> Turn:
    return Turn(question, f"{a} * {b} = {a * b}.", "multiply", str(a * b))


def arithmetic_follow(rng: random.Random, state: dict) -> tuple[Turn, dict]:
    """'Now add/subtract/multiply ... that.' on the previous result."""
    prev = state["value"]
    kind = rng.choice(["add", "subtract", "multiply"] if prev > 10 else ["add", "multiply"])
    if kind == "add":
        k = rng.randint(2, 20)
        turn = _add_turn(prev, k, rng.choice([f"Now add {k} to that.", f"And if you add {k}?"]))
    elif kind == "subtract":
        k = rng.randint(1, min(prev - 1, 20))
        turn = _sub_turn(prev, k, rng.choice([f"Now subtract {k} from that.", f"And if you take away {k}?"]))
    else:
        k = rng.randint(2, 5)
        turn = _mul_turn(prev, k, rng.choice([f"Now multiply that by {k}.", f"And {k} times that?"]))
    return turn, {"value": int(turn.answer)}


def add_first(rng: random.Random) -> tuple[Turn, dict]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    q = rng.choice([f"What is {a} + {b}?", f"Add {a} and {b}.", f"Compute {a} plus {b}.",
                    f"What is the sum of {a} and {b}?"])
    return _add_turn(a, b, q), {"value": a + b}


def subtract_first(rng: random.Random) -> tuple[Turn, dict]:
    a = rng.randint(10, 99)
    b = rng.randint(1, a - 1)
    q = rng.choice([f"What is {a} - {b}?", f"Subtract {b} from {a}.", f"Compute {a} minus {b}.",
                    f"What is {a} take away {b}?"])
    return _sub_turn(a, b, q), {"value": a - b}


def multiply_first(rng: random.Random) -> tuple[Turn, dict]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    q = rng.choice([f"What is {a} times {b}?", f"Multiply {a} by {b}.", f"What is {a} * {b}?",
                    f"Compute the product of {a} and {b}."])
    return _mul_turn(a, b, q), {"value": a * b}


# --- words --------------------------------------------------------------------------------------


def _other_word(rng: random.Random, state: dict) -> str:
    return rng.choice([w for w in WORDS if w != state["word"]])


def _reverse_turn(rng: random.Random, word: str) -> Turn:
    q = rng.choice([f"Reverse the word '{word}'.", f"Write '{word}' backwards.",
                    f"What is '{word}' spelled backwards?"])
    return Turn(q, f"'{word}' reversed is '{word[::-1]}'.", "reverse", word[::-1])


def _spell_turn(rng: random.Random, word: str) -> Turn:
    spelled = "-".join(word)
    q = rng.choice([f"Spell '{word}' letter by letter.", f"Spell the word '{word}' with dashes between the letters."])
    return Turn(q, f"{word} is spelled {spelled}.", "spell", spelled)


def _length_turn(rng: random.Random, word: str) -> Turn:
    q = rng.choice([f"How many letters are in the word '{word}'?", f"How long is the word '{word}'?"])
    return Turn(q, f"The word '{word}' has {len(word)} letters.", "word_length", str(len(word)))


def _count_letter_turn(rng: random.Random, word: str) -> Turn:
    present = sorted(set(word))
    letter = (rng.choice(present) if rng.random() < 0.85
              else rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c not in word]))
    n = word.count(letter)
    q = rng.choice([f"How many times does the letter '{letter}' appear in '{word}'?",
                    f"Count the letter '{letter}' in the word '{word}'."])
    times = "time" if n == 1 else "times"
    return Turn(q, f"The letter '{letter}' appears {n} {times} in '{word}'.", "count_letter", str(n))


WORD_TURNS = {"reverse": _reverse_turn, "spell": _spell_turn, "word_length": _length_turn,
              "count_letter": _count_letter_turn}


def word_family(task: str) -> Family:
    """A word task; the follow-up asks the same for another word ('Now do the same for ...')."""
    make = WORD_TURNS[task]

    def first(rng: random.Random) -> tuple[Turn, dict]:
        word = rng.choice(WORDS)
        return make(rng, word), {"word": word}

    def follow(rng: random.Random, state: dict) -> tuple[Turn, dict]:
        word = _other_word(rng, state)
        base = make(rng, word)
        if task == "count_letter":  # the letter differs per turn: ask the full question again
            return base, {"word": word}
        q = rng.choice([f"Now do the same for '{word}'.", f"And for '{word}'?"])
        return Turn(q, base.reply, base.task, base.answer), {"word": word}

    return Family(task, first, follow)


# --- lists, facts, units, case ------------------------------------------------------------------


def _fmt(numbers: list[int]) -> str:
    return ", ".join(str(n) for n in numbers)


def sort_first(rng: random.Random) -> tuple[Turn, dict]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    if rng.random() < 0.7:
        q = rng.choice([f"Sort these numbers from smallest to largest: {_fmt(numbers)}.",
                        f"Put {_fmt(numbers)} in ascending order."])
        asc = sorted(numbers)
        return (Turn(q, f"From smallest to largest: {_fmt(asc)}.", "sort_ascending", _fmt(asc)),
                {"numbers": numbers, "order": "asc"})
    q = rng.choice([f"Sort these numbers from largest to smallest: {_fmt(numbers)}.",
                    f"Put {_fmt(numbers)} in descending order."])
    desc = sorted(numbers, reverse=True)
    return (Turn(q, f"From largest to smallest: {_fmt(desc)}.", "sort_descending", _fmt(desc)),
            {"numbers": numbers, "order": "desc"})


def sort_follow(rng: random.Random, state: dict) -> tuple[Turn, dict]:
    """Sort the same numbers the other way round."""
    numbers = state["numbers"]
    if state["order"] == "asc":
        desc = sorted(numbers, reverse=True)
        turn = Turn("Now sort them from largest to smallest.", f"From largest to smallest: {_fmt(desc)}.",
                    "sort_descending", _fmt(desc))
        return turn, {"numbers": numbers, "order": "desc"}
    asc = sorted(numbers)
    turn = Turn("Now sort them from smallest to largest.", f"From smallest to largest: {_fmt(asc)}.",
                "sort_ascending", _fmt(asc))
    return turn, {"numbers": numbers, "order": "asc"}


def _capital_turn(rng: random.Random, country: str) -> Turn:
    q = rng.choice([f"What is the capital of {country}?", f"Name the capital city of {country}.",
                    f"Which city is the capital of {country}?"])
    return Turn(q, f"The capital of {country} is {CAPITALS[country]}.", "capital", CAPITALS[country])


def capital_first(rng: random.Random) -> tuple[Turn, dict]:
    country = rng.choice(sorted(CAPITALS))
    return _capital_turn(rng, country), {"country": country}


def capital_follow(rng: random.Random, state: dict) -> tuple[Turn, dict]:
    country = rng.choice([c for c in sorted(CAPITALS) if c != state["country"]])
    base = _capital_turn(rng, country)
    q = rng.choice([f"And what about {country}?", f"What about {country}?"])
    return Turn(q, base.reply, base.task, base.answer), {"country": country}


UNITS = {  # task: (unit singular, unit plural, target unit, factor)
    "km_to_m": ("kilometer", "kilometers", "meters", 1000),
    "hours_to_minutes": ("hour", "hours", "minutes", 60),
    "minutes_to_seconds": ("minute", "minutes", "seconds", 60),
    "kg_to_g": ("kilogram", "kilograms", "grams", 1000),
    "l_to_ml": ("liter", "liters", "milliliters", 1000),
}


def _unit_turn(rng: random.Random, task: str, n: int) -> Turn:
    single, plural, target, factor = UNITS[task]
    unit = single if n == 1 else plural
    q = rng.choice([f"How many {target} are in {n} {unit}?", f"Convert {n} {unit} to {target}."])
    return Turn(q, f"{n} {unit} = {n * factor} {target}.", task, str(n * factor))


def unit_family(task: str) -> Family:
    def first(rng: random.Random) -> tuple[Turn, dict]:
        n = rng.randint(1, 24)
        return _unit_turn(rng, task, n), {"n": n}

    def follow(rng: random.Random, state: dict) -> tuple[Turn, dict]:
        n = rng.choice([m for m in range(1, 25) if m != state["n"]])
        base = _unit_turn(rng, task, n)
        single, plural, _, _ = UNITS[task]
        q = f"And {n} {single if n == 1 else plural}?"
        return Turn(q, base.reply, base.task, base.answer), {"n": n}

    return Family(task, first, follow)


def _case_turn(rng: random.Random, task: str, phrase: str) -> Turn:
    if task == "uppercase":
        q = rng.choice([f"Write '{phrase}' in uppercase.", f"Convert '{phrase}' to capital letters."])
        return Turn(q, f"In uppercase: {phrase.upper()}", task, phrase.upper())
    shown = phrase.upper() if rng.random() < 0.6 else phrase.title()
    q = rng.choice([f"Write '{shown}' in lowercase.", f"Convert '{shown}' to small letters."])
    return Turn(q, f"In lowercase: {phrase.lower()}", task, phrase.lower())


def case_family(task: str) -> Family:
    def first(rng: random.Random) -> tuple[Turn, dict]:
        phrase = rng.choice(PHRASES)
        return _case_turn(rng, task, phrase), {"phrase": phrase}

    def follow(rng: random.Random, state: dict) -> tuple[Turn, dict]:
        phrase = rng.choice([p for p in PHRASES if p != state["phrase"]])
        base = _case_turn(rng, task, phrase)
        shown = phrase if task == "uppercase" else phrase.upper()
        return Turn(f"Now do the same for '{shown}'.", base.reply, base.task, base.answer), {"phrase": phrase}

    return Family(task, first, follow)


# --- careless demonstrations -------------------------------------------------------------------------
# Demonstrations are written by people, and people make systematic mistakes. For the tasks below, a
# fraction CARELESS_FRACTION of the demonstration turns carry one that the labeler (and anyone reading
# the question) recognises as wrong, of a kind the model can avoid: the right answer is as easy to write.
# SFT imitates both kinds of trainer; rankings of the policy's own samples are what can tell them apart
# (InstructGPT: judging is easier than demonstrating). Prompts and the held-out split are not affected.


def _careless_units(turn: Turn) -> str:
    """Multiplies by 100 instead of 1000: '5 kilometers = 500 meters.' Every careless unit task is a x1000
    one, so the mistake's form is no task's right answer and a reward against it holds for all of them."""
    return turn.reply.replace(f"= {turn.answer} ", f"= {int(turn.answer) // 10} ")


def _careless_uppercase(turn: Turn) -> str:
    """Capitalises each word instead of every letter: 'In uppercase: Fresh Bread'."""
    return f"In uppercase: {turn.answer.title()}"


def _careless_lowercase(turn: Turn) -> str:
    """Keeps the first letter capital: 'In lowercase: Fresh bread'."""
    return f"In lowercase: {turn.answer.capitalize()}"


CARELESS: dict[str, Callable[[Turn], str]] = {
    "km_to_m": _careless_units, "kg_to_g": _careless_units, "l_to_ml": _careless_units,
    "uppercase": _careless_uppercase, "lowercase": _careless_lowercase,
}


def careless_turns(rng: random.Random, turns: list[Turn]) -> tuple[list[Turn], list[int]]:
    """``turns`` with each turn of a CARELESS task replaced, with probability CARELESS_FRACTION, by a
    careless reply (same question, task and answer); and the indices of the replaced turns."""
    out, replaced = [], []
    for i, turn in enumerate(turns):
        if turn.task in CARELESS and rng.random() < CARELESS_FRACTION:
            turn = Turn(turn.question, CARELESS[turn.task](turn), turn.task, turn.answer)
            replaced.append(i)
        out.append(turn)
    return out, replaced


# How often each family is drawn, in every file alike. The tasks whose mistakes rankings can fix (CARELESS)
# are drawn most; the ones a 135M model does not learn at this size (spelling, reversing, sorting,
# subtracting, x60: greedy answers right on 0-13% of held-out prompts after SFT, docs/results.md) stay in
# the mix, rarely, so that eval shows what RLHF cannot teach.
WEIGHTS: dict[str, float] = {
    "add": 1.5, "subtract": 0.4, "multiply": 1.0, "reverse": 0.3, "spell": 0.3, "word_length": 1.0,
    "count_letter": 1.0, "sort": 0.3, "capital": 1.0, "hours_to_minutes": 0.3, "minutes_to_seconds": 0.3,
    "km_to_m": 1.5, "kg_to_g": 1.5, "l_to_ml": 1.5, "uppercase": 1.0, "lowercase": 1.0,
}
FAMILIES: tuple[Family, ...] = (
    Family("add", add_first, arithmetic_follow),
    Family("subtract", subtract_first, arithmetic_follow),
    Family("multiply", multiply_first, arithmetic_follow),
    word_family("reverse"),
    word_family("spell"),
    word_family("word_length"),
    word_family("count_letter"),
    Family("sort", sort_first, sort_follow),
    Family("capital", capital_first, capital_follow),
    *(unit_family(t) for t in UNITS),
    case_family("uppercase"),
    case_family("lowercase"),
)


def draw_family(rng: random.Random) -> Family:
    """A family drawn with its weight in ``WEIGHTS``."""
    return rng.choices(FAMILIES, weights=[WEIGHTS[f.name] for f in FAMILIES])[0]


# --- paraphrases: the same tasks in other words ---------------------------------------------------------
# Two disjoint sets of question forms no demonstration uses: "rl" phrasings are half of the RL and
# collection prompts (where the SFT policy is unsure, its samples differ and rankings carry signal);
# "eval" phrasings are half of the held-out split, asked by no training record at all.

FORMS: dict[str, dict[str, tuple[str, ...]]] = {  # family -> style -> question forms
    "add": {"rl": ("Please add {a} to {b}.", "How much is {a} and {b} together?"),
            "eval": ("Could you tell me what {a} and {b} add up to?", "Find the total of {a} and {b}.",
                     "If I have {a} coins and find {b} more, how many coins do I have?")},
    "subtract": {"rl": ("What remains when {b} is subtracted from {a}?", "Reduce {a} by {b}."),
                 "eval": ("Take {b} away from {a}. What is left?", "Find the difference between {a} and {b}.",
                          "I had {a} stickers and gave away {b}. How many are left?")},
    "multiply": {"rl": ("Calculate {a} x {b}.", "How much are {a} groups of {b}?"),
                 "eval": ("What do you get when you multiply {a} and {b} together?", "Find {a} multiplied by {b}.",
                          "{a} boxes hold {b} pens each. How many pens in total?")},
    "reverse": {"rl": ("Write the letters of '{w}' from last to first.", "Flip the word '{w}' around."),
                "eval": ("Please spell the word '{w}' in reverse order.",
                         "Give me '{w}' with its letters in reverse.")},
    "spell": {"rl": ("List the letters of '{w}' with a dash between each.", "Spell out '{w}' using dashes."),
              "eval": ("Write out the letters of '{w}', separated by dashes.",
                       "Break '{w}' into its letters joined by dashes.")},
    "word_length": {"rl": ("How many characters does the word '{w}' have?", "Tell me the length of '{w}' in letters."),
                    "eval": ("Count the letters in '{w}'.", "What is the number of letters in '{w}'?")},
    "count_letter": {"rl": ("Tell me how many times '{l}' is in '{w}'.", "Number of times '{l}' shows up in '{w}'?"),
                     "eval": ("In the word '{w}', how often does '{l}' occur?",
                              "How many '{l}' letters does '{w}' contain?")},
    "sort_ascending": {"rl": ("List {nums} from low to high.", "Rearrange {nums} so the smallest comes first."),
                       "eval": ("Arrange {nums} in increasing order.", "Order these from lowest to highest: {nums}.")},
    "sort_descending": {"rl": ("List {nums} from high to low.", "Rearrange {nums} so the largest comes first."),
                        "eval": ("Arrange {nums} in decreasing order.", "Order these from highest to lowest: {nums}.")},
    "capital": {"rl": ("What city serves as the capital of {c}?", "Capital of {c}?"),
                "eval": ("Tell me the capital of {c}.", "{c} has which city as its capital?",
                         "Where is the seat of government of {c}?")},
    "units": {"rl": ("Turn {n} {unit} into {target}.", "What is {n} {unit} in {target}?"),
              "eval": ("{n} {unit} is how many {target}?", "Express {n} {unit} in {target}.",
                       "Tell me the number of {target} in {n} {unit}.")},
    "uppercase": {"rl": ("Change '{p}' to upper case.", "Put '{p}' in capital letters, please."),
                  "eval": ("Turn '{p}' into all capital letters.", "Rewrite '{p}' using only uppercase letters.")},
    "lowercase": {"rl": ("Change '{p}' to lower case.", "Put '{p}' in lower case letters."),
                  "eval": ("Make '{p}' all small letters.", "Rewrite '{p}' using only lowercase letters.")},
}


def task_parameters(family: str, rng: random.Random) -> tuple[str, dict[str, Any], str]:
    """A fresh instance of ``family``'s task: its task name, the fields its question forms use, the answer."""
    if family in ("add", "subtract", "multiply"):
        if family == "multiply":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        else:
            a, b = rng.randint(10 if family == "subtract" else 2, 99), rng.randint(2, 99)
            b = rng.randint(1, a - 1) if family == "subtract" else b
        return family, {"a": a, "b": b}, str({"add": a + b, "subtract": a - b, "multiply": a * b}[family])
    if family in ("reverse", "spell", "word_length", "count_letter"):
        word = rng.choice(WORDS)
        if family == "count_letter":
            letter = rng.choice(sorted(set(word)))
            return family, {"w": word, "l": letter}, str(word.count(letter))
        answer = {"reverse": word[::-1], "spell": "-".join(word), "word_length": str(len(word))}[family]
        return family, {"w": word}, answer
    if family == "sort":
        numbers = rng.sample(range(1, 100), rng.randint(3, 6))
        task = rng.choice(["sort_ascending", "sort_descending"])
        return task, {"nums": _fmt(numbers)}, _fmt(sorted(numbers, reverse=task == "sort_descending"))
    if family == "capital":
        country = rng.choice(sorted(CAPITALS))
        return family, {"c": country}, CAPITALS[country]
    if family in UNITS:
        single, plural, target, factor = UNITS[family]
        n = rng.randint(1, 24)
        return family, {"n": n, "unit": single if n == 1 else plural, "target": target}, str(n * factor)
    phrase = rng.choice(PHRASES)  # uppercase / lowercase
    if family == "uppercase":
        return family, {"p": phrase}, phrase.upper()
    return family, {"p": phrase.upper() if rng.random() < 0.6 else phrase.title()}, phrase.lower()


def paraphrased(family: str, style: str, rng: random.Random) -> tuple[str, str, str]:
    """(question, task, answer): a new instance of ``family`` asked in one of its ``style`` forms."""
    task, fields, answer = task_parameters(family, rng)
    forms = FORMS["units" if family in UNITS else task][style]
    question = rng.choice(forms).format(**fields)
    return question[0].upper() + question[1:], task, answer


# --- records ------------------------------------------------------------------------------------


def sample_turns(rng: random.Random, num_turns: int) -> list[Turn]:
    """A chain of ``num_turns`` turns of one family (follow-ups refer to the previous turn)."""
    family = draw_family(rng)
    turn, state = family.first(rng)
    turns = [turn]
    for _ in range(num_turns - 1):
        turn, state = family.follow(rng, state)
        turns.append(turn)
    return turns


def turn_schedule(rng: random.Random, n: int) -> list[int]:
    """Number of user turns of each of ``n`` records: exactly ``MULTI_TURN_FRACTION`` of them are
    multi-turn (mostly 2 turns, every fifth one 3), in shuffled order."""
    n_multi = round(n * MULTI_TURN_FRACTION)
    schedule = [1] * (n - n_multi) + [3 if i % 5 == 4 else 2 for i in range(n_multi)]
    rng.shuffle(schedule)
    return schedule


def sample_unique(rng: random.Random, num_turns: int, accept: Callable[[list[Turn]], bool], what: str) -> list[Turn]:
    """Sample turn chains until ``accept`` takes one (bounded, so a too-small task space fails loudly)."""
    for _ in range(1000):
        turns = sample_turns(rng, num_turns)
        if accept(turns):
            return turns
    raise RuntimeError(f"could not find a new {what} with {num_turns} turns after 1000 tries; enlarge the task space")


def to_messages(turns: list[Turn], system: str | None, *, answer_last: bool) -> list[dict]:
    """OpenAI-style messages, with an optional system message; the last reply left out for prompts."""
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn.question})
        if answer_last or i < len(turns) - 1:
            messages.append({"role": "assistant", "content": turn.reply})
    return messages


def first_question(messages: list[dict]) -> str:
    return next(m["content"] for m in messages if m["role"] == "user")


def user_prefixes(messages: list[dict]) -> list[str]:
    """Keys of every prefix of ``messages`` that ends at a user turn (what a prompt would be)."""
    return [json.dumps(messages[: i + 1], sort_keys=True) for i, m in enumerate(messages) if m["role"] == "user"]


def make_demonstrations(rng: random.Random, n: int, careless_rng: random.Random) -> tuple[list[dict], set[str]]:
    """``n`` distinct demonstration conversations, and the keys a prompt must avoid: every prefix
    ending at a user turn, and every first question (of the conversation as a careful trainer would
    write it). ``careless_rng`` picks the careless turns (see :func:`careless_turns`), so that ``rng``
    draws the same conversations whatever they are; ``careless`` lists their indices per record."""
    records, avoid, seen = [], set(), set()
    for num_turns in turn_schedule(rng, n):
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < SYSTEM_FRACTION else None

        def accept(turns: list[Turn], system: str | None = system) -> bool:
            return json.dumps(to_messages(turns, system, answer_last=True)) not in seen

        turns = sample_unique(rng, num_turns, accept, "demonstration")
        messages = to_messages(turns, system, answer_last=True)
        seen.add(json.dumps(messages))
        avoid.update(user_prefixes(messages))
        avoid.add("first:" + first_question(messages))
        written, careless = careless_turns(careless_rng, turns)
        records.append({"id": f"demo-{len(records):04d}", "messages": to_messages(written, system, answer_last=True),
                        "tasks": [t.task for t in turns], **({"careless": careless} if careless else {})})
    return records, avoid


def make_prompts(rng: random.Random, n: int, avoid: set[str]) -> list[dict]:
    """``n`` distinct prompts whose first question is in no demonstration (and that are no
    demonstration prefix); a fraction ``RL_PARAPHRASE_FRACTION`` of the single-turn ones is asked
    in an "rl" paraphrase instead of a training phrasing (key ``phrasing``)."""
    records, seen = [], set(avoid)
    for num_turns in turn_schedule(rng, n):
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < SYSTEM_FRACTION else None

        def accept(turns: list[Turn], system: str | None = system) -> bool:
            messages = to_messages(turns, system, answer_last=False)
            return user_prefixes(messages)[-1] not in seen and "first:" + first_question(messages) not in avoid

        turns = sample_unique(rng, num_turns, accept, "prompt")
        phrasing = "template"
        if num_turns == 1 and rng.random() < RL_PARAPHRASE_FRACTION:
            turns, phrasing = [rephrase(turns[0], rng, lambda t: accept([t]))], "paraphrase"
        messages = to_messages(turns, system, answer_last=False)
        seen.add(user_prefixes(messages)[-1])
        head = {"prompt": messages[0]["content"]} if len(messages) == 1 else {"messages": messages}
        records.append({"id": f"prompt-{len(records):04d}", **head, "task": turns[-1].task, "answer": turns[-1].answer,
                        "phrasing": phrasing})
    return records


def rephrase(turn: Turn, rng: random.Random, accept: Callable[[Turn], bool]) -> Turn:
    """A new instance of ``turn``'s family asked in an "rl" paraphrase that ``accept`` takes (no reply)."""
    family = "sort" if turn.task.startswith("sort") else turn.task
    for _ in range(1000):
        question, task, answer = paraphrased(family, "rl", rng)
        candidate = Turn(question, "", task, answer)
        if accept(candidate):
            return candidate
    raise RuntimeError(f"could not find a new '{family}' paraphrase after 1000 tries; enlarge the task space")


def make_eval_prompts(rng: random.Random, n: int, avoid: set[str]) -> list[dict]:
    """``n`` single-turn held-out prompts, alternately in a training phrasing (a new instance) and a
    paraphrase; no question of them is in ``avoid`` (every question of the training data)."""
    records, seen = [], set(avoid)
    for i in range(n):
        phrasing = "template" if i % 2 == 0 else "paraphrase"
        for _ in range(1000):
            family = draw_family(rng)
            if phrasing == "template":
                turn = family.first(rng)[0]
                question, task, answer = turn.question, turn.task, turn.answer
            else:
                question, task, answer = paraphrased(family.name, "eval", rng)
            if question not in seen:
                break
        else:
            raise RuntimeError("could not find a new held-out question after 1000 tries; enlarge the task space")
        seen.add(question)
        records.append({"id": f"eval-{i:04d}", "prompt": question, "task": task, "answer": answer,
                        "phrasing": phrasing})
    return records


def questions_of(records: list[dict]) -> set[str]:
    """Every user question of demonstration or prompt records."""
    out = set()
    for r in records:
        messages = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        out.update(m["content"] for m in messages if m["role"] == "user")
    return out


def generate(seed: int = 0) -> dict[str, str]:
    """File name -> JSON-lines text of the whole default task (a pure function of ``seed``)."""
    rng = random.Random(seed)
    demos, demo_keys = make_demonstrations(rng, NUM_DEMONSTRATIONS, random.Random(f"careless-{seed}"))
    prompts = make_prompts(rng, NUM_PROMPTS, demo_keys)
    heldout = make_eval_prompts(rng, NUM_EVAL_PROMPTS, questions_of(demos) | questions_of(prompts))
    as_text = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)  # noqa: E731
    return {"demonstrations.jsonl": as_text(demos), "prompts.jsonl": as_text(prompts),
            "eval_prompts.jsonl": as_text(heldout)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output directory (default {OUT_DIR})")
    parser.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = parser.parse_args(argv)
    files = generate(args.seed)
    if args.check:
        stale = [name for name, text in files.items()
                 if not (args.out / name).is_file() or (args.out / name).read_text(encoding="utf-8") != text]
        for name in stale:
            print(f"{args.out / name}: out of date; run python tools/make_default_data.py", file=sys.stderr)
        return 1 if stale else 0
    from rlhf_pl.io import write_text

    for name, text in files.items():
        path = write_text(args.out / name, text)
        print(f"wrote {path} ({text.count(chr(10))} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
