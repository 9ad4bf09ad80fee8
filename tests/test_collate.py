"""Padding, SFT collation (pad == eos) and the length-grouped batch sampler."""
from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import DataLoader

from rlhf_pl.data.chat import TokenizedExample, tokenize_conversation
from rlhf_pl.data.collate import LengthGroupedBatchSampler, SFTCollator, pad_left, pad_right, trim_left_padding
from rlhf_pl.data.formats import load_conversations

PAD = 1  # equal to the EOS id below: masks must not be derived from token values


def test_pad_right_and_left_exact():
    ids, mask = pad_right([[5, 6, 7], [8], [1, 1]], PAD)
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1], [1, 1, 1]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]  # the row's own 1s (=EOS) are real tokens
    ids, mask = pad_left([[5, 6, 7], [8], [1, 1]], PAD)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8], [1, 1, 1]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_pad_rejects_empty_batch():
    with pytest.raises(ValueError, match="expected at least one sequence"):
        pad_right([], PAD)


def test_sft_collator_labels_with_pad_equal_to_eos():
    examples = [
        TokenizedExample([9, 4, 5, PAD, 2], [0, 0, 1, 1, 0]),  # ... answer <eos> "\n"
        TokenizedExample([9, 6, PAD], [0, 1, 1]),
    ]
    batch = SFTCollator(pad_id=PAD)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[9, 4, 5, 1, 2], [9, 6, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 5, 1, -100], [-100, 6, 1, -100, -100]]
    assert all(t.shape == (2, 5) and t.dtype == torch.long for t in batch.values())


def test_sft_collator_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="example 0 has 3 input ids but 2 loss-mask entries"):
        SFTCollator(PAD)([TokenizedExample([1, 2, 3], [0, 1])])


def test_collator_over_real_conversations_trains_only_masked_tokens(tiny_tokenizer):
    conversations = load_conversations("embedded:demonstrations", limit=6)
    examples = [tokenize_conversation(tiny_tokenizer, c.messages) for c in conversations]
    batch = SFTCollator(tiny_tokenizer.pad_token_id)(examples)
    assert batch["input_ids"].shape == (6, max(len(e.input_ids) for e in examples))
    assert batch["attention_mask"].sum(1).tolist() == [len(e.input_ids) for e in examples]
    assert (batch["labels"] != -100).sum(1).tolist() == [sum(e.loss_mask) for e in examples]
    # each example's last trained token is <|im_end|> = the pad id, and it is a label
    last = [max(i for i, m in enumerate(e.loss_mask) if m) for e in examples]
    assert [batch["labels"][r, c].item() for r, c in enumerate(last)] == [tiny_tokenizer.pad_token_id] * 6


# --- LengthGroupedBatchSampler ------------------------------------------------------------------


def lengths_of(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 300) for _ in range(n)]


def test_sampler_covers_every_index_once_and_len_is_right():
    lengths = lengths_of(1003)
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 126  # ceil(1003 / 8)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert sorted(len(b) for b in batches)[0] == 3 and sum(len(b) != 8 for b in batches) == 1


