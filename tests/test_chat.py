"""Chat templating: exact assistant masks, prompt/completion consistency, templates, length rule."""
from __future__ import annotations

import copy

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_pl.data.chat import (
    CHATML_TEMPLATE,
    ChatTemplateError,
    LengthReport,
    TokenizedExample,
    apply_length_rule,
    end_of_turn_text,
    ensure_chat_template,
    tokenize_completion,
    tokenize_conversation,
    tokenize_prompt,
)
from rlhf_pl.data.formats import Message, as_dicts, load_conversations

CONVERSATION = (
    Message("system", "Be brief."),
    Message("user", "What is 2 + 3?"),
    Message("assistant", "2 + 3 = 5."),
    Message("user", "Now add 10 to that."),
    Message("assistant", "5 + 10 = 15."),
)


def decode_where(tokenizer, example: TokenizedExample, keep: int) -> str:
    return tokenizer.decode([i for i, m in zip(example.input_ids, example.loss_mask) if m == keep])


def test_exact_loss_mask_of_a_two_answer_conversation(tiny_tokenizer):
    ex = tokenize_conversation(tiny_tokenizer, CONVERSATION)
    assert len(ex.input_ids) == len(ex.loss_mask)
    assert decode_where(tiny_tokenizer, ex, 1) == "2 + 3 = 5.<|im_end|>5 + 10 = 15.<|im_end|>"
    assert decode_where(tiny_tokenizer, ex, 0) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
        "\n<|im_start|>user\nNow add 10 to that.<|im_end|>\n<|im_start|>assistant\n\n"
    )
    # the whole sequence is exactly what the template renders, token for token
    rendered = tiny_tokenizer.apply_chat_template(as_dicts(CONVERSATION), tokenize=False)
    assert ex.input_ids == tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_mask_positions_around_end_of_turn(tiny_tokenizer):
    ex = tokenize_conversation(tiny_tokenizer, CONVERSATION)
    eos, newline = tiny_tokenizer.eos_token_id, tiny_tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    eos_positions = [i for i, t in enumerate(ex.input_ids) if t == eos]
    assert len(eos_positions) == 5  # system, user, assistant, user, assistant
    assert [ex.loss_mask[i] for i in eos_positions] == [0, 0, 1, 0, 1]  # only assistant turns' <|im_end|>
    assert [ex.input_ids[i + 1] for i in eos_positions] == newline * 5
    assert [ex.loss_mask[i + 1] for i in eos_positions] == [0] * 5  # the newline after it is never trained
    # trained tokens form exactly two contiguous runs, each ending with <|im_end|>
    runs = [i for i in range(len(ex.loss_mask)) if ex.loss_mask[i] == 1 and (i == 0 or ex.loss_mask[i - 1] == 0)]
    assert len(runs) == 2


def test_prompt_plus_completion_equals_conversation(tiny_tokenizer):
    ex = tokenize_conversation(tiny_tokenizer, CONVERSATION)
    prompt = tokenize_prompt(tiny_tokenizer, CONVERSATION[:-1])
    completion = tokenize_completion(tiny_tokenizer, CONVERSATION[-1].content)
    assert prompt + completion == ex.input_ids[:-1]  # all but the trailing "\n"
    assert ex.loss_mask[len(prompt) : len(prompt) + len(completion)] == [1] * len(completion)
    assert tiny_tokenizer.decode(completion) == "5 + 10 = 15.<|im_end|>"
    assert completion[-1] == tiny_tokenizer.eos_token_id
    # the prompt is what generation sees: the template with the generation prompt
    as_generated = tiny_tokenizer.apply_chat_template(as_dicts(CONVERSATION[:-1]), add_generation_prompt=True,
                                                      return_dict=False)
    assert prompt == as_generated
    assert tiny_tokenizer.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_consistency_over_the_embedded_demonstrations(tiny_tokenizer):
    for conv in load_conversations("embedded:demonstrations", limit=40):
        ex = tokenize_conversation(tiny_tokenizer, conv.messages)
        k = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
        prompt = tokenize_prompt(tiny_tokenizer, conv.messages[:k])
        completion = tokenize_completion(tiny_tokenizer, conv.messages[k].content)
        assert ex.input_ids[: len(prompt) + len(completion)] == prompt + completion, conv.origin
        answers = "".join(m.content + "<|im_end|>" for m in conv.messages if m.role == "assistant")
        assert decode_where(tiny_tokenizer, ex, 1) == answers, conv.origin


