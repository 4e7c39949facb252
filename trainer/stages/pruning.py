"""Which SD3 blocks the student keeps (paper A.3, after TinyFusion), and the baselines of Table C.2.

prune-search      learnable masks + a LoRA on a copy of the teacher, Gumbel-sampled each step, with the
                  pair coupling ("dynamic block-wise activation") described in `BlockMaskSampler`.
prune-tinyfusion  the same search with independent groups (`couple_pairs: false`); it also exports its student.
prune-export      the student initialised from the search: kept blocks, LoRA merged, modulation folded.
prune-shortgpt    keep the blocks with the highest Block Influence (ShortGPT), and export that student.

A masked block contributes `h = m * block(h) + (1 - m) * h` on both the image and the text stream.
During the search the block is always computed, so the straight-through gradient reaches its mask;
a mask of exactly 0 that needs no gradient skips the block (inference, export checks).
"""

import copy
import itertools
import json

import torch
import torch.nn.functional as F
from peft import LoraConfig
from torch import nn

from tinysr.convert import tinysr_transformer_from_sd3
from tinysr.device import pick_device
from tinysr.pipelines.base import TIMESTEP, vae_encode

from ..common import TeacherLatents, final_dir, load_teacher, load_tiny_vae, require, stage_pairs
from ..config import FINAL
from ..losses import perceptual_loss
from ..run import TrainingRun, stage_dir

# the fork's train_prune.py (and TSD-SR's student): attention, text projections, patch embedding, adaLN, output
SEARCH_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "proj", "linear", "proj_out"]
PAIR_MOVES = ("keep", "first->second", "second->first")
DECISION = "decision.json"


# ----------------------------------------------------------------------------- masks


def candidate_masks(group_size: int = 4, keep: int = 2) -> torch.Tensor:
    """All C(group_size, keep) 0/1 masks, one per row, in `itertools.combinations` order.

    (4, 2): [1100], [1010], [1001], [0110], [0101], [0011].
    """
    rows = []
    for kept in itertools.combinations(range(group_size), keep):
        row = torch.zeros(group_size)
        row[list(kept)] = 1.0
        rows.append(row)
    return torch.stack(rows)


def hard_gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None):
    """One-hot sample over the last axis (straight-through) and its index.

    Same as `F.gumbel_softmax(logits, tau, hard=True)`, except that the noise comes from `generator`
    (CPU; so a resumed run samples what an uninterrupted one did) and that the forward value is
    exactly 0/1 (`hard + (soft - soft.detach())`).
    """
    gumbel = -torch.empty(logits.shape).exponential_(generator=generator).log()
    soft = torch.softmax((logits + gumbel.to(logits.device, logits.dtype)) / tau, dim=-1)
    index = soft.argmax(dim=-1)
    hard = F.one_hot(index, logits.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach()), index


