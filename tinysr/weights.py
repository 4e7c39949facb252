"""Where weights come from: local folders, hub repos, and the official TinySR / TSD-SR releases.

Every missing file raises one `MissingWeightsError` naming the file, the places searched and
how to get it; every folder holding the wrong model raises `WrongModelError`.
"""

import inspect
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import MissingWeightsError, WrongModelError

SD3_MEDIUM = "stabilityai/stable-diffusion-3-medium-diffusers"
HUB_HINT = (
    "Pass a local folder, or a hub repo id (needs network access; set HF_TOKEN for gated repos such as "
    f"{SD3_MEDIUM}, and unset HF_HUB_OFFLINE)."
)

# LoRA targets of the official releases (rank = alpha = 64; "proj" also hits the patch-embedding conv).
TSDSR_TRANSFORMER_LORA_TARGETS = [
    "to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "proj", "linear", "proj_out",
]
TINYSR_TRANSFORMER_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj", "linear", "linear_1", "linear_2", "net.2"]
OFFICIAL_LORA_RANK = 64

TINYSR_RELEASE_TRANSFORMER = "tinybackbone/prune-12-merge-tinysr/transformer"
TINYSR_RELEASE_VAE = "vae/separable"
TINYSR_RELEASE_LORA = "tinysr/transformer.safetensors"
EMBEDDING_FOLDERS = (".", "default", "dataset/default", "../dataset/default", "embeddings")


def looks_like_hub_id(name: str) -> bool:
    parts = str(name).split("/")
    return len(parts) == 2 and all(parts) and not str(name).startswith((".", "~")) and "\\" not in str(name)


