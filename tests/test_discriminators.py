"""The projected discriminator and its DINOv2 condition on tiny random ViTs: shapes, frozen backbone, readout,
DiffAugment, a falling hinge loss, and MissingWeightsError offline."""

import time

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from tinysr.errors import MissingWeightsError
from trainer import discriminators
from trainer.discriminators import DinoProjectedDiscriminator, DinoV2ClsCondition


def tiny_vit(seed=0, depth=12):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=32, depth=depth, num_heads=2)


def tiny_dinov2(seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=448, patch_size=14, embed_dim=32, depth=2, num_heads=2, reg_tokens=4, no_embed_class=True)


def images(n, size, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("c_dim", [0, 8])
def test_logit_shape(size, c_dim):
    disc = DinoProjectedDiscriminator(c_dim=c_dim, p_crop=1.0, backbone=tiny_vit())
    c = torch.randn(2, c_dim) if c_dim else None
    with torch.no_grad():
        assert disc(images(2, size), c).shape == (2, 5 * 196)


def test_backbone_frozen_heads_trainable_grad_reaches_image():
    disc = DinoProjectedDiscriminator(backbone=tiny_vit()).train()
    assert not disc.backbone.training and all(h.training for h in disc.heads)
    assert not any(p.requires_grad for p in disc.backbone.parameters())
    assert all(p.requires_grad for p in disc.heads.parameters())
    x = images(2, 64).requires_grad_(True)
    disc(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.backbone.parameters())


def test_readout_adds_cls_and_drops_it():
    disc = DinoProjectedDiscriminator(diffaug=False, backbone=tiny_vit())
    tokens = torch.tensor([[[1.0, 2.0], [10.0, 20.0], [30.0, 40.0]]])
    assert torch.equal(disc.readout(tokens), torch.tensor([[[11.0, 31.0], [22.0, 42.0]]]))


def test_heads_see_timm_intermediates_in_release_order():
    """Head k judges the readout of block hooks[k] (the last head: the embedding), as timm computes them."""
    disc = DinoProjectedDiscriminator(diffaug=False, backbone=tiny_vit()).eval()
    seen = []
    for head in disc.heads:
        head.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    x = images(2, 64)
    with torch.no_grad():
        disc(x)
        y = disc.preprocess(x)
        blocks = disc.backbone.forward_intermediates(y, indices=[2, 5, 8, 11], intermediates_only=True, output_fmt="NLC", return_prefix_tokens=True)
        vit = disc.backbone
        embedded = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(y))))
    expected = [(patch + prefix).transpose(1, 2) for patch, prefix in blocks]
    expected.append((embedded[:, 1:] + embedded[:, :1]).transpose(1, 2))
    assert len(seen) == 5
    for got, want in zip(seen, expected, strict=True):
        assert got.shape == (2, 32, 196)
        torch.testing.assert_close(got, want)


def test_preprocess_maps_to_imagenet_normalised_224():
    disc = DinoProjectedDiscriminator(diffaug=False, backbone=tiny_vit())
    y = disc.preprocess(torch.zeros(1, 3, 64, 64))
    assert y.shape == (1, 3, 224, 224)
    torch.testing.assert_close(y * disc.std + disc.mean, torch.full_like(y, 0.5))


def test_large_images_cropped_to_224_with_p_crop():
    """A 256 px image is cut to one 224 px window (p_crop=1) or area-resized whole (p_crop=0)."""
    col = torch.arange(256.0).view(1, 1, 1, 256).expand(2, 3, 256, 256) / 255 * 2 - 1
    for p_crop in (1.0, 0.0):
        disc = DinoProjectedDiscriminator(diffaug=False, p_crop=p_crop, backbone=tiny_vit())
        y = disc.preprocess(col) * disc.std + disc.mean
        whole = F.interpolate((col + 1) / 2, size=224, mode="area")
        left = round(y[0, 0, 0, 0].item() * 255)
        want = ((col + 1) / 2)[..., :224, left : left + 224] if p_crop else whole
        torch.testing.assert_close(y, want)


