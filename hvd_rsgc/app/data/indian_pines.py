"""Indian Pines (AVIRIS, 12 June 1992, NW Indiana): a 145 x 145 scene of 200 water-absorption-
corrected bands (400-2500 nm, 20 m pixels) with a 16-class ground-truth map of crops, grass and
woods (10,249 labelled pixels). The benchmark set of this project: per-pixel 9 x 9 x 200
patches of its 9 largest classes, split into spatially disjoint train and validation areas.
Harder than the demo set on every axis: real class confusion (corn vs soybean under three
tillage regimes share most of their spectrum), 9 classes, ~4,000 / ~2,700 patches, and a
spatial split instead of patches from the same fields.

    python -m hvd_rsgc.app.data.indian_pines --from DIR | --pypi [--root DIR]   # once; cached

Source, one of (``--from`` or ``--pypi``; nothing is fetched unless asked):
* ``--from DIR``: a folder holding the two standard files as distributed by UPV/EHU's GIC group
  (``Indian_pines_corrected.mat``, key ``indian_pines_corrected``, uint16 (145, 145, 200);
  ``Indian_pines_gt.mat``, key ``indian_pines_gt``, uint8 (145, 145)); no network;
* ``--pypi``: the same two files read, without installing anything, from the ``ghost-hsi==0.1.7``
  wheel on PyPI (``ghost/data/indian_pines/``), the only copy on a package registry found. Note
  its licence: the wheel declares "Proprietary - All Rights Reserved" for its contents; the
  scene itself is not its authors' work.
The scene is published by Purdue University (Baumgardner, Biehl, Landgrebe, "220 Band AVIRIS
Hyperspectral Image Data Set: June 12, 1992 Indian Pine Test Site 3", Purdue University Research
Repository, 2015, doi:10.4231/R7RX991C) and distributed freely for research.

Classes: the 9 with >= 400 labelled pixels (the usual 9-class subset; the 7 others have 20-386
pixels in one or two fields each, too few to split spatially): corn-notill, corn-mintill,
grass-pasture, grass-trees, hay-windrowed, soybean-notill, soybean-mintill, soybean-clean,
woods (original ids 2, 3, 5, 6, 8, 10, 11, 12, 14).

Split (``split_maps``): the scene is cut into 16 x 16 tiles; tile (ty, tx) is validation when
``(ty + 2 tx) % 4 == 0`` (a quarter of the tiles, spread over the whole scene so every class
has validation pixels); a training pixel is kept only if its whole patch window (Chebyshev
radius ``patch // 2``) holds no validation pixel, so no training input ever contains a
validation pixel. Bands are standardised over the scene (no labels used).
"""
from __future__ import annotations

import argparse
import os
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

from .demo import fetch_wheels
from .patches import PixelPatches, read_mat, standardize

WHEELS = {"ghost_hsi": "ghost-hsi==0.1.7"}
PIP_ARGS = ("--platform", "manylinux2014_x86_64", "--python-version", "3.11", "--implementation", "cp")
MEMBERS = {"cube": "ghost/data/indian_pines/Indian_pines_corrected.mat",
           "gt": "ghost/data/indian_pines/Indian_pines_gt.mat"}
KEYS = {"cube": "indian_pines_corrected", "gt": "indian_pines_gt"}
SHAPE, BANDS = (145, 145), 200
ALL_CLASSES = ("alfalfa", "corn-notill", "corn-mintill", "corn", "grass-pasture", "grass-trees",
               "grass-pasture-mowed", "hay-windrowed", "oats", "soybean-notill", "soybean-mintill",
               "soybean-clean", "wheat", "woods", "buildings-grass-trees-drives", "stone-steel-towers")
KEPT = (2, 3, 5, 6, 8, 10, 11, 12, 14)                 # original ids of the 9 classes used
CLASSES = tuple(ALL_CLASSES[i - 1] for i in KEPT)
TILE, VAL_EVERY, PATCH = 16, 4, 9
VERSION = "v1"


def default_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(base, "hvd_rsgc", f"indianpines-{VERSION}")


