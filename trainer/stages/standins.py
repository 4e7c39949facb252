"""Demo-scale stand-ins for the pretrained models the paper starts from (no hub access here).

demo-prior: Real-ESRGAN x4plus's restoration of every pair's LQ, written once as PNGs that later stages
reuse. With `standins.target: realesrgan` the stand-in teacher learns to reproduce them, the way TSD-SR
inherits what SD3 learnt: a pretrained generative prior the demo chain would otherwise lack. (Trained
from scratch on L1/LPIPS/GAN to the photos for 300 CPU steps, the earlier teacher drew an 8-pixel
dot lattice on smooth areas and was blurrier than Real-ESRGAN.)

demo-base-vae: a small VAE trained as an autoencoder on the training photos, in place of SD3's VAE:
L1 + LPIPS reconstruction (of the posterior mean, plus a weak KL term, for an AutoencoderKL); its
scaling factor is set from the latents it produces, as SD3's was. The demo uses a PatchAutoencoder
whose linear path starts as PCA of the training patches: from scratch, a small AutoencoderKL
reconstructed at about 15 dB after 30 CPU minutes, a TAESD-shaped net at 18.5 dB after 600 steps.
demo-teacher: a small SD3Transformer2DModel with one fixed random "prompt", trained for one-step
4x SR in that latent space (z_lq - eps(z_lq) ~ z_target, plus image L1, LPIPS and GAN through the
frozen VAE decoder; the target is the photo or the prior's restoration), in place of TSD-SR. It
writes a TSD-SR pipeline folder, which the real chain then uses as its teacher exactly as it would use the converted TSD-SR release.
demo-teacher-tune: that teacher fine-tuned through its decoded images (ST-LPIPS to the prior's, each less its local
grid, the grids held to each other, and the steps across latent cells held to the target's): the regression's
blocks halved at the same ST-LPIPS, and its student sharper (README).
demo-teacher-decoder: the published teacher's VAE given a PixelRefiner after its lapped synthesis, trained alone on
the teacher's own predictions (the pipeline's latent path): the 4-px blocks the synthesis still draws from the
predictions' errors (blockiness 1.26, photos 1.0) go. The student never decodes through the teacher's VAE, so the
chain's stages give the same student before or after it.
"""

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel
from omegaconf import OmegaConf

from tinysr.imageio import load_image, to_pil
from tinysr.latent_cache import paired_images
from tinysr.lattice import without_lattice
from tinysr.models import PatchAutoencoder
from tinysr.pipelines import TSDSRPipeline
from tinysr.pipelines.base import VAE_CLASSES, vae_decode, vae_downscale, vae_encode
from tinysr.weights import load_component

from ..common import final_dir, load_teacher, rebuilt, require, stage_pairs
from ..config import FINAL, ConfigError, standin_target
from ..losses import cell_step_excess, discriminator_step, image_losses, make_gan, perceptual_loss
from ..run import TrainingRun, stage_dir
from .vae import train_decoder

SCALING_BATCHES = 8
PCA_BATCHES = 32
# the eight flips and quarter turns of an image (N, C, H, W), the identity first
DIHEDRAL = [
    lambda x, k=k, flip=flip: torch.rot90(x.flip(-1) if flip else x, k, dims=(-2, -1)) for flip in (False, True) for k in range(4)
]


