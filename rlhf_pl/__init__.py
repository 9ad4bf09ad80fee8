"""rlhf_pl: a plugin-based RLHF trainer (SFT, reward model, PPO) on PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
