"""recipe="official" gives, byte for byte, the PNG the release scripts save for the same weights.

The reference below is a step-by-step transcription of `test/test_tinysr.py` (Microtreei/TinySR)
and `test/test_tsdsr.py` + `utils/wavelet_color_fix.py` (Microtreei/TSD-SR, Apache-2.0): their
preprocessing, `tile_sample` with `_gaussian_weights`, decoding, ToPILImage, PIL resize and colour
fixes, in their order and dtypes, with the pipeline's transformer and VAE standing in for the
released modules. It shares no code with `tinysr/official.py` or `tinysr/color.py`.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from tinysr import TinySRPipeline, TinySRTransformer, TSDSRPipeline, load_pipeline
from tinysr.official import official_sizes, official_tile_offsets

from .conftest import TINY_STUDENT, make_kl, make_sd3, make_tiny_vae


# ---- utils/wavelet_color_fix.py, transcribed ----
def calc_mean_std(feat, eps=1e-5):
    b, c = feat.size()[:2]
    feat_var = feat.reshape(b, c, -1).var(dim=2) + eps
    feat_std = feat_var.sqrt().reshape(b, c, 1, 1)
    feat_mean = feat.reshape(b, c, -1).mean(dim=2).reshape(b, c, 1, 1)
    return feat_mean, feat_std


def adaptive_instance_normalization(content, style):
    size = content.size()
    style_mean, style_std = calc_mean_std(style)
    content_mean, content_std = calc_mean_std(content)
    normalized = (content - content_mean.expand(size)) / content_std.expand(size)
    return normalized * style_std.expand(size) + style_mean.expand(size)


def wavelet_blur(image, radius):
    kernel = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]], dtype=image.dtype)
    kernel = kernel[None, None].repeat(3, 1, 1, 1)
    image = torch.nn.functional.pad(image, (radius, radius, radius, radius), mode="replicate")
    return torch.nn.functional.conv2d(image, kernel, groups=3, dilation=radius)


def wavelet_decomposition(image, levels=5):
    high_freq = torch.zeros_like(image)
    for i in range(levels):
        low_freq = wavelet_blur(image, 2**i)
        high_freq += image - low_freq
        image = low_freq
    return high_freq, low_freq


def script_color_fix(method, target, source):
    target_tensor = transforms.ToTensor()(target).unsqueeze(0)
    source_tensor = transforms.ToTensor()(source).unsqueeze(0)
    if method == "adain":
        result = adaptive_instance_normalization(target_tensor, source_tensor)
    else:
        result = wavelet_decomposition(target_tensor)[0] + wavelet_decomposition(source_tensor)[1]
    return transforms.ToPILImage()(result.squeeze(0).clamp_(0.0, 1.0))


# ---- test/test_tinysr.py and test/test_tsdsr.py, transcribed ----
def _gaussian_weights(tile_width, tile_height, nbatches, channels):
    from numpy import exp, pi, sqrt

    var = 0.01
    midpoint = (tile_width - 1) / 2
    x_probs = [exp(-(x - midpoint) * (x - midpoint) / (tile_width * tile_width) / (2 * var)) / sqrt(2 * pi * var) for x in range(tile_width)]
    midpoint = tile_height / 2
    y_probs = [exp(-(y - midpoint) * (y - midpoint) / (tile_height * tile_height) / (2 * var)) / sqrt(2 * pi * var) for y in range(tile_height)]
    return torch.tile(torch.tensor(np.outer(y_probs, x_probs)), (nbatches, channels, 1, 1))


def tile_sample(lq_latent, transformer_call, tile_size, tile_overlap, channels):
    with torch.no_grad():
        _, _, h, w = lq_latent.size()
        if h * w <= tile_size * tile_size:
            return transformer_call(lq_latent)
        tile_size = min(tile_size, min(h, w))
        tile_weights = _gaussian_weights(tile_size, tile_size, 1, channels)
        grid_rows, cur_x = 0, 0
        while cur_x < lq_latent.size(-1):
            cur_x = max(grid_rows * tile_size - tile_overlap * grid_rows, 0) + tile_size
            grid_rows += 1
        grid_cols, cur_y = 0, 0
        while cur_y < lq_latent.size(-2):
            cur_y = max(grid_cols * tile_size - tile_overlap * grid_cols, 0) + tile_size
            grid_cols += 1

        def offsets(row, col, ofs):
            ofs_x, ofs_y = ofs
            if col < grid_cols - 1 or row < grid_rows - 1:
                ofs_x = max(row * tile_size - tile_overlap * row, 0)
                ofs_y = max(col * tile_size - tile_overlap * col, 0)
            if row == grid_rows - 1:
                ofs_x = w - tile_size
            if col == grid_cols - 1:
                ofs_y = h - tile_size
            return ofs_x, ofs_y

        input_list, noise_preds, ofs = [], [], (0, 0)
        for row in range(grid_rows):
            for col in range(grid_cols):
                ofs = offsets(row, col, ofs)
                input_list.append(lq_latent[:, :, ofs[1] : ofs[1] + tile_size, ofs[0] : ofs[0] + tile_size])
                if len(input_list) == 1 or col == grid_cols - 1:
                    model_out = transformer_call(torch.cat(input_list, dim=0))
                    input_list = []
                noise_preds.append(model_out)
        noise_pred = torch.zeros(lq_latent.shape)
        contributors = torch.zeros(lq_latent.shape)
        for row in range(grid_rows):
            for col in range(grid_cols):
                ofs = offsets(row, col, ofs)
                sl = (slice(None), slice(None), slice(ofs[1], ofs[1] + tile_size), slice(ofs[0], ofs[0] + tile_size))
                noise_pred[sl] += noise_preds[row * grid_cols + col] * tile_weights
                contributors[sl] += tile_weights
        noise_pred /= contributors
        return noise_pred


def run_script(pipe, path, align_method, teacher, tile=64, overlap=8, weight_dtype=torch.float32):
    """The per-image loop of the scripts (CPU), returning the PNG they would save."""
    vae, transformer = pipe.vae, pipe.transformer
    lr = Image.open(path).convert("RGB")
    ori_width, ori_height = lr.size
    resize_flag = False
    if ori_width < 512 // 4 or ori_height < 512 // 4:
        scale = (512 // 4) / min(ori_width, ori_height)
        new_width, new_height = int(scale * ori_width), int(scale * ori_height)
        resize_flag = True
    else:
        new_width, new_height = ori_width, ori_height
    new_width, new_height = 4 * new_width, 4 * new_height
    if new_width % 8 or new_height % 8:
        resize_flag = True
        new_width, new_height = new_width - new_width % 8, new_height - new_height % 8
    lr_scale = lr.resize((int(ori_width * 4), int(ori_height * 4)))
    pixel_values = transforms.ToTensor()(lr).unsqueeze(0).to(dtype=weight_dtype)
    with torch.no_grad():
        pixel_values = torch.nn.functional.interpolate(pixel_values, size=(new_height, new_width), mode="bicubic", align_corners=False)
        pixel_values = (pixel_values * 2 - 1).to(dtype=weight_dtype)
        if teacher:
            pixel_values = pixel_values.clamp(-1, 1)
            torch.manual_seed(7)  # the script samples unseeded; the pipeline takes seed=7
            model_input = (vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor).to(dtype=weight_dtype)
            prompt, pooled = pipe.prompt_embeds, pipe.pooled_embeds

            def call(x):
                t = torch.tensor([1000.0], dtype=weight_dtype)
                return transformer(hidden_states=x, timestep=t, encoder_hidden_states=prompt, pooled_projections=pooled, return_dict=False)[0]
        else:
            model_input = (vae.encode(pixel_values) * vae.config.scaling_factor).to(dtype=weight_dtype)
            call = transformer
        model_pred = tile_sample(model_input, call, tile, overlap, model_input.shape[1]).to(dtype=weight_dtype)
        latent_stu = model_input - model_pred
        image = vae.decode(latent_stu / vae.config.scaling_factor)
        image = (image.sample if teacher else image).squeeze(0).clamp(-1, 1)
    image_pil_image = transforms.ToPILImage()(image.cpu() / 2 + 0.5)
    if resize_flag:
        image_pil_image = image_pil_image.resize((int(ori_width * 4), int(ori_height * 4)))
    if align_method == "adain":
        image_pil_image = script_color_fix("adain", image_pil_image, lr)
    elif align_method == "wavelet":
        image_pil_image = script_color_fix("wavelet", image_pil_image, lr_scale)
    return np.asarray(image_pil_image)


def photo(path, width, height, seed, orientation=1):
    """A smooth random photo-like 8-bit PNG, with an EXIF orientation tag when not 1."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, height // 8 + 2, width // 8 + 2, generator=g)
    rgb = torch.nn.functional.interpolate(base, size=(height, width), mode="bicubic").clamp(0, 1)[0]
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path, exif=exif)
    return path


