import json
import shutil

import pytest
import torch

from tinysr import TinySRPipeline, TSDSRPipeline, load_pipeline
from tinysr.errors import ImageError, MissingWeightsError, NumericalError, WrongModelError
from tinysr.lattice import without_lattice
from tinysr.pipelines.base import pad_to_multiple, processing_size

from .conftest import random_image


@pytest.mark.parametrize("h,w", [(37, 53), (128, 96), (130, 131), (16, 200)])
def test_output_is_exactly_4x_any_size(tiny_pipeline, h, w):
    result = tiny_pipeline(random_image(h, w))
    assert result.image.shape == (3, 4 * h, 4 * w)
    assert 0 <= result.image.min() and result.image.max() <= 1
    assert set(result.timings) >= {"encode", "transformer", "decode", "total"}
    assert result.dtype == "fp32"


def test_short_side_rule_and_padding():
    assert processing_size(64, 200) == (512, 1600)
    assert processing_size(128, 130) == (512, 520)
    assert processing_size(1, 1) == (512, 512)
    assert processing_size(1, 2000) == (4, 8000) and processing_size(8, 1024) == (32, 4096)  # padded, not stretched
    assert processing_size(20, 400) == (204, 4096)  # enlarged only up to a 1024 px long side
    x = torch.rand(1, 3, 50, 70)
    padded = pad_to_multiple(x, 16)
    assert padded.shape[-2:] == (64, 80)
    assert torch.equal(padded[..., :50, :70], x)
    assert pad_to_multiple(torch.rand(1, 3, 3, 5), 16).shape[-2:] == (16, 16)


@torch.no_grad()
def test_deterministic_and_tile_as_large_as_latent_is_untiled(tiny_pipeline):
    img = random_image(128, 128, seed=4)
    a = tiny_pipeline(img, color_fix="none", tile_size=64, vae_tile_size=64)
    assert torch.equal(a.image, tiny_pipeline(img, color_fix="none", tile_size=64, vae_tile_size=64).image)
    t, vae = tiny_pipeline.transformer, tiny_pipeline.vae
    x = torch.nn.functional.interpolate(img[None], size=(512, 512), mode="bicubic").clamp(0, 1) * 2 - 1
    z = vae.encode(x.contiguous(memory_format=torch.channels_last)) * vae.config.scaling_factor
    z = (z - t(z)) / vae.config.scaling_factor
    untiled = ((vae.decode(z.contiguous(memory_format=torch.channels_last)).clamp(-1, 1) + 1) / 2)[0]
    assert torch.equal(a.image, untiled)
    tiled = tiny_pipeline(img, color_fix="none", tile_size=16, tile_overlap=4, vae_tile_size=16, vae_tile_overlap=4)
    assert not torch.equal(a.image, tiled.image)


@torch.no_grad()
def test_tiled_run_stays_close_to_untiled(tiny_pipeline):
    x = random_image(128, 192)[None] * 2 - 1
    ref = tiny_pipeline._run(x, "default", 512, 0, 512, 0, None, {})
    tiled = tiny_pipeline._run(x, "default", 8, 4, 8, 4, None, {})
    assert tiled.shape == ref.shape and torch.isfinite(tiled).all()
    assert (tiled - ref).abs().mean() < 0.5 * ref.abs().mean()


def test_one_pixel_image_in_the_official_recipe(tiny_pipeline):
    """The scripts' AdaIN against a 1-pixel LR divides by NaN (unbiased variance): a sentence, not a black image."""
    with pytest.raises(ImageError, match="1-pixel image .* AdaIN"):
        tiny_pipeline(torch.rand(3, 1, 1), recipe="official")
    out = tiny_pipeline(torch.rand(3, 1, 1), recipe="official", color_fix="wavelet").image
    assert out.shape == (3, 4, 4) and torch.isfinite(out).all()
    assert tiny_pipeline(torch.rand(3, 1, 2), recipe="official").image.shape == (3, 4, 8)


