"""The TinySR student: SD3's MMDiT pruned in depth and stripped of every conditional input.

With the timestep (1000) and the prompt fixed, every adaLN modulation of the teacher is a
constant, so each block stores its six modulation vectors as parameters and the text stream,
timestep embedder and pooled-text projection disappear.
"""

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None = None):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        if qk_norm == "rms_norm":
            self.norm_q, self.norm_k = RMSNorm(head_dim, eps=1e-6), RMSNorm(head_dim, eps=1e-6)
        elif qk_norm is None:
            self.norm_q = self.norm_k = None
        else:
            raise ValueError(f"qk_norm must be None or 'rms_norm', got {qk_norm!r}")

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))


class TinySRBlock(nn.Module):
    """An MMDiT block's image stream with constant modulation (shift, scale, gate for attention and MLP)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None = None):
        super().__init__()
        self.modulation = nn.Parameter(torch.zeros(6, dim))
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, head_dim, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(self, h):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation
        h = h + gate_msa * self.attn(self.norm1(h) * (1 + scale_msa) + shift_msa)
        return h + gate_mlp * self.ff(self.norm2(h) * (1 + scale_mlp) + shift_mlp)


class TinySRTransformer(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Condition-free one-step SR transformer: `forward(latent)` predicts the noise to subtract.

    Defaults are the paper's student: 12 blocks of SD3-medium (width 1536, 24 heads of 64).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["TinySRBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        out_channels: int = 16,
        num_layers: int = 12,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        pos_embed_max_size: int = 192,
        qk_norm: str | None = None,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=dim,
            pos_embed_max_size=pos_embed_max_size,
        )
        self.transformer_blocks = nn.ModuleList(
            TinySRBlock(dim, num_attention_heads, attention_head_dim, qk_norm) for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm_out_modulation = nn.Parameter(torch.zeros(2, dim))
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.gradient_checkpointing = False

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be a multiple of this (the patch size)."""
        return self.config.patch_size

    def forward(self, latent: torch.Tensor, return_dict: bool = False):
        b, _, height, width = latent.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {p}")
        limit = self.config.pos_embed_max_size * p
        if height > limit or width > limit:
            raise ValueError(f"latent size {height}x{width} exceeds {limit} (pos_embed_max_size); tile the input")
        h = self.pos_embed(latent)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                h = self._gradient_checkpointing_func(block, h)
            else:
                h = block(h)
        scale, shift = self.norm_out_modulation
        h = self.proj_out(self.norm_out(h) * (1 + scale) + shift)
        h = h.reshape(b, height // p, width // p, p, p, self.config.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", h).reshape(b, self.config.out_channels, height, width)
        return Transformer2DModelOutput(sample=out) if return_dict else out
