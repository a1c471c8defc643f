"""Decoding and scoring: the one per-sequence decoder that both ``numgpt generate`` and the
server drive (``decoder``), token choice and generation (``sample``), perplexity and LAMBADA
(``evaluate``), next-token checks (``sanity``)."""
