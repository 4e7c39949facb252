"""Where weights come from: local folders and hub repos in our format (the authors' releases: `release.py`).

Every missing file raises one `MissingWeightsError` naming the file, the places searched and
how to get it; every folder holding the wrong model raises `WrongModelError`.
"""

import importlib.util
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import MissingWeightsError, WrongModelError

# bundled files: the installed package's tinysr/assets (pyproject maps the repository's assets/ there), else the checkout's
_PACKAGED = Path(__file__).resolve().parent / "assets"
ASSETS = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[1] / "assets"
SD3_MEDIUM = "stabilityai/stable-diffusion-3-medium-diffusers"
HUB_HINT = (
    "Pass a local folder, or a hub repo id (needs network access; set HF_TOKEN for gated repos such as "
    f"{SD3_MEDIUM}, and unset HF_HUB_OFFLINE)."
)


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
        # without accelerate (a core install) diffusers loads the plain way anyway; saying so up front spares users its warning
        low_memory = importlib.util.find_spec("accelerate") is not None
        model, info = classes[name].from_pretrained(
            folder, subfolder=subfolder, torch_dtype=dtype, output_loading_info=True, low_cpu_mem_usage=low_memory
        )
    except (ValueError, RuntimeError, OSError) as e:
        raise WrongModelError(f"{folder / subfolder}: weights do not fit its {name} config ({e})") from None
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[:3]}" for k, v in problems.items())
        raise WrongModelError(f"{folder / subfolder}: weights do not fit its {name} config ({detail})")
    return model


def load_tensor_file(path: Path) -> dict[str, torch.Tensor] | torch.Tensor:
    """safetensors, or a torch pickle opened with weights_only=True (never arbitrary code)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise WrongModelError(f"{path}: not a readable weight file, truncated or of another format ({type(e).__name__}: {e})") from None


def merge_lora(model) -> None:
    """Fold every LoRA adapter into the base weights and remove the adapter layers."""
    model.fuse_lora()
    model.unload_lora()