def test_tokenize_prompt_requires_a_final_user_turn(tiny_tokenizer):
    with pytest.raises(ValueError,
                       match=r"expected messages ending with a user turn, got roles \['user', 'assistant'\]"):
        tokenize_prompt(tiny_tokenizer, CONVERSATION[1:3])


def test_end_of_turn_text_is_eos(tiny_tokenizer):
    assert end_of_turn_text(tiny_tokenizer) == "<|im_end|>" == tiny_tokenizer.eos_token


def test_template_that_trims_content(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML_TEMPLATE.replace("message['content']", "message['content'] | trim")
    messages = (Message("user", "Hi"), Message("assistant", "  Hello. "))
    assert decode_where(tok, tokenize_conversation(tok, messages), 1) == "Hello.<|im_end|>"
    assert tok.decode(tokenize_completion(tok, "  Hello. ")) == "Hello.<|im_end|>"


def test_non_prefix_stable_template_is_refused(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{{ messages | length }}\n" + CHATML_TEMPLATE  # every turn rewrites the header
    with pytest.raises(ChatTemplateError, match=r"not prefix-stable at assistant message 1: .* at character 0 "
                                                r"\('1\\n<\|im_start\|>user.*' became '2\\n"):
        tokenize_conversation(tok, CONVERSATION[1:3] + (Message("user", "again"),))


def test_ensure_chat_template_override_own_and_default(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    ensure_chat_template(tok, "{{ 'x' }}")
    assert tok.chat_template == "{{ 'x' }}"
    ensure_chat_template(tok)  # keeps its own
    assert tok.chat_template == "{{ 'x' }}"
    tok.chat_template = None
    ensure_chat_template(tok)
    assert tok.chat_template == CHATML_TEMPLATE


def test_chatml_default_warns_when_markers_are_not_tokens():
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.warns(UserWarning, match=r"no token\(s\) \['<\|im_start\|>', '<\|im_end\|>'\]"):
        ensure_chat_template(tok)
    assert tok.chat_template == CHATML_TEMPLATE


# --- length rule --------------------------------------------------------------------------------


def ex(n_prompt: int, n_answer: int) -> TokenizedExample:
    return TokenizedExample(list(range(n_prompt + n_answer)), [0] * n_prompt + [1] * n_answer)


def test_truncate_keeps_first_tokens_and_drops_untrainable():
    examples = [ex(2, 2), ex(3, 5), ex(9, 1), ex(6, 0)]
    kept, report = apply_length_rule(examples, max_length=6, rule="truncate")
    assert report == LengthReport(kept=3, truncated=1, dropped=1)
    assert kept[0] == examples[0]
    assert kept[1] == TokenizedExample([0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 1, 1])
    assert kept[2] == examples[3]  # not overlong: kept as is


def test_drop_rule_drops_every_overlong_example():
    kept, report = apply_length_rule([ex(2, 2), ex(3, 5), ex(9, 1)], max_length=6, rule="drop")
    assert report == LengthReport(kept=1, truncated=0, dropped=2) and kept == [ex(2, 2)]


def test_bad_length_rule_lists_choices():
    with pytest.raises(ValueError, match="data.overlong: expected one of truncate, drop, got 'cut'"):
        apply_length_rule([ex(1, 1)], 4, "cut")
    with pytest.raises(ValueError, match="data.max_length: expected a positive number of tokens, got 0"):
        apply_length_rule([ex(1, 1)], 0, "drop")
