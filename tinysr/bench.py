"""TSD-SR vs TinySR at paper size with random weights (or loaded ones): parameters, MACs, per-stage latency.

Weights do not change cost, so nothing is downloaded for the paper-size numbers. Stages are timed on the model path only
(encode, transformer, decode of the bicubic-upscaled image); each reported latency is the median
of `repeats` runs after one warm-up, and every ratio comes from the same run.
"""

import gc
import platform

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from .attention import kernel_setting
from .device import PeakMemory, dtype_name, half_dtype, native_bf16, parse_dtype, pick_device, resolve_precision, time_fn
from .models import TinyAutoencoder, TinySRTransformer
from .pipelines import TinySRPipeline, TSDSRPipeline

SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
SD3_MEDIUM_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16, norm_num_groups=32,
    sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)
PROMPT_TOKENS = 333
TINY_TRANSFORMER = dict(sample_size=32, num_attention_heads=2, attention_head_dim=16, pos_embed_max_size=64)


def build_pipelines(scale: str, device) -> dict:
    """Random-weight TSD-SR and TinySR of the paper's architectures (or tiny ones for a smoke test),
    or with `loaded` the models `tsdsr` and `tinysr` resolve to (the bundled demo weights unless configured)."""
    if scale == "loaded":
        from .pipelines import load_pipeline

        return {"TSD-SR": load_pipeline("tsdsr", device=device), "TinySR": load_pipeline("tinysr", device=device)}
    if scale == "paper":
        sd3 = SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER)
        vae = AutoencoderKL(**SD3_MEDIUM_VAE)
        student, tiny_vae = TinySRTransformer(), TinyAutoencoder()
    else:
        small = dict(TINY_TRANSFORMER, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32)
        sd3 = SD3Transformer2DModel(**small, num_layers=4)
        vae = AutoencoderKL(**dict(SD3_MEDIUM_VAE, block_out_channels=[8, 8, 16, 16], norm_num_groups=4))
        student, tiny_vae = TinySRTransformer(**TINY_TRANSFORMER, num_layers=2), TinyAutoencoder(channels=16)
    cfg = sd3.config
    prompt = torch.randn(1, PROMPT_TOKENS, cfg.joint_attention_dim) * 0.1
    pooled = torch.randn(1, cfg.pooled_projection_dim) * 0.1
    return {
        "TSD-SR": TSDSRPipeline(sd3, vae, prompt, pooled, device=device),
        "TinySR": TinySRPipeline(student, tiny_vae, device=device),
    }


def stage_fns(pipe, x):
    """Closures for the pipeline's three stages with its default tiles (one tile each at paper size, 128 -> 512)."""
    z = pipe.encode_latents(x)
    return {
        "encode": lambda: pipe.encode_latents(x),
        "transformer": lambda: pipe.predict_tiled(z, tile_batch=pipe.default_tile_batch()),
        "decode": lambda: pipe.decode_latents(z),
    }


