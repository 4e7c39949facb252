"""TinySR: one-step 4x real-world super-resolution with a pruned, condition-free SD3 transformer.

The models and pipelines import diffusers (seconds); they load on first use, so `python -m tinysr --help`
and commands that never touch a model start fast.
"""

import importlib
import logging

# diffusers imports torchao (the int8 --compile path) whenever it is installed, and torchao's import logs three
# harmless lines (a torch deprecation, diffusers' checkpoint support, bitsandbytes' optional kernels) that would
# otherwise open every command's output
for _logger in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer", "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_logger).setLevel(logging.ERROR)

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
