"""Measure the bundled demo weights and write their model cards: `python scripts/report_demo_weights.py`.

Models: bicubic, realesrgan-x4plus, the demo teacher (`tsdsr`) and the demo student (`tinysr`);
sets: RealSR and DRealSR from ../shared/data (when present) and the synthetic set that
train_demo_weights.py degraded (fixed seed) from held-out photos. Metrics: PSNR, SSIM (Y channel),
NIQE, ST-LPIPS (shift-tolerant LPIPS, whose weights ship with its package: the perceptual
distance that runs offline), plus any pyiqa metric whose weights are present. Then parameters and
CPU latency (fp32 and bf16) of teacher and student from one `bench --scale loaded` run.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.train_demo_weights import (  # noqa: E402
    CONFIG,
    CROPS_PER_PHOTO,
    PAIRS,
    RUN,
    SYNTHETIC,
    TEST_CROP,
    TEST_CROPS_PER_PHOTO,
    TEST_SEED,
    WEIGHTS,
)
from tinysr.bench import device_label, format_table, run_benchmark  # noqa: E402
from tinysr.device import reuse_freed_memory  # noqa: E402
from tinysr.evaluate import evaluate_folders, pair_files, quality_table, read_rgb, upscale_folder  # noqa: E402
from tinysr.imageio import list_images  # noqa: E402
from tinysr.metrics import METRICS, MetricSuite, blockiness, lattice_score, missing_files  # noqa: E402
from tinysr.pipelines import load_pipeline  # noqa: E402
from trainer.config import STAGES, chain_stages, load_config  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SETS = {
    "RealSR": (SHARED / "RealSRVal_crop128" / "test_LR", SHARED / "RealSRVal_crop128" / "test_HR"),
    "DRealSR": (SHARED / "DrealSRVal_crop128" / "test_LR", SHARED / "DrealSRVal_crop128" / "test_HR"),
    "synthetic": (SYNTHETIC / "lq", SYNTHETIC / "gt"),
}
MODELS = {"bicubic": "Bicubic", "realesrgan-x4plus": "Real-ESRGAN x4plus", "tsdsr": "demo teacher (TSD-SR arch.)", "tinysr": "demo TinySR"}
OUT = ROOT / "runs" / "demo-report"
BENCH_JSON = ROOT / "assets" / "benchmarks" / "bench-demo-cpu.json"
DEMO_METRICS = WEIGHTS / "demo_metrics.json"  # what the cards were written from; the About tab reads it


def st_lpips(pred_dir: Path, gt_dir: Path, net: str = "alex") -> float:
    """ST-LPIPS: the AlexNet variant is the one training uses; the VGG variant is a check training never saw."""
    from stlpips_pytorch import stlpips

    net = stlpips.LPIPS(net=net, variant="shift_tolerant", verbose=False).eval()
    values = []
    with torch.no_grad():
        for _, pred, gt in pair_files(pred_dir, gt_dir):
            values.append(float(net(read_rgb(pred) * 2 - 1, read_rgb(gt) * 2 - 1).mean()))
    return sum(values) / len(values)


def first_images(lr: Path, count: int, folder: Path) -> Path:
    """`folder` holding links to the first `count` inputs of `lr` (sorted by name); all of them when count is 0."""
    files = list_images([lr])
    if not count or count >= len(files):
        return lr
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for f in files[:count]:
        (folder / f.name).symlink_to(f.resolve())
    return folder


def measure(sets: list[str], models: list[str], first: int = 0) -> dict:
    extra = [m for m in ("lpips", "dists", "musiq", "maniqa", "clipiqa") if not missing_files(METRICS[m])]
    suite = MetricSuite(["psnr", "ssim", "niqe", *extra], device="cpu")
    results = {}
    for set_name in filter(None, sets):  # --sets "" rewrites the cards from runs/demo-report/metrics.json
        lr, gt = SETS[set_name]
        if not lr.is_dir():
            print(f"skipping {set_name}: {lr} not found")
            continue
        lr = first_images(lr, first, OUT / set_name / "lr")
        for model in models:
            pred = OUT / set_name / model
            print(f"== {set_name} / {model}", flush=True)
            pipe = load_pipeline(model, device="cpu")
            shutil.rmtree(pred, ignore_errors=True)
            timing = upscale_folder(pipe, lr, pred, progress=False)
            scores = evaluate_folders(pred, gt, progress=False, suite=suite)["average"]
            scores["st_lpips"] = st_lpips(pred, gt)
            scores["st_lpips_vgg"] = st_lpips(pred, gt, "vgg")
            outputs = [read_rgb(p)[0] for _, p, _ in pair_files(pred, gt)]
            scores["lattice"] = sum(map(lattice_score, outputs)) / len(outputs)
            scores["blockiness"] = sum(map(blockiness, outputs)) / len(outputs)
            scores["s_per_image"] = timing["wall_s"] / timing["images"]
            scores["images"] = timing["images"]
            results.setdefault(set_name, {})[model] = scores
            print(json.dumps(scores), flush=True)
    return results


def metrics_table(results: dict) -> str:
    counts = {}
    for name, rows in results.items():
        total = len(list_images([SETS[name][0]]))
        used = next(iter(rows.values())).get("images", total)
        counts[name] = f"{used} images" if used == total else f"the first {used} of {total} images by name"
    return quality_table(results, MODELS, counts)


# How these weights were made, and how far one uninterrupted run of the script reproduced them.
PROVENANCE = (
    "Provenance: the teacher's stages ran as separate commands of this code; one uninterrupted run of "
    "`python scripts/train_demo_weights.py --name repro --weights runs/repro-weights` on a fresh checkout (another "
    "2-core CPU, with AMX: 32.9 min of training) reproduced the regression teacher's files bit for bit. The tiny VAE "
    "comes from a later run on that teacher (`--from vae-encoder`, a 2-core AMD Zen 5, 6.4 min); the teacher's "
    "fine-tune and the student from a later one still (`--from demo-teacher-tune`, the same CPU kind: the fine-tune, "
    "cache, pruning, distillation and decoder-tune, 15.0 min); the same command rerun as `--name s40r` gave every "
    "published tensor bit for bit. The teacher's pixel refiner came last (`--from demo-teacher-decoder --until "
    "publish-teacher-decoder` on the published teacher, a 2-core Xeon without AVX-512 bf16, 7.9 min; rerun from a copy "
    "of the teacher before it, every teacher file bit for bit). On one CPU reruns give identical logs. Across CPUs the tiny VAE's GAN-trained "
    "decoder diverged from the fifth digit of its losses: a student retrained on another CPU differed by up to "
    "0.017 in a transformer weight and 1.21 in a VAE weight, at the same quality."
)


def baseline_speed(bench: dict) -> str:
    lines = []
    for name, b in bench.get("baselines", {}).items():
        t = b["latency"]["fp32"]
        lines.append(f"{MODELS[name]} in the same run: {b['params'] / 1e6:.1f} M parameters, {t:.2f} s fp32, "
                     f"{t / bench['models']['TinySR']['latency']['fp32']['total']:.1f}x the student's time, "
                     f"{t / bench['models']['TSD-SR']['latency']['fp32']['total']:.1f}x the teacher's.")
    return "\n".join(lines)


def precision_note(bench: dict, m: dict) -> str:
    """Which precision was faster in this run: CPUs differ (emulated bf16 is slower than fp32, AMX's can be faster)."""
    latency, gflops = m["latency"], bench.get("matmul_gflops", {})
    if "bf16" not in latency:
        return ""
    ratio = latency["bf16"]["total"] / latency["fp32"]["total"]
    speed = f" (matmul {gflops['bf16']:.0f} against {gflops['fp32']:.0f} GFLOP/s)" if {"fp32", "bf16"} <= gflops.keys() else ""
    return (f"On the benchmark's CPU ({device_label(bench)}) bf16 took {ratio:.2f}x fp32's time{speed}: "
            f"{'bf16 is the faster choice there' if ratio < 1 else 'fp32 is the faster choice there'}; measure on yours (`python -m tinysr bench`).")


def card(kind: str, results: dict, bench: dict, timings: dict) -> str:
    teacher = [stage for stage in STAGES if stage.startswith("demo-")]  # the stand-ins' stages, in the order they run
    stages = teacher if kind == "teacher" else chain_stages(load_config(ROOT / CONFIG))
    rows = "\n".join(
        f"| {s} | {timings[s].get('steps', '-')} | {timings[s]['wall_s'] / 60:.1f} | "
        + (f"{timings[s]['first_loss']:.3g} -> {timings[s]['last_loss']:.3g}" if "first_loss" in timings[s] else "-")
        + " |"
        for s in stages
        if s in timings
    )
    total = sum(timings[s]["wall_s"] for s in stages if s in timings) / 60
    name = "TinySR" if kind == "student" else "TSD-SR"
    m = bench["models"][name]
    what = {
        "teacher": (
            "A small one-step SR model with TSD-SR's architecture (an `SD3Transformer2DModel`, 8 blocks, width 128, "
            "one fixed random prompt, the output layer starting at zero so training begins from the identity) and a "
            "`PatchAutoencoder` (4x4 patches, 16 latent channels; linear path initialised as whitened PCA of the training "
            "patches; decoding through overlapping 8x8 kernels after a latent refiner) as the stand-in for SD3's VAE. "
            "Its prior is Real-ESRGAN x4plus: it learnt to reproduce Real-ESRGAN's restorations of the training pairs "
            "by latent regression, where the paper's TSD-SR inherits SD3's; then `demo-teacher-tune` fine-tuned it for 300 "
            "steps through its decoded images: ST-LPIPS to the prior's images, each less its local 16-px pattern, those "
            "patterns held together by an L1, and its steps across the 4-px latent cells held to the prior's (the regression "
            "alone drew its errors as cell-sized blocks: boundary steps 2.7x those inside cells on the synthetic set, "
            "1.3x after; photos 1.0). Last, `demo-teacher-decoder` gave its VAE's decoder a residual refiner at pixel "
            "resolution (3 -> 32 channels, one residual block, -> 3, starting as the identity) and trained it alone for 400 "
            "steps on the teacher's own predictions, to the prior's images, with the same image terms plus an image L1: the 4-px blocks its "
            "decoder still drew went (blockiness 1.26 -> 0.92 on the synthetic set, ST-LPIPS 0.482 -> 0.469). It plays TSD-SR's role in the demo chain: "
            "the teacher the student is pruned from and distilled towards. Its pipeline takes the per-image mean pattern "
            "over the positions inside a token out of the transformer's prediction (`remove_token_pattern` in "
            "model_index.json): without it, the same tensors drew a dot grid at the token period (lattice 1.41 on the "
            "synthetic set, 1.61 on DRealSR's first 20)."
        ),
        "student": (
            "The demo TinySR: the demo teacher pruned 2 of every 4 blocks by the learned (Gumbel, pair-coupled) search, "
            "conditioning removed and modulation folded, with a tiny VAE distilled from the teacher's on 64 px crops "
            "(its encoder a linear map of 4x4 patches, copied from the teacher's VAE, plus a 24-channel refiner; its decoder "
            "TAESD-shaped and depthwise-separable, 24 channels, 4x), then trained by the paper's two distillation stages "
            "(distill-2's LPIPS shown both images less their mean 8-px pattern: with plain LPIPS the student drew a dot "
            "grid at its token period, lattice 1.75 on the synthetic set; both stages regress the teacher's latents less "
            "their mean 2x2-token pattern, and distill-1 runs 1500 steps: with 300, a grid stayed on DRealSR's smooth areas). "
            "The tiny VAE takes the teacher VAE's scaling factor (it lives in that latent space). Like the teacher, its "
            "pipeline takes the per-image mean token pattern out of the transformer's prediction. Last, `decoder-tune` (not "
            "in the paper) retrained the tiny VAE's decoder for 600 steps on what it decodes in the pipeline, the frozen "
            "student's latents, to the photos (L1 plus ST-LPIPS less the 8-px pattern), its upsampling switched from TAESD's "
            "nearest to bilinear (nearest stepped sharpened diagonal edges one latent pixel wide) and its padding to "
            "replicate: sharper edges (ST-LPIPS 0.542 -> 0.457 on the synthetic set against the same run without it, "
            "with the teacher before its fine-tune) at 1.4-1.5 dB of PSNR on the real sets and a thin rim at strong edges. "
            "Distilled from the fine-tuned teacher rather than the regression one: ST-LPIPS 0.457 -> 0.431, PSNR unchanged. At this scale the "
            "teacher's stand-in VAE is already cheap (it works on 4x4 patches; the tiny VAE takes about as long), so the "
            "speed-up comes from the pruned transformer and is far below the paper's (where SD3's VAE dominates)."
        ),
    }[kind]
    return f"""# {name} — demo scale (CPU-trained; not the paper's weights)

{what} Trained by this repository's own trainer on a 2-core CPU (`trainer/configs/demo-realesrgan.yaml`, seed 80,
`python scripts/train_demo_weights.py` runs every step); the paper-scale weights come from the official releases
(see the main README). Use these to try the app and CLI offline, not to judge the method.
{PROVENANCE}

**Data**: {len(list((PAIRS / 'gt').iterdir()))} Real-ESRGAN-degraded pairs ({CROPS_PER_PHOTO} random 128 px crops per photo)
of the training photos fetched from Debian packages by `scripts/fetch_photos.py` (see `runs/photos/ATTRIBUTION.md`).
The synthetic test set holds {TEST_CROPS_PER_PHOTO} random {TEST_CROP} px crops (seed {TEST_SEED}) of each of the held-out photos.

## Training (wall time on 2-core CPUs, see Provenance; loss: mean of the first -> last 5 logged values)

| stage | steps | minutes | loss |
|---|---|---|---|
{rows}

Total: {total:.1f} min.

## Size and CPU latency (128 -> 512 px, `python -m tinysr bench --scale loaded`, one run)

Parameters: transformer {m['params']['transformer'] / 1e6:.2f} M, VAE {m['params']['vae'] / 1e6:.3f} M.
{chr(10).join(f"Latency {d}: {lat['total']:.3f} s (encode {lat['encode']:.3f}, transformer {lat['transformer']:.3f}, decode {lat['decode']:.3f})" + "  " for d, lat in m['latency'].items())}
{precision_note(bench, m)}
Teacher / student in the same run: {", ".join(f"{k.replace('_', ' ')} {v:.2f}x" for k, v in bench['ratios'].items())}.
{baseline_speed(bench)}

## Metrics (`python scripts/report_demo_weights.py`)
{metrics_table(results)}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--first", type=int, default=0, help="only the first N inputs of each set (by name); 0: all")
    parser.add_argument("--run", type=Path, default=RUN, help="the training run whose timings.json the cards report")
    parser.add_argument("--no-bench", dest="bench", action="store_false", help=f"reuse {BENCH_JSON.name} (a quiet CPU measured it)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    reuse_freed_memory()  # as the CLI and the app run
    start = time.perf_counter()
    results_path = OUT / "metrics.json"
    # a fresh checkout has no runs/: start from what the cards were last written from
    published = json.loads(DEMO_METRICS.read_text()) if DEMO_METRICS.is_file() else {}
    results = json.loads(results_path.read_text()) if results_path.is_file() else published.get("metrics", {})
    for set_name, rows in measure(args.sets.split(","), args.models.split(","), args.first).items():
        results.setdefault(set_name, {}).update(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    if args.bench:
        bench = run_benchmark(size=128, device="cpu", repeats=3, dtypes=["fp32", "bf16"], scale="loaded", baselines=["realesrgan-x4plus"])
        BENCH_JSON.parent.mkdir(parents=True, exist_ok=True)
        BENCH_JSON.write_text(json.dumps(bench, indent=2) + "\n")
    else:
        bench = json.loads(BENCH_JSON.read_text())
    print(format_table(bench))
    timings_path = args.run / "timings.json"
    if not timings_path.is_file() and "training" not in published:
        raise SystemExit(f"{timings_path} not found: pass --run with the folder of the run that trained the bundled weights")
    # a run restarted part-way (--from) timed only what it ran: the earlier steps keep the times published with them
    timings = published.get("training", {})
    if timings_path.is_file():
        timings.update(json.loads(timings_path.read_text()))
    else:
        print(f"{timings_path} not found: the cards keep the training times of demo_metrics.json")
    ordered = {s: {m: results[s][m] for m in MODELS if m in results.get(s, {})} for s in SETS if s in results}
    DEMO_METRICS.write_text(json.dumps({"metrics": ordered, "bench": bench, "training": timings}, indent=2) + "\n")
    for kind, folder in (("teacher", "tsdsr-demo"), ("student", "tinysr-demo")):
        (WEIGHTS / folder / "README.md").write_text(card(kind, ordered, bench, timings))
    print(f"report written in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
