"""numgpt: GPT-2 from first principles on NumPy.

The short public entry points, each imported on first use so that ``import numgpt.core.ops``
stays light and does not pull in the checkpoint or training code:

    numgpt.load(path)               numgpt.io.checkpoint.load
    numgpt.generate(model, ...)     numgpt.infer.sample.generate
    numgpt.perplexity(model, ids)   numgpt.infer.evaluate.perplexity
    numgpt.train(config)            numgpt.train.loop.train (``numgpt.train`` is also the package)
"""

__version__ = "0.1.0"

from .core import submodules_on_first_use  # noqa: E402
from .core.threads import kernel_cache_dir, let_openmp_threads_sleep  # noqa: E402

let_openmp_threads_sleep()  # before any OpenMP library loads (see core/threads.py)
kernel_cache_dir()  # before numba loads: a read-only package caches in the user's folder

__all__ = ["load", "generate", "perplexity", "train", "__version__"]


def __getattr__(name: str):
    if name == "load":
        from .io.checkpoint import load

        return load
    if name == "generate":
        from .infer.sample import generate

        return generate
    if name == "perplexity":
        from .infer.evaluate import perplexity

        return perplexity
    if name == "train":
        import importlib

        # a callable package: numgpt.train(config) runs training. (``from . import train``
        # would ask this very __getattr__ for "train" first and recurse.)
        return importlib.import_module(".train", __name__)
    return _subpackage(name)  # numgpt.verify, numgpt.io, ... on first use


_subpackage = submodules_on_first_use(__name__)
