"""memwise: run large language models in the memory you have, and measure honestly what that costs."""
from memwise.errors import MemwiseError

__version__ = "0.1.0"
__all__ = ["LanguageModel", "MemwiseError", "load", "__version__"]


def __getattr__(name: str):
    # load and LanguageModel import torch (seconds); the command line imports this package first and
    # must be able to answer --help, or a Ctrl-C, before that.
    if name in ("load", "LanguageModel"):
        from memwise import language_model
        return getattr(language_model, name)
    raise AttributeError(f"module 'memwise' has no attribute {name!r}")
