"""Every file format in and out: checkpoints (``checkpoint``), tokenizers (``tokenizer``),
token data files (``data``)."""
