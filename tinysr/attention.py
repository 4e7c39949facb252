"""Half-precision attention on the CPU by whichever of two kernels this machine runs faster, measured per shape.

ATen's fused CPU kernel (flash attention) is not always the faster one. On a 2-core Zen 4 (AVX-512 bf16, no
AMX), bf16, paper-size TinySR's 24 heads over 1024 tokens took 41 ms in it and 20 ms as two oneDNN matmuls
around a softmax, a few heads at a time. So inside `cpu_attention()` the first bf16 or fp16 call of each shape
times both on its own inputs and keeps the winner. The matmul kernel rounds the scores to bf16 before the
softmax, where the fused one keeps them in fp32; paper-size TinySR's bf16 output was 0.0094 relative RMS from
fp32 either way. fp32 keeps the fused kernel, which won there, so fp32 output never depends on a timing.

It catches `F.scaled_dot_product_attention` calls on 4-D CPU tensors of one batch and head count, without mask,
dropout, causal masking, scale, grouped heads or gradient: diffusers' SD3 attention as well as ours. The choice is
one opaque op, so torch.compile and torch.export keep it: inductor would fold a plain matmul-softmax-matmul back
into the fused kernel.

`TINYSR_CPU_ATTENTION=fused` (or `blocked`) pins the half-precision kernel instead of measuring it: for bf16 images
that repeat across processes, and for a process whose first call of a shape may meet cores busy with other work
(an app beside a training run), where the measurement could keep the slower kernel for the life of the process.
"""

import os

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .device import time_fn
from .errors import UnsupportedOption

KERNEL_SETTING = "TINYSR_CPU_ATTENTION"
SCORE_BLOCK_BYTES = 16 * 2**20  # scores per block stay near the caches and bound the memory at any length
_fastest: dict = {}  # (shapes, dtype, threads) -> name of the faster kernel


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over blocks of heads (or of query rows, for long keys) of SCORE_BLOCK_BYTES."""
    b, h, n, d = q.shape
    q, k, v = (t.reshape(b * h, *t.shape[2:]) for t in (q, k, v))
    rows = max(1, SCORE_BLOCK_BYTES // (k.shape[1] * q.element_size()))
    heads, rows = max(1, rows // n), min(rows, n)
    out = q.new_empty(b * h, n, v.shape[-1])
    for i in range(0, b * h, heads):
        for j in range(0, n, rows):
            scores = torch.bmm(q[i : i + heads, j : j + rows] * d**-0.5, k[i : i + heads].transpose(1, 2))
            torch.bmm(scores.softmax(-1), v[i : i + heads], out=out[i : i + heads, j : j + rows])
    return out.view(b, h, n, -1)


KERNELS = {"fused": F.scaled_dot_product_attention, "blocked": blocked_attention}


def kernel_setting() -> str:
    """"measure" (the default), or the half-precision kernel TINYSR_CPU_ATTENTION pins."""
    value = os.environ.get(KERNEL_SETTING, "").strip().lower() or "measure"
    if value != "measure" and value not in KERNELS:
        raise UnsupportedOption(f"{KERNEL_SETTING}={value!r} is not a CPU attention kernel: use measure (the default), {' or '.join(KERNELS)}")
    return value


def fastest_kernel(q, k, v) -> str:
    """The kernel that ran this shape fastest here: best of 3 runs each after a warm-up, measured at its first call."""
    if q.dtype == torch.float32:
        return "fused"
    setting = kernel_setting()
    if setting != "measure":
        return setting
    key = (q.shape, k.shape, v.shape, q.dtype, torch.get_num_threads())
    if key not in _fastest:
        seconds = {name: time_fn(lambda kernel=kernel: kernel(q, k, v), q.device, 3, statistic=min) for name, kernel in KERNELS.items()}
        _fastest[key] = min(seconds, key=seconds.get)
    return _fastest[key]


def narrowest_dtype(*tensors) -> torch.dtype:
    """What autocast would compute in: an int8 export traced in fp32 runs under bf16 autocast, which leaves a custom
    op's inputs alone, so a qk-norm's fp32 q and k meet a bf16 v here."""
    return min((t.dtype for t in tensors), key=lambda dtype: torch.finfo(dtype).bits)


@torch.library.custom_op("tinysr::measured_attention", mutates_args=())
def measured_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = (t.to(narrowest_dtype(q, k, v)) for t in (q, k, v))
    return KERNELS[fastest_kernel(q, k, v)](q, k, v).contiguous()  # contiguous, as the fake says


@measured_attention.register_fake
def _(q, k, v):
    return q.new_empty(*q.shape[:-1], v.shape[-1], dtype=narrowest_dtype(q, k, v))


def _plain_cpu_inputs(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """(query, key, value) of an unmasked CPU inference call with heads, else None."""
    inputs = (query, key, value)
    plain = attn_mask is None and not dropout_p and not is_causal and scale is None and not enable_gqa
    cpu = all(t.device.type == "cpu" and t.ndim == 4 and t.numel() and not t.requires_grad for t in inputs)
    return inputs if plain and cpu and query.shape[:2] == key.shape[:2] == value.shape[:2] else None


class _MeasuredCPUAttention(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _plain_cpu_inputs(*args, **kwargs) if func is F.scaled_dot_product_attention else None
        return func(*args, **kwargs) if inputs is None else measured_attention(*inputs)


def cpu_attention() -> TorchFunctionMode:
    """`with cpu_attention():` sends plain CPU attention in the block through the measured (or pinned) kernel choice."""
    kernel_setting()  # a bad setting stops here, before any work, not inside a compiled graph
    return _MeasuredCPUAttention()
