"""The Training tab: prepare pairs from photos, then launch, watch and stop one trainer job.

On a public Space (`SPACE_ID` set, or `TINYSR_PUBLIC=1`) training is off unless `TINYSR_ENABLE_TRAINING=1`:
a visitor would otherwise start jobs on the host's machine.
"""

import os
import shutil
import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd

from tinysr.degradation import degrade_folder
from tinysr.errors import TinySRError
from tinysr.imageio import list_images
from tinysr.latent_cache import paired_images
from trainer.config import ConfigError, load_config
from trainer.launch import CONFIG_DIR, RUN_NAME, RUNS, LaunchError, LaunchRequest, TrainingJob, available_configs

from .common import OUTPUTS, ROOT, sentences
from .paths import allowed_folder, unpack_upload

PUBLIC = bool(os.environ.get("SPACE_ID")) or os.environ.get("TINYSR_PUBLIC") == "1"
TRAINING_ENABLED = not PUBLIC or os.environ.get("TINYSR_ENABLE_TRAINING") == "1"
DISABLED_NOTE = (
    "**Training is disabled on this public server**: it would run jobs on the host's machine for any visitor. "
    "Run the app on your own machine (`python app.py`), or set `TINYSR_ENABLE_TRAINING=1` on a server you control."
)
EXAMPLE_PHOTOS = ROOT / "assets" / "examples"
SOURCES = ("the example photos", "uploaded photos", "a server folder")
MAX_PAIRS = 2000
JOB = TrainingJob()


def refuse_when_disabled() -> None:
    if not TRAINING_ENABLED:
        raise gr.Error("Training is disabled on this public server (TINYSR_ENABLE_TRAINING=1 enables it).")


def run_name(name: str) -> str:
    name = (name or "").strip()
    if not RUN_NAME.match(name):
        raise gr.Error("Run name: 1-64 letters, digits, '-' or '_', starting with a letter or digit.")
    return name


def prepared_pairs(name: str) -> Path:
    return RUNS / name / "pairs"


def count_pairs(folder: Path) -> int:
    try:
        return len(paired_images(folder))
    except (TinySRError, OSError, ValueError):
        return 0


def pairs_for(name: str, config: str) -> tuple[str, int, str]:
    """(pairs folder override or "", pair count, where they are): the run's prepared pairs, else the config's."""
    prepared = prepared_pairs(name)
    if (n := count_pairs(prepared)):
        return str(prepared), n, f"`{prepared}` (prepared here)"
    try:
        configured = Path(load_config(CONFIG_DIR / config).data.pairs)
    except (ConfigError, ValueError):
        return "", 0, "none"
    configured = configured if configured.is_absolute() else ROOT / configured
    return "", count_pairs(configured), f"`{configured}` (the config's data.pairs)"


def pairs_status(name, config):
    """What the tab shows about the data, and whether Start may be pressed."""
    if not TRAINING_ENABLED:
        return DISABLED_NOTE, gr.update(interactive=False)
    try:
        name = run_name(name)
    except gr.Error as e:
        return str(e), gr.update(interactive=False)
    if config not in available_configs():
        return f"Unknown config {config!r}.", gr.update(interactive=False)
    _, n, where = pairs_for(name, config)
    if n:
        return f"**{n} training pairs** in {where}: ready to start.", gr.update(interactive=True)
    return ("**No training pairs yet** for this run: prepare them above (the example photos are enough for a first try), "
            "or point the config's `data.pairs` at a folder made by `python -m tinysr degrade`."), gr.update(interactive=False)


@sentences
def prepare_data(name, config, source, uploads, folder, per_image, progress=gr.Progress()):
    """Photos -> degraded pairs (the project's Real-ESRGAN degradation, as `python -m tinysr degrade`) in runs/NAME/pairs."""
    refuse_when_disabled()
    name = run_name(name)
    if config not in available_configs():
        raise gr.Error(f"Unknown config {config!r}.")
    crop = int(load_config(CONFIG_DIR / config).data.crop)
    per_image = int(per_image or 1)
    work = Path(tempfile.mkdtemp(dir=OUTPUTS))
    try:
        if source == "uploaded photos":
            if not uploads:
                raise gr.Error("Upload some photos (or a zip of them) first.")
            photos, _ = unpack_upload([getattr(f, "name", f) for f in uploads], work / "upload")
        elif source == "a server folder":
            photos = allowed_folder(folder, "Photo folder")
        else:
            photos = EXAMPLE_PHOTOS
        count = len(list_images([photos]))
        if not count:
            raise gr.Error(f"No photos found in {source}.")
        if per_image < 1 or count * per_image > MAX_PAIRS:
            raise gr.Error(f"{count} photos x {per_image} crops is more than the {MAX_PAIRS} pairs one preparation makes.")
        progress(0, desc=f"degrading {count} photos x {per_image} crops")
        out = prepared_pairs(name)
        shutil.rmtree(out, ignore_errors=True)
        written = degrade_folder(photos, out, crop=crop, per_image=per_image, progress=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return f"Wrote {written} pairs ({crop} px ground truth, {crop // 4} px input) from {count} photos."


@sentences
def launch_training(stage, config, name, steps, batch_size, lr, gpus, precision):
    refuse_when_disabled()
    name = run_name(name)
    pairs, n, _ = pairs_for(name, config)
    if not n:
        raise gr.Error("No training pairs for this run yet: prepare data first (Training tab, 1.).")
    try:
        request = LaunchRequest(stage, config, name, int(steps or 0), int(batch_size or 0), float(lr or 0), int(gpus or 1), precision, pairs)
        command = JOB.start(request)
    except (LaunchError, ValueError) as e:
        raise gr.Error(str(e)) from None
    return f"Started: `{' '.join(command[2:])}`"


@sentences
def stop_training():
    refuse_when_disabled()
    return "Stopped." if JOB.stop() else "No training job is running."


def training_status():
    status = JOB.status()
    rows = status["rows"]
    if status["state"] == "idle":
        return "No job started yet.", "", None, ""
    last = rows[-1]["step"] if rows else 0
    target = status.get("target_steps")
    pct = 100 * last / target if target else 0
    bar = f"<progress max='100' value='{pct:.0f}' style='width:100%'></progress>" if target else ""
    text = f"**{status['state']}**: {JOB.request.name} / {status['stage']}, step {last}" + (f" of {target}" if target else "") + f", {status['elapsed_s']:.0f} s"
    plot = pd.DataFrame({"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows]}) if rows else None
    return text, bar, plot, JOB.console_tail()


def default_config() -> str | None:
    configs = available_configs()
    return "demo.yaml" if "demo.yaml" in configs else (configs[0] if configs else None)
