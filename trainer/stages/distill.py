"""Restoration training of the pruned student (paper A.4), two stages.

distill-1: L1 between student and teacher one-step outputs in latent space.
distill-2: 5 L1 + 1 LPIPS(D_tiny(z_stu), x_HR) + 0.3 GAN, with a discriminator trained beside it.
With `teacher_lattice_period` both compare with the teacher's latents less their mean pattern of that
period (the demo teacher's 8-px token grid on smooth areas, which the student otherwise learns).
The student trains LoRA adapters (rank 64 in the paper) on the release's target list and its folded
modulation vectors; the tiny VAE stays frozen.
"""

import warnings

import torch.nn.functional as F
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from tinysr.lattice import without_lattice
from tinysr.models import TinySRTransformer
from tinysr.pipelines.base import vae_encode

from ..common import TeacherLatents, final_dir, load_teacher, load_tiny_vae, require, stage_pairs
from ..config import FINAL
from ..losses import discriminator_step, image_losses, make_gan, perceptual_loss
from ..run import TrainingRun

# the release's LoRA targets (test_tinysr.py); on our tree "proj" is the patch embedding and ff.net.0.proj, and
# the adaLN linears ("linear", "linear_1", "linear_2") are folded into the blocks' modulation vectors instead
STUDENT_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj", "linear", "linear_1", "linear_2", "net.2"]
FULL_PARAMS = "full_params.safetensors"


def load_student(cfg, stage: str, s) -> TinySRTransformer:
    """The student to train: its base, then a LoRA (fresh, or distill-1's to continue) unless lora_rank is 0.

    distill-1 starts from prune-export; distill-2 from distill-1, merged, or, with `continue_lora`, from
    prune-export plus what distill-1 trained (its LoRA and its full-rank parameters) kept apart.
    """
    previous = "prune-export" if stage == "distill-1" else "distill-1"
    continues = stage == "distill-2" and s.continue_lora and s.lora_rank > 0
    source = "prune-export" if continues else previous
    student = TinySRTransformer.from_pretrained(require(final_dir(cfg, source) / "transformer", source))
    if s.lora_rank == 0:
        return student
    student.requires_grad_(False)
    if continues:
        lora = require(final_dir(cfg, previous) / "lora", f"{previous} (with lora_rank > 0)")
        unexpected = student.load_state_dict(load_file(final_dir(cfg, previous) / FULL_PARAMS), strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{final_dir(cfg, previous) / FULL_PARAMS} does not fit the student: {unexpected[:3]}")
        student.load_lora_adapter(str(lora), prefix=None, weight_name=LORA_WEIGHT_NAME_SAFE, adapter_name="default")
        rank = student.peft_config["default"].r
        if rank != s.lora_rank or s.lora_targets:
            warnings.warn(f"continue_lora: {stage} trains {previous}'s LoRA (rank {rank}, its targets); its own lora_rank/lora_targets are not used", stacklevel=2)
    else:
        targets = list(s.lora_targets) or STUDENT_LORA_TARGETS
        student.add_adapter(LoraConfig(r=s.lora_rank, lora_alpha=s.lora_rank, init_lora_weights="gaussian", target_modules=targets))
    for name, param in student.named_parameters():
        if "lora_" in name or (s.train_modulation and name.endswith("modulation")):
            param.requires_grad_(True)
    return student


def student_latents(student, tiny_vae, lq_up, remove_token_pattern: bool = False):
    """z_stu = E_tiny(x) - eps_stu(E_tiny(x)), in the teacher's scaled latent space; with `remove_token_pattern`, eps
    less its per-image token pattern, as the exported pipeline predicts (OneStepSRPipeline.without_token_pattern)."""
    z = vae_encode(tiny_vae, lq_up) * tiny_vae.config.scaling_factor
    eps = student(z)
    if remove_token_pattern:
        eps = without_lattice(eps.float(), student.config.patch_size)
    return z - eps


def save_student(run: TrainingRun, student) -> None:
    """Merged weights for the next stage; the LoRA and the full-rank trained parameters apart, to continue from."""
    if not run.is_main:
        return
    model = run.unwrap(student)
    out = run.dir / FINAL
    if getattr(model, "peft_config", None):
        model.save_lora_adapter(out / "lora")
        full = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
        save_file(full, out / FULL_PARAMS)
        from tinysr.weights import merge_lora

        merge_lora(model)
    model.save_pretrained(out / "transformer")


def run_distill(cfg, stage: str, resume: str | None = None):
    run = TrainingRun(cfg, stage, resume)
    s = run.scfg
    teacher = load_teacher(cfg, run.device)
    z_teacher = TeacherLatents(cfg, teacher)
    tiny_vae = load_tiny_vae(cfg, teacher=teacher).to(run.device).eval().requires_grad_(False)
    student = load_student(cfg, stage, s)
    data = stage_pairs(cfg, s)
    params = [p for p in student.parameters() if p.requires_grad]
    # weight decay pulls the LoRA towards the base weights; on the modulation vectors it would pull towards no modulation
    undecayed = {n for n, p in student.named_parameters() if p.requires_grad and n.endswith("modulation") and s.lora_rank > 0}
    opt, schedule = run.optimizer(
        [p for n, p in student.named_parameters() if p.requires_grad and n not in undecayed],
        no_decay=[p for n, p in student.named_parameters() if n in undecayed],
    )
    disc, disc_opt = make_gan(s, stage == "distill-2" and s.w_gan > 0)
    student, opt, schedule, disc, disc_opt = run.prepare(student, opt, schedule, disc, disc_opt)
    lpips = perceptual_loss(s.perceptual).to(run.device) if stage == "distill-2" and s.w_lpips > 0 else None
    w_l1 = s.w_l1 or 1.0

    for step in run.steps():
        batch = run.batch(data, step)
        target = z_teacher(batch)
        if s.teacher_lattice_period:  # not the teacher's grid
            target = without_lattice(target, s.teacher_lattice_period)
        with run.accelerator.accumulate(student):
            z = student_latents(student, tiny_vae, batch["lq_up"])
            l1 = F.l1_loss(z.float(), target.float())
            loss, logs = w_l1 * l1, {"l1": l1.item()}
            if stage == "distill-2":
                image = tiny_vae.decode(z / tiny_vae.config.scaling_factor)
                loss = loss + image_losses(image, batch["gt"], s, lpips, disc, logs)
            run.optimizer_step(loss, opt, params, schedule)
        if disc is not None:
            logs["gan_d"] = discriminator_step(run.accelerator, disc, disc_opt, batch["gt"], image)
        run.log(step, loss=loss.item(), lr=schedule.get_last_lr()[0], **logs)
    run.finish()
    save_student(run, student)
    return run.dir / FINAL
