"""Typed training configuration: YAML files plus `key=value` overrides, checked before any heavy work.

OmegaConf structured configs reject unknown keys and wrong types; `check` adds the semantic
checks (paths that must exist, choices) so a bad config fails in a second, not an hour in.
"""

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers.optimization import SchedulerType
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tinysr.models.autoencoder_tiny import ENCODER_TYPES, UPSAMPLE_MODES

STAGES = (
    "vae-encoder", "vae-decoder", "cache", "prune-search", "prune-export", "distill-1", "distill-2", "export",
    "prune-shortgpt", "prune-tinyfusion", "token-prune", "demo-prior", "demo-base-vae", "demo-teacher", "demo-teacher-tune",
    "demo-teacher-decoder", "decoder-tune",
)
CHAIN = ("vae-encoder", "vae-decoder", "cache", "prune-search", "prune-export", "distill-1", "distill-2", "export")


def chain_stages(cfg) -> list[str]:
    """What `all` runs: the paper's CHAIN, with decoder-tune (not the paper's) before export where the config has it."""
    stages = list(CHAIN)
    if "decoder-tune" in cfg.stages:
        stages.insert(stages.index("export"), "decoder-tune")
    return stages


def tiny_vae_stage(cfg) -> str:
    """The stage whose tiny VAE export ships."""
    return "decoder-tune" if "decoder-tune" in cfg.stages else "vae-decoder"


def standin_target(cfg) -> str:
    """What the demo stand-ins learn: "prior" (the demo-prior stage's restorations) or "gt" (the photos)."""
    return "prior" if cfg.standins.target == "realesrgan" else "gt"


def teacher_stage(cfg) -> str:
    """The stage whose demo teacher the chain distils from (demo-teacher-decoder then changes only its decoder)."""
    return "demo-teacher-tune" if "demo-teacher-tune" in cfg.stages else "demo-teacher"


FINAL = "final"


def stage_dir(cfg, stage: str) -> Path:
    return Path(cfg.output_dir) / cfg.name / stage


def final_dir(cfg, stage: str) -> Path:
    return stage_dir(cfg, stage) / FINAL


def upstream_stages(cfg, stage: str) -> list[str]:
    """The earlier stages whose final output `stage` reads (the chain's order: CHAIN)."""
    decoder = ["vae-decoder"]
    prior = ["demo-prior"] if standin_target(cfg) == "prior" else []
    return {
        "vae-decoder": ["vae-encoder"],
        "prune-search": decoder,
        "prune-tinyfusion": decoder,
        "prune-export": ["prune-search"],
        "distill-1": ["prune-export", *decoder],
        "distill-2": ["prune-export", "distill-1", *decoder],
        "decoder-tune": ["distill-2", *decoder],
        "export": ["distill-2", tiny_vae_stage(cfg)],
        "demo-base-vae": prior,
        "demo-teacher": ["demo-base-vae", *prior],
        "demo-teacher-tune": ["demo-teacher", *prior],
        "demo-teacher-decoder": prior,
    }.get(stage, [])


def missing_upstream(cfg, stages: list[str]) -> list[str]:
    """Stages that must run before `stages` can: read by one of them, neither finished nor among them."""
    missing = []
    for i, stage in enumerate(stages):
        for need in upstream_stages(cfg, stage):
            if need not in stages[:i] and need not in missing and not final_dir(cfg, need).is_dir():
                missing.append(need)
    return missing


SCHEDULERS = tuple(t.value for t in SchedulerType if t != SchedulerType.PIECEWISE_CONSTANT)  # that one needs step rules
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")  # what torch.nn.Conv2d accepts
TINY_VAES = ("TinyAutoencoder", "PatchAutoencoder")


class ConfigError(ValueError):
    pass


