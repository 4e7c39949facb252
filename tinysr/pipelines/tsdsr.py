"""TSD-SR, the teacher: SD3-medium's transformer and VAE with TSD-SR's LoRA merged, a fixed cached prompt."""

import os
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file

from ..release import load_tsdsr_release
from ..weights import SD3_MEDIUM, find_file, load_component, resolve_folder
from .base import TIMESTEP, VAE_CLASSES, OneStepSRPipeline

PROMPT_FILE = "prompt_embeds.safetensors"


class TSDSRPipeline(OneStepSRPipeline):
    default_color_fix = "wavelet"
    model_index_name = "TSDSRPipeline"
    official_clamps_input = True

    def __init__(self, transformer, vae, prompt_embeds, pooled_embeds, *, device=None, dtype="fp32", remove_token_pattern: bool = False):
        self.prompt_embeds = prompt_embeds.reshape(1, -1, prompt_embeds.shape[-1])
        self.pooled_embeds = pooled_embeds.reshape(1, -1)
        super().__init__(transformer, vae, device=device, dtype=dtype, remove_token_pattern=remove_token_pattern)

    def to(self, device=None, dtype=None):
        super().to(device, dtype)
        self.prompt_embeds = self.prompt_embeds.to(self.device, self.dtype)
        self.pooled_embeds = self.pooled_embeds.to(self.device, self.dtype)
        return self

    def predict(self, latent):
        b = latent.shape[0]
        return self.transformer(
            latent,
            encoder_hidden_states=self.prompt_embeds.expand(b, -1, -1),
            pooled_projections=self.pooled_embeds.expand(b, -1),
            timestep=torch.full((b,), TIMESTEP, device=latent.device, dtype=latent.dtype),
        ).sample

    def _save_extras(self, folder: Path) -> None:
        save_file(
            {"prompt_embeds": self.prompt_embeds.float().cpu().contiguous(), "pooled_embeds": self.pooled_embeds.float().cpu().contiguous()},
            folder / PROMPT_FILE,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | None = None,
        device=None,
        dtype="fp32",
    ) -> "TSDSRPipeline":
        """A folder or hub repo in our format: transformer/, vae/ (LoRA merged) and prompt_embeds.safetensors."""
        folder = resolve_folder(model, revision=revision, token=token, what="TSD-SR model folder")
        options = cls._index_options(folder)
        transformer = load_component(folder, "transformer", {"SD3Transformer2DModel": SD3Transformer2DModel}, torch.float32)
        vae = load_component(folder, "vae", VAE_CLASSES, torch.float32)
        embeds = load_file(find_file(PROMPT_FILE, [folder], "The folder is incomplete; re-convert it."))
        return cls(transformer, vae, embeds["prompt_embeds"], embeds["pooled_embeds"], device=device, dtype=dtype, **options)

    @classmethod
    def from_release(
        cls,
        sd3: str | os.PathLike = SD3_MEDIUM,
        lora_dir: str | os.PathLike = "checkpoint/tsdsr",
        embeds_dir: str | os.PathLike = "dataset/default",
        *,
        revision: str | None = None,
        token: str | None = None,
        device=None,
        dtype="fp32",
    ) -> "TSDSRPipeline":
        """The official layout: SD3-medium base + TSD-SR LoRA folder + prompt-embedding folder."""
        transformer, vae, prompt, pooled = load_tsdsr_release(sd3, lora_dir, embeds_dir, revision=revision, token=token)
        return cls(transformer, vae, prompt, pooled, device=device, dtype=dtype)
