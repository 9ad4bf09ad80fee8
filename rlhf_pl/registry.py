"""Plugin registry: one entry-point group per plugin kind, discovered lazily.

A plugin is published as an entry point whose value is a :class:`PluginSpec`. The spec is light:
a name, a config dataclass and the import path of a factory. Listing plugins and registering their
configs with Hydra imports only the spec modules; the factory's module is imported only for the
plugin an experiment actually selects. Built-in plugins are declared in rlhf_pl's own
``pyproject.toml`` exactly the way a third-party package declares its own::

    [project.entry-points."rlhf_pl.reward_heads"]
    gated = "my_package:SPEC"  # SPEC = PluginSpec(name="gated", config=..., factory="my_package.head:GatedHead")

Selecting it from the command line: ``python -m rlhf_pl +stage=rm reward_head=gated``.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from rlhf_pl.errors import UserError

# kind (entry-point group suffix) -> Hydra config group
KINDS: dict[str, str] = {
    "reward_heads": "reward_head",
    "kl_controllers": "kl_controller",
    "samplers": "sampler",
    "precision": "precision",
    "labelers": "labeler",
    "generation": "generation",
}
GROUP_PREFIX = "rlhf_pl."


class PluginError(UserError, ValueError):
    """A plugin could not be found, loaded or built."""


@dataclass(frozen=True)
class PluginSpec:
    """What a plugin entry point points at.

    Attributes:
        name: the name used in the config (``sampler=<name>``); must equal the entry-point name.
        config: a dataclass whose fields are the plugin's settings (typed, documented).
        factory: ``"module:attribute"`` of a callable taking the config dataclass instance and
            returning the plugin object. Imported only when the plugin is selected.
        description: one line for ``python -m rlhf_pl.plugins``.
    """

    name: str
    config: type
    factory: str
    description: str = ""

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.config):
            raise PluginError(f"plugin {self.name!r}: config must be a dataclass, got {self.config!r}")
        if ":" not in self.factory:
            raise PluginError(f"plugin {self.name!r}: factory must be 'module:attribute', got {self.factory!r}")

    def load_factory(self) -> Callable[[Any], Any]:
        module_name, _, attr = self.factory.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as err:
            raise PluginError(f"plugin {self.name!r}: cannot import factory {self.factory!r}: {err}") from err
        return obj


@dataclass(frozen=True)
class InstalledPlugin:
    kind: str
    name: str
    distribution: str
    entry_point: EntryPoint

    def spec(self) -> PluginSpec:
        try:
            spec = self.entry_point.load()
        except Exception as err:  # a broken third-party package must be named, not crash discovery
            raise PluginError(
                f"{self.kind} plugin {self.name!r} from package {self.distribution!r} failed to load "
                f"({self.entry_point.value}): {type(err).__name__}: {err}"
            ) from err
        if not isinstance(spec, PluginSpec):
            raise PluginError(
                f"{self.kind} plugin {self.name!r} ({self.entry_point.value}) is a {type(spec).__name__}, "
                "expected rlhf_pl.registry.PluginSpec"
            )
        if spec.name != self.name:
            raise PluginError(
                f"{self.kind} plugin entry point {self.name!r} ({self.entry_point.value}) declares name {spec.name!r}"
            )
        return spec


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")


@cache
def installed(kind: str) -> tuple[InstalledPlugin, ...]:
    """Plugins of one kind installed in this environment, sorted by name."""
    _check_kind(kind)
    found: dict[str, InstalledPlugin] = {}
    for ep in entry_points(group=GROUP_PREFIX + kind):
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in found and found[ep.name].entry_point.value != ep.value:
            raise PluginError(
                f"two installed packages provide {kind} plugin {ep.name!r}: "
                f"{found[ep.name].distribution} ({found[ep.name].entry_point.value}) and {dist} ({ep.value})"
            )
        found[ep.name] = InstalledPlugin(kind, ep.name, dist, ep)
    return tuple(found[name] for name in sorted(found))


def get_spec(kind: str, name: str) -> PluginSpec:
    """The spec of an installed plugin; an unknown name lists the installed ones."""
    for plugin in installed(kind):
        if plugin.name == name:
            return plugin.spec()
    names = ", ".join(p.name for p in installed(kind)) or "(none installed)"
    raise PluginError(f"unknown {KINDS[kind]} plugin {name!r}; installed: {names}")


def spec_for_config(kind: str, cfg: Any) -> PluginSpec:
    """Find the spec whose config dataclass produced ``cfg`` (a composed DictConfig or a dataclass)."""
    _check_kind(kind)
    cfg_type = OmegaConf.get_type(cfg) if isinstance(cfg, DictConfig) else type(cfg)
    matches = [p for p in installed(kind) if p.spec().config is cfg_type]
    if len(matches) == 1:
        return matches[0].spec()
    if not matches:
        names = ", ".join(p.name for p in installed(kind)) or "(none installed)"
        raise PluginError(
            f"config {KINDS[kind]} (type {getattr(cfg_type, '__name__', cfg_type)}) matches no installed "
            f"{KINDS[kind]} plugin; choose one of: {names}"
        )
    raise PluginError(f"{KINDS[kind]} config type {cfg_type.__name__} is shared by plugins {[p.name for p in matches]}")


def build(kind: str, cfg: Any) -> Any:
    """Instantiate the plugin selected by a composed config group (``cfg.sampler`` etc.)."""
    spec = spec_for_config(kind, cfg)
    config_obj = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
    return spec.load_factory()(config_obj)


def build_by_name(kind: str, name: str, **overrides: Any) -> Any:
    """Instantiate a plugin by name with its default config (plus overrides); handy outside Hydra."""
    spec = get_spec(kind, name)
    return spec.load_factory()(spec.config(**overrides))


def register_with_hydra() -> None:
    """Store every installed plugin's config dataclass as an option of its Hydra group.

    After this, ``sampler=top_p sampler.p=0.9`` composes and is type-checked by OmegaConf, and the
    options appear in ``--help``. A plugin that fails to load is reported, not skipped.
    """
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for kind, group in KINDS.items():
        for plugin in installed(kind):
            spec = plugin.spec()
            cs.store(group=group, name=spec.name, node=spec.config, provider=plugin.distribution)
