"""The errors a plan can end in: one line each, naming the key and the fix."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot run: its message is one line naming the key and the fix."""


class DoesNotFit(ConfigError):
    """The pre-flight check: the predicted peak memory per rank clearly exceeds what a rank has."""
