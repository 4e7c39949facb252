"""Perceptual losses and discriminators, pluggable by name (images in [-1, 1]).

`stlpips` (shift-tolerant LPIPS) and the `conv` discriminator work offline; `lpips-*` need
torchvision backbone and pyiqa LPIPS weights, `dino-projected` (trainer/discriminators.py) needs
DINO ViT-S/16 weights, and DINOv2 ViT-L/14 ones when conditioned.
"""

import torch
import torch.nn.functional as F
from torch import nn

from tinysr.errors import MissingWeightsError
from tinysr.lattice import lattice_pattern
from tinysr.metrics import METRICS, missing_files

from .discriminators import DinoProjectedDiscriminator, DinoV2ClsCondition


def perceptual_loss(kind: str) -> nn.Module:
    """A frozen module mapping (pred, target) in [-1, 1] to a scalar distance."""
    if kind == "stlpips":
        from stlpips_pytorch import stlpips

        net = stlpips.LPIPS(net="alex", variant="shift_tolerant", verbose=False)
        return _Frozen(net, lambda n, a, b: n(a, b).mean())
    if kind in ("lpips-vgg", "lpips-alex"):
        spec = METRICS["lpips"]
        name = "lpips-vgg" if kind == "lpips-vgg" else "lpips"
        files = ("pyiqa/LPIPS_v0.1_vgg-a78928a0.pth", "checkpoints/vgg16-397923af.pth") if kind == "lpips-vgg" else spec.files
        missing = missing_files(type(spec)(name, "fr", True, files))
        if missing:
            raise MissingWeightsError(", ".join(missing), [str(torch.hub.get_dir())], f"{kind} needs these weights; or use perceptual=stlpips (ships its weights).")
        import pyiqa

        metric = pyiqa.create_metric(name, as_loss=True, device="cpu")
        return _Frozen(metric, lambda n, a, b: n((a + 1) / 2, (b + 1) / 2).mean())
    raise ValueError(f"unknown perceptual loss {kind!r}")


class _Frozen(nn.Module):
    def __init__(self, net: nn.Module, fn):
        super().__init__()
        self.net, self.fn = net.eval().requires_grad_(False), fn

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, pred, target):
        return self.fn(self.net, pred, target)


class ConvDiscriminator(nn.Module):
    """PatchGAN discriminator with spectral norm, trained from scratch (works offline)."""

    def __init__(self, channels: int = 64, layers: int = 4):
        super().__init__()
        sn = nn.utils.spectral_norm
        blocks, c = [sn(nn.Conv2d(3, channels, 4, 2, 1)), nn.LeakyReLU(0.2)], channels
        for _ in range(layers - 1):
            blocks += [sn(nn.Conv2d(c, c * 2, 4, 2, 1)), nn.LeakyReLU(0.2)]
            c *= 2
        blocks.append(sn(nn.Conv2d(c, 1, 3, 1, 1)))
        self.net = nn.Sequential(*blocks)

    def forward(self, x, reference=None):
        return self.net(x)


class ProjectedGAN(nn.Module):
    """The projected DINO discriminator, conditioned (`dinov2-cls`) on the ground truth's DINOv2 CLS token or not."""

    def __init__(self, condition: str = "none"):
        super().__init__()
        self.condition = DinoV2ClsCondition() if condition == "dinov2-cls" else None
        self.disc = DinoProjectedDiscriminator(c_dim=self.condition.model.embed_dim if self.condition else 0)
        self._last = (None, None)

    def forward(self, x, reference=None):
        if self.condition is None:
            return self.disc(x)
        if self._last[0] is not reference:  # one encoding per batch of ground truth, shared by the G and D terms
            self._last = (reference, self.condition(reference))
        return self.disc(x, self._last[1])


def make_discriminator(kind: str, condition: str = "none") -> nn.Module:
    """A module scoring images in [-1, 1]; `forward(x, reference)` takes the ground truth a condition is made of."""
    if kind == "conv":
        return ConvDiscriminator()
    if kind == "dino-projected":
        return ProjectedGAN(condition)
    raise ValueError(f"unknown discriminator {kind!r}")


