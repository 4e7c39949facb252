"""The authors' releases load exactly: fixtures are written the way the official code writes them."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from tinysr import TinySRPipeline, TSDSRPipeline, load_pipeline
from tinysr.errors import MissingWeightsError, WrongModelError
from tinysr.release import TSDSR_TRANSFORMER_LORA_TARGETS, TSDSR_VAE_LORA_TARGETS

from .conftest import make_kl, make_sd3, random_image
from .official_tinysr import OfficialTinySD3, OfficialTinyVAE, add_official_lora, lora_state, perturbed, save_release

LORA = "tinysr/transformer.safetensors"
BASE = "tinybackbone/prune-12-merge-tinysr/transformer"


def official_release(root, dtype=torch.float32, **config):
    official = add_official_lora(perturbed(OfficialTinySD3(**config), seed=1), seed=2)
    vae = perturbed(OfficialTinyVAE(), seed=3, std=0.02)
    pooled = torch.randn(1, official.config.pooled_projection_dim, generator=torch.Generator().manual_seed(4))
    save_release(root, official, vae, pooled, dtype)
    return official, vae, pooled


@torch.no_grad()
def official_forward(official, pooled, x):
    """The release's first forward: LoRA active and unmerged, modulation from time_text_embed."""
    return official(x, pooled, torch.tensor([1000.0]))


@torch.no_grad()
def test_official_layout_loads_and_equals_the_official_forward(tmp_path):
    official, vae, pooled = official_release(tmp_path)
    pipe = TinySRPipeline.from_release(tmp_path)
    x = torch.randn(2, 16, 16, 16)
    ref = official_forward(official, pooled, x)
    assert ref.abs().max() > 0.5
    assert ((pipe.transformer(x) - ref).abs().max() / ref.abs().max()) < 1e-5
    assert pipe.transformer.config.pos_embed_max_size == 32 and len(pipe.transformer.transformer_blocks) == 2
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.allclose(pipe.vae.encode(img), vae.encode(img), atol=1e-6)
    assert torch.allclose(pipe.vae.decode(vae.encode(img)), vae.decode(vae.encode(img)), atol=1e-6)
    assert pipe.vae.config.scaling_factor == vae.config.scaling_factor


@torch.no_grad()
def test_fp16_release_and_load_pipeline(tmp_path):
    """prune_merge.py saves fp16; load_pipeline takes the folder as it is (`convert`: test_cli)."""
    official, _, pooled = official_release(tmp_path / "release", dtype=torch.float16)
    x = torch.randn(1, 16, 16, 16)
    direct = TinySRPipeline.from_release(tmp_path / "release")
    for name, tensor in official.state_dict(keep_vars=True).items():
        if "lora_" not in name:
            tensor.data.copy_(tensor.data.half().float())  # what the fp16 file holds; the LoRA file stays fp32
    ref = official_forward(official, pooled, x)
    assert ((direct.transformer(x) - ref).abs().max() / ref.abs().max()) < 1e-5
    routed = load_pipeline(str(tmp_path / "release"))
    assert isinstance(routed, TinySRPipeline) and torch.equal(routed.transformer(x), direct.transformer(x))


def test_position_table_decides_pos_embed_max_size(tmp_path):
    official_release(tmp_path)
    config_path = tmp_path / BASE / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "pos_embed_max_size": 96}))
    with pytest.warns(UserWarning, match="pos_embed_max_size=96 but the stored position table is 32x32"):
        pipe = TinySRPipeline.from_release(tmp_path)
    assert pipe.transformer.config.pos_embed_max_size == 32
    weights = tmp_path / BASE / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["pos_embed.pos_embed"] = state["pos_embed.pos_embed"][:, :1000].contiguous()
    save_file(state, weights)
    with pytest.raises(WrongModelError, match="square"):
        TinySRPipeline.from_release(tmp_path)


def test_lora_keys_that_fit_no_module_warn_and_unfilled_layers_fail(tmp_path):
    official_release(tmp_path)
    path = tmp_path / LORA
    state = load_file(path)
    extra = {**state, "transformer.transformer_blocks.0.norm1_context.linear.lora_A.weight": torch.zeros(4, 32),
             "transformer.transformer_blocks.0.norm1_context.linear.lora_B.weight": torch.zeros(192, 4)}
    save_file(extra, path)
    with pytest.warns(UserWarning, match="norm1_context.linear"):
        TinySRPipeline.from_release(tmp_path)
    save_file({k: v for k, v in state.items() if "pos_embed.proj" not in k}, path)
    with pytest.raises(WrongModelError, match="pos_embed.proj.lora_A.weight"):
        TinySRPipeline.from_release(tmp_path)
    save_file({k: v for k, v in state.items() if "ff.net.2.lora_B" not in k}, path)
    with pytest.raises(WrongModelError, match="only lora_A"):
        TinySRPipeline.from_release(tmp_path)


def test_lora_of_another_model_and_truncated_files(tmp_path):
    official_release(tmp_path)
    sd3 = make_sd3(seed=5, num_layers=2)
    sd3.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TSDSR_TRANSFORMER_LORA_TARGETS))
    save_file(lora_state(sd3), tmp_path / LORA)
    with pytest.raises(WrongModelError, match=r"transformer\.safetensors: no LoRA weights .* another model"):
        TinySRPipeline.from_release(tmp_path)
    save_file({"transformer.vision_tower.q.lora_A.weight": torch.zeros(2, 2), "transformer.vision_tower.q.lora_B.weight": torch.zeros(2, 2)}, tmp_path / LORA)
    with pytest.raises(WrongModelError, match="LoRA of another model"):
        TinySRPipeline.from_release(tmp_path)
    weights = tmp_path / BASE / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(WrongModelError, match="diffusion_pytorch_model.safetensors: not a readable weight file"):
        TinySRPipeline.from_release(tmp_path)


