"""Houston2013 (IEEE GRSS Data Fusion Contest 2013): a 349 x 1905 CASI hyperspectral cube of 144
bands (380-1050 nm) and a co-registered LiDAR DSM over the University of Houston, with 15
land-cover classes, labelled by a fixed train map (2,832 pixels) and test map (12,197 pixels).
The RS-DGC paper uses it for its multimodal experiments (CCR-Net / ExViT-style models).

The data cannot be downloaded here. Users get it from the GRSS Data Fusion Contest archive
(https://hyperspectral.ee.uh.edu/?page_id=459, registration) or from the `.mat` files that
the CCR-Net and ExViT code releases point to. Files, given by path in the config:

* ``houston_hsi``: the cube, ``(H, W, B)`` or ``(B, H, W)``, as ``.mat`` (the one array in the
  file, or the key ``HSI``), ``.tif`` / ``.tiff`` (the contest's ``..._CASI.tif``) or ``.npy``;
* ``houston_lidar``: the DSM, ``(H, W)`` (``(H, W, 1)`` / ``(1, H, W)`` accepted), same formats;
* ``houston_train`` / ``houston_test``: label maps ``(H, W)``, 0 = unlabelled, 1..15 = class.

``.mat`` files need scipy (v7.3 files: h5py), ``.tif`` files tifffile: ``pip install
'hvd_rsgc[houston]'``.

Per-pixel samples: a ``patch_size`` x ``patch_size`` window (``image_size`` in the config,
default 11) centred on each labelled pixel, HSI bands then the LiDAR band as channels
(``B + 1``), the scene reflect-padded at the borders. Each band is standardised over the
whole scene (mean 0, std 1; no labels used), so the training loop's RGB normalisation is
skipped (``prenormalized``). Models: ``ccrnet`` and ``exvit`` (``app/models/multimodal.py``).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .patches import PixelPatches, read_mat, standardize

CLASSES = ("healthy grass", "stressed grass", "synthetic grass", "trees", "soil", "water",
           "residential", "commercial", "road", "highway", "railway", "parking lot 1",
           "parking lot 2", "tennis court", "running track")
SHAPE = (349, 1905)
BANDS = 144
MAT_KEYS = {"hsi": ("HSI", "hsi", "houston", "Houston"), "lidar": ("LiDAR", "lidar", "LIDAR", "DSM"),
            "train": ("TRLabel", "train", "TR"), "test": ("TSLabel", "test", "TS")}


def read_array(path: str, what: str, param: str) -> np.ndarray:
    """One array from ``.mat`` / ``.tif`` / ``.tiff`` / ``.npy``; errors name the config key."""
    if not path:
        raise ValueError(f"{param}: dataset houston needs the path of the {what} file")
    if not os.path.isfile(path):
        raise ValueError(f"{param}: {path!r} is not a file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        return np.load(path)
    if ext in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError:
            raise ValueError(f"{param}: reading {path} needs tifffile (pip install 'hvd_rsgc[houston]')") from None
        return np.asarray(tifffile.imread(path))
    if ext == ".mat":
        return read_mat(path, MAT_KEYS[what], param)
    raise ValueError(f"{param}: {path!r} is not a .mat, .tif, .tiff or .npy file")


def load_scene(hsi_path, lidar_path, train_path, test_path, bands: int = BANDS,
               num_classes: int = len(CLASSES)):
    """-> (cube float32 (B+1, H, W) standardised per band, train map, test map) with checks."""
    hsi = read_array(hsi_path, "hsi", "houston_hsi")
    if hsi.ndim != 3:
        raise ValueError(f"houston_hsi: expected a 3-D cube (H, W, {bands}), got shape {hsi.shape}")
    if hsi.shape[2] != bands and hsi.shape[0] == bands:
        hsi = np.moveaxis(hsi, 0, 2)
    if hsi.shape[2] != bands:
        raise ValueError(f"houston_hsi: the cube has {hsi.shape[2]} bands (shape {hsi.shape}), "
                         f"expected {bands} (houston_bands)")
    H, W = hsi.shape[:2]
    lidar = np.squeeze(read_array(lidar_path, "lidar", "houston_lidar"))
    if lidar.shape != (H, W):
        raise ValueError(f"houston_lidar: the DSM is {lidar.shape} but the HSI is {(H, W)}: the "
                         "two modalities must be co-registered on the same grid")
    maps = []
    for path, what, param in ((train_path, "train", "houston_train"), (test_path, "test", "houston_test")):
        lab = np.squeeze(read_array(path, what, param))
        if lab.shape != (H, W):
            raise ValueError(f"{param}: the label map is {lab.shape} but the HSI is {(H, W)}")
        if not np.issubdtype(lab.dtype, np.integer):
            if not np.all(np.isfinite(lab)) or not np.all(lab == np.round(lab)):
                raise ValueError(f"{param}: label values must be integers 0..{num_classes}")
            lab = lab.astype(np.int64)
        lo, hi = int(lab.min()), int(lab.max())
        if lo < 0 or hi > num_classes:
            raise ValueError(f"{param}: label values must be in 0..{num_classes} (0 = unlabelled), "
                             f"found {lo if lo < 0 else hi}")
        if hi == 0:
            raise ValueError(f"{param}: the {what} label map labels no pixel (all 0 = unlabelled): "
                             "the wrong file?")
        maps.append(torch.from_numpy(lab.astype(np.int64)))
    if bool(((maps[0] > 0) & (maps[1] > 0)).any()):
        raise ValueError("houston_train and houston_test label the same pixel(s): the split must be disjoint")
    cube = torch.from_numpy(np.concatenate([hsi, lidar[..., None]], axis=2).astype(np.float32))
    cube = cube.permute(2, 0, 1).contiguous()                        # (B+1, H, W)
    if not torch.isfinite(cube).all():
        raise ValueError("houston_hsi / houston_lidar: the data contain NaN or inf values")
    return standardize(cube), maps[0], maps[1]


class HoustonPatches(PixelPatches):
    """Patches around the labelled pixels of one label map: items ``(patch (B+1, p, p),
    class 0..14)``; the models learn the HSI / LiDAR split from ``hsi_bands``."""

    def __init__(self, cube: torch.Tensor, labels: torch.Tensor, patch_size: int, classes=CLASSES):
        super().__init__(cube, labels, patch_size, classes, {"hsi_bands": cube.shape[0] - 1},
                         param="image_size (the patch size) for houston")
        self.bands = cube.shape[0] - 1


def build(cfg):
    """-> (train, test, class names) from the data section (``houston_*`` keys)."""
    cube, tr, te = load_scene(cfg.houston_hsi, cfg.houston_lidar, cfg.houston_train, cfg.houston_test,
                              cfg.houston_bands)
    return (HoustonPatches(cube, tr, cfg.image_size), HoustonPatches(cube, te, cfg.image_size), list(CLASSES))
