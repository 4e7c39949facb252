"""Turn an SD3 transformer (TSD-SR, or a pruned copy) into a condition-free TinySRTransformer.

With a fixed timestep and pooled prompt, SD3's adaLN modulations are constants: we evaluate
them once here (`fold_modulation`) and drop the text stream and every embedder.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel

from .models import TinySRTransformer


def effective_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weight and bias of a Linear/Conv2d with any active, unmerged LoRA adapters added in."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(module, BaseTunerLayer):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    base = module.get_base_layer()
    weight = base.weight.detach().clone()
    if not module.merged:
        for name in module.active_adapters:
            if name in module.lora_A:
                weight += module.get_delta_weight(name).to(weight.dtype)
    out = {"weight": weight}
    if base.bias is not None:
        out["bias"] = base.bias.detach().clone()
    return out


@torch.no_grad()
def fold_modulation(sd3: SD3Transformer2DModel, pooled_projections: torch.Tensor, timestep: float):
    """The constant (6, dim) modulation of every SD3 block and the (2, dim) final scale/shift."""
    param = next(sd3.parameters())
    pooled = pooled_projections.reshape(1, -1).to(param.device, param.dtype)
    t = torch.tensor([timestep], device=param.device, dtype=param.dtype)
    temb = F.silu(sd3.time_text_embed(t, pooled))
    blocks = [block.norm1.linear(temb).reshape(6, -1) for block in sd3.transformer_blocks]
    final = sd3.norm_out.linear(temb).reshape(2, -1)
    return blocks, final


@torch.no_grad()
def tinysr_transformer_from_sd3(
    sd3: SD3Transformer2DModel,
    pooled_projections: torch.Tensor,
    keep_blocks: Sequence[int] | None = None,
    timestep: float = 1000.0,
) -> TinySRTransformer:
    """Keep `keep_blocks` (in order), fold the modulation, drop text and timestep components.

    Accepts a model with unmerged LoRA adapters (they are merged into the copied weights);
    the input model is not modified.
    """
    cfg = sd3.config
    if getattr(cfg, "dual_attention_layers", ()):
        raise ValueError("SD3.5 dual-attention blocks are not supported by TinySRTransformer")
    n = len(sd3.transformer_blocks)
    keep = list(range(n)) if keep_blocks is None else [int(i) for i in keep_blocks]
    if not keep or any(i < 0 or i >= n for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"keep_blocks must be distinct indices in [0, {n}), got {keep}")

    student = TinySRTransformer(
        sample_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels or cfg.in_channels,
        num_layers=len(keep),
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        pos_embed_max_size=cfg.pos_embed_max_size,
        qk_norm=cfg.qk_norm,
    )
    block_mods, final_mod = fold_modulation(sd3, pooled_projections, timestep)

    state = {"norm_out_modulation": final_mod}
    for name in ("pos_embed.proj", "proj_out"):
        for k, v in effective_weights(sd3.get_submodule(name)).items():
            state[f"{name}.{k}"] = v
    layers = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"]
    if cfg.qk_norm:
        layers += ["attn.norm_q", "attn.norm_k"]
    for new, old in enumerate(keep):
        block = sd3.transformer_blocks[old]
        state[f"transformer_blocks.{new}.modulation"] = block_mods[old]
        for name in layers:
            for k, v in effective_weights(block.get_submodule(name)).items():
                state[f"transformer_blocks.{new}.{name}.{k}"] = v
    state["pos_embed.pos_embed"] = student.pos_embed.pos_embed
    student.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return student if sd3.dtype == torch.float32 else student.to(sd3.dtype)
