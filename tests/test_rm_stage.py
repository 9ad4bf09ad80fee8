"""The rm stage: length rule, collation, one forward per completion, metrics, learning, end to end."""
from __future__ import annotations

import copy
import json
import logging
import math
import random
from pathlib import Path

import lightning as L
import pytest
import torch

from rlhf_pl.config import OptimConfig, validate_config
from rlhf_pl.data.chat import tokenize_completion, tokenize_prompt
from rlhf_pl.data.formats import Conversation, Message, Ranking
from rlhf_pl.models.reward import RewardModel
from rlhf_pl.outputs import Inputs
from rlhf_pl.stages.rm import (
    INPUTS,
    RankingCollator,
    RewardModelModule,
    TokenizedRanking,
    demonstration_references,
    fit_to_length,
    init_model_config,
    kendall_per_prompt,
    make_loader,
    tokenize_rankings,
)

MARKER = 300  # token id that makes a completion win in the synthetic task


def test_fit_to_length_keeps_short_examples_and_cuts_prompt_start_first():
    assert fit_to_length([1, 2, 3], [[4], [5, 6]], 10) == (((1, 2, 3, 4), (1, 2, 3, 5, 6)), False)
    # longest completion 2 -> the prompt keeps its last 3 tokens, the same cut for every completion
    assert fit_to_length([1, 2, 3, 4, 5, 6], [[7, 8], [9]], 5) == (((4, 5, 6, 7, 8), (4, 5, 6, 9)), True)
    # a completion longer than max_length: the prompt keeps max_length // 2 = 3 tokens, completions cut at the end
    assert fit_to_length([1, 2, 3, 4], [[5, 6, 7, 8, 9, 10]], 6) == (((2, 3, 4, 5, 6, 7),), True)


def test_tokenize_rankings_chat_templates_once_and_applies_the_length_rule(tiny_tokenizer):
    prompt = (Message("user", "Which colour is the sky?"),)
    ranking = Ranking(prompt, ("Blue.", "Green, I think."), ((0,), (1,)), "c.jsonl:1")
    items, report = tokenize_rankings([ranking], tiny_tokenizer, 512, "truncate")
    prompt_ids = tokenize_prompt(tiny_tokenizer, prompt)
    assert items[0].sequences == tuple(tuple(prompt_ids + tokenize_completion(tiny_tokenizer, c))
                                       for c in ranking.completions)
    assert items[0].groups == ((0,), (1,)) and tuple(report) == (1, 0, 0)
    short = len(items[0].sequences[0])  # the longer completion does not fit
    assert tuple(tokenize_rankings([ranking], tiny_tokenizer, short, "truncate")[1]) == (1, 1, 0)
    assert tuple(tokenize_rankings([ranking], tiny_tokenizer, short, "drop")[1]) == (0, 0, 1)
    with pytest.raises(ValueError, match="data.overlong='cut'; choose one of: truncate, drop"):
        tokenize_rankings([ranking], tiny_tokenizer, 512, "cut")


