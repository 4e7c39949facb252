"""`python -m tinysr upscale | convert | bench`."""

import argparse
import json
import sys
import time
from pathlib import Path

from .attention import kernel_setting
from .color import COLOR_FIXES
from .device import DTYPES, PRECISIONS, is_out_of_memory, out_of_memory_message, pick_device, reuse_freed_memory
from .errors import TinySRError, missing_extra_message
from .imageio import DEFAULT_MAX_PIXELS, list_images, load_image
from .metrics import DEFAULT_METRICS, METRICS
from .official import RECIPES


def add_recipe_options(p):
    p.add_argument("--recipe", choices=RECIPES, default="default",
                   help="official: the release scripts' pre/post-processing, byte for byte for the same model outputs (README: Fidelity)")
    p.add_argument("--seed", type=int, default=None, help="official recipe: seed of TSD-SR's posterior sample (unseeded upstream)")
    p.add_argument("--color-fix", choices=COLOR_FIXES, default=None, help="default: the model's own (TinySR adain, TSD-SR wavelet)")


def recipe_kwargs(args) -> dict:
    return {"recipe": args.recipe, "seed": args.seed, "color_fix": args.color_fix}


def recipe_refused(args, pipe) -> bool:
    """Baselines have only our recipe; say so once instead of failing on every image."""
    from .pipelines import OneStepSRPipeline

    if args.recipe != "default" and not isinstance(pipe, OneStepSRPipeline):
        print(f"error: --recipe {args.recipe} is the release scripts' recipe for tinysr and tsdsr; {args.model} has only the default", file=sys.stderr)
        return True
    return False


