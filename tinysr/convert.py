"""Turn an SD3 transformer (TSD-SR, or a pruned copy) into a condition-free TinySRTransformer.

With a fixed timestep and pooled prompt, SD3's adaLN modulations are constants: we evaluate
them once here (`fold_modulation`) and drop the text stream and every embedder.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings

from .errors import require
from .models import TinySRTransformer


def effective_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weight and bias of a Linear/Conv2d with any active, unmerged LoRA adapters added in."""
    if not isinstance(module, require("peft.tuners.tuners_utils").BaseTunerLayer):
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
def modulation_input(time_text_embed: torch.nn.Module, pooled_projections: torch.Tensor, timestep: float) -> torch.Tensor:
    """SiLU of SD3's timestep + pooled-prompt embedding: the input of every adaLN linear, constant here."""
    param = next(time_text_embed.parameters())
    pooled = pooled_projections.reshape(1, -1).to(param.device, param.dtype)
    t = torch.tensor([timestep], device=param.device, dtype=param.dtype)
    return F.silu(time_text_embed(t, pooled))


@torch.no_grad()
def fold_modulation(sd3: SD3Transformer2DModel, pooled_projections: torch.Tensor, timestep: float):
    """The constant (6, dim) modulation of every SD3 block and the (2, dim) final scale/shift."""
    temb = modulation_input(sd3.time_text_embed, pooled_projections, timestep)
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


@torch.no_grad()
def tinysr_transformer_from_release(
    state: dict[str, torch.Tensor], config: dict, pooled_projections: torch.Tensor, pos_embed_max_size: int, timestep: float = 1000.0
) -> TinySRTransformer:
    """The official TinySD3 tree (LoRA already merged into `state`) -> TinySRTransformer, modulation folded.

    What the release computes on its first forward (timestep + pooled-prompt embedding, every
    adaLN linear) is evaluated here once; the stored position table is kept as it is.
    """
    dim, in_channels, p, _ = state["pos_embed.proj.weight"].shape
    heads, head_dim = config.get("num_attention_heads", 18), config.get("attention_head_dim", 64)
    if heads * head_dim != dim or p != config.get("patch_size", 2):
        raise ValueError(f"config gives {heads} heads of {head_dim} and patch {config.get('patch_size', 2)}; the weights have width {dim}, patch {p}")
    n = len({k.split(".")[1] for k in state if k.startswith("transformer_blocks.")})
    time_text_embed = CombinedTimestepTextProjEmbeddings(embedding_dim=dim, pooled_projection_dim=pooled_projections.numel())
    time_text_embed.load_state_dict({k[len("time_text_embed.") :]: v for k, v in state.items() if k.startswith("time_text_embed.")})
    temb = modulation_input(time_text_embed, pooled_projections.float(), timestep)

    student = TinySRTransformer(
        sample_size=config.get("sample_size", 128),
        patch_size=p,
        in_channels=in_channels,
        out_channels=state["proj_out.weight"].shape[0] // (p * p),
        num_layers=n,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        pos_embed_max_size=pos_embed_max_size,
    )
    ours = {
        "norm_out_modulation": F.linear(temb, state["norm_out.linear.weight"], state["norm_out.linear.bias"]).reshape(2, -1),
        **{k: state[k] for k in ("pos_embed.proj.weight", "pos_embed.proj.bias", "pos_embed.pos_embed", "proj_out.weight", "proj_out.bias")},
    }
    layers = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"]
    for i in range(n):
        block = f"transformer_blocks.{i}."
        linear = (state[block + "norm1.linear.weight"], state[block + "norm1.linear.bias"])
        ours[block + "modulation"] = F.linear(temb, *linear).reshape(6, -1)
        ours.update({block + f"{name}.{w}": state[block + f"{name}.{w}"] for name in layers for w in ("weight", "bias")})
    student.load_state_dict(ours, strict=True)
    return student.eval()
