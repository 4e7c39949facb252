"""What a checkpoint was trained with, so that `--resume` continues the same training and never mixes two.

Each checkpoint records the run's settings (this stage's, the run-wide ones, the number of processes) and a
fingerprint of each input the stage reads: the earlier stages' outputs, the teacher, the pairs, the latent cache.
Resuming compares that record with the current one and refuses on a difference: a stage rerun after its input was
retrained, or with another learning rate, would otherwise quietly continue the old training.
"""

import hashlib
import json
from dataclasses import asdict
from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

from .config import StageConfig, TrainerConfig, final_dir, stage_dir, upstream_stages

# checkpointed and logged at other intervals, a run is the same training
RESUMABLE_CHANGES = ("checkpoint_every", "log_every")
# run-wide keys recorded as their inputs' fingerprints (a moved folder is the same input), or that change no result
NOT_SETTINGS = ("name", "output_dir", "report_to", "teacher", "pretrained_vae", "stages")
NOT_DATA_SETTINGS = ("pairs", "cache", "num_workers")
# stand-in stages that train the teacher rather than read it
TEACHER_FREE = ("demo-prior", "demo-base-vae", "demo-teacher", "demo-teacher-tune")
CACHE_READERS = ("prune-search", "prune-tinyfusion", "distill-1", "distill-2")
MAYBE_HUB = ("teacher", "pretrained_vae")  # a hub id or alias, when no such folder exists, stands for itself
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".npy", ".npz")
NOT_INPUTS = (".md", ".txt", ".log")  # model cards and notes, rewritten without changing a weight
SAMPLES, SAMPLE_BYTES = 16, 1 << 16


def fingerprint(path: Path) -> str:
    """A digest of a file or folder: every file's name and size (not cards and notes), and for weights and configs evenly
    spaced samples of their bytes (a retrained tensor file differs almost everywhere; reading a 2 B-parameter teacher
    whole would not pay). Images are listed, not read."""
    if not path.exists():
        return "missing"
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix not in NOT_INPUTS)
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if file != path else file.name}\0{size}\0".encode())
        if file.suffix in WEIGHT_SUFFIXES:
            with file.open("rb") as f:
                if size <= SAMPLES * SAMPLE_BYTES:
                    digest.update(f.read())
                else:
                    for i in range(SAMPLES):
                        f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                        digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def stage_inputs(cfg, stage: str) -> dict[str, str]:
    """The files `stage` reads, by name: path."""
    inputs = {f"{up} output": str(final_dir(cfg, up)) for up in upstream_stages(cfg, stage)}
    inputs["pairs"] = cfg.data.pairs
    if stage not in TEACHER_FREE:
        inputs["teacher"] = cfg.teacher
        if cfg.pretrained_vae:
            inputs["pretrained_vae"] = cfg.pretrained_vae
    if stage in CACHE_READERS:
        inputs["latent cache"] = cfg.data.cache or str(stage_dir(cfg, "cache"))
    return inputs


def _settings(cfg, stage_settings: dict) -> dict:
    run_wide = OmegaConf.to_container(cfg, resolve=True)
    settings = {key: value for key, value in run_wide.items() if key not in NOT_SETTINGS}
    settings["data"] = {key: value for key, value in run_wide["data"].items() if key not in NOT_DATA_SETTINGS}
    settings["stage"] = {key: value for key, value in stage_settings.items() if key not in RESUMABLE_CHANGES}
    return settings


def training_record(cfg, stage: str, num_processes: int = 1) -> dict:
    """The settings and input fingerprints a checkpoint of `stage` is written with (JSON-ready)."""
    settings = _settings(cfg, OmegaConf.to_container(cfg.stages[stage], resolve=True))
    settings["num_processes"] = num_processes  # each process draws its own batches
    inputs = {}
    for name, path in stage_inputs(cfg, stage).items():
        inputs[name] = path if name in MAYBE_HUB and not Path(path).exists() else fingerprint(Path(path))
    return {"settings": settings, "inputs": inputs}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@cache
def _defaults() -> dict:
    settings = _settings(OmegaConf.structured(TrainerConfig), asdict(StageConfig()))
    return _flat(json.loads(json.dumps({**settings, "num_processes": 1})))


def record_differences(saved: dict, current: dict, stage: str) -> list[str]:
    """Readable differences between a checkpoint's record and the current one (empty: the same training).

    A setting the saved record lacks (added to the code since) counts only off its default, an input it lacks not at
    all; one the code no longer has cannot change the training."""
    old, new = _flat(saved.get("settings", {})), _flat(current["settings"])
    changed = []
    for key in sorted(new):
        unchanged = old[key] == new[key] if key in old else key in _defaults() and _defaults()[key] == new[key]
        if unchanged:
            continue
        name = f"stages.{stage}.{key[len('stage.'):]}" if key.startswith("stage.") else key
        changed.append(f"{name}: {old[key] if key in old else '(not recorded)'} -> {new[key]}")
    inputs_old, inputs_new = saved.get("inputs", {}), current["inputs"]
    changed += [f"{name} changed since" for name in sorted(inputs_old.keys() & inputs_new.keys()) if inputs_old[name] != inputs_new[name]]
    return changed


def checkpoint_differences(checkpoint: Path, record: dict, stage: str) -> list[str]:
    """How `record` differs from what the checkpoint was trained with (nothing for checkpoints from before records)."""
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("record")
    return record_differences(saved, record, stage) if saved is not None else []