@torch.no_grad()
def run_prior(cfg, stage: str, resume: str | None = None):
    """Real-ESRGAN x4plus on every pair's LQ (whole crops, batched by size); pairs already written are skipped."""
    from tinysr.baselines import RealESRGANUpscaler
    from tinysr.device import pick_device

    out = stage_dir(cfg, stage) / FINAL
    out.mkdir(parents=True, exist_ok=True)
    todo: dict[tuple, list] = {}
    for name, lq_path, _ in paired_images(Path(cfg.data.pairs)):
        if not (out / name).is_file():
            lq = load_image(lq_path).rgb
            todo.setdefault(tuple(lq.shape), []).append((name, lq))
    if not todo:
        return out
    model = RealESRGANUpscaler(device=pick_device(None))
    batch_size = cfg.stages[stage].batch_size
    done = 0
    for items in todo.values():
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            x = torch.stack([lq for _, lq in chunk]).to(model.device).contiguous(memory_format=torch.channels_last)
            y = model.network(x).float().clamp(0, 1).cpu()
            for (name, _), image in zip(chunk, y):
                tmp = out / f".{name}.part.png"
                to_pil(image).save(tmp)
                os.replace(tmp, out / name)  # a killed run leaves no half-written target behind
            done += len(chunk)
        print(f"{stage}: {done} restorations written to {out}", flush=True)
    return out


class Reconstruction(torch.nn.Module):
    """One forward for reconstruction and KL (None without a posterior), so DDP sees the whole graph.

    An AutoencoderKL decodes its posterior mean, as every user of the VAE here does: decoding samples
    taught a short CPU run to blur; the KL term only keeps latents near N(0, 1).
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        if not isinstance(self.vae, AutoencoderKL):
            return self.vae(x), None
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean
        return self.vae.decode(z).sample, posterior.kl().mean() / z[0].numel()


@torch.no_grad()
def latent_scaling_factor(vae, data, run: TrainingRun) -> float:
    """1 / std of posterior means over a few batches: unit-variance latents, the SD3 convention."""
    z = torch.cat([vae_encode(vae, run.batch(data, -1 - i)["gt"]) for i in range(SCALING_BATCHES)])
    return float(1.0 / z.std())


def run_base_vae(cfg, stage: str, resume: str | None = None):
    run = TrainingRun(cfg, stage, resume)
    s = run.scfg
    torch.manual_seed(cfg.seed)
    vae_class = VAE_CLASSES[cfg.standins.vae_class]
    vae = vae_class(**OmegaConf.to_container(cfg.standins.vae)).to(memory_format=torch.channels_last)
    prior = standin_target(cfg) == "prior"
    data = stage_pairs(cfg, s, prior=prior)
    if isinstance(vae, PatchAutoencoder):  # a resumed run overwrites this with its checkpoint
        vae.fit_linear(torch.cat([run.batch(data, -1 - i)["gt"] for i in range(PCA_BATCHES)]))
    params = list(vae.parameters())
    opt, schedule = run.optimizer(params)
    model, opt, schedule = run.prepare(Reconstruction(vae), opt, schedule)
    lpips = perceptual_loss(s.perceptual).to(run.device) if s.w_lpips > 0 else None
    for step in run.steps():
        batch = run.batch(data, step)
        # clean photos, degraded inputs (the teacher's VAE encodes them at inference) and the teacher's targets
        x = torch.cat([batch["gt"], batch["lq_up"], *([batch["prior"]] if prior else [])]).contiguous(memory_format=torch.channels_last)
        with run.accelerator.accumulate(model):
            y, kl = model(x)
            l1 = F.l1_loss(y.float(), x.float())
            loss, logs = s.w_l1 * l1, {"l1": l1.item()}
            if kl is not None:
                loss, logs["kl"] = loss + s.w_kl * kl, kl.item()
            if lpips is not None:
                p = lpips(y.float(), x.float())
                loss, logs["lpips"] = loss + s.w_lpips * p, p.item()
            run.optimizer_step(loss, opt, params, schedule)
        run.log(step, loss=loss.item(), lr=schedule.get_last_lr()[0], **logs)
    run.finish()
    if run.is_main:
        vae = run.unwrap(model).vae.eval()
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, data, run))
        vae.save_pretrained(run.dir / FINAL / "vae")
    return run.dir / FINAL


class EncodedPairs(torch.utils.data.Dataset):
    """The pairs encoded once by the frozen VAE: "z_lq", "z_target" (unscaled) and, for image losses, "image".

    The teacher regresses latents for thousands of steps; decoding PNGs and encoding them again at
    every step cost more than the transformer itself.
    """

    @torch.no_grad()
    def __init__(self, pairs, vae, target: str, with_images: bool, device, dihedral: bool = False, chunk: int = 32):
        items = [pairs[i] for i in range(len(pairs))]
        views = DIHEDRAL if dihedral else DIHEDRAL[:1]
        self.tensors: dict[str, torch.Tensor] = {}
        for key, source in (("z_lq", "lq_up"), ("z_target", target)):
            images = [torch.stack([item[source] for item in items[i : i + chunk]]) for i in range(0, len(items), chunk)]
            # each view encoded on its own: the patch VAE's latents do not flip or turn with the image
            self.tensors[key] = torch.cat([vae_encode(vae, view(x).to(device)).cpu() for view in views for x in images])
        if with_images:
            images = torch.stack([item[target] for item in items])
            self.tensors["image"] = torch.cat([view(images) for view in views])

    def __len__(self) -> int:
        return len(self.tensors["z_lq"])

    def __getitem__(self, i: int) -> dict:
        return {key: t[i] for key, t in self.tensors.items()}


def fixed_condition(cfg, transformer) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's one "prompt": seeded random embeddings, fixed for training and inference alike."""
    g = torch.Generator().manual_seed(cfg.seed)
    c = transformer.config
    prompt = torch.randn(1, cfg.standins.prompt_tokens, c.joint_attention_dim, generator=g)
    pooled = torch.randn(1, c.pooled_projection_dim, generator=g)
    return prompt, pooled