class BlockMaskSampler(nn.Module):
    """Learnable block masks: per group of `group_size` blocks, logits over the `keep`-of-`group_size` masks.

    Uncoupled (TinyFusion): each group independently keeps exactly `keep` blocks.

    Coupled (`couple_pairs`, groups (0,1), (2,3), ...; an odd last group stays uncoupled): each pair
    also has 3 logits over the moves ("keep", "first->second", "second->first"). The exact rule:

    * each group g samples a candidate c_g (hard Gumbel, mask m_g = onehot_g @ candidates) as above;
    * its *alternative* a_g is the candidate with the highest logit among those sharing exactly
      keep-1 blocks with c_g (ties: the first in candidate order); it is a constant (no gradient);
    * the group that gives loses the block of m_g that a_g lacks: m_g * a_g (keep-1 active);
      the group that takes gains the block of a_g that m_g lacks: m_g + a_g - m_g * a_g (keep+1 active);
    * with the pair's hard Gumbel one-hot z over the moves (straight-through):
        first  = z0 * m_first  + z1 * (m_first * a_first)  + z2 * union(m_first, a_first)
        second = z0 * m_second + z1 * union(m_second, a_second) + z2 * (m_second * a_second)

    So each pair keeps exactly 2 * keep blocks and each group keeps keep-1 .. keep+1 (1..3 for 2 of 4).
    Gradients reach the group logits through m_g and the pair logits through z. Both use the logits
    times `logit_scale`. All forward values are exactly 0 or 1.
    """

    def __init__(self, num_blocks: int, group_size: int = 4, keep: int = 2, couple_pairs: bool = True):
        super().__init__()
        if group_size < 1 or num_blocks % group_size:
            raise ValueError(f"{num_blocks} blocks do not split into groups of {group_size}")
        if not 1 <= keep <= group_size:
            raise ValueError(f"keep_per_group must be in [1, {group_size}], got {keep}")
        self.num_blocks, self.group_size, self.keep = num_blocks, group_size, keep
        self.num_groups = num_blocks // group_size
        self.num_pairs = self.num_groups // 2 if couple_pairs else 0
        if self.num_pairs and keep == group_size:
            raise ValueError("pair coupling needs keep_per_group < group_size (nothing to move otherwise)")
        cands = candidate_masks(group_size, keep)
        self.register_buffer("candidates", cands, persistent=False)
        # alternatives[i, j]: candidate j shares exactly keep-1 blocks with candidate i
        self.register_buffer("alternatives", (cands @ cands.T) == keep - 1, persistent=False)
        self.group_logits = nn.Parameter(torch.zeros(self.num_groups, len(cands)))
        self.pair_logits = nn.Parameter(torch.zeros(self.num_pairs, len(PAIR_MOVES)))
        # the decision's logits: an EMA of the trained ones (TinyFusion, the fork: decay 0.999), or a copy
        self.register_buffer("ema_group_logits", torch.zeros_like(self.group_logits))
        self.register_buffer("ema_pair_logits", torch.zeros_like(self.pair_logits))

    @property
    def couple_pairs(self) -> bool:
        return self.num_pairs > 0

    def _alternative(self, logits: torch.Tensor, group: int, index: int) -> torch.Tensor:
        scores = logits[group].detach().masked_fill(~self.alternatives[index], float("-inf"))
        return self.candidates[int(scores.argmax())]

    def _couple(self, masks: list, indices: list, moves: torch.Tensor, logits: torch.Tensor) -> list:
        """Apply per-pair move weights (one-hot rows, maybe straight-through) to the group masks."""
        masks = list(masks)
        for p in range(self.num_pairs):
            a, b = 2 * p, 2 * p + 1
            ma, mb = masks[a], masks[b]
            alt_a, alt_b = self._alternative(logits, a, int(indices[a])), self._alternative(logits, b, int(indices[b]))
            z = moves[p]
            masks[a] = z[0] * ma + z[1] * (ma * alt_a) + z[2] * (ma + alt_a - ma * alt_a)
            masks[b] = z[0] * mb + z[1] * (mb + alt_b - mb * alt_b) + z[2] * (mb * alt_b)
        return masks

    def sample(self, tau: float, logit_scale: float = 100.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """A (num_blocks,) 0/1 mask with straight-through gradients to both sets of logits."""
        onehot, indices = hard_gumbel_softmax(self.group_logits * logit_scale, tau, generator)
        masks = list(onehot @ self.candidates)
        if self.num_pairs:
            moves, _ = hard_gumbel_softmax(self.pair_logits * logit_scale, tau, generator)
            masks = self._couple(masks, indices.tolist(), moves, self.group_logits)
        return torch.cat(masks)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """After each optimizer step; decay 0 makes the decision follow the trained logits exactly."""
        for ema, live in ((self.ema_group_logits, self.group_logits), (self.ema_pair_logits, self.pair_logits)):
            ema.mul_(decay).add_(live.detach(), alpha=1 - decay)

    @torch.no_grad()
    def decision_mask(self) -> torch.Tensor:
        """The arg-max of the EMA logits: per group the most likely candidate, per pair the most likely move applied."""
        indices = self.ema_group_logits.argmax(dim=-1)
        masks = list(self.candidates[indices])
        if self.num_pairs:
            moves = F.one_hot(self.ema_pair_logits.argmax(dim=-1), len(PAIR_MOVES)).to(self.candidates.dtype)
            masks = self._couple(masks, indices.tolist(), moves, self.ema_group_logits)
        return torch.cat(masks)

    def kept_blocks(self) -> list[int]:
        return [i for i, m in enumerate(self.decision_mask().tolist()) if m > 0.5]

    @torch.no_grad()
    def probabilities(self, logit_scale: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Of the decision's (EMA) logits."""
        return torch.softmax(self.ema_group_logits * logit_scale, -1), torch.softmax(self.ema_pair_logits * logit_scale, -1)

    def decision(self, logit_scale: float = 100.0) -> dict:
        groups, pairs = self.probabilities(logit_scale)
        return {
            "kept_blocks": self.kept_blocks(),
            "num_blocks": self.num_blocks,
            "group_size": self.group_size,
            "keep_per_group": self.keep,
            "couple_pairs": self.couple_pairs,
            "candidates": self.candidates.int().tolist(),
            "group_probabilities": groups.tolist(),
            "pair_moves": list(PAIR_MOVES),
            "pair_probabilities": pairs.tolist(),
        }


# ----------------------------------------------------------------------------- masked SD3


def masked_sd3_forward(sd3, hidden_states, encoder_hidden_states, pooled_projections, timestep, mask=None, observer=None):
    """SD3Transformer2DModel.forward (diffusers), block by block, with block i scaled by mask[i].

    `h = m * block(h) + (1 - m) * h` for the image and the text stream (the last block,
    `context_pre_only`, returns no text stream: that stream is left as it was, it is not used
    afterwards). `mask=None` is all ones. A mask entry of exactly 0 that needs no gradient skips
    the block. `observer(i, h_in, h_out)` sees every computed block's image stream (ShortGPT).
    Returns the `sample` tensor.
    """
    height, width = hidden_states.shape[-2:]
    h = sd3.pos_embed(hidden_states).contiguous()
    temb = sd3.time_text_embed(timestep, pooled_projections)
    enc = sd3.context_embedder(encoder_hidden_states)
    if mask is not None:
        mask = torch.as_tensor(mask, device=h.device)
        if len(mask) != len(sd3.transformer_blocks):
            raise ValueError(f"mask has {len(mask)} entries for {len(sd3.transformer_blocks)} blocks")
    for i, block in enumerate(sd3.transformer_blocks):
        m = None if mask is None else mask[i]
        if m is not None and not m.requires_grad and float(m) == 0.0:
            continue
        enc_out, h_out = block(hidden_states=h, encoder_hidden_states=enc, temb=temb)
        if observer is not None:
            observer(i, h, h_out)
        if m is None:
            h, enc = h_out, enc if enc_out is None else enc_out
        else:
            h = m * h_out + (1 - m) * h
            enc = enc if enc_out is None else m * enc_out + (1 - m) * enc
    h = sd3.proj_out(sd3.norm_out(h, temb))
    p, c = sd3.config.patch_size, sd3.out_channels
    h = h.reshape(h.shape[0], height // p, width // p, p, p, c)
    h = torch.einsum("nhwpqc->nchpwq", h)
    return h.reshape(h.shape[0], c, height // p * p, width // p * p)


class MaskedSD3(nn.Module):
    """The searched model: an SD3 transformer (with its LoRA) and the mask logits, as one module.

    One module so accelerate prepares, wraps and checkpoints both; the mask is sampled inside
    `forward` so every trainable parameter is used in it.
    """

    def __init__(self, sd3, sampler: BlockMaskSampler):
        super().__init__()
        self.model, self.masks = sd3, sampler

    def forward(self, latents, prompt_embeds, pooled, tau: float, logit_scale: float, generator=None, timestep: float = TIMESTEP):
        b = latents.shape[0]
        mask = self.masks.sample(tau, logit_scale, generator)
        eps = masked_sd3_forward(
            self.model, latents, prompt_embeds.expand(b, -1, -1), pooled.expand(b, -1),
            torch.full((b,), timestep, device=latents.device, dtype=latents.dtype), mask,
        )
        return eps, mask


def temperature(step: int, steps: int, start: float, end: float) -> float:
    """Linear from `start` at step 1 to `end` at the last step."""
    return start + (end - start) * (step - 1) / max(steps - 1, 1)


# ----------------------------------------------------------------------------- shared helpers


def add_search_lora(sd3, rank: int, targets: list[str] = ()):
    sd3.requires_grad_(False)
    sd3.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets) or SEARCH_LORA_TARGETS))
    return sd3


def load_search_lora(sd3, folder) -> None:
    """The LoRA `save_lora_adapter` wrote (unprefixed keys, its config in the metadata)."""
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

    sd3.load_lora_adapter(str(folder), prefix=None, weight_name=LORA_WEIGHT_NAME_SAFE)


def export_student(sd3, pooled, decision: dict, out) -> None:
    """`out/transformer` (a TinySRTransformer of the kept blocks, LoRA merged) and `out/decision.json`."""
    n = len(sd3.transformer_blocks)
    if decision["num_blocks"] != n:
        raise ValueError(f"the decision is for {decision['num_blocks']} blocks, the teacher has {n}")
    student = tinysr_transformer_from_sd3(sd3, pooled, decision["kept_blocks"])
    student.save_pretrained(out / "transformer")
    (out / DECISION).write_text(json.dumps(decision, indent=2) + "\n")


# ----------------------------------------------------------------------------- stages


def run_prune_search(cfg, stage: str, resume: str | None = None):
    """prune-search / prune-tinyfusion: Eq. A.3 with the mask logits and a LoRA trained jointly."""
    run = TrainingRun(cfg, stage, resume)
    s = run.scfg
    teacher = load_teacher(cfg, run.device)
    z_teacher = TeacherLatents(cfg, teacher)
    tiny_vae = load_tiny_vae(cfg, teacher=teacher).to(run.device).eval().requires_grad_(False)
    sf = tiny_vae.config.scaling_factor
    sd3 = add_search_lora(copy.deepcopy(teacher.transformer), s.lora_rank, s.lora_targets)
    sampler = BlockMaskSampler(len(sd3.transformer_blocks), s.group_size, s.keep_per_group, s.couple_pairs)
    search = MaskedSD3(sd3, sampler).to(run.device).train()
    data = stage_pairs(cfg, s)
    lora_params = [p for p in sd3.parameters() if p.requires_grad]
    opt, schedule = run.optimizer(lora_params + list(sampler.parameters()))
    search, opt, schedule = run.prepare(search, opt, schedule)
    lpips = perceptual_loss(s.perceptual).to(run.device) if s.w_lpips > 0 else None
    prompt, pooled = teacher.prompt_embeds, teacher.pooled_embeds
    masks = run.unwrap(search).masks
    last = None

    for step in run.steps():
        batch = run.batch(data, step)
        target = z_teacher(batch)
        tau = temperature(step, s.steps, s.temperature_start, s.temperature_end)
        with run.accelerator.accumulate(search):
            z = vae_encode(tiny_vae, batch["lq_up"]) * sf
            eps, _ = search(z, prompt, pooled, tau, s.logit_scale, run.generator(step, salt=1))
            z_stu = z - eps
            l1 = F.l1_loss(z_stu.float(), target.float())
            loss, logs = s.w_l1 * l1, {"l1": l1.item()}
            if lpips is not None:
                p = lpips(tiny_vae.decode(z_stu / sf).float(), batch["gt"].float())
                loss, logs["lpips"] = loss + s.w_lpips * p, p.item()
            run.optimizer_step(loss, opt, lora_params, schedule)  # the logits are not clipped
        if run.accelerator.sync_gradients:
            masks.update_ema(s.ema_decay)
        kept = masks.kept_blocks()
        if kept != last:
            run.accelerator.print(f"[{stage}] step {step}: kept blocks {kept}")
            last = kept
        # the arg-max decision as one number: bit i set <=> block i kept
        run.log(step, loss=loss.item(), temperature=tau, kept_bits=sum(1 << i for i in kept), **logs)
    run.finish()

    out = run.dir / FINAL
    if run.is_main:
        model = run.unwrap(search)
        decision = {**model.masks.decision(s.logit_scale), "stage": stage}
        out.mkdir(parents=True, exist_ok=True)
        model.model.save_lora_adapter(out / "lora")
        (out / DECISION).write_text(json.dumps(decision, indent=2) + "\n")
        if stage == "prune-tinyfusion":  # a baseline: no separate export stage; its LoRA kept only if asked, as prune-export
            source = model.model if s.keep_search_lora else teacher.transformer
            export_student(source, pooled, {**decision, "search_lora_kept": s.keep_search_lora}, out)
    run.accelerator.wait_for_everyone()
    return out


def run_prune_export(cfg, stage: str = "prune-export", resume: str | None = None):
    """The student from prune-search's decision: the teacher's kept blocks, modulation folded.

    The search LoRA is dropped unless `keep_search_lora`: the release's prune_merge.py copies the
    teacher's plain weights, and TinyFusion discards its LoRA after the search the same way.
    """
    source = final_dir(cfg, "prune-search")
    decision = json.loads(require(source / DECISION, "prune-search").read_text())
    out = stage_dir(cfg, stage) / FINAL
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(cfg, pick_device())
    sd3 = teacher.transformer
    keep_lora = cfg.stages[stage].keep_search_lora and (source / "lora").is_dir()
    if keep_lora:
        load_search_lora(sd3, source / "lora")
    export_student(sd3, teacher.pooled_embeds, {**decision, "source": str(source), "search_lora_kept": keep_lora}, out)
    return out


@torch.no_grad()
def block_influence(sd3, latents, prompt_embeds, pooled, timestep: float = TIMESTEP) -> torch.Tensor:
    """ShortGPT's BI_i = 1 - mean cosine(input_i, output_i) of block i's image stream.

    The mean is over every token of every latent batch in `latents` (an iterable of (B, C, H, W)).
    """
    n = len(sd3.transformer_blocks)
    sums, count = torch.zeros(n, dtype=torch.float64), [0] * n

    def observe(i, h_in, h_out):
        cos = F.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
        sums[i] += cos.sum().cpu()
        count[i] += cos.numel()

    for z in latents:
        b = z.shape[0]
        t = torch.full((b,), timestep, device=z.device, dtype=z.dtype)
        masked_sd3_forward(sd3, z, prompt_embeds.expand(b, -1, -1), pooled.expand(b, -1), t, observer=observe)
    return (1 - sums / torch.tensor(count, dtype=torch.float64)).float()


def shortgpt_keep(bi: torch.Tensor, num_keep: int) -> list[int]:
    """The `num_keep` blocks of highest influence, in order (ties: the earlier block is kept)."""
    order = sorted(range(len(bi)), key=lambda i: (-float(bi[i]), i))
    return sorted(order[:num_keep])


def run_prune_shortgpt(cfg, stage: str = "prune-shortgpt", resume: str | None = None):
    """ShortGPT baseline: drop the lowest-BI blocks (globally) to keep keep_per_group/group_size of them."""
    s = cfg.stages[stage]
    out = stage_dir(cfg, stage) / FINAL
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device()
    teacher = load_teacher(cfg, device)
    sd3, vae = teacher.transformer, teacher.vae
    data = stage_pairs(cfg, s)

    def calibration():  # the first calibration_batches * batch_size pairs, wrapping around
        for k in range(s.calibration_batches):
            idx = [(k * s.batch_size + j) % len(data) for j in range(s.batch_size)]
            x = torch.stack([data[i]["lq_up"] for i in idx]).to(device)
            yield vae_encode(vae, x) * vae.config.scaling_factor

    bi = block_influence(sd3, calibration(), teacher.prompt_embeds, teacher.pooled_embeds)
    n = len(bi)
    num_keep = max(1, round(n * s.keep_per_group / s.group_size))
    decision = {
        "stage": stage,
        "kept_blocks": shortgpt_keep(bi, num_keep),
        "num_blocks": n,
        "block_influence": bi.tolist(),
        "calibration_images": s.calibration_batches * s.batch_size,
    }
    export_student(sd3, teacher.pooled_embeds, decision, out)
    return out


STAGES = {
    "prune-search": run_prune_search,
    "prune-tinyfusion": run_prune_search,
    "prune-export": run_prune_export,
    "prune-shortgpt": run_prune_shortgpt,
}