@pytest.fixture(scope="module")
def pipes():
    """The bundled demo TinySR (trained weights, outputs spread over 0-255), a random AutoencoderKL teacher."""
    teacher = TSDSRPipeline(make_sd3(seed=13), make_kl(seed=14), torch.randn(1, 5, 32), torch.randn(1, 24))
    tinysr = load_pipeline("tinysr")
    tinysr.remove_token_pattern = False  # the scripts know no such step (test_pipeline checks the official path takes it)
    return {"tinysr": tinysr, "tsdsr": teacher}


@pytest.mark.parametrize(
    "model,size,align,tile,extra",
    [
        ("tinysr", (128, 128), "adain", 32, {}),  # latent 128 (the demo VAE downsamples 4x): 25 tiles, up to 4 per pixel
        ("tinysr", (144, 136), "wavelet", 32, {"orientation": 6}),  # the scripts ignore EXIF rotation
        ("tinysr", (37, 53), "none", 32, {}),  # enlarged, trimmed to a multiple of 8, PIL-resized back
        ("tsdsr", (128, 128), "wavelet", 64, {}),  # one transformer call
        ("tsdsr", (144, 128), "adain", 64, {}),  # latent 72x64: two 64-tiles
        ("tsdsr", (53, 37), "none", 32, {}),
        ("tsdsr", (144, 128), "wavelet", 64, {"dtype": torch.float16}),  # the scripts' default precision
    ],
)
def test_official_recipe_is_byte_identical_to_the_scripts(pipes, tmp_path, model, size, align, tile, extra):
    dtype = extra.get("dtype", torch.float32)
    pipe = pipes[model].to(dtype=dtype)
    path = photo(tmp_path / "lr.png", *size, seed=sum(size), orientation=extra.get("orientation", 1))
    try:
        ours = pipe(str(path), recipe="official", color_fix=align, tile_size=tile, seed=7 if model == "tsdsr" else None)
        expected = run_script(pipe, path, align, teacher=model == "tsdsr", tile=tile, weight_dtype=dtype)
    finally:
        pipe.to(dtype=torch.float32)
    assert 50 < expected.mean() < 200 and expected.std() > 10
    got = np.asarray(ours.pil)
    assert ours.dtype == ("fp16" if dtype == torch.float16 else "fp32")
    assert got.shape == expected.shape == (size[1] * 4, size[0] * 4, 3)
    assert np.array_equal(got, expected), f"{(got != expected).sum()} values differ"
    if dtype == torch.float32:
        default = np.asarray(pipe(str(path), color_fix=align).pil)
        assert not np.array_equal(default, expected)  # the default recipe is a different one


