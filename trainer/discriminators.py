"""Projected discriminator: a frozen DINO ViT-S/16 read at five depths, each depth judged by a small head.

The official TinySR release trains its GAN terms against StyleGAN-T's projected discriminator
(Sauer et al. 2023). Those source files carry an NVIDIA no-redistribution licence, so nothing here is
copied from them: this is a reimplementation from the recorded facts (backbone, hooks, token readout,
head layout, input pipeline), with DiffAugment (Zhao et al. 2020) written anew. `DinoV2ClsCondition`
is a fork's stage-2 condition: the final CLS token of a frozen DINOv2 ViT-L/14 on the ground truth.

Images are in [-1, 1]. The pretrained backbones come through timm from the Hugging Face cache; without
them, offline, construction raises MissingWeightsError.
"""

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from tinysr.errors import MissingWeightsError

DINO = "vit_small_patch16_224.dino"
DINOV2 = "vit_large_patch14_reg4_dinov2.lvd142m"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrained_vit(name: str, **kwargs) -> nn.Module:
    """timm's pretrained `name`, frozen and in eval mode; MissingWeightsError when its weights can't be had."""
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except OSError as e:
        from huggingface_hub import constants

        raise MissingWeightsError(
            f"timm model {name} (Hugging Face repo timm/{name})",
            [constants.HF_HUB_CACHE],
            f"{type(e).__name__}: fetch it once online, or pre-place the repo's files in the Hugging Face cache "
            "(HF_HOME); or use `discriminator: conv`, which trains from scratch offline.",
        ) from None
    return model.eval().requires_grad_(False)


def _randint(high: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One integer in [0, high) per image of x, shaped (B, 1, 1), on x's device."""
    device = x.device if generator is None else generator.device
    return torch.randint(high, (x.shape[0], 1, 1), generator=generator, device=device).to(x.device)


def translate(x: torch.Tensor, ratio: float = 0.125, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by its own whole-pixel offset, up to `ratio` of its size per axis, filling with zeros."""
    b, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + 2 * sy - _randint(2 * sy + 1, x, generator)
    cols = torch.arange(w, device=x.device).view(1, 1, w) + 2 * sx - _randint(2 * sx + 1, x, generator)
    padded = F.pad(x, (sx, sx, sy, sy)).permute(0, 2, 3, 1)
    return padded[torch.arange(b, device=x.device).view(b, 1, 1), rows, cols].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, ratio: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero a square `ratio` of the image size in each image, centred anywhere, so clipped at the borders."""
    _, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = _randint(h + 1 - sy % 2, x, generator) - sy // 2
    left = _randint(w + 1 - sx % 2, x, generator) - sx // 2
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    keep = (rows < top) | (rows >= top + sy) | (cols < left) | (cols >= left + sx)
    return x * keep.unsqueeze(1).to(x.dtype)


def diff_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """DiffAugment's "translation,cutout" policy, differentiable in x."""
    return cutout(translate(x, generator=generator), generator=generator)


def _block(channels: int, kernel: int) -> nn.Sequential:
    conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, padding_mode="circular")
    return nn.Sequential(nn.utils.spectral_norm(conv), nn.GroupNorm(4, channels), nn.LeakyReLU(0.2))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (self.fn(x) + x) / math.sqrt(2)


class EqualLinear(nn.Module):
    """Linear layer with N(0, 1) weights scaled by 1/sqrt(fan-in) at run time (StyleGAN's equalised learning rate)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return F.linear(x, self.weight / math.sqrt(self.weight.shape[1]), self.bias)


class DiscHead(nn.Module):
    """Scores every token of one feature map, (B, C, N) -> (B, N); with c_dim > 0, by projection onto the condition."""

    def __init__(self, channels: int, c_dim: int = 0, cmap_dim: int = 64):
        super().__init__()
        self.main = nn.Sequential(_block(channels, 1), _Residual(_block(channels, 9)))
        self.out = nn.utils.spectral_norm(nn.Conv1d(channels, cmap_dim if c_dim else 1, 1))
        self.cmapper = EqualLinear(c_dim, cmap_dim) if c_dim else None

    def forward(self, x, c=None):
        h = self.out(self.main(x))
        if self.cmapper is not None:
            cmap = self.cmapper(c)
            h = (h * cmap[:, :, None]).sum(1, keepdim=True) / math.sqrt(cmap.shape[1])
        return h.flatten(1)


class DinoProjectedDiscriminator(nn.Module):
    """Per-token hinge logits (B, (len(hooks) + 1) * N) from a frozen ViT read after blocks `hooks` and its embedding.

    `backbone` is a timm VisionTransformer taking 224 px input (default: pretrained DINO ViT-S/16, N = 196);
    `c_dim` > 0 makes the heads projection-conditioned on a (B, c_dim) vector.
    """

    def __init__(self, c_dim: int = 0, diffaug: bool = True, p_crop: float = 0.5, backbone: nn.Module | None = None, hooks=(2, 5, 8, 11)):
        super().__init__()
        self.backbone = pretrained_vit(DINO) if backbone is None else backbone.eval().requires_grad_(False)
        self.hooks = tuple(hooks)
        self.heads = nn.ModuleList(DiscHead(self.backbone.embed_dim, c_dim) for _ in range(len(self.hooks) + 1))
        self.diffaug, self.p_crop = diffaug, p_crop
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def preprocess(self, x):
        """[-1, 1] images -> augmented, maybe cropped, 224 px, ImageNet-normalised backbone input."""
        if self.diffaug:
            x = diff_augment(x)
        x = (x + 1) / 2
        h, w = x.shape[-2:]
        if w > 224 and h >= 224 and torch.rand(()) < self.p_crop:
            top, left = int(torch.randint(h - 223, ())), int(torch.randint(w - 223, ()))
            x = x[..., top : top + 224, left : left + 224]
        x = F.interpolate(x, size=224, mode="area")
        return (x - self.mean) / self.std

    def features(self, x):
        """Token maps (B, prefix + N, C) after blocks `hooks`, then after the embedding (the release's order)."""
        vit = self.backbone
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        embedded, feats = x, []
        for i, block in enumerate(vit.blocks[: max(self.hooks) + 1]):
            x = block(x)
            if i in self.hooks:
                feats.append(x)
        return feats + [embedded]

    def readout(self, tokens):
        """Add the CLS token to every patch token and drop the prefix tokens: (B, prefix + N, C) -> (B, C, N)."""
        return (tokens[:, self.backbone.num_prefix_tokens :] + tokens[:, :1]).transpose(1, 2)

    def forward(self, x, c=None):
        feats = self.features(self.preprocess(x))
        return torch.cat([head(self.readout(f), c) for head, f in zip(self.heads, feats, strict=True)], dim=1)


class DinoV2ClsCondition(nn.Module):
    """The final-norm CLS token of a frozen ViT on 448 px [0, 1] images (no ImageNet normalisation), detached.

    Default model: pretrained DINOv2 ViT-L/14 with 4 registers, position embedding resampled to 32 x 32,
    giving (B, 1024) from (B, 3, H, W) ground truth in [-1, 1].
    """

    def __init__(self, model: nn.Module | None = None):
        super().__init__()
        self.model = pretrained_vit(DINOV2, img_size=448) if model is None else model.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images):
        x = F.interpolate((images + 1) / 2, size=448, mode="bicubic")
        return self.model.forward_features(x)[:, 0]
