"""Errors a user can act on; the CLI and app print their message, never a traceback."""

import importlib

# optional dependencies -> the extra that installs them (pyproject.toml)
EXTRAS = {
    "pyiqa": "metrics", "scipy": "metrics", "accelerate": "metrics", "gradio": "app", "pandas": "app",
    "peft": "train", "omegaconf": "train", "stlpips_pytorch": "train", "timm": "train", "tensorboard": "train",
    "spandrel": "baselines", "onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx",
}


class TinySRError(Exception):
    pass


class ImageError(TinySRError, ValueError):
    """An input that is not a usable image (unreadable, truncated, empty, too large)."""


class NumericalError(TinySRError, ArithmeticError):
    """The model produced NaN/inf or a flat image even in the fallback precision."""


class OutOfMemory(TinySRError, MemoryError):
    """The work did not fit in the memory this process may use (RAM limit, free RAM, GPU memory)."""


class UnsupportedOption(TinySRError, ValueError):
    """An option this device or backend cannot run (int8 on a GPU, fp16 on the ONNX backend)."""


class WrongModelError(TinySRError, ValueError):
    """A weight folder that holds something other than what was asked for."""


class MissingWeightsError(TinySRError, FileNotFoundError):
    """A weight file that is not where it should be; says which file, where we looked, how to get it."""

    def __init__(self, file: str, searched: list[str], hint: str):
        self.file, self.searched, self.hint = file, list(searched), hint
        places = "\n".join(f"  - {p}" for p in self.searched)
        super().__init__(f"missing weights: {file}\nsearched:\n{places}\n{hint}")


class MissingExtra(TinySRError, ImportError):
    """An optional dependency that is not installed; says which extra brings it."""


def missing_extra_message(e: ImportError) -> str | None:
    """The sentence for an optional dependency's ImportError, None for anything else."""
    top = (e.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    return f"{top} is not installed; it comes with the {EXTRAS[top]} extra: pip install 'tinysr[{EXTRAS[top]}]'"


def require(module: str):
    """Import an optional dependency, or raise MissingExtra saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(missing_extra_message(e) or str(e)) from e
