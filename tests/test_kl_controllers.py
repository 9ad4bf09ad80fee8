"""KL controllers (RLHF_REFERENCE.md item 16): exact updates, state round-trips, configs, specs."""
import math

import pytest
from omegaconf import OmegaConf
from tool_loader import load_tool

from rlhf_pl.plugins.kl_controller_specs import (
    ADAPTIVE,
    FIXED,
    PI,
    AdaptiveKLConfig,
    FixedKLConfig,
    PIKLConfig,
)
from rlhf_pl.plugins.kl_controllers import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    PIKLController,
)

# --- fixed ---------------------------------------------------------------------------------------


def test_fixed_controller_never_changes():
    controller = FixedKLController(beta=0.05)
    for kl in (0.0, 6.0, 100.0):
        controller.update(kl, 64)
    assert controller.value == 0.05
    assert controller.state_dict() == {"controller": "fixed", "beta": 0.05}


# --- adaptive (Ziegler) --------------------------------------------------------------------------


def test_adaptive_update_with_error_clipped_from_above():
    controller = AdaptiveKLController(init_beta=0.15, target=6.0, horizon=10000)
    controller.update(8.0, 64)
    # e = 8/6 − 1 = 0.333 → clipped to 0.2; β = 0.15·(1 + 0.2·64/10000) = 0.15·1.00128 = 0.150192
    assert controller.value == pytest.approx(0.15 * (1 + 0.2 * 64 / 10000), rel=1e-12)
    assert controller.value == pytest.approx(0.150192, rel=1e-12)


def test_adaptive_update_with_error_clipped_from_below():
    controller = AdaptiveKLController(init_beta=0.15, target=6.0, horizon=10000)
    controller.update(1.0, 64)
    # e = 1/6 − 1 = −0.833 → clipped to −0.2; β = 0.15·(1 − 0.2·64/10000) = 0.149808
    assert controller.value == pytest.approx(0.149808, rel=1e-12)


def test_adaptive_update_inside_the_clip_range_compounds():
    controller = AdaptiveKLController(init_beta=0.15, target=6.0, horizon=10000)
    controller.update(6.6, 64)  # e = 0.1 → β = 0.15·1.00064 = 0.150096
    assert controller.value == pytest.approx(0.150096, rel=1e-12)
    controller.update(5.7, 128)  # e = −0.05 → β = 0.150096·(1 − 0.05·128/10000) = 0.150096·0.99936
    assert controller.value == pytest.approx(0.150096 * 0.99936, rel=1e-12)


def test_adaptive_state_dict_round_trip():
    controller = AdaptiveKLController()
    controller.update(9.0, 512)
    restored = AdaptiveKLController()
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
    controller.update(3.0, 512)
    restored.update(3.0, 512)
    assert restored.value == controller.value


# --- PI ------------------------------------------------------------------------------------------


def _pi(**overrides) -> PIKLController:
    settings = dict(init_beta=0.15, target=6.0, horizon=10000, kp=2.5, ki=2.0, error_clip=0.2, smoothing=0.5)
    settings.update(overrides)
    return PIKLController(**settings)


def test_pi_exact_first_step():
    controller = _pi()
    controller.update(7.2, 64)
    # e = 7.2/6 − 1 = 0.2; f = 0.5·0 + 0.5·0.2 = 0.1
    # I = log 0.15 + 2·0.2·64/10000 = log 0.15 + 0.00256; β = exp(I + 2.5·0.1) = 0.15·e^0.25256
    assert controller.smoothed_error == pytest.approx(0.1, rel=1e-12)
    assert controller.integral == pytest.approx(math.log(0.15) + 0.00256, rel=1e-12)
    assert controller.value == pytest.approx(0.15 * math.exp(0.25256), rel=1e-12)


@pytest.mark.parametrize("kl, direction", [(9.0, +1), (3.0, -1), (6.0, 0)])
def test_pi_moves_beta_the_right_direction(kl, direction):
    controller = _pi()
    for _ in range(5):
        before = controller.value
        controller.update(kl, 256)
        change = controller.value - before
        if direction == 0:  # on target: e = 0, f stays 0, I unchanged
            assert change == 0.0
        else:
            assert change * direction > 0


def test_pi_with_no_proportional_term_is_ziegler_to_first_order():
    pi = _pi(kp=0.0, ki=1.0, smoothing=0.0)
    ziegler = AdaptiveKLController(init_beta=0.15, target=6.0, horizon=10000)
    pi.update(8.0, 64)
    ziegler.update(8.0, 64)
    # exp(0.00128) vs 1.00128: they differ by 0.15·0.00128²/2 ≈ 1.2e-7
    assert pi.value == pytest.approx(ziegler.value, abs=2e-7)


