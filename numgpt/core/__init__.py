"""The math: reference ops (``ops``), the autograd engine (``tensor``), layers (``nn``), the
weight-tied GPT and its KV cache (``model``). Imports nothing else from numgpt but ``errors``."""

import importlib


def submodules_on_first_use(package: str):
    """A module ``__getattr__`` (PEP 562) for ``package``: ``package.NAME`` imports the
    submodule ``NAME`` on first use, so the README's ``numgpt.verify.trace.record`` and
    ``numgpt.train.config.TrainConfig`` work after a bare ``import numgpt`` while
    ``import numgpt`` itself still loads no submodule (and no NumPy)."""

    def __getattr__(name: str):
        if not name.startswith("_"):
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise  # the submodule exists and something it imports is missing
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__getattr__ = submodules_on_first_use(__name__)
