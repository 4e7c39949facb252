"""TinySR: the pruned, condition-free transformer with the tiny VAE; nothing but the latent goes in."""

import os
from pathlib import Path

import torch

from ..models import TinySRTransformer
from ..release import load_tinysr_release
from ..weights import load_component, resolve_folder
from .base import VAE_CLASSES, OneStepSRPipeline


class TinySRPipeline(OneStepSRPipeline):
    default_color_fix = "adain"
    model_index_name = "TinySRPipeline"

    def predict(self, latent):
        return self.transformer(latent)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | None = None,
        device=None,
        dtype="fp32",
    ) -> "TinySRPipeline":
        """A folder or hub repo in our format (see `save_pretrained` / `python -m tinysr convert`)."""
        folder = resolve_folder(model, revision=revision, token=token, what="TinySR model folder")
        options = cls._index_options(folder)
        transformer = load_component(folder, "transformer", {"TinySRTransformer": TinySRTransformer}, torch.float32)
        vae = load_component(folder, "vae", VAE_CLASSES, torch.float32)
        return cls(transformer, vae, device=device, dtype=dtype, **options)

    @classmethod
    def from_release(cls, root: str | os.PathLike, embeds: str | os.PathLike | None = None, *, device=None, dtype="fp32"):
        """The official TinySR checkpoint layout (LoRA merged and modulation folded at load)."""
        transformer, vae = load_tinysr_release(Path(root), embeds)
        return cls(transformer, vae, device=device, dtype=dtype)

