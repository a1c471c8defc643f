"""Decoding and scoring: the one per-sequence decoder that both ``numgpt generate`` and the
server drive (``decoder``), token choice and generation (``sample``), perplexity and LAMBADA
(``evaluate``), next-token checks (``sanity``)."""

from ..core import submodules_on_first_use

__getattr__ = submodules_on_first_use(__name__)  # numgpt.infer.MODULE on first use