def make_gan(s, enabled: bool) -> tuple:
    """(discriminator, its optimiser) for a stage's `discriminator` and `disc_lr`, or (None, None) when off."""
    if not enabled:
        return None, None
    disc = make_discriminator(s.discriminator, s.disc_condition)
    # no schedule and no clipping for the discriminator, as in the fork's stage 2
    return disc, torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=s.disc_lr, weight_decay=s.disc_weight_decay)


def discriminator_step(accelerator, disc, disc_opt, real, fake) -> float:
    """One hinge-loss update of the discriminator on real images and (detached) generated ones.

    Call it after the generator's `accumulate` block: it steps when that block synced. A second
    `accumulate` here would advance accelerate's shared counter twice per batch, and with
    grad_accum > 1 the generator would never step.
    """
    d = hinge_d_loss(disc(real, real), disc(fake.detach().clamp(-1, 1), real))
    accelerator.backward(d)
    disc_opt.step()  # accelerate's optimizer skips the step and zero_grad until gradients sync
    disc_opt.zero_grad(set_to_none=True)
    return d.item()


def hinge_d_loss(real_logits, fake_logits):
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def hinge_g_loss(fake_logits):
    return -fake_logits.mean()


def image_losses(image, gt, s, lpips: nn.Module | None, disc: nn.Module | None, logs: dict):
    """The image-space terms several stages add: w_lpips * LPIPS + w_gan * hinge generator loss.

    With `lattice_period`, LPIPS compares both images less their pattern of that period: a one-step
    transformer lowers LPIPS most cheaply with a dot grid at its token period, which LPIPS reads as texture.
    `lattice_window` takes that pattern per neighbourhood of cells instead of per image, and `w_lattice_l1`
    holds it to the target's, so a grid is not only unrewarded but costs.
    The discriminator sees images clamped to [-1, 1]: decoders are unbounded, and a generator free to
    scale its output up drives a Lipschitz discriminator's score (and the hinge G loss) without limit
    (seen in the demo run: -3e8 after 200 vae-decoder steps)."""
    loss = 0.0
    pred, target = image.float(), gt.float()
    if s.lattice_period and (lpips is not None or s.w_lattice_l1):
        pred_grid, target_grid = (lattice_pattern(x, s.lattice_period, s.lattice_window) for x in (pred, target))
        pred, target = pred - pred_grid, target - target_grid
        if s.w_lattice_l1:
            grid = F.l1_loss(pred_grid, target_grid)
            loss, logs["lattice_l1"] = loss + s.w_lattice_l1 * grid, grid.item()
    if lpips is not None:
        p = lpips(pred, target)
        loss, logs["lpips"] = loss + s.w_lpips * p, p.item()
    if disc is not None:
        g = hinge_g_loss(disc(image.clamp(-1, 1), gt))
        loss, logs["gan_g"] = loss + s.w_gan * g, g.item()
    return loss


def cell_steps(x: torch.Tensor, cell: int) -> list[torch.Tensor]:
    """Per axis, the step (summed over channels) across each boundary between `cell`-px cells, averaged over
    windows 8 px long and 4 cells across."""
    maps = []
    for image in (x, x.transpose(-1, -2)):
        steps = F.pad((image[..., 1:] - image[..., :-1]).abs().sum(1), (0, 1))  # the image's own edge: no step
        n, h, w = steps.shape
        boundary = steps.reshape(n, h, w // cell, cell)[..., -1]
        maps.append(F.avg_pool2d(boundary[:, None], (8, 4), (8, 4)))
    return maps


def cell_step_excess(image: torch.Tensor, target: torch.Tensor, cell: int) -> torch.Tensor:
    """How far the image's steps across latent cells exceed the target's, window by window.

    A patch decoder draws each latent's error as a cell-sized block, and LPIPS reads the blocks' edges as
    detail: the demo regression teacher's boundary steps were 2.6-2.7x those inside its cells (photos: 1.0).
    """
    return sum(F.relu(p - q).mean() for p, q in zip(cell_steps(image.float(), cell), cell_steps(target.float(), cell)))
