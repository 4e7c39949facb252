"""TinySR: one-step 4x real-world super-resolution with a pruned, condition-free SD3 transformer.

The models and pipelines import diffusers (seconds); they load on first use, so `python -m tinysr --help`
and commands that never touch a model start fast.
"""

import importlib

__version__ = "0.1.0"
_LAZY = {
    "TinyAutoencoder": ".models", "TinySRTransformer": ".models",
    "TinySRPipeline": ".pipelines", "TSDSRPipeline": ".pipelines", "load_pipeline": ".pipelines",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
