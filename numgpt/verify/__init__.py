"""The verification ladder's tools: the gradient-check gate (``gradcheck``), validation traces
and their comparison (``trace``), the optional ``transformers`` recorder (``reference``)."""