def run_teacher(cfg, stage: str, resume: str | None = None):
    """demo-teacher from the identity; demo-teacher-tune from demo-teacher's output (its image terms are what change)."""
    run = TrainingRun(cfg, stage, resume)
    s = run.scfg
    tune = stage == "demo-teacher-tune"
    if tune:
        pipe = TSDSRPipeline.from_pretrained(require(final_dir(cfg, "demo-teacher"), "demo-teacher"), device=run.device)
        pipe.remove_token_pattern = cfg.remove_token_pattern
        transformer, vae = pipe.transformer, pipe.vae
    else:
        vae = load_component(require(final_dir(cfg, "demo-base-vae"), "demo-base-vae"), "vae", VAE_CLASSES, torch.float32)
        vae.to(run.device).eval().requires_grad_(False)
        torch.manual_seed(cfg.seed)
        transformer = SD3Transformer2DModel(**OmegaConf.to_container(cfg.standins.transformer))
        # start as the identity (z_lq - 0): training then only learns the restoration, as TSD-SR starts
        # from a model that already knows images rather than from noise
        torch.nn.init.zeros_(transformer.proj_out.weight)
        torch.nn.init.zeros_(transformer.proj_out.bias)
        prompt, pooled = fixed_condition(cfg, transformer)
        # the pipeline is the training graph too: its `predict` is what inference will run (then less its token
        # pattern when remove_token_pattern is set)
        pipe = TSDSRPipeline(transformer, vae, prompt, pooled, device=run.device, remove_token_pattern=cfg.remove_token_pattern)
    transformer.train().requires_grad_(True)  # the pipeline froze it for inference
    target = standin_target(cfg)
    with_images = s.w_lpips > 0 or s.w_gan > 0 or s.w_image_l1 > 0 or s.w_lattice_l1 > 0 or s.w_cell_steps > 0
    data = EncodedPairs(stage_pairs(cfg, s, prior=target == "prior"), vae, target, with_images, run.device, dihedral=s.dihedral)
    params = list(transformer.parameters())
    opt, schedule = run.optimizer(params)
    disc, disc_opt = make_gan(s, s.w_gan > 0)
    model, opt, schedule, disc, disc_opt = run.prepare(transformer, opt, schedule, disc, disc_opt)
    pipe.transformer = model
    lpips = perceptual_loss(s.perceptual).to(run.device) if s.w_lpips > 0 else None
    scale = vae.config.scaling_factor
    # the fine-tune's image terms judge the image inference makes, so it trains through the token-pattern removal
    # (the patch size read here: a DDP-wrapped transformer has no config)
    token_pattern = transformer.config.patch_size if tune and cfg.remove_token_pattern else 0
    for step in run.steps():
        batch = run.batch(data, step)
        z_lq, z_target = batch["z_lq"] * scale, batch["z_target"] * scale
        with run.accelerator.accumulate(model):
            eps = pipe.predict(z_lq)
            z = z_lq - (without_lattice(eps.float(), token_pattern).to(eps.dtype) if token_pattern else eps)
            l1 = F.l1_loss(z.float(), z_target.float())
            # the identity's L1 on the same batch: batches differ so much that l1 alone hides progress
            loss, logs = s.w_l1 * l1, {"l1": l1.item(), "identity_l1": F.l1_loss(z_lq, z_target).item()}
            if with_images:
                image = vae_decode(vae, z / scale)
                loss = loss + image_losses(image, batch["image"], s, lpips, disc, logs)
                if s.w_cell_steps > 0:
                    steps = cell_step_excess(image, batch["image"], vae_downscale(vae))
                    loss, logs["cell_steps"] = loss + s.w_cell_steps * steps, steps.item()
                if s.w_image_l1 > 0:
                    image_l1 = F.l1_loss(image.float(), batch["image"].float())
                    loss, logs["image_l1"] = loss + s.w_image_l1 * image_l1, image_l1.item()
            run.optimizer_step(loss, opt, params, schedule)
        if disc is not None:
            logs["gan_d"] = discriminator_step(run.accelerator, disc, disc_opt, batch["image"], image)
        run.log(step, loss=loss.item(), lr=schedule.get_last_lr()[0], **logs)
    run.finish()
    if run.is_main:
        pipe.transformer = run.unwrap(model).eval()
        pipe.save_pretrained(run.dir / FINAL)
    return run.dir / FINAL