def count_macs(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def default_precisions(device: torch.device) -> list[str]:
    """fp32, the device's half precision, and int8 on the CPU."""
    names = ["fp32", dtype_name(half_dtype(device))]
    return names + ["int8"] if device.type == "cpu" else names


@torch.no_grad()
def run_benchmark(
    size=128, device="auto", repeats=2, dtypes=None, scale="paper", baselines=(), onnx=False, batch_sizes=(), compile=False, log=print
) -> dict:
    """Per-stage latency for each precision (and the ONNX backend with `onnx`); with `batch_sizes`, end-to-end
    throughput (images/s, peak memory) of whole images in batches, in the first precision. With `compile` both
    pipelines are timed as `--compile` runs them (the untimed warm-up call pays the compilation)."""
    device = pick_device(device)
    precisions = list(dict.fromkeys(resolve_precision(d, device) for d in (dtypes or default_precisions(device))))
    if any(b != "realesrgan-x4plus" for b in baselines):
        raise ValueError(f"bench baselines: only realesrgan-x4plus has a network to time, got {', '.join(baselines)}")
    log(f"building TSD-SR and TinySR ({'loaded weights' if scale == 'loaded' else scale + ' size, random weights'}) on {device} ...")
    pipes = build_pipelines(scale, device)
    out = size * 4
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "input": f"{size}x{size}",
        "output": f"{out}x{out}",
        "torch": torch.__version__,
        "native_bf16": native_bf16() if device.type == "cpu" else None,
        "cpu_attention": kernel_setting() if device.type == "cpu" else None,
        "scale": scale,
        "compiled": compile,
        "models": {},
    }
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, out, out, generator=generator) * 2 - 1
    results["matmul_gflops"] = {p: matmul_gflops(device, p, repeats) for p in precisions if p != "int8"}
    for name in list(pipes):
        pipe = pipes.pop(name)  # each model is freed once timed: paper-size TSD-SR's copies beside TinySR's compile filled 24 GB
        params = pipe.num_parameters()
        entry = {"params": params, "macs": {}, "latency": {}}
        pipe.to(dtype="fp32")
        x = image.to(device)
        fns = stage_fns(pipe, x)
        entry["macs"] = {stage: count_macs(fn) for stage, fn in fns.items()}
        for precision in precisions:
            pipe.to(dtype=precision)
            if compile:
                pipe.compile()
            log(f"timing {name} {precision}{' compiled' if compile else ''} ...")
            entry["latency"][precision] = time_stages(pipe, x.to(pipe.dtype), device, repeats)
        if onnx:
            entry["latency"]["onnx fp32"] = time_onnx(pipe, x, device, repeats, log, name)
        if batch_sizes:
            pipe.to(dtype=precisions[0])
            if compile:
                pipe.compile()
            entry["throughput"] = {str(b): throughput(pipe, x, b, device, repeats, log, name) for b in batch_sizes}
            entry["throughput_dtype"] = precisions[0]
        results["models"][name] = entry
        del pipe, fns
        if compile:
            torch._dynamo.reset()  # its compiled graphs hold their own frozen copies of the weights
        gc.collect()
    teacher, student = results["models"]["TSD-SR"], results["models"]["TinySR"]
    results["ratios"] = {
        "params_transformer": teacher["params"]["transformer"] / student["params"]["transformer"],
        "params_vae": teacher["params"]["vae"] / student["params"]["vae"],
        "macs_total": sum(teacher["macs"].values()) / sum(student["macs"].values()),
        "vae_macs": (teacher["macs"]["encode"] + teacher["macs"]["decode"]) / (student["macs"]["encode"] + student["macs"]["decode"]),
        **{f"latency_{d}": teacher["latency"][d]["total"] / student["latency"][d]["total"] for d in teacher["latency"]},
    }
    for name in baselines:
        results.setdefault("baselines", {})[name] = time_baseline(name, image, device, precisions, repeats, log)
    return results


def matmul_gflops(device, precision: str, repeats: int) -> float:
    """This device's dense matmul rate in a float precision: the compute floor's denominator.

    The best of at least 10 runs, as a floor is what the device can do: on a 2-core CPU the rate climbs over
    the first runs (bf16 1870 -> 2300 GFLOP/s), and a median of 3 once read 1057 where later runs read 2464.
    """
    n = 4096 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=parse_dtype(precision)) for _ in range(2))
    return 2 * n**3 / time_fn(lambda: a @ b, device, max(repeats, 10), statistic=min) / 1e9


def time_stages(pipe, x, device, repeats) -> dict:
    lat = {stage: time_fn(fn, device, repeats) for stage, fn in stage_fns(pipe, x).items()}
    lat["total"] = sum(lat.values())
    return lat


def time_onnx(pipe, x, device, repeats, log, name) -> dict:
    """The same stages exported to ONNX and run by onnxruntime (fp32), from a temporary folder."""
    import tempfile

    from .onnx import OnnxPipeline, export_onnx

    with tempfile.TemporaryDirectory() as folder:
        log(f"exporting {name} to ONNX ...")
        export_onnx(pipe, folder)
        pipe.to(device)
        log(f"timing {name} onnx fp32 ...")
        return time_stages(OnnxPipeline(folder, device=device), x.float(), device, repeats)


def throughput(pipe, x, batch: int, device, repeats, log, name) -> dict:
    """Whole images (encode, transformer, decode; the pipeline's default tile batch) in batches of `batch`."""
    xb = x.to(pipe.dtype).expand(batch, -1, -1, -1).contiguous()
    log(f"throughput {name} {pipe.precision} batch {batch} ...")

    def fn():
        pipe._run(xb, "default", 64, 8, 128, 16, None, {}, pipe.default_tile_batch())

    fn()
    with PeakMemory(device) as peak:
        seconds = time_fn(fn, device, repeats)
    return {"images_per_s": batch / seconds, "seconds": seconds, "peak_gb": peak.peak_bytes / 2**30, "memory": peak.kind}


def time_baseline(name: str, image: torch.Tensor, device, precisions, repeats: int, log=print) -> dict:
    """A baseline's network (untiled, as one tile at this size) on the bicubic model path's input size, x4."""
    from .baselines import load_baseline

    upscaler = load_baseline(name, device=device)
    lr = torch.nn.functional.interpolate((image + 1) / 2, scale_factor=0.25, mode="area").to(device)
    fn = upscaler.network
    entry = {"params": sum(upscaler.num_parameters().values()), "macs": count_macs(lambda: fn(lr.contiguous(memory_format=torch.channels_last))), "latency": {}}
    for precision in precisions:
        if precision == "int8":  # ours quantizes transformers; the baseline is a convolutional network
            continue
        upscaler.to(dtype=precision)
        x = lr.to(upscaler.dtype).contiguous(memory_format=torch.channels_last)
        log(f"timing {name} {precision} ...")
        entry["latency"][precision] = time_fn(lambda: fn(x), device, repeats)
    return entry