def test_sampler_drop_last():
    sampler = LengthGroupedBatchSampler(lengths_of(1003), batch_size=8, seed=0, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 125 and all(len(b) == 8 for b in batches)
    assert len({i for b in batches for i in b}) == 1000


def test_sampler_batches_are_length_homogeneous():
    lengths = lengths_of(200)
    batches = list(LengthGroupedBatchSampler(lengths, batch_size=4, seed=1))  # one mega-batch: fully sorted
    spans = [(min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches]
    for (lo_a, hi_a) in spans:  # no two batches interleave in length
        assert all(hi_a <= lo_b or hi_b <= lo_a or (lo_a, hi_a) == (lo_b, hi_b) for lo_b, hi_b in spans)
    big = lengths_of(4000, seed=2)  # several mega-batches: much less spread than random batching
    grouped = list(LengthGroupedBatchSampler(big, batch_size=4, seed=0))
    spread = lambda bs: sum(max(big[i] for i in b) - min(big[i] for i in b) for b in bs) / len(bs)  # noqa: E731
    shuffled = list(range(4000))
    random.Random(0).shuffle(shuffled)
    assert spread(grouped) < 0.1 * spread([shuffled[i : i + 4] for i in range(0, 4000, 4)])


def test_sampler_order_depends_on_epoch_and_seed_only():
    lengths = lengths_of(500)
    sampler = LengthGroupedBatchSampler(lengths, batch_size=5, seed=3)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(map(sorted, second)) != sorted(map(sorted, first))
    assert list(LengthGroupedBatchSampler(lengths, batch_size=5, seed=3)) == first


def test_sampler_without_shuffle_is_sorted_in_order():
    lengths = [3, 9, 1, 7, 5]
    assert list(LengthGroupedBatchSampler(lengths, batch_size=2, seed=0, shuffle=False)) == [[1, 3], [4, 0], [2]]


def test_sampler_shards_across_replicas():
    lengths = lengths_of(103)
    shards = [list(LengthGroupedBatchSampler(lengths, batch_size=4, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shards] == [9, 9, 9]  # ceil(103 / 12) global batches of 3 · 4
    every = [i for s in shards for b in s for i in b]
    assert sorted(every) == list(range(103))  # disjoint shards covering everything (103 = 8·12 + 7: no fill-up)
    with pytest.raises(ValueError, match=r"rank must be in \[0, num_replicas=2\), got 2"):
        LengthGroupedBatchSampler(lengths, 4, 0, num_replicas=2, rank=2)


def test_replicas_step_through_the_batches_of_one_process_with_the_global_batch():
    """W ranks with batch b: step i of all ranks together = step i of one process with batch b·W."""
    lengths = lengths_of(90)
    for epoch in (0, 1):
        one = LengthGroupedBatchSampler(lengths, batch_size=8, seed=5)
        ranks = [LengthGroupedBatchSampler(lengths, batch_size=4, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        together = [sorted(a + b) for a, b in zip(*(list(r) for r in ranks))]
        assert together == [sorted(batch) for batch in one]
    first, second = (list(LengthGroupedBatchSampler(lengths, 4, 5, num_replicas=2, rank=0)) for _ in range(2))
    assert first == second  # deterministic
    moved = LengthGroupedBatchSampler(lengths, 4, 5, num_replicas=2, rank=0)
    moved.set_epoch(1)
    assert list(moved) != first  # a new order per epoch


def test_a_last_global_batch_smaller_than_the_replicas_is_filled_up():
    shards = [list(LengthGroupedBatchSampler([1] * 5, batch_size=2, seed=0, shuffle=False, num_replicas=2, rank=r))
              for r in (0, 1)]
    assert shards == [[[0, 2], [4]], [[1, 3], [4]]]  # index 4 alone: both ranks get it, none is empty
    dropped = LengthGroupedBatchSampler([1] * 5, batch_size=2, seed=0, shuffle=False, num_replicas=2, rank=1,
                                        drop_last=True)
    assert list(dropped) == [[1, 3]] and len(dropped) == 1


def test_dataloader_with_sampler_and_collator(tiny_tokenizer):
    conversations = load_conversations("embedded:demonstrations", limit=64)
    examples = [tokenize_conversation(tiny_tokenizer, c.messages) for c in conversations]
    sampler = LengthGroupedBatchSampler([len(e.input_ids) for e in examples], batch_size=8, seed=0)
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=SFTCollator(tiny_tokenizer.pad_token_id))
    batches = list(loader)
    assert len(batches) == 8
    assert sum(b["attention_mask"].sum().item() for b in batches) == sum(len(e.input_ids) for e in examples)


def test_sampler_without_grouping_keeps_the_shuffled_order():
    lengths = lengths_of(40)
    plain = list(LengthGroupedBatchSampler(lengths, batch_size=4, seed=0, shuffle=False, group=False))
    assert plain == [list(range(i, i + 4)) for i in range(0, 40, 4)]


def test_lightning_starts_each_epoch_of_the_batch_sampler(tmp_path):
    """Lightning calls ``set_epoch`` on ``batch_sampler.sampler`` only: each epoch must get a new order."""
    import lightning as L

    from rlhf_pl.data.collate import batched_loader

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch)
            return self.w ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = batched_loader(list(range(12)), [1] * 12, list, 4, seed=0, shuffle=True)
    module = Recorder()
    L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, use_distributed_sampler=False, default_root_dir=tmp_path).fit(module, loader)
    first, second = module.seen[:3], module.seen[3:]
    assert len(second) == 3 and loader.batch_sampler.epoch == 1
    assert sorted(i for b in first for i in b) == sorted(i for b in second for i in b) == list(range(12))
    assert first != second


def test_trim_left_padding_drops_only_all_padding_columns():
    ids = torch.tensor([[0, 0, 0, 5, 6], [0, 0, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    trimmed, trimmed_mask = trim_left_padding(ids, mask)
    assert trimmed.tolist() == [[0, 5, 6], [7, 8, 9]] and trimmed_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
