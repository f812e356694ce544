"""Learned Gradient Compression (Abrahamyan, Chen, Bekoulis, Deligiannis, IEEE TNNLS 2021,
arXiv 2103.08870), pure tensor parts: the autoencoder, its losses, the side information.

Provenance (see ../shared/ALGORITHMS.md section 6). From the paper (abstract/summary): gradients
of different nodes are correlated; a lightweight autoencoder trained during the first stages of
training captures their common information; two instances, parameter server (PS) and
ring-allreduce (RAR). The full text could not be retrieved here, so the rest follows an
unofficial public re-implementation [LGC-code] or is our documented choice [choice]:

* signal: top-k (ratio r_g) of each compressed tensor's error-feedback accumulator under
  *common* indices, concatenated into one vector x of length K [LGC-code];
* encoder: Conv1d(1,64,3,s2) -> Conv1d(64,128,3,s2) -> Conv1d(128,256,3,s2) ->
  Conv1d(256,64,3,s2) -> Conv1d(64,4,1), LeakyReLU after each, no padding [LGC-code]: a code of
  4 x L4 values, L_{j+1} = floor((L_j - 3)/2) + 1, about K/4;
* decoder: ConvTranspose1d(4,32,3,s2) -> (32,64) -> (64,128) -> (128,32), LeakyReLU, linear
  interpolation to K, then (PS) concatenated with the 1-channel side signal, Conv1d(.,1,1)
  [LGC-code]; PS has one decoder per node, RAR one shared decoder;
* losses: PS 0.5*L_rec + 0.5*L_sim with L_rec = sum_n MSE(x_n, D_n(E(x_c), side_n)) for a random
  node c and L_sim = sum_{i != j} MSE(E(x_i), E(x_j)) [LGC-code]; RAR
  MSE(D(mean_n E(x_n)), mean_n x_n) + lambda * L_sim [choice];
* inputs are divided by a scale common to all nodes (the mean RMS, one allreduced float) so
  that the autoencoder sees O(1) values [choice]; Adam, lr 1e-3, one step per iteration [choice:
  the re-implementation uses SGD, which barely moves on gradient-sized values];
* side information for PS: the k_inno largest-magnitude entries of each node's x_n, as
  positions in [0, K) and values, zeros elsewhere [choice, cleaner than packing them in top-k
  order].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def code_length(K: int) -> int:
    L = K
    for _ in range(4):
        L = (L - 3) // 2 + 1
    return L


def check_signal(K: int, code_size_limit_ratio: float = 1.0) -> int:
    """The code (4 x L4 values) must be smaller than the K values it replaces."""
    L4 = code_length(K)
    if L4 < 1 or 4 * L4 >= K * code_size_limit_ratio:
        raise ValueError(f"LGC: the code (4 x {max(L4, 0)} values) is not smaller than the k = {K} "
                         "top-k values it would replace: raise density (r_g) or compress more tensors")
    return 4 * L4


class Encoder(nn.Module):
    def __init__(self, code_channels: int = 4):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(1, 64, 3, 2), nn.Conv1d(64, 128, 3, 2),
                                    nn.Conv1d(128, 256, 3, 2), nn.Conv1d(256, 64, 3, 2)])
        self.out = nn.Conv1d(64, code_channels, 1)

    def forward(self, x):               # x: (B, K) -> (B, C, L4)
        h = x.unsqueeze(1)
        for c in self.convs:
            h = F.leaky_relu(c(h))
        return self.out(h)


class Decoder(nn.Module):
    def __init__(self, code_channels: int = 4, side: bool = False):
        super().__init__()
        self.deconvs = nn.ModuleList([nn.ConvTranspose1d(code_channels, 32, 3, 2),
                                      nn.ConvTranspose1d(32, 64, 3, 2),
                                      nn.ConvTranspose1d(64, 128, 3, 2),
                                      nn.ConvTranspose1d(128, 32, 3, 2)])
        self.side = side
        self.out = nn.Conv1d(32 + (1 if side else 0), 1, 1)

    def forward(self, z, K: int, side_signal=None):   # z: (B, C, L4) -> (B, K)
        h = z
        for d in self.deconvs:
            h = F.leaky_relu(d(h))
        h = F.interpolate(h, size=K, mode="linear", align_corners=False)
        if self.side:
            h = torch.cat([h, side_signal.unsqueeze(1)], dim=1)
        return self.out(h).squeeze(1)


class LGCAutoencoder(nn.Module):
    """One shared encoder; one decoder (RAR) or one per node (PS)."""

    def __init__(self, nodes: int, mode: str, code_channels: int = 4):
        super().__init__()
        if mode not in ("ps", "rar"):
            raise ValueError(f"mode must be 'ps' or 'rar', got {mode!r}")
        self.mode = mode
        self.encoder = Encoder(code_channels)
        n_dec = nodes if mode == "ps" else 1
        self.decoders = nn.ModuleList([Decoder(code_channels, side=(mode == "ps")) for _ in range(n_dec)])

    # ------------------------------------------------------------------ losses (stage 2)
    def loss_rar(self, X: torch.Tensor, sim_weight: float = 0.1) -> torch.Tensor:
        """X: (P, K) normalised values of every node under common indices."""
        Z = self.encoder(X)
        rec = self.decoders[0](Z.mean(0, keepdim=True), X.shape[1])
        loss = F.mse_loss(rec, X.mean(0, keepdim=True))
        return loss + sim_weight * similarity(Z)

    def loss_ps(self, X: torch.Tensor, sides: torch.Tensor, c: int) -> torch.Tensor:
        Z = self.encoder(X)
        zc = Z[c:c + 1]
        rec = sum(F.mse_loss(self.decoders[n](zc, X.shape[1], sides[n:n + 1]), X[n:n + 1])
                  for n in range(X.shape[0]))
        return 0.5 * rec + 0.5 * similarity(Z)

    # ------------------------------------------------------------------ stage 3
    @torch.no_grad()
    def reconstruct_rar(self, z_mean: torch.Tensor, K: int) -> torch.Tensor:
        return self.decoders[0](z_mean, K)

    @torch.no_grad()
    def reconstruct_ps(self, z_leader: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
        K = sides.shape[1]
        return torch.cat([self.decoders[n](z_leader, K, sides[n:n + 1]) for n in range(sides.shape[0])])


def similarity(Z: torch.Tensor) -> torch.Tensor:
    """sum_{i != j} MSE(Z_i, Z_j) over nodes, vectorised (pairwise squared distances)."""
    P = Z.shape[0]
    if P < 2:
        return Z.sum() * 0
    flat = Z.reshape(P, -1)
    d = torch.cdist(flat, flat).square() / flat.shape[1]
    return d.sum()


def side_signal(x: torch.Tensor, k_inno: int):
    """(positions int32 (k_inno,), values (k_inno,)) of the largest |x| entries, and the dense
    length-K side signal holding them (zeros elsewhere)."""
    k = max(1, min(k_inno, x.numel()))
    pos = torch.topk(x.abs(), k, sorted=False).indices.sort().values
    return pos.to(torch.int32), x[pos]


def side_dense(pos: torch.Tensor, vals: torch.Tensor, K: int) -> torch.Tensor:
    out = torch.zeros(K, dtype=vals.dtype, device=vals.device)
    out[pos.long()] = vals
    return out
