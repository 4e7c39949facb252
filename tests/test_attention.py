"""CPU attention by the measured faster kernel: same numbers as the fused kernel, chosen once per shape, kept when compiled."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_student, make_tiny_vae, random_image
from tinysr import TinySRPipeline, attention
from tinysr.attention import blocked_attention, cpu_attention
from tinysr.bench import device_label
from tinysr.errors import UnsupportedOption


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [3, 28, 10**6], ids=["rows", "heads", "all"])
def test_blocked_attention_matches_the_fused_kernel(monkeypatch, rows, dtype):
    """Blocks of 3 query rows of one head, of 4 heads (6 in all: a short last block), or everything at once, on
    transposed views as the transformers pass them: the fused kernel's numbers (bf16: to its rounding of the scores)."""
    keys = 5
    monkeypatch.setattr(attention, "SCORE_BLOCK_BYTES", rows * keys * dtype.itemsize)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, d, generator=g).to(dtype).transpose(1, 2) for n, d in ((7, 8), (keys, 8), (keys, 6)))
    out = blocked_attention(q, k, v)
    assert out.shape == (2, 3, 7, 6) and out.dtype == dtype
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    tolerance = 1e-6 if dtype == torch.float32 else 0.02
    torch.testing.assert_close(out.double(), reference, rtol=tolerance, atol=tolerance)


def counting_kernels(monkeypatch) -> Counter:
    calls = Counter()

    def counted(name, kernel):
        def run(*args):
            calls[name] += 1
            return kernel(*args)

        return run

    monkeypatch.setattr(attention, "KERNELS", {name: counted(name, kernel) for name, kernel in attention.KERNELS.items()})
    monkeypatch.setattr(attention, "_fastest", {})
    return calls


def test_cpu_attention_measures_each_half_precision_shape_once(monkeypatch):
    calls = counting_kernels(monkeypatch)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 64, 16, generator=g).bfloat16() for _ in range(3))
    with cpu_attention():
        first, second = F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
        assert sum(calls.values()) == 4 + 4 + 2  # a warm-up and 3 timed runs of each kernel, then the winner twice
        assert len(attention._fastest) == 1
        winner = next(iter(attention._fastest.values()))
        assert calls[winner] == 6
        F.scaled_dot_product_attention(q.float(), k.float(), v.float())  # fp32: the fused kernel, nothing timed
        assert calls["fused"] == (5 if winner == "blocked" else 7) and len(attention._fastest) == 1
        before = sum(calls.values())
        mask = torch.ones(64, 64, dtype=torch.bool)
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # masked, causal or with gradients: torch's own call
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        grad_q = q.float().requires_grad_()
        F.scaled_dot_product_attention(grad_q, k.float(), v.float()).sum().backward()
        assert sum(calls.values()) == before and grad_q.grad is not None
    F.scaled_dot_product_attention(q, k, v)
    assert sum(calls.values()) == before  # outside the block nothing is routed
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first.float(), F.scaled_dot_product_attention(q.float(), k.float(), v.float()), atol=0.02, rtol=0.02)


def test_half_precision_pipeline_keeps_the_measured_attention_when_compiled(monkeypatch):
    """bf16 TinySR: its attention goes through the measured choice, eager and compiled (inductor does not lower it
    back to the fused kernel), and both images are as far from fp32's as bf16 rounding puts them."""
    calls = counting_kernels(monkeypatch)
    image = random_image(24, 32)
    reference = TinySRPipeline(make_student(), make_tiny_vae())(image).image
    pipe = TinySRPipeline(make_student(), make_tiny_vae(), dtype="bf16")
    eager = pipe(image).image
    shapes = len(attention._fastest)
    runs = sum(calls.values()) - 8 * shapes  # each shape measured once, then every block of every tile batch
    assert shapes >= 1 and runs >= 2
    compiled = pipe.compile()(image).image
    assert sum(calls.values()) == 8 * shapes + 2 * runs and len(attention._fastest) == shapes
    eager_error, compiled_error = (eager - reference).abs(), (compiled - reference).abs()  # bf16 rounding: 0.004 mean, 0.05 max
    assert compiled_error.mean() < 1.5 * eager_error.mean() and compiled_error.max() < 2 * eager_error.max()


@pytest.mark.parametrize("kernel", ["fused", "blocked"])
def test_half_precision_pipeline_is_as_close_to_fp32_with_either_kernel(monkeypatch, kernel):
    """TINYSR_CPU_ATTENTION pins the kernel (nothing timed, only it runs); either way the bf16 image stays within
    bf16's distance of fp32's."""
    calls = counting_kernels(monkeypatch)
    monkeypatch.setenv("TINYSR_CPU_ATTENTION", kernel.upper())
    image = random_image(24, 32)
    reference = TinySRPipeline(make_student(), make_tiny_vae())(image).image
    error = (TinySRPipeline(make_student(), make_tiny_vae(), dtype="bf16")(image).image - reference).abs()
    assert calls[kernel] >= 2 and sum(calls.values()) == calls[kernel] and not attention._fastest
    assert error.mean() < 0.008 and error.max() < 0.1, (error.mean(), error.max())  # measured: 0.004 and 0.05


def test_an_unknown_attention_setting_is_refused_before_any_work(monkeypatch):
    calls = counting_kernels(monkeypatch)
    monkeypatch.setenv("TINYSR_CPU_ATTENTION", "flash")
    pipe = TinySRPipeline(make_student(), make_tiny_vae(), dtype="bf16")
    with pytest.raises(UnsupportedOption, match="TINYSR_CPU_ATTENTION='flash' is not a CPU attention kernel: use measure"):
        pipe(random_image(24, 32))
    assert not calls
    monkeypatch.setenv("TINYSR_CPU_ATTENTION", "measure")
    assert pipe(random_image(24, 32)).image.shape[-2:] == (96, 128)


def test_the_bench_says_when_the_attention_kernel_was_pinned():
    run = {"device": "cpu (x86_64, 2 threads)", "native_bf16": True}
    assert device_label({**run, "cpu_attention": "measure"}) == device_label(run) == "cpu (x86_64, 2 threads), native bf16: yes"
    assert device_label({**run, "cpu_attention": "blocked"}).endswith(", half-precision attention pinned to blocked")
