"""int8 on the CPU: the transformer's linear layers with int8 weights and dynamically quantized activations.

The linears are ~all of TinySR's transformer FLOPs; attention, norms and the VAE stay in fp32. This is
torch's eager dynamic quantization (fbgemm/oneDNN kernels; torch marks the API deprecated in favour of
torchao, whose int8 path ran ~35x slower than fp32 here without torch.compile, so we keep the fast one).
"""

import copy
import warnings

import torch

from .errors import UnsupportedOption


def quantize_linears_int8(model: torch.nn.Module) -> torch.nn.Module:
    """An int8 copy of `model` (per-channel weights, activations quantized per call); the float model is left as it was."""
    if next(model.parameters()).device.type != "cpu":
        raise UnsupportedOption("int8 runs on the CPU only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per", UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear: per_channel_dynamic_qconfig})
