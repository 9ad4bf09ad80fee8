"""A prompt shared by several rows runs once (rlhf_pl.models.forward): the same logits, hidden states,
rewards and gradients as one pass over every whole row, with the prompt's rows counted going through
the model once."""
from __future__ import annotations

import pytest
import torch
from tiny_models import PAD, tiny_causal_lm
from transformers import LlamaConfig, LlamaModel

from rlhf_pl.data.collate import common_prefix_length, pad_right, pad_shared_prefix
from rlhf_pl.models.forward import forward_columns, position_ids_from_mask, prefix_groups
from rlhf_pl.models.generate import response_logits
from rlhf_pl.models.reward import RewardModel
from rlhf_pl.stages.rm import RankingCollator, TokenizedRanking


def rows_of_groups(k: int = 3) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Two prompts (lengths 4 and 6, left-padded to 6), k responses each (right-padded, one ends early).
    Shapes: (2k, 6 + 5) ids and mask, prompt length 6."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 40, (4,), generator=g), torch.randint(3, 40, (6,), generator=g)]
    ids = torch.full((2 * k, 11), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row in range(2 * k):
        prompt = prompts[row // k]
        ids[row, 6 - len(prompt):6], mask[row, 6 - len(prompt):6] = prompt, 1
        n = 3 if row == 1 else 5
        ids[row, 6:6 + n], mask[row, 6:6 + n] = torch.randint(3, 40, (n,), generator=g), 1
    return ids, mask, 6


def count_rows(model: torch.nn.Module) -> list[int]:
    """Rows of each forward call of ``model`` from now on."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    return calls


def full_pass(model, ids, mask, output):
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    return out.logits if output == "logits" else out.last_hidden_state


def test_prefix_groups_number_distinct_prefixes_by_first_row():
    ids = torch.tensor([[5, 6, 1], [7, 8, 1], [5, 6, 2], [7, 8, 3], [5, 9, 1]])
    mask = torch.ones_like(ids)
    groups = prefix_groups(ids, mask, 2)
    assert groups.first.tolist() == [0, 1, 4]
    assert groups.inverse.tolist() == [0, 1, 0, 1, 2]
    mask[2, 0] = 0  # the same ids under another mask is another prefix
    assert prefix_groups(ids, mask, 2).inverse.tolist() == [0, 1, 2, 1, 3]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_prefix_logits_and_gradients_equal_one_pass_per_row(kind):
    model = tiny_causal_lm(kind).float()
    ids, mask, p = rows_of_groups()
    calls = count_rows(model)
    shared = forward_columns(model, ids, mask, p, p - 1)  # (6, 6, v)
    assert calls == [2, 6]  # the 2 prompts once, then the 6 rows' responses
    full = full_pass(model, ids, mask, "logits")[:, p - 1:]
    assert shared.shape == full.shape == (6, 6, model.config.vocab_size)
    valid = mask[:, p - 1:].bool()  # logits at padding are not compared (nothing reads them)
    torch.testing.assert_close(shared[valid], full[valid], atol=1e-5, rtol=1e-5)

    weights = torch.randn(full.shape, generator=torch.Generator().manual_seed(2)) * valid.unsqueeze(-1)
    grads = []
    for logits in (forward_columns(model, ids, mask, p, p - 1), full_pass(model, ids, mask, "logits")[:, p - 1:]):
        model.zero_grad()
        (logits * weights).sum().backward()
        grads.append({n: w.grad.clone() for n, w in model.named_parameters() if w.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[1].items():  # sums over many rows: float32 rounding relative to the largest entry
        scale = float(grad.abs().max())
        torch.testing.assert_close(grads[0][name], grad, atol=2e-6 * scale, rtol=1e-4, msg=name)
        assert scale > 0, name


def test_response_logits_run_the_prompt_once_for_its_k_samples():
    model = tiny_causal_lm("llama").float()
    ids, mask, p = rows_of_groups(k=4)
    calls = count_rows(model)
    logits = response_logits(model, ids, mask, p)  # (8, 5, v): predicting the 5 response columns
    assert calls == [2, 8]
    full = full_pass(model, ids, mask, "logits")[:, p - 1:-1]
    valid = mask[:, p:].bool()
    torch.testing.assert_close(logits[valid], full[valid], atol=1e-5, rtol=1e-5)


def test_hidden_states_of_a_trunk_from_column_zero():
    torch.manual_seed(0)
    trunk = LlamaModel(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)).eval()
    ids, mask, p = rows_of_groups()
    hidden = forward_columns(trunk, ids, mask, p, 0, "hidden")
    full = full_pass(trunk, ids, mask, "hidden")
    torch.testing.assert_close(hidden[mask.bool()], full[mask.bool()], atol=1e-5, rtol=1e-5)


def test_one_ordinary_pass_without_shared_rows_with_checkpointing_or_an_empty_prefix():
    model = tiny_causal_lm("llama").float()
    ids, mask, p = rows_of_groups(k=1)  # every prompt distinct
    calls = count_rows(model)
    forward_columns(model, ids, mask, p, p - 1)
    assert calls == [2]
    ids, mask, p = rows_of_groups(k=3)
    model.gradient_checkpointing_enable()
    forward_columns(model, ids, mask, p, p - 1)
    assert calls == [2, 6]  # transformers drops the cache when it recomputes activations: one pass
    model.gradient_checkpointing_disable()
    mask[:3, :p] = 0  # the first prompt's rows hold padding alone before column p
    forward_columns(model, ids, mask, p, p - 1)
    assert calls == [2, 6, 6]


def test_pad_shared_prefix_lays_a_prompts_rows_over_the_same_columns():
    groups = [[(1, 2, 3, 7), (1, 2, 3, 8, 9)], [(4, 5, 6, 1, 2), (4, 5, 7)], [(3, 3)]]
    assert [common_prefix_length(g) for g in groups] == [3, 2, 1]  # the last: capped at its length − 1
    ids, mask, p = pad_shared_prefix(groups, pad_id=0)
    assert p == 3
    assert ids.tolist() == [[1, 2, 3, 7, 0, 0], [1, 2, 3, 8, 9, 0],
                            [0, 4, 5, 6, 1, 2], [0, 4, 5, 7, 0, 0],
                            [0, 0, 3, 3, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0],
                             [0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0],
                             [0, 0, 1, 1, 0, 0]]


def test_reward_model_rankings_batch_scores_as_whole_rows():
    """The rm stage's batch (shared prompt columns) gives the rewards of the right-padded whole sequences."""
    torch.manual_seed(0)
    causal_lm = tiny_causal_lm("llama").float()
    rm = RewardModel.from_causal_lm(causal_lm, "linear").eval()
    items = [TokenizedRanking(((5, 6, 7, 8, 2), (5, 6, 7, 9, 10, 2), (5, 6, 7, 11, 2)), ((0,), (1, 2))),
             TokenizedRanking(((12, 13, 14, 15, 16, 17, 2), (12, 13, 14, 15, 16, 3, 2)), ((1,), (0,)))]
    batch = RankingCollator(pad_id=PAD)(items)
    assert batch.prefix_length == 5
    calls = count_rows(rm.trunk)
    shared = rm(batch.input_ids, batch.attention_mask, batch.prefix_length)
    assert calls == [2, 5]
    whole = rm(*pad_right([s for item in items for s in item.sequences], PAD))
    torch.testing.assert_close(shared.rewards, whole.rewards, atol=1e-5, rtol=1e-5)
