"""The wheel: what it declares and ships, and that a fresh environment without extras upscales with it.

The fresh environment gets the wheel through pip (no dependencies, no index) and, instead of a
multi-GB download, links to the distributions the wheel's core requirements resolve to in the
running environment, so a dependency missing from pyproject's core list fails here.
"""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
EXTRAS_ONLY = ("pyiqa", "gradio", "accelerate", "peft")


def run(*args, **kwargs):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, check=False, **kwargs)


def core_closure(requirements: list[str]) -> set[str]:
    """Distribution names the core needs, transitively, with markers evaluated for this platform and no extras."""
    seen, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        todo.extend(Requirement(r) for r in metadata.distribution(name).requires or [])
    return seen


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the tracked sources, so no build/ folder is left in (or reused from) the checkout."""
    out, src = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("src")
    tracked = run("git", "ls-files", cwd=ROOT).stdout.split()
    assert "pyproject.toml" in tracked
    for name in tracked:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    r = run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", out, cwd=src)
    assert r.returncode == 0, r.stderr[-3000:]
    return next(out.glob("tinysr-*.whl"))


def test_wheel_declares_core_extras_scripts_and_ships_weights(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for needed in ("tinysr/assets/weights/tinysr-demo/transformer/diffusion_pytorch_model.safetensors",
                   "tinysr/assets/weights/tsdsr-demo/model_index.json", "tinysr/assets/niqe_modelparameters.mat",
                   "trainer/configs/demo.yaml", "tinysr/onnx.py", "trainer/stages/distill.py"):
        assert needed in names, needed
    assert not any(n.startswith("tinysr/assets/examples/") for n in names)  # the app's examples stay in the repository
    assert any(n.endswith("licenses/LICENSE") for n in names) and any(n.endswith("licenses/THIRD_PARTY.md") for n in names)
    core = [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert {Requirement(r).name for r in core} == {"torch", "torchvision", "diffusers", "safetensors", "pillow", "huggingface_hub", "numpy", "tqdm", "psutil"}
    extras = {line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Provides-Extra:")}
    assert extras >= {"metrics", "app", "train", "baselines", "onnx", "dev"}
    assert "pyiqa" in meta and "License-Expression: Apache-2.0" in meta
    assert "tinysr = tinysr.cli:main" in entry_points and "tinysr-train = trainer.cli:main" in entry_points


def test_fresh_environment_without_extras_upscales(wheel, tmp_path):
    env_dir = tmp_path / "fresh"
    assert run(sys.executable, "-m", "venv", "--without-pip", env_dir).returncode == 0
    python = env_dir / "bin" / "python"
    r = run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    assert r.returncode == 0, r.stderr[-3000:]
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    core = [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    ours = Path(sysconfig.get_path("purelib"))
    for name in core_closure(core):
        dist = metadata.distribution(name)
        for top in {f.parts[0] for f in dist.files if f.parts[0] != ".."}:
            if (ours / top).exists() and not (site / top).exists():
                (site / top).symlink_to(ours / top)
    check = run(python, "-c", "import importlib.util as u; print([m for m in %r if u.find_spec(m)])" % (EXTRAS_ONLY,))
    assert check.stdout.strip() == "[]", check.stderr[-2000:]  # no extra leaked in

    env = {"HF_HUB_OFFLINE": "1", "PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    cwd = tmp_path  # not the checkout: the bundled weights must come from the installed package
    example = ROOT / "assets" / "examples" / "red_flower.png"
    r = run(env_dir / "bin" / "tinysr", "upscale", example, "-o", tmp_path / "out", env=env, cwd=cwd)
    assert r.returncode == 0 and "accelerate" not in r.stderr, r.stderr[-3000:]  # no advice to install what the core does not need
    from PIL import Image

    with Image.open(example) as lr, Image.open(tmp_path / "out" / "red_flower.png") as sr:
        assert sr.size == (lr.width * 4, lr.height * 4)
    code = (
        "import sys, tinysr; "
        "pipe = tinysr.load_pipeline('tinysr'); pipe(sys.argv[1]); "
        f"print([m for m in {EXTRAS_ONLY!r} if m in sys.modules])"
    )
    r = run(python, "-c", code, example, env=env, cwd=cwd)
    assert r.returncode == 0 and r.stdout.startswith("[]"), r.stderr[-3000:]
    r = run(env_dir / "bin" / "tinysr", "--help", env=env, cwd=cwd)
    assert r.returncode == 0 and "export-onnx" in r.stdout
    r = run(env_dir / "bin" / "tinysr-train", "--help", env=env, cwd=cwd)
    assert r.returncode == 0 and "pip install 'tinysr[train]'" in r.stdout
    r = run(env_dir / "bin" / "tinysr", "eval", "--pred", tmp_path / "out", "--metrics", "niqe", env=env, cwd=cwd)
    assert r.returncode == 2 and "pip install 'tinysr[metrics]'" in r.stderr and "Traceback" not in r.stderr


def test_importing_tinysr_imports_no_extra():
    r = run(sys.executable, "-c", f"import sys, tinysr; tinysr.__version__; print([m for m in {EXTRAS_ONLY!r} if m in sys.modules])", cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]
