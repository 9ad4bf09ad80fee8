"""Shared fixtures: the tiny tokenizer and tiny random Llama (built once per test session); the
feedback app's databases (``database_url``: SQLite and PostgreSQL, see tests/app_helpers.py)."""
from __future__ import annotations

import pytest
from app_helpers import database_url, postgres_server  # noqa: F401  (fixtures, shared by every test file)


@pytest.fixture(autouse=True)
def cheap_password_hashes(monkeypatch):
    """argon2 at its smallest cost for the accounts tests make (the default costs a few tenths of a
    second per account and login); the app stage's own tests run with the real parameters."""
    from argon2 import PasswordHasher

    from rlhf_pl.app import security

    monkeypatch.setattr(security, "_hasher", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE (512 entries) trained on the embedded data; eos = pad = <|im_end|>; ChatML."""
    from rlhf_pl.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """A random 2-layer Llama (hidden 64) for ``tiny_tokenizer``, in eval mode. Shared: do not train it
    in place (copy it with ``copy.deepcopy`` first)."""
    from rlhf_pl.config import TinyModelConfig
    from rlhf_pl.models.tiny import build_tiny_model

    return build_tiny_model(TinyModelConfig(), tiny_tokenizer).eval()


@pytest.fixture()
def one_thread():
    """Tiny models run fastest on one thread (and a busy 2-core machine makes 2 threads crawl)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ppo_inputs(tmp_path_factory, tiny_tokenizer):
    """Inputs of a tiny PPO run: ``sft/`` (a random tiny Llama, seed 0, as the SFT policy) and
    ``rm/`` (a seed-1 tiny trunk + linear head as the reward model). Returns their parent dir."""
    import torch

    from rlhf_pl.config import TinyModelConfig
    from rlhf_pl.models.loading import save_pretrained_atomic
    from rlhf_pl.models.reward import RewardModel
    from rlhf_pl.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("ppo_inputs")
    save_pretrained_atomic(build_tiny_model(TinyModelConfig(), tiny_tokenizer), tiny_tokenizer, root / "sft")
    torch.manual_seed(1)
    reward_lm = build_tiny_model(TinyModelConfig(seed=1), tiny_tokenizer)
    RewardModel.from_causal_lm(reward_lm, "linear", tiny_tokenizer).save_pretrained(root / "rm")
    return root
