"""The brevity labeler: the fewer words, the better.

A completion's words are its whitespace-separated runs (``str.split()``). Completions with 1 to
``max_words`` words are ranked by word count, fewest first; equal counts tie. Completions that say
nothing (no words) or run over ``max_words`` share the last place, tied. As a score (higher is better)::

    score = -words           if 1 <= words <= max_words
          = -(max_words + 1) otherwise
"""
from __future__ import annotations

from typing import Sequence

from rlhf_pl.data.formats import Prompt
from rlhf_pl.plugins.labelers import LabelerError, Ranking, ranking_from_scores
from rlhf_pl_brevity_labeler import BrevityLabelerConfig


class BrevityLabeler:
    """Ranks completions by word count (see the module docstring). Implements rlhf_pl's ``Labeler``."""

    def __init__(self, config: BrevityLabelerConfig) -> None:
        if not isinstance(config, BrevityLabelerConfig):
            raise LabelerError(f"labeler 'brevity' expects a BrevityLabelerConfig, got {type(config).__name__}")
        config.__post_init__()  # re-validate: the dataclass may have been changed after it was built
        self.config = config

    def score(self, prompt: Prompt, completion: str) -> float:
        """Minus the word count; empty and over-long completions all get ``-(max_words + 1)``."""
        if not isinstance(completion, str):
            raise LabelerError(f"{prompt.origin}: a completion must be a str, got {type(completion).__name__}")
        words = len(completion.split())
        limit = self.config.max_words
        return float(-words if 1 <= words <= limit else -(limit + 1))

    def rank(self, prompt: Prompt, completions: Sequence[str]) -> Ranking:
        """Best-first groups of completion indices: fewest words first, equal scores tie."""
        if isinstance(completions, str) or len(completions) < 1:
            raise LabelerError(f"{prompt.origin}: expected a list of K >= 1 completions, got {completions!r:.80}")
        return ranking_from_scores([self.score(prompt, text) for text in completions])

    def __repr__(self) -> str:
        return f"BrevityLabeler(max_words={self.config.max_words})"
