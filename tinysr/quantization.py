"""int8 on the CPU: the transformer's linear layers with int8 weights and dynamically quantized activations.

The linears are ~all of TinySR's transformer FLOPs; attention, norms and the VAE stay in fp32. This is
torch's eager dynamic quantization (fbgemm/oneDNN kernels; torch marks the API deprecated in favour of
torchao, whose int8 path ran ~35x slower than fp32 here without torch.compile, so we keep the fast one).
"""

import copy
import warnings

import torch

from .errors import UnsupportedOption


def int8_engine() -> str:
    """The quantized engine whose kernels the linears are packed for (packing, not the engine at run time, picks them).

    On a CPU with AMX tiles oneDNN's int8 matmul uses them: 3740 GFLOP/s against 960 for torch's default
    `x86` engine (fbgemm) at 1024x1536x6144 on a 2-core Xeon with AMX, the same numbers out; elsewhere
    the default stays, as nothing measured says otherwise.
    """
    if torch.cpu._is_amx_tile_supported() and "onednn" in torch.backends.quantized.supported_engines:
        return "onednn"
    return torch.backends.quantized.engine


def quantize_linears_int8(model: torch.nn.Module) -> torch.nn.Module:
    """An int8 copy of `model` (per-channel weights, activations quantized per call); the float model is left as it was.

    The copy shares the float linears' tensors while it is built instead of duplicating them, so quantizing
    SD3's transformer needs room for its int8 copy beside the float model, not for a second fp32 one.
    """
    if next(model.parameters()).device.type != "cpu":
        raise UnsupportedOption("int8 runs on the CPU only")
    shared = {id(p): p for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
    twin = copy.deepcopy(model, shared)
    engine = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per", UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        try:
            torch.backends.quantized.engine = int8_engine()
            return quantize_dynamic(twin, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
        finally:
            torch.backends.quantized.engine = engine
