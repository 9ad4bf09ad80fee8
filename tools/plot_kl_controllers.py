"""Compare KL controllers on a simulated policy: Ziegler's adaptive controller vs the PI controller.

One step is one PPO update of n episodes. The controller sees the measured KL of each rollout (a
batch mean, hence noisy) and sets β for the next rollout. Both controllers start at β₀ = 0.15 with
KL = 0 and target 6 nats, and see the same noise.

Policy model ``relax`` (default). For a fixed β, the KL-regularised optimum π ∝ π_ref·exp(r/β) has
KL = σ²/(2β²) when the reward of the reference's samples is Gaussian with std σ. PPO moves the
policy towards that optimum gradually, and the reward model's "pull" σ grows as the policy finds
more of what it likes (the drift that made Ziegler et al.'s β climb from 0.15 to about 0.3)::

    σ_t = sigma_start + (sigma_end − sigma_start)·t/T                # 0.69 → 1.11
    KL_{t+1} = max(0, KL_t + (σ_t²/(2β_t²) − KL_t)/tau + ε_t)        # tau = 100 updates
    measured_t = max(0, KL_t + η_t)                                  # ε ~ N(0, 0.05²), η ~ N(0, 0.3²)

With these numbers the β that holds 6 nats drifts from 0.20 to 0.32 over the run.

Policy model ``integrator`` (``--plant integrator``): the reward gradient pushes the KL up at a
constant rate, the penalty pulls it down in proportion to β (felt with a 10-update lag p_t), so the
KL integrates the imbalance: ``KL_{t+1} = max(0, KL_t + 0.04 − 0.1333·p_t + ε_t)``,
``p_t = p_{t−1} + (β_t − p_{t−1})/10``; only β = 0.3 holds it still.

Figures (on the true KL, mean ± std over ``--seeds`` noise seeds; the plot shows seed 0):
- mean |KL − target| over the last half of the updates (steady-state error and oscillation),
- overshoot: max KL − target over the whole run,
- std of log β over the last half (how much measurement noise moves β).

Usage::

    python tools/plot_kl_controllers.py [outputs/kl_controllers.png] [--updates 2000] [--episodes 256]
                                        [--seeds 20] [--plant relax|integrator]
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
from pathlib import Path
from typing import Callable, NamedTuple

from rlhf_pl.plugins.kl_controllers import AdaptiveKLController, KLController, PIKLController

TARGET = 6.0
INIT_BETA = 0.15
PROCESS_NOISE = 0.05  # std of the KL's random change per update (nats)
MEASUREMENT_NOISE = 0.3  # std of a rollout's mean-KL estimate (nats)


class Trace(NamedTuple):
    kl: list[float]  # true KL before each update
    beta: list[float]  # β used by each update's rollout


class Figures(NamedTuple):
    steady_error: float  # mean |KL − target| over the last half
    overshoot: float  # max KL − target
    log_beta_std: float  # std of log β over the last half


class RelaxPlant:
    """KL relaxes towards σ_t²/(2β²) with time constant ``tau`` updates; σ grows linearly."""

    def __init__(self, updates: int, tau: float = 100.0, sigma_start: float = 0.69, sigma_end: float = 1.11):
        self.updates, self.tau, self.sigma_start, self.sigma_end = updates, tau, sigma_start, sigma_end
        self.t = 0

    def step(self, kl: float, beta: float, noise: float) -> float:
        sigma = self.sigma_start + (self.sigma_end - self.sigma_start) * self.t / self.updates
        self.t += 1
        equilibrium = sigma**2 / (2.0 * beta**2)
        return max(0.0, kl + (equilibrium - kl) / self.tau + noise)


class IntegratorPlant:
    """KL grows by ``drift`` per update and shrinks by ``sensitivity``·(β felt with a lag)."""

    def __init__(self, updates: int, drift: float = 0.04, sensitivity: float = 0.1333, lag: float = 10.0):
        self.drift, self.sensitivity, self.lag = drift, sensitivity, lag
        self.pressure = INIT_BETA

    def step(self, kl: float, beta: float, noise: float) -> float:
        self.pressure += (beta - self.pressure) / self.lag
        return max(0.0, kl + self.drift - self.sensitivity * self.pressure + noise)


PLANTS = {"relax": RelaxPlant, "integrator": IntegratorPlant}


def simulate(controller: KLController, plant, updates: int, episodes: int, seed: int) -> Trace:
    """Run the closed loop: rollout with β → measured KL → controller update → policy moves."""
    rng = random.Random(seed)
    kl, trace = 0.0, Trace([], [])
    for _ in range(updates):
        beta = controller.value
        trace.kl.append(kl)
        trace.beta.append(beta)
        measured = max(0.0, kl + rng.gauss(0.0, MEASUREMENT_NOISE))
        kl = plant.step(kl, beta, rng.gauss(0.0, PROCESS_NOISE))
        controller.update(measured, episodes)
    return trace


def figures(trace: Trace, target: float) -> Figures:
    half = len(trace.kl) // 2
    return Figures(
        steady_error=statistics.fmean(abs(k - target) for k in trace.kl[half:]),
        overshoot=max(trace.kl) - target,
        log_beta_std=statistics.pstdev(math.log(b) for b in trace.beta[half:]),
    )


def compare(
    controllers: dict[str, Callable[[], KLController]], plant: str, updates: int, episodes: int, seeds: int
) -> tuple[dict[str, Trace], dict[str, list[Figures]]]:
    """Trace of seed 0 and figures of every seed, per controller (the same seeds for all)."""
    first: dict[str, Trace] = {}
    results: dict[str, list[Figures]] = {}
    for name, make in controllers.items():
        runs = [simulate(make(), PLANTS[plant](updates), updates, episodes, seed) for seed in range(seeds)]
        first[name] = runs[0]
        results[name] = [figures(run, TARGET) for run in runs]
    return first, results


def plot(traces: dict[str, Trace], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_beta) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name, trace in traces.items():
        ax_kl.plot(trace.kl, label=name, linewidth=1.2)
        ax_beta.plot(trace.beta, label=name, linewidth=1.0)
    ax_kl.axhline(TARGET, color="black", linestyle="--", linewidth=1, label=f"target {TARGET:g}")
    ax_kl.set_ylabel("KL (nats per response)")
    ax_kl.set_title(title)
    ax_kl.legend()
    ax_beta.set_ylabel("β")
    ax_beta.set_xlabel("PPO update")
    ax_beta.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict[str, list[Figures]]) -> None:
    width = max(len(name) for name in results)
    print(f"{'controller':<{width}} {'mean|KL-target| last half':>27} {'overshoot (nats)':>18} "
          f"{'std log β last half':>21}")
    for name, runs in results.items():
        cells = [[getattr(f, field) for f in runs] for field in Figures._fields]
        text = [f"{statistics.fmean(c):.3f} ± {statistics.pstdev(c):.3f}" for c in cells]
        print(f"{name:<{width}} {text[0]:>27} {text[1]:>18} {text[2]:>21}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compare the adaptive and PI KL controllers on a simulated policy.")
    parser.add_argument("output", nargs="?", default="outputs/kl_controllers.png", help="PNG path")
    parser.add_argument("--updates", type=int, default=2000, help="PPO updates to simulate")
    parser.add_argument("--episodes", type=int, default=256, help="episodes per update (n)")
    parser.add_argument("--seeds", type=int, default=20, help="noise seeds the figures average over")
    parser.add_argument("--plant", choices=sorted(PLANTS), default="relax", help="policy model (module docstring)")
    args = parser.parse_args(argv)

    pi = PIKLController(init_beta=INIT_BETA, target=TARGET)
    controllers: dict[str, Callable[[], KLController]] = {
        "adaptive (Ziegler)": lambda: AdaptiveKLController(init_beta=INIT_BETA, target=TARGET),
        f"pi (kp={pi.kp:g}, ki={pi.ki:g}, smoothing={pi.smoothing:g})":
            lambda: PIKLController(init_beta=INIT_BETA, target=TARGET),
    }
    traces, results = compare(controllers, args.plant, args.updates, args.episodes, args.seeds)
    title = f"KL controllers, simulated policy '{args.plant}', n={args.episodes} episodes/update"
    plot(traces, title, Path(args.output))
    print(f"plant {args.plant}: {args.updates} updates x {args.episodes} episodes, target {TARGET:g} nats, "
          f"{args.seeds} seeds (mean ± std)")
    report(results)
    print(f"plot: {args.output}")


if __name__ == "__main__":
    main()
