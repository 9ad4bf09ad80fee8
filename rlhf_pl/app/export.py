"""The feedback app's exports: database rows -> the JSON records the training stages read.

No HTTP here: :mod:`rlhf_pl.app.admin` serves these as ``.jsonl`` downloads. Each export returns an
:class:`Export` — the records, and how many candidates were left out and why (``left_out``). Every
record is checked with the parser of :mod:`rlhf_pl.data.formats` that will read it back, so a file
written from it loads in ``+stage=sft`` / ``+stage=rm`` / collect without editing; a candidate that
would not load is left out (counted under ``invalid``, and logged).

- ``demonstrations`` -> SFT conversations (``load_conversations``): each demonstration's selected
  messages in order (:func:`rlhf_pl.app.demos.demonstration_record` builds the record); those
  without an assistant turn are drafts and are left out.
- ``rankings`` -> K-wise records with ties (``load_rankings``): ``{"prompt": [messages],
  "completions": [...], "ranking": [2, [0, 3], 1], "all_bad": bool, "provenance": {...}}``.
  ``mode="per_labeler"``: each labeler's ranking of a task is its own record (provenance
  ``labeler``). ``mode="merged"``: one record per task, the rankings of every labeler who ranked it
  (not skipped) merged by :func:`rlhf_pl.app.agreement.merge` — each completion's mean rank
  position, equal means tied (provenance ``labelers``, ``merge``); ``all_bad`` is true when more
  than half of them flagged "all bad" (``all_bad_votes`` counts them). Skips, and rankings (or
  merged rankings) that tie every completion — they compare nothing — are left out.
- ``chats`` -> conversations for collect (``load_prompts_or_conversations``; ``+stage=sft`` reads
  them too): each chat as the chat area's own export writes it (:func:`rlhf_pl.app.chat.export_record`:
  the selected path up to its last answer, ``source``, ``conversation_id``, ``policy``, the owner's
  ratings under ``turns``), plus ``user``; chats without an answer are left out. (No ``provenance``
  key: collect copies a source record's other keys into its output and writes its own.)
- ``pairwise`` -> comparisons (``load_rankings``): at every assistant position with two or more
  alternatives, each (up, down) pair of alternatives that the same user rated +1 and −1 gives
  ``{"prompt": [the selected messages before it], "chosen": up, "rejected": down, "provenance":
  {...}}`` — every such pair, per rater.
"""
from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from rlhf_pl.app import chat, demos
from rlhf_pl.app.agreement import check_groups, merge
from rlhf_pl.app.db import Conversation, Message, RankingRecord, Rating, Task, User, by_position, selected_path
from rlhf_pl.data import formats

log = logging.getLogger("rlhf_pl.app.export")

WHATS = ("demonstrations", "rankings", "chats", "pairwise")
RANKING_MODES = ("per_labeler", "merged")
MERGE_RULE = "mean rank position (ties share the mean of their positions); equal means tie"


@dataclass
class Export:
    """What one export produced: the records, and ``left_out`` (reason -> how many candidates)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    left_out: Counter = field(default_factory=Counter)

    def add(self, record: dict[str, Any], parse: Callable[[Any, str], Any], label: str) -> None:
        """Keep ``record`` if ``parse`` (a :mod:`rlhf_pl.data.formats` parser) accepts it, else count it
        under ``invalid`` and log why."""
        try:
            parse(record, label)
        except Exception as err:  # formats raises its private _RecordError: one field's problem
            log.warning("export: %s left out: %s", label, err)
            self.left_out["invalid"] += 1
            return
        self.records.append(record)

    def summary(self) -> dict[str, Any]:
        return {"records": len(self.records), "left_out": dict(sorted(self.left_out.items()))}


# Characters str.splitlines() breaks lines at that json.dumps(ensure_ascii=False) leaves as they are.
LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def to_jsonl(records: Iterable[Mapping[str, Any]]) -> str:
    """One JSON object a line, as the loaders read ``.jsonl``: UTF-8 text (not ASCII-escaped), except
    the characters the loader's line split would break a line at (escaped, so each record stays one line)."""
    lines = []
    for record in records:
        line = json.dumps(record, ensure_ascii=False)
        for char, escaped in LINE_BREAKS.items():
            line = line.replace(char, escaped)
        lines.append(line + "\n")
    return "".join(lines)


def _filled(text: Any) -> bool:
    return isinstance(text, str) and bool(text.strip())


def ranking_json(groups: Sequence[Sequence[int]]) -> list[Any]:
    """``[[2], [0, 3], [1]]`` -> ``[2, [0, 3], 1]`` (the data format: an int is a group of one)."""
    return [group[0] if len(group) == 1 else list(group) for group in groups]