def test_wrong_folder_and_wrong_pooled_prompt(tmp_path):
    official_release(tmp_path)
    torch.save(torch.randn(1, 77), tmp_path / "dataset" / "default" / "pool_embeds.pt")
    with pytest.raises(WrongModelError, match=r"pool_embeds\.pt: holds \(1, 77\).* size 24"):
        TinySRPipeline.from_release(tmp_path)
    (tmp_path / "dataset" / "default" / "pool_embeds.pt").write_bytes(b"not a pickle")
    with pytest.raises(WrongModelError, match="pool_embeds.pt: not a readable"):
        TinySRPipeline.from_release(tmp_path)
    (tmp_path / "dataset" / "default" / "pool_embeds.pt").unlink()
    with pytest.raises(MissingWeightsError, match="pool_embeds.pt"):
        TinySRPipeline.from_release(tmp_path)
    shutil.rmtree(tmp_path / BASE)
    make_sd3(seed=6, num_layers=2).save_pretrained(tmp_path / BASE)
    with pytest.raises(WrongModelError, match="text stream .* not the TinySR release"):
        TinySRPipeline.from_release(tmp_path, tmp_path)
    with pytest.raises(MissingWeightsError, match="prune-12-merge-tinysr"):
        TinySRPipeline.from_release(tmp_path / "dataset")


def test_release_vae_layouts(tmp_path):
    official_release(tmp_path)
    vdir = tmp_path / "vae" / "separable"
    config = json.loads((vdir / "config.json").read_text())
    (vdir / "config.json").write_text(json.dumps({**config, "num_encoder_blocks": [1, 2, 3, 2]}))
    with pytest.raises(WrongModelError, match="AutoencoderTiny layout"):
        TinySRPipeline.from_release(tmp_path)
    (vdir / "config.json").write_text(json.dumps({**config, "latent_channels": 4}))
    with pytest.raises(WrongModelError, match="does not fit the TinySR VAE"):
        TinySRPipeline.from_release(tmp_path)


def tsdsr_release(root):
    """SD3 base folder, the two LoRA files (both keyed `transformer.`, as test_tsdsr.py reads them), embeddings."""
    sd3, vae = make_sd3(seed=5), make_kl(seed=5)
    sd3.save_pretrained(root / "sd3" / "transformer")
    vae.save_pretrained(root / "sd3" / "vae")
    (root / "lora").mkdir()
    (root / "embeds").mkdir()
    save_file(lora_state(add_official_lora(sd3, 1, TSDSR_TRANSFORMER_LORA_TARGETS)), root / "lora" / "transformer.safetensors")
    save_file(lora_state(add_official_lora(vae, 2, TSDSR_VAE_LORA_TARGETS)), root / "lora" / "vae.safetensors")
    prompt, pooled = torch.randn(1, 5, 32), torch.randn(1, 24)
    torch.save(prompt, root / "embeds" / "prompt_embeds.pt")
    torch.save(pooled, root / "embeds" / "pool_embeds.pt")
    return sd3, vae, prompt, pooled


@torch.no_grad()
def test_tsdsr_release_merges_lora_and_round_trips(tmp_path):
    sd3, vae, prompt, pooled = tsdsr_release(tmp_path)
    reference = TSDSRPipeline(sd3, vae, prompt, pooled)  # adapters active, not merged
    pipe = TSDSRPipeline.from_release(tmp_path / "sd3", tmp_path / "lora", tmp_path / "embeds")
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    x = random_image(64, 64)[None] * 2 - 1
    ref = reference._run(x, "default", 64, 8, 128, 16, None, {})
    assert (pipe._run(x, "default", 64, 8, 128, 16, None, {}) - ref).abs().max() < 1e-4
    folder = pipe.save_pretrained(tmp_path / "ours")
    again = load_pipeline(str(folder))
    assert isinstance(again, TSDSRPipeline)
    assert (again._run(x, "default", 64, 8, 128, 16, None, {}) - ref).abs().max() < 1e-4


def test_tsdsr_release_bad_files(tmp_path):
    tsdsr_release(tmp_path)
    args = (tmp_path / "sd3", tmp_path / "lora", tmp_path / "embeds")
    with pytest.raises(MissingWeightsError, match="vae.safetensors"):
        TSDSRPipeline.from_release(tmp_path / "sd3", tmp_path / "embeds", tmp_path / "embeds")
    torch.save(torch.randn(1, 5, 48), tmp_path / "embeds" / "prompt_embeds.pt")
    with pytest.raises(WrongModelError, match="prompt_embeds.pt: holds .* size 32"):
        TSDSRPipeline.from_release(*args)
    torch.save(torch.randn(1, 5, 32), tmp_path / "embeds" / "prompt_embeds.pt")
    state = load_file(tmp_path / "lora" / "vae.safetensors")
    save_file({k: v for k, v in state.items() if "quant_conv" not in k and "conv_in" not in k}, tmp_path / "lora" / "vae.safetensors")
    with pytest.raises(WrongModelError, match=r"vae\.safetensors: no LoRA weights .*encoder\.conv_in"):
        TSDSRPipeline.from_release(*args)
