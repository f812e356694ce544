"""Folder-per-class scene data sets (UC Merced, NWPU-RESISC45, the demo set, any
``root/<class>/<image>`` tree), split files, seeded stratified ratio splits.

* UC Merced: ``UCMerced_LandUse/Images/<class>/*.tif`` (not all 256x256: images are resized);
* NWPU-RESISC45: ``NWPU-RESISC45/<class>/*.jpg``;
* split files in torchgeo's style (``uc_merced-train.txt``, ``resisc45-train.txt``): one file
  name per line, matched by base name, or ``<class>/<file>`` (needed where file names repeat
  across class folders: a bare name that is ambiguous is an error naming both images).

Unreadable or corrupt images are skipped, counted and reported; if none remain it is an error.
Images are read as 8-bit RGB: a 16-bit, 32-bit or float image (a GeoTIFF of reflectances) is an
error naming the file and its mode -- converting it to RGB would clip or truncate its values.
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
            mode = _mode(path) if verify else "RGB"
            if mode is None:
                skipped.append(path)
                continue
            if mode not in EIGHT_BIT_MODES:
                raise ValueError(
                    f"image {path!r} has mode {mode!r} (16-bit, 32-bit or float): this data layer "
                    "reads 8-bit RGB scenes, and converting would clip or truncate the values; "
                    "convert the set to 8-bit first (e.g. gdal_translate -ot Byte -scale)")
            samples.append((path, label))
        if len(samples) == n0:
            raise ValueError(f"class folder {os.path.join(root, c)!r} has no readable images "
                             f"({len(files)} unreadable): fix or remove it")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) under {root!r} (corrupt, or a format "
                      f"Pillow cannot decode, such as multi-band 16-bit GeoTIFF), e.g. {skipped[:3]}",
                      stacklevel=2)
    if not samples:
        raise ValueError(f"no readable images under {root!r} ({len(skipped)} unreadable)")
    return Scan(classes, samples, skipped)


# Pillow modes of 8-bit images, which convert("RGB") maps without loss of range
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                             "YCbCr", "LAB", "HSV"})


def _mode(path: str) -> str | None:
    """The image's Pillow mode, or None if it cannot be decoded (corrupt, unsupported)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            mode = im.mode
            im.verify()
        return mode
    except Exception:       # noqa: BLE001 - PIL raises many kinds for corrupt files
        return None


def read_split_file(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file {path!r} does not exist")
    with open(path) as f:
        names = [ln.strip() for ln in f if ln.strip()]
    if not names:
        raise ValueError(f"split file {path!r} is empty")
    return names


def apply_split(samples, names: list[str], what: str):
    """The samples a split file lists, in its order: a line is a base name or ends in
    ``<class>/<file>``. A bare name that two class folders share, or a line given twice, is an
    error (the dictionary by base name kept only the last such image: another class's)."""
    by_key: dict[str, list] = {}
    classes = set()
    for p, y in samples:
        base, folder = os.path.basename(p), os.path.basename(os.path.dirname(p))
        classes.add(folder)
        by_key.setdefault(base, []).append((p, y))
        by_key.setdefault(folder + "/" + base, []).append((p, y))
    out, missing, seen = [], [], {}
    for n in names:
        parts = [x for x in n.replace("\\", "/").split("/") if x not in ("", ".")] or [n]
        # <class>/<file> exactly where the line names a class folder; else the base name
        key = "/".join(parts[-2:]) if len(parts) > 1 and parts[-2] in classes else parts[-1]
        found = by_key.get(key)
        if not found:
            missing.append(n)
            continue
        if len(found) > 1:
            raise ValueError(f"{what} split file: {n!r} names {len(found)} images in different class "
                             f"folders, e.g. {found[0][0]!r} and {found[1][0]!r}; write <class>/<file> "
                             "lines")
        if found[0][0] in seen:
            raise ValueError(f"{what} split file lists {found[0][0]!r} twice ({seen[found[0][0]]!r} "
                             f"and {n!r})")
        seen[found[0][0]] = n
        out.append(found[0])
    if missing:
        raise ValueError(f"{what} split file lists {len(missing)} image(s) not found under the data "
                         f"root (or unreadable), e.g. {missing[:3]}")
    return out


def ratio_split(samples, train_ratio: float, seed: int):
    """Stratified: per class a seeded shuffle, the first ceil(ratio*n) to train, and at least
    one image each to train and to validation (a class of one image: to train, where the
    model can learn it)."""
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
        cut = 1 if len(items) == 1 else min(len(items) - 1, max(1, math.ceil(train_ratio * len(items))))
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
