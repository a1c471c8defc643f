"""The HTTP service: the continuous-batching engine (``engine``), the OpenAI completions
protocol in pure Python (``protocol``: request validation, responses and stream chunks), the
Starlette app that serves it (``app``: routes, auth, streaming, startup), Prometheus metrics
(``metrics``)."""
