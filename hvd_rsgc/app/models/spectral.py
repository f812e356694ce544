"""``hsicnn``: a small spectral-spatial CNN for per-pixel patches of a multi-band scene
(hyperspectral cubes such as Indian Pines, ``app/data/indian_pines.py``; also Houston's
HSI + LiDAR stack, all bands as channels). Input ``(N, in_channels, p, p)``, output the centre
pixel's class logits.

Choices (a common HSI patch-classifier shape, no paper reproduced): a 1x1 convolution mixes
the bands down to 64 spectral features per pixel (BN, ReLU); two 3x3 conv + BN + ReLU blocks
(64 -> 64 -> 128) look at the neighbourhood; global average pooling, dropout 0.2, one linear
classifier. About 0.13M parameters for 200 bands.
"""
from __future__ import annotations

import torch.nn as nn


def _block(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class HSICNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, spectral: int = 64, width: int = 128):
        super().__init__()
        self.in_channels = in_channels
        self.features = nn.Sequential(_block(in_channels, spectral, 1), _block(spectral, spectral, 3),
                                      _block(spectral, width, 3))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(width, num_classes))

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"hsicnn expects input (N, {self.in_channels}, p, p), got {tuple(x.shape)}")
        return self.head(self.features(x).mean(dim=(2, 3), keepdim=True))


def hsicnn(num_classes: int, image_size: int = 9, in_channels: int = 200):
    return HSICNN(num_classes, in_channels=in_channels)
