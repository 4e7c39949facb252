"""Build a small, licence-documented photo set for TinySR from Debian packages.

Debian archives are reachable where the public SR benchmarks are not, and every package
ships a machine-readable copyright file, so each photo comes with a stated licence.
The packages are only downloaded (`apt-get download`) and unpacked (`dpkg -x`), never
installed. The photos are an explicit allow-list, picked by eye from contact sheets:
the packages also hold drawings, renders, logos, charts and calibration boards.

Usage: python scripts/fetch_photos.py [OUT] [--cache DIR] [--examples DIR]
Writes OUT/train/*.png, OUT/test/*.png and OUT/ATTRIBUTION.md (and, with --examples,
a few low-resolution app inputs cut from test photos plus their ATTRIBUTION.md).
"""

import argparse
import fnmatch
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import unquote

from PIL import Image

MAX_SIDE = 1536  # long side of the written photos (LANCZOS downscale, never upscale)
MIN_SIDE = 480  # smaller photos are too small to give 4x training pairs
TEST_EVERY = 5  # per package, in sorted name order, every 5th photo is held out for test
SCALE = 4  # the app's super-resolution factor: examples are test crops downscaled by it
MAX_EXAMPLE_BYTES = 100_000

# Upstream licence names (as written in the copyright files) that allow redistributing
# the examples with the app; examples from anything else are refused.
REDISTRIBUTABLE = {"GPL-2+", "LGPLv3", "CC-BY-SA-4.0", "Apache-2.0 AND BSD-3-Clause"}

# stem -> path inside the package. Left out after looking: mate's abstract/ and desktop/
# (artwork; Elephants is a painting); plasma's other wallpapers (digital art and renders,
# Autumn and Volna included); in opencv-doc renders (Blender_Suzanne*), a painting
# (starry_night), logos, maps, drawings, synthetic patterns, grayscale calibration and
# optical-flow frames, the motion-blurred plate, and the second image of each pair
# (aero3, aloeR, graf3, leuvenB, ela_modified) so no near-duplicate straddles the split.
PHOTOS = {
    "mate-backgrounds": {
        s: f"usr/share/backgrounds/mate/nature/{s}.jpg"
        for s in ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow",
                  "LadyBird", "RainDrops", "Storm", "TwoWings", "Wood", "YellowFlower")
    },
    # The image files are named by resolution, so the wallpaper name is the stem.
    "plasma-workspace-wallpapers": {
        s: f"usr/share/wallpapers/{s}/contents/images/2560x1600.jpg"
        for s in ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow",
                  "FallenLeaf", "Grey", "Kite", "OneStandsOut", "Path", "summer_1am")
    },
    "opencv-doc": {
        Path(p).stem: f"usr/share/doc/opencv-doc/examples/{p}"
        for p in ("data/aero1.jpg", "data/aloeL.jpg", "data/apple.jpg", "data/baboon.jpg",
                  "data/board.jpg", "data/building.jpg", "data/chicky_512.png",
                  "data/ela_original.jpg", "data/fruits.jpg", "data/graf1.png",
                  "data/leuvenA.jpg", "data/orange.jpg", "data/stuff.jpg", "data/sudoku.png",
                  *(f"text/scenetext0{i}.jpg" for i in range(1, 7)),
                  *(f"text/scenetext_segmented_word0{i}.jpg" for i in range(1, 6)))
    },
}

# Installed folder -> folder in the upstream source tree, which the copyright file's
# `Files:` patterns are written against.
UPSTREAM_DIRS = {
    "mate-backgrounds": {"usr/share/backgrounds/mate/": ""},
    "plasma-workspace-wallpapers": {"usr/share/wallpapers/": ""},
    "opencv-doc": {
        "usr/share/doc/opencv-doc/examples/data/": "samples/data/",
        "usr/share/doc/opencv-doc/examples/text/": "contrib/modules/text/samples/",
    },
}

# What the attribution files add for packages whose copyright file is not specific.
PACKAGE_NOTES = {
    "plasma-workspace-wallpapers": "The copyright file has one blanket stanza (`Files: *`, GPL-2+, "
    "KDE Visual Design Group); each wallpaper's own metadata.json declares its author and "
    "licence, listed alongside.",
    "opencv-doc": "The copyright file has no stanza for the sample images, so they fall under "
    "`Files: *`; it names no photographer, and several are well-known third-party test "
    "images (e.g. baboon, aloeL, graf1, leuvenA).",
}

