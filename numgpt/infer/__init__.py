"""Decoding and scoring: sampling and generation (``sample``), perplexity and LAMBADA
(``evaluate``), next-token checks (``sanity``)."""