@pytest.mark.parametrize("model", ["tinysr", "tsdsr"])
def test_official_recipe_runs_in_bf16(pipes, tmp_path, model):
    """`auto` is bf16 on a CPU with native bf16; the scripts never ran bf16 and numpy has no bf16 (a TypeError there)."""
    pipe = pipes[model].to(dtype=torch.bfloat16)
    path = photo(tmp_path / "lr.png", 48, 40, seed=5)
    try:
        ours = pipe(str(path), recipe="official", seed=7)
    finally:
        pipe.to(dtype=torch.float32)
    fp32 = np.asarray(pipe(str(path), recipe="official", seed=7).pil).astype(float)
    got = np.asarray(ours.pil).astype(float)
    assert ours.dtype == "bf16" and got.shape == fp32.shape == (160, 192, 3)
    assert np.abs(got - fp32).mean() < 8  # the same picture, bf16 rounding apart


def test_official_helpers_follow_the_script_rules():
    assert official_sizes(128, 128) == (512, 512, False)
    assert official_sizes(130, 127) == (512, 520, True)  # int(128/127*130) = 131 -> 524 -> 520
    assert official_sizes(37, 53) == (728, 512, True)
    assert official_tile_offsets(64, 64, 8) == [0]
    assert official_tile_offsets(72, 64, 8) == [0, 8]
    assert official_tile_offsets(130, 32, 8) == [0, 24, 48, 72, 96, 98]


def test_official_recipe_seed_and_errors(pipes, tmp_path):
    pipe = pipes["tsdsr"]
    path = photo(tmp_path / "lr.png", 64, 64, seed=3)
    a, b = (pipe(str(path), recipe="official", seed=s).image for s in (1, 1))
    assert torch.equal(a, b)
    assert not torch.equal(a, pipe(str(path), recipe="official", seed=2).image)
    with pytest.raises(ValueError, match="recipe"):
        pipe(str(path), recipe="paper")
    with pytest.raises(ValueError, match="position table"):
        pipe(str(path), recipe="official", tile_size=128)
    wide = TinySRPipeline(TinySRTransformer(**{**TINY_STUDENT, "pos_embed_max_size": 64}), make_tiny_vae())
    with pytest.raises(ValueError, match="overlap 70 must be smaller than the tile, here 64"):  # the script would loop for ever
        wide(str(photo(tmp_path / "wide.png", 600, 128, seed=4)), recipe="official", tile_size=128, tile_overlap=70)
