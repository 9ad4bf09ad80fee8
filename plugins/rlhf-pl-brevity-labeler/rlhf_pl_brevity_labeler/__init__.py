"""rlhf-pl-brevity-labeler: an example third-party labeler for rlhf_pl.

This module is deliberately light (a dataclass and the spec): rlhf_pl imports it to list plugins
(``python -m rlhf_pl.plugins``) and to register the config with Hydra, so that
``labeler=brevity labeler.max_words=20`` composes and is type-checked. The labeler itself lives in
:mod:`rlhf_pl_brevity_labeler.labeler`, imported only when ``labeler=brevity`` is chosen.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf_pl.config import setting
from rlhf_pl.registry import PluginSpec

__all__ = ["BrevityLabelerConfig", "SPEC"]


@dataclass
class BrevityLabelerConfig:
    """Settings of the brevity labeler (``labeler.<field>=...`` on the command line)."""

    # completions of more words than this (and empty ones) are ranked last, all tied; checked at composition
    # (the `ge` rule) and again when the config is built (__post_init__)
    max_words: int = setting(50, ge=1)

    def __post_init__(self) -> None:
        if isinstance(self.max_words, bool) or not isinstance(self.max_words, int) or self.max_words < 1:
            raise ValueError(f"labeler.max_words must be an integer >= 1, got {self.max_words!r}")


SPEC = PluginSpec(
    name="brevity",  # must equal the entry-point name in pyproject.toml
    config=BrevityLabelerConfig,
    factory="rlhf_pl_brevity_labeler.labeler:BrevityLabeler",  # called as BrevityLabeler(config)
    description="fewest words first, equal counts tie; empty or over max_words: last, tied",
)
