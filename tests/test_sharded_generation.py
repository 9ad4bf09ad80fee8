"""Sampling from a policy sharded with FSDP over 2 CPU processes (gloo), as PPO's rollouts under
``trainer=fsdp_cpu`` do: every forward is collective, and the two processes' responses end at
different steps. With ``sync_ranks`` both keep calling the model until both have ended, and each
returns what the unsharded model returns alone for its prompts."""
from __future__ import annotations

import gc
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp
from tiny_models import EOS, PAD, tiny_causal_lm

from rlhf_pl.data.collate import pad_left
from rlhf_pl.models.generate import generate
from rlhf_pl.rl.masked import all_reduce_max

PROMPTS = [[5, 9, 13, 7, 30], [11, 4, 8, 21, 17, 33, 6, 40]]
SCRIPTS = {0: [[EOS, 7], [4, EOS]], 1: [[6, 7], [8, 9], [10, 11], [12, 13], [EOS, 14], [15, EOS]]}  # end: 2, 6


class Scripted:
    """Scripted tokens per step, remembering the logits it was given (to compare the sharded forward)."""

    temperature = 1.0

    def __init__(self, script: list[list[int]]) -> None:
        self.script, self.seen = [torch.tensor(s) for s in script], []

    def sample(self, logits: torch.Tensor, generator=None) -> torch.Tensor:
        self.seen.append(logits.clone())
        return self.script[len(self.seen) - 1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, out: str) -> None:
    """One process: the tiny Llama sharded (a unit per decoder layer), sampling its rank's script."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        sharded = FSDP(tiny_causal_lm("llama"), device_id=torch.device("cpu"),
                       auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}))
        calls = []
        sharded.register_forward_pre_hook(lambda *_: calls.append(1))
        sampler = Scripted(SCRIPTS[rank])
        gen = generate(sharded, *pad_left(PROMPTS, PAD), sampler, 10, EOS, PAD, sync_ranks=all_reduce_max)
        local = sum(p.numel() for p in sharded.parameters())
        torch.save({"generation": gen._asdict(), "calls": len(calls), "seen": sampler.seen, "local_numel": local},
                   Path(out) / f"rank{rank}.pt")
        # Tear down in order: FSDP holds the process group, and a gloo group still alive at interpreter exit
        # can abort the process (SIGABRT) while its threads release tensors; the barrier keeps either rank
        # from closing its connections while the other still reads from them.
        del sharded
        gc.collect()
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_two_sharded_processes_ending_at_different_steps_generate_what_each_generates_alone(tmp_path):
    # raises if a process failed; a deadlock ends in gloo's 60 s timeout
    mp.start_processes(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    whole = tiny_causal_lm("llama")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["calls"] == ranks[1]["calls"] == 6  # prefill + 5 steps: rank 0 went on after its step 2
    assert ranks[0]["local_numel"] < sum(p.numel() for p in whole.parameters())  # sharded
    for rank, got in enumerate(ranks):
        sampler = Scripted(SCRIPTS[rank])
        alone = generate(whole, *pad_left(PROMPTS, PAD), sampler, 10, EOS, PAD)
        for field, value in alone._asdict().items():
            assert torch.equal(torch.as_tensor(got["generation"][field]), torch.as_tensor(value)), (rank, field)
        assert len(got["seen"]) == len(sampler.seen) == len(SCRIPTS[rank])  # sampled only while running
        for sharded_logits, whole_logits in zip(got["seen"], sampler.seen):
            assert torch.allclose(sharded_logits, whole_logits, atol=1e-5)
