"""Errors a user can act on: each names the file, setting or sample at fault and what is wrong with it.

The CLI prints these as one line instead of a stack trace; anything else is a bug and keeps its trace.
"""


class MMAError(Exception):
    """Base class of user-facing errors."""


class ConfigError(MMAError):
    """A recipe or adapter setting is unknown or invalid."""


class BackboneError(MMAError):
    """A backbone path is missing, or a weights file is not what it claims to be."""


class DataError(MMAError):
    """A sample, image or data file cannot be used."""


class TrainingDiverged(MMAError):
    """The loss or a trainable weight stopped being finite; the run stops before anything non-finite is saved."""


class AdapterError(MMAError):
    """An exported adapter folder is missing, unsafe (pickle), corrupted, or does not match the model's adapters."""


class BackboneMismatch(AdapterError):
    """An adapter meets backbones other than those it was trained on (their fingerprints differ)."""
