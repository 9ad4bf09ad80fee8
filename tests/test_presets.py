"""Every shipped trainer / launcher / sweeper preset composes; the ones that need CUDA or a cluster fail
on this machine with a message that says so, before anything is loaded; the strategy composition
checks; and trainer=fsdp_cpu's strategy trains on 2 CPU processes exactly as 1 process does.

Run as a script (``python tests/test_presets.py fit manual,auto <devices> <out dir>``) this file is
the training job of that last test: Lightning's launcher starts the second process by running the
same command again (both modes in the same 2 processes: one launch, one set of imports).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
TRAINER_PRESETS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))
LAUNCHERS = sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml"))
SWEEPERS = sorted(p.stem for p in (CONF / "hydra" / "sweeper").glob("*.yaml"))
NEEDS_CUDA = {"ddp": "trainer=ddp_cpu", "fsdp": "trainer=fsdp_cpu", "deepspeed": "trainer=fsdp_cpu"}
CLIP = 0.05  # small enough that every step clips (checked), so a per-shard norm would show


# --- the training job (also run as a script) ------------------------------------------------------------


def _tiny_lm(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def fit(mode: str, devices: int, out: Path) -> None:
    """Train a policy and a critic (manual: two optimizers stepped in training_step, as PPO does;
    auto: the policy alone, Lightning's loop with gradient_clip_val, as SFT does) next to a frozen
    reference, on 8 rows per step split over ``devices`` processes; rank 0 writes the full trained
    weights, the frozen model's state and what the strategy did to ``out``."""
    import lightning as L
    import torch
    from omegaconf import OmegaConf
    from torch import nn
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from rlhf_pl.strategies import build_strategy, full_state_dict, unwrapped

    class Critic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.head = _tiny_lm(1).model, nn.Linear(32, 1)

        def forward(self, ids):
            return self.head(self.trunk(input_ids=ids).last_hidden_state).squeeze(-1)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = mode == "auto"
            self.policy, self.critic = _tiny_lm(0), Critic() if mode == "manual" else None
            self.reference = _tiny_lm(0).requires_grad_(False).eval()
            if mode == "manual":  # as precision=int8-frozen holds PPO's frozen models: FSDP must leave it alone
                from rlhf_pl.models.adapters import quantize_linears_

                quantize_linears_(self.reference, "int8")
            self.norms: list[float] = []

        def training_step(self, batch, _):
            (ids,) = batch
            with torch.no_grad():
                ref = self.reference(input_ids=ids).logits.float()
            loss = self.policy(input_ids=ids, labels=ids).loss
            loss = loss + 0.01 * (self.policy(input_ids=ids).logits.float() - ref).pow(2).mean()
            if self.automatic_optimization:
                return loss
            for opt, objective in zip(self.optimizers(), (lambda: loss, lambda: self.critic(ids).pow(2).mean())):
                opt.zero_grad()
                self.manual_backward(objective())
                self.record_norm(opt)
                self.clip_gradients(opt, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
                opt.step()
            return None

        def on_before_optimizer_step(self, optimizer) -> None:
            if self.automatic_optimization:  # Lightning clips after this hook
                self.record_norm(optimizer)

        def record_norm(self, optimizer) -> None:
            """The gradient norm before clipping, in the 1-process run (where it is the whole norm)."""
            if devices == 1:
                params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                self.norms.append(float(torch.nn.utils.clip_grad_norm_(params, float("inf"))))

        def configure_optimizers(self):
            opts = [torch.optim.AdamW(self.policy.parameters(), lr=1e-2)]
            return opts + ([torch.optim.AdamW(self.critic.parameters(), lr=1e-2)] if self.critic else [])

    trainer_cfg = OmegaConf.load(CONF / "trainer" / "fsdp_cpu.yaml")
    trainer_cfg.strategy_options.activation_checkpointing = mode == "auto"  # recompute: the same numbers
    strategy = build_strategy(trainer_cfg) if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, gradient_clip_val=CLIP if mode == "auto" else None)
    torch.manual_seed(0)
    data = TensorDataset(torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(1)))
    module = Module()
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    rows = list(range(rank, 32, devices))  # rank r: rows r, r + W, …; step k of all ranks = rows 8k … 8k + 7
    trainer.fit(module, DataLoader(Subset(data, rows), batch_size=8 // devices, shuffle=False))
    trained = {"policy": module.policy, **({"critic": module.critic} if module.critic is not None else {})}
    result = {"weights": {}, "roots": {}, "local_numel": {}}
    for name, model in trained.items():
        result["roots"][name] = type(model).__name__
        result["local_numel"][name] = sum(p.numel() for p in model.parameters())
        if devices > 1:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.summon_full_params(model, writeback=False):
                result["weights"][name] = _clean({k: v.detach().clone() for k, v in model.named_parameters()})
        else:
            result["weights"][name] = {k: v.detach().clone() for k, v in model.named_parameters()}
    result["full_state"] = {name: full_state_dict(model) for name, model in trained.items()}  # collective
    result["unwrapped"] = {name: type(unwrapped(model)).__name__ for name, model in trained.items()}
    result["reference"] = {"type": type(module.reference).__name__, "state": module.reference.state_dict(),
                           "device": str(next(module.reference.parameters()).device)}
    result["norms"] = module.norms
    result["checkpointed"] = sorted(type(m).__name__ for m in module.modules() if "Checkpoint" in type(m).__name__)
    if devices > 1:
        trainer.save_checkpoint(out.with_suffix(".ckpt"))  # Lightning's, sharded (the preset's state_dict_type)
    if trainer.global_rank == 0:
        torch.save(result, out)


def _clean(state: dict) -> dict:
    """Parameter names without FSDP's and activation checkpointing's wrapper prefixes."""
    return {k.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", ""): v
            for k, v in state.items()}


# --- tests ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    """Both modes of ``fit`` on 2 CPU processes under trainer=fsdp_cpu's strategy (one subprocess launch)."""
    out = tmp_path_factory.mktemp("fsdp_cpu")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "fit", "manual,auto", "2", str(out)],
                          cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _run_fit(mode: str, runs: Path, tmp_path: Path) -> tuple[dict, dict]:
    """The 2-process FSDP run of ``fit(mode)`` (from the fixture) and its 1-process run (here)."""
    import torch

    one = tmp_path / f"{mode}_1.pt"
    fit(mode, 1, one)
    return torch.load(runs / f"{mode}_2.pt", weights_only=False), torch.load(one, weights_only=False)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_fsdp_cpu_manual_optimisation_two_processes_equal_one(two_process_runs, tmp_path):
    import torch

    two, one = _run_fit("manual", two_process_runs, tmp_path)
    assert two["roots"] == {"policy": "FullyShardedDataParallel", "critic": "FullyShardedDataParallel"}
    # each process holds about half of each trained model
    full = {name: sum(v.numel() for v in w.values()) for name, w in one["weights"].items()}
    for name, numel in two["local_numel"].items():
        assert numel < 0.6 * full[name]
    # the frozen reference (int8 linears) is not sharded: a plain module, its whole state on the process's device
    assert two["reference"]["type"] == "LlamaForCausalLM" and two["reference"]["device"] == "cpu"
    assert two["reference"]["state"]["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert _max_diff(two["reference"]["state"], one["reference"]["state"]) == 0
    assert min(one["norms"]) > CLIP  # every step clipped: a per-shard norm would have given other weights
    for name in ("policy", "critic"):
        assert _max_diff(two["weights"][name], one["weights"][name]) < 1e-5, name
        # the gathered state dict for exports: the unwrapped model's keys, whole tensors
        assert _max_diff(two["full_state"][name], one["full_state"][name]) < 1e-5, name
    assert two["unwrapped"] == {"policy": "LlamaForCausalLM", "critic": "Critic"}
    ckpt = two_process_runs / "manual_2.ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]


def test_fsdp_cpu_automatic_optimisation_with_clipping_and_checkpointing_equals_one_process(two_process_runs, tmp_path):
    two, one = _run_fit("auto", two_process_runs, tmp_path)
    assert two["roots"] == {"policy": "FullyShardedDataParallel"}
    # activation_checkpointing=true: each of the policy's 2 decoder layers (not the frozen reference's) recomputed
    assert two["checkpointed"] == ["CheckpointWrapper", "CheckpointWrapper"] and one["checkpointed"] == []
    assert min(one["norms"]) > CLIP
    assert _max_diff(two["weights"]["policy"], one["weights"]["policy"]) < 1e-5
    assert _max_diff(two["full_state"]["policy"], one["full_state"]["policy"]) < 1e-5  # wrapper-free keys


def _compose(*overrides: str, hydra: bool = False):
    from hydra import compose, initialize_config_module

    from rlhf_pl.config import register_configs

    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_every_preset_composes():
    from omegaconf import OmegaConf

    assert {"cpu", "ddp", "default", "deepspeed", "fsdp", "fsdp_cpu"} <= set(TRAINER_PRESETS)
    for name in TRAINER_PRESETS:
        cfg = _compose("+stage=sft", f"trainer={name}")
        for key, value in OmegaConf.load(CONF / "trainer" / f"{name}.yaml").items():
            assert cfg.trainer[key] == value, (name, key)
    assert _compose("trainer=fsdp").trainer.strategy_options.sharding_strategy == "FULL_SHARD"
    assert _compose("trainer=deepspeed").trainer.strategy_options.stage == 2
    assert LAUNCHERS == ["slurm_gpu"] and SWEEPERS == ["optuna_ppo", "optuna_rm", "optuna_sft"]
    slurm = _compose("+stage=sft", "trainer=fsdp", "trainer.devices=8", "trainer.num_nodes=2",
                     "hydra/launcher=slurm_gpu", hydra=True).hydra
    assert slurm.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (slurm.launcher.tasks_per_node, slurm.launcher.gpus_per_node, slurm.launcher.nodes) == (8, 8, 2)
    assert slurm.callbacks.require_slurm._target_ == "rlhf_pl.hydra_callbacks.RequireSlurm"
    for sweeper, stage in (("optuna_rm", "rm"), ("optuna_ppo", "ppo"), ("optuna_sft", "sft")):
        h = _compose(f"+stage={stage}", f"hydra/sweeper={sweeper}", hydra=True).hydra.sweeper
        assert h._target_.endswith("optuna_sweeper.OptunaSweeper") and h.direction == "minimize"  # objective: loss
        assert all(key.startswith((f"{stage}.", "kl_controller.")) for key in h.params)
    with pytest.raises(Exception, match="slurm_gpux"):
        _compose("hydra/launcher=slurm_gpux", hydra=True)


def test_cuda_presets_fail_without_cuda_and_name_the_cpu_preset(monkeypatch):
    import torch

    from rlhf_pl.config import validate_config
    from rlhf_pl.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, instead in NEEDS_CUDA.items():
        cfg = _compose("+stage=sft", "experiment=quick", f"trainer={name}")
        with pytest.raises(ConfigError, match=f"trainer.strategy={'ddp' if name == 'ddp' else name} with "
                                              f"trainer.accelerator=gpu") as err:
            validate_config(cfg)
        assert "CUDA" in str(err.value) and instead in str(err.value)
    validate_config(_compose("+stage=sft", "experiment=quick", "trainer=fsdp_cpu"))
    validate_config(_compose("+stage=rm", "experiment=quick", "trainer=fsdp_cpu"))


def _problem(*overrides: str) -> str:
    """The ConfigError validate_config raises for the config composed with ``overrides``."""
    from rlhf_pl.config import validate_config
    from rlhf_pl.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        validate_config(_compose(*overrides))
    return str(err.value)


def test_composition_checks_name_keys_values_and_choices(monkeypatch):
    import importlib.util

    import torch

    base = ("experiment=quick", "trainer=fsdp_cpu")
    msg = _problem("+stage=sft", *base, "precision=qlora")
    assert msg.startswith("trainer.strategy=fsdp with precision=qlora: bitsandbytes' integer parameters (the trained "
                          "models' 4-bit base) cannot be flattened")
    assert "precision=fp32, bf16-mixed" in msg and "trainer=ddp" in msg
    from rlhf_pl.config import validate_config

    for frozen in ("int8-frozen", "nf4-frozen"):  # FSDP leaves the frozen models whole: allowed
        validate_config(_compose("+stage=sft", *base, f"precision={frozen}"))
    validate_config(_compose("+stage=ppo", *base))  # policy and critic sharded (tests/test_ddp.py runs it)
    validate_config(_compose("+stage=ppo", *base, "precision=nf4-frozen"))  # the frozen models held whole
    msg = _problem("+stage=ppo", *base, "precision=lora", "ppo.critic=shared", "generation=static")
    assert msg.startswith("trainer.strategy=fsdp with +stage=ppo cannot shard PPO with precision=lora (the reference "
                          "is the sharded policy with its adapters disabled")
    assert "use precision=fp32 or bf16-mixed" in msg and "use ppo.critic=separate" in msg
    assert "generation=static (its compiled step" in msg and "use generation=hf" in msg
    assert msg.endswith("or keep these settings with trainer=ddp / ddp_cpu (every process holds its models whole)")
    for stage in ("collect", "eval"):
        assert "use trainer=ddp_cpu or trainer=ddp" in _problem(f"+stage={stage}", *base)
    msg = _problem("+stage=sft", *base, "trainer.strategy_options.state_dict_type=full")
    assert "segmentation fault" in msg and "state_dict_type=sharded" in msg
    msg = _problem("+stage=sft", *base, "trainer.strategy_options.activation_checkpointing=true",
                   "model.gradient_checkpointing=true")
    assert "choose one" in msg
    msg = _problem("+stage=sft", *base, "+trainer.strategy_options.nosuch=1")
    assert "unknown key trainer.strategy_options.nosuch=1" in msg and "sharding_strategy" in msg
    msg = _problem("+stage=sft", *base, "trainer.strategy_options.sharding_strategy=FULL")
    assert "trainer.strategy_options.sharding_strategy='FULL': choose one of: FULL_SHARD, SHARD_GRAD_OP" in msg
    msg = _problem("+stage=sft", "experiment=quick", "trainer=ddp_cpu", "+trainer.strategy_options.stage=2")
    assert "trainer.strategy=ddp takes no options" in msg
    # DeepSpeed on a CUDA machine: not installed names the extra; PPO's two optimizers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed"
                        else real_find_spec(name, *a))
    assert _problem("+stage=sft", "trainer=deepspeed").endswith(
        "trainer.strategy=deepspeed needs the package deepspeed, which is not installed: "
        "pip install 'rlhf_pl[deepspeed]'")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed"
                        else real_find_spec(name, *a))
    msg = _problem("+stage=ppo", "trainer=deepspeed")
    assert "takes one optimizer" in msg and "use trainer=fsdp for PPO" in msg
    assert "precision=qlora" in _problem("+stage=sft", "trainer=deepspeed", "precision=qlora")
    assert "the frozen models' 8/4-bit weights" in _problem("+stage=ppo", "trainer=deepspeed", "precision=nf4-frozen")
    validate_config(_compose("+stage=rm", "trainer=deepspeed", "trainer.strategy_options.stage=3",
                             "trainer.strategy_options.offload_parameters=true"))
    msg = _problem("+stage=rm", "trainer=deepspeed", "trainer.strategy_options.offload_parameters=true")
    assert "offload_parameters=true with trainer.strategy_options.stage=2: only ZeRO stage 3" in msg


