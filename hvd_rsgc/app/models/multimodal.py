"""Two-modality (hyperspectral + LiDAR) patch classifiers for Houston2013, written from the
papers' descriptions (no code copied). Input: ``(N, hsi_bands + 1, p, p)`` -- the HSI bands,
then the LiDAR band (``app/data/houston.py``); output: class logits for the centre pixel.

``ccrnet`` -- CCR-Net style (Wu et al., "Convolutional Neural Networks for Multimodal Remote
Sensing Data Classification", IEEE TGRS 2022). Choices made here where the description leaves
them open:
  * one CNN branch per modality: a 1x1 convolution compresses the HSI bands to 64 channels,
    then two 3x3 conv + BN + ReLU blocks per branch (LiDAR: from 1 channel) to ``width`` maps,
    global average pooling to one feature vector per modality;
  * fusion by **cross-channel reconstruction**: the concatenated features pass through a
    shared fusion layer to a fused code ``z``; two linear decoders reconstruct each modality's
    features from ``z``; the reconstruction error (mean squared, weighted ``recon_weight`` =
    0.1) is returned as ``model.extra_loss`` during training and the training loop adds it to
    the cross-entropy -- so ``z`` must keep what both modalities carry;
  * the classifier is one linear layer on ``z``.

``exvit`` -- ExViT style (Yao et al., "Extended Vision Transformer (ExViT) for Land Use and
Land Cover Classification: A Multimodal Deep Learning Framework", IEEE TGRS 2023). Choices:
  * per modality, a **separable convolution** embedding (depthwise 3x3 + pointwise 1x1, then a
    second depthwise-separable block) turns each pixel of the patch into a ``dim``-d token,
    plus a learned class token and learned position embeddings (p*p + 1 tokens);
  * per modality, ``depth`` = 2 transformer encoder layers (``heads`` = 4, pre-norm, GELU);
  * **cross-modality attention** fusion: each modality's class token attends to the other
    modality's tokens (one multi-head attention each way), the two results are concatenated,
    layer-normalised and classified by one linear layer.
Both are small (about 0.12M / 0.21M parameters at the defaults, 144 bands, 11x11 patches), so CPU runs stay short.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _split(x: torch.Tensor, hsi_bands: int):
    if x.dim() != 4 or x.shape[1] != hsi_bands + 1:
        raise ValueError(f"expected input (N, {hsi_bands + 1}, p, p): {hsi_bands} HSI bands + 1 "
                         f"LiDAR band, got {tuple(x.shape)}")
    return x[:, :hsi_bands], x[:, hsi_bands:]


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class CCRNet(nn.Module):
    def __init__(self, num_classes: int, hsi_bands: int = 144, width: int = 64,
                 recon_weight: float = 0.1, image_size: int = 11):
        super().__init__()
        self.hsi_bands = hsi_bands
        self.hsi = nn.Sequential(nn.Conv2d(hsi_bands, 64, 1, bias=False), nn.BatchNorm2d(64),
                                 nn.ReLU(inplace=True), _block(64, width), _block(width, width))
        self.lidar = nn.Sequential(_block(1, 32), _block(32, width))
        self.fuse = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(inplace=True))
        self.rec_hsi = nn.Linear(width, width)
        self.rec_lidar = nn.Linear(width, width)
        self.head = nn.Linear(width, num_classes)
        self.recon_weight = recon_weight
        self.extra_loss: torch.Tensor | None = None

    def forward(self, x):
        h, lid = _split(x, self.hsi_bands)
        fh = self.hsi(h).mean(dim=(2, 3))
        fl = self.lidar(lid).mean(dim=(2, 3))
        z = self.fuse(torch.cat([fh, fl], 1))
        if self.training and self.recon_weight > 0:
            rec = F.mse_loss(self.rec_hsi(z), fh.detach()) + F.mse_loss(self.rec_lidar(z), fl.detach())
            self.extra_loss = self.recon_weight * rec
        else:
            self.extra_loss = None
        return self.head(z)


class _Encoder(nn.Module):
    """Separable-convolution token embedding + class token + positions + transformer layers."""

    def __init__(self, cin: int, dim: int, tokens: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Sequential(
            nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.Conv2d(cin, dim, 1),
            nn.BatchNorm2d(dim), nn.GELU(),
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False), nn.Conv2d(dim, dim, 1),
            nn.BatchNorm2d(dim), nn.GELU())
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.1,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)                 # (N, p*p, dim)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.blocks(t)


class ExViT(nn.Module):
    def __init__(self, num_classes: int, hsi_bands: int = 144, image_size: int = 11, dim: int = 64,
                 depth: int = 2, heads: int = 4):
        super().__init__()
        self.hsi_bands = hsi_bands
        tokens = image_size * image_size
        self.hsi = _Encoder(hsi_bands, dim, tokens, depth, heads)
        self.lidar = _Encoder(1, dim, tokens, depth, heads)
        self.h_from_l = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.l_from_h = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x):
        h, lid = _split(x, self.hsi_bands)
        th, tl = self.hsi(h), self.lidar(lid)
        ch, _ = self.h_from_l(th[:, :1], tl, tl, need_weights=False)   # HSI class token -> LiDAR
        cl, _ = self.l_from_h(tl[:, :1], th, th, need_weights=False)
        z = torch.cat([th[:, 0] + ch[:, 0], tl[:, 0] + cl[:, 0]], 1)
        return self.head(self.norm(z))


def ccrnet(num_classes: int, image_size: int = 11, hsi_bands: int = 144):
    return CCRNet(num_classes, hsi_bands=hsi_bands, image_size=image_size)


def exvit(num_classes: int, image_size: int = 11, hsi_bands: int = 144):
    return ExViT(num_classes, hsi_bands=hsi_bands, image_size=image_size)
