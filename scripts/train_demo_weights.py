"""Reproduce the bundled demo-scale weights: `python scripts/train_demo_weights.py` (about 50 min on 2-core CPUs).

Photos from Debian packages -> degraded pairs -> Real-ESRGAN x4plus's restorations of them (the
demo's pretrained prior, computed once) -> stand-in base VAE and teacher (regression, a fine-tune through its images, a pixel refiner for its decoder) -> the paper's chain
(tiny VAE, cache, pruning search, export, distill-1, distill-2, then decoder-tune, export) with
trainer/configs/demo-realesrgan.yaml, then the teacher and student are written in fp16 to
assets/weights/. `--config trainer/configs/demo.yaml` trains the earlier stand-ins instead (no
prior: the teacher learns the photos from scratch), kept for comparison. Every step is a separate
command, timed; `--from STEP` restarts there (a training stage resumes from its last checkpoint when that was trained with the same settings and inputs, and is otherwise moved to STAGE.replaced and trained afresh), `--until STEP` stops after it.
`--name repro --weights runs/repro-weights` retrains into other folders and then prints how far each
retrained tensor file is from the bundled one.
`scripts/report_demo_weights.py` then measures them and writes the model cards.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import chain_stages, load_config, stage_dir, standin_target, teacher_stage  # noqa: E402
from trainer.provenance import checkpoint_differences, training_record  # noqa: E402
from trainer.run import latest_checkpoint  # noqa: E402

CONFIG = "trainer/configs/demo-realesrgan.yaml"
RUNS = ROOT / "runs"
RUN = RUNS / "demo-realesrgan"  # the config's name: where the bundled weights' run leaves its stages and timings
PHOTOS = ROOT / "runs" / "photos"
PAIRS = ROOT / "runs" / "demo-pairs"
SYNTHETIC = ROOT / "runs" / "demo-synthetic"
WEIGHTS = ROOT / "assets" / "weights"
SEED = 80
TRAIN_CROP, CROPS_PER_PHOTO = 128, 32
TEST_CROP, TEST_CROPS_PER_PHOTO, TEST_SEED = 512, 2, 81
LOSS_WINDOW = 5  # logged values averaged for the first and last loss


def publish(source: Path, target: Path) -> None:
    """fp16 copy of a pipeline folder (what ships), plus the JSON files training left beside it."""
    from tinysr.pipelines import load_pipeline

    tmp = target.with_name(target.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    load_pipeline(str(source), device="cpu").save_pretrained(tmp, dtype="fp16")
    for extra in ("pruning.json", "training.json"):
        if (source / extra).is_file():
            # the teacher published beside it by its bare name, other paths inside the repository relative to it
            text = (source / extra).read_text().replace(str(target.parent) + "/", "").replace(str(ROOT) + "/", "")
            (tmp / extra).write_text(text)
    if (target / "README.md").is_file():
        shutil.copy(target / "README.md", tmp / "README.md")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def weight_differences(retrained: Path, bundled: Path = WEIGHTS) -> dict[str, float]:
    """Largest absolute difference per tensor file (relative path -> float; inf when the tensor names differ)."""
    from safetensors.torch import load_file

    differences = {}
    for path in sorted(retrained.rglob("*.safetensors")):
        name = str(path.relative_to(retrained))
        other = bundled / name
        new, old = load_file(path), (load_file(other) if other.is_file() else {})
        if new.keys() != old.keys() or any(new[k].shape != old[k].shape for k in new):
            differences[name] = float("inf")
        else:
            differences[name] = max((float((new[k].float() - old[k].float()).abs().max()) for k in new), default=0.0)
    return differences


def steps(name: str = "demo-realesrgan", weights: Path = WEIGHTS, config: str = CONFIG) -> list[tuple[str, list[str] | None]]:
    py, trainer = [sys.executable], [sys.executable, "-m", "trainer"]
    degrade = [*py, "-m", "tinysr", "degrade"]
    cfg = ["--config", config, "--resume", "latest", f"name={name}", f"teacher={weights / 'tsdsr-demo'}"]
    loaded = load_config(ROOT / config)
    prior = standin_target(loaded) == "prior"
    return [
        ("photos", [*py, "scripts/fetch_photos.py", str(PHOTOS)]),
        ("pairs", [*degrade, str(PHOTOS / "train"), "-o", str(PAIRS), "--crop", str(TRAIN_CROP), "--per-image", str(CROPS_PER_PHOTO), "--seed", str(SEED)]),
        ("synthetic", [*degrade, str(PHOTOS / "test"), "-o", str(SYNTHETIC), "--crop", str(TEST_CROP), "--per-image", str(TEST_CROPS_PER_PHOTO), "--seed", str(TEST_SEED)]),
        *([("demo-prior", [*trainer, "demo-prior", *cfg])] if prior else []),
        ("demo-base-vae", [*trainer, "demo-base-vae", *cfg]),
        ("demo-teacher", [*trainer, "demo-teacher", *cfg]),
        *([("demo-teacher-tune", [*trainer, "demo-teacher-tune", *cfg])] if "demo-teacher-tune" in loaded.stages else []),
        ("publish-teacher", None),
        # reads the published teacher and publishes it again with its pixel refiner (the student never decodes through it)
        *([("demo-teacher-decoder", [*trainer, "demo-teacher-decoder", *cfg]), ("publish-teacher-decoder", None)] if "demo-teacher-decoder" in loaded.stages else []),
        *[(stage, [*trainer, stage, *cfg]) for stage in chain_stages(loaded)],
        ("publish-student", None),
    ]


def replace_stale(cfg, stage: str) -> None:
    """A stage whose last checkpoint was trained with other settings or inputs is moved to STAGE.replaced and trained
    afresh: `--from` reruns what changed and resumes the rest."""
    directory = stage_dir(cfg, stage)
    checkpoint = latest_checkpoint(directory)
    changed = checkpoint_differences(checkpoint, training_record(cfg, stage), stage) if checkpoint else []
    if changed:
        aside = directory.with_name(stage + ".replaced")
        if aside.is_symlink() or aside.is_file():
            aside.unlink()
        else:
            shutil.rmtree(aside, ignore_errors=True)
        directory.rename(aside)
        print(f"{stage}: trained afresh ({'; '.join(changed[:3])}); the earlier run moved to {aside}", flush=True)


def first_last_loss(run: Path, stage: str) -> dict:
    log = run / stage / "log.jsonl"
    if not log.is_file():
        return {}
    rows = [json.loads(line) for line in log.read_text().splitlines() if line]
    if not rows:
        return {}
    # one logged value is one batch: average a few so the first -> last change is not batch noise
    first, last = rows[:LOSS_WINDOW], rows[-LOSS_WINDOW:]
    return {"steps": rows[-1]["step"], "first_loss": sum(r["loss"] for r in first) / len(first), "last_loss": sum(r["loss"] for r in last) / len(last)}


def main() -> int:
    names = [name for name, _ in steps(config="trainer/configs/demo-realesrgan.yaml")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=CONFIG, help="the chain's config (relative to the repository)")
    parser.add_argument("--from", dest="start", choices=names, default=names[0])
    parser.add_argument("--until", choices=names, help="stop after this step (e.g. --from demo-teacher-decoder --until publish-teacher-decoder)")
    parser.add_argument("--name", help="run name: stages write runs/NAME/STAGE (default: the config's name)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="where the fp16 teacher and student are published")
    args = parser.parse_args()
    cfg = load_config(ROOT / args.config)
    args.name = args.name or cfg.name
    run, weights = RUNS / args.name, args.weights.resolve()
    os.chdir(ROOT)  # the config's relative paths, as the stages' subprocesses see them
    stage_cfg = load_config(ROOT / args.config, [f"name={args.name}", f"teacher={weights / 'tsdsr-demo'}"])
    timings_path = run / "timings.json"
    # a whole run starts its timings afresh; a part of one (--from, --until) adds to them
    whole = args.start == names[0] and not args.until
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() and not whole else {}
    chain = steps(args.name, weights, args.config)
    chain_names = [name for name, _ in chain]
    for option, step in (("--from", args.start), ("--until", args.until)):
        if step and step not in chain_names:
            parser.error(f"{option} {step}: {args.config} has no such step")
    last = chain_names.index(args.until) if args.until else len(chain) - 1
    if last < chain_names.index(args.start):
        parser.error(f"--until {args.until} comes before --from {args.start}")
    for name, command in chain[chain_names.index(args.start) : last + 1]:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        if name == "publish-teacher":
            publish(run / teacher_stage(cfg) / "final", weights / "tsdsr-demo")
        elif name == "publish-teacher-decoder":
            publish(run / "demo-teacher-decoder" / "final", weights / "tsdsr-demo")
        elif name == "publish-student":
            publish(run / "export", weights / "tinysr-demo")
        else:
            if name in cfg.stages:
                replace_stale(stage_cfg, name)
            subprocess.run(command, cwd=ROOT, check=True)
        timings[name] = {"wall_s": round(time.perf_counter() - start, 1), **first_last_loss(run, name)}
        run.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
    total = sum(t["wall_s"] for n, t in timings.items() if n not in ("photos", "pairs", "synthetic"))
    print(f"training and publishing: {total / 60:.1f} min; per step in {timings_path}")
    if weights != WEIGHTS.resolve():
        for name, difference in weight_differences(weights).items():
            print(f"{name}: max |retrained - bundled| = {difference:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
