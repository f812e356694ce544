"""Batch augmentation and normalisation, in the training process with an explicit generator
(seeded per seed/rank/epoch), so a resumed run draws exactly what an uninterrupted run draws.
Random crop (reflect-pad by size/8, crop back), horizontal/vertical flips, 90-degree rotations.
Per-sample choices are vectorised with masks; only the crop offsets loop over the batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# NWPU-RESISC45 training-set statistics on 0-255 (torchgeo)
RESISC45_MEAN = (93.894, 97.112, 87.568)
RESISC45_STD = (51.849, 47.237, 47.063)


def augment(x: torch.Tensor, gen: torch.Generator, crop: bool = True, flips: bool = True,
            rot90: bool = True) -> torch.Tensor:
    """x: float (B, C, H, W) with H == W."""
    B, _, H, W = x.shape
    if crop:
        p = max(1, H // 8)
        padded = F.pad(x, (p, p, p, p), mode="reflect")
        oy = torch.randint(0, 2 * p + 1, (B,), generator=gen).tolist()
        ox = torch.randint(0, 2 * p + 1, (B,), generator=gen).tolist()
        x = torch.stack([padded[i, :, oy[i]:oy[i] + H, ox[i]:ox[i] + W] for i in range(B)])
    if flips:
        m = (torch.rand(B, generator=gen) < 0.5).view(B, 1, 1, 1).to(x.device)
        x = torch.where(m, x.flip(-1), x)
        m = (torch.rand(B, generator=gen) < 0.5).view(B, 1, 1, 1).to(x.device)
        x = torch.where(m, x.flip(-2), x)
    if rot90 and H == W:
        k = torch.randint(0, 4, (B,), generator=gen).view(B, 1, 1, 1).to(x.device)
        out = x
        for r in (1, 2, 3):
            out = torch.where(k == r, torch.rot90(x, r, dims=(-2, -1)), out)
        x = out
    return x


def normalize(x_uint8: torch.Tensor, mean=RESISC45_MEAN, std=RESISC45_STD) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32, device=x_uint8.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x_uint8.device).view(1, -1, 1, 1)
    return (x_uint8.float() - m) / s
