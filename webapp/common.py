"""What every tab shares: model names and loading, scoring, uploads, the outputs folder, and the rule that a
visitor only ever reads a sentence from us (never gradio's bare "Error", never a traceback)."""

import functools
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import torch

from tinysr.device import is_out_of_memory, out_of_memory_message
from tinysr.errors import TinySRError
from tinysr.imageio import LoadedImage, load_image
from tinysr.metrics import METRICS, MetricSuite
from tinysr.pipelines import NAMED_MODELS, load_pipeline

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["tinysr", "tsdsr", "realesrgan-x4plus", "bicubic"]
TITLES = {"tinysr": "TinySR", "tsdsr": "TSD-SR", "realesrgan-x4plus": "Real-ESRGAN x4plus", "bicubic": "Bicubic"}
MAX_PIXELS = int(os.environ.get("TINYSR_MAX_PIXELS", 1024 * 1024))
NR_METRICS = ["niqe", "musiq", "maniqa", "clipiqa"]
FR_METRICS = ["psnr", "ssim", "lpips", "dists"]
EXAMPLES = sorted(str(p) for p in (ROOT / "assets" / "examples").glob("*.png"))
OUTPUTS = Path(os.environ.get("TINYSR_OUTPUTS_DIR") or tempfile.mkdtemp(prefix="tinysr-app-"))
OUTPUTS.mkdir(parents=True, exist_ok=True)
OUTPUTS_MB = float(os.environ.get("TINYSR_OUTPUTS_MB", 500))  # results and uploads kept; the oldest go first
PAGE_FILES: set[Path] = set()  # see keep_page_files
log = logging.getLogger("tinysr.app")
_warming: threading.Thread | None = None


class ImageUpload(gr.Image):
    """gr.Image whose upload reaches the app as the unopened file, so an unreadable one gets our message
    (gr.Image itself opens uploads with Pillow and converts them to RGB: no 16-bit, CMYK or errors of ours)."""

    is_template = True  # rendered by gr.Image's frontend

    def preprocess(self, payload):
        if payload is None or payload.path is None:
            return super().preprocess(payload)
        return payload.path


def sentences(fn):
    """Turn every failure of a handler into a gr.Error sentence; unexpected ones are logged with their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except TinySRError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:
            if is_out_of_memory(e):
                raise gr.Error(out_of_memory_message(e, "cpu")) from None
            log.exception("unexpected failure in %s", fn.__name__)
            first = (str(e).splitlines() or [""])[0][:200]
            raise gr.Error(f"Something went wrong that we did not foresee ({type(e).__name__}: {first}). "
                           "The server is still up; the details are in its log.") from None

    return wrapper


def model_label(name: str) -> str:
    """Dropdown label that says which weights a name resolves to, demo scale included."""
    if name not in NAMED_MODELS:
        return TITLES[name]
    env, bundled = NAMED_MODELS[name]
    if os.environ.get(env):
        return f"{TITLES[name]} ({os.environ[env]})"
    if (bundled / "model_index.json").is_file():
        return f"{TITLES[name]} (demo scale, bundled)"
    return f"{TITLES[name]} (weights missing)"


@functools.lru_cache(maxsize=8)
def get_pipeline(name: str, dtype: str = "auto"):
    return load_pipeline(name, dtype=dtype)


@functools.lru_cache(maxsize=2)
def metric_suite(names: tuple[str, ...]) -> MetricSuite:
    return MetricSuite(list(names), device="cpu")


_metric_lock = threading.Lock()


def score(image: torch.Tensor, gt: torch.Tensor | None) -> tuple[dict, dict]:
    """Scores that can run, and {metric: why not} for those that cannot (missing weights)."""
    names = tuple(NR_METRICS + (FR_METRICS if gt is not None else []))
    suite = metric_suite(names)
    values, failed = {}, {}
    with _metric_lock:  # pyiqa metric modules are not re-entrant
        for name in names:
            try:
                values.update(suite.score(image[None], None if gt is None else gt[None], names=[name]))
            except (RuntimeError, ValueError, AssertionError) as e:  # e.g. NIQE needs images of 96 px and more
                failed[name] = f"failed on this image ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return values, {**{n: suite.unavailable[n] for n in names if n in suite.unavailable}, **failed}


def format_scores(values: dict, unavailable: dict) -> str:
    lines = []
    for name, value in values.items():
        arrow = "lower is better" if METRICS[name].lower_better else "higher is better"
        lines.append(f"| {name.upper()} | {value:.4f} | {arrow} |")
    table = "| metric | value | |\n|---|---|---|\n" + "\n".join(lines) if lines else ""
    missing = "".join(f"\n- {n.upper()} unavailable: {why}" for n, why in unavailable.items())
    return table + ("\n" + missing if missing else "")


def read_upload(path: str | None, what: str) -> LoadedImage:
    if path is None:
        raise gr.Error(f"Upload {what} first.")
    try:
        return load_image(path, max_pixels=MAX_PIXELS)
    except TinySRError as e:
        raise gr.Error(f"{what}: {e}") from None


def warm_up(names: list[str], metrics: tuple[str, ...]) -> None:
    """Load the default models and the offline metrics in the background, so the first click answers in seconds."""
    global _warming

    def load():
        for name in names:
            try:
                get_pipeline(name)
            except TinySRError:  # shown to whoever picks it
                pass
        metric_suite(metrics)

    _warming = threading.Thread(target=load, name="warm-up", daemon=True)
    _warming.start()


def warming() -> bool:
    return _warming is not None and _warming.is_alive()


def new_output(prefix: str, suffix: str = ".png") -> Path:
    """A fresh file in the outputs folder, after dropping the oldest results beyond OUTPUTS_MB."""
    trim_folder(OUTPUTS, OUTPUTS_MB * 2**20, keep=PAGE_FILES)
    return OUTPUTS / f"{prefix}-{os.urandom(6).hex()}{suffix}"


def page_files(node) -> list[dict]:
    """The files a page's config names: every {"path": ..., "url": ...} in it (examples, default values)."""
    if isinstance(node, dict):
        return ([node] if isinstance(node.get("path"), str) else []) + page_files(list(node.values()))
    return [f for child in node for f in page_files(child)] if isinstance(node, (list, tuple)) else []


def keep_page_files(config: dict) -> None:
    """Never trim the files the page itself shows every visitor (gradio's copies of the examples, made when the
    page is built): as the oldest files in the folder they would go first, and the examples would break for good."""
    PAGE_FILES.update(Path(f["path"]).resolve() for f in page_files(config) if Path(f["path"]).is_file())


def trim_folder(folder: Path, max_bytes: float, min_age_s: float = 2.0, keep: set[Path] = frozenset()) -> None:
    """Delete the oldest files under `folder` until it holds at most `max_bytes` (files younger than
    `min_age_s` are kept: a response may still be sending them; so are the resolved paths in `keep`);
    empty subfolders go too."""
    files = []
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                st = path.stat()
                files.append((st.st_mtime, st.st_size, path))
        except OSError:  # deleted meanwhile
            continue
    total = sum(size for _, size, _ in files)
    now = time.time()
    for mtime, size, path in sorted(files):
        if total <= max_bytes:
            break
        if now - mtime < min_age_s or path.resolve() in keep:
            continue
        path.unlink(missing_ok=True)
        total -= size
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            sub.rmdir()
        except OSError:  # not empty
            pass