@torch.no_grad()
def test_remove_token_pattern_takes_out_the_token_grid_and_nothing_else(tiny_pipeline, tmp_path, monkeypatch):
    """The per-image offset of each position inside a token goes; so does nothing else; the flag is saved."""
    p = tiny_pipeline.latent_multiple
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 24, generator=g)
    eps = torch.randn(2, 4, 16, 24, generator=g)
    grid = 3 * torch.randn(2, 4, p, p, generator=g).repeat(1, 1, 16 // p, 24 // p)
    monkeypatch.setattr(tiny_pipeline, "predict", lambda latent: eps + grid)
    assert torch.equal(tiny_pipeline.predict_tiled(z), eps + grid)  # off by default, as for the releases
    monkeypatch.setattr(tiny_pipeline, "remove_token_pattern", True)
    cleaned = tiny_pipeline.predict_tiled(z)
    removed = (eps + grid) - cleaned
    assert torch.allclose(removed, removed[..., :p, :p].repeat(1, 1, 16 // p, 24 // p), atol=1e-5)  # only a periodic pattern left
    assert torch.allclose(removed.mean((-2, -1)), torch.zeros(2, 4), atol=1e-5)  # the mean kept
    blocks = cleaned.unflatten(2, (16 // p, p)).unflatten(4, (24 // p, p)).mean((2, 4))
    assert torch.allclose(blocks, blocks.mean((2, 3), keepdim=True).expand_as(blocks), atol=1e-5)  # no pattern left
    planted = grid - grid.mean((-2, -1), keepdim=True)
    assert (removed - planted).abs().max() < 0.5 < planted.abs().max()  # mostly the planted grid (eps's own pattern: std 0.1)

    monkeypatch.undo()
    # tiled: the whole image's pattern goes after blending (an identity transformer blends back to z exactly)
    monkeypatch.setattr(tiny_pipeline, "remove_token_pattern", True)
    monkeypatch.setattr(tiny_pipeline, "predict", lambda latent: latent)
    field = z + grid
    assert torch.allclose(tiny_pipeline.predict_tiled(field, tile_size=8, tile_overlap=2), without_lattice(field, p), atol=1e-5)
    # the official recipe's path takes it out too
    pattern = 0.3 * torch.randn(1, 64, p, p, generator=g)

    def grid_only(latent):
        n, c, h, w = latent.shape
        return pattern[:, :c].repeat(n, 1, h // p, w // p).to(latent)

    decoded = []
    decode = tiny_pipeline.decode_latents
    monkeypatch.setattr(tiny_pipeline, "predict", grid_only)
    monkeypatch.setattr(tiny_pipeline, "decode_latents", lambda z, *args, **kw: decode(decoded.append(z) or z, *args, **kw))
    for remove in (True, False):
        monkeypatch.setattr(tiny_pipeline, "remove_token_pattern", remove)
        tiny_pipeline(random_image(32, 32), recipe="official", color_fix="none")
    went = decoded[0] - decoded[1]  # the grid, less its mean per channel
    assert torch.allclose(went, (pattern - pattern.mean((-2, -1), keepdim=True))[:, : went.shape[1]].repeat(1, 1, *(n // p for n in went.shape[-2:])), atol=1e-5)

    monkeypatch.undo()
    tiny_pipeline.remove_token_pattern = True
    folder = tiny_pipeline.save_pretrained(tmp_path / "with-flag")
    assert json.loads((folder / "model_index.json").read_text())["remove_token_pattern"] is True
    assert load_pipeline(str(folder)).remove_token_pattern is True
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "remove_token_pattern": "yes"}))
    with pytest.raises(WrongModelError, match="remove_token_pattern must be true or false"):
        TinySRPipeline.from_pretrained(folder)


def test_fp16_overflow_falls_back(tiny_pipeline):
    with torch.no_grad():
        tiny_pipeline.transformer.pos_embed.proj.bias.fill_(7e4)  # beyond fp16's 65504
    pipe = TinySRPipeline(tiny_pipeline.transformer, tiny_pipeline.vae, dtype="fp16")
    with pytest.warns(UserWarning, match="fp16 overflowed"):
        result = pipe(random_image(32, 32))
    assert result.dtype == "bf16" and torch.isfinite(result.image).all()


def test_flat_input_and_nan_weights(tiny_pipeline):
    flat = tiny_pipeline(torch.full((3, 24, 24), 0.5))
    assert flat.image.shape == (3, 96, 96)
    with torch.no_grad():
        tiny_pipeline.transformer.proj_out.bias.fill_(float("nan"))
    with pytest.raises(NumericalError, match="NaN"):
        tiny_pipeline(random_image(24, 24))


def test_bad_arguments(tiny_pipeline):
    img = random_image(32, 32)
    with pytest.raises(ValueError, match="colour fix"):
        tiny_pipeline(img, color_fix="sepia")
    with pytest.raises(ValueError, match="tile"):
        tiny_pipeline(img, tile_size=16, tile_overlap=16)
    with pytest.raises(ImageError):
        tiny_pipeline(torch.rand(4, 8, 8))


def test_save_load_and_named_resolution(tiny_pipeline, tiny_folder, monkeypatch):
    img = random_image(32, 48)
    loaded = TinySRPipeline.from_pretrained(tiny_folder)
    assert torch.equal(loaded(img).image, tiny_pipeline(img).image)
    monkeypatch.setenv("TINYSR_MODEL", str(tiny_folder))
    assert isinstance(load_pipeline("tinysr"), TinySRPipeline)
    monkeypatch.delenv("TINYSR_MODEL")
    monkeypatch.setattr("tinysr.pipelines.NAMED_MODELS", {"tinysr": ("TINYSR_MODEL", tiny_folder / "absent")})
    with pytest.raises(MissingWeightsError, match="TINYSR_MODEL") as err:
        load_pipeline("tinysr")
    assert "absent" in str(err.value)


def test_missing_and_wrong_weights(tmp_path, tiny_folder):
    with pytest.raises(MissingWeightsError, match="nowhere"):
        TinySRPipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(MissingWeightsError, match="hub"):
        TinySRPipeline.from_pretrained("nobody/no-such-tinysr-model")
    with pytest.raises(WrongModelError, match="TinySRPipeline"):
        TSDSRPipeline.from_pretrained(tiny_folder)
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_folder, wrong)
    cfg = json.loads((wrong / "transformer" / "config.json").read_text())
    cfg["_class_name"] = "SD3Transformer2DModel"
    (wrong / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WrongModelError, match="SD3Transformer2DModel"):
        TinySRPipeline.from_pretrained(wrong)
    (wrong / "transformer" / "config.json").write_text(json.dumps({**cfg, "_class_name": "TinySRTransformer", "num_layers": 5}))
    with pytest.raises(WrongModelError, match="do not fit"):
        TinySRPipeline.from_pretrained(wrong)
    (wrong / "transformer" / "config.json").write_text(json.dumps({**cfg, "_class_name": "TinySRTransformer"}))
    (wrong / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="vae/diffusion_pytorch_model.safetensors"):
        TinySRPipeline.from_pretrained(wrong)