def check_scene(cube: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (cube (H, W, 200) float32, gt (H, W) int64 0..16), or a clear error."""
    if cube.ndim != 3 or cube.shape[2] != BANDS:
        raise ValueError(f"Indian Pines cube: expected (H, W, {BANDS}) bands (the corrected "
                         f"scene), got shape {cube.shape}")
    gt = np.squeeze(gt)
    if gt.shape != cube.shape[:2]:
        raise ValueError(f"Indian Pines ground truth is {gt.shape} but the cube is {cube.shape[:2]}")
    if not np.issubdtype(gt.dtype, np.integer) and not np.all(gt == np.round(gt)):
        raise ValueError("Indian Pines ground truth: labels must be integers 0..16")
    gt = gt.astype(np.int64)
    if gt.min() < 0 or gt.max() > len(ALL_CLASSES):
        raise ValueError(f"Indian Pines ground truth: labels must be in 0..{len(ALL_CLASSES)}, "
                         f"found {gt.min() if gt.min() < 0 else gt.max()}")
    cube = cube.astype(np.float32)
    if not np.isfinite(cube).all():
        raise ValueError("Indian Pines cube: NaN or inf values")
    return cube, gt


def split_maps(gt: np.ndarray, patch: int = PATCH, tile: int = TILE, every: int = VAL_EVERY):
    """-> (train, val) label maps, 0 = unused, 1..9 = class of KEPT (vectorised: one max-pool
    finds the pixels whose window touches the validation area)."""
    H, W = gt.shape
    ty, tx = np.arange(H)[:, None] // tile, np.arange(W)[None, :] // tile
    val_area = ((ty + 2 * tx) % every == 0)
    r = patch // 2
    near_val = F.max_pool2d(torch.from_numpy(val_area.astype(np.float32))[None, None], 2 * r + 1,
                            stride=1, padding=r)[0, 0].numpy() > 0
    remap = np.zeros(len(ALL_CLASSES) + 1, dtype=np.int64)
    remap[list(KEPT)] = np.arange(1, len(KEPT) + 1)
    lab = remap[gt]
    return np.where(~near_val, lab, 0), np.where(val_area, lab, 0)


def build(root: str | None = None, source: str | None = None, pypi: bool = False, quiet: bool = False) -> str:
    """Read the scene from ``source`` (or, with ``pypi``, from the ghost-hsi wheel), check it,
    write ``scene.npz`` (cube uint16 as published, gt) and LICENSES.txt under ``root``; returns
    ``root``. Idempotent."""
    root = root or default_root()
    if os.path.exists(os.path.join(root, "DONE")):
        return root
    if not source and not pypi:
        raise ValueError(f"the Indian Pines scene is not built in {root}: run python -m "
                         "hvd_rsgc.app.data.indian_pines --from DIR (the two .mat files from UPV/EHU) "
                         "or --pypi (from the ghost-hsi wheel; read its licence note in --help)")
    os.makedirs(root, exist_ok=True)
    if pypi:        # the wheel's two members, extracted beside the scene; then read as --from
        wheel = fetch_wheels(os.path.join(root, "wheels"), WHEELS, PIP_ARGS)["ghost_hsi"]
        source = os.path.join(root, "source")
        os.makedirs(source, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for m in MEMBERS.values():
                with open(os.path.join(source, os.path.basename(m)), "wb") as f:
                    f.write(z.read(m))
        origin = (f"{WHEELS['ghost_hsi']} wheel ({os.path.basename(wheel)}), members {sorted(MEMBERS.values())}; "
                  "that wheel declares its contents \"Proprietary - All Rights Reserved\"")
    else:
        origin = f"files in {source}"
    files = {k: os.path.join(source, os.path.basename(m)) for k, m in MEMBERS.items()}
    for f in files.values():
        if not os.path.exists(f):
            raise ValueError(f"--from: {f} not found (a folder with {[os.path.basename(m) for m in MEMBERS.values()]})")
    raw = {k: read_mat(f, (KEYS[k],), f"Indian Pines {k}") for k, f in files.items()}
    cube, gt = check_scene(raw["cube"], raw["gt"])
    np.savez(os.path.join(root, "scene.npz"), cube=raw["cube"], gt=gt)
    with open(os.path.join(root, "LICENSES.txt"), "w") as f:
        f.write(f"Indian Pines (AVIRIS, 1992), taken from {origin}.\n"
                "Published by Purdue University: Baumgardner, Biehl, Landgrebe, 220 Band AVIRIS "
                "Hyperspectral Image Data Set: June 12, 1992 Indian Pine Test Site 3, Purdue "
                "University Research Repository (2015), doi:10.4231/R7RX991C; the corrected cube and "
                "ground truth as distributed by UPV/EHU's GIC group. Nothing of any wheel is installed.\n")
    with open(os.path.join(root, "DONE"), "w") as f:
        f.write(f"{VERSION} {origin}\n")
    if not quiet:
        tr, va = split_maps(gt)
        print(f"indian pines: {cube.shape} cube, {int((gt > 0).sum())} labelled pixels; "
              f"{len(CLASSES)} classes, {int((tr > 0).sum())} train / {int((va > 0).sum())} val "
              f"patches ({PATCH}x{PATCH}, spatially disjoint) under {root}")
    return root


def load(root: str) -> tuple[torch.Tensor, np.ndarray]:
    path = os.path.join(root, "scene.npz")
    if not os.path.exists(path):
        raise ValueError(f"data_root: no scene.npz in {root} (build it: python -m hvd_rsgc.app.data.indian_pines)")
    with np.load(path) as z:
        cube, gt = check_scene(z["cube"], z["gt"])
    return standardize(torch.from_numpy(cube).permute(2, 0, 1).contiguous()), gt


def build_datasets(cfg):
    """-> (train, val, class names) for dataset ``indianpines`` (``data_root``: the built folder;
    default: build or reuse the cache)."""
    root = cfg.data_root or build(quiet=True)       # the cache, or a clear "build it" error
    cube, gt = load(root)
    train, val = (PixelPatches(cube, torch.from_numpy(m), cfg.image_size, CLASSES, {"in_channels": BANDS},
                               param="image_size (the patch size) for indianpines")
                  for m in split_maps(gt, patch=cfg.image_size))
    return train, val, list(CLASSES)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hvd_rsgc.app.data.indian_pines", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help=f"default: {default_root()}")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="source", default=None,
                     help="folder with Indian_pines_corrected.mat and Indian_pines_gt.mat (no download)")
    src.add_argument("--pypi", action="store_true",
                     help="read the two files from the ghost-hsi==0.1.7 wheel (see the licence note above)")
    args = ap.parse_args(argv)
    try:
        print(build(args.root, args.source, args.pypi))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