# --- demonstrations -------------------------------------------------------------------------------


def demonstration_exports(conversations: Iterable[Conversation], usernames: Mapping[int, str]) -> Export:
    """SFT records of the demonstrations (drafts without an assistant turn left out)."""
    out = Export()
    for conversation in sorted(conversations, key=lambda c: c.id):
        if not any(m.role == "assistant" and _filled(m.content) for m in selected_path(conversation.messages)):
            out.left_out["no_assistant_turn"] += 1
            continue
        record = demos.demonstration_record(conversation, usernames.get(conversation.user_id, "?"))
        out.add(record, formats.parse_conversation, f"demonstration {conversation.id}")
    return out


# --- rankings -------------------------------------------------------------------------------------


def _ranking_base(task: Task, groups: Sequence[Sequence[int]]) -> dict[str, Any]:
    return {"prompt": list(task.prompt), "completions": list(task.completions), "ranking": ranking_json(groups)}


def _task_provenance(task: Task) -> dict[str, Any]:
    return {"task": task.id, "queue": task.queue, "source": task.source, "meta": dict(task.meta or {})}


def _usable(record: RankingRecord, k: int, out: Export) -> Optional[list[list[int]]]:
    """The record's tie groups, or None (counted in ``out.left_out``) for a skip or a bad ranking."""
    if record.skipped:
        out.left_out["skipped"] += 1
        return None
    if record.ranking is None:
        out.left_out["no_ranking"] += 1
        return None
    try:
        return check_groups([g if isinstance(g, list) else [g] for g in record.ranking], k)
    except (TypeError, ValueError) as err:
        log.warning("export: ranking %s of task %s left out: %s", record.id, record.task_id, err)
        out.left_out["invalid"] += 1
        return None


def ranking_exports(tasks: Iterable[Task], rankings: Iterable[RankingRecord], usernames: Mapping[int, str],
                    mode: str = "per_labeler") -> Export:
    """K-wise records of the rankings, ``mode`` ``per_labeler`` or ``merged`` (see the module docstring)."""
    if mode not in RANKING_MODES:
        raise ValueError(f"mode {mode!r}: choose one of {', '.join(RANKING_MODES)}")
    by_task: dict[str, list[RankingRecord]] = defaultdict(list)
    for record in rankings:
        by_task[record.task_id].append(record)
    out = Export()
    for task in sorted(tasks, key=lambda t: t.id):
        answers = sorted(by_task.get(task.id, []), key=lambda r: usernames.get(r.user_id, "?"))
        usable = [(r, g) for r in answers if (g := _usable(r, len(task.completions), out)) is not None]
        if mode == "per_labeler":
            for record, groups in usable:
                if len(groups) < 2:
                    out.left_out["all_tie"] += 1
                    continue
                provenance = {**_task_provenance(task), "labeler": usernames.get(record.user_id, "?")}
                if record.reason:
                    provenance["note"] = record.reason
                out.add({**_ranking_base(task, groups), "all_bad": bool(record.all_bad), "provenance": provenance},
                        formats.parse_ranking, f"task {task.id} by {provenance['labeler']}")
        elif usable:
            _add_merged(out, task, usable, usernames)
    return out


def _add_merged(out: Export, task: Task, usable: list[tuple[RankingRecord, list[list[int]]]],
                usernames: Mapping[int, str]) -> None:
    """One merged record for ``task`` from its usable rankings (left out when the merge ties everything)."""
    merged = merge([g for _, g in usable], len(task.completions))
    if len(merged) < 2:
        out.left_out["all_tie"] += 1
        return
    votes = sum(bool(r.all_bad) for r, _ in usable)
    provenance = {**_task_provenance(task), "labelers": [usernames.get(r.user_id, "?") for r, _ in usable],
                  "merge": MERGE_RULE}
    out.add({**_ranking_base(task, merged), "all_bad": votes * 2 > len(usable), "all_bad_votes": votes,
             "provenance": provenance}, formats.parse_ranking, f"task {task.id} (merged)")


# --- chats and their ratings ----------------------------------------------------------------------


def chat_exports(conversations: Iterable[Conversation], ratings: Iterable[Rating],
                 usernames: Mapping[int, str]) -> Export:
    """Each chat as :func:`rlhf_pl.app.chat.export_record` writes it (the selected path up to its last
    answer, with the owner's ratings), plus ``user``; chats without an answer are left out."""
    by_message = _by_message(ratings)
    out = Export()
    for conversation in sorted(conversations, key=lambda c: c.id):
        messages = sorted(conversation.messages, key=lambda m: (m.position, m.alternative))
        own = {m.id: r for m in messages for r in by_message.get(m.id, []) if r.user_id == conversation.user_id}
        record = chat.export_record(conversation, messages, own)
        if not record["turns"]:
            out.left_out["no_assistant_turn"] += 1
            continue
        record["user"] = usernames.get(conversation.user_id, "?")
        out.add(record, formats.parse_prompt_or_conversation, f"chat {conversation.id}")
    return out


