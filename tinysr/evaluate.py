"""Folder-vs-folder evaluation (the paper's protocol), optionally after running a model over an LR folder.

Under `accelerate launch` the images are split across processes and the rows gathered on the
main process, which computes the averages and FID.
"""

import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import ImageError
from .imageio import list_images
from .metrics import METRICS, MetricSuite


def read_rgb(path: Path) -> torch.Tensor:
    """(1, 3, H, W) float in [0, 1], exactly the 8-bit values (as OSEDiff's cv2-based evaluation sees them)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def pair_files(pred_dir: Path, gt_dir: Path) -> list[tuple[str, Path, Path]]:
    """Match predictions to ground truth by file stem; refuses unmatched predictions."""
    preds = {p.stem: p for p in list_images([pred_dir])}
    gts = {p.stem: p for p in list_images([gt_dir])}
    if not preds:
        raise ImageError(f"no images in {pred_dir}")
    unmatched = sorted(set(preds) - set(gts))
    if unmatched:
        raise ImageError(f"{len(unmatched)} predictions have no ground truth of the same name in {gt_dir}, e.g. {unmatched[:3]}")
    return [(stem, preds[stem], gts[stem]) for stem in sorted(preds)]


def evaluate_folders(pred_dir, gt_dir=None, metrics=None, device=None, progress=True, suite=None) -> dict:
    """{"average": {metric: mean}, "per_image": [{"image": name, metric: value}], "unavailable": {...}}."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm import tqdm

    pred_dir = Path(pred_dir)
    state = PartialState()
    suite = suite or MetricSuite(metrics, device=device or state.device)
    if gt_dir is not None:
        pairs = pair_files(pred_dir, Path(gt_dir))
    else:
        pairs = [(p.stem, p, None) for p in list_images([pred_dir])]
    rows = []
    with state.split_between_processes(pairs) as mine:
        for _, pred_path, gt_path in tqdm(mine, desc="metrics", unit="img", disable=not (progress and state.is_main_process), file=sys.stderr):
            pred = read_rgb(pred_path)
            gt = read_rgb(gt_path) if gt_path is not None else None
            if gt is not None and gt.shape != pred.shape:
                raise ImageError(f"{pred_path.name}: size {tuple(pred.shape[-2:])} differs from ground truth {tuple(gt.shape[-2:])}")
            rows.append({"image": pred_path.name, **suite.score(pred, gt)})
    if state.num_processes > 1:
        rows = sorted(gather_object(rows), key=lambda r: r["image"])
    names = [n for n in suite.names if any(n in r for r in rows)]
    average = {n: float(np.mean([r[n] for r in rows if n in r])) for n in names}
    if gt_dir is not None and state.is_main_process:
        fid = suite.fid(pred_dir, Path(gt_dir))
        if fid is not None:
            average["fid"] = fid
    order = [n for n in METRICS if n in average]
    return {
        "pred": str(pred_dir),
        "gt": str(gt_dir) if gt_dir is not None else None,
        "count": len(rows),
        "average": {n: average[n] for n in order},
        "per_image": rows,
        "unavailable": dict(suite.unavailable),
    }


def format_table(results: dict[str, dict]) -> str:
    """One row per evaluated method, columns in Table A.1 order; arrows say which way is better."""
    columns = [n for n in METRICS if any(n in r["average"] for r in results.values())]
    width = max([len(k) for k in results] + [8])
    head = f"{'':{width}s}" + "".join(f"{n.upper() + ('v' if METRICS[n].lower_better else '^'):>10s}" for n in columns)
    lines = [head]
    for label, r in results.items():
        cells = []
        for n in columns:
            v = r["average"].get(n)
            cells.append(f"{'-':>10s}" if v is None or math.isnan(v) else f"{v:>10.4f}")
        lines.append(f"{label:{width}s}" + "".join(cells))
    for label, r in results.items():
        for name, why in r.get("unavailable", {}).items():
            lines.append(f"{name} unavailable for {label}: {why}")
    return "\n".join(lines)


def quality_table(metrics: dict[str, dict[str, dict]], labels: dict[str, str] | None = None, counts: dict[str, str] | None = None) -> str:
    """Markdown, one table per test set, of `{set: {model: scores}}` as the demo-weights report writes it."""
    labels, counts = labels or {}, counts or {}
    lines = []
    for set_name, rows in metrics.items():
        used = counts.get(set_name) or (f"{n} images" if (n := next(iter(rows.values()), {}).get("images")) else "")
        size = f" ({used}, 4x)" if used else ""
        lines += [f"\n**{set_name}**{size}\n", "| model | PSNR ↑ | SSIM ↑ | ST-LPIPS ↓ | ST-LPIPS (VGG) ↓ | NIQE ↓ | lattice (photos ~1.1) | blocks (photos ~1.0) |", "|---|---|---|---|---|---|---|---|"]
        for model, s in rows.items():
            lattice = f"{s['lattice']:.2f}" if "lattice" in s else "-"
            blocks = f"{s['blockiness']:.2f}" if "blockiness" in s else "-"
            vgg = f"{s['st_lpips_vgg']:.4f}" if "st_lpips_vgg" in s else "-"
            lines.append(f"| {labels.get(model, model)} | {s['psnr']:.2f} | {s['ssim']:.4f} | {s['st_lpips']:.4f} | {vgg} | {s['niqe']:.3f} | {lattice} | {blocks} |")
    return "\n".join(lines)


def write_reports(result: dict, json_path=None, csv_path=None) -> None:
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if csv_path:
        names = [n for n in METRICS if any(n in r for r in result["per_image"])]
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", *names])
            writer.writeheader()
            writer.writerows(result["per_image"])


def upscale_folder(pipe, lr_dir, out_dir, progress=True, **call_kwargs) -> dict:
    """Run a pipeline over every image of `lr_dir` into `out_dir` (PNG, same stem); returns summed stage times."""
    from accelerate import PartialState
    from tqdm import tqdm

    state = PartialState()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = list_images([lr_dir])
    if not files:
        raise ImageError(f"no images in {lr_dir}")
    totals: dict[str, float] = {}
    start = time.perf_counter()
    with state.split_between_processes(files) as mine:
        for path in tqdm(mine, desc="upscale", unit="img", disable=not (progress and state.is_main_process), file=sys.stderr):
            result = pipe(path, **call_kwargs)
            tmp = out_dir / (path.stem + ".png.part")
            result.pil.save(tmp, format="PNG")
            tmp.replace(out_dir / (path.stem + ".png"))
            for k, v in result.timings.items():
                totals[k] = totals.get(k, 0.0) + v
    state.wait_for_everyone()
    return {"images": len(files), "wall_s": time.perf_counter() - start, "stage_s": totals}
