"""Per-pixel patch samples of a multi-band scene (Houston2013, Indian Pines): a ``p`` x ``p``
window centred on each labelled pixel, all bands as channels, the scene reflect-padded at its
borders. The bands come standardised, so the loop's RGB normalisation is skipped
(``prenormalized``); ``model_kwargs`` tell ``build_model`` the channel layout. Also what both
scenes' readers share: one array from a ``.mat`` file, per-band standardisation."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class PixelPatches(Dataset):
    """Items ``(patch (C, p, p), class 0..K-1)`` for the pixels with label > 0 of ``labels``
    (label ``c`` is class ``c - 1``), in row-major order."""

    prenormalized = True
    crop_augment = False          # a shifted window would move the labelled centre pixel

    def __init__(self, cube: torch.Tensor, labels: torch.Tensor, patch_size: int, classes,
                 model_kwargs: dict, param: str = "image_size (the patch size)"):
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"{param} must be odd and >= 1, got {patch_size}")
        r = patch_size // 2
        if r and min(cube.shape[1:]) <= r:
            raise ValueError(f"{param} = {patch_size} is too large for a {tuple(cube.shape[1:])} scene")
        self.padded = torch.nn.functional.pad(cube[None], (r, r, r, r), mode="reflect")[0] if r else cube
        self.coords = (labels > 0).nonzero()                      # (N, 2) row-major order
        self.targets = labels[labels > 0] - 1
        self.p = patch_size
        self.classes = list(classes)
        self.model_kwargs = dict(model_kwargs)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def __getitem__(self, i):
        y, x = (int(v) for v in self.coords[i])
        return self.padded[:, y:y + self.p, x:x + self.p], int(self.targets[i])


def standardize(cube: torch.Tensor) -> torch.Tensor:
    """Each band to mean 0, std 1 over the whole scene (no labels used)."""
    mean = cube.mean(dim=(1, 2), keepdim=True)
    std = cube.std(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    return (cube - mean) / std


def read_mat(path: str, keys, param: str) -> np.ndarray:
    """One array of a MATLAB ``.mat`` file (v5, or v7.3 = HDF5 with h5py): the first of ``keys``
    present, else the file's only array; errors name ``param``."""
    try:
        import scipy.io
    except ImportError:
        raise ValueError(f"{param}: reading {path} needs scipy (pip install 'hvd_rsgc[houston]')") from None
    try:
        arrays = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    except (NotImplementedError, ValueError):    # MATLAB v7.3 = HDF5, arrays stored transposed
        try:
            import h5py
        except ImportError:
            raise ValueError(f"{param}: {path} is a MATLAB v7.3 file; reading it needs h5py") from None
        if not h5py.is_hdf5(path):
            raise ValueError(f"{param}: {path} is neither a MATLAB v5 nor a v7.3 (HDF5) .mat file") from None
        with h5py.File(path, "r") as f:
            arrays = {k: np.asarray(f[k]).T for k in f.keys() if not k.startswith("#")}
    arrays = {k: v for k, v in arrays.items() if isinstance(v, np.ndarray) and v.size > 1}
    for key in keys:
        if key in arrays:
            return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise ValueError(f"{param}: {path} holds {sorted(arrays)}; expected one array or one of "
                     f"{list(keys)}")
