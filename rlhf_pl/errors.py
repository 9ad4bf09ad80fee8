"""Errors the project raises on purpose, for the user to act on.

A :class:`UserError` means the input is wrong (bad data, bad model path, impossible precision
combination, missing stage input, bad resume target, bad config value), not the code. The command
line prints its message as one line, ``error: <message>``, and exits with code 2, without a
traceback (``HYDRA_FULL_ERROR=1`` shows it). Any other exception is a bug and keeps its traceback.

The subclasses also derive from the builtin type that callers already catch, so
``except ValueError`` (or ``pytest.raises(ValueError)``) still works.
"""
from __future__ import annotations


class UserError(Exception):
    """An error in what the user asked for; its message says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config value is invalid: names the dotted key, the bad value and the valid choices or range."""


class InputError(UserError, FileNotFoundError):
    """A stage input (an earlier stage's output, a model directory) or a resume target is missing."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a non-finite loss (the run diverged); the message says where and what to try."""
