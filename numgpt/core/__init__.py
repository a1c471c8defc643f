"""The math: reference ops (``ops``), the autograd engine (``tensor``), layers (``nn``), the
weight-tied GPT and its KV cache (``model``). Imports nothing else from numgpt but ``errors``."""
