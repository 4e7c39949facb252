import pytest
import torch
from peft import LoraConfig

from tinysr import TinyAutoencoder, TinySRTransformer
from tinysr.models import PatchAutoencoder
from tinysr.models.autoencoder_patch import PatchEncoder
from tinysr.weights import merge_lora

from .conftest import make_student, make_tiny_vae


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_defaults_are_the_paper_architectures():
    with torch.device("meta"):
        student = TinySRTransformer()
    assert len(student.transformer_blocks) == 12
    assert student.proj_out.in_features == 1536
    assert 330e6 < n_params(student) < 350e6  # "about 340 M"
    vae = TinyAutoencoder()
    assert 0.14e6 < n_params(vae.encoder) < 0.18e6 and 0.14e6 < n_params(vae.decoder) < 0.18e6
    plain = TinyAutoencoder(encoder_separable=False, decoder_separable=False)
    assert 2.3e6 < n_params(plain) < 2.6e6
    assert isinstance(vae.encoder.layers[0].depthwise, torch.nn.Conv2d)
    assert TinyAutoencoder(decoder_separable=False).decoder.layers[0].__class__ is torch.nn.Conv2d


@torch.no_grad()
def test_transformer_shapes_and_position_crop():
    model = make_student()
    for h, w in [(2, 2), (8, 14), (64, 64)]:
        x = torch.randn(1, 16, h, w)
        assert model(x).shape == x.shape
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        model(torch.randn(1, 16, 66, 8))
    with pytest.raises(ValueError, match="multiple"):
        model(torch.randn(1, 16, 7, 8))


@torch.no_grad()
def test_position_table_is_sd3s_centre_crop():
    model = make_student()
    table = model.pos_embed.pos_embed.reshape(32, 32, -1)
    h = model.pos_embed(torch.zeros(1, 16, 8, 12)) - model.pos_embed.proj.bias
    assert torch.allclose(h.reshape(4, 6, -1), table[14:18, 13:19], atol=1e-6)


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    model, vae = make_student(), make_tiny_vae()
    model.save_pretrained(tmp_path / "t")
    vae.save_pretrained(tmp_path / "v")
    assert (tmp_path / "t" / "diffusion_pytorch_model.safetensors").is_file()
    x = torch.randn(1, 16, 8, 8)
    assert torch.equal(TinySRTransformer.from_pretrained(tmp_path / "t")(x), model(x))
    half = TinySRTransformer.from_pretrained(tmp_path / "t", torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(TinyAutoencoder.from_pretrained(tmp_path / "v").decode(vae.encode(img)), vae.decode(vae.encode(img)))


@torch.no_grad()
def test_vae_shapes_and_ranges():
    vae = make_tiny_vae()
    x = torch.rand(2, 3, 40, 24) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 16, 5, 3)
    assert vae.decode(z).shape == x.shape


@torch.no_grad()
def test_replicate_padding_sees_no_frame_round_the_image(tmp_path):
    """A flat image encodes to a flat latent with replicate padding; TAESD's zero padding marks the border."""
    torch.manual_seed(0)
    flat = torch.full((1, 3, 32, 32), 0.3)
    for mode in ("zeros", "replicate"):
        vae = TinyAutoencoder(channels=8, num_stages=2, blocks_per_stage=1, padding_mode=mode)
        z = vae.encode(flat)
        spread = float((z - z[..., 4:5, 4:5]).abs().max())
        assert (spread < 1e-5) if mode == "replicate" else (spread > 1e-3), (mode, spread)
    vae.save_pretrained(tmp_path / "v")
    loaded = TinyAutoencoder.from_pretrained(tmp_path / "v")
    assert loaded.config.padding_mode == "replicate"
    assert loaded.encoder.layers[0].depthwise.padding_mode == loaded.decoder.layers[0].depthwise.padding_mode == "replicate"
    assert torch.equal(loaded.encode(flat), vae.encode(flat))
    with pytest.raises(ValueError, match="padding_mode"):
        TinyAutoencoder(channels=8, padding_mode="mirror")


@torch.no_grad()
def test_upsample_mode_is_configured_saved_and_checked(tmp_path):
    """The same weights decode differently with TAESD's nearest upsampling and with bilinear; the mode survives a save."""
    torch.manual_seed(0)
    nearest = TinyAutoencoder(channels=8, num_stages=2, blocks_per_stage=1).eval()
    bilinear = TinyAutoencoder(channels=8, num_stages=2, blocks_per_stage=1, upsample_mode="bilinear").eval()
    bilinear.load_state_dict(nearest.state_dict())
    modes = [{m.mode for m in vae.decoder.modules() if isinstance(m, torch.nn.Upsample)} for vae in (nearest, bilinear)]
    assert modes == [{"nearest"}, {"bilinear"}]
    z = torch.randn(1, 16, 8, 8)
    assert (nearest.decode(z) - bilinear.decode(z)).abs().mean() > 1e-3
    bilinear.save_pretrained(tmp_path / "v")
    loaded = TinyAutoencoder.from_pretrained(tmp_path / "v")
    assert loaded.config.upsample_mode == "bilinear" and torch.equal(loaded.decode(z), bilinear.decode(z))
    with pytest.raises(ValueError, match="upsample_mode must be one of nearest, bilinear"):
        TinyAutoencoder(channels=8, upsample_mode="bicubic")