def test_translation_deterministic_and_bounded():
    x = torch.zeros(16, 1, 64, 64)
    x[:, :, 32, 32] = 1
    moved = discriminators.translate(x, generator=torch.Generator().manual_seed(0))
    assert moved.shape == x.shape
    assert torch.equal(moved, discriminators.translate(x, generator=torch.Generator().manual_seed(0)))
    assert (moved.flatten(1).sum(1) == 1).all()
    ys, xs = moved[:, 0].flatten(1).argmax(1).div(64, rounding_mode="floor"), moved[:, 0].flatten(1).argmax(1) % 64
    assert ((ys - 32).abs() <= 0.125 * 64).all() and ((xs - 32).abs() <= 0.125 * 64).all()
    assert len(set(zip(ys.tolist(), xs.tolist(), strict=True))) > 1


def test_translation_pads_with_zeros_and_is_differentiable():
    x = torch.ones(8, 3, 32, 32, requires_grad=True)
    out = discriminators.translate(x, generator=torch.Generator().manual_seed(1))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    out.sum().backward()
    assert x.grad.shape == x.shape and x.grad.sum() == out.sum()


def test_cutout_zeroes_a_clipped_half_size_square():
    """Each image gets a zero rectangle: the full 32 x 32 square inside, clipped to >= 16 per side at a border;
    over many images the zeroed fraction matches a square whose centre is uniform over the 65 x 65 positions."""
    x = torch.ones(512, 1, 64, 64)
    out = discriminators.cutout(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, discriminators.cutout(x, generator=torch.Generator().manual_seed(0)))
    for img in out[:, 0]:
        rows, cols = (img == 0).any(1).nonzero()[:, 0], (img == 0).any(0).nonzero()[:, 0]
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert (img[top:bottom, left:right] == 0).all() and (img == 0).sum() == (bottom - top) * (right - left)
        for lo, hi in ((top, bottom), (left, right)):
            assert 16 <= hi - lo <= 32 and (hi - lo == 32 or lo == 0 or hi == 64)
    side = sum(min(64, c + 16) - max(0, c - 16) for c in range(65)) / 65
    assert abs((out == 0).float().mean().item() - (side / 64) ** 2) < 0.02


def test_hinge_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    disc = DinoProjectedDiscriminator(diffaug=False, backbone=tiny_vit(depth=4), hooks=(0, 1, 2, 3)).train()
    real = F.interpolate(torch.rand(4, 3, 8, 8) * 2 - 1, size=64, mode="bicubic", align_corners=False).clamp(-1, 1)
    fake = torch.rand(4, 3, 64, 64) * 2 - 1
    opt = torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], lr=2e-4)
    losses = []
    for _ in range(30):
        logits = disc(torch.cat([real, fake]))
        loss = F.relu(1 - logits[:4]).mean() + F.relu(1 + logits[4:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses


def test_condition_changes_logits():
    disc = DinoProjectedDiscriminator(c_dim=8, diffaug=False, backbone=tiny_vit()).eval()
    x, c = images(1, 64), torch.randn(2, 8)
    with torch.no_grad():
        a, b = disc(x.expand(2, -1, -1, -1), c)
    assert not torch.allclose(a, b)


def test_dinov2_condition_is_detached_final_cls_at_448():
    model = tiny_dinov2()
    seen = []
    model.patch_embed.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    cond = DinoV2ClsCondition(model=model).train()
    assert not cond.model.training and not any(p.requires_grad for p in cond.parameters())
    x = torch.full((2, 3, 64, 96), -1.0, requires_grad=True)
    c = cond(x)
    assert c.shape == (2, 32) and not c.requires_grad
    assert seen[0].shape == (2, 3, 448, 448) and torch.equal(seen[0], torch.zeros_like(seen[0]))
    with torch.no_grad():
        torch.testing.assert_close(c, model.forward_features(seen[0])[:, 0])


def test_missing_dino_weights_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(MissingWeightsError) as e:
        DinoProjectedDiscriminator()
    assert time.monotonic() - start < 30
    msg = str(e.value)
    assert "timm/vit_small_patch16_224.dino" in msg and "HF_HOME" in msg and "discriminator: conv" in msg
    assert str(tmp_path / "hub") in msg
