"""signSGD with majority vote (Bernstein, Wang, Azizzadenesheli, Anandkumar, ICML 2018).

Every rank sends the sign of its gradient, one bit per element; the aggregate is the
element-wise majority of the ranks' signs:

    bit_i = 1 if g_i < 0 else 0          (sign(0) is sent as +1: one bit has no zero)
    vote_i = sum_r (+1 | -1)_r,i;   out_i = sign(vote_i)   (a tie, possible with an even
                                                            number of ranks, gives 0)

No error feedback and no scale: the optimizer's learning rate sets the step (every element moves
by +-lr, or 0 on a tie), as in plain signSGD. Use a small lr (1e-4 .. 1e-3 where SGD uses 0.1).

Wire format: one uint8 message per tensor per rank, the bits packed little-endian (element
8j+b is bit b of byte j), ``ceil(n/8)`` bytes; allgathered, so every rank counts the votes.
``decode`` returns ``nranks * sign(vote)`` (the "sum" the adapter divides by the number of
ranks for ``op=Average``): the aggregate is exactly the majority sign vector with averaging,
``nranks`` times it with ``op=Sum``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Method
from .memory import NoMemory

_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def sign_bytes(n: int) -> int:
    """Bytes of ``n`` packed sign bits."""
    return math.ceil(n / 8)


def pack_signs(negative: torch.Tensor) -> torch.Tensor:
    """bool (n,) -> uint8 (ceil(n/8),): element 8j+b is bit b of byte j (little-endian)."""
    bits = negative.reshape(-1).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = F.pad(bits, (0, pad))
    w = torch.tensor(_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (bits.view(-1, 8) * w).sum(1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: uint8 (..., ceil(n/8)) -> bool (..., n)."""
    need = sign_bytes(n)
    if packed.dtype != torch.uint8 or packed.shape[-1] != need:
        raise ValueError(f"sign message has {packed.shape[-1]} bytes of {packed.dtype}, "
                         f"expected {need} uint8")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :n].bool()


def majority_vote(gathered: torch.Tensor, nranks: int, n: int) -> torch.Tensor:
    """Concatenated sign messages of ``nranks`` ranks -> float32 (n,) in {-1, 0, +1}."""
    per = sign_bytes(n)
    if gathered.numel() != per * nranks:
        raise ValueError(f"signSGD gathered {gathered.numel()} bytes, expected {nranks} x {per}")
    negative = unpack_signs(gathered.reshape(nranks, per), n)
    votes = nranks - 2 * negative.sum(0, dtype=torch.int32)
    return torch.sign(votes).to(torch.float32)


class SignSGD(Method):
    """1 bit per element, allgathered; majority vote on decode."""

    name = "signsgd"
    communicator = "allgather"
    scale_equivariant = False           # +-1 per element, whatever the gradient's size

    def __init__(self):
        super().__init__(NoMemory())

    def units_for(self, layer, density):
        return layer.numel

    def empty_message(self, layer, device):
        return torch.zeros(sign_bytes(layer.numel), dtype=torch.uint8, device=device)

    def encode(self, layer, g, ctx):
        ctx["sent_units"] = layer.numel
        return pack_signs(g.reshape(-1) < 0)

    def decode(self, layer, gathered, nranks, ctx):
        return (majority_vote(gathered, nranks, layer.numel) * nranks).view(layer.shape)