def resolve_folder(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    allow_patterns: list[str] | None = None,
    what: str = "model folder",
) -> Path:
    """A local folder as is, or a hub snapshot (cached; honours HF_HUB_OFFLINE and HF_TOKEN)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WrongModelError(f"{path} is a file; expected a {what}")
    if not looks_like_hub_id(str(model)):
        raise MissingWeightsError(str(path), [str(path.resolve())], f"No such {what}. {HUB_HINT}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(str(model), revision=revision, token=token, allow_patterns=allow_patterns))
    except GatedRepoError:
        hint = f"{model} is gated: accept its licence on the hub and set HF_TOKEN."
    except RepositoryNotFoundError:
        hint = f"No hub repo {model} (or it is private: set HF_TOKEN)."
    except RevisionNotFoundError:
        hint = f"{model} has no revision {revision!r}."
    except LocalEntryNotFoundError:
        hint = f"{model} is not in the local hub cache and the hub cannot be reached (HF_HUB_OFFLINE or no network)."
    except (HfHubHTTPError, OSError) as e:
        hint = f"Download of {model} failed: {e}"
    from huggingface_hub.constants import HF_HUB_CACHE

    raise MissingWeightsError(f"{model} (hub repo)", [f"hub cache {HF_HUB_CACHE}", f"local folder {path.resolve()}"], hint)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise MissingWeightsError(path.name, [str(path.parent)], "The folder is incomplete; re-download or re-convert it.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WrongModelError(f"{path} is not valid JSON ({e})") from None


def find_file(name: str, folders: list[Path], hint: str) -> Path:
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise MissingWeightsError(name, [str(f.resolve()) for f in folders], hint)


def load_component(folder: Path, subfolder: str, classes: dict, dtype: torch.dtype):
    """Load `folder/subfolder` with the model class its config names, refusing anything unexpected."""
    config = read_json(folder / subfolder / "config.json")
    name = config.get("_class_name")
    if name not in classes:
        raise WrongModelError(
            f"{folder / subfolder} holds a {name or 'unknown model'}; expected {' or '.join(classes)}"
        )
    weights = list((folder / subfolder).glob("diffusion_pytorch_model*.safetensors"))
    if not weights:
        raise MissingWeightsError(
            f"{subfolder}/diffusion_pytorch_model.safetensors", [str(folder / subfolder)],
            "The folder is incomplete; re-download or re-convert it.",
        )
    try:
        model, info = classes[name].from_pretrained(folder, subfolder=subfolder, torch_dtype=dtype, output_loading_info=True)
    except (ValueError, RuntimeError, OSError) as e:
        raise WrongModelError(f"{folder / subfolder}: weights do not fit its {name} config ({e})") from None
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[:3]}" for k, v in problems.items())
        raise WrongModelError(f"{folder / subfolder}: weights do not fit its {name} config ({detail})")
    return model


def load_tensor_file(path: Path) -> dict[str, torch.Tensor] | torch.Tensor:
    """safetensors, or a torch pickle opened with weights_only=True (never arbitrary code)."""
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_official_lora(model, path: Path, target_modules: list[str], adapter_name: str = "default") -> None:
    """Attach a peft LoRA (rank = alpha = 64) and fill it from an official `*.safetensors` file.

    Keys look like `transformer.<module>.lora_A.weight` (the prefix is `transformer.` in both
    TSD-SR files, `vae.` in some copies); every key must be used and every adapter weight filled.
    """
    from peft import LoraConfig

    state = load_tensor_file(path)
    prefixes = {k.split(".", 1)[0] for k in state}
    if len(prefixes) != 1:
        raise WrongModelError(f"{path}: expected one key prefix, found {sorted(prefixes)}")
    prefix = prefixes.pop() + "."
    ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
    rank = ranks.pop() if len(ranks) == 1 else OFFICIAL_LORA_RANK
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=target_modules)
    model.add_adapter(config, adapter_name=adapter_name)
    used = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{adapter_name}." not in name or ".lora_" not in name:
                continue
            key = prefix + name.replace(f".{adapter_name}", "")
            if key not in state:
                raise WrongModelError(f"{path}: no weight {key} for this model's LoRA layer {name}")
            if state[key].shape != param.shape:
                raise WrongModelError(f"{path}: {key} has shape {tuple(state[key].shape)}, model needs {tuple(param.shape)}")
            param.copy_(state[key])
            used.add(key)
    unused = sorted(set(state) - used)
    if unused:
        raise WrongModelError(f"{path}: {len(unused)} LoRA weights fit no layer of this model, e.g. {unused[:3]}")


def merge_lora(model) -> None:
    """Fold every LoRA adapter into the base weights and remove the adapter layers."""
    model.fuse_lora()
    model.unload_lora()


def vae_lora_targets(vae) -> list[str]:
    """TSD-SR's VAE LoRA: every conv/linear of the encoder (mid-block attention included) and quant_conv."""
    names = [n for n, m in vae.named_modules() if n.startswith("encoder.") and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return names + (["quant_conv"] if getattr(vae, "quant_conv", None) is not None else [])


def init_kwargs(cls, config: dict) -> dict:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in params}


def embedding_folders(root: Path, explicit: str | os.PathLike | None) -> list[Path]:
    if explicit is not None:
        return [Path(explicit)]
    return [(root / sub) for sub in EMBEDDING_FOLDERS]


TINYSR_RELEASE_HINT = (
    "Download the official TinySR checkpoint folder (it holds tinybackbone/, vae/ and tinysr/) and pass it with "
    "--release, and the folder holding pool_embeds.pt with --embeds."
)
TSDSR_RELEASE_HINT = (
    "Download the TSD-SR LoRA files (transformer.safetensors, vae.safetensors) and the prompt embeddings "
    "(prompt_embeds.pt, pool_embeds.pt) from the TSD-SR release, and pass their folders."
)


def load_state_file(folder: Path, hint: str) -> dict[str, torch.Tensor]:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return load_tensor_file(folder / name)
    raise MissingWeightsError("diffusion_pytorch_model.safetensors", [str(folder.resolve())], hint)


