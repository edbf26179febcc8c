"""ember: a lightweight local inference runtime for GGUF language models on edge machines.

    import ember
    m = ember.load("smollm2-135m")      # a catalog name (pulled on first use) or a path to a .gguf
    m.tokenize("Hello")
"""

from .api import Model, load
from .errors import (
    BudgetError,
    ChatTemplateError,
    DeviceError,
    EmberError,
    FormatError,
    ModelNotFoundError,
    PullError,
    UnsupportedError,
)

__version__ = "0.1.0"

__all__ = [
    "load", "Model",
    "EmberError", "FormatError", "UnsupportedError", "ModelNotFoundError", "BudgetError",
    "DeviceError", "PullError", "ChatTemplateError",
]
