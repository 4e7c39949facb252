"""Side-by-side crops of x4 outputs on held-out photos: `python scripts/comparison_sheet.py [-o PNG]`.

Each row is one low-resolution input from the synthetic held-out set (photos never trained on),
each column one model's output cropped at the same place (nearest-neighbour enlarged, so a grid or
blur is not hidden by resampling). Default columns: bicubic | demo TinySR | demo teacher | Real-ESRGAN.
"""

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.train_demo_weights import SYNTHETIC  # noqa: E402
from tinysr.imageio import to_pil  # noqa: E402
from tinysr.pipelines import load_pipeline  # noqa: E402

COLUMNS = {"bicubic": "bicubic", "tinysr": "demo TinySR", "tsdsr": "demo teacher", "realesrgan-x4plus": "Real-ESRGAN x4plus"}
LABEL_HEIGHT = 20


def crop_box(image: torch.Tensor, size: int, area: str = "detail") -> tuple[int, int, int, int]:
    """The size x size window with the most (`detail`) or least (`smooth`, where a grid shows) luminance gradient."""
    y = image.mean(0)
    detail = (y[1:, :-1] - y[:-1, :-1]).abs() + (y[:-1, 1:] - y[:-1, :-1]).abs()
    h, w = detail.shape
    step = max(size // 4, 1)
    sign = 1.0 if area == "detail" else -1.0
    best, box = -float("inf"), (0, 0, size, size)
    for top in range(0, max(h - size, 0) + 1, step):
        for left in range(0, max(w - size, 0) + 1, step):
            score = sign * float(detail[top : top + size, left : left + size].mean())
            if score > best:
                best, box = score, (left, top, left + size, top + size)
    return box


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", type=Path, help=f"LR images (default: the first --count of {SYNTHETIC / 'lq'})")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "assets" / "comparison-demo.png")
    parser.add_argument("--models", default=",".join(COLUMNS), help="model names or folders, left to right")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--crop", type=int, default=128, help="crop of the x4 output, in output pixels")
    parser.add_argument("--zoom", type=int, default=2)
    parser.add_argument("--areas", default="detail,smooth", help="one row per input and area: detail and/or smooth")
    args = parser.parse_args()
    inputs = args.inputs or sorted((SYNTHETIC / "lq").glob("*.png"))[: args.count]
    if not inputs:
        parser.error(f"no inputs: give LR images or make {SYNTHETIC} with scripts/train_demo_weights.py --from synthetic")
    models = args.models.split(",")
    torch.set_grad_enabled(False)
    outputs = {m: [load_pipeline(m, device="cpu")(str(p)).image.float().clamp(0, 1) for p in inputs] for m in models}
    cell = args.crop * args.zoom
    rows = [(i, area) for i in range(len(inputs)) for area in args.areas.split(",")]
    sheet = Image.new("RGB", (cell * len(models), LABEL_HEIGHT + cell * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, model in enumerate(models):
        draw.text((j * cell + 4, 4), COLUMNS.get(model, Path(model).name), fill="black")
    for row, (i, area) in enumerate(rows):
        box = crop_box(outputs["bicubic"][i] if "bicubic" in outputs else outputs[models[0]][i], args.crop, area)
        for j, model in enumerate(models):
            tile = to_pil(outputs[model][i]).crop(box).resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (j * cell, LABEL_HEIGHT + row * cell))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.output)
    print(f"wrote {args.output} ({len(rows)} crops x {len(models)} models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
