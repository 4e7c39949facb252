import copy

import pytest
import torch
from peft import LoraConfig

from tinysr.convert import tinysr_transformer_from_sd3
from tinysr.release import TSDSR_TRANSFORMER_LORA_TARGETS
from tinysr.weights import merge_lora

from .conftest import make_sd3


def sd3_zero_text(sd3, x, pooled, timestep=1000.0):
    b = x.shape[0]
    return sd3(
        x,
        encoder_hidden_states=torch.zeros(b, 0, sd3.config.joint_attention_dim),
        pooled_projections=pooled.expand(b, -1),
        timestep=torch.full((b,), timestep),
    ).sample


@torch.no_grad()
def test_all_blocks_match_sd3_with_zero_text_tokens():
    sd3 = make_sd3()
    pooled = torch.randn(1, 24)
    x = torch.randn(2, 16, 12, 20)
    student = tinysr_transformer_from_sd3(sd3, pooled)
    assert student.config.num_layers == 4
    ref = sd3_zero_text(sd3, x, pooled)
    assert ref.abs().max() > 0.1
    assert (student(x) - ref).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("keep", [[0, 2], [1, 3], [3], [0, 1, 3]])
def test_block_subset_matches_sd3_holding_only_those_blocks(keep):
    sd3 = make_sd3(seed=1)
    pooled = torch.randn(1, 24)
    x = torch.randn(1, 16, 16, 16)
    pruned = copy.deepcopy(sd3)
    pruned.transformer_blocks = torch.nn.ModuleList(pruned.transformer_blocks[i] for i in keep)
    student = tinysr_transformer_from_sd3(sd3, pooled, keep_blocks=keep)
    assert len(student.transformer_blocks) == len(keep)
    assert (student(x) - sd3_zero_text(pruned, x, pooled)).abs().max() < 1e-4


@torch.no_grad()
def test_other_timestep_and_qk_norm():
    sd3 = make_sd3(seed=2, qk_norm="rms_norm")
    pooled = torch.randn(1, 24)
    x = torch.randn(1, 16, 8, 8)
    student = tinysr_transformer_from_sd3(sd3, pooled, timestep=500.0)
    assert (student(x) - sd3_zero_text(sd3, x, pooled, 500.0)).abs().max() < 1e-4
    assert (student(x) - sd3_zero_text(sd3, x, pooled, 1000.0)).abs().max() > 1e-3


@torch.no_grad()
def test_unmerged_lora_is_folded_and_input_untouched():
    sd3 = make_sd3(seed=3)
    sd3.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=TSDSR_TRANSFORMER_LORA_TARGETS))
    before = {k: v.clone() for k, v in sd3.state_dict().items()}
    pooled = torch.randn(1, 24)
    x = torch.randn(1, 16, 8, 12)
    ref = sd3_zero_text(sd3, x, pooled)
    student = tinysr_transformer_from_sd3(sd3, pooled)
    assert (student(x) - ref).abs().max() < 1e-4
    assert all(torch.equal(before[k], v) for k, v in sd3.state_dict().items())
    merged = copy.deepcopy(sd3)
    merge_lora(merged)
    assert (tinysr_transformer_from_sd3(merged, pooled)(x) - ref).abs().max() < 1e-4


def test_bad_block_lists_are_refused():
    sd3 = make_sd3()
    for keep in ([], [4], [0, 0], [-1]):
        with pytest.raises(ValueError, match="keep_blocks"):
            tinysr_transformer_from_sd3(sd3, torch.zeros(1, 24), keep_blocks=keep)
