"""Every file format in and out: checkpoints (``checkpoint``), tokenizers (``tokenizer``),
token data files (``data``)."""

from ..core import submodules_on_first_use

__getattr__ = submodules_on_first_use(__name__)  # numgpt.io.MODULE on first use
