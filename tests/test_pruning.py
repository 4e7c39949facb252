import json
import math

import pytest
import torch
from peft import LoraConfig
from PIL import Image

from tinysr.convert import tinysr_transformer_from_sd3
from tinysr.models import TinySRTransformer
from trainer.stages.pruning import (
    SEARCH_LORA_TARGETS,
    BlockMaskSampler,
    block_influence,
    candidate_masks,
    load_search_lora,
    masked_sd3_forward,
    shortgpt_keep,
    temperature,
)

from .conftest import make_kl, make_sd3, make_tiny_vae, random_image


def sd3_inputs(sd3, b=2, text_tokens=5, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, size, size, generator=g)
    enc = torch.randn(b, text_tokens, sd3.config.joint_attention_dim, generator=g)
    pooled = torch.randn(b, sd3.config.pooled_projection_dim, generator=g)
    return x, enc, pooled, torch.full((b,), 1000.0)


def test_candidate_masks():
    c = candidate_masks(4, 2)
    assert c.shape == (6, 4) and (c.sum(1) == 2).all()
    assert len({tuple(r.tolist()) for r in c}) == 6
    assert candidate_masks(4, 3).shape == (4, 4)


@pytest.mark.parametrize("couple", [False, True])
def test_sampled_masks_keep_the_budget(couple):
    sampler = BlockMaskSampler(16, 4, 2, couple_pairs=couple)
    g = torch.Generator().manual_seed(3)  # unseeded, some draws make "keep" so likely that moves are rare
    with torch.no_grad():
        sampler.group_logits.normal_(0, 0.02, generator=g)
        sampler.pair_logits.normal_(0, 0.02, generator=g)
    moved = 0
    for step in range(200):
        tau = temperature(step + 1, 200, 4.0, 0.1)
        m = sampler.sample(tau, 100.0, torch.Generator().manual_seed(step))
        assert m.shape == (16,) and set(m.tolist()) <= {0.0, 1.0}
        groups = m.view(4, 4).sum(1)
        if couple:
            assert (m.view(2, 8).sum(1) == 4).all()
            assert ((groups >= 1) & (groups <= 3)).all()
            moved += int((groups != 2).any())
        else:
            assert (groups == 2).all()
    if couple:
        assert moved > 50, moved  # the moves do happen
    sampler.update_ema(0.0)
    d = sampler.decision_mask()
    if couple:
        assert d.view(2, 8).sum(1).tolist() == [4, 4]
    else:
        assert d.view(4, 4).sum(1).tolist() == [2] * 4


def test_coupling_rule_and_decision():
    sampler = BlockMaskSampler(8, 4, 2, couple_pairs=True)
    with torch.no_grad():
        # group 0 prefers [1100] then [1010]; group 1 prefers [0011] then [0101]; move first -> second
        sampler.group_logits[0] = torch.tensor([3.0, 2.0, 0, 0, 0, 0])
        sampler.group_logits[1] = torch.tensor([0, 0, 0, 0, 2.0, 3.0])
        sampler.pair_logits[0] = torch.tensor([0.0, 1.0, 0.0])
    sampler.update_ema(0.0)  # decay 0: the decision follows the logits
    # group 0 loses the block of [1100] that [1010] lacks (1); group 1 gains the one of [0101] it lacks (5)
    assert sampler.kept_blocks() == [0, 5, 6, 7]
    assert sampler.decision()["kept_blocks"] == [0, 5, 6, 7]
    with torch.no_grad():
        sampler.pair_logits[0] = torch.tensor([0.0, 0.0, 1.0])  # second -> first
    sampler.update_ema(0.0)
    assert sampler.kept_blocks() == [0, 1, 2, 7]  # group 0 gains 2 (from [1010]); group 1 keeps 7 (shared with [0101])
    with torch.no_grad():
        sampler.pair_logits[0] = torch.tensor([1.0, 0.0, 0.0])
    sampler.update_ema(0.0)
    assert sampler.kept_blocks() == [0, 1, 6, 7]


