"""``import numgpt`` and then the dotted names the README uses, in a fresh interpreter each.

After a bare ``import numgpt``, ``numgpt.train.config.TrainConfig`` and
``numgpt.verify.trace.record`` raised AttributeError (a package's submodules are attributes
only once imported). Each package now imports a submodule on first attribute access
(``numgpt.core.submodules_on_first_use``), and ``import numgpt`` still loads no NumPy.
"""

import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("expr,kind", [
    ("numgpt.train.config.TrainConfig", "class"),
    ("numgpt.verify.trace.record", "function"),
    ("numgpt.infer.evaluate.lambada", "function"),
    ("numgpt.io.checkpoint.load", "function"),
    ("numgpt.core.ops.layernorm", "function"),
])
def test_readme_dotted_names_work_after_a_bare_import(expr, kind):
    done = _run(f"import numgpt; print(type({expr}).__name__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("type" if kind == "class" else "function")


def test_train_config_on_first_use_still_leaves_numpy_unloaded():
    done = _run("import sys, numgpt; numgpt.train.config.TrainConfig(n_layer=2); "
                "print('numpy' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_missing_name_is_still_an_attribute_error():
    """Negative case: the hook imports submodules only; any other name is AttributeError, and
    hasattr stays False (no import is attempted for private names)."""
    done = _run("import numgpt\n"
                "for obj, name in [(numgpt, 'nothing'), (numgpt.verify, 'nothing'), "
                "(numgpt.train, 'nothing'), (numgpt.core, '_private')]:\n"
                "    assert not hasattr(obj, name), name\n"
                "try:\n    numgpt.verify.nothing\nexcept AttributeError as e:\n    print(e)\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "module 'numgpt.verify' has no attribute 'nothing'"
