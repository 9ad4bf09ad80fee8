"""The reward model: a causal LM's trunk (no LM head) + a reward-head plugin + a fitted affine
normalisation, saved and loaded as one directory.

Third-party use, one call to load and one to score::

    from rlhf_pl.models.reward import RewardModel

    rm = RewardModel.from_pretrained("outputs/runs/<run>/reward_model")
    scores = rm.score(["What is 2+2?"], ["4."])          # Shape: (1,), normalised rewards

Saved layout (``save_pretrained``, written atomically: temp dir + ``os.replace``)::

    config.json, model.safetensors    the trunk in Hugging Face format (AutoModel loads it)
    tokenizer.json, ...               the tokenizer with its chat template
    reward_head.safetensors           the head's state dict
    reward_config.json                head plugin name, its config and the package providing it,
                                      hidden size, normalisation (gain, bias, what it was fitted on)

The score of a sequence is ``gain · raw + bias`` where ``raw`` is the head's output at the last
real token (RLHF reference items 8 and 11).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlhf_pl import registry
from rlhf_pl.errors import InputError
from rlhf_pl.io import atomic_dir
from rlhf_pl.models.forward import forward_columns
from rlhf_pl.plugins.reward_heads import HeadChoice, RewardHeadOutput, build_head, resolve_head
from rlhf_pl.runtime import attention_kernel

log = logging.getLogger(__name__)

HEAD_WEIGHTS = "reward_head.safetensors"
REWARD_CONFIG = "reward_config.json"
FORMAT_VERSION = 1

Prompt = Union[str, Sequence[dict]]


class RewardOutput(NamedTuple):
    """Result of :meth:`RewardModel.forward`.

    Attributes:
        rewards: normalised rewards ``gain · raw + bias``. Shape: (b,), float32.
        raw: the head's rewards before normalisation. Shape: (b,), float32.
        uncertainty: the head's uncertainty in normalised units (× |gain|), or None. Shape: (b,).
        members: raw per-member rewards of a multi-member head (ensemble), or None. Shape: (b, m).
    """

    rewards: Tensor
    raw: Tensor
    uncertainty: Optional[Tensor] = None
    members: Optional[Tensor] = None


class LabelerReward:
    """A labeler plugin's scores as PPO's reward (``ppo.reward_from=labeler``): the gold labeler itself,
    no reward model in between. Gao et al.'s control run: what PPO reaches with a perfect reward tells
    the optimiser's limits apart from the reward model's. The labeler must give scores (``score``)."""

    def __init__(self, labeler: Any, name: str) -> None:
        if not callable(getattr(labeler, "score", None)):
            raise InputError(f"ppo.reward_from=labeler: labeler {name!r} gives no scores (it has no score(prompt, "
                             "completion)); use labeler=rule or another scoring labeler")
        self.labeler, self.source = labeler, f"labeler:{name}"

    def __call__(self, prompts: Sequence[Any], texts: Sequence[str]) -> RewardOutput:
        """Score each response text of its prompt (a :class:`rlhf_pl.data.formats.Prompt` with the
        labeler's ``meta``). Shapes: B prompts, B texts -> RewardOutput with (B,) float32 rewards."""
        rewards = torch.tensor([float(self.labeler.score(p, t)) for p, t in zip(prompts, texts)], dtype=torch.float32)
        return RewardOutput(rewards, rewards, None, None)


class Normalisation(NamedTuple):
    """An affine map ``score = gain · raw + bias`` and the statistics it was fitted from."""

    gain: float
    bias: float
    raw_mean: float
    raw_std: float
    n: int


def fit_affine(raw_rewards: Tensor, target_std: Optional[float]) -> Normalisation:
    """Gain and bias that give ``raw_rewards`` mean 0 and (if ``target_std``) that population std.

    ``gain = target_std / std(raw)`` (1 when ``target_std`` is None), ``bias = −gain · mean(raw)``.
    The std is the population std (no Bessel correction), so the fitted set's std is exactly
    ``target_std``. Shape: (n,) -> scalars.
    """
    raw = raw_rewards.detach().double().flatten()
    if raw.numel() < 2 and target_std is not None:
        raise ValueError(f"need at least 2 reference rewards to fit a std, got {raw.numel()}")
    if raw.numel() < 1:
        raise ValueError("cannot fit the reward normalisation on an empty reference set")
    mean = raw.mean()
    std = raw.std(correction=0) if raw.numel() > 1 else torch.zeros((), dtype=torch.float64)
    if target_std is not None:
        if target_std <= 0:
            raise ValueError(f"target_std must be > 0, got {target_std!r}")
        if std <= 1e-12:
            raise ValueError(f"reference rewards are constant ({float(mean):.6g}); "
                             f"cannot scale them to std {target_std}")
        gain = target_std / std
    else:
        gain = torch.ones((), dtype=torch.float64)
    return Normalisation(float(gain), float(-gain * mean), float(mean), float(std), raw.numel())


def trunk_of(causal_lm: nn.Module) -> nn.Module:
    """The transformer body of a Hugging Face causal LM (``model.model`` for Llama): no LM head."""
    prefix = getattr(causal_lm, "base_model_prefix", None)
    trunk = getattr(causal_lm, prefix, None) if prefix else None
    if trunk is None or trunk is causal_lm:
        raise ValueError(
            f"{type(causal_lm).__name__} has no base model under base_model_prefix={prefix!r}; "
            "pass a Hugging Face *ForCausalLM model or its AutoModel trunk"
        )
    return trunk


def hidden_size_of(model: nn.Module) -> int:
    """The hidden size d of a Hugging Face model or its trunk (the text config's, for multimodal configs)."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.hidden_size)


def _package_version(distribution: Optional[str]) -> Optional[str]:
    if not distribution or distribution == "?":
        return None
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


class RewardModel(nn.Module):
    """Trunk + reward head + normalisation buffers ``gain``, ``bias`` (score = gain·raw + bias).

    Build one from a causal LM with :meth:`from_causal_lm`, or load a saved one with
    :meth:`from_pretrained`.
    """

    def __init__(self, trunk: nn.Module, head: nn.Module, head_choice: HeadChoice, tokenizer: Any = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.head_choice = head_choice
        self.tokenizer = tokenizer
        self.register_buffer("gain", torch.ones((), dtype=torch.float32))
        self.register_buffer("bias", torch.zeros((), dtype=torch.float32))
        self.normalisation_info: dict[str, Any] = {"fitted_on": None}

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_causal_lm(
        cls, causal_lm: nn.Module, head: str | HeadChoice = "linear", tokenizer: Any = None, **head_overrides: Any
    ) -> RewardModel:
        """Take the trunk of ``causal_lm`` (its LM head is dropped) and put a new head on it.

        ``head`` is a registered head name (its config defaults plus ``head_overrides``) or a
        :class:`HeadChoice`. The head's parameters are created in float32.
        """
        choice = head if isinstance(head, HeadChoice) else resolve_head(head, None, **head_overrides)
        trunk = trunk_of(causal_lm)
        module = build_head(choice, hidden_size_of(trunk))
        device = next(trunk.parameters()).device
        return cls(trunk, module.to(device), choice, tokenizer)

    @property
    def hidden_size(self) -> int:
        return hidden_size_of(self.trunk)

    # --- scoring -----------------------------------------------------------------------------

    #: :func:`rlhf_pl.sampling.score` passes ``prefix_length`` (the K answers of a prompt share its pass)
    takes_prefix_length = True

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prefix_length: int = 0) -> RewardOutput:
        """Rewards of (prompt + completion) sequences, padded on either side.

        Shape: input_ids (b, t), attention_mask (b, t) -> :class:`RewardOutput` with (b,) fields.
        Position ids come from the mask, so a sequence's reward does not depend on its padding.
        ``prefix_length``: rows whose first ``prefix_length`` columns are equal (a prompt's K
        completions, the prompt left-padded to that column) run them once
        (:func:`rlhf_pl.models.forward.forward_columns`); 0 runs every row whole.
        """
        with attention_kernel(input_ids.shape[1], input_ids.device, self.trunk):
            hidden = forward_columns(self.trunk, input_ids, attention_mask, prefix_length, 0, "hidden")  # (b, t, d)
        out = self.head(hidden, attention_mask)
        raw, uncertainty, members = self._check_head_output(out, input_ids.shape[0])
        gain, bias = self.gain.float(), self.bias.float()
        return RewardOutput(
            gain * raw + bias,
            raw,
            uncertainty * gain.abs() if uncertainty is not None else None,
            members,
        )

    def _check_head_output(self, out: Any, batch: int) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Validate a head's output (third-party heads included); return float32 fields."""
        name = self.head_choice.name
        if not isinstance(out, RewardHeadOutput):
            raise TypeError(f"reward_head {name!r} returned {type(out).__name__}, expected RewardHeadOutput")
        if out.rewards.shape != (batch,):
            raise ValueError(f"reward_head {name!r} returned rewards of shape {tuple(out.rewards.shape)}, "
                             f"expected ({batch},)")
        uncertainty = out.uncertainty.float() if out.uncertainty is not None else None
        members = getattr(out, "members", None)
        if members is not None and (members.dim() != 2 or members.shape[0] != batch):
            raise ValueError(f"reward_head {name!r} returned members of shape {tuple(members.shape)}, "
                             f"expected ({batch}, m)")
        return out.rewards.float(), uncertainty, members.float() if members is not None else None

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str], batch_size: int = 8) -> Tensor:
        """Normalised rewards of (prompt, completion) texts. Shape: (n,), float32 on the CPU.

        A prompt is a user message (``str``) or a conversation ``[{"role": ..., "content": ...}]``
        ending where the assistant's answer starts. Prompts are chat-templated with the saved
        tokenizer, completions appended (with EOS), batches right-padded.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        if self.tokenizer is None:
            raise ValueError("score() needs a tokenizer: build the RewardModel with one or load it with "
                             "from_pretrained")
        from rlhf_pl.data.collate import pad_right

        sequences = [self.tokenize(p, c) for p, c in zip(prompts, completions)]
        device = next(self.trunk.parameters()).device
        was_training = self.training
        self.eval()
        try:
            chunks = []
            for start in range(0, len(sequences), batch_size):
                ids, mask = pad_right(sequences[start:start + batch_size], self.pad_token_id)
                chunks.append(self(ids.to(device), mask.to(device)).rewards.cpu())
        finally:
            self.train(was_training)
        return torch.cat(chunks) if chunks else torch.zeros(0)

    def tokenize(self, prompt: Prompt, completion: str) -> list[int]:
        """Token ids of a chat-templated prompt followed by the completion (as the rm stage does)."""
        from rlhf_pl.data.chat import tokenize_completion, tokenize_prompt
        from rlhf_pl.data.formats import Message

        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages = tuple(m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in turns)
        return tokenize_prompt(self.tokenizer, messages) + tokenize_completion(self.tokenizer, completion)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
        return int(pad)

    # --- normalisation -----------------------------------------------------------------------

    def fit_normalisation(
        self, raw_rewards: Tensor, target_std: Optional[float], fitted_on: str = "reference set"
    ) -> Normalisation:
        """Set gain/bias so the reference set's rewards have mean 0 (and std ``target_std``).

        ``raw_rewards`` are :attr:`RewardOutput.raw` of the reference set. Shape: (n,).
        """
        fit = fit_affine(raw_rewards, target_std)
        self.gain.fill_(fit.gain)
        self.bias.fill_(fit.bias)
        self.normalisation_info = {"fitted_on": fitted_on, "target_std": target_std, **fit._asdict()}
        log.info(
            "reward normalisation fitted on %s (n=%d): raw mean %.4f std %.4f -> gain %.4f bias %.4f",
            fitted_on, fit.n, fit.raw_mean, fit.raw_std, fit.gain, fit.bias,
        )
        return fit

    # --- persistence -------------------------------------------------------------------------

    def reward_config(self) -> dict[str, Any]:
        """What ``reward_config.json`` holds (everything but weights)."""
        choice = self.head_choice
        return {
            "format_version": FORMAT_VERSION,
            "head": {
                "name": choice.name,
                "config": dataclasses.asdict(choice.config),
                "distribution": choice.distribution,
                "distribution_version": _package_version(choice.distribution),
            },
            "hidden_size": self.hidden_size,
            "trunk_class": type(self.trunk).__name__,
            "normalisation": {
                **self.normalisation_info,
                "gain": float(self.gain),
                "bias": float(self.bias),
            },
        }

    def save_pretrained(self, out_dir: Path | str) -> Path:
        """Write trunk (HF format), tokenizer, head weights and ``reward_config.json`` atomically."""

        with atomic_dir(out_dir) as tmp:
            self.trunk.save_pretrained(tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            head_state = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
            save_file(head_state, str(tmp / HEAD_WEIGHTS))
            (tmp / REWARD_CONFIG).write_text(json.dumps(self.reward_config(), indent=2, sort_keys=True) + "\n")
        return Path(out_dir)

    @classmethod
    def from_pretrained(
        cls, path: Path | str, *, dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu"
    ) -> RewardModel:
        """Load a directory written by :meth:`save_pretrained`: trunk, tokenizer, head plugin (via
        the registry), normalisation. Returned in eval mode."""
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        config_file = path / REWARD_CONFIG
        if not config_file.is_file():
            raise InputError(f"{config_file} not found: {path} is not a reward model saved by rlhf_pl (+stage=rm "
                             "writes one as <run dir>/reward_model)")
        saved = json.loads(config_file.read_text())
        if saved.get("format_version") != FORMAT_VERSION:
            raise InputError(
                f"{config_file}: format_version={saved.get('format_version')!r}; this rlhf_pl reads {FORMAT_VERSION}"
            )
        choice = _saved_head_choice(saved["head"], config_file)
        trunk = AutoModel.from_pretrained(path, **_dtype_kwargs(dtype or torch.float32))
        if hidden_size_of(trunk) != saved["hidden_size"]:
            raise ValueError(f"{config_file}: hidden_size={saved['hidden_size']} but the trunk has "
                             f"{hidden_size_of(trunk)}")
        head = build_head(choice, saved["hidden_size"])
        head.load_state_dict(load_file(str(path / HEAD_WEIGHTS)))
        tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
        model = cls(trunk, head, choice, tokenizer)
        norm = saved["normalisation"]
        model.gain.fill_(norm["gain"])
        model.bias.fill_(norm["bias"])
        model.normalisation_info = {k: v for k, v in norm.items() if k not in ("gain", "bias")}
        return model.to(device).eval()


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def _saved_head_choice(head: dict[str, Any], config_file: Path) -> HeadChoice:
    """Rebuild the head choice from ``reward_config.json``; a missing plugin names its package."""
    try:
        choice = resolve_head(head["name"], dict(head["config"]))
    except registry.PluginError as err:
        package = head.get("distribution")
        hint = f"; it came from the package {package!r} (pip install {package})" if package and package != "?" else ""
        raise registry.PluginError(f"{config_file}: key head.name={head['name']!r}: {err}{hint}") from err
    return choice
