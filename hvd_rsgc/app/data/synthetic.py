"""Procedural synthetic "scenes" for fast tests: each class is an oriented stripe texture
(class-specific orientation and frequency) with a class tint, random phase and noise.
Deterministic per (seed, index); generated on the fly, no files."""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset


class SyntheticScenes(Dataset):
    def __init__(self, n: int, num_classes: int = 6, image_size: int = 32, seed: int = 0):
        if n < 1 or num_classes < 2:
            raise ValueError(f"synthetic set needs n >= 1 and num_classes >= 2, got {n}, {num_classes}")
        self.n, self.num_classes, self.image_size, self.seed = n, num_classes, image_size, seed
        self.classes = [f"texture{c}" for c in range(num_classes)]
        self.targets = [(i * 7919 + seed) % num_classes for i in range(n)]
        yy, xx = torch.meshgrid(torch.arange(image_size, dtype=torch.float32),
                                torch.arange(image_size, dtype=torch.float32), indexing="ij")
        self._grid = (yy, xx)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        y = self.targets[i]
        # mod 2^64 (manual_seed takes up to 2^64 - 1): the same seeds as before wherever they
        # fitted, and any accepted seed works (seed * 1_000_003 overflowed manual_seed)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + i) % (1 << 64))
        theta = math.pi * y / self.num_classes
        freq = 2 * math.pi * (2 + y % 3) / self.image_size
        yy, xx = self._grid
        phase = float(torch.rand((), generator=g)) * 2 * math.pi
        wave = torch.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)
        tint = torch.tensor([(y * 37) % 100, (y * 61) % 100, (y * 83) % 100], dtype=torch.float32) / 100
        img = 128 + 60 * wave[None] * (0.5 + tint[:, None, None]) \
            + 25 * torch.randn(3, self.image_size, self.image_size, generator=g)
        return img.clamp(0, 255).to(torch.uint8), y
