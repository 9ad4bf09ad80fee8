"""Precision strategies: Lightning values, device checks and trainer.precision agreement."""
from __future__ import annotations

import pytest
import torch

from rlhf_pl import registry
from rlhf_pl.plugins.specs import BF16MixedConfig, FP16MixedConfig, FP32Config
from rlhf_pl.precision import (
    BF16Mixed,
    FP16Mixed,
    FullPrecision,
    PrecisionError,
    PrecisionStrategy,
    resolve_accelerator,
)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_registry_names_and_lightning_values():
    expected = {"fp32": ("32-true", FullPrecision), "bf16-mixed": ("bf16-mixed", BF16Mixed),
                "fp16-mixed": ("16-mixed", FP16Mixed)}
    for name, (value, cls) in expected.items():
        strategy = registry.build_by_name("precision", name)
        assert type(strategy) is cls and isinstance(strategy, PrecisionStrategy)
        assert strategy.name == name and strategy.trainer_precision == value


def test_resolve_accelerator(no_cuda):
    assert resolve_accelerator("auto") == "cpu"
    assert resolve_accelerator("gpu") == "cuda"
    assert resolve_accelerator("CPU") == "cpu"


def test_resolve_auto_with_cuda(fake_cuda):
    assert resolve_accelerator("auto") == "cuda"


@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_fp16_mixed_on_cpu_is_refused(no_cuda, accelerator):
    with pytest.raises(PrecisionError) as info:
        FP16Mixed(FP16MixedConfig()).check(accelerator, None)
    assert str(info.value) == "precision=fp16-mixed needs a CUDA GPU; on CPU use precision=bf16-mixed or precision=fp32"


def test_fp16_mixed_on_mps_is_refused():
    with pytest.raises(PrecisionError, match="needs a CUDA GPU; on accelerator=mps use precision=bf16-mixed"):
        FP16Mixed(FP16MixedConfig()).check("mps", None)


@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_fp16_mixed_on_cuda_is_accepted(fake_cuda, accelerator):
    FP16Mixed(FP16MixedConfig()).check(accelerator, "16-mixed")


@pytest.mark.parametrize("strategy", [FullPrecision(FP32Config()), BF16Mixed(BF16MixedConfig())])
def test_fp32_and_bf16_work_on_cpu(no_cuda, strategy):
    strategy.check("cpu", None)
    strategy.check("auto", strategy.trainer_precision)


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(PrecisionError, match="Tesla T4 has none: use precision=fp16-mixed or precision=fp32"):
        BF16Mixed(BF16MixedConfig()).check("gpu", None)


def test_disagreeing_trainer_precision_names_both_and_says_to_drop_it(no_cuda):
    with pytest.raises(PrecisionError) as info:
        FullPrecision(FP32Config()).check("cpu", "bf16-mixed")
    message = str(info.value)
    assert message.startswith("trainer.precision=bf16-mixed disagrees with precision=fp32 "
                              "(Lightning precision 32-true)")
    assert "drop trainer.precision" in message


def test_disagreement_is_reported_before_the_device_problem(no_cuda):
    with pytest.raises(PrecisionError, match="trainer.precision=bf16-true disagrees with precision=fp16-mixed"):
        FP16Mixed(FP16MixedConfig()).check("cpu", "bf16-true")


@pytest.mark.parametrize("strategy, alias", [
    (FullPrecision(FP32Config()), 32), (FullPrecision(FP32Config()), "32"),
    (BF16Mixed(BF16MixedConfig()), "bf16"), (FP16Mixed(FP16MixedConfig()), 16),
])
def test_lightning_aliases_agree(fake_cuda, strategy, alias):
    strategy.check("cuda", alias)