@dataclass
class StageConfig:
    """Optimisation and loss settings of one stage; each stage reads the fields it needs."""

    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    disc_lr: float = 1e-5
    disc_weight_decay: float = 0.01  # the discriminator's AdamW (torch's default; the fork's stage 2: 1e-4), never scheduled or clipped
    # AdamW (betas 0.9/0.999, eps 1e-8) and a diffusers schedule; the official trainers (TSD-SR's train.py,
    # the TinySR fork) use weight decay 1e-4, cosine_with_restarts after 3000 warm-up steps, clip 1.0 (paper.yaml)
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"  # any name of diffusers.optimization.get_scheduler
    lr_warmup_steps: int = 0  # optimizer steps
    lr_num_cycles: int = 1
    max_grad_norm: float = 1.0
    lora_rank: int = 64
    lora_targets: list[str] = field(default_factory=list)  # empty: the stage's official list (see the stage)
    train_modulation: bool = True  # distill: the student's folded adaLN vectors train beside its LoRA
    continue_lora: bool = True  # distill-2 trains on distill-1's LoRA (the fork) instead of merging it into a new one
    ema_decay: float = 0.0  # prune search: EMA of the mask logits, the decision taken from it (0: the raw logits)
    keep_search_lora: bool = False  # prune-export: fold the search LoRA into the student
    checkpoint_every: int = 0  # 0: only the final checkpoint
    log_every: int = 1
    crop: int = 0  # GT crop of this stage, 0: data.crop (the convolutional VAEs learn as well from small crops, far cheaper)
    overfit_batch: bool = False  # always the first batch_size pairs: a quick check that a stage can learn
    # loss weights (paper: decoder 3 LPIPS + 1 GAN; search 1/1; stage 2: 5 L1 + 1 LPIPS + 0.3 GAN)
    w_mse: float = 0.0
    w_l1: float = 0.0  # on latents in the stages that regress them; on the image in vae-decoder, decoder-tune, demo-teacher-decoder
    w_lpips: float = 0.0
    w_gan: float = 0.0
    w_kl: float = 0.0
    w_image_l1: float = 0.0  # demo-teacher(-tune): L1 of the decoded image to its target, beside w_l1 on latents
    dihedral: bool = False  # demo-teacher(-tune): every pair also in its 7 other flips and quarter turns (input and target alike)
    perceptual: str = "stlpips"  # stlpips | lpips-vgg | lpips-alex
    lattice_period: int = 0  # > 0: LPIPS compares images less their mean pattern of this period in px (tinysr.lattice.lattice_pattern)
    lattice_window: int = 0  # with lattice_period: that pattern averaged over this many cells around each (odd), 0: the whole crop
    w_lattice_l1: float = 0.0  # with lattice_period: L1 between the image's and the target's pattern
    w_cell_steps: float = 0.0  # demo-teacher(-tune, -decoder), vae-decoder, decoder-tune: excess of the image's steps across latent cells over the target's (losses.cell_step_excess)
    teacher_lattice_period: int = 0  # distill: > 0 takes each crop's mean pattern of this period (latent px) out of the teacher's latents
    discriminator: str = "conv"  # conv | dino-projected
    disc_condition: str = "none"  # dino-projected only: none | dinov2-cls (the GT's DINOv2 CLS token, the fork's stage 2)
    decoder_input: str = "lq"  # Eq. A.2 decodes LR latents; `hq` decodes HR latents
    # decoder-tune: the tiny VAE's decoder switched to these first (no weights change; empty: as vae-decoder trained it)
    upsample_mode: str = ""
    padding_mode: str = ""
    # demo-teacher-decoder: the PixelRefiner it adds to the teacher's PatchAutoencoder (tinysr.models.autoencoder_patch)
    pixel_channels: int = 32
    pixel_blocks: int = 1
    # pruning search (TinyFusion-style)
    keep_per_group: int = 2
    group_size: int = 4
    couple_pairs: bool = True
    temperature_start: float = 4.0
    temperature_end: float = 0.1
    logit_scale: float = 100.0
    calibration_batches: int = 8
    token_keep: float = 1.0  # token-prune ablation: fraction of prompt tokens kept


