"""The About tab: what the bundled weights scored, the benchmark tables, the learned pruning decision."""

import json
import os
from pathlib import Path

from tinysr.evaluate import quality_table
from tinysr.pipelines import NAMED_MODELS
from trainer.launch import RUNS

from .common import ROOT, TITLES

BENCH_RESULTS = [ROOT / "assets" / "benchmarks", RUNS]
DEMO_METRICS = ROOT / "assets" / "weights" / "demo_metrics.json"  # scripts/report_demo_weights.py writes it


def demo_quality_markdown() -> str:
    """What the bundled demo-scale weights scored, as their model cards report it."""
    if not DEMO_METRICS.is_file():
        return f"No measurements of the bundled weights ({DEMO_METRICS} is missing: `python scripts/report_demo_weights.py`)."
    labels = {name: TITLES[name] + (" (demo scale, bundled)" if name in ("tinysr", "tsdsr") else "") for name in TITLES}
    return (
        "### Quality of the bundled demo-scale weights (`python scripts/report_demo_weights.py`)\n"
        + quality_table(json.loads(DEMO_METRICS.read_text())["metrics"], labels)
    )


def about_markdown() -> str:
    from tinysr.bench import format_table

    parts = [demo_quality_markdown(), "## Efficiency"]
    results = [p for folder in BENCH_RESULTS if folder.is_dir() for p in sorted(folder.glob("bench*.json"))]
    for path in results:
        try:
            parts.append(f"`{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`\n```\n{format_table(json.loads(path.read_text()))}\n```")
        except (KeyError, ValueError) as e:
            parts.append(f"`{path}` is not a benchmark result ({type(e).__name__})")
    if not results:
        parts.append("No benchmark results yet: `python -m tinysr bench --json runs/bench.json`.")
    parts.append("## Learned pruning decision")
    decision = pruning_decision()
    parts.append(decision or "No pruning decision found (a TinySR folder's `pruning.json`, written by `python -m trainer prune-export`).")
    return "\n\n".join(parts)


def pruning_decision() -> str | None:
    env, bundled = NAMED_MODELS["tinysr"]
    folder = Path(os.environ.get(env) or bundled)
    path = folder / "pruning.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    kept = set(d["kept_blocks"])
    size = d.get("group_size", 4)
    n = d.get("num_blocks", size * (max(kept) // size + 1))
    rows = []
    for g in range(n // size):
        cells = " ".join("■" if b in kept else "□" for b in range(g * size, (g + 1) * size))
        rows.append(f"| group {g} | {cells} | {', '.join(str(b) for b in range(g * size, (g + 1) * size) if b in kept)} |")
    return (
        f"From `{path}`: {len(kept)} of {n} teacher blocks kept (■ kept, □ pruned).\n\n| group | blocks | kept |\n|---|---|---|\n"
        + "\n".join(rows)
    )