def test_collator_flattens_completions_and_offsets_pairs():
    items = [
        TokenizedRanking(((1, 2), (3,), (4, 5, 6)), ((1,), (0, 2))),  # K = 3: 1 beats the tied 0 and 2
        TokenizedRanking(((7,), (8, 9)), ((1,), (0,))),  # K = 2: 1 beats 0
    ]
    batch = RankingCollator(pad_id=0)(items)
    assert batch.input_ids.tolist() == [[1, 2, 0], [3, 0, 0], [4, 5, 6], [7, 0, 0], [8, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch.pair_index.tolist() == [[1, 0], [1, 2], [4, 3]]
    assert batch.pair_prompt.tolist() == [0, 0, 1]
    assert batch.completion_prompt.tolist() == [0, 0, 0, 1, 1]
    assert batch.rank_position.tolist() == [1, 0, 1, 1, 0]
    assert batch.n_prompts == 2


def test_kendall_per_prompt_hand_computed():
    # prompt 0: rewards [3, 1, 2, 0] vs ranking ((0,), (1, 2), (3,)): 5 concordant pairs, 1 tie in the
    # labels, 0 discordant -> tau_b = 5 / sqrt(6 * 5); prompt 1 has K = 2 (skipped); prompt 2 is reversed
    rewards = torch.tensor([3.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0, 2.0])
    positions = torch.tensor([0, 1, 1, 2, 0, 1, 0, 1, 2])
    prompts = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    taus = kendall_per_prompt(rewards, positions, prompts, 3)
    assert taus.tolist() == pytest.approx([5 / math.sqrt(30), -1.0], abs=1e-6)


def _synthetic_ranking(rng: random.Random, k: int, eos: int) -> TokenizedRanking:
    """Random prompt; K random completions, the ones containing MARKER tie first, the rest tie last."""
    prompt = [rng.randrange(10, 250) for _ in range(rng.randint(3, 6))]
    n_win = rng.randint(1, k - 1)
    sequences = []
    for i in range(k):
        body = [rng.randrange(10, 250) for _ in range(rng.randint(2, 5))]
        if i < n_win:
            body.insert(rng.randrange(len(body) + 1), MARKER)
        sequences.append(tuple(prompt + body + [eos]))
    order = list(range(k))
    rng.shuffle(order)  # completion j of the item is sequence order[j]
    shuffled = tuple(sequences[o] for o in order)
    winners = tuple(j for j, o in enumerate(order) if o < n_win)
    losers = tuple(j for j, o in enumerate(order) if o >= n_win)
    return TokenizedRanking(shuffled, (winners, losers))


@pytest.mark.filterwarnings(r"ignore:You are trying to `self\.log\(\)`")
def test_exactly_one_forward_row_per_completion(tiny_model, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    strict = lambda k: TokenizedRanking(tuple((20 + i, 30 + i, eos) for i in range(k)), tuple((i,) for i in range(k)))  # noqa: E731
    batch = RankingCollator(tiny_tokenizer.pad_token_id)([strict(4), strict(2), strict(3)])
    module = RewardModelModule(RewardModel.from_causal_lm(copy.deepcopy(tiny_model), "linear"), OptimConfig())
    trunk = module.reward_model.trunk
    calls, rows = [], []
    original = trunk.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        rows.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    trunk.forward = counting_forward
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    assert batch.pair_index.shape[0] == 6 + 1 + 3  # K(K-1)/2 pairs per prompt ...
    assert len(calls) == 1 and rows == [4 + 2 + 3]  # ... yet each completion is run exactly once


def test_tiny_llama_learns_marker_preference(tiny_model, tiny_tokenizer, one_thread):
    """Completions containing the marker token win; > 90 % held-out pairwise accuracy in seconds."""
    torch.manual_seed(0)
    rng = random.Random(0)
    eos = tiny_tokenizer.eos_token_id
    train = [_synthetic_ranking(rng, rng.choice((2, 3, 4)), eos) for _ in range(160)]
    val = [_synthetic_ranking(rng, 4, eos) for _ in range(40)]
    model = RewardModel.from_causal_lm(copy.deepcopy(tiny_model).train(), "linear")
    module = RewardModelModule(model, OptimConfig(lr=2e-3, warmup_ratio=0.0, schedule="constant"))
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    pad = tiny_tokenizer.pad_token_id
    trainer.fit(module, make_loader(train, pad, 8, 0, trainer, train=True),
                make_loader(val, pad, 8, 0, trainer, train=False))
    results = module.val_results
    assert results["val/accuracy"] > 0.9, results
    assert results["val/margin"] > 0 and results["val/kendall_tau"] > 0.5
    assert trainer.global_step == 3 * 20


def test_demonstration_references_use_the_last_assistant_turn(tiny_tokenizer):
    turns = (Message("system", "Be brief."), Message("user", "2+2?"), Message("assistant", "4."),
             Message("user", "And 3+3?"), Message("assistant", "6."))
    refs = demonstration_references([Conversation(turns, "demo.jsonl:1")], tiny_tokenizer, 512)
    expected = tokenize_prompt(tiny_tokenizer, turns[:4]) + tokenize_completion(tiny_tokenizer, "6.")
    assert refs == [tuple(expected)]


def _compose(*overrides: str):
    from hydra import compose, initialize_config_module

    from rlhf_pl.config import register_configs

    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_init_from_auto_without_sft_output_uses_base_model(tmp_path, caplog):
    cfg = _compose("+stage=rm", "model=tiny", f"paths.output_root={tmp_path}")
    with caplog.at_level(logging.WARNING, logger="rlhf_pl.stages.rm"):
        model_cfg, described = init_model_config(cfg, Inputs(cfg, INPUTS)["init"])
    assert model_cfg.name_or_path == "tiny" and described == "base model tiny"
    assert "no SFT output recorded for model 'tiny'" in caplog.text
    bad = _compose("+stage=rm", "model=tiny", f"rm.init_from={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match=r"rm.init_from=.*nowhere.*valid: 'auto'"):
        Inputs(bad, INPUTS)["init"]


def test_rm_config_values_are_checked():
    cfg = _compose("+stage=rm", "model=tiny", "rm.normalise_on=samples")
    with pytest.raises(ValueError, match="rm.normalise_on='samples': choose one of: demonstrations, prompts_samples"):
        validate_config(cfg)
    with pytest.raises(ValueError, match="rm.batch_size=0: must be an integer >= 1"):
        validate_config(_compose("+stage=rm", "rm.batch_size=0"))


def _write_comparisons(path: Path, n: int) -> None:
    """K = 4 and pairwise records: answers naming the right colour win, the rest tie."""
    rng = random.Random(1)
    colours = ["red", "blue", "green", "yellow", "white", "black"]
    with path.open("w") as f:
        for i in range(n):
            right = rng.choice(colours)
            wrong = rng.sample([c for c in colours if c != right], 3)
            prompt = f"Name the colour {right}, please."
            if i % 4 == 3:
                f.write(json.dumps({"prompt": prompt, "chosen": f"It is {right}.",
                                    "rejected": f"It is {wrong[0]}."}) + "\n")
                continue
            completions = [f"It is {right}."] + [f"It is {w}." for w in wrong]
            order = list(range(4))
            rng.shuffle(order)
            shuffled = [completions[o] for o in order]
            f.write(json.dumps({"prompt": prompt, "completions": shuffled,
                                "ranking": [order.index(0), [j for j in range(4) if order[j] != 0]]}) + "\n")


def test_stage_end_to_end_from_the_command_line_config(tmp_path, tiny_model, tiny_tokenizer, one_thread):
    from rlhf_pl import outputs
    from rlhf_pl.models.loading import save_pretrained_atomic
    from rlhf_pl.run import run_stage

    comparisons = tmp_path / "comparisons.jsonl"
    _write_comparisons(comparisons, 40)
    cfg = _compose(
        "+stage=rm", "experiment=quick", "reward_head=ensemble", "reward_head.n_heads=2",
        f"data.comparisons={comparisons}", "data.val_fraction=0.25", f"paths.output_root={tmp_path / 'outputs'}",
        "trainer.enable_progress_bar=false", "rm.normalise_on=prompts_samples", "rm.normalise_size=6",
        "rm.normalise_max_new_tokens=4", "rm.batch_size=4",
    )
    sft_dir = save_pretrained_atomic(tiny_model, tiny_tokenizer, tmp_path / "sft_model")
    outputs.record(cfg, "sft", {"model": sft_dir})  # init_from=auto must pick this up

    summary = run_stage(cfg).metrics

    run_dir = Path(summary["reward_model_dir"]).parent
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["stage"] == "rm" and on_disk["init_from"] == str(sft_dir)
    # 30 / 4 -> 8 steps
    assert on_disk["train_prompts"] == 30 and on_disk["val_prompts"] == 10 and on_disk["steps"] == 8
    for key in ("val_accuracy", "val_margin", "val_kendall_tau", "val_loss"):
        assert math.isfinite(on_disk[key]), key
    assert on_disk["normalisation"]["n"] == 6 and on_disk["reward_head"] == "ensemble"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert outputs.latest(cfg, "rm", "reward_model") == (run_dir / "reward_model").resolve()

    loaded = RewardModel.from_pretrained(run_dir / "reward_model")
    assert loaded.head_choice.name == "ensemble" and loaded.normalisation_info["n"] == 6
    scores = loaded.score(["Name the colour red, please."], ["It is red."])
    assert scores.shape == (1,) and torch.isfinite(scores).all()


def test_raw_rewards_batch_by_length_but_keep_the_input_order(tiny_model):
    from rlhf_pl.stages.rm import raw_rewards

    model = RewardModel.from_causal_lm(copy.deepcopy(tiny_model), "linear").eval()
    rng = random.Random(0)
    sequences = [tuple(rng.randrange(3, 500) for _ in range(rng.randint(2, 30))) for _ in range(11)]
    one_by_one = torch.cat([raw_rewards(model, [s], pad_id=0, batch_size=1) for s in sequences])
    batched = raw_rewards(model, sequences, pad_id=0, batch_size=4)
    assert batched.shape == (11,)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    assert model.training is False


def test_a_reward_model_given_as_init_from_is_trained_further_head_included(tmp_path, tiny_model, tiny_tokenizer,
                                                                           one_thread):
    from rlhf_pl.errors import ConfigError
    from rlhf_pl.models.loading import save_pretrained_atomic
    from rlhf_pl.run import run_stage
    from rlhf_pl.stages.rm import continued_reward_model, head_from_config

    comparisons = tmp_path / "comparisons.jsonl"
    _write_comparisons(comparisons, 24)
    sft_dir = save_pretrained_atomic(tiny_model, tiny_tokenizer, tmp_path / "sft_model")
    common = ("+stage=rm", "experiment=quick", f"data.comparisons={comparisons}", "trainer.enable_progress_bar=false",
              f"paths.output_root={tmp_path / 'outputs'}", "rm.batch_size=4", "rm.normalise_size=6")
    first = Path(run_stage(_compose(*common, f"rm.init_from={sft_dir}")).metrics["reward_model_dir"])

    cfg = _compose(*common, f"rm.init_from={first}", "rm.optim.lr=1e-5")
    start = continued_reward_model(cfg, first, head_from_config(cfg.reward_head))
    saved = RewardModel.from_pretrained(first)
    assert all(p.requires_grad for p in start.parameters())
    for (name, a), b in zip(start.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), name  # trunk, head and normalisation as saved

    summary = run_stage(cfg).metrics
    assert summary["init_from"] == f"reward model {first}"
    second = RewardModel.from_pretrained(summary["reward_model_dir"])
    w1, w2 = (torch.cat([p.flatten() for p in m.head.parameters()]) for m in (saved, second))
    assert not torch.equal(w1, w2)  # trained further …
    assert torch.nn.functional.cosine_similarity(w1, w2, dim=0) > 0.99  # … from the saved head, not a fresh one

    with pytest.raises(ConfigError, match=r"has the head 'linear'.*reward_head is 'mlp'.*reward_head=linear"):
        mlp = _compose(*common, f"rm.init_from={first}", "reward_head=mlp")
        continued_reward_model(mlp, first, head_from_config(mlp.reward_head))
    with pytest.raises(ConfigError, match=r"rm.normalise_on=prompts_samples .* is a reward model"):
        continued_reward_model(_compose(*common, "rm.normalise_on=prompts_samples"), first,
                               head_from_config(cfg.reward_head))
