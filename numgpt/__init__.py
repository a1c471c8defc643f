"""numgpt: GPT-2 from first principles on NumPy."""

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def __getattr__(name: str):
    """``numgpt.load`` is imported on first use, so ``import numgpt.ops`` stays light and
    does not depend on the checkpoint code."""
    if name == "load":
        from .checkpoint import load

        return load
    raise AttributeError(f"module 'numgpt' has no attribute {name!r}")
