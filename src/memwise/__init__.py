"""memwise: run large language models in the memory you have, and measure honestly what that costs."""
from memwise.errors import MemwiseError
from memwise.language_model import LanguageModel, load

__version__ = "0.1.0"
__all__ = ["LanguageModel", "MemwiseError", "load", "__version__"]