def load_tinysr_release(root: str | os.PathLike, embeds: str | os.PathLike | None = None):
    """The official TinySR checkpoint -> (TinySRTransformer with LoRA merged, TinyAutoencoder), fp32.

    The release stores a 12-block SD3 transformer (text stream removed, embedders kept) plus a
    LoRA and the pooled prompt; we rebuild it as an SD3 model, whose missing text parts are inert
    with zero text tokens, attach the LoRA, and fold everything with `tinysr_transformer_from_sd3`.
    """
    from diffusers import SD3Transformer2DModel

    from .convert import tinysr_transformer_from_sd3
    from .models import TinyAutoencoder

    root = Path(root)
    tdir = root / TINYSR_RELEASE_TRANSFORMER
    config = read_json(tdir / "config.json")
    sd3 = SD3Transformer2DModel(**init_kwargs(SD3Transformer2DModel, config))
    state = {k: v for k, v in load_state_file(tdir, TINYSR_RELEASE_HINT).items() if k != "pos_embed.pos_embed"}
    missing, unexpected = sd3.load_state_dict(state, strict=False)
    text_parts = ("context_embedder", "_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "pos_embed.pos_embed")
    bad_missing = [k for k in missing if not any(t in k for t in text_parts)]
    if bad_missing or unexpected:
        raise WrongModelError(
            f"{tdir} is not a TinySR release transformer: missing {bad_missing[:3]}, unexpected {unexpected[:3]}"
        )
    lora = find_file(Path(TINYSR_RELEASE_LORA).name, [root / Path(TINYSR_RELEASE_LORA).parent, root], TINYSR_RELEASE_HINT)
    load_official_lora(sd3, lora, TINYSR_TRANSFORMER_LORA_TARGETS)
    pooled = load_tensor_file(find_file("pool_embeds.pt", embedding_folders(root, embeds), TINYSR_RELEASE_HINT))
    transformer = tinysr_transformer_from_sd3(sd3.eval(), pooled.float())

    vdir = root / TINYSR_RELEASE_VAE
    vconfig = read_json(vdir / "config.json")
    vstate = load_state_file(vdir, TINYSR_RELEASE_HINT)
    blocks = vconfig.get("num_encoder_blocks", [1, 3, 3, 3])
    vae = TinyAutoencoder(
        latent_channels=vconfig.get("latent_channels", 16),
        channels=vconfig.get("encoder_block_out_channels", [64])[0],
        num_stages=len(blocks) - 1,
        blocks_per_stage=blocks[-1],
        encoder_separable=any(k.startswith("encoder.") and ".depthwise." in k for k in vstate),
        decoder_separable=any(k.startswith("decoder.") and ".depthwise." in k for k in vstate),
        scaling_factor=vconfig.get("scaling_factor", 1.5305),
    )
    try:
        vae.load_state_dict(vstate, strict=True)
    except RuntimeError as e:
        raise WrongModelError(f"{vdir} does not fit TinyAutoencoder: {str(e).splitlines()[0]}") from None
    return transformer, vae


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
    prompt = load_tensor_file(find_file("prompt_embeds.pt", [embeds_dir], TSDSR_RELEASE_HINT))
    pooled = load_tensor_file(find_file("pool_embeds.pt", [embeds_dir], TSDSR_RELEASE_HINT))
    transformer = load_component(base, "transformer", {"SD3Transformer2DModel": SD3Transformer2DModel}, torch.float32)
    vae = load_component(base, "vae", {"AutoencoderKL": AutoencoderKL}, torch.float32)
    load_official_lora(transformer, transformer_lora, TSDSR_TRANSFORMER_LORA_TARGETS)
    load_official_lora(vae, vae_lora, vae_lora_targets(vae))
    merge_lora(transformer)
    merge_lora(vae)
    return transformer.eval(), vae.eval(), prompt.float().reshape(1, -1, prompt.shape[-1]), pooled.float().reshape(1, -1)
