"""The authors' releases, loaded exactly as their test scripts load them.

TinySR (`Microtreei/TinySR`, `test/test_tinysr.py`): a 12-block transformer saved from the module tree
of `models/tinysr/tinysd3.py` (image stream only; `time_text_embed`, the adaLN linears and SD3's
position table kept), a LoRA file keyed `transformer.<module>.lora_A.weight`, a separable tiny VAE
and the pooled prompt. TSD-SR (`test/test_tsdsr.py`): SD3-medium plus two LoRA files (both keyed
`transformer.`, the VAE's too) and the cached prompt embeddings.

LoRA files are merged into the base weights (rank = alpha, so scale 1, as the scripts configure
them): adapters go exactly on the modules the file names; every module the official script adapts
must be filled (the script raises a KeyError otherwise); keys that fit no module are a warning,
as the script prints one.
"""

import math
import os
import re
import warnings
from pathlib import Path

import torch

from .errors import MissingWeightsError, WrongModelError
from .weights import SD3_MEDIUM, find_file, load_component, load_tensor_file, read_json, resolve_folder

# target_modules of the official test scripts (peft matches a module whose name is, or ends with, one)
TSDSR_TRANSFORMER_LORA_TARGETS = [
    "to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "proj", "linear", "proj_out",
]
TSDSR_VAE_LORA_TARGETS = [
    "encoder.conv_in", "encoder.conv_out", "quant_conv",
    *(f"encoder.down_blocks.{b}.resnets.{r}.conv{c}" for b in range(4) for r in range(2) for c in (1, 2)),
    *(f"encoder.down_blocks.{b}.resnets.0.conv_shortcut" for b in (1, 2)),
    *(f"encoder.down_blocks.{b}.downsamplers.0.conv" for b in range(3)),
    *(f"encoder.mid_block.attentions.0.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")),
    *(f"encoder.mid_block.resnets.{r}.conv{c}" for r in range(2) for c in (1, 2)),
]
TINYSR_TRANSFORMER_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj", "linear", "linear_1", "linear_2", "net.2"]

TINYSR_RELEASE_TRANSFORMER = "tinybackbone/prune-12-merge-tinysr/transformer"
TINYSR_RELEASE_VAE = "vae/separable"
TINYSR_RELEASE_LORA = "tinysr/transformer.safetensors"
EMBEDDING_FOLDERS = (".", "default", "dataset/default", "../dataset/default", "embeddings")

TINYSR_RELEASE_HINT = (
    "Download the official TinySR checkpoint folder (it holds tinybackbone/, vae/ and tinysr/) and pass it "
    "(convert --release, from_release, or as the model), and the folder holding pool_embeds.pt "
    "(convert --embeds, from_release's embeds, or TINYSR_EMBEDS_DIR) unless it is inside the checkpoint folder."
)
TSDSR_RELEASE_HINT = (
    "Download the TSD-SR LoRA files (transformer.safetensors, vae.safetensors) and the prompt embeddings "
    "(prompt_embeds.pt, pool_embeds.pt) from the TSD-SR release, and pass their folders."
)

LORA_KEY = re.compile(r"^(?P<prefix>[^.]+)\.(?P<module>.+)\.lora_(?P<half>[AB])\.weight$")

