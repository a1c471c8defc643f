"""The HTTP service: the continuous-batching engine (``engine``), the OpenAI-compatible server
(``server``), Prometheus metrics (``metrics``)."""
