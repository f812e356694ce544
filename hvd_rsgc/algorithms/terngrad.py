"""TernGrad (Wen, Xu, Yan, Wu, Wang, Chen, Li, NeurIPS 2017): stochastic ternary gradients.

Per compressed tensor on every rank, with u_i ~ U[0, 1) drawn independently per element:

    s = max_i |g_i|;   b_i = 1 if u_i * s < |g_i| else 0      (b_i ~ Bernoulli(|g_i| / s))
    sent_i = s * sign(g_i) * b_i                               (E[sent_i] = g_i: unbiased)

Optional (off by default, as it makes the estimate biased): the paper's gradient clipping,
``g = clamp(g, -c*sigma, c*sigma)`` with sigma the tensor's (population) standard deviation
and c = ``clip_sigma`` (the paper and GRACE use 2.5). No error feedback. The paper's scaler
sharing (one max over all ranks, so that ternary values can be summed in an allreduce) is not
needed here: each rank's scale travels with its message and decode scales every rank's codes.

Randomness: u is drawn from a generator seeded by (seed, rank, tensor index, step)
(``select.seeded_uniform``): ranks draw independently, and a resumed run draws exactly what the
uninterrupted run drew.

Wire format: one uint8 message per tensor per rank, allgathered: the fp32 scale s (4 bytes, its
bit pattern) followed by 2-bit codes (0: zero, 1: +s, 2: -s), four per byte, element 4j+q in
bits 2q..2q+1 of byte j: ``4 + ceil(n/4)`` bytes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import StochasticElementwise, header_words
from .memory import NoMemory

_WEIGHTS = (1, 4, 16, 64)


def code_bytes(n: int) -> int:
    return math.ceil(n / 4)


def message_bytes(n: int) -> int:
    return 4 + code_bytes(n)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in {0, 1, 2} (n,) -> uint8 (ceil(n/4),), little-endian 2-bit fields."""
    c = codes.reshape(-1).to(torch.uint8)
    pad = (-c.numel()) % 4
    if pad:
        c = F.pad(c, (0, pad))
    w = torch.tensor(_WEIGHTS, dtype=torch.uint8, device=c.device)
    return (c.view(-1, 4) * w).sum(1, dtype=torch.uint8)


def unpack_ternary(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: uint8 (..., ceil(n/4)) -> uint8 codes (..., n);
    rejects a message of the wrong length or holding the unused code 3."""
    need = code_bytes(n)
    if packed.dtype != torch.uint8 or packed.shape[-1] != need:
        raise ValueError(f"ternary message has {packed.shape[-1]} code bytes of {packed.dtype}, "
                         f"expected {need} uint8")
    shifts = torch.tensor((0, 2, 4, 6), dtype=torch.uint8, device=packed.device)
    codes = ((packed.unsqueeze(-1) >> shifts) & 3).reshape(*packed.shape[:-1], -1)[..., :n]
    if bool((codes == 3).any()):
        raise ValueError("ternary message holds the unused code 3")
    return codes


def ternarize(x: torch.Tensor, u: torch.Tensor, clip_sigma: float | None = None):
    """x (any shape), u (n,) uniforms in [0, 1) -> (scale fp32 (1,), codes uint8 (n,))."""
    flat = x.reshape(-1).float()
    if clip_sigma is not None:
        c = clip_sigma * flat.std(correction=0)
        flat = torch.minimum(torch.maximum(flat, -c), c)
    a = flat.abs()
    s = a.max()
    keep = (u.reshape(-1) * s < a).to(torch.uint8)
    codes = keep * (1 + (flat < 0).to(torch.uint8))
    return s.reshape(1), codes


def dequantize(scale: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """scale (..., 1) fp32, codes (..., n) -> fp32 (..., n) in {-s, 0, +s}."""
    return scale * ((codes == 1).to(torch.float32) - (codes == 2).to(torch.float32))


def pack_message(scale: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """scale + codes -> the uint8 message of 4 + ceil(n/4) bytes."""
    return torch.cat([scale.contiguous().view(torch.uint8), pack_ternary(codes)])


def encode_message(x: torch.Tensor, u: torch.Tensor, clip_sigma: float | None = None):
    """-> (uint8 message, values actually sent (fp32, x's shape))."""
    scale, codes = ternarize(x, u, clip_sigma)
    return pack_message(scale, codes), dequantize(scale, codes).view(x.shape)


def decode_sum(gathered: torch.Tensor, nranks: int, n: int) -> torch.Tensor:
    """Sum of the dequantised messages of ``nranks`` ranks (concatenated) -> fp32 (n,)."""
    per = message_bytes(n)
    if gathered.dtype != torch.uint8 or gathered.numel() != per * nranks:
        raise ValueError(f"TernGrad gathered {gathered.numel()} bytes of {gathered.dtype}, "
                         f"expected {nranks} x {per} uint8")
    msgs = gathered.reshape(nranks, per)
    scales = header_words(msgs, torch.float32)           # (P, 1)
    codes = unpack_ternary(msgs[:, 4:].contiguous(), n)            # (P, n)
    return dequantize(scales, codes).sum(0)


class TernGrad(StochasticElementwise):
    name = "terngrad"
    communicator = "allgather"

    def __init__(self, seed: int = 0, clip_sigma: float | None = None):
        if clip_sigma is not None and (isinstance(clip_sigma, bool) or not isinstance(clip_sigma, (int, float))
                                       or not clip_sigma > 0):
            raise ValueError(f"clip_sigma must be > 0 or None, got {clip_sigma!r}")
        super().__init__(NoMemory())
        self.seed = int(seed)
        self.clip_sigma = None if clip_sigma is None else float(clip_sigma)

    def message_bytes(self, n: int) -> int:
        return message_bytes(n)

    def pack(self, g, u):
        return pack_message(*ternarize(g, u, self.clip_sigma))

    def decode(self, layer, gathered, nranks, ctx):
        return decode_sum(gathered, nranks, layer.numel).view(layer.shape)
