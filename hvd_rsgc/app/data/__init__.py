"""Data layer: folder-per-class RS scene sets, the embedded demo set, a synthetic set, the
multimodal Houston2013 HSI + LiDAR scene (``houston.py``) and the Indian Pines hyperspectral
benchmark (``indian_pines.py``); per-pixel patches of a scene in ``patches.py``."""
from __future__ import annotations

import os

from .folder import SceneFolder, apply_split, ratio_split, read_split_file, scan_folder
from .synthetic import SyntheticScenes

DATASETS = ("synthetic", "demo", "ucm", "nwpu", "folder", "houston", "indianpines")


def build_datasets(cfg, seed: int):
    """-> (train_dataset, val_dataset, class_names) from the data section of the config
    (:class:`hvd_rsgc.app.config.DataConfig`)."""
    name = cfg.dataset
    size = cfg.image_size
    if name == "synthetic":
        nc = cfg.num_classes or 6
        tr = SyntheticScenes(cfg.synthetic_train, nc, size, seed=seed)
        va = SyntheticScenes(cfg.synthetic_val, nc, size, seed=seed + 1)
        return tr, va, tr.classes
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if name == "houston":
        from .houston import build
        return build(cfg)
    if name == "indianpines":
        from .indian_pines import build_datasets as build_indian_pines
        return build_indian_pines(cfg)
    root, train_split, val_split = cfg.data_root, cfg.train_split, cfg.val_split
    if name == "demo":
        from .demo import build
        root = root or build(quiet=True)
        base = os.path.dirname(root)
        train_split = train_split or os.path.join(base, "train.txt")
        val_split = val_split or os.path.join(base, "val.txt")
    elif name == "ucm" and root and os.path.isdir(os.path.join(root, "Images")):
        root = os.path.join(root, "Images")          # UCMerced_LandUse/Images/<class>
    if root is None:
        raise ValueError(f"dataset {name!r} needs data_root (folder with one sub-folder per class)")
    scan = scan_folder(root)
    if train_split or val_split:
        if not (train_split and val_split):
            raise ValueError("give both train_split and val_split, or neither (seeded ratio split)")
        train = apply_split(scan.samples, read_split_file(train_split), "train")
        val = apply_split(scan.samples, read_split_file(val_split), "val")
        overlap = {p for p, _ in train} & {p for p, _ in val}
        if overlap:
            raise ValueError(f"train and val split files share {len(overlap)} image(s), e.g. {sorted(overlap)[:2]}")
    else:
        train, val = ratio_split(scan.samples, cfg.train_ratio, seed)
    # decoded images are kept in memory for small sets read in the main process; with loader
    # workers each worker would fill (and lose) its own copy
    cache = len(scan.samples) * size * size * 3 < 512 * 2**20 and not cfg.workers
    train_ds = SceneFolder(train, scan.classes, size, cache)
    train_ds.skipped = list(scan.skipped)          # unreadable images: in the run's summary
    return train_ds, SceneFolder(val, scan.classes, size, cache), scan.classes


__all__ = ["build_datasets", "SceneFolder", "SyntheticScenes", "scan_folder", "ratio_split",
           "apply_split", "read_split_file"]