def device_label(r: dict) -> str:
    """The bench's device, with whether the CPU computes bf16 natively and a pinned attention kernel, when the run recorded them."""
    label = r["device"] if r.get("native_bf16") is None else f"{r['device']}, native bf16: {'yes' if r['native_bf16'] else 'no'}"
    pinned = r.get("cpu_attention")
    return label if pinned in (None, "measure") else f"{label}, half-precision attention pinned to {pinned}"


def format_table(r: dict) -> str:
    lines = [f"device: {device_label(r)}   input {r['input']} -> output {r['output']}   torch {r['torch']}   ({'loaded weights' if r['scale'] == 'loaded' else r['scale'] + ' size, random weights'})"
             + ("   compiled (--compile)" if r.get("compiled") else "")]
    if r.get("note"):
        lines.append(f"({r['note']})")
    names = list(r["models"])
    header = f"{'':34s}" + "".join(f"{n:>14s}" for n in names)
    lines += [header, "-" * len(header)]

    def row(label, values, fmt):
        lines.append(f"{label:34s}" + "".join(f"{'-' if v is None else fmt(v):>14s}" for v in values))

    models = [r["models"][n] for n in names]
    row("params transformer (M)", [m["params"]["transformer"] / 1e6 for m in models], lambda v: f"{v:.1f}")
    row("params VAE (M)", [m["params"]["vae"] / 1e6 for m in models], lambda v: f"{v:.2f}")
    for stage in ("encode", "transformer", "decode"):
        row(f"MACs {stage} (G)", [m["macs"][stage] / 1e9 for m in models], lambda v: f"{v:.1f}")
    row("MACs total (G)", [sum(m["macs"].values()) / 1e9 for m in models], lambda v: f"{v:.1f}")
    for dtype in models[0]["latency"]:
        for stage in ("encode", "transformer", "decode", "total"):
            row(f"latency {dtype} {stage} (s)", [m["latency"][dtype][stage] for m in models], lambda v: f"{v:.3f}")
    for precision, gflops in r.get("matmul_gflops", {}).items():
        floors = [2 * sum(m["macs"].values()) / (gflops * 1e9) for m in models]
        row(f"compute floor {precision} (s, {gflops:.0f} GFLOP/s)", floors, lambda v: f"{v:.3f}")
        row(f"latency / floor {precision}", [m["latency"][precision]["total"] / f for m, f in zip(models, floors)], lambda v: f"{v:.2f}x")
        vae = [(m["latency"][precision]["encode"] + m["latency"][precision]["decode"]) * gflops * 1e9 / (2 * (m["macs"]["encode"] + m["macs"]["decode"]))
               for m in models]
        row(f"  VAE latency / floor {precision}", vae, lambda v: f"{v:.2f}x")
        row(f"  transformer latency / floor {precision}",
            [m["latency"][precision]["transformer"] * gflops * 1e9 / (2 * m["macs"]["transformer"]) for m in models], lambda v: f"{v:.2f}x")
    lines.append("-" * len(header))
    ratios = r["ratios"]
    lines.append(
        f"TSD-SR / TinySR: params transformer {ratios['params_transformer']:.2f}x, VAE {ratios['params_vae']:.1f}x, "
        f"MACs {ratios['macs_total']:.2f}x (VAE {ratios['vae_macs']:.1f}x), "
        + ", ".join(f"latency {k[8:]} {v:.2f}x" for k, v in ratios.items() if k.startswith("latency_"))
    )
    runs = [m.get("throughput", {}) for m in models]  # a hand-kept record may lack some sizes, or a model's
    if any(runs):
        first = next(m for m in models if m.get("throughput"))
        lines.append(f"throughput, whole {r['input']} -> {r['output']} images in batches ({first['throughput_dtype']}; peak: {next(iter(first['throughput'].values()))['memory']}):")
        for b in sorted({b for run in runs for b in run}, key=int):
            row(f"  batch {b}: images/s", [run.get(b, {}).get("images_per_s") for run in runs], lambda v: f"{v:.2f}")
            row(f"  batch {b}: peak memory (GB)", [run.get(b, {}).get("peak_gb") for run in runs], lambda v: f"{v:.2f}")
    for name, b in r.get("baselines", {}).items():
        lines.append(
            f"{name}: params {b['params'] / 1e6:.1f} M, MACs {b['macs'] / 1e9:.1f} G, "
            + ", ".join(f"latency {d} {t:.3f} s ({t / r['models']['TinySR']['latency'][d]['total']:.1f}x TinySR, "
                        f"{t / r['models']['TSD-SR']['latency'][d]['total']:.1f}x TSD-SR)" for d, t in b["latency"].items())
        )
    return "\n".join(lines)
