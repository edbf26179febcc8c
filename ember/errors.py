"""The errors ember raises: one base class, one subclass per kind of problem.

Every message says what is wrong and what to do about it. The CLI prints the message on one line
and exits with status 2.
"""


class EmberError(Exception):
    """Base of every error ember raises on purpose."""


class FormatError(EmberError):
    """A file is not valid GGUF, or is truncated or corrupt."""


class UnsupportedError(EmberError):
    """Valid input that ember does not handle (an architecture, a tensor type, a feature)."""


class ModelNotFoundError(EmberError):
    """A model name that is neither in the catalog nor a path to a file."""


class BudgetError(EmberError):
    """A memory budget too small for what was asked."""


class DeviceError(EmberError):
    """A compute device that is missing or failed."""


class PullError(EmberError):
    """Downloading or assembling a catalog model failed."""


class ChatTemplateError(EmberError):
    """A chat template that does not parse or render, or messages it cannot take."""
