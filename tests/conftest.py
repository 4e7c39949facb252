import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel

from tinysr import TinyAutoencoder, TinySRPipeline, TinySRTransformer

TINY_SD3 = dict(
    sample_size=16, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=8, num_attention_heads=4,
    joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=24, out_channels=16, pos_embed_max_size=32,
)
TINY_STUDENT = dict(sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, pos_embed_max_size=32)
TINY_KL = dict(
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16],
    layers_per_block=1, latent_channels=16, norm_num_groups=4, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False,
)


def perturb(model, std=0.05, seed=0):
    """Random weights everywhere (diffusers zero-initialises modulation and output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def make_sd3(seed=0, **overrides):
    torch.manual_seed(seed)
    return perturb(SD3Transformer2DModel(**{**TINY_SD3, **overrides}), seed=seed)


def make_student(seed=0):
    torch.manual_seed(seed)
    return perturb(TinySRTransformer(**TINY_STUDENT), seed=seed)


def make_tiny_vae(seed=0, **config):
    torch.manual_seed(seed)
    vae = TinyAutoencoder(channels=8, blocks_per_stage=1, **config)
    with torch.no_grad():
        vae.decoder.layers[-1].pointwise.bias.fill_(0.0)
    return vae.eval()


def make_kl(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_KL).eval()


@pytest.fixture
def tiny_pipeline():
    return TinySRPipeline(make_student(), make_tiny_vae())


@pytest.fixture
def tiny_folder(tmp_path, tiny_pipeline):
    return tiny_pipeline.save_pretrained(tmp_path / "tiny-tinysr")


def random_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, h // 4 + 1, w // 4 + 1, generator=g)
    return torch.nn.functional.interpolate(base[None], size=(h, w), mode="bilinear")[0].clamp(0, 1)
