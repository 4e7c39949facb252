"""Test reference: the module tree and first forward of the official TinySR release.

Written from `Microtreei/TinySR` `models/tinysr/tinysd3.py` and the block file it imports (the fork's
`models/tinysr/tinysd3block.py`): image stream only, `time_text_embed` and every adaLN linear kept,
the position table a buffer, empty buffers the first forward fills. `save_release` writes what
`utils/merge/prune_merge.py` and the LoRA training would: `transformer/` via `save_pretrained`, the
LoRA keyed `transformer.<module>.lora_A.weight` with the official target list.
"""

import json

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, get_2d_sincos_pos_embed
from diffusers.models.modeling_utils import ModelMixin
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

OFFICIAL_TINYSR_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj", "linear", "linear_1", "linear_2", "net.2"]


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_channels, dim, table):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", table)

    def forward(self, latent, cached_table):
        # the release adds dataset/cache/pos_embed.pt, SD3's table cropped to the 64x64-latent tile
        return self.proj(latent).flatten(2).transpose(1, 2) + cached_table


class AdaNorm(nn.Module):
    """The tree of AdaLayerNormZero (chunks 6, `norm1`) and AdaLayerNormContinuous (chunks 2, `norm_out`)."""

    def __init__(self, dim, chunks):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, chunks * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x):
        b = x.shape[0]
        q, k, v = (f(x).view(b, -1, self.heads, x.shape[-1] // self.heads).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, x.shape[-1])
        return self.to_out[1](self.to_out[0](out))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = AdaNorm(dim, 6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        for name in ("gate_mlp", "scale_mlp", "shift_mlp", "scale_msa", "shift_msa", "gate_msa"):
            self.register_buffer(name, torch.tensor([]))

    def forward(self, h, temb):
        emb = self.norm1.linear(self.norm1.silu(temb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        x = self.norm1.norm(h) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        h = h + gate_msa.unsqueeze(1) * self.attn(x)
        x = self.norm2(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return h + gate_mlp.unsqueeze(1) * self.ff(x)


class OfficialTinySD3(ModelMixin, ConfigMixin, PeftAdapterMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                 joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=24, out_channels=16, pos_embed_max_size=32):
        super().__init__()
        dim = attention_head_dim * num_attention_heads
        table = get_2d_sincos_pos_embed(dim, pos_embed_max_size, base_size=sample_size // patch_size).float()[None]
        self.pos_embed = PatchEmbed(patch_size, in_channels, dim, table)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(embedding_dim=dim, pooled_projection_dim=pooled_projection_dim)
        self.transformer_blocks = nn.ModuleList(Block(dim, num_attention_heads) for _ in range(num_layers))
        self.norm_out = AdaNorm(dim, 2)
        self.register_buffer("scale", torch.tensor([]))
        self.register_buffer("shift", torch.tensor([]))
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)

    def cached_table(self, height, width):
        """dataset/cache/pos_embed.pt: the centre crop of the table for this latent size, as SD3 crops it."""
        p, m = self.config.patch_size, self.config.pos_embed_max_size
        h, w = height // p, width // p
        grid = self.pos_embed.pos_embed.reshape(1, m, m, -1)
        top, left = (m - h) // 2, (m - w) // 2
        return grid[:, top : top + h, left : left + w].reshape(1, h * w, -1)

    def forward(self, hidden_states, pooled_projections, timestep):
        height, width = hidden_states.shape[-2:]
        h = self.pos_embed(hidden_states, self.cached_table(height, width))
        temb = self.time_text_embed(timestep, pooled_projections)
        for block in self.transformer_blocks:
            h = block(h, temb)
        scale, shift = torch.chunk(self.norm_out.linear(self.norm_out.silu(temb)), 2, dim=1)
        h = self.proj_out(self.norm_out.norm(h) * (1 + scale)[:, None, :] + shift[:, None, :])
        p, c = self.config.patch_size, self.config.out_channels
        h = h.reshape(h.shape[0], height // p, width // p, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], c, height, width)


class SeparableConv(nn.Module):
    """models/vae/tinyvae.py DepthwiseSeparableConv: depthwise without bias, then 1x1."""

    def __init__(self, c_in, c_out, k=3, stride=1, bias=True):
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, k, stride=stride, padding=k // 2, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=bias)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class TinyBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Sequential(SeparableConv(c, c), nn.ReLU(), SeparableConv(c, c), nn.ReLU(), SeparableConv(c, c))
        self.skip, self.fuse = nn.Identity(), nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


class OfficialTinyVAE(ModelMixin, ConfigMixin):
    """The release's AutoencoderTiny with models/vae/tinyvae.py's EncoderTiny / DecoderTiny."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels=3, out_channels=3, encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                 act_fn="relu", upsample_fn="nearest", latent_channels=16, upsampling_scaling_factor=2,
                 num_encoder_blocks=(1, 2, 2, 2), num_decoder_blocks=(2, 2, 2, 1), latent_magnitude=3, latent_shift=0.5,
                 force_upcast=False, scaling_factor=1.5305, shift_factor=0.0):
        super().__init__()
        c = encoder_block_out_channels[0]
        enc = []
        for i, n in enumerate(num_encoder_blocks):
            enc.append(SeparableConv(in_channels, c) if i == 0 else SeparableConv(c, c, stride=2, bias=False))
            enc.extend(TinyBlock(c) for _ in range(n))
        enc.append(SeparableConv(c, latent_channels))
        dec = [SeparableConv(latent_channels, c), nn.ReLU()]
        for i, n in enumerate(num_decoder_blocks):
            last = i == len(num_decoder_blocks) - 1
            dec.extend(TinyBlock(c) for _ in range(n))
            if not last:
                dec.append(nn.Upsample(scale_factor=upsampling_scaling_factor, mode=upsample_fn))
            dec.append(SeparableConv(c, out_channels if last else c, bias=last))
        self.encoder, self.decoder = nn.Module(), nn.Module()
        self.encoder.layers, self.decoder.layers = nn.Sequential(*enc), nn.Sequential(*dec)

    def encode(self, x):
        return self.encoder.layers(x.add(1).div(2))

    def decode(self, z):
        return self.decoder.layers(torch.tanh(z / 3) * 3).mul(2).sub(1)


def perturbed(model, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def add_official_lora(model, seed, targets=OFFICIAL_TINYSR_TARGETS, rank=4):
    """A rank-r adapter (alpha = r, as the release scripts) with non-zero B on every target."""
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def lora_state(model):
    """The release's LoRA file: `transformer.` + parameter name without the adapter name."""
    return {"transformer." + n.replace(".default", ""): p.detach().clone().contiguous() for n, p in model.named_parameters() if "lora_" in n}


def save_release(root, model, vae, pooled, dtype=torch.float32):
    """The official checkpoint layout: tinybackbone/prune-12-merge-tinysr/transformer, tinysr/, vae/separable."""
    tdir = root / "tinybackbone" / "prune-12-merge-tinysr" / "transformer"
    tdir.mkdir(parents=True)
    base = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items() if "lora_" not in k}
    base = {k.replace(".base_layer", ""): v for k, v in base.items()}
    save_file(base, tdir / "diffusion_pytorch_model.safetensors")
    config = {"_class_name": "TinySD3Transformer2DModel", "_diffusers_version": "0.30.0", **dict(model.config)}
    (tdir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if not k.startswith("_use")}, indent=2))
    (root / "tinysr").mkdir()
    save_file(lora_state(model), root / "tinysr" / "transformer.safetensors")
    vdir = root / "vae" / "separable"
    vae.save_pretrained(vdir)
    config = json.loads((vdir / "config.json").read_text())
    (vdir / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderTiny"}, indent=2))
    (root / "dataset" / "default").mkdir(parents=True)
    torch.save(pooled, root / "dataset" / "default" / "pool_embeds.pt")
