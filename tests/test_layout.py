"""The package's house plan: layer folders, and imports that only go downwards.

The layers, top (lowest) to bottom (highest)::

    core -> io -> infer -> train -> verify -> inspect -> serve -> cli

``errors`` (the exception family) may be imported by every layer; ``cli`` and the package's
``__init__`` may import any layer. A module may import its own layer and the layers above it
in this list, never one below. The test walks every ``import`` statement of every module
(top level and inside functions) with ``ast``, so a lazy import cannot hide an upward edge.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import numgpt

PACKAGE = Path(__file__).resolve().parents[1] / "numgpt"
LAYERS = ["core", "io", "infer", "train", "verify", "inspect", "serve"]
ANYWHERE = {"errors"}  # importable from every layer
TOP_LEVEL = {"cli", "__init__", "__main__", "errors"}


def _layer_of(dotted: str) -> str:
    """'numgpt.core.ops' -> 'core'; 'numgpt.errors' -> 'errors'; 'numgpt' -> '__init__'."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts)


def imported_numgpt_modules(path: Path) -> list[tuple[int, str]]:
    """Every numgpt module ``path`` imports, as (line, absolute dotted name)."""
    me = _module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "numgpt"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "numgpt":
                continue
            if node.module is None or target == "numgpt" or target.count(".") == 1 and \
                    target.split(".")[1] in LAYERS:
                # `from . import x` / `from ..core import ops`: each name may be a module
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def upward_imports(path: Path) -> list[str]:
    here = _layer_of(_module_name(path))
    if here in TOP_LEVEL and here != "errors":
        return []
    bad = []
    for line, target in imported_numgpt_modules(path):
        there = _layer_of(target)
        if there in ANYWHERE or there == "__version__":
            continue
        if here == "errors" or there not in LAYERS or LAYERS.index(there) > LAYERS.index(here):
            bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} "
                       f"({here} may not import {there})")
    return bad


def test_every_module_lives_in_a_layer_folder():
    loose = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in TOP_LEVEL)
    assert loose == [], f"modules outside the layer folders: {loose}"
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"
                  and (p / "__init__.py").exists()) == sorted(LAYERS)


def test_imports_only_go_downwards():
    bad = [b for p in sorted(PACKAGE.rglob("*.py")) for b in upward_imports(p)]
    assert bad == [], "upward imports:\n" + "\n".join(bad)


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """Negative control: a core module that imports the server (lazily, inside a function)
    and one that imports the training loop must both be reported."""
    fake = tmp_path / "numgpt"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "__init__.py").write_text("")
    planted = fake / "core" / "bad.py"
    planted.write_text("from ..errors import NumGPTError\n"
                       "def f():\n    from ..serve import engine\n"
                       "import numgpt.train.loop\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    found = upward_imports(planted)
    assert len(found) == 2, found
    assert any("imports numgpt.serve.engine" in f for f in found), found
    assert any("imports numgpt.train.loop" in f for f in found), found


@pytest.mark.parametrize("name", ["load", "generate", "train", "perplexity"])
def test_public_entry_points_are_reexported(name):
    import numgpt

    assert callable(getattr(numgpt, name))


def test_train_is_a_package_and_a_function():
    import numgpt
    import numgpt.train.loop as loop

    assert numgpt.train.loop is loop
    assert callable(numgpt.train)


@pytest.mark.parametrize("module", ["numgpt", "numgpt.cli", "numgpt.core.threads", "numgpt.train",
                                    "numgpt.core.config", "numgpt.train.config"])
def test_modules_imported_before_the_thread_count_is_set_leave_numpy_unloaded(module):
    """BLAS reads its thread count when NumPy loads, so the CLI must parse --threads and call
    set_blas_threads before anything imports NumPy. Negative control: numgpt.core.ops does."""
    import subprocess
    import sys

    probe = "import sys, importlib; importlib.import_module(sys.argv[1]); print('numpy' in sys.modules)"
    loaded = lambda m: subprocess.run([sys.executable, "-c", probe, m], capture_output=True,  # noqa: E731
                                      text=True, check=True).stdout.strip()
    assert loaded(module) == "False"
    assert loaded("numgpt.core.ops") == "True"


def test_building_a_training_config_leaves_numpy_unloaded():
    """`numgpt train` builds and validates its TrainConfig (model shape checked by GPTConfig)
    before it chooses the thread count from it."""
    import subprocess
    import sys

    probe = ("import sys; from numgpt.train.config import TrainConfig; "
             "TrainConfig(n_layer=2).model_config(vocab_size=256); print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _module_imports(path: Path, package: str) -> set[str]:
    """Every numgpt module ``path`` imports (top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {target, *(f"{target}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def _import_cycles(root: Path) -> list[tuple[str, str]]:
    """Pairs of modules (not packages) of ``root`` that import each other."""
    modules = {}
    for path in root.rglob("*.py"):
        if path.name != "__init__.py":
            modules[".".join(path.relative_to(root.parent).with_suffix("").parts)] = path
    edges = {name: _module_imports(path, name.rsplit(".", 1)[0]) & set(modules)
             for name, path in modules.items()}
    return sorted((a, b) for a in edges for b in edges[a] if a < b and a in edges[b])


def test_no_two_modules_import_each_other():
    """core/model <-> core/quant and infer/decoder <-> infer/sample imported each other
    (inside functions, to dodge the cycle); each pair is now one-way."""
    assert _import_cycles(Path(numgpt.__file__).parent) == []


def test_the_cycle_check_sees_a_cycle_hidden_inside_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from .a import y\n")
    assert _import_cycles(pkg) == [("pkg.a", "pkg.b")]