# the module tree of the official TinySD3Transformer2DModel (models/tinysr/tinysd3.py + tinysd3block.py)
TINYSR_RELEASE_TOP = [
    "pos_embed.proj.weight", "pos_embed.proj.bias", "pos_embed.pos_embed", "norm_out.linear.weight", "norm_out.linear.bias",
    "proj_out.weight", "proj_out.bias",
    *(f"time_text_embed.{e}.{l}.{p}" for e in ("timestep_embedder", "text_embedder") for l in ("linear_1", "linear_2") for p in ("weight", "bias")),
]
TINYSR_RELEASE_BLOCK = [
    f"{m}.{p}" for m in ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2")
    for p in ("weight", "bias")
]
# buffers the official model fills on its first forward; saved empty by prune_merge.py
TINYSR_RELEASE_EMPTY_BUFFERS = ("scale", "shift", "gate_msa", "shift_msa", "scale_msa", "gate_mlp", "shift_mlp", "scale_mlp")
TEXT_STREAM = ("context_embedder", "_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def read_lora_file(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """`{module: {"A": lora_A, "B": lora_B}}` (fp32) from a file in the releases' layout."""
    state = load_tensor_file(path)
    if not isinstance(state, dict) or not state:
        raise WrongModelError(f"{path}: expected a LoRA state dict, found {type(state).__name__}")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    prefixes = set()
    for key, value in state.items():
        match = LORA_KEY.match(key)
        if not match:
            raise WrongModelError(
                f"{path}: {key!r} is not a LoRA weight of the release layout (transformer.<module>.lora_A.weight)"
            )
        prefixes.add(match["prefix"])
        modules.setdefault(match["module"], {})[match["half"]] = value.float()
    if len(prefixes) != 1:
        raise WrongModelError(f"{path}: expected one key prefix (transformer.), found {sorted(prefixes)}")
    halves = [m for m, ab in modules.items() if set(ab) != {"A", "B"}]
    if halves:
        raise WrongModelError(f"{path}: {halves[0]} has only lora_{''.join(modules[halves[0]])}; the file is incomplete")
    return modules


def lora_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B @ A reshaped like the base weight (Linear, or Conv2d: A is (r, in, kh, kw), B is (out, r, 1, 1))."""
    return (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])


def adapted_modules(weights: dict[str, torch.Tensor], targets: list[str]) -> list[str]:
    """The Linear/Conv2d modules peft would adapt for `targets`, by the names of their weights."""
    names = [k[: -len(".weight")] for k, v in weights.items() if k.endswith(".weight") and v.ndim in (2, 4)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


@torch.no_grad()
def merge_release_lora(weights: dict[str, torch.Tensor], path: Path, targets: list[str]) -> None:
    """Add the LoRA in `path` to `weights` (module weights by name, changed in place)."""
    lora = read_lora_file(path)
    unknown = sorted(m for m in lora if f"{m}.weight" not in weights)
    if len(unknown) == len(lora):
        raise WrongModelError(
            f"{path}: none of its {len(lora)} LoRA layers (e.g. {unknown[0]}) is a module of this model; "
            "it is the LoRA of another model"
        )
    unfilled = [m for m in adapted_modules(weights, targets) if m not in lora]
    if unfilled:
        raise WrongModelError(
            f"{path}: no LoRA weights for {len(unfilled)} layer(s) the official script adapts, e.g. "
            f"{unfilled[0]}.lora_A.weight; it is the LoRA of another model or an incomplete file"
        )
    if unknown:
        warnings.warn(f"{path}: {len(unknown)} LoRA layer(s) fit no module of this model and were ignored: {unknown}", stacklevel=2)
    for module, ab in lora.items():
        if module in unknown:
            continue
        weight = weights[f"{module}.weight"]
        a, b = ab["A"], ab["B"]
        if a.shape[0] != b.shape[1] or b.shape[0] != weight.shape[0] or a.shape[1:] != weight.shape[1:]:
            raise WrongModelError(
                f"{path}: LoRA of {module} has shapes A {tuple(a.shape)}, B {tuple(b.shape)}; the weight is {tuple(weight.shape)}"
            )
        weight.add_(lora_delta(a, b).to(weight.dtype))


def load_embedding(path: Path, size: int, what: str) -> torch.Tensor:
    """A cached prompt tensor whose last dimension must be `size`."""
    tensor = load_tensor_file(path)
    if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0 or tensor.shape[-1] != size:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise WrongModelError(f"{path}: holds {shape}; this model needs {what} of size {size} in the last dimension")
    return tensor.float()


def load_pooled(path: Path, size: int) -> torch.Tensor:
    """`pool_embeds.pt`: exactly one pooled prompt embedding of `size` values."""
    pooled = load_embedding(path, size, "a pooled prompt embedding")
    if pooled.numel() != size:
        raise WrongModelError(f"{path}: holds {tuple(pooled.shape)}; expected one pooled embedding of size {size}")
    return pooled.reshape(1, -1)


def embedding_folders(root: Path, explicit: str | os.PathLike | None) -> list[Path]:
    if explicit is not None:
        return [Path(explicit)]
    return [(root / sub) for sub in EMBEDDING_FOLDERS]


def load_state_file(folder: Path, hint: str) -> tuple[Path, dict[str, torch.Tensor]]:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            state = load_tensor_file(folder / name)
            if not isinstance(state, dict):
                raise WrongModelError(f"{folder / name}: expected a state dict, found {type(state).__name__}")
            return folder / name, {k: v.float() for k, v in state.items()}
    raise MissingWeightsError("diffusion_pytorch_model.safetensors", [str(folder.resolve())], hint)


def check_tinysr_release_tree(state: dict, path: Path, config: dict) -> None:
    """The keys must be exactly the official TinySD3 tree's, with as many blocks as the config says."""
    text = sorted(k for k in state if any(t in k for t in TEXT_STREAM))
    if text:
        raise WrongModelError(
            f"{path}: has a text stream ({text[0]}, ...): a full SD3 / TSD-SR transformer, not the TinySR release "
            f"(its config names {config.get('_class_name')}; the release's is TinySD3Transformer2DModel)"
        )
    blocks = {int(m[1]) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    n = len(blocks)
    if blocks != set(range(n)):
        raise WrongModelError(f"{path}: transformer blocks {sorted(blocks)} are not numbered 0..{n - 1}")
    if config.get("num_layers", n) != n:
        raise WrongModelError(f"{path}: holds {n} blocks but its config.json says num_layers={config['num_layers']}")
    expected = set(TINYSR_RELEASE_TOP) | {f"transformer_blocks.{i}.{k}" for i in range(n) for k in TINYSR_RELEASE_BLOCK}
    missing = sorted(expected - set(state))
    buffers = {k for k in set(state) - expected if k.split(".")[-1] in TINYSR_RELEASE_EMPTY_BUFFERS and state[k].numel() == 0}
    unexpected = sorted(set(state) - expected - buffers)
    if missing or unexpected:
        raise WrongModelError(
            f"{path}: not the TinySR release transformer (models/tinysr/tinysd3.py): "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )


def release_pos_embed_size(table: torch.Tensor, path: Path, config: dict) -> int:
    """SD3's square position table decides `pos_embed_max_size`; a config that disagrees is reported."""
    side = math.isqrt(table.shape[1]) if table.ndim == 3 else 0
    if table.ndim != 3 or table.shape[0] != 1 or side * side != table.shape[1]:
        raise WrongModelError(f"{path}: pos_embed.pos_embed has shape {tuple(table.shape)}; expected a square (1, N*N, dim) table")
    stated = config.get("pos_embed_max_size")
    if stated is not None and stated != side:
        warnings.warn(
            f"{path}: config.json says pos_embed_max_size={stated} but the stored position table is {side}x{side}; using {side}",
            stacklevel=2,
        )
    return side


def load_tinysr_release(root: str | os.PathLike, embeds: str | os.PathLike | None = None):
    """The official TinySR checkpoint -> (TinySRTransformer with LoRA merged, TinyAutoencoder), fp32."""
    from .convert import tinysr_transformer_from_release

    root = Path(root)
    tdir = root / TINYSR_RELEASE_TRANSFORMER
    if not tdir.is_dir():
        raise MissingWeightsError(TINYSR_RELEASE_TRANSFORMER, [str(root.resolve())], TINYSR_RELEASE_HINT)
    config = read_json(tdir / "config.json")
    path, state = load_state_file(tdir, TINYSR_RELEASE_HINT)
    check_tinysr_release_tree(state, path, config)
    lora = find_file(Path(TINYSR_RELEASE_LORA).name, [root / Path(TINYSR_RELEASE_LORA).parent, root], TINYSR_RELEASE_HINT)
    merge_release_lora(state, lora, TINYSR_TRANSFORMER_LORA_TARGETS)
    pooled = load_pooled(
        find_file("pool_embeds.pt", embedding_folders(root, embeds), TINYSR_RELEASE_HINT),
        state["time_text_embed.text_embedder.linear_1.weight"].shape[1],
    )
    side = release_pos_embed_size(state["pos_embed.pos_embed"], path, config)
    try:
        transformer = tinysr_transformer_from_release(state, config, pooled, side)
    except (RuntimeError, ValueError) as e:
        raise WrongModelError(f"{path}: weights do not fit its config.json ({str(e).splitlines()[0]})") from None
    return transformer, load_tinysr_release_vae(root / TINYSR_RELEASE_VAE)


def load_tinysr_release_vae(vdir: Path):
    """`vae/separable`: the release's AutoencoderTiny (models/vae/tinyvae.py), config keys defaulting as in diffusers."""
    from .models import TinyAutoencoder

    config = read_json(vdir / "config.json")
    path, state = load_state_file(vdir, TINYSR_RELEASE_HINT)
    enc_blocks = list(config.get("num_encoder_blocks", [1, 3, 3, 3]))
    dec_blocks = list(config.get("num_decoder_blocks", [3, 3, 3, 1]))
    widths = set(config.get("encoder_block_out_channels", [64] * 4)) | set(config.get("decoder_block_out_channels", [64] * 4))
    stages = len(enc_blocks) - 1
    fits = (
        stages >= 1 and enc_blocks[0] == 1 and len(set(enc_blocks[1:])) == 1 and dec_blocks == enc_blocks[::-1]
        and len(widths) == 1 and config.get("act_fn", "relu") == "relu" and config.get("upsample_fn", "nearest") == "nearest"
        and config.get("upsampling_scaling_factor", 2) == 2
    )
    if not fits:
        raise WrongModelError(
            f"{vdir / 'config.json'}: an AutoencoderTiny layout TinySR does not use (blocks {enc_blocks}/{dec_blocks}, "
            f"widths {sorted(widths)}); expected one width, ReLU, nearest x2, blocks [1, n, n, n] / [n, n, n, 1]"
        )
    vae = TinyAutoencoder(
        latent_channels=config.get("latent_channels", 4),
        channels=widths.pop(),
        num_stages=stages,
        blocks_per_stage=enc_blocks[-1],
        encoder_separable=any(k.startswith("encoder.") and ".depthwise." in k for k in state),
        decoder_separable=any(k.startswith("decoder.") and ".depthwise." in k for k in state),
        scaling_factor=config.get("scaling_factor", 1.0),
    )
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WrongModelError(f"{path} does not fit the TinySR VAE its config describes: {str(e).splitlines()[0]}") from None
    return vae


def load_tsdsr_release(
    sd3: str | os.PathLike = SD3_MEDIUM,
    lora_dir: str | os.PathLike = "checkpoint/tsdsr",
    embeds_dir: str | os.PathLike = "dataset/default",
    *,
    revision: str | None = None,
    token: str | None = None,
):
    """SD3 base + official TSD-SR LoRA files + cached prompt -> (transformer, vae, prompt, pooled), fp32, merged."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    base = resolve_folder(
        sd3, revision=revision, token=token, what="SD3 base model",
        allow_patterns=["transformer/*", "vae/*", "model_index.json"],
    )
    lora_dir, embeds_dir = Path(lora_dir), Path(embeds_dir)
    transformer_lora = find_file("transformer.safetensors", [lora_dir], TSDSR_RELEASE_HINT)
    vae_lora = find_file("vae.safetensors", [lora_dir], TSDSR_RELEASE_HINT)
    transformer = load_component(base, "transformer", {"SD3Transformer2DModel": SD3Transformer2DModel}, torch.float32)
    vae = load_component(base, "vae", {"AutoencoderKL": AutoencoderKL}, torch.float32)
    prompt = load_embedding(
        find_file("prompt_embeds.pt", [embeds_dir], TSDSR_RELEASE_HINT), transformer.config.joint_attention_dim, "prompt embeddings"
    )
    pooled = load_pooled(find_file("pool_embeds.pt", [embeds_dir], TSDSR_RELEASE_HINT), transformer.config.pooled_projection_dim)
    merge_release_lora(transformer.state_dict(keep_vars=True), transformer_lora, TSDSR_TRANSFORMER_LORA_TARGETS)
    merge_release_lora(vae.state_dict(keep_vars=True), vae_lora, TSDSR_VAE_LORA_TARGETS)
    return transformer.eval(), vae.eval(), prompt.reshape(1, -1, prompt.shape[-1]), pooled


def is_tinysr_release(folder: Path) -> bool:
    """An official TinySR checkpoint folder (tinybackbone/..., tinysr/, vae/)."""
    return (folder / TINYSR_RELEASE_TRANSFORMER / "config.json").is_file()



SD3_LICENSE = ("other", "stabilityai-ai-community", "https://huggingface.co/stabilityai/stable-diffusion-3-medium/blob/main/LICENSE.md")


def converted_model_card(kind: str, source: str, base: str) -> str:
    """The README.md `convert` writes beside converted weights: what they are, their base model and the licences that bind them."""
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__

    license_id, license_name, license_link = SD3_LICENSE
    data = ModelCardData(
        license=license_id, license_name=license_name, license_link=license_link, base_model=SD3_MEDIUM,
        library_name="tinysr", pipeline_tag="image-to-image", tags=["super-resolution", "one-step-diffusion", kind],
    )
    what = {
        "tinysr": "TinySR (the authors' pruned, condition-free SD3 transformer with their tiny VAE; LoRA merged, modulation folded)",
        "tsdsr": f"TSD-SR (SD3-medium from `{base}` with TSD-SR's LoRA merged into the transformer and VAE, and its cached prompt)",
    }[kind]
    body = f"""
# {what}

Converted with `python -m tinysr convert {kind}` (tinysr {__version__}) from the official release at `{source}`
into tinysr's single-folder format (`model_index.json`, `transformer/`, `vae/`, safetensors). Load it with
`tinysr.load_pipeline("PATH_OR_REPO")` or `python -m tinysr upscale IMAGE -o OUT --model PATH_OR_REPO`.

## Licence

These weights derive from Stable Diffusion 3 medium (`{SD3_MEDIUM}`):
the Stability AI Community License ({license_link}) applies to them, together with the terms under which the
{"TinySR" if kind == "tinysr" else "TSD-SR"} authors released their checkpoint. Whoever uses or redistributes
this folder accepts both. The tinysr code that converted them is Apache-2.0.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
