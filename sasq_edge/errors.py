"""Typed errors of the method. The classes every layer shares live in ``runtime.errors``; they are
re-exported here so the method's callers need one import."""

from runtime.errors import ConfigError, DataError, ModelLoadError, RuntimeSetupError, SasqError, StateError

__all__ = ["ConfigError", "DataError", "ModelLoadError", "RuntimeSetupError", "SasqError", "StateError"]
