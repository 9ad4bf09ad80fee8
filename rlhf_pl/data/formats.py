"""Data formats: conversations (SFT), prompts (sampling / RL) and rankings (reward model).

Every record is validated when loaded; a bad record is reported with its file and line (or data set
row) and the offending field, e.g. ``data/c.jsonl:7: field 'ranking': expected a permutation of
0..3, got [0, 0, 1, 2]``, together with how many records of the source are bad.

Sources (the ``source`` argument of the loaders):

- a local ``.jsonl`` file (one JSON object per line; blank lines are skipped),
- a local ``.json`` file holding an array of objects,
- a local ``.parquet`` file,
- a local directory or a hub dataset id, read with ``datasets.load_dataset(source, split=split)``,
- ``embedded:<name>``: ``rlhf_pl/data/default/<name>.jsonl`` shipped inside the package.

Record formats (keys other than the ones listed are kept in the record's ``meta``):

- conversation: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` with
  at least one assistant turn; a system message may only come first.
- prompt: ``{"prompt": str}`` (one user message) or ``{"messages": [...]}`` / ``{"prompt": [...]}``
  ending with a user turn.
- ranking (K-wise): ``{"prompt": str | [messages], "completions": [str, ...], "ranking": [2, [0, 3], 1]}``,
  completion indices best first, an inner list is a group of ties; pairwise:
  ``{"prompt": ..., "chosen": str, "rejected": str}`` (the K = 2 case).
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

from rlhf_pl.errors import UserError

ROLES = ("system", "user", "assistant")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_PACKAGE = "rlhf_pl.data.default"
T = TypeVar("T")


class DataError(UserError, ValueError):
    """A data source cannot be read, or one of its records is invalid.

    Attributes:
        origin: where the (first) bad record is, e.g. ``"data/c.jsonl:7"``; None for source-level errors.
        field: the offending field, e.g. ``"messages[2].role"``; None when not about one field.
        bad_records: how many records of the source are bad (0 for source-level errors).
    """

    def __init__(self, message: str, *, origin: str | None = None, field: str | None = None, bad_records: int = 0):
        super().__init__(message)
        self.origin = origin
        self.field = field
        self.bad_records = bad_records


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()


class _RecordError(Exception):
    """One field of one record is wrong (turned into a DataError naming the origin by the loader)."""

    def __init__(self, field_name: str | None, expected: str, got: Any = MISSING):
        self.field_name, self.expected, self.got = field_name, expected, got
        super().__init__(self.describe())

    def describe(self) -> str:
        where = f"field '{self.field_name}': " if self.field_name else ""
        return f"{where}expected {self.expected}, got {_show(self.got)}"


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One chat turn. ``role`` is one of ``system``, ``user``, ``assistant`` (OpenAI roles)."""

    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Messages as the ``[{"role", "content"}]`` list that ``apply_chat_template`` takes."""
    return [m.to_dict() for m in messages]


@dataclass(frozen=True)
class Conversation:
    """A demonstration: messages with at least one assistant turn (the turns trained on)."""

    messages: tuple[Message, ...]
    origin: str  # "path/file.jsonl:12", "embedded:prompts:12" or "<dataset>[split]:row 3"
    meta: dict[str, Any] = field(default_factory=dict, hash=False)  # the record's other keys


@dataclass(frozen=True)
class Prompt:
    """What the policy answers: messages ending with a user turn."""

    messages: tuple[Message, ...]
    origin: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False)  # e.g. {"task": "add", "answer": "42"}


@dataclass(frozen=True)
class Ranking:
    """K completions of one prompt, ranked best first; an inner tuple of ``ranking`` is a tie group.

    ``ranking = ((2,), (0, 3), (1,))`` means completion 2 is best, 0 and 3 tie, 1 is worst.
    """

    prompt: tuple[Message, ...]
    completions: tuple[str, ...]
    ranking: tuple[tuple[int, ...], ...]
    origin: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def k(self) -> int:
        """Number of completions."""
        return len(self.completions)

    def pairs(self) -> list[tuple[int, int]]:
        """Every (winner, loser) pair of completion indices from different tie groups.

        Ordered by the better group, then the worse group, then the order inside each group, e.g.
        ``((2,), (0, 3), (1,))`` -> ``[(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)]``. Ties give no pair.
        """
        out: list[tuple[int, int]] = []
        for i, better in enumerate(self.ranking):
            for worse in self.ranking[i + 1 :]:
                out.extend((w, lo) for w in better for lo in worse)
        return out


# --- field validation ---------------------------------------------------------------------------


def _content(value: Any, field_name: str) -> str:
    """A message content: a non-empty string, or a list of ``{"type": "text", "text": str}`` parts."""
    if isinstance(value, list) and value and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str) or not value.strip():
        raise _RecordError(field_name, "a non-empty string", value)
    return value


def parse_messages(value: Any, field_name: str = "messages", *, last_role: str | None = None) -> tuple[Message, ...]:
    """Validate a list of ``{"role", "content"}`` objects; optionally require the last role."""
    if not isinstance(value, list) or not value:
        raise _RecordError(field_name, "a non-empty list of {role, content} objects", value)
    messages = []
    for i, item in enumerate(value):
        where = f"{field_name}[{i}]"
        if not isinstance(item, dict):
            raise _RecordError(where, "an object with 'role' and 'content'", item)
        role = item.get("role", MISSING)
        if role not in ROLES:
            raise _RecordError(f"{where}.role", "one of " + ", ".join(ROLES), role)
        if role == "system" and i != 0:
            raise _RecordError(f"{where}.role", "'system' only as the first message", role)
        messages.append(Message(role, _content(item.get("content", MISSING), f"{where}.content")))
    if last_role is not None and messages[-1].role != last_role:
        raise _RecordError(f"{field_name}[{len(messages) - 1}].role", f"the last message to be a {last_role} turn",
                           messages[-1].role)
    return tuple(messages)


def _prompt_messages(record: dict, key: str = "prompt") -> tuple[Message, ...]:
    """``"prompt": str`` (one user turn) or a list of messages ending with a user turn."""
    value = record.get(key, MISSING)
    if isinstance(value, list):
        return parse_messages(value, key, last_role="user")
    return (Message("user", _content(value, key)),)


def _meta(record: dict, known: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in known}


def parse_conversation(record: Any, origin: str) -> Conversation:
    """Validate one conversation record (raises ``_RecordError``)."""
    record = _require_object(record)
    messages = parse_messages(record.get("messages", MISSING), "messages")
    if not any(m.role == "assistant" for m in messages):
        raise _RecordError("messages", "at least one assistant turn", [m.role for m in messages])
    return Conversation(messages, origin, _meta(record, ("messages",)))


def parse_prompt(record: Any, origin: str) -> Prompt:
    """Validate one prompt record: ``prompt`` (str or messages) or ``messages``, ending with a user turn."""
    record = _require_object(record)
    if "prompt" in record and "messages" in record:
        raise _RecordError("messages", "either 'prompt' or 'messages', not both", record["messages"])
    if "messages" in record:
        messages = parse_messages(record["messages"], "messages", last_role="user")
    else:
        messages = _prompt_messages(record)
    return Prompt(messages, origin, _meta(record, ("prompt", "messages")))


def _completions(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) < 2:
        raise _RecordError("completions", "a list of K >= 2 completions", value)
    texts = tuple(_content(c, f"completions[{i}]") for i, c in enumerate(value))
    for j, text in enumerate(texts):
        if text in texts[:j]:
            raise _RecordError(f"completions[{j}]",
                               f"distinct completions (duplicate of completions[{texts.index(text)}])", text)
    return texts


def _ranking(value: Any, k: int) -> tuple[tuple[int, ...], ...]:
    """Best-first groups of completion indices whose union is a permutation of range(k)."""
    is_index = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    if not isinstance(value, list) or not value:
        raise _RecordError("ranking", f"a best-first list of the completion indices 0..{k - 1} (inner lists are ties)",
                           value)
    groups = []
    for i, item in enumerate(value):
        group = item if isinstance(item, list) else [item]
        if not group or not all(is_index(x) for x in group):
            raise _RecordError(f"ranking[{i}]", "a completion index or a non-empty list of indices (a tie)", item)
        groups.append(tuple(group))
    flat = [x for g in groups for x in g]
    if sorted(flat) != list(range(k)):
        raise _RecordError("ranking", f"a permutation of 0..{k - 1}", value)
    if len(groups) < 2:
        raise _RecordError("ranking", "at least two groups (a ranking where all completions tie compares nothing)",
                           value)
    return tuple(groups)


def parse_ranking(record: Any, origin: str) -> Ranking:
    """Validate a K-wise (``completions`` + ``ranking``) or pairwise (``chosen`` + ``rejected``) record."""
    record = _require_object(record)
    prompt = _prompt_messages(record)
    kwise, pairwise = "completions" in record, "chosen" in record or "rejected" in record
    if kwise and pairwise:
        raise _RecordError("chosen", "either 'completions' + 'ranking' or 'chosen' + 'rejected', not both",
                           record.get("chosen", MISSING))
    if kwise:
        completions = _completions(record["completions"])
        ranking = _ranking(record.get("ranking", MISSING), len(completions))
        return Ranking(prompt, completions, ranking, origin, _meta(record, ("prompt", "completions", "ranking")))
    if not pairwise:
        raise _RecordError("completions", "'completions' + 'ranking' (K-wise) or 'chosen' + 'rejected' (pairwise)")
    chosen = _content(record.get("chosen", MISSING), "chosen")
    rejected = _content(record.get("rejected", MISSING), "rejected")
    if chosen == rejected:
        raise _RecordError("rejected", "a completion different from 'chosen'", rejected)
    return Ranking(prompt, (chosen, rejected), ((0,), (1,)), origin, _meta(record, ("prompt", "chosen", "rejected")))


def _require_object(record: Any) -> dict:
    if not isinstance(record, dict):
        raise _RecordError(None, "a JSON object", record)
    return record


# --- reading sources ----------------------------------------------------------------------------


class RawRecord(NamedTuple):
    """One record as read from a source, before validation. ``error`` is set for unreadable lines."""

    origin: str
    value: Any
    error: str | None = None


_WS = re.compile(r"\s*")


def _read_jsonl(text: str, label: str, limit: int | None) -> list[RawRecord]:
    out: list[RawRecord] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        origin = f"{label}:{lineno}"
        try:
            out.append(RawRecord(origin, json.loads(line)))
        except json.JSONDecodeError as err:
            out.append(RawRecord(origin, None, f"invalid JSON: {err.msg} (column {err.colno})"))
    return out


def _read_json_array(text: str, label: str, limit: int | None) -> list[RawRecord]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    decoder, out = json.JSONDecoder(), []
    line_of = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731
    pos = _WS.match(text, 0).end()
    if not text.startswith("[", pos):
        raise DataError(f"{label}:{line_of(pos)}: expected a JSON array of objects (use .jsonl for one object per "
                        f"line), got {_show(text[pos:pos + 20])}")
    pos = _WS.match(text, pos + 1).end()
    while not text.startswith("]", pos) and (limit is None or len(out) < limit):
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{label}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})",
                            origin=f"{label}:{err.lineno}") from None
        out.append(RawRecord(f"{label}:{line_of(pos)}", value))
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            raise DataError(f"{label}:{line_of(pos)}: invalid JSON: expected ',' or ']' after an array element, "
                            f"got {_show(text[pos:pos + 20])}")
    if limit is None and _WS.match(text, pos + 1).end() < len(text):
        end = _WS.match(text, pos + 1).end()
        raise DataError(f"{label}:{line_of(end)}: invalid JSON: expected nothing after the closing ']', "
                        f"got {_show(text[end:end + 20])}")
    return out


def _drop_nulls(row: dict) -> dict:
    """Columnar sources fill absent keys with null; treat those as missing."""
    return {k: v for k, v in row.items() if v is not None}


def _read_parquet(path: Path, label: str, limit: int | None) -> list[RawRecord]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(f"{label}: cannot read Parquet file: {type(err).__name__}: {err}") from err
    if limit is not None:
        table = table.slice(0, limit)
    return [RawRecord(f"{label}:row {i}", _drop_nulls(row)) for i, row in enumerate(table.to_pylist())]


def _read_datasets(source: str, split: str, limit: int | None) -> list[RawRecord]:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as err:  # network, missing split, unknown format: all name the source
        raise DataError(f"{source}: cannot load with datasets.load_dataset(split={split!r}): "
                        f"{type(err).__name__}: {err}") from err
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [RawRecord(f"{source}[{split}]:row {i}", _drop_nulls(row)) for i, row in enumerate(ds)]


def embedded_names() -> list[str]:
    """Names usable as ``embedded:<name>`` (the .jsonl files of rlhf_pl/data/default)."""
    root = resources.files(EMBEDDED_PACKAGE)
    return sorted(p.name[: -len(".jsonl")] for p in root.iterdir() if p.name.endswith(".jsonl"))


def _read_embedded(name: str, limit: int | None) -> list[RawRecord]:
    resource = resources.files(EMBEDDED_PACKAGE) / f"{name}.jsonl"
    if not resource.is_file():
        raise DataError(f"{EMBEDDED_PREFIX}{name}: no such embedded data set; "
                        f"available: {', '.join(embedded_names()) or '(none)'}")
    # Origins read "embedded:prompts:12", not the installed path, which differs between machines.
    return _read_jsonl(resource.read_text(encoding="utf-8"), f"{EMBEDDED_PREFIX}{name}", limit)


def _read_local_file(path: Path, source: str, limit: int | None) -> list[RawRecord]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, source, limit)
    if suffix not in (".jsonl", ".json"):
        raise DataError(f"{source}: unsupported file type {suffix or '(none)'!r}; expected one of "
                        f"{', '.join(FILE_SUFFIXES)}, a directory, a hub dataset id or embedded:<name>")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{source}: not UTF-8 text (byte {err.start}): {err.reason}") from err
    return _read_jsonl(text, source, limit) if suffix == ".jsonl" else _read_json_array(text, source, limit)


def _looks_like_path(source: str) -> bool:
    return source.lower().endswith(FILE_SUFFIXES) or source.startswith(("/", "./", "../", "~")) or "\\" in source


def read_records(source: str, *, split: str = "train", limit: int | None = None) -> list[RawRecord]:
    """Raw records of any supported source (see the module docstring), unvalidated."""
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit: expected None or a positive integer, got {limit!r}")
    if source.startswith(EMBEDDED_PREFIX):
        return _read_embedded(source[len(EMBEDDED_PREFIX) :], limit)
    path = Path(source).expanduser()
    if path.is_file():
        return _read_local_file(path, source, limit)
    if path.is_dir():
        return _read_datasets(str(path), split, limit)
    if _looks_like_path(source):
        raise DataError(f"{source}: file not found (resolved to {path.resolve()})")
    return _read_datasets(source, split, limit)


def _validate(raw: list[RawRecord], source: str, parse: Callable[[Any, str], T]) -> list[T]:
    """Parse every record; raise a DataError for the first bad one, counting all bad ones."""
    if not raw:
        raise DataError(f"{source}: no records (empty data set)", bad_records=0)
    records, errors = [], []
    for item in raw:
        if item.error is not None:
            errors.append((item.origin, None, item.error))
            continue
        try:
            records.append(parse(item.value, item.origin))
        except _RecordError as err:
            errors.append((item.origin, err.field_name, err.describe()))
    if errors:
        origin, field_name, message = errors[0]
        tail = (f" ({len(errors)} of {len(raw)} records of {source} are bad; this is the first)"
                if len(errors) > 1 else "")
        raise DataError(f"{origin}: {message}{tail}", origin=origin, field=field_name, bad_records=len(errors))
    return records


def load_conversations(source: str, *, split: str = "train", limit: int | None = None) -> list[Conversation]:
    """Demonstration conversations from ``source`` (all validated; see the module docstring)."""
    return _validate(read_records(source, split=split, limit=limit), source, parse_conversation)


def load_prompts(source: str, *, split: str = "train", limit: int | None = None) -> list[Prompt]:
    """Prompts from ``source``; extra keys of each record end up in ``Prompt.meta``."""
    return _validate(read_records(source, split=split, limit=limit), source, parse_prompt)


def parse_prompt_or_conversation(record: Any, origin: str) -> Prompt | Conversation:
    """A prompt record (``prompt``, or ``messages`` ending with a user turn) or a conversation."""
    record = _require_object(record)
    messages = record.get("messages")
    is_prompt = "prompt" in record or (isinstance(messages, list) and messages
                                       and isinstance(messages[-1], dict) and messages[-1].get("role") == "user")
    return parse_prompt(record, origin) if is_prompt else parse_conversation(record, origin)


def load_prompts_or_conversations(source: str, *, split: str = "train",
                                  limit: int | None = None) -> list[Prompt | Conversation]:
    """Prompts and conversations from one source (comparison collection reads either, and chat logs)."""
    return _validate(read_records(source, split=split, limit=limit), source, parse_prompt_or_conversation)


def load_rankings(source: str, *, split: str = "train", limit: int | None = None) -> list[Ranking]:
    """K-wise rankings or pairwise comparisons from ``source`` (pairwise become K = 2 rankings)."""
    return _validate(read_records(source, split=split, limit=limit), source, parse_ranking)


def ranking_records(source: str, *, split: str = "train", limit: int | None = None) -> list[Any]:
    """The records of ``source`` as read (JSON objects, to be copied elsewhere), after validating
    them as :func:`load_rankings` does; the source is read once."""
    raw = read_records(source, split=split, limit=limit)
    _validate(raw, source, parse_ranking)
    return [r.value for r in raw]


def check_rankings(records: Sequence[Any], label: str) -> list[Ranking]:
    """``records`` (JSON-ready objects about to be written to ``label``, one a line) validated as
    :func:`load_rankings` will read them back; a bad one is a DataError naming ``label:<line>``."""
    raw = [RawRecord(f"{label}:{line}", record) for line, record in enumerate(records, start=1)]
    return _validate(raw, label, parse_ranking)


def train_val_split(records: list[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic split into (train, val), both in the original order.

    ``round(len * val_fraction)`` records go to val, at least 1 when ``val_fraction > 0`` and there
    are at least 2 records, and never all of them.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction: expected a number in [0, 1), got {val_fraction!r}")
    n = len(records)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = min(n_val, max(n - 1, 0))
    val_idx = set(random.Random(seed).sample(range(n), n_val))
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val