def _by_message(ratings: Iterable[Rating]) -> dict[int, list[Rating]]:
    by_message: dict[int, list[Rating]] = defaultdict(list)
    for rating in ratings:
        by_message[rating.message_id].append(rating)
    return by_message


def _rated_pairs(alternatives: list[Message], ratings: Mapping[int, list[Rating]]) -> list[tuple[int, Message, Message,
                                                                                                   Rating, Rating]]:
    """(rater id, up message, down message, up rating, down rating) for every pair at one position."""
    by_user: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    for message in alternatives:
        for rating in ratings.get(message.id, []):
            if rating.value in (1, -1):
                by_user[rating.user_id][0 if rating.value == 1 else 1].append((message, rating))
    return [(user, up, down, up_rating, down_rating)
            for user, (ups, downs) in sorted(by_user.items())
            for up, up_rating in ups for down, down_rating in downs]


def pairwise_exports(conversations: Iterable[Conversation], ratings: Iterable[Rating],
                     usernames: Mapping[int, str]) -> Export:
    """Pairwise comparisons from regenerated assistant turns one user rated up and down; the prompt is
    the chat's selected path before the turn (:func:`rlhf_pl.app.chat.prompt_before`)."""
    by_message = _by_message(ratings)
    out = Export()
    for conversation in sorted(conversations, key=lambda c: c.id):
        messages = sorted(conversation.messages, key=lambda m: (m.position, m.alternative))
        for position, alternatives in by_position(messages).items():
            if len(alternatives) < 2 or any(m.role != "assistant" for m in alternatives):
                continue
            prompt = chat.prompt_before(messages, position)
            for pair in _rated_pairs(alternatives, by_message):
                _add_pair(out, conversation, position, prompt, pair, usernames)
    return out


def _add_pair(out: Export, conversation: Conversation, position: int, prompt: list[formats.Message],
              pair: tuple[int, Message, Message, Rating, Rating], usernames: Mapping[int, str]) -> None:
    """One comparison record (or a left-out count: a prompt that does not end with a user turn, or texts
    that are the same or empty)."""
    user, up, down, up_rating, down_rating = pair
    if not prompt or prompt[-1].role != "user" or not all(_filled(m.content) for m in prompt):
        out.left_out["prompt_not_ending_with_a_user_turn"] += 1
        return
    if not (_filled(up.content) and _filled(down.content)) or up.content.strip() == down.content.strip():
        out.left_out["same_or_empty_texts"] += 1
        return
    provenance = {"conversation": conversation.id, "position": position, "labeler": usernames.get(user, "?"),
                  "chosen_alternative": up.alternative, "rejected_alternative": down.alternative,
                  "policy": conversation.policy}
    for key, rating in (("chosen_reason", up_rating), ("rejected_reason", down_rating)):
        if rating.reason:
            provenance[key] = rating.reason
    out.add({"prompt": formats.as_dicts(prompt), "chosen": up.content, "rejected": down.content,
             "provenance": provenance}, formats.parse_ranking, f"chat {conversation.id} position {position}")


# --- from the database ----------------------------------------------------------------------------


def _usernames(session: Session) -> dict[int, str]:
    return dict(session.execute(select(User.id, User.username)).tuples().all())


def _conversations(session: Session, kind: str) -> list[Conversation]:
    query = select(Conversation).where(Conversation.kind == kind).options(selectinload(Conversation.messages))
    return list(session.scalars(query))


def export(session: Session, what: str, mode: str = "per_labeler") -> Export:
    """Read what export ``what`` (one of :data:`WHATS`) needs from the database and build it."""
    if what == "demonstrations":
        return demonstration_exports(_conversations(session, "demonstration"), _usernames(session))
    if what == "rankings":
        if mode not in RANKING_MODES:
            raise ValueError(f"mode {mode!r}: choose one of {', '.join(RANKING_MODES)}")
        return ranking_exports(session.scalars(select(Task)), session.scalars(select(RankingRecord)),
                               _usernames(session), mode)
    if what in ("chats", "pairwise"):
        ratings = session.scalars(select(Rating).join(Message, Rating.message_id == Message.id)
                                  .join(Conversation, Message.conversation_id == Conversation.id)
                                  .where(Conversation.kind == "chat"))
        build = chat_exports if what == "chats" else pairwise_exports
        return build(_conversations(session, "chat"), ratings, _usernames(session))
    raise ValueError(f"export {what!r}: choose one of {', '.join(WHATS)}")
