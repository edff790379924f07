"""lesskv: LESS (Dong et al., ICML 2024) for Hugging Face models.

A sparse KV-cache policy keeps a small budget of key/value pairs per head; LESS adds a tiny
learned low-rank state that absorbs every evicted pair. The public API::

    import lesskv
    model, tokenizer = lesskv.load_model()                       # built-in SmolLM2-135M
    cache = lesskv.LessCache.from_pretrained(path, model)        # LESS with real eviction
    with lesskv.using_method(model, "less", policy=..., kernels=...):  # teacher-forced
        ...

Names are imported on first use, so ``import lesskv`` (and ``lesskv --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_HOMES = {
    "Budget": "lesskv.core.budget",
    "Policy": "lesskv.core.policies",
    "H2O": "lesskv.core.policies",
    "LambdaShape": "lesskv.core.policies",
    "TOVA": "lesskv.core.policies",
    "make_policy": "lesskv.core.policies",
    "LessKVError": "lesskv.errors",
    "LessCache": "lesskv.hf.cache",
    "LessKernels": "lesskv.hf.checkpoint",
    "enable": "lesskv.hf.attention",
    "cache_argument": "lesskv.hf.compat",
    "load_model": "lesskv.hf.loading",
    "METHODS": "lesskv.hf.methods",
    "make_cache": "lesskv.hf.methods",
    "set_method": "lesskv.hf.methods",
    "using_method": "lesskv.hf.methods",
}
__all__ = [
    "METHODS",
    "H2O",
    "Budget",
    "LambdaShape",
    "LessCache",
    "LessKVError",
    "LessKernels",
    "Policy",
    "TOVA",
    "__version__",
    "cache_argument",
    "enable",
    "load_model",
    "make_cache",
    "make_policy",
    "set_method",
    "using_method",
]

if TYPE_CHECKING:
    from lesskv.core.budget import Budget
    from lesskv.core.policies import H2O, TOVA, LambdaShape, Policy, make_policy
    from lesskv.errors import LessKVError
    from lesskv.hf.attention import enable
    from lesskv.hf.cache import LessCache
    from lesskv.hf.checkpoint import LessKernels
    from lesskv.hf.compat import cache_argument
    from lesskv.hf.loading import load_model
    from lesskv.hf.methods import METHODS, make_cache, set_method, using_method


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module 'lesskv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
