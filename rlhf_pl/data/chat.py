"""Chat templating with assistant-only loss masks, and the length rule for long examples.

A conversation is rendered with the tokenizer's chat template segment by segment: each segment is
the text that rendering ``messages[:k + 1]`` adds to rendering ``messages[:k]``. An assistant turn
is split further into its generation prompt (``<|im_start|>assistant\\n``, not trained), the
answer with its end-of-turn marker (``answer<|im_end|>``, trained) and what the template writes
after the marker (``\\n``, not trained). Each segment is tokenized on its own with
``add_special_tokens=False``, so

    tokenize_prompt(messages) + tokenize_completion(answer)

is exactly the token sequence that ``tokenize_conversation`` trains on for
``messages + [assistant: answer]`` (up to the text after the end-of-turn marker). Templates whose
rendering of a conversation does not start with the rendering of its prefix (e.g. ones that
rewrite earlier turns) are refused with :class:`ChatTemplateError`.
"""
from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Sequence

from rlhf_pl.config import OVERLONG_RULES
from rlhf_pl.data.formats import Message, as_dicts
from rlhf_pl.errors import UserError

#: ChatML, the default when neither the config nor the tokenizer has a template. A turn renders as
#: ``<|im_start|>{role}\n{content}<|im_end|>\n``; the generation prompt is ``<|im_start|>assistant\n``.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_PROBE_USER = "Hi"  # the user turn before an answer rendered on its own (tokenize_completion)


class ChatTemplateError(UserError, ValueError):
    """The chat template cannot be split into prompt and answer segments."""


class TokenizedExample(NamedTuple):
    """One tokenized conversation. Both lists have the same length t."""

    input_ids: list[int]
    loss_mask: list[int]  # 1 = token trained on (assistant content + end-of-turn marker), else 0


class LengthReport(NamedTuple):
    """What :func:`apply_length_rule` did. ``kept`` includes the truncated ones; kept + dropped = total."""

    kept: int
    truncated: int
    dropped: int


def ensure_chat_template(tokenizer: Any, override: str | None = None) -> None:
    """Give ``tokenizer`` a chat template: ``override`` if given (``"chatml"``: :data:`CHATML_TEMPLATE`),
    else its own, else ChatML.

    ChatML on a tokenizer that lacks ``<|im_start|>``/``<|im_end|>`` as single tokens still works
    (the markers are spelled with several tokens) but generation will not stop at EOS; a warning
    says so.
    """
    if override:
        tokenizer.chat_template = CHATML_TEMPLATE if override == "chatml" else override
        return
    if getattr(tokenizer, "chat_template", None):
        return
    tokenizer.chat_template = CHATML_TEMPLATE
    vocab = tokenizer.get_vocab()
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in vocab]
    if missing:
        warnings.warn(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template and no token(s) {missing}; "
            "using ChatML with those markers spelled as text. Set model.chat_template to a template that "
            "ends assistant turns with the tokenizer's eos_token.",
            stacklevel=2,
        )


def _render(tokenizer: Any, messages: Sequence[Message], *, generation_prompt: bool = False) -> str:
    """The chat template's text for ``messages``; the empty prefix renders as ''."""
    if not messages and not generation_prompt:
        return ""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("tokenizer has no chat template; call ensure_chat_template(tokenizer) first")
    return tokenizer.apply_chat_template(as_dicts(messages), tokenize=False, add_generation_prompt=generation_prompt)


def _delta(before: str, after: str, what: str) -> str:
    """``after`` minus its prefix ``before``; refuses templates that are not prefix-stable."""
    if not after.startswith(before):
        cut = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
        raise ChatTemplateError(
            f"chat template is not prefix-stable at {what}: rendering the longer conversation changes earlier text "
            f"at character {cut} ({before[cut:cut + 40]!r} became {after[cut:cut + 40]!r}); "
            "use a template that renders each turn independently (model.chat_template)"
        )
    return after[len(before) :]


class _AnswerSplit(NamedTuple):
    generation_prompt: str  # e.g. "<|im_start|>assistant\n" (not trained)
    answer: str  # content + end-of-turn marker, e.g. "42.<|im_end|>" (trained)
    trailer: str  # what follows the marker, e.g. "\n" (not trained)


