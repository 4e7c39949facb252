"""The tiny VAE (paper A.2), trained in the teacher's latent space.

vae-encoder: MSE(E_tiny(x_LR), E_pre(x_LR)), unscaled SD3 latents.
vae-decoder: 3 LPIPS(D_tiny(E_pre(x)), x_HR) + 1 GAN, x = x_LR by default (Eq. A.2 as printed)
or x_HR with `decoder_input: hq`; a discriminator trains beside it. (Its loop also trains demo-teacher-decoder.)
decoder-tune (not the paper's; the demo's): the decoder again, on what it will decode, the frozen distill-2
student's latents as the exported pipeline makes them, to the photos (L1 + LPIPS + GAN as configured): a
decoder trained on clean teacher latents draws the student's soft latents soft.
The tiny VAE starts from E_pre's tensors where name and shape agree (trainer.common.new_tiny_vae).
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from tinysr.pipelines.base import vae_downscale, vae_encode

from ..common import load_distilled_student, load_pretrained_vae, load_teacher, load_tiny_vae, new_tiny_vae, rebuilt, stage_pairs
from ..config import FINAL
from ..losses import cell_step_excess, discriminator_step, image_losses, make_gan, perceptual_loss
from ..run import TrainingRun
from .distill import student_latents


def run_vae_encoder(cfg, stage: str, resume: str | None = None):
    run = TrainingRun(cfg, stage, resume)
    s = run.scfg
    teacher = load_teacher(cfg, run.device)
    e_pre = load_pretrained_vae(cfg, teacher)
    vae = new_tiny_vae(cfg, e_pre, teacher.vae.config.scaling_factor)
    vae.decoder.requires_grad_(False)
    data = stage_pairs(cfg, s)
    params = list(vae.encoder.parameters())
    opt, schedule = run.optimizer(params)
    encoder, opt, schedule = run.prepare(vae.encoder, opt, schedule)  # the trained half is what DDP wraps
    for step in run.steps():
        batch = run.batch(data, step)
        with torch.no_grad():
            target = vae_encode(e_pre, batch["lq_up"])
        with run.accelerator.accumulate(encoder):
            loss = F.mse_loss(encoder(batch["lq_up"]).float(), target.float())
            run.optimizer_step(loss, opt, params, schedule)
        run.log(step, loss=loss.item(), lr=schedule.get_last_lr()[0])
    run.finish()
    if run.is_main:
        vae.save_pretrained(run.dir / FINAL / "vae")
    return run.dir / FINAL


def train_decoder(run: TrainingRun, trained, data, decoder_input, save, cell: int, target: str = "gt") -> Path:
    """The loop the decoder stages share: `trained` (a decoder, or the part of one that trains) learns the batch's
    `target` images (LPIPS, GAN, L1 and, with `cell` the latent cell in px, cell steps as configured) from
    `decoder_input(batch)`, computed without gradients; then `save(folder)` on the main process."""
    s = run.scfg
    params = list(trained.parameters())
    opt, schedule = run.optimizer(params)
    disc, disc_opt = make_gan(s, s.w_gan > 0)
    model, opt, schedule, disc, disc_opt = run.prepare(trained, opt, schedule, disc, disc_opt)
    lpips = perceptual_loss(s.perceptual).to(run.device) if s.w_lpips > 0 else None
    for step in run.steps():
        batch = run.batch(data, step)
        with torch.no_grad():
            x = decoder_input(batch)
        with run.accelerator.accumulate(model):
            image = model(x)
            logs = {}
            loss = image_losses(image, batch[target], s, lpips, disc, logs)
            if s.w_l1 > 0:
                l1 = F.l1_loss(image.float(), batch[target].float())
                loss, logs["l1"] = loss + s.w_l1 * l1, l1.item()
            if s.w_cell_steps > 0:
                excess = cell_step_excess(image, batch[target], cell)
                loss, logs["cell_steps"] = loss + s.w_cell_steps * excess, excess.item()
            run.optimizer_step(loss, opt, params, schedule)
        if disc is not None:
            logs["gan_d"] = discriminator_step(run.accelerator, disc, disc_opt, batch[target], image)
        run.log(step, loss=loss.detach().item(), lr=schedule.get_last_lr()[0], **logs)
    run.finish()
    if run.is_main:
        save(run.dir / FINAL)
    return run.dir / FINAL


def saver(vae):
    """The tiny VAE's save, where stages write it: final/vae."""
    return lambda folder: vae.save_pretrained(folder / "vae")


def run_vae_decoder(cfg, stage: str, resume: str | None = None):
    run = TrainingRun(cfg, stage, resume)
    e_pre = load_pretrained_vae(cfg, load_teacher(cfg, run.device))
    vae = load_tiny_vae(cfg, "vae-encoder")
    vae.encoder.requires_grad_(False)
    source = "lq_up" if run.scfg.decoder_input == "lq" else "gt"
    return train_decoder(run, vae.decoder, stage_pairs(cfg, run.scfg), lambda batch: vae_encode(e_pre, batch[source]), saver(vae), vae_downscale(vae))


def switched_decoder(vae, s):
    """The tiny VAE with the stage's upsample_mode / padding_mode (parameter-free: the same tensors load)."""
    changes = {key: s[key] for key in ("upsample_mode", "padding_mode") if s[key] and s[key] != vae.config[key]}
    if not changes:
        return vae
    switched = rebuilt(vae, **changes)
    switched.load_state_dict(vae.state_dict())
    return switched


def run_decoder_tune(cfg, stage: str, resume: str | None = None):
    run = TrainingRun(cfg, stage, resume)
    vae = switched_decoder(load_tiny_vae(cfg, "vae-decoder"), run.scfg).to(run.device)
    vae.encoder.requires_grad_(False)
    student = load_distilled_student(cfg).to(run.device).eval().requires_grad_(False)

    def student_output(batch):  # the exported pipeline's latent path, unscaled for the decoder
        return student_latents(student, vae, batch["lq_up"], cfg.remove_token_pattern) / vae.config.scaling_factor

    return train_decoder(run, vae.decoder, stage_pairs(cfg, run.scfg), student_output, saver(vae), vae_downscale(vae))
