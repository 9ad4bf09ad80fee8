"""Test instrumentation for the data-parallel PPO test (tests/test_ddp.py), loaded by every rank.

Python imports ``sitecustomize`` at start-up from the path; the test puts this directory on PYTHONPATH
and names a directory in RLHF_PL_PROBE. Every process (rank 0 and the ranks Lightning starts) then
records, per update, the inputs and outputs of the PPO stage's advantage computation and of its
statistics, to ``<probe>/rank<r>_update<u>.pt``. Nothing else changes.
"""
import os

if os.environ.get("RLHF_PL_PROBE"):
    from pathlib import Path

    import torch

    import rlhf_pl.stages.ppo as ppo

    _probe = Path(os.environ["RLHF_PL_PROBE"])
    _compute_advantages, _ppo_stats = ppo.compute_advantages, ppo.ppo_stats
    _pending: dict = {}

    def _rank() -> int:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def compute_advantages(*args, **kwargs):
        result = _compute_advantages(*args, **kwargs)
        _pending.update(advantage_args=args, advantage_kwargs={k: v for k, v in kwargs.items() if k != "all_reduce"},
                        advantages=result)
        return result

    def ppo_stats(rollout, adv, steps, **kwargs):
        stats = _ppo_stats(rollout, adv, steps, **kwargs)
        record = {**_pending, "rollout": rollout, "stats": stats, "rank": _rank()}
        _probe.mkdir(parents=True, exist_ok=True)
        torch.save(record, _probe / f"rank{_rank()}_update{int(stats.update)}.pt")
        return stats

    ppo.compute_advantages, ppo.ppo_stats = compute_advantages, ppo_stats