def _split_assistant_turn(tokenizer: Any, messages: Sequence[Message], k: int) -> _AnswerSplit:
    """Segments of the assistant turn ``messages[k]`` given the rendering of ``messages[:k]``."""
    before = _render(tokenizer, messages[:k])
    with_prompt = _render(tokenizer, messages[:k], generation_prompt=True)
    full = _render(tokenizer, messages[: k + 1])
    gen_prompt = _delta(before, with_prompt, f"the generation prompt of message {k}")
    rest = _delta(with_prompt, full, f"assistant message {k}")
    content = messages[k].content
    for shown in (content, content.strip()):
        if rest.startswith(shown):
            marker_and_trailer = rest[len(shown) :]
            marker = marker_and_trailer.rstrip()
            return _AnswerSplit(gen_prompt, shown + marker, marker_and_trailer[len(marker) :])
    raise ChatTemplateError(
        f"chat template does not render assistant message {k} right after the generation prompt: "
        f"expected it to start with {content[:40]!r}, got {rest[:60]!r}"
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _segments(tokenizer: Any, messages: Sequence[Message], *, generation_prompt: bool) -> list[tuple[str, int]]:
    """(text, trained) segments of ``messages`` as the chat template renders them."""
    segments: list[tuple[str, int]] = []
    for k, message in enumerate(messages):
        if message.role == "assistant":
            split = _split_assistant_turn(tokenizer, messages, k)
            segments += [(split.generation_prompt, 0), (split.answer, 1), (split.trailer, 0)]
        else:
            before, after = _render(tokenizer, messages[:k]), _render(tokenizer, messages[: k + 1])
            segments.append((_delta(before, after, f"message {k}"), 0))
    if generation_prompt:
        gen = _delta(_render(tokenizer, messages), _render(tokenizer, messages, generation_prompt=True),
                     "the generation prompt")
        segments.append((gen, 0))
    return segments


def tokenize_conversation(tokenizer: Any, messages: Sequence[Message]) -> TokenizedExample:
    """Token ids and loss mask of a conversation; mask 1 exactly on each assistant answer and its
    end-of-turn marker. Shapes: both lists of length t."""
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in _segments(tokenizer, messages, generation_prompt=False):
        piece = _encode(tokenizer, text)
        ids += piece
        mask += [trained] * len(piece)
    return TokenizedExample(ids, mask)


def tokenize_prompt(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """The prompt as the model sees it when generating (ending with the generation prompt).

    Equal to the prefix that :func:`tokenize_conversation` produces for ``messages`` followed by an
    assistant turn. Shape: (t_prompt,).
    """
    if not messages or messages[-1].role != "user":
        raise ValueError("tokenize_prompt: expected messages ending with a user turn, "
                         f"got roles {[m.role for m in messages]}")
    return [i for text, _ in _segments(tokenizer, messages, generation_prompt=True) for i in _encode(tokenizer, text)]


def tokenize_completion(tokenizer: Any, text: str) -> list[int]:
    """The tokens of an assistant answer including the end-of-turn marker (e.g. ``42.<|im_end|>``),
    identical to the trained segment of :func:`tokenize_conversation`. Shape: (t_completion,)."""
    messages = (Message("user", _PROBE_USER), Message("assistant", text))
    return _encode(tokenizer, _split_assistant_turn(tokenizer, messages, 1).answer)


def end_of_turn_text(tokenizer: Any) -> str:
    """The marker the template puts after an answer (``<|im_end|>`` for ChatML)."""
    probe = "x"
    messages = (Message("user", _PROBE_USER), Message("assistant", probe))
    return _split_assistant_turn(tokenizer, messages, 1).answer[len(probe) :]


def apply_length_rule(examples: list[TokenizedExample], max_length: int,
                      rule: str) -> tuple[list[TokenizedExample], LengthReport]:
    """Handle examples longer than ``max_length`` tokens.

    ``truncate`` keeps the first ``max_length`` tokens (an example left with no trained token is
    dropped); ``drop`` drops every overlong example. Shorter examples are kept unchanged.
    """
    if rule not in OVERLONG_RULES:
        raise ValueError(f"data.overlong: expected one of {', '.join(OVERLONG_RULES)}, got {rule!r}")
    if max_length < 1:
        raise ValueError(f"data.max_length: expected a positive number of tokens, got {max_length!r}")
    kept: list[TokenizedExample] = []
    truncated = dropped = 0
    for ex in examples:
        if len(ex.input_ids) <= max_length:
            kept.append(ex)
        elif rule == "drop" or not any(ex.loss_mask[:max_length]):
            dropped += 1
        else:
            kept.append(TokenizedExample(ex.input_ids[:max_length], ex.loss_mask[:max_length]))
            truncated += 1
    return kept, LengthReport(kept=len(kept), truncated=truncated, dropped=dropped)
