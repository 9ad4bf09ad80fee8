"""The generation backend inside the stages: PPO sampling with ``generation=static`` gives the run of
``generation=hf`` (same seed, fp32: the same tokens), update after update — so the static backend samples
from the weights each update left, never from the ones it first saw (plain and LoRA policies). A stale
backend would roll out the initial policy from update 2 on and every later number would differ."""
from __future__ import annotations

import pytest
import torch
from ppo_helpers import make_cfg, ppo_run
from safetensors.torch import load_file

# aot_eager: the same captured graph (parameters as graph inputs, the same guards) without generating
# kernels, so the test pays seconds, not inductor's compile time
STATIC = ["generation=static", "generation.backend=aot_eager"]
COMPARED = ("final_score", "final_kl", "final_beta", "initial_score", "score_gain", "approx_kl_first")


@pytest.mark.parametrize("precision", ["fp32", "lora"])
def test_ppo_with_the_static_backend_follows_every_update(ppo_inputs, tmp_path, precision):
    runs = {}
    for name, extra in (("hf", ["generation=hf"]), ("static", STATIC)):
        cfg = make_cfg(ppo_inputs, tmp_path / name, "ppo.updates=3", "ppo.checkpoint_every=3",
                       f"precision={precision}", *extra)
        runs[name] = (ppo_run(cfg, tmp_path / name / "run"), tmp_path / name / "run" / "policy")
    (hf, hf_dir), (static, static_dir) = runs["hf"], runs["static"]
    assert static["rows_forwarded"]["generation_tokens"] == hf["rows_forwarded"]["generation_tokens"]
    for key in COMPARED:
        assert static[key] == pytest.approx(hf[key], rel=1e-4, abs=1e-6), key
    a, b = load_file(hf_dir / "model.safetensors"), load_file(static_dir / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert any(not torch.equal(a[k], v) for k, v in load_file(ppo_inputs / "sft" / "model.safetensors").items())