# (output name, held-out photo in OUT/test, crop box (left, top, right, bottom) in that
# photo's pixels, what it shows). Each crop is downscaled SCALE x to a real low-res input.
EXAMPLES = (
    ("lake_boats.png", "plasma-workspace-wallpapers__EveningGlow.png",
     (384, 128, 1408, 896), "landscape: sunset sky, hills, lake and rowing boats"),
    ("forest_path.png", "plasma-workspace-wallpapers__Path.png",
     (128, 192, 1152, 960), "foliage: tree trunks, moss and a path"),
    ("red_flower.png", "mate-backgrounds__Garden.png",
     (512, 128, 1536, 896), "texture: flower petals and stamens against bokeh"),
    ("copy_centre.png", "opencv-doc__scenetext03.png",
     (96, 352, 896, 952), "man-made structure and text: concrete arcade with a shop sign"),
)


def fetch(pkg: str, cache: Path) -> Path:
    """Download pkg's .deb into cache (once) and unpack it there; return the unpacked root.

    The unpacked folder is named after the .deb, so a new package version unpacks afresh.
    """
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: this script needs a Debian-based system")
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{pkg}_*.deb"))
    if not debs:
        run = subprocess.run(["apt-get", "download", pkg], cwd=cache, check=False,
                             capture_output=True, text=True)
        debs = sorted(cache.glob(f"{pkg}_*.deb"))
        if run.returncode != 0 or not debs:
            raise SystemExit(f"apt-get download {pkg} failed (try `apt-get update`):\n{run.stderr}")
    deb = debs[-1]
    root = cache / deb.stem
    if not root.is_dir():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            run = subprocess.run(["dpkg", "-x", str(deb), tmp], check=False,
                                 capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"dpkg -x {deb} failed:\n{run.stderr}")
            Path(tmp).rename(root)
    return root


def parse_copyright(path: Path) -> list[dict[str, str]]:
    """Parse a DEP-5 copyright file into its `Files:` stanzas, in file order."""
    stanzas, cur, key = [], {}, None
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if not line.strip():
            if "Files" in cur:
                stanzas.append(cur)
            cur, key = {}, None
        elif line[0] in " \t" and key:
            cur[key] += "\n" + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            cur[key] = value.strip()
    return stanzas


def licence_of(stanzas: list[dict[str, str]], upstream: str) -> tuple[str, str]:
    """(licence, copyright) of the last stanza whose `Files:` patterns match, per DEP-5."""
    hit = None
    for st in stanzas:
        if any(fnmatch.fnmatchcase(upstream, pat) for pat in st["Files"].split()):
            hit = st
    if hit is None:
        return "not determinable from the copyright file", "not stated"
    copyright_ = "; ".join(c.strip() for c in hit.get("Copyright", "").splitlines() if c.strip())
    return hit["License"].splitlines()[0].strip(), copyright_


def upstream_path(pkg: str, rel: str) -> str:
    """Map a path inside the package to the upstream source path it was installed from."""
    for installed, src in UPSTREAM_DIRS[pkg].items():
        if rel.startswith(installed):
            return src + rel[len(installed):]
    raise SystemExit(f"{pkg}: no upstream folder known for {rel}")


def plasma_metadata(root: Path, rel: str) -> str:
    """Licence and author a KDE wallpaper declares itself (Debian's stanza is a blanket one)."""
    meta = root / Path(rel).parents[2] / "metadata.json"
    plugin = json.loads(meta.read_text(encoding="utf-8"))["KPlugin"]
    authors = ", ".join(a["Name"] for a in plugin.get("Authors", []))
    return f"{plugin.get('License', 'none stated')} ({authors})"


def write_photo(src: Path, dst: Path) -> tuple[int, int]:
    """Write src as RGB PNG with the long side capped at MAX_SIDE; return the written size."""
    with Image.open(src) as im:
        if min(im.size) < MIN_SIDE:
            raise SystemExit(f"{src}: {im.size} is below the {MIN_SIDE} px minimum side")
        im = im.convert("RGB")
        factor = MAX_SIDE / max(im.size)
        if factor < 1:
            im = im.resize((round(im.width * factor), round(im.height * factor)), Image.LANCZOS)
        im.save(dst)
        return im.size