@torch.no_grad()
def test_decision_comes_from_the_ema_of_the_logits():
    """TinyFusion and the fork decide from an EMA (0.999) of the gate logits: a late swing does not flip it."""
    sampler = BlockMaskSampler(8, 4, 2, couple_pairs=False)
    early, late = torch.tensor([3.0, 0, 0, 0, 0, 0]), torch.tensor([0, 0, 0, 0, 0, 3.5])
    for step in range(300):
        sampler.group_logits[:] = early if step < 280 else late
        sampler.update_ema(0.999)
    assert sampler.kept_blocks() == [0, 1, 4, 5]  # candidate [1100] in both groups, from the EMA
    expected = sum(0.999 ** (299 - k) * 0.001 * (3.0 if k < 280 else 0.0) for k in range(300))
    assert math.isclose(float(sampler.ema_group_logits[0, 0]), expected, rel_tol=1e-4)
    sampler.update_ema(0.0)
    assert sampler.kept_blocks() == [2, 3, 6, 7]  # the raw logits' choice, [0011]
    groups, _ = sampler.probabilities()
    assert groups[0, 5] > 0.99


def test_straight_through_gradient_reaches_logits():
    torch.manual_seed(0)
    sd3 = make_sd3(num_layers=8)
    sampler = BlockMaskSampler(8, 4, 2, couple_pairs=True)
    x, enc, pooled, t = sd3_inputs(sd3, b=1)
    mask = sampler.sample(1.0, 100.0, torch.Generator().manual_seed(0))
    masked_sd3_forward(sd3, x, enc, pooled, t, mask).square().mean().backward()
    assert sampler.group_logits.grad.abs().sum() > 0
    assert sampler.pair_logits.grad.abs().sum() > 0


@torch.no_grad()
def test_masked_forward_matches_diffusers_and_zero_mask_is_identity():
    sd3 = make_sd3(num_layers=4)
    x, enc, pooled, t = sd3_inputs(sd3)
    ref = sd3(x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t).sample
    assert (masked_sd3_forward(sd3, x, enc, pooled, t) - ref).abs().max() < 1e-5
    assert (masked_sd3_forward(sd3, x, enc, pooled, t, torch.ones(4)) - ref).abs().max() < 1e-5

    # block 1 masked to 0: its input reaches block 2 unchanged, in both streams
    seen = {}
    for i, block in enumerate(sd3.transformer_blocks):
        block.register_forward_hook(lambda m, a, kw, out, i=i: seen.__setitem__(i, (kw["encoder_hidden_states"], kw["hidden_states"], out)), with_kwargs=True)
    zero = torch.tensor([1.0, 0.0, 1.0, 1.0], requires_grad=True)  # requires grad: block 1 is computed, then discarded
    with torch.enable_grad():
        masked_sd3_forward(sd3, x, enc, pooled, t, zero)
    enc0, h0 = seen[0][2]
    assert torch.equal(seen[2][0], enc0) and torch.equal(seen[2][1], h0)
    assert not torch.equal(seen[1][2][1], h0)
    # without a gradient the block is skipped, with the same result
    seen.clear()
    skipped = masked_sd3_forward(sd3, x, enc, pooled, t, zero.detach())
    assert 1 not in seen
    with torch.enable_grad():
        assert torch.equal(skipped, masked_sd3_forward(sd3, x, enc, pooled, t, zero).detach())
    # the last block (context_pre_only) masked out
    last = masked_sd3_forward(sd3, x, enc, pooled, t, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert torch.isfinite(last).all() and (last - ref).abs().max() > 1e-4


@torch.no_grad()
def test_exported_student_equals_masked_search_model():
    sd3 = make_sd3(seed=4, num_layers=8)
    sd3.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=SEARCH_LORA_TARGETS))
    sampler = BlockMaskSampler(8, 4, 2, couple_pairs=True)
    sampler.group_logits.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    sampler.pair_logits.copy_(torch.tensor([[0.0, 2.0, 0.0]]))
    sampler.update_ema(0.0)
    mask, kept = sampler.decision_mask(), sampler.kept_blocks()
    assert len(kept) == 4 and sorted(kept) == kept
    x, _, _, t = sd3_inputs(sd3, b=2)
    pooled = torch.randn(1, 24)
    student = tinysr_transformer_from_sd3(sd3, pooled, kept)
    no_text = torch.zeros(2, 0, sd3.config.joint_attention_dim)
    ref = masked_sd3_forward(sd3, x, no_text, pooled.expand(2, -1), t, mask)
    assert ref.abs().max() > 0.1
    assert (student(x) - ref).abs().max() < 1e-4


