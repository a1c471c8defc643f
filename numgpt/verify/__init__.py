"""The verification ladder's tools: the gradient-check gate (``gradcheck``), validation traces
and their comparison (``trace``), the optional ``transformers`` recorder (``reference``)."""

from ..core import submodules_on_first_use

__getattr__ = submodules_on_first_use(__name__)  # numgpt.verify.MODULE on first use
