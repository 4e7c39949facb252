"""Server folders a visitor may name, and uploads unpacked within limits.

A visitor types a folder in the Benchmark and Training tabs; only folders under the allowed roots are
read (`TINYSR_DATA_ROOTS`, separated by the OS path separator; default: ../shared/data when present,
and the runs folder), checked after resolving links so neither `..` nor a symlink leads out.
"""

import os
import shutil
import zipfile
from pathlib import Path

from tinysr.errors import TinySRError
from tinysr.imageio import IMAGE_SUFFIXES
from trainer.launch import RUNS

from .common import ROOT

SHARED_DATA = ROOT.parent / "shared" / "data"
UPLOAD_MB = float(os.environ.get("TINYSR_UPLOAD_MB", 100))  # unpacked size of one benchmark upload
UPLOAD_FILES = 500
GT_NAMES = ("gt", "hr", "test_hr", "target")  # a zip's ground-truth folder; every other image is an input


def data_roots() -> list[Path]:
    if os.environ.get("TINYSR_DATA_ROOTS"):
        roots = [Path(p) for p in os.environ["TINYSR_DATA_ROOTS"].split(os.pathsep) if p]
    else:
        roots = [SHARED_DATA, RUNS] if SHARED_DATA.is_dir() else [RUNS]
    return [r.resolve() for r in roots]


def allowed_folder(text: str, what: str) -> Path:
    """The existing folder `text` names, if it lies under an allowed root; otherwise a sentence why not."""
    text = (text or "").strip()
    roots = data_roots()
    where = ", ".join(f"`{r}`" for r in roots)
    if not text:
        raise TinySRError(f"{what}: give a folder on the server (under {where}).")
    if ".." in Path(text).parts:
        raise TinySRError(f"{what}: {text!r} contains '..'; give a folder under {where}.")
    path = Path(text).expanduser()
    path = (path if path.is_absolute() else ROOT / path).resolve()
    if not any(path == r or path.is_relative_to(r) for r in roots):
        raise TinySRError(f"{what}: {text!r} is outside the folders this server shares ({where}; TINYSR_DATA_ROOTS sets them).")
    if not path.is_dir():
        raise TinySRError(f"{what}: {text!r} is not a folder on the server.")
    return path


def unpack_upload(files: list[str], dest: Path) -> tuple[Path, Path | None]:
    """Uploaded images, or zips of them, into dest/lr (and dest/gt when a zip has an HR folder next to its LR one).

    In a zip, images under a folder named gt/hr/test_HR/target are ground truth and all others inputs
    (lr/, lq/, test_LR/ or the top). Names with folders of their own are flattened,
    anything that is not an image is skipped, and the unpacked total is capped at TINYSR_UPLOAD_MB.
    """
    lr, gt = dest / "lr", dest / "gt"
    lr.mkdir(parents=True)
    budget = UPLOAD_MB * 2**20
    count = 0

    def take(name: str, size: int) -> Path | None:
        nonlocal budget, count
        parts = [p.lower() for p in Path(name).parts]
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES or any(p.startswith((".", "__macosx")) for p in parts):
            return None
        budget -= size
        count += 1
        if budget < 0 or count > UPLOAD_FILES:
            raise TinySRError(f"The upload is too large: at most {UPLOAD_FILES} images and {UPLOAD_MB:.0f} MB unpacked.")
        folder = gt if any(p in GT_NAMES for p in parts[:-1]) else lr
        folder.mkdir(exist_ok=True)
        return folder / Path(name).name

    for file in files or []:
        path = Path(file)
        if zipfile.is_zipfile(path):
            try:
                with zipfile.ZipFile(path) as archive:
                    for info in archive.infolist():
                        if info.is_dir() or (target := take(info.filename, info.file_size)) is None:
                            continue
                        with archive.open(info) as src, open(target, "wb") as out:
                            shutil.copyfileobj(src, out, 1 << 20)
            except (zipfile.BadZipFile, OSError, RuntimeError) as e:  # RuntimeError: encrypted members
                raise TinySRError(f"{path.name}: cannot unpack this zip ({e}).") from None
        elif (target := take(path.name, path.stat().st_size)) is not None:
            shutil.copy(path, target)
    if not any(lr.iterdir()):
        raise TinySRError("The upload holds no images (PNG, JPEG, WebP, BMP or TIFF; in a zip, LR images at the top or under lr/).")
    return lr, (gt if gt.is_dir() else None)
