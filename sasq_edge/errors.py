"""Typed errors. Each message names the file, module or value at fault and what to do."""


class SasqError(Exception):
    """Base of every error the user can fix; the CLI prints it as one line and exits 2."""


class ConfigError(SasqError):
    """An invalid option or recipe value."""


class ModelLoadError(SasqError):
    """A model that cannot be found, loaded, or is not a supported causal LM."""


class DataError(SasqError):
    """Missing data files or windows that do not fit the model."""


class StateError(SasqError):
    """A scale file that is damaged, from another model, or from another format version."""
