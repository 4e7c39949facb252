"""Restoration training of the pruned student (paper A.4), two stages.

distill-1: L1 between student and teacher one-step outputs in latent space.
distill-2: 5 L1 + 1 LPIPS(D_tiny(z_stu), x_HR) + 0.3 GAN, with a discriminator trained beside it.
The student trains LoRA adapters (rank 64 in the paper); the tiny VAE stays frozen.
"""

import torch
import torch.nn.functional as F
from peft import LoraConfig

from tinysr.models import TinySRTransformer
from tinysr.pipelines.base import vae_encode

from ..common import FINAL, TeacherLatents, final_dir, load_teacher, load_tiny_vae, require, stage_pairs
from ..losses import discriminator_step, image_losses, make_gan, perceptual_loss
from ..run import TrainingRun

STUDENT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def load_student(cfg, source_stage: str, lora_rank: int) -> TinySRTransformer:
    """The student from the previous stage with its LoRA merged, plus a fresh LoRA to train (rank 0: full)."""
    student = TinySRTransformer.from_pretrained(require(final_dir(cfg, source_stage) / "transformer", source_stage))
    if lora_rank > 0:
        student.requires_grad_(False)
        student.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=STUDENT_LORA_TARGETS))
    return student


def student_latents(student, tiny_vae, lq_up):
    """z_stu = E_tiny(x) - eps_stu(E_tiny(x)), in the teacher's scaled latent space."""
    z = vae_encode(tiny_vae, lq_up) * tiny_vae.config.scaling_factor
    return z - student(z)


def save_student(run: TrainingRun, student) -> None:
    """Merged weights for the next stage, and the LoRA alone for inspection."""
    if not run.is_main:
        return
    model = run.unwrap(student)
    out = run.dir / FINAL
    if getattr(model, "peft_config", None):
        model.save_lora_adapter(out / "lora")
        from tinysr.weights import merge_lora

        merge_lora(model)
    model.save_pretrained(out / "transformer")


def run_distill(cfg, stage: str, resume: str | None = None):
    run = TrainingRun(cfg, stage, resume)
    s = run.scfg
    source = "prune-export" if stage == "distill-1" else "distill-1"
    teacher = load_teacher(cfg, run.device)
    z_teacher = TeacherLatents(cfg, teacher)
    tiny_vae = load_tiny_vae(cfg).to(run.device).eval().requires_grad_(False)
    student = load_student(cfg, source, s.lora_rank)
    data = stage_pairs(cfg, s)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    disc, disc_opt = make_gan(s, stage == "distill-2" and s.w_gan > 0)
    student, opt, disc, disc_opt = run.prepare(student, opt, disc, disc_opt)
    lpips = perceptual_loss(s.perceptual).to(run.device) if stage == "distill-2" and s.w_lpips > 0 else None
    w_l1 = s.w_l1 or 1.0

    for step in run.steps():
        batch = run.batch(data, step)
        target = z_teacher(batch)
        with run.accelerator.accumulate(student):
            z = student_latents(student, tiny_vae, batch["lq_up"])
            l1 = F.l1_loss(z.float(), target.float())
            loss, logs = w_l1 * l1, {"l1": l1.item()}
            if stage == "distill-2":
                image = tiny_vae.decode(z / tiny_vae.config.scaling_factor)
                loss = loss + image_losses(image, batch["gt"], s, lpips, disc, logs)
            run.optimizer_step(loss, opt, params)
        if disc is not None:
            logs["gan_d"] = discriminator_step(run.accelerator, disc, disc_opt, batch["gt"], image)
        run.log(step, loss=loss.item(), lr=opt.param_groups[0]["lr"], **logs)
    run.finish()
    save_student(run, student)
    return run.dir / FINAL