def write_examples(out: Path, dest: Path, records: dict[str, dict[str, str]]) -> None:
    """Cut the EXAMPLES from held-out photos, downscale them SCALE x, and document them."""
    dest.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Example inputs",
        "",
        "Low-resolution inputs for the app, made by `scripts/fetch_photos.py --examples`: each is",
        f"a crop of a held-out test photo (already downscaled to at most {MAX_SIDE} px on the long",
        f"side) downscaled {SCALE}x with Pillow's bicubic filter. Crop boxes are (left, top,",
        "right, bottom) in that photo's pixels. These files are modified versions of the",
        "originals; the licences are as stated in each Debian package's",
        "`usr/share/doc/<package>/copyright`.",
        "",
    ]
    for name, photo, box, what in EXAMPLES:
        rec = records[photo]
        if rec["split"] != "test":
            raise SystemExit(f"example {name}: {photo} is not a test photo")
        if rec["licence"] not in REDISTRIBUTABLE:
            raise SystemExit(f"example {name}: licence {rec['licence']!r} is not known "
                             "to allow redistribution")
        with Image.open(out / "test" / photo) as im:
            crop = im.crop(box)
        small = crop.resize((crop.width // SCALE, crop.height // SCALE), Image.BICUBIC)
        small.save(dest / name, optimize=True)
        size = (dest / name).stat().st_size
        if size >= MAX_EXAMPLE_BYTES:
            raise SystemExit(f"example {name} is {size} bytes, over {MAX_EXAMPLE_BYTES}")
        lines += [
            f"## {name} ({small.width}x{small.height}, {what})",
            "",
            f"- Source: Debian package `{rec['package']}` {rec['version']}, `{rec['path']}`",
            f"  (upstream `{rec['upstream']}`), held-out photo `{photo}`",
            f"- Crop: {box}, then {SCALE}x bicubic downscale",
            f"- Licence: {rec['licence']}; copyright: {rec['copyright']}",
        ]
        if rec["declared"]:
            lines.append(f"- The wallpaper's own metadata declares: {rec['declared']}")
        if rec["package"] in PACKAGE_NOTES:
            lines.append(f"- Note: {PACKAGE_NOTES[rec['package']]}")
        lines.append("")
    (dest / "ATTRIBUTION.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {len(EXAMPLES)} examples and ATTRIBUTION.md to {dest}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, default=Path("runs/photos"))
    ap.add_argument("--cache", type=Path, default=Path("runs/debian-debs"))
    ap.add_argument("--examples", type=Path, help="also write example inputs for the app here")
    args = ap.parse_args()

    for split in ("train", "test"):
        (args.out / split).mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, str]] = {}
    sizes = []
    for pkg, photos in PHOTOS.items():
        root = fetch(pkg, args.cache)
        version = unquote(root.name.split("_")[1])
        stanzas = parse_copyright(root / "usr/share/doc" / pkg / "copyright")
        for i, stem in enumerate(sorted(photos)):
            rel = photos[stem]
            if not (root / rel).is_file():
                raise SystemExit(f"{pkg} {version} has no {rel}: update PHOTOS")
            split = "test" if i % TEST_EVERY == TEST_EVERY - 1 else "train"
            name = f"{pkg}__{stem}.png"
            sizes.append(write_photo(root / rel, args.out / split / name))
            up = upstream_path(pkg, rel)
            licence, copyright_ = licence_of(stanzas, up)
            declared = plasma_metadata(root, rel) if pkg == "plasma-workspace-wallpapers" else ""
            records[name] = {"package": pkg, "version": version, "path": rel, "upstream": up,
                             "split": split, "licence": licence, "copyright": copyright_,
                             "declared": declared}

    # A changed allow-list or split must not leave a photo behind in the other folder.
    for split in ("train", "test"):
        for stale in (args.out / split).glob("*.png"):
            if records.get(stale.name, {}).get("split") != split:
                stale.unlink()

    lines = [
        "# Photo attribution",
        "",
        "Photos unpacked from Debian packages by `scripts/fetch_photos.py`, converted to",
        f"RGB PNG and downscaled (Pillow LANCZOS) to at most {MAX_SIDE} px on the long side.",
        "Licence and copyright are those of the last `Files:` stanza matching the file's upstream",
        "path in the package's `usr/share/doc/<package>/copyright` (Debian's DEP-5 rule).",
        "",
        *(f"- {pkg}: {note}" for pkg, note in PACKAGE_NOTES.items()),
        "",
        "| file | split | package | original path | licence | copyright | wallpaper metadata |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(records.items()):
        lines.append(f"| {name} | {r['split']} | {r['package']} {r['version']} | `{r['path']}` | "
                     f"{r['licence']} | {r['copyright']} | {r['declared'] or '-'} |")
    (args.out / "ATTRIBUTION.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    print(f"{'package':30} {'train':>5} {'test':>5}")
    for pkg in PHOTOS:
        n = [sum(r["package"] == pkg and r["split"] == s for r in records.values())
             for s in ("train", "test")]
        print(f"{pkg:30} {n[0]:5} {n[1]:5}")
    n_test = sum(r["split"] == "test" for r in records.values())
    print(f"{'total':30} {len(records) - n_test:5} {n_test:5}")
    short, long_ = [min(s) for s in sizes], [max(s) for s in sizes]
    print(f"short side {min(short)}-{max(short)} px, long side {min(long_)}-{max(long_)} px")
    print(f"licences: {', '.join(sorted({r['licence'] for r in records.values()}))}")
    print(f"wrote {args.out}/train, {args.out}/test and {args.out}/ATTRIBUTION.md")

    if args.examples:
        write_examples(args.out, args.examples, records)


if __name__ == "__main__":
    main()