@dataclass
class DataConfig:
    pairs: str = MISSING  # folder with gt/ and lq/ (python -m tinysr degrade)
    cache: str = ""  # latent cache folder; built by the `cache` stage when empty
    crop: int = 512  # GT crop; the LQ crop is a quarter of it
    num_workers: int = 0


@dataclass
class TinyVAEConfig:
    channels: int = 64
    num_stages: int = 3
    blocks_per_stage: int = 3
    encoder_separable: bool = True
    decoder_separable: bool = True
    padding_mode: str = "zeros"  # TAESD's and the paper's; the demo's decoder-tune switches to "replicate" (docs/demo-weights.md)
    encoder_type: str = "taesd"  # the paper's; `patch` (TinyAutoencoder's docstring) suits the demo's patch latents
    upsample_mode: str = "nearest"  # TAESD's and the paper's; "bilinear" kept a sharpened demo decoder's edges smooth (docs/demo-weights.md)


@dataclass
class TinyPatchVAEConfig:
    """tiny_vae_class PatchAutoencoder: the demo teacher's VAE made narrower (its patches, latent and decoder kind)."""

    channels: int = 32
    blocks: int = 1


@dataclass
class StandInConfig:
    """Demo only: diffusers configs of the small base VAE and teacher trained in place of SD3 / TSD-SR."""

    vae_class: str = "AutoencoderKL"  # a key of tinysr.pipelines.base.VAE_CLASSES
    vae: dict[str, Any] = field(default_factory=dict)  # vae_class(**vae)
    transformer: dict[str, Any] = field(default_factory=dict)  # SD3Transformer2DModel(**transformer)
    prompt_tokens: int = 16
    # what demo-teacher restores towards: the photos (gt), or Real-ESRGAN x4plus's restorations of the LQ
    # (realesrgan, written once by the demo-prior stage), the pretrained prior TSD-SR gets from SD3
    target: str = "gt"


@dataclass
class TrainerConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 80
    mixed_precision: str = "no"  # no | fp16 | bf16
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb (optional package)
    teacher: str = MISSING  # TSD-SR pipeline: our folder, hub id or `tsdsr`
    pretrained_vae: str = ""  # E_pre (SD3's VAE without TSD-SR's LoRA); empty: the teacher's VAE
    # the tiny VAE's scaling factor is always the teacher VAE's: it lives in that latent space
    tiny_vae_class: str = "TinyAutoencoder"  # the paper's (settings: tiny_vae), or PatchAutoencoder (tiny_patch_vae)
    tiny_vae: TinyVAEConfig = field(default_factory=TinyVAEConfig)
    tiny_patch_vae: TinyPatchVAEConfig = field(default_factory=TinyPatchVAEConfig)
    # the pipelines this run writes (demo teacher, TinySR export) take their transformer's per-image token pattern
    # out of its prediction (OneStepSRPipeline.without_token_pattern); the releases do not
    remove_token_pattern: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    stages: dict[str, StageConfig] = field(default_factory=dict)
    standins: StandInConfig = field(default_factory=StandInConfig)


