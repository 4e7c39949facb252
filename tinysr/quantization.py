"""int8 on the CPU: the transformer's linear layers with int8 weights and dynamically quantized activations.

The linears are ~all of TinySR's transformer FLOPs. Eager, this is torch's dynamic quantization (fbgemm/oneDNN
kernels; torch marks the API deprecated in favour of torchao, whose eager int8 tensors ran ~35x slower than fp32
here), with attention and norms in fp32. Compiled (`CompiledInt8`), torchao's PT2E flow with the x86 inductor
quantizer: inductor lowers each int8 linear to one oneDNN kernel and runs the rest in bf16 where the CPU has it.
"""

import copy
import inspect
import warnings

import torch
from torch.utils._pytree import tree_map

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


class Int8Transformer(torch.nn.Module):
    """Runs an int8 transformer from a pipeline in another float dtype: float inputs go in as fp32 (what the
    quantized linears take) and outputs come back in the dtype the latent came in; `autocast` runs the
    float parts that remain in that dtype instead (inductor fuses the casts into its kernels)."""

    def __init__(self, model: torch.nn.Module, autocast: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.autocast = autocast
        self.config = getattr(model, "config", None)  # the pipeline reads the patch and table sizes

    def forward(self, latent, *args, **kwargs):
        def fp32(t):
            return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

        def back(t):
            return t.to(latent.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

        with torch.autocast("cpu", dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            out = self.model(*tree_map(fp32, (latent, *args)), **tree_map(fp32, kwargs))
        return tree_map(back, out)


class CompiledInt8(torch.nn.Module):
    """`model` with int8 linears, built at the first call for each latent size (tiles share one): exported with the
    batch dynamic, quantized by torchao's X86InductorQuantizer (per-channel weights, activations per call, so no
    calibration set) and compiled by inductor (with the weight freezing the pipeline's `compile` switches on).

    Sizes are not left dynamic: export then guards a crop of the position table on the size it saw, and a tile of
    the table's full width failed that guard. Paper-size TinySR's transformer on a 2-core Xeon with AMX (random
    weights, one 64-latent tile): 0.38 s against 0.54 s compiled in bf16 and 0.84 s eager bf16; relative RMS error
    from fp32 0.018 (bf16: 0.007-0.010).
    """

    def __init__(self, model: torch.nn.Module, float_dtype: torch.dtype):
        super().__init__()
        try:
            from torchao.quantization.pt2e import quantize_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
        except ImportError as e:
            raise UnsupportedOption("int8 with --compile needs torchao (pip install torchao==0.18.0)") from e
        self.pt2e, self.x86 = quantize_pt2e, x86_inductor_quantizer
        self.float_model = [model]  # a reference, not a submodule: the pipeline saves and counts it
        self.config = getattr(model, "config", None)  # the pipeline reads the patch and table sizes
        self.float_dtype = float_dtype
        self.compiled = {}

    def forward(self, latent, *args, **kwargs):
        size = tuple(latent.shape[2:])
        if size not in self.compiled:
            self.compiled[size] = self._build(latent, args, kwargs)
        return self.compiled[size](latent, *args, **kwargs)

    @torch.no_grad()
    def _build(self, latent, args, kwargs):
        model = self.float_model[0]
        example_args, example_kwargs, shapes = example_batch_of_two(model, latent, args, kwargs)
        exported = torch.export.export(model, example_args, example_kwargs, dynamic_shapes=shapes).module()
        x86 = self.x86
        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config(is_dynamic=True))
        prepared = self.pt2e.prepare_pt2e(exported, quantizer)
        prepared(*example_args, **example_kwargs)  # observes the weights; activations are quantized per call
        converted = self.pt2e.convert_pt2e(prepared)
        autocast = None if self.float_dtype == torch.float32 else self.float_dtype
        if autocast is not None:
            without_dtype_asserts(converted)
        return torch.compile(Int8Transformer(converted, autocast), dynamic=True)


def without_dtype_asserts(graph_module: torch.fx.GraphModule) -> None:
    """Export records each `.to(dtype)` as an assert that the tensor has that dtype; autocast breaks those."""
    for node in list(graph_module.graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph_module.graph.erase_node(node)
    graph_module.recompile()


def example_batch_of_two(model, latent, args, kwargs):
    """Export inputs (the call's, with batch 2, as export fixes a size of 1 for good) and every tensor's batch dynamic."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    bound = inspect.signature(model.forward).bind(latent, *args, **kwargs)
    inputs, shapes = {}, {}
    for name, value in bound.arguments.items():
        if isinstance(value, torch.Tensor) and value.ndim:
            value = value[:1].expand(2, *value.shape[1:]).contiguous()
            value = value.float() if value.is_floating_point() else value
        inputs[name] = value
        shapes[name] = {0: batch} if isinstance(value, torch.Tensor) and value.ndim else None
    return (inputs.pop(next(iter(inputs))),), inputs, shapes
