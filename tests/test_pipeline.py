import json
import shutil

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from tinysr import TinySRPipeline, TSDSRPipeline, load_pipeline
from tinysr.errors import ImageError, MissingWeightsError, NumericalError, WrongModelError
from tinysr.pipelines.base import pad_to_multiple, processing_size
from tinysr.weights import TINYSR_TRANSFORMER_LORA_TARGETS, TSDSR_TRANSFORMER_LORA_TARGETS, vae_lora_targets

from .conftest import make_kl, make_sd3, make_tiny_vae, random_image


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
    z = vae.encode(x) * vae.config.scaling_factor
    untiled = ((vae.decode((z - t(z)) / vae.config.scaling_factor).clamp(-1, 1) + 1) / 2)[0]
    assert torch.equal(a.image, untiled)
    tiled = tiny_pipeline(img, color_fix="none", tile_size=16, tile_overlap=4, vae_tile_size=16, vae_tile_overlap=4)
    assert not torch.equal(a.image, tiled.image)


@torch.no_grad()
def test_tiled_run_stays_close_to_untiled(tiny_pipeline):
    x = random_image(128, 192)[None] * 2 - 1
    ref = tiny_pipeline._run(x, 512, 0, 512, 0, {})
    tiled = tiny_pipeline._run(x, 8, 4, 8, 4, {})
    assert tiled.shape == ref.shape and torch.isfinite(tiled).all()
    assert (tiled - ref).abs().mean() < 0.5 * ref.abs().mean()


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


def lora_file(model, path, prefix="transformer"):
    state = {f"{prefix}." + n.replace(".default", ""): p.detach().contiguous() for n, p in model.named_parameters() if "lora_" in n}
    save_file(state, path)


def add_random_lora(model, targets, seed):
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)
    return model


def write_tsdsr_release(root):
    sd3, vae = make_sd3(seed=5), make_kl(seed=5)
    sd3.save_pretrained(root / "sd3" / "transformer")
    vae.save_pretrained(root / "sd3" / "vae")
    (root / "lora").mkdir()
    (root / "embeds").mkdir()
    lora_file(add_random_lora(sd3, TSDSR_TRANSFORMER_LORA_TARGETS, 1), root / "lora" / "transformer.safetensors")
    lora_file(add_random_lora(vae, vae_lora_targets(vae), 2), root / "lora" / "vae.safetensors")
    prompt, pooled = torch.randn(5, 32), torch.randn(24)
    torch.save(prompt, root / "embeds" / "prompt_embeds.pt")
    torch.save(pooled, root / "embeds" / "pool_embeds.pt")
    return sd3, vae, prompt, pooled


@torch.no_grad()
def test_tsdsr_release_merges_lora_and_round_trips(tmp_path):
    sd3, vae, prompt, pooled = write_tsdsr_release(tmp_path)
    reference = TSDSRPipeline(sd3, vae, prompt, pooled)  # adapters active, not merged
    pipe = TSDSRPipeline.from_release(tmp_path / "sd3", tmp_path / "lora", tmp_path / "embeds")
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    x = random_image(64, 64)[None] * 2 - 1
    ref = reference._run(x, 64, 8, 128, 16, {})
    assert (pipe._run(x, 64, 8, 128, 16, {}) - ref).abs().max() < 1e-3
    folder = pipe.save_pretrained(tmp_path / "ours")
    again = load_pipeline(str(folder))
    assert isinstance(again, TSDSRPipeline)
    assert (again._run(x, 64, 8, 128, 16, {}) - ref).abs().max() < 1e-3
    with pytest.raises(MissingWeightsError, match="vae.safetensors"):
        TSDSRPipeline.from_release(tmp_path / "sd3", tmp_path / "embeds", tmp_path / "embeds")


def write_tinysr_release(root):
    """The official layout: 12-block SD3 without text stream, LoRA file, separable VAE, pooled prompt."""
    sd3 = make_sd3(seed=6, num_layers=2)
    tdir = root / "tinybackbone" / "prune-12-merge-tinysr" / "transformer"
    tdir.mkdir(parents=True)
    text = ("context_embedder", "_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    save_file({k: v.contiguous() for k, v in sd3.state_dict().items() if not any(t in k for t in text)}, tdir / "diffusion_pytorch_model.safetensors")
    (tdir / "config.json").write_text(json.dumps({"_class_name": "TinySD3Transformer2DModel", **dict(sd3.config)}))
    (root / "tinysr").mkdir()
    lora_file(add_random_lora(sd3, TINYSR_TRANSFORMER_LORA_TARGETS, 3), root / "tinysr" / "transformer.safetensors")
    vae = make_tiny_vae(seed=7)
    vdir = root / "vae" / "separable"
    vdir.mkdir(parents=True)
    save_file(vae.state_dict(), vdir / "diffusion_pytorch_model.safetensors")
    vcfg = {"_class_name": "AutoencoderTiny", "encoder_block_out_channels": [8] * 4, "num_encoder_blocks": [1, 1, 1, 1], "latent_channels": 16, "scaling_factor": 1.5305}
    (vdir / "config.json").write_text(json.dumps(vcfg))
    pooled = torch.randn(1, 24)
    torch.save(pooled, root / "pool_embeds.pt")
    return sd3, vae, pooled


@torch.no_grad()
def test_tinysr_release_equals_its_sd3_form(tmp_path):
    sd3, vae, pooled = write_tinysr_release(tmp_path)
    pipe = TinySRPipeline.from_release(tmp_path)
    x = torch.randn(1, 16, 8, 12)
    ref = sd3(x, encoder_hidden_states=torch.zeros(1, 0, 32), pooled_projections=pooled, timestep=torch.tensor([1000.0])).sample
    assert (pipe.transformer(x) - ref).abs().max() < 1e-4
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.allclose(pipe.vae.decode(pipe.vae.encode(img)), vae.decode(vae.encode(img)), atol=1e-5)
    (tmp_path / "pool_embeds.pt").unlink()
    with pytest.raises(MissingWeightsError, match="pool_embeds.pt"):
        TinySRPipeline.from_release(tmp_path)