def _yaml_chain(path: Path, seen: tuple = ()) -> list[DictConfig]:
    """The file and, first, the files its `base:` key names (relative to it), so variants list only what differs."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base:` files form a cycle")
    raw = OmegaConf.load(path)
    base = raw.pop("base", None)
    if base is None:
        return [raw]
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: base config {base_path} not found")
    return [*_yaml_chain(base_path, (*seen, path.resolve())), raw]


def load_config(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Schema <- YAML <- `a.b=c` overrides, with every error turned into one readable ConfigError.

    A YAML `stage_defaults:` mapping is merged under every stage's own keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (see trainer/configs/)")
    try:
        raw = OmegaConf.merge(*_yaml_chain(path))
        defaults = raw.pop("stage_defaults", None)
        if defaults is not None:
            for name in raw.get("stages") or {}:
                raw.stages[name] = OmegaConf.merge(defaults, raw.stages[name] or {})
        cfg = OmegaConf.merge(OmegaConf.structured(TrainerConfig), raw)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{path}: {key + ': ' if key else ''}{str(e).splitlines()[0]}") from None
    return cfg


def check(cfg: DictConfig, stages: list[str]) -> None:
    """Semantic checks for the stages about to run."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stages {unknown} in config; known: {', '.join(STAGES)}")
    for stage in stages:
        if stage not in cfg.stages:
            raise ConfigError(f"the config has no `stages.{stage}` section")
        s = cfg.stages[stage]
        if s.steps < 1 or s.batch_size < 1 or s.grad_accum < 1 or s.lr <= 0:
            raise ConfigError(f"stages.{stage}: steps, batch_size, grad_accum must be >= 1 and lr > 0")
        if s.crop % 32 or s.crop < 0:
            raise ConfigError(f"stages.{stage}.crop must be 0 (data.crop) or a multiple of 32, got {s.crop}")
        choices = {
            "perceptual": ("stlpips", "lpips-vgg", "lpips-alex"), "discriminator": ("conv", "dino-projected"),
            "decoder_input": ("lq", "hq"), "disc_condition": ("none", "dinov2-cls"), "lr_scheduler": SCHEDULERS,
        }
        for key, allowed in choices.items():
            if s[key] not in allowed:
                raise ConfigError(f"stages.{stage}.{key} must be one of {', '.join(allowed)}, got {s[key]!r}")
        if not 0 <= s.ema_decay < 1 or s.lr_warmup_steps < 0 or min(s.weight_decay, s.disc_weight_decay) < 0:
            raise ConfigError(f"stages.{stage}: need 0 <= ema_decay < 1, lr_warmup_steps >= 0 and weight decays >= 0")
        if s.lr_warmup_steps and s.lr_scheduler == "constant":
            raise ConfigError(f"stages.{stage}: lr_scheduler constant has no warm-up; use constant_with_warmup or set lr_warmup_steps: 0")
        if s.lattice_period < 0 or (s.lattice_period and 32 % s.lattice_period):
            raise ConfigError(f"stages.{stage}.lattice_period must be 0 (off) or divide 32 (crops are multiples of 32), got {s.lattice_period}")
        if s.lattice_window < 0 or (s.lattice_window and s.lattice_window % 2 == 0):
            raise ConfigError(f"stages.{stage}.lattice_window must be 0 (the whole crop) or an odd number of cells, got {s.lattice_window}")
        if (s.lattice_window or s.w_lattice_l1) and not s.lattice_period:
            raise ConfigError(f"stages.{stage}: lattice_window and w_lattice_l1 need a lattice_period")
        if s.teacher_lattice_period not in (0, 2, 4):
            raise ConfigError(f"stages.{stage}.teacher_lattice_period must be 0 (off), 2 or 4 latent px (latent crops are multiples of 4), got {s.teacher_lattice_period}")
        if s.disc_condition != "none" and s.discriminator != "dino-projected":
            raise ConfigError(f"stages.{stage}.disc_condition needs discriminator: dino-projected")
        for key, allowed in (("upsample_mode", UPSAMPLE_MODES), ("padding_mode", PADDING_MODES)):
            if s[key] and s[key] not in allowed:
                raise ConfigError(f"stages.{stage}.{key} must be empty (as trained) or one of {', '.join(allowed)}, got {s[key]!r}")
        if (s.upsample_mode or s.padding_mode) and cfg.tiny_vae_class != "TinyAutoencoder":
            raise ConfigError(f"stages.{stage}: upsample_mode and padding_mode switch a TinyAutoencoder's decoder, not a {cfg.tiny_vae_class}'s")
        if s.padding_mode and cfg.tiny_vae.encoder_type != "patch":
            raise ConfigError(f"stages.{stage}.padding_mode would change the TAESD encoder's padding too (the student's input): only with tiny_vae.encoder_type patch")
    if cfg.tiny_vae_class not in TINY_VAES:
        raise ConfigError(f"tiny_vae_class must be one of {', '.join(TINY_VAES)}, got {cfg.tiny_vae_class!r}")
    if cfg.tiny_vae.encoder_type not in ENCODER_TYPES:
        raise ConfigError(f"tiny_vae.encoder_type must be one of {', '.join(ENCODER_TYPES)}, got {cfg.tiny_vae.encoder_type!r}")
    if cfg.tiny_vae.upsample_mode not in UPSAMPLE_MODES:
        raise ConfigError(f"tiny_vae.upsample_mode must be one of {', '.join(UPSAMPLE_MODES)}, got {cfg.tiny_vae.upsample_mode!r}")
    if cfg.tiny_vae.padding_mode not in PADDING_MODES:
        raise ConfigError(f"tiny_vae.padding_mode must be one of {', '.join(PADDING_MODES)}, got {cfg.tiny_vae.padding_mode!r}")
    for stage, part in (("demo-base-vae", "vae"), ("demo-teacher", "transformer")):
        if stage in stages and not cfg.standins[part]:
            raise ConfigError(f"{stage} needs `standins.{part}` (the diffusers config of the stand-in model)")
    if "demo-teacher-decoder" in stages:
        s = cfg.stages["demo-teacher-decoder"]
        if s.pixel_channels < 1 or s.pixel_blocks < 0:
            raise ConfigError(f"stages.demo-teacher-decoder: pixel_channels must be >= 1 and pixel_blocks >= 0, got {s.pixel_channels} and {s.pixel_blocks}")
        vae_config = Path(cfg.teacher) / "vae" / "config.json"  # a local teacher folder: refused now, not after loading it
        vae_class = json.loads(vae_config.read_text()).get("_class_name") if vae_config.is_file() else "PatchAutoencoder"
        if vae_class != "PatchAutoencoder":
            raise ConfigError(f"demo-teacher-decoder adds a pixel refiner to a teacher whose VAE is a PatchAutoencoder (this teacher's: {vae_class})")
    if cfg.standins.target not in ("gt", "realesrgan"):
        raise ConfigError(f"standins.target must be gt or realesrgan, got {cfg.standins.target!r}")
    if "demo-base-vae" in stages:
        from tinysr.pipelines.base import VAE_CLASSES

        if cfg.standins.vae_class not in VAE_CLASSES:
            raise ConfigError(f"standins.vae_class must be one of {', '.join(VAE_CLASSES)}, got {cfg.standins.vae_class!r}")
    for tracker in cfg.report_to:
        if tracker not in ("tensorboard", "wandb"):
            raise ConfigError(f"report_to: unknown tracker {tracker!r}; choose tensorboard and/or wandb")
        if importlib.util.find_spec(tracker) is None:
            raise ConfigError(f"report_to: {tracker} is not installed (pip install {tracker})")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
    try:
        pairs = Path(cfg.data.pairs)
    except OmegaConfBaseException:
        raise ConfigError("data.pairs is required: a folder with gt/ and lq/ made by `python -m tinysr degrade`") from None
    if not (pairs / "gt").is_dir() or not (pairs / "lq").is_dir():
        raise ConfigError(f"data.pairs={pairs} has no gt/ and lq/ folders; make them with `python -m tinysr degrade`")
    missing = missing_upstream(cfg, stages)
    if missing:
        raise ConfigError(
            f"{stages[0]} reads the output of {', '.join(missing)} ({final_dir(cfg, missing[0])} is missing): "
            f"run `python -m trainer {missing[0]} --config ...` with the same name ({cfg.name}) first, or stage all"
        )
    if cfg.data.crop % 32:
        raise ConfigError(f"data.crop must be a multiple of 32, got {cfg.data.crop}")
