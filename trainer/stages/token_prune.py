"""Teacher prompt-token pruning, the ablation of the paper's Table C.1.

Ranks the fixed prompt's tokens by the attention mass image tokens give them (all blocks, all
heads, a few calibration batches) and writes a TSD-SR folder that keeps the top `token_keep`
fraction, in their original order. Evaluate it like any model:
`python -m tinysr eval --model runs/NAME/token-prune/final --lr LR --gt HR --out OUT`.
"""

import json

import torch

from tinysr.pipelines import TSDSRPipeline
from tinysr.pipelines.base import vae_encode

from ..common import load_teacher, stage_pairs
from ..config import FINAL
from ..run import stage_dir


@torch.no_grad()
def prompt_token_importance(teacher: TSDSRPipeline, latents: list[torch.Tensor]) -> torch.Tensor:
    """Mean softmax attention that image queries put on each prompt key, over blocks, heads and images."""
    captured, hooks = {}, []
    blocks = teacher.transformer.transformer_blocks
    for i, block in enumerate(blocks):
        for name in ("to_q", "to_k", "add_k_proj"):
            hook = lambda module, args, out, key=(i, name): captured.__setitem__(key, out)
            hooks.append(getattr(block.attn, name).register_forward_hook(hook))
    tokens = teacher.prompt_embeds.shape[1]
    total, count = torch.zeros(tokens), 0
    try:
        for z in latents:
            teacher.predict(z)
            for i, block in enumerate(blocks):
                attn = block.attn
                q, k_img, k_txt = (captured[(i, n)] for n in ("to_q", "to_k", "add_k_proj"))
                b = q.shape[0]
                q, k_img, k_txt = (t.view(b, t.shape[1], attn.heads, -1).transpose(1, 2) for t in (q, k_img, k_txt))
                if attn.norm_q is not None:
                    q, k_img = attn.norm_q(q), attn.norm_k(k_img)
                if attn.norm_added_k is not None:
                    k_txt = attn.norm_added_k(k_txt)
                scores = q @ torch.cat([k_img, k_txt], dim=2).transpose(-1, -2) * q.shape[-1] ** -0.5
                mass = scores.float().softmax(-1)[..., k_img.shape[2] :]
                total += mass.mean(dim=(1, 2)).sum(0).cpu()
                count += b
    finally:
        for hook in hooks:
            hook.remove()
    return total / max(count, 1)


def run_token_prune(cfg, stage: str, resume: str | None = None):
    s = cfg.stages[stage]
    if not 0 < s.token_keep <= 1:
        raise ValueError(f"stages.{stage}.token_keep must be in (0, 1], got {s.token_keep}")
    from accelerate import PartialState

    teacher = load_teacher(cfg, PartialState().device)
    data = stage_pairs(cfg, s)
    scale = teacher.vae.config.scaling_factor
    latents = []
    for start in range(0, min(len(data), s.calibration_batches * s.batch_size), s.batch_size):
        items = [data[i] for i in range(start, min(start + s.batch_size, len(data)))]
        x = torch.stack([item["lq_up"] for item in items]).to(teacher.device)
        latents.append(vae_encode(teacher.vae, x) * scale)
    importance = prompt_token_importance(teacher, latents)
    n_keep = max(1, round(s.token_keep * len(importance)))
    keep = sorted(importance.topk(n_keep).indices.tolist())
    pruned = TSDSRPipeline(
        teacher.transformer, teacher.vae, teacher.prompt_embeds[:, keep].cpu(), teacher.pooled_embeds.cpu(),
        device="cpu", remove_token_pattern=teacher.remove_token_pattern,
    )
    out = stage_dir(cfg, stage) / FINAL
    pruned.save_pretrained(out)
    report = {"token_keep": s.token_keep, "kept_tokens": keep, "importance": importance.tolist()}
    (out / "token_importance.json").write_text(json.dumps(report) + "\n")
    return out
