"""Look inside a model: logit lens, activation patching, ablation, direct logit attribution.

Every tool is built on the model's named hook points (``core/hooks.py``: ``run_with_cache``
and ``run_with_hooks``) and nothing else, and each result is checked against the same
computation done with TransformerLens's own hooks on the same weights (tests/test_inspect.py).

==================  ==========================================================================
module              what
==================  ==========================================================================
``common.py``       prompt checks, the logit-difference metric, text tables, PNG heatmaps
``lens.py``         logit lens: each layer's residual stream through ``ln_f`` and the head
``patching.py``     activation patching: clean -> corrupted, per (layer, position) and per head
``ablation.py``     zero or mean ablation of each head and MLP: change in loss or logit diff
``attribution.py``  direct logit attribution of each head and MLP (frozen ``ln_f`` scale)
``report.py``       each result as a text table and a PNG heatmap (``numgpt inspect``)
==================  ==========================================================================
"""

from .ablation import Ablation, ablate
from .attribution import Attribution, attribute
from .lens import LogitLens, logit_lens
from .patching import Patching, patch

__all__ = ["LogitLens", "logit_lens", "Patching", "patch", "Ablation", "ablate",
           "Attribution", "attribute"]