def add_upscale(sub):
    p = sub.add_parser("upscale", help="upscale images or folders of images x4")
    p.add_argument("inputs", nargs="+", help="image files or folders (every image Pillow reads)")
    p.add_argument("-o", "--output", required=True, help="output folder (created if missing)")
    p.add_argument("--model", default="tinysr", help="tinysr, tsdsr, a model folder or a hub repo id")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--tile", type=int, default=None, help="latent tile size (8 image pixels per latent pixel; default 64, or what the model's position table covers)")
    p.add_argument("--tile-overlap", type=int, default=8)
    p.add_argument("--vae-tile", type=int, default=None, help="latent tile size of the VAE (default 128; official recipe: untiled)")
    p.add_argument("--vae-tile-overlap", type=int, default=16)
    add_recipe_options(p)
    p.add_argument("--dtype", choices=PRECISIONS, default="auto",
                   help="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32; int8: the transformer's linears in int8 (CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="onnx: run a folder written by `export-onnx` with onnxruntime (--model DIR)")
    p.add_argument("--batch", type=int, default=1, help="images of one size that go through the models together (GPU throughput)")
    p.add_argument("--tile-batch", type=int, default=None,
                   help="most tiles per transformer pass, and per VAE pass on a GPU; fewer where half the free memory "
                   "would not hold them (default 8 on CPU, 16 on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (CUDA graphs on CUDA); pays off over many images")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger inputs (checked before decoding)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    p.set_defaults(func=run_upscale)


def run_upscale(args) -> int:
    from tqdm import tqdm

    from .pipelines import load_pipeline

    files = list_images(args.inputs)
    if not files:
        print("error: no images found in " + ", ".join(args.inputs), file=sys.stderr)
        return 2
    if args.batch < 1 or (args.tile_batch is not None and args.tile_batch < 1):
        print("error: --batch and --tile-batch must be at least 1", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model, revision=args.revision, device=args.device, dtype=args.dtype, backend=args.backend)
    if recipe_refused(args, pipe):
        return 2
    if args.compile:
        pipe.compile()
    options = dict(
        **recipe_kwargs(args), tile_size=args.tile, tile_overlap=args.tile_overlap, vae_tile_size=args.vae_tile,
        vae_tile_overlap=args.vae_tile_overlap, max_pixels=args.max_pixels,
    )
    if args.tile_batch is not None:
        options["tile_batch"] = args.tile_batch
    failures = 0
    pending: list = []  # (path, target, loaded) waiting to fill a batch
    bar = tqdm(total=len(files), unit="img", file=sys.stderr)

    def flush():
        nonlocal failures
        batch = list(pending)
        pending.clear()
        try:
            results = pipe.upscale_batch([loaded for _, _, loaded in batch], **options)
        except (TinySRError, ValueError) as e:
            failures += len(batch)
            tqdm.write(f"error: {', '.join(p.name for p, _, _ in batch)}: {e}" if len(batch) > 1 else f"error: {e}", file=sys.stderr)
            bar.update(len(batch))
            return
        for (path, target, _), result in zip(batch, results):
            tmp = target.with_name(target.name + ".part")
            result.pil.save(tmp, format="PNG")
            tmp.replace(target)
            together = f" (batch of {result.batch_size})" if result.batch_size > 1 else ""
            tqdm.write(
                f"{path.name} -> {target} {result.image.shape[2]}x{result.image.shape[1]} [{result.dtype}] "
                + " ".join(f"{k} {v:.2f}s" for k, v in result.timings.items() if k not in ("preprocess", "postprocess")) + together
            )
        bar.update(len(batch))

    for path in files:
        target = out_dir / (path.stem + ".png")
        if target.exists() and not args.overwrite:
            tqdm.write(f"skip {path} ({target} exists; --overwrite to replace)", file=sys.stderr)
            bar.update(1)
            continue
        bar.set_postfix_str(path.name)
        try:
            loaded = load_image(path, max_pixels=args.max_pixels)
        except (TinySRError, ValueError) as e:
            failures += 1
            tqdm.write(f"error: {e}", file=sys.stderr)
            bar.update(1)
            continue
        if pending and loaded.rgb.shape != pending[0][2].rgb.shape:
            flush()
        pending.append((path, target, loaded))
        if len(pending) == args.batch:
            flush()
    if pending:
        flush()
    bar.close()
    if failures:
        print(f"{failures} of {len(files)} images failed", file=sys.stderr)
    return 1 if failures else 0


def add_convert(sub):
    p = sub.add_parser("convert", help="turn an official TinySR or TSD-SR release into our single-folder format")
    p.add_argument("kind", choices=["tinysr", "tsdsr"])
    p.add_argument("-o", "--output", required=True, help="folder to write (model_index.json, transformer/, vae/)")
    p.add_argument("--release", help="tinysr: the official checkpoint folder (tinybackbone/, vae/, tinysr/)")
    p.add_argument("--sd3", default=None, help="tsdsr: SD3-medium folder or hub id")
    p.add_argument("--lora", help="tsdsr: folder with transformer.safetensors and vae.safetensors")
    p.add_argument("--embeds", help="folder with pool_embeds.pt (tinysr) or prompt_embeds.pt + pool_embeds.pt (tsdsr)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="precision of the written weights")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this hub repo (needs HF_TOKEN)")
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    from .pipelines import TinySRPipeline, TSDSRPipeline
    from .release import converted_model_card
    from .weights import SD3_MEDIUM

    if args.kind == "tinysr":
        if not args.release:
            print("error: convert tinysr needs --release DIR", file=sys.stderr)
            return 2
        pipe = TinySRPipeline.from_release(args.release, args.embeds, device="cpu")
    else:
        if not args.lora or not args.embeds:
            print("error: convert tsdsr needs --lora DIR and --embeds DIR", file=sys.stderr)
            return 2
        pipe = TSDSRPipeline.from_release(args.sd3 or SD3_MEDIUM, args.lora, args.embeds, device="cpu")
    card = converted_model_card(args.kind, source=args.release if args.kind == "tinysr" else args.lora, base=args.sd3 or SD3_MEDIUM)
    folder = pipe.save_pretrained(args.output, dtype=args.dtype, push_to_hub=args.push_to_hub, model_card=card)
    params = pipe.num_parameters()
    print(f"wrote {folder} ({args.dtype}; transformer {params['transformer'] / 1e6:.1f} M, vae {params['vae'] / 1e6:.2f} M params)")
    if args.push_to_hub:
        print(f"uploaded to {args.push_to_hub}")
    return 0


def add_export_onnx(sub):
    p = sub.add_parser("export-onnx", help="write a model's transformer, VAE encoder and VAE decoder as ONNX graphs (dynamic sizes)")
    p.add_argument("model", help="tinysr, tsdsr, a model folder or a hub repo id")
    p.add_argument("-o", "--output", required=True, help="folder to write (run it with `upscale --backend onnx --model DIR`)")
    p.add_argument("--opset", type=int, default=18)
    p.set_defaults(func=run_export_onnx)


def run_export_onnx(args) -> int:
    from .onnx import OnnxPipeline, export_onnx
    from .pipelines import OneStepSRPipeline, load_pipeline

    pipe = load_pipeline(args.model, device="cpu")
    if not isinstance(pipe, OneStepSRPipeline) or isinstance(pipe, OnnxPipeline):
        print(f"error: export-onnx takes a TinySR or TSD-SR model in torch, not {args.model}", file=sys.stderr)
        return 2
    folder = export_onnx(pipe, args.output, opset=args.opset)
    sizes = ", ".join(f"{f.name} {f.stat().st_size / 1e6:.1f} MB" for f in sorted(folder.glob("*.onnx*")))
    print(f"wrote {folder}: {sizes}")
    return 0


def add_bench(sub):
    p = sub.add_parser("bench", help="TSD-SR vs TinySR: parameters, MACs and per-stage latency (random weights)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--size", type=int, default=128, help="input side in pixels (output is 4x)")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per stage (median reported)")
    p.add_argument("--dtypes", default=None, help="comma list of precisions; default fp32 plus fp16 (CUDA/MPS) or bf16 and int8 (CPU)")
    p.add_argument("--scale", choices=["paper", "tiny", "loaded"], default="paper",
                   help="tiny: small configs, a smoke test; loaded: the weights `tsdsr` and `tinysr` resolve to")
    p.add_argument("--baseline", action="append", default=[], choices=["realesrgan-x4plus"],
                   help="also time this baseline's network on the same input (repeatable)")
    p.add_argument("--onnx", action="store_true", help="also export both models to ONNX and time them with onnxruntime (fp32)")
    p.add_argument("--throughput", action="store_true", help="also whole images in batches: images/s and peak memory")
    p.add_argument("--batch-sizes", default=None, help="with --throughput; default 1,2,4,8,16,32 on CUDA, 1,2,4 elsewhere")
    p.add_argument("--compile", action="store_true", help="time the pipelines as --compile runs them (compilation not timed)")
    p.set_defaults(func=run_bench)


def throughput_batches(args) -> list[int]:
    if not args.throughput:
        return []
    if args.batch_sizes:
        return [int(b) for b in args.batch_sizes.split(",")]
    return [1, 2, 4, 8, 16, 32] if pick_device(args.device).type == "cuda" else [1, 2, 4]


def run_bench(args) -> int:
    from .bench import format_table, run_benchmark

    results = run_benchmark(
        size=args.size,
        device=args.device,
        repeats=args.repeats,
        dtypes=args.dtypes.split(",") if args.dtypes else None,
        scale=args.scale,
        baselines=args.baseline,
        onnx=args.onnx,
        batch_sizes=throughput_batches(args),
        compile=args.compile,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def add_eval(sub):
    p = sub.add_parser("eval", help="metrics of a folder of SR outputs against ground truth (or of a model run first)")
    p.add_argument("--pred", help="folder of SR outputs (paired with --gt by file name)")
    p.add_argument("--gt", help="folder of ground-truth images; omit for no-reference metrics only")
    p.add_argument("--model", help="run this model over --lr first: tinysr, tsdsr, bicubic, realesrgan-x4plus, a folder or hub id")
    p.add_argument("--lr", help="folder of low-resolution inputs (with --model)")
    p.add_argument("--out", help="where --model writes its outputs (with --model)")
    p.add_argument("--tile", type=int, default=None, help="with --model: latent tile size (default as upscale)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help=f"comma list from: {', '.join(METRICS)}")
    add_recipe_options(p)
    p.add_argument("--dtype", choices=PRECISIONS, default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="write {average, per_image, unavailable} here")
    p.add_argument("--csv", help="write one row per image here")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from accelerate import PartialState

    from .device import pick_device
    from .evaluate import evaluate_folders, format_table, upscale_folder, write_reports

    state = PartialState()
    if args.model:
        if not (args.lr and args.out):
            print("error: --model needs --lr DIR and --out DIR", file=sys.stderr)
            return 2
        from .pipelines import load_pipeline

        device = state.device if state.num_processes > 1 else pick_device(args.device)
        pipe = load_pipeline(args.model, device=device, dtype=args.dtype)
        if recipe_refused(args, pipe):
            return 2
        run = upscale_folder(pipe, args.lr, args.out, tile_size=args.tile, **recipe_kwargs(args))
        if state.is_main_process:
            stages = ", ".join(f"{k} {v / max(run['images'], 1):.3f}s" for k, v in run["stage_s"].items())
            print(f"{args.model}: {run['images']} images in {run['wall_s']:.1f}s (per image: {stages})", file=sys.stderr)
        pred = args.out
    elif args.pred:
        pred = args.pred
    else:
        print("error: give --pred DIR, or --model NAME with --lr DIR --out DIR", file=sys.stderr)
        return 2
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    result = evaluate_folders(pred, args.gt, metrics=metrics, device=None if args.device == "auto" else args.device)
    if state.is_main_process:
        print(format_table({args.model or Path(pred).name: result}))
        write_reports(result, args.json, args.csv)
    return 0


def add_cache(sub):
    p = sub.add_parser("cache", help="pre-encode LQ, HQ and teacher-output latents of a paired dataset (resumable)")
    p.add_argument("pairs", help="folder with lq/ and gt/ (as written by `degrade`)")
    p.add_argument("-o", "--output", required=True, help="cache folder (index.json + safetensors shards)")
    p.add_argument("--model", default="tsdsr", help="the teacher whose VAE and outputs are cached")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="precision the teacher runs in")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_cache)


def run_cache(args) -> int:
    from .latent_cache import build_latent_cache
    from .pipelines import load_pipeline

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    index = build_latent_cache(pipe, args.pairs, args.output, shard_size=args.shard_size)
    count = sum(len(s["names"]) for s in index["shards"])
    print(f"{args.output}: {count} pairs in {len(index['shards'])} shards")
    return 0


def add_degrade(sub):
    p = sub.add_parser("degrade", help="make a paired dataset (gt/, lq/) with the Real-ESRGAN degradation")
    p.add_argument("hr_dir", help="folder of high-resolution photos")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--seed", type=int, default=80)
    p.add_argument("--crop", type=int, default=512, help="GT crop size (LQ is a quarter of it)")
    p.add_argument("--per-image", type=int, default=1, help="random crops per photo")
    p.set_defaults(func=run_degrade)


def run_degrade(args) -> int:
    from .degradation import degrade_folder

    count = degrade_folder(args.hr_dir, args.output, seed=args.seed, crop=args.crop, per_image=args.per_image)
    print(f"wrote {count} pairs to {args.output}/gt and {args.output}/lq")
    return 0 if count else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinysr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_upscale(sub)
    add_convert(sub)
    add_export_onnx(sub)
    add_bench(sub)
    add_eval(sub)
    add_cache(sub)
    add_degrade(sub)
    args = parser.parse_args(argv)
    reuse_freed_memory()
    start = time.perf_counter()
    try:
        kernel_setting()  # a bad TINYSR_CPU_ATTENTION stops every command here, not once per image
        code = args.func(args)
    except TinySRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ImportError as e:
        message = missing_extra_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        print(f"error: {out_of_memory_message(e, pick_device(getattr(args, 'device', None)), 'this run')}", file=sys.stderr)
        return 2
    if args.command == "upscale":
        print(f"done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return code
