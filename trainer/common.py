"""Pieces several stages share: the paired dataset, the frozen teacher, where each stage leaves its output."""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from tinysr.imageio import load_image
from tinysr.latent_cache import INDEX, LatentCacheDataset, check_teacher_settings, paired_images
from tinysr.models import PatchAutoencoder, TinyAutoencoder
from tinysr.pipelines.base import VAE_CLASSES, vae_encode
from tinysr.weights import load_component

from .config import TINY_VAES, ConfigError, final_dir, stage_dir


class PairDataset(Dataset):
    """Degraded pairs as `{"name", "lq_up", "gt"}` in [-1, 1]; the LQ is bicubic-upscaled to the GT size.

    Pairs larger than `crop` are centre-cropped (the random 512 crops were taken by `degrade`).
    With `prior_dir`, each item also has "prior": that folder's image of the same name (GT-sized).
    """

    def __init__(self, pairs_dir, crop: int, scale: int = 4, prior_dir: Path | None = None):
        self.pairs = paired_images(Path(pairs_dir))
        self.crop, self.scale, self.prior_dir = crop, scale, prior_dir
        if prior_dir is not None:
            missing = [name for name, _, _ in self.pairs if not (prior_dir / name).is_file()]
            if missing:
                raise FileNotFoundError(f"{prior_dir} lacks {len(missing)} of the pairs' restorations ({missing[0]}, ...): run the `demo-prior` stage")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        name, lq_path, gt_path = self.pairs[i]
        gt, lq = load_image(gt_path).rgb, load_image(lq_path).rgb
        c, s = self.crop, self.scale
        top, left = max((lq.shape[1] - c // s) // 2, 0), max((lq.shape[2] - c // s) // 2, 0)
        lq = lq[:, top : top + c // s, left : left + c // s]
        gt = gt[:, top * s : top * s + c, left * s : left * s + c]
        lq_up = F.interpolate(lq[None], size=gt.shape[-2:], mode="bicubic", align_corners=False)[0].clamp(0, 1)
        item = {"name": name, "lq_up": lq_up * 2 - 1, "gt": gt * 2 - 1}
        if self.prior_dir is not None:
            prior = load_image(self.prior_dir / name).rgb
            item["prior"] = prior[:, top * s : top * s + c, left * s : left * s + c] * 2 - 1
        return item


def stage_pairs(cfg, s, prior: bool = False) -> PairDataset:
    """The pairs at the stage's crop size (`stages.X.crop`, else `data.crop`), with the demo prior's restorations if asked."""
    prior_dir = require(final_dir(cfg, "demo-prior"), "demo-prior") if prior else None
    return PairDataset(cfg.data.pairs, s.crop or cfg.data.crop, prior_dir=prior_dir)


def require(path: Path, made_by: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the `{made_by}` stage first (python -m trainer {made_by} --config ...)")
    return path


def load_teacher(cfg, device):
    """The frozen TSD-SR teacher pipeline (fp32 weights; mixed precision comes from accelerate)."""
    from tinysr.pipelines import load_pipeline

    teacher = load_pipeline(cfg.teacher, device=device, dtype="fp32")
    teacher.transformer.requires_grad_(False)
    teacher.vae.requires_grad_(False)
    return teacher


def load_pretrained_vae(cfg, teacher):
    """E_pre: the pretrained SD3 VAE (without TSD-SR's LoRA) when configured, else the teacher's VAE."""
    if not cfg.pretrained_vae:
        return teacher.vae
    from diffusers import AutoencoderKL

    from tinysr.weights import resolve_folder

    folder = resolve_folder(cfg.pretrained_vae, what="pretrained VAE")
    sub = "vae" if (folder / "vae" / "config.json").is_file() else None
    return AutoencoderKL.from_pretrained(folder, subfolder=sub).to(teacher.device).eval().requires_grad_(False)


def load_tiny_vae(cfg, stage: str = "vae-decoder", teacher=None):
    """The tiny VAE `stage` wrote; with `teacher`, refused unless it scales latents as the teacher's VAE does."""
    vae = load_component(require(final_dir(cfg, stage), stage), "vae", {name: VAE_CLASSES[name] for name in TINY_VAES}, torch.float32)
    if teacher is not None and vae.config.scaling_factor != teacher.vae.config.scaling_factor:
        raise ConfigError(
            f"{final_dir(cfg, stage)}: the tiny VAE's scaling_factor {vae.config.scaling_factor} is not the teacher VAE's "
            f"{teacher.vae.config.scaling_factor} (written before the chain took the teacher's): rerun vae-encoder and vae-decoder"
        )
    return vae


def rebuilt(model, **changes):
    """A new model of the model's class from its config with `changes` (weights not copied). diffusers' `from_config`
    would drop changes to keys the loaded config.json lacked (it lists them in `_use_default_values`)."""
    config = {key: value for key, value in model.config.items() if key != "_use_default_values"}
    return type(model).from_config({**config, **changes})


def new_tiny_vae(cfg, e_pre, scaling_factor: float):
    """A fresh tiny VAE in the teacher's latent space, starting from E_pre's tensors wherever name and shape agree.

    The scaling factor is the teacher VAE's: the student must see latents scaled as the teacher did.
    No tensor agrees between the paper's TAESD-shaped VAE and SD3's. Under the demo's PatchAutoencoder, a patch
    encoder (TinyAutoencoder's encoder_type patch, the bundled one, or a narrower PatchAutoencoder) takes its
    linear map (that alone gives the latents to 0.5%) and learns the rest; without one to copy it is refused.
    """
    if cfg.tiny_vae_class == "PatchAutoencoder":
        if not isinstance(e_pre, PatchAutoencoder):
            raise ConfigError(f"tiny_vae_class PatchAutoencoder needs a PatchAutoencoder E_pre to copy (pretrained_vae, else the teacher's VAE: {type(e_pre).__name__})")
        c = e_pre.config
        vae = PatchAutoencoder(c.latent_channels, c.patch_size, **cfg.tiny_patch_vae, scaling_factor=scaling_factor, lapped=c.lapped)
    else:
        vae = TinyAutoencoder(**cfg.tiny_vae, scaling_factor=scaling_factor)
    own = vae.state_dict()
    shared = {k: v for k, v in e_pre.state_dict().items() if k in own and own[k].shape == v.shape}
    if "encoder.linear.weight" in own and "encoder.linear.weight" not in shared:
        raise ConfigError(
            f"the tiny VAE's patch encoder starts from E_pre's linear patch map, and E_pre (pretrained_vae, else the teacher's VAE: "
            f"a {type(e_pre).__name__}) has none of its shape: it needs a PatchAutoencoder with {vae.encoder.patch_size}-px patches"
        )
    vae.load_state_dict(shared, strict=False)
    return vae


def load_distilled_student(cfg):
    """distill-2's student, its LoRA (if any) merged: what decoder-tune decodes and export ships."""
    from tinysr.models import TinySRTransformer
    from tinysr.weights import merge_lora

    student = TinySRTransformer.from_pretrained(require(final_dir(cfg, "distill-2") / "transformer", "distill-2"))
    if getattr(student, "peft_config", None):
        merge_lora(student)
    return student


class TeacherLatents:
    """z_tea = E_tea(x) - eps_tea(E_tea(x)) for a batch, from the latent cache when it holds the pair."""

    def __init__(self, cfg, teacher):
        self.teacher = teacher
        cache = Path(cfg.data.cache) if cfg.data.cache else stage_dir(cfg, "cache")
        self.cache = LatentCacheDataset(cache) if (cache / INDEX).is_file() else None
        if self.cache is not None:
            check_teacher_settings(self.cache.index, teacher, cache / INDEX)
        self.rows = {name: i for i, (_, _, name) in enumerate(self.cache.items)} if self.cache else {}

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        if self.rows and all(n in self.rows for n in batch["name"]):
            z = torch.stack([self.cache[self.rows[n]]["teacher"] for n in batch["name"]])
            return z.to(batch["lq_up"].device)
        t = self.teacher
        z = vae_encode(t.vae, batch["lq_up"]) * t.vae.config.scaling_factor
        return z - t.predict_tiled(z)
