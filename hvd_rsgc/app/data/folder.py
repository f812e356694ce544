"""Folder-per-class scene data sets (UC Merced, NWPU-RESISC45, the demo set, any
``root/<class>/<image>`` tree), split files, seeded stratified ratio splits.

* UC Merced: ``UCMerced_LandUse/Images/<class>/*.tif`` (not all 256x256: images are resized);
* NWPU-RESISC45: ``NWPU-RESISC45/<class>/*.jpg``;
* split files in torchgeo's style (``uc_merced-train.txt``, ``resisc45-train.txt``): one file
  name per line, matched by base name.

Unreadable or corrupt images are skipped, counted and reported; if none remain it is an error.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

IMG_EXT = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".bmp")


@dataclass
class Scan:
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[str]


def scan_folder(root: str, verify: bool = True) -> Scan:
    if root is None or not os.path.isdir(root):
        raise FileNotFoundError(f"data root {root!r} does not exist or is not a directory")
    classes = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ValueError(f"data root {root!r} has no class folders (expected root/<class>/<image>)")
    samples, skipped = [], []
    for label, c in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(root, c)) if f.lower().endswith(IMG_EXT))
        if not files:
            raise ValueError(f"class folder {os.path.join(root, c)!r} has no images ({', '.join(IMG_EXT)})")
        n0 = len(samples)
        for f in files:
            path = os.path.join(root, c, f)
            if verify and not _readable(path):
                skipped.append(path)
                continue
            samples.append((path, label))
        if len(samples) == n0:
            raise ValueError(f"class folder {os.path.join(root, c)!r} has no readable images "
                             f"({len(files)} unreadable): fix or remove it")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) under {root!r}, e.g. {skipped[:3]}",
                      stacklevel=2)
    if not samples:
        raise ValueError(f"no readable images under {root!r} ({len(skipped)} unreadable)")
    return Scan(classes, samples, skipped)


def _readable(path: str) -> bool:
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:       # noqa: BLE001 - PIL raises many kinds for corrupt files
        return False


def read_split_file(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file {path!r} does not exist")
    with open(path) as f:
        names = [ln.strip() for ln in f if ln.strip()]
    if not names:
        raise ValueError(f"split file {path!r} is empty")
    return names


def apply_split(samples, names: list[str], what: str):
    by_name = {os.path.basename(p): (p, y) for p, y in samples}
    missing = [n for n in names if os.path.basename(n) not in by_name]
    if missing:
        raise ValueError(f"{what} split file lists {len(missing)} image(s) not found under the data "
                         f"root (or unreadable), e.g. {missing[:3]}")
    return [by_name[os.path.basename(n)] for n in names]


def ratio_split(samples, train_ratio: float, seed: int):
    """Stratified: per class a seeded shuffle, the first ceil(ratio*n) to train."""
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio}")
    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    train, val = [], []
    g = torch.Generator().manual_seed(seed)
    for y in sorted(by_class):
        items = by_class[y]
        perm = torch.randperm(len(items), generator=g).tolist()
        cut = min(len(items) - 1, max(1, math.ceil(train_ratio * len(items))))
        train += [items[i] for i in perm[:cut]]
        val += [items[i] for i in perm[cut:]]
    return train, val


class SceneFolder(Dataset):
    """Images decoded with Pillow, RGB, resized to ``image_size``; uint8 CHW tensors.
    ``cache=True`` keeps decoded images in memory (small sets)."""

    def __init__(self, samples, classes, image_size: int, cache: bool = False):
        self.samples = list(samples)
        self.classes = list(classes)
        self.image_size = image_size
        self.targets = [y for _, y in self.samples]
        self._cache = {} if cache else None

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        path, y = self.samples[i]
        from PIL import Image
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (self.image_size, self.image_size):
                    im = im.resize((self.image_size, self.image_size), Image.BILINEAR)
                x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except Exception as e:      # noqa: BLE001
            raise RuntimeError(f"cannot read image {path!r}: {e}") from None
        item = (x.view(self.image_size, self.image_size, 3).permute(2, 0, 1).contiguous(), y)
        if self._cache is not None:
            self._cache[i] = item
        return item