@torch.no_grad()
def test_block_influence_matches_direct_computation():
    sd3 = make_sd3(seed=5, num_layers=4)
    x, enc, pooled, t = sd3_inputs(sd3, b=2)
    batches = [x[:1], x[1:]]
    cos = [[] for _ in range(4)]
    hooks = [
        block.register_forward_hook(
            lambda m, a, kw, out, i=i: cos[i].append(torch.nn.functional.cosine_similarity(kw["hidden_states"], out[1], dim=-1).flatten()),
            with_kwargs=True,
        )
        for i, block in enumerate(sd3.transformer_blocks)
    ]
    for z in batches:
        sd3(z, encoder_hidden_states=enc[:1], pooled_projections=pooled[:1], timestep=t[:1])
    for h in hooks:
        h.remove()
    direct = torch.stack([1 - torch.cat(c).mean() for c in cos])
    bi = block_influence(sd3, batches, enc[:1], pooled[:1])
    assert (bi - direct).abs().max() < 1e-5
    assert shortgpt_keep(bi, 2) == sorted(torch.topk(direct, 2).indices.tolist())
    assert shortgpt_keep(torch.tensor([0.1, 0.3, 0.3, 0.2]), 2) == [1, 2]


# ----------------------------------------------------------------------------- the stages, end to end