def with_pixel_refiner(vae, channels: int, blocks: int) -> PatchAutoencoder:
    """The same PatchAutoencoder, its decoder followed by a new PixelRefiner (the identity until it trains) in
    place of any it had."""
    if not isinstance(vae, PatchAutoencoder):
        raise ConfigError(f"demo-teacher-decoder adds a pixel refiner to a teacher whose VAE is a PatchAutoencoder (this teacher's: {type(vae).__name__})")
    refined = rebuilt(vae, pixel_channels=channels, pixel_blocks=blocks)
    kept = {k: v for k, v in vae.state_dict().items() if not k.startswith("decoder.pixel.")}
    refined.load_state_dict({**refined.state_dict(), **kept})
    return refined


def run_teacher_decoder(cfg, stage: str, resume: str | None = None):
    """Reads the published teacher (`teacher`), as the chain's stages do, and writes it again with the refiner."""
    run = TrainingRun(cfg, stage, resume)
    s = run.scfg
    pipe = load_teacher(cfg, run.device)
    vae = with_pixel_refiner(pipe.vae, s.pixel_channels, s.pixel_blocks).to(run.device).eval().requires_grad_(False)
    vae.decoder.pixel.train().requires_grad_(True)
    target = standin_target(cfg)

    def synthesized(batch):  # the teacher's prediction as inference makes it, decoded up to the pixel refiner
        z = pipe.encode_latents(batch["lq_up"], vae_tile_size=None)
        return vae.decoder.synthesize((z - pipe.predict_tiled(z)) / vae.config.scaling_factor)

    def save(folder):
        pipe.vae = vae.eval()
        pipe.save_pretrained(folder)

    data = stage_pairs(cfg, s, prior=target == "prior")
    return train_decoder(run, vae.decoder.pixel, data, synthesized, save, vae_downscale(vae), target=target)