def test_pi_anti_windup_leaves_the_bound_as_soon_as_the_error_turns():
    controller = _pi(beta_max=0.5, smoothing=0.0)
    for _ in range(200):
        controller.update(100.0, 1000)  # e = 0.2 each time: far more push than the bound allows
    assert controller.value == pytest.approx(0.5, rel=1e-12)
    assert controller.integral == pytest.approx(math.log(0.5), rel=1e-12)  # clamped, not wound up
    controller.update(0.0, 1000)  # e = −0.2
    # I = log 0.5 − 2·0.2·1000/10000 = log 0.5 − 0.04; β = exp(I − 2.5·0.2) = 0.5·e^−0.54
    assert controller.value == pytest.approx(0.5 * math.exp(-0.54), rel=1e-12)


def test_pi_beta_stays_within_bounds():
    controller = _pi(beta_min=0.1, beta_max=0.2)
    for _ in range(100):
        controller.update(0.0, 5000)
    assert controller.value == pytest.approx(0.1, rel=1e-12)


def test_pi_state_dict_round_trip():
    controller = _pi()
    for kl in (2.0, 9.0, 7.0):
        controller.update(kl, 256)
    state = controller.state_dict()
    assert set(state) == {"controller", "beta", "integral", "smoothed_error"}
    restored = _pi()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    for kl in (5.0, 6.5):
        controller.update(kl, 256)
        restored.update(kl, 256)
    assert restored.value == controller.value


def test_loading_another_controllers_state_is_refused():
    with pytest.raises(ValueError, match="state is for 'adaptive'.*'pi'"):
        _pi().load_state_dict(AdaptiveKLController().state_dict())
    with pytest.raises(ValueError, match=r"lacks \['integral', 'smoothed_error'\]"):
        _pi().load_state_dict({"controller": "pi", "beta": 0.1})


@pytest.mark.parametrize("make", [FixedKLController, AdaptiveKLController, PIKLController])
def test_non_finite_kl_is_refused(make):
    with pytest.raises(ValueError, match="non-finite KL nan"):
        make().update(float("nan"), 64)


@pytest.mark.parametrize("make", [FixedKLController, AdaptiveKLController, PIKLController])
def test_controllers_satisfy_the_protocol(make):
    assert isinstance(make(), KLController)


# --- configs and specs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, key",
    [
        (lambda: FixedKLConfig(beta=-0.1), "kl_controller.beta"),
        (lambda: AdaptiveKLConfig(target=0.0), "kl_controller.target"),
        (lambda: AdaptiveKLConfig(horizon=-5.0), "kl_controller.horizon"),
        (lambda: PIKLConfig(kp=-1.0), "kl_controller.kp"),
        (lambda: PIKLConfig(smoothing=1.0), "kl_controller.smoothing"),
        (lambda: PIKLConfig(beta_min=1.0, beta_max=0.5), "kl_controller.beta_min"),
        (lambda: PIKLConfig(init_beta=20.0), "kl_controller.init_beta"),
        (lambda: PIKLController(ki=float("inf")), "kl_controller.ki"),
    ],
)
def test_bad_settings_name_the_key(build, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build()


def test_composed_config_is_validated_when_built():
    cfg = OmegaConf.merge(OmegaConf.structured(AdaptiveKLConfig), {"target": -1.0})
    with pytest.raises(ValueError, match=r"kl_controller\.target must be a finite number > 0, got -1\.0"):
        OmegaConf.to_object(cfg)


@pytest.mark.parametrize(
    "spec, cls",
    [(FIXED, FixedKLController), (ADAPTIVE, AdaptiveKLController), (PI, PIKLController)],
)
def test_spec_factories_build_controllers_with_config_defaults(spec, cls):
    controller = spec.load_factory()(spec.config())
    assert isinstance(controller, cls)
    assert spec.name in {"fixed", "adaptive", "pi"}
    assert controller.value == {"fixed": 0.05, "adaptive": 0.15, "pi": 0.15}[spec.name]


def test_spec_factory_passes_every_setting():
    cfg = PIKLConfig(init_beta=0.2, target=4.0, horizon=5000, kp=1.0, ki=3.0, error_clip=0.3,
                     smoothing=0.25, beta_min=0.01, beta_max=1.0)
    controller = PI.load_factory()(cfg)
    controller.update(8.0, 100)
    # e = clip(8/4 − 1, ±0.3) = 0.3; f = 0.75·0.3 = 0.225; I = log 0.2 + 3·0.3·100/5000 = log 0.2 + 0.018
    assert controller.value == pytest.approx(0.2 * math.exp(0.018 + 1.0 * 0.225), rel=1e-12)


# --- the comparison tool -------------------------------------------------------------------------


def test_pi_beats_adaptive_on_the_simulated_policy(tmp_path):
    tool = load_tool("plot_kl_controllers")
    out = tmp_path / "kl.png"
    tool.main([str(out), "--updates", "1000", "--seeds", "2"])
    assert out.stat().st_size > 10_000
    makers = {"adaptive": AdaptiveKLController, "pi": PIKLController}
    for plant in ("relax", "integrator"):
        _, results = tool.compare(makers, plant, 2000, 256, 3)
        adaptive, pi = (results[name] for name in ("adaptive", "pi"))
        assert max(f.steady_error for f in pi) < 0.6 * min(f.steady_error for f in adaptive)
        assert max(f.overshoot for f in pi) < min(f.overshoot for f in adaptive)
