"""Natural compression (Horvath, Ho, Horvath, Sahu, Canini, Richtarik, 2019, "Natural
Compression for Distributed Deep Learning"): every element rounded stochastically to a power
of two, unbiased.

For x != 0 with 2^k <= |x| < 2^(k+1):

    C(x) = sign(x) * 2^(k+1)   with probability p = (|x| - 2^k) / 2^k
           sign(x) * 2^k       otherwise                              (E[C(x)] = x)

Computed from the fp32 bit pattern: a normal |x| = (1 + f) * 2^(b - 127) with biased exponent
b and fraction f in [0, 1), so k = b - 127 and p = f exactly; with u ~ U[0, 1), round up iff
u < f.

Wire format [choice]: the paper's 9 bits per element (sign + the fp32 exponent) are packed into
one byte per element plus one int32 header per tensor. The header B is the largest biased
exponent b of the tensor's elements (every rounded value is <= 2^(B - 126)); byte =
sign << 7 | c with a 7-bit code c: c = 0 is zero, c = 1..127 is 2^(B - 126 + c - 127), the 127
powers of two from 2^(B + 1 - 127) down. Elements below the smallest power used,
2^(L - 127) with L = max(B - 125, 1) -- zeros, fp32 subnormals, and values more than 2^125 below
the tensor's largest -- are rounded stochastically to 0 or 2^(L - 127) with probability
|x| / 2^(L - 127): still unbiased. Decoded values are built from their exponent bits (exact);
|x| >= 2^127 rounding up to 2^128 is clamped to 2^127 (the one biased case).
Bytes per tensor per rank: ``n + 4`` (4x smaller than fp32; the paper's 9-bit form is 3.56x).

Randomness as in TernGrad: u from a generator seeded by (seed, rank, tensor index, step).
"""
from __future__ import annotations

import torch

from .base import StochasticElementwise, header_words
from .memory import NoMemory


def message_bytes(n: int) -> int:
    return n + 4


def _pow2_bits(biased: torch.Tensor) -> torch.Tensor:
    """2^(biased - 127) as fp32 for a biased exponent in [1, 254] (built from its bits)."""
    return (biased.to(torch.int32) << 23).view(torch.float32)


def natural_round(x: torch.Tensor, u: torch.Tensor):
    """x (any shape), u (n,) uniforms in [0, 1) -> (header B int32 (1,), bytes uint8 (n,))."""
    flat = x.reshape(-1).float()
    bits = flat.abs().contiguous().view(torch.int32)
    b = bits >> 23                                            # biased exponent (0: zero/subnormal)
    B = b.max()
    L = (B - 125).clamp(min=1)                                # smallest power used: 2^(L - 127)
    u = u.reshape(-1)
    frac = (bits & 0x7FFFFF).to(torch.float32).mul_(2.0 ** -23)
    code_big = (b + (126 - B)).add_(u < frac)                # 2^k or 2^(k+1), k = b - 127
    # |x| / 2^(L - 127) < 1 below the range (2^(127 - L) <= 2^126: one normal factor)
    p_small = bits.view(torch.float32) * _pow2_bits(254 - L)
    code_small = (u < p_small).to(torch.int32).mul_(L + (126 - B))
    code = torch.where(b >= L, code_big, code_small)
    byte = code.bitwise_or_((flat < 0).to(torch.int32) << 7)
    return B.reshape(1).to(torch.int32), byte.to(torch.uint8)


def decode_values(B: torch.Tensor, byte: torch.Tensor) -> torch.Tensor:
    """B (..., 1) int32, bytes (..., n) uint8 -> fp32 (..., n)."""
    b = byte.to(torch.int32)
    code = b & 127
    mag = _pow2_bits((B - 126 + code).clamp(1, 254))
    val = torch.where(b >= 128, -mag, mag)
    return torch.where(code > 0, val, torch.zeros_like(val))


def pack_message(B: torch.Tensor, byte: torch.Tensor) -> torch.Tensor:
    """header + codes -> the uint8 message of n + 4 bytes."""
    return torch.cat([B.contiguous().view(torch.uint8), byte])


def encode_message(x: torch.Tensor, u: torch.Tensor):
    """-> (uint8 message of n + 4 bytes, values actually sent (fp32, x's shape))."""
    B, byte = natural_round(x, u)
    return pack_message(B, byte), decode_values(B, byte).view(x.shape)


def decode_sum(gathered: torch.Tensor, nranks: int, n: int) -> torch.Tensor:
    per = message_bytes(n)
    if gathered.dtype != torch.uint8 or gathered.numel() != per * nranks:
        raise ValueError(f"natural compression gathered {gathered.numel()} bytes of {gathered.dtype}, "
                         f"expected {nranks} x {per} uint8")
    msgs = gathered.reshape(nranks, per)
    B = header_words(msgs, torch.int32)                 # (P, 1)
    return decode_values(B, msgs[:, 4:]).sum(0)


class Natural(StochasticElementwise):
    name = "natural"
    communicator = "allgather"

    def __init__(self, seed: int = 0):
        super().__init__(NoMemory())
        self.seed = int(seed)

    def message_bytes(self, n: int) -> int:
        return message_bytes(n)

    def pack(self, g, u):
        return pack_message(*natural_round(g, u))

    def decode(self, layer, gathered, nranks, ctx):
        return decode_sum(gathered, nranks, layer.numel).view(layer.shape)