def test_several_nodes_need_a_cluster_environment(monkeypatch):
    from rlhf_pl.config import validate_config
    from rlhf_pl.strategies import cluster_environment

    for var in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", "MASTER_ADDR", "NODE_RANK", "LSB_JOBID",
                "SLURM_NTASKS_PER_NODE", "SLURM_NNODES"):
        monkeypatch.delenv(var, raising=False)
    assert cluster_environment() is None
    msg = _problem("+stage=sft", "experiment=quick", "trainer=fsdp_cpu", "trainer.num_nodes=2")
    assert "trainer.num_nodes=2" in msg and "torchrun --nnodes 2" in msg and "SLURM" in msg
    validate_config(_compose("+stage=sft", "experiment=quick", "trainer=fsdp_cpu"))  # one node: no check
    # what torchrun sets (Lightning reads TORCHELASTIC_RUN_ID through torch.distributed.is_torchelastic_launched)
    for var, value in {"TORCHELASTIC_RUN_ID": "job", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4",
                       "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(var, value)
    assert cluster_environment() == "TorchElasticEnvironment"
    validate_config(_compose("+stage=sft", "experiment=quick", "trainer=fsdp_cpu", "trainer.num_nodes=2"))
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    for var, value in {"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "rlhf", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0", "SLURM_NODELIST": "n[0-1]"}.items():
        monkeypatch.setenv(var, value)
    assert cluster_environment() == "SLURMEnvironment"
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_NNODES", "2")
    validate_config(_compose("+stage=sft", "experiment=quick", "trainer=fsdp_cpu", "trainer.num_nodes=2"))
    msg = _problem("+stage=sft", "experiment=quick", "trainer=fsdp_cpu", "trainer.devices=4", "trainer.num_nodes=2")
    assert msg == ("trainer.devices=4 in a SLURM job with --ntasks-per-node=2: Lightning runs one process per SLURM "
                   "task, so set trainer.devices=2")
    assert "set trainer.num_nodes=2" in _problem("+stage=sft", "experiment=quick", "trainer=fsdp_cpu")
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning's way to opt out of SLURM detection
    monkeypatch.setenv("NODE_RANK", "1")
    assert cluster_environment() == "LightningEnvironment"  # MASTER_ADDR + NODE_RANK: a manual launch


def test_slurm_problem():
    from omegaconf import OmegaConf

    from rlhf_pl.hydra_callbacks import slurm_problem

    cfg = OmegaConf.create({"trainer": {"devices": 8}})
    assert "sbatch" in slurm_problem(cfg, None) and "not on this machine's PATH" in slurm_problem(cfg, None)
    assert slurm_problem(cfg, "/usr/bin/sbatch") is None
    bad = OmegaConf.create({"trainer": {"devices": -1}})
    assert "trainer.devices=-1" in slurm_problem(bad, "/usr/bin/sbatch")


def _cli(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PATH": str(tmp_path / "bin"), "HYDRA_FULL_ERROR": "0"}
    (tmp_path / "bin").mkdir(exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rlhf_pl", *args, f"paths.output_root={tmp_path / 'out'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.perf_counter() - start


def _loaded_nothing(out: Path) -> bool:
    """No stage got as far as writing a summary, a model or a checkpoint."""
    return not any(p.name in ("summary.json", "config.json", "last.ckpt", "index.json") for p in out.rglob("*"))


def test_cli_refuses_gpu_presets_before_loading_anything(tmp_path):
    proc, seconds = _cli(tmp_path, "+stage=sft", "experiment=quick", "trainer=fsdp")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: trainer.strategy=fsdp with trainer.accelerator=gpu: it needs a CUDA GPU")
    assert "trainer=fsdp_cpu" in proc.stderr and "Traceback" not in proc.stderr
    assert seconds < 30 and _loaded_nothing(tmp_path / "out")


def test_cli_refuses_the_slurm_launcher_without_sbatch(tmp_path):
    proc, seconds = _cli(tmp_path, "-m", "+stage=sft", "experiment=quick", "trainer.devices=2",
                         "hydra/launcher=slurm_gpu", "sft.optim.lr=1e-3,2e-3")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: hydra/launcher=slurm_gpu submits jobs with SLURM's sbatch, which is not on this machine's PATH (no "
        "SLURM here): run it on the cluster's login node, or drop hydra/launcher to run the sweep here one job "
        "after another")
    assert seconds < 30 and _loaded_nothing(tmp_path / "out")
    assert not list((tmp_path / "out").rglob(".submitit"))  # nothing submitted


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "fit":
    for fit_mode in sys.argv[2].split(","):
        fit(fit_mode, int(sys.argv[3]), Path(sys.argv[4]) / f"{fit_mode}_{sys.argv[3]}.pt")
    print(json.dumps({"fit": sys.argv[2], "devices": sys.argv[3]}))
