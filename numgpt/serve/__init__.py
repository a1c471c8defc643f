"""The HTTP service: the continuous-batching engine (``engine``), the OpenAI completions
protocol in pure Python (``protocol``: request validation, responses and stream chunks), the
Starlette app that serves it (``app``: routes, auth, streaming, startup), Prometheus metrics
(``metrics``)."""

from ..core import submodules_on_first_use

__getattr__ = submodules_on_first_use(__name__)  # numgpt.serve.MODULE on first use
