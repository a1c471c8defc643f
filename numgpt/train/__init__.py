"""The training run: config (``config``), AdamW and the schedule (``optim``), the loop
(``loop``), plots (``plots``).

``numgpt.train`` is both this package and the function that runs training:
``numgpt.train(config)`` calls ``numgpt.train.loop.train``. The package's module object is
given a ``__call__`` (module ``__class__`` assignment, supported since Python 3.5) so that
``numgpt.train.loop`` and ``numgpt.train(...)`` both work; the loop is imported on first call,
so ``import numgpt.train.config`` stays light (no NumPy before the thread count is set).
"""
import sys
import types


class _CallableTrainPackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .loop import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableTrainPackage

from ..core import submodules_on_first_use  # noqa: E402

__getattr__ = submodules_on_first_use(__name__)  # numgpt.train.MODULE on first use
