"""Typed errors, shared by every layer. Each message names the file, module or value at fault and
what to do. Every class here is a user error: the command line prints it as one line and exits 2."""


class SasqError(Exception):
    """Base of every error the user can fix."""


class ConfigError(SasqError):
    """An invalid option, profile or recipe value."""


class DataError(SasqError):
    """Missing or unusable text, or windows that do not fit the model."""


class StateError(SasqError):
    """A scale state that is damaged, from another model, or from another format version."""


class RuntimeSetupError(SasqError):
    """A file, provider or option the runtime cannot use."""


class ModelLoadError(SasqError):
    """A model that cannot be found, loaded, or is not a supported causal LM."""