@torch.no_grad()
def test_patch_encoder_under_the_taesd_decoder(tmp_path):
    """encoder_type patch: 4x4 patches (num_stages 2) through a linear map, with the PatchAutoencoder's names and shapes."""
    torch.manual_seed(0)
    vae = TinyAutoencoder(channels=8, num_stages=2, blocks_per_stage=1, encoder_type="patch")
    assert isinstance(vae.encoder, PatchEncoder) and vae.encoder.patch_size == 4
    patch = PatchAutoencoder(channels=8, blocks=1).encoder.state_dict()
    assert {k: v.shape for k, v in vae.encoder.state_dict().items()} == {k: v.shape for k, v in patch.items()}
    x = torch.rand(1, 3, 32, 24) * 2 - 1
    assert vae.encode(x).shape == (1, 16, 8, 6) and vae.decode(vae.encode(x)).shape == x.shape
    vae.save_pretrained(tmp_path / "v")
    assert torch.equal(TinyAutoencoder.from_pretrained(tmp_path / "v").encode(x), vae.encode(x))
    with pytest.raises(ValueError, match="encoder_type must be one of taesd, patch"):
        TinyAutoencoder(encoder_type="conv")


@torch.no_grad()
def test_patch_autoencoder_starts_as_whitened_pca(tmp_path):
    """The demo base VAE: after fit_linear, patches of rank <= 16 come back exactly, latents have std 0.5."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(12, 3 * 16, generator=g)  # every 4x4 patch is a mix of 12 fixed patterns
    coeffs = torch.randn(4 * 10 * 10, 12, generator=g)
    images = torch.nn.functional.pixel_shuffle((coeffs @ basis).reshape(4, 10, 10, 48).permute(0, 3, 1, 2), 4) * 0.1
    vae = PatchAutoencoder(latent_channels=16, channels=8, blocks=1)
    assert vae.decode(vae.encode(images)).abs().max() > 0  # random linear maps, zero refiners: not yet the identity
    vae.fit_linear(images)
    z = vae.encode(images)
    assert z.shape == (4, 16, 10, 10)
    assert torch.allclose(z[:, :12].std((0, 2, 3)), torch.full((12,), 0.5), atol=0.02)
    assert torch.allclose(vae.decode(z), images, atol=1e-4)
    assert vae.downscale == 4
    vae.save_pretrained(tmp_path / "v")
    assert torch.equal(PatchAutoencoder.from_pretrained(tmp_path / "v").encode(images), z)


@torch.no_grad()
def test_pixel_refiner_starts_as_the_identity_after_the_synthesis(tmp_path):
    """pixel_channels: a residual refiner after the decoder's synthesis that changes nothing until it trains."""
    torch.manual_seed(0)
    vae = PatchAutoencoder(latent_channels=16, channels=8, blocks=1, lapped=True, pixel_channels=4, pixel_blocks=2)
    z = torch.randn(2, 16, 6, 6)
    assert vae.decode(z).shape == (2, 3, 24, 24) and torch.equal(vae.decode(z), vae.decoder.synthesize(z))
    torch.nn.init.normal_(vae.decoder.pixel.conv_out.weight, std=0.1)
    assert not torch.equal(vae.decode(z), vae.decoder.synthesize(z))
    assert len(vae.decoder.pixel.blocks) == 2 and vae.decoder.pixel.conv_in.out_channels == 4
    vae.save_pretrained(tmp_path / "v")
    assert torch.equal(PatchAutoencoder.from_pretrained(tmp_path / "v").decode(z), vae.decode(z))
    assert PatchAutoencoder(latent_channels=16, channels=8, blocks=1).decoder.pixel is None  # the default: no refiner


@torch.no_grad()
def test_lapped_patch_decoder_starts_as_the_patch_decoder(tmp_path):
    """lapped: one 8x8-kernel transposed convolution (stride 4) whose centre starts as the PCA patch decoder.

    Its bias is per colour, so the start differs from the patch decoder by exactly the mean patch's spread
    around its per-colour mean (next to nothing on photos); the overlap starts at zero and is learnt.
    """
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.pixel_shuffle((torch.randn(400, 12, generator=g) @ torch.randn(12, 48, generator=g)).reshape(4, 10, 10, 48).permute(0, 3, 1, 2), 4) * 0.1
    patch, lapped = PatchAutoencoder(channels=8, blocks=1), PatchAutoencoder(channels=8, blocks=1, lapped=True)
    patch.fit_linear(images)
    lapped.fit_linear(images)
    z = patch.encode(images)
    assert torch.equal(lapped.encode(images), z)
    mean = torch.nn.functional.pixel_unshuffle(images, 4).mean((0, 2, 3)).reshape(3, 16)
    spread = torch.nn.functional.pixel_shuffle((mean - mean.mean(1, keepdim=True)).reshape(1, 48, 1, 1).expand(1, 48, 10, 10), 4)
    assert torch.allclose(patch.decode(z) - lapped.decode(z), spread, atol=1e-5)
    kernel = lapped.decoder.synthesis.weight
    assert kernel.shape == (16, 3, 8, 8) and kernel[:, :, :2].abs().sum() == 0 and kernel[:, :, :, 6:].abs().sum() == 0
    lapped.save_pretrained(tmp_path / "v")
    assert torch.equal(PatchAutoencoder.from_pretrained(tmp_path / "v").decode(z), lapped.decode(z))


@torch.no_grad()
@pytest.mark.parametrize("kind", ["transformer", "vae"])
def test_lora_merge_equals_adapter_output(kind):
    if kind == "transformer":
        model, x = make_student(), torch.randn(1, 16, 8, 8)
        targets = ["to_q", "to_k", "to_v", "to_out.0", "proj", "net.2", "proj_out"]
    else:
        model, x = make_tiny_vae(), torch.rand(1, 3, 32, 32) * 2 - 1
        targets = ["pointwise"]
    base = model(x)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets))
    with_adapter = model(x)
    assert (with_adapter - base).abs().max() > 1e-3
    merge_lora(model)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert (model(x) - with_adapter).abs().max() < 1e-4