@pytest.fixture
def prune_config(tmp_path):
    from tinysr.pipelines.tsdsr import TSDSRPipeline
    from trainer.config import load_config

    g = torch.Generator().manual_seed(0)
    TSDSRPipeline(make_sd3(num_layers=8), make_kl(), torch.randn(1, 5, 32, generator=g), torch.randn(1, 24, generator=g)).save_pretrained(tmp_path / "teacher")
    make_tiny_vae().save_pretrained(tmp_path / "runs/demo/vae-decoder/final/vae")
    for i in range(2):
        (tmp_path / "pairs/gt").mkdir(parents=True, exist_ok=True)
        (tmp_path / "pairs/lq").mkdir(parents=True, exist_ok=True)
        gt = (random_image(64, 64, seed=i) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(gt).save(tmp_path / f"pairs/gt/{i}.png")
        Image.fromarray(gt).resize((16, 16), Image.BICUBIC).save(tmp_path / f"pairs/lq/{i}.png")
    search = {"steps": 3, "batch_size": 1, "lora_rank": 4, "w_l1": 1.0, "w_lpips": 0.0, "lr": 1e-3, "checkpoint_every": 1, "ema_decay": 0.9}
    (tmp_path / "cfg.yaml").write_text(json.dumps({
        "name": "demo", "output_dir": str(tmp_path / "runs"), "teacher": str(tmp_path / "teacher"),
        "data": {"pairs": str(tmp_path / "pairs"), "crop": 64},
        "stages": {
            "prune-search": search,
            "prune-tinyfusion": {**search, "couple_pairs": False},
            "prune-export": {},
            "prune-shortgpt": {"batch_size": 1, "calibration_batches": 2},
        },
    }))
    return load_config(tmp_path / "cfg.yaml")


def test_search_then_export(prune_config):
    from trainer.stages.pruning import STAGES

    out = STAGES["prune-search"](prune_config, "prune-search")
    d = json.loads((out / "decision.json").read_text())
    assert d["num_blocks"] == 8 and d["stage"] == "prune-search" and d["couple_pairs"]
    assert len(d["kept_blocks"]) == 4 and len(d["group_probabilities"]) == 2 and len(d["group_probabilities"][0]) == 6
    assert len(d["pair_probabilities"]) == 1 and math.isclose(sum(d["pair_probabilities"][0]), 1, rel_tol=1e-5)
    assert (out / "lora").is_dir()
    log = [json.loads(line) for line in (out.parent / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and log[0]["temperature"] == 4.0 and math.isclose(log[-1]["temperature"], 0.1)
    from safetensors.torch import load_file

    ckpts = out.parent / "checkpoints"
    first = load_file(ckpts / "step-0000003/model.safetensors")
    assert first["masks.group_logits"].abs().sum() > 0 and "masks.pair_logits" in first
    before = load_file(ckpts / "step-0000002/model.safetensors")
    for name in ("group_logits", "pair_logits"):  # the EMA is updated after every optimizer step and checkpointed
        ema = 0.9 * before[f"masks.ema_{name}"] + 0.1 * first[f"masks.{name}"]
        assert torch.allclose(first[f"masks.ema_{name}"], ema, atol=1e-7)
    # resuming from step 2 reproduces step 3 exactly (batch and Gumbel noise seeded per step)
    STAGES["prune-search"](prune_config, "prune-search", str(ckpts / "step-0000002"))
    again = load_file(ckpts / "step-0000003/model.safetensors")
    for key in ("masks.group_logits", "masks.pair_logits", "masks.ema_group_logits"):
        assert torch.equal(first[key], again[key])
    assert json.loads((out / "decision.json").read_text()) == d

    # the exported student is the teacher restricted to the kept blocks (zero text tokens), by default without
    # the search LoRA (as the release's prune_merge.py), with it when keep_search_lora
    from tinysr.pipelines import load_pipeline

    teacher = load_pipeline(prune_config.teacher, device="cpu")
    sd3 = teacher.transformer
    load_search_lora(sd3, out / "lora")
    mask = torch.zeros(8)
    mask[d["kept_blocks"]] = 1
    x = torch.randn(1, 16, 8, 8)

    def teacher_masked():
        return masked_sd3_forward(sd3, x, torch.zeros(1, 0, 32), teacher.pooled_embeds, torch.full((1,), 1000.0), mask)

    for keep in (True, False):
        prune_config.stages["prune-export"].keep_search_lora = keep
        exported = STAGES["prune-export"](prune_config, "prune-export")
        student = TinySRTransformer.from_pretrained(exported / "transformer")
        saved = json.loads((exported / "decision.json").read_text())
        assert student.config.num_layers == 4 and saved["kept_blocks"] == d["kept_blocks"] and saved["search_lora_kept"] == keep
        with torch.no_grad():
            (sd3.enable_adapters if keep else sd3.disable_adapters)()
            ref = teacher_masked()
            assert (student(x) - ref).abs().max() < 1e-4
            (sd3.disable_adapters if keep else sd3.enable_adapters)()
            assert (teacher_masked() - ref).abs().max() > 1e-4


def test_tinyfusion_and_shortgpt_baselines(prune_config):
    from trainer.stages.pruning import STAGES

    out = STAGES["prune-tinyfusion"](prune_config, "prune-tinyfusion")
    d = json.loads((out / "decision.json").read_text())
    assert not d["couple_pairs"] and d["pair_probabilities"] == [] and not d["search_lora_kept"]
    kept = torch.zeros(8)
    kept[d["kept_blocks"]] = 1
    assert kept.view(2, 4).sum(1).tolist() == [2, 2]
    assert TinySRTransformer.from_pretrained(out / "transformer").config.num_layers == 4

    out = STAGES["prune-shortgpt"](prune_config, "prune-shortgpt")
    d = json.loads((out / "decision.json").read_text())
    assert len(d["kept_blocks"]) == 4 and len(d["block_influence"]) == 8
    assert d["kept_blocks"] == shortgpt_keep(torch.tensor(d["block_influence"]), 4)
    assert TinySRTransformer.from_pretrained(out / "transformer").config.num_layers == 4
