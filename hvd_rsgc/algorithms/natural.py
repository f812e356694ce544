"""Natural compression (Horvath, Ho, Horvath, Sahu, Canini, Richtarik, 2019, "Natural
Compression for Distributed Deep Learning"): every element rounded stochastically to a power
of two, unbiased.

For x != 0 with 2^k <= |x| < 2^(k+1):

    C(x) = sign(x) * 2^(k+1)   with probability p = (|x| - 2^k) / 2^k
           sign(x) * 2^k       otherwise                              (E[C(x)] = x)

Computed from ``frexp``: |x| = m * 2^E with m in [0.5, 1), so k = E - 1 and p = 2m - 1 (exact);
with u ~ U[0, 1), round up iff u < p.

Wire format [choice]: the paper's 9 bits per element (sign + the fp32 exponent) are packed into
one byte per element plus one int32 per tensor. The header T is the largest exponent E of the
tensor's elements (so every rounded value is <= 2^T); byte = sign << 7 | c with a 7-bit code c:
c = 0 is zero, c = 1..127 is 2^(T - 127 + c), i.e. 127 powers of two down to 2^(T - 126).
Elements below that smallest power (more than 2^126 times smaller than the tensor's largest)
are rounded stochastically to 0 or 2^(T - 126) with probability |x| / 2^(T - 126): still
unbiased. Values are built from their exponent bits (exact, subnormals included; results
below 2^-149 decode as 0, |x| >= 2^127 could round up to 2^128 and is clamped to 2^127).
Bytes per tensor per rank: ``n + 4`` (4x smaller than fp32, the paper's 9-bit form is 3.56x).

Randomness as in TernGrad: u from a generator seeded by (seed, rank, tensor index, step).
"""
from __future__ import annotations

import torch

from .base import Method, header_words
from .memory import NoMemory
from .select import seeded_uniform

SPAN = 126          # powers of two below the top one that a code can express


def message_bytes(n: int) -> int:
    return n + 4


def pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 for integer e, built from the IEEE-754 bit pattern (exact; subnormals for
    -149 <= e < -126, 0 below, e clamped to <= 127)."""
    e = e.to(torch.int32).clamp(max=127)
    normal = (e + 127).clamp(min=0) << 23
    sub = torch.ones_like(e) << (e + 149).clamp(min=0, max=22)
    bits = torch.where(e >= -126, normal, torch.where(e >= -149, sub, torch.zeros_like(e)))
    return bits.view(torch.float32)


def natural_round(x: torch.Tensor, u: torch.Tensor):
    """x (any shape), u (n,) uniforms in [0, 1) -> (top exponent T int32 (1,), bytes uint8 (n,))."""
    flat = x.reshape(-1).float()
    a = flat.abs()
    m, E = torch.frexp(a)
    nz = a > 0
    T = torch.where(nz, E, torch.full_like(E, -(2 ** 30))).max()
    T = torch.where(nz.any(), T, torch.zeros_like(T))   # an all-zero tensor: any header
    lo = T - SPAN                                       # exponent of code 1
    u = u.reshape(-1)
    big = (E - 1) >= lo                                 # 2^lo <= |x|
    up_big = (u < 2 * m - 1).to(torch.int32)            # round 2^(E-1) up to 2^E
    code_big = (E - 1) - lo + 1 + up_big
    p_small = m * pow2(E - lo)                          # |x| / 2^lo < 1
    code_small = (u < p_small).to(torch.int32)          # 0 or the smallest power 2^lo
    code = torch.where(big, code_big, code_small)
    code = torch.where(nz, code, torch.zeros_like(code))
    byte = code | ((flat < 0).to(torch.int32) << 7)
    return T.reshape(1).to(torch.int32), byte.to(torch.uint8)


def decode_values(T: torch.Tensor, byte: torch.Tensor) -> torch.Tensor:
    """T (..., 1) int32, bytes (..., n) uint8 -> fp32 (..., n)."""
    b = byte.to(torch.int32)
    code = b & 127
    mag = pow2(T - 127 + code)
    sign = 1.0 - 2.0 * (b >> 7).to(torch.float32)
    return torch.where(code > 0, sign * mag, torch.zeros_like(mag))


def encode_message(x: torch.Tensor, u: torch.Tensor):
    """-> (uint8 message of n + 4 bytes, values actually sent (fp32, x's shape))."""
    T, byte = natural_round(x, u)
    msg = torch.cat([T.contiguous().view(torch.uint8), byte])
    return msg, decode_values(T, byte).view(x.shape)


def decode_sum(gathered: torch.Tensor, nranks: int, n: int) -> torch.Tensor:
    per = message_bytes(n)
    if gathered.dtype != torch.uint8 or gathered.numel() != per * nranks:
        raise ValueError(f"natural compression gathered {gathered.numel()} bytes of {gathered.dtype}, "
                         f"expected {nranks} x {per} uint8")
    msgs = gathered.reshape(nranks, per)
    T = header_words(msgs, torch.int32)                 # (P, 1)
    return decode_values(T, msgs[:, 4:]).sum(0)


class Natural(Method):
    name = "natural"
    communicator = "allgather"

    def __init__(self, seed: int = 0):
        super().__init__(NoMemory())
        self.seed = int(seed)

    def units_for(self, layer, density):
        return layer.numel

    def uniforms(self, layer, device, rank: int) -> torch.Tensor:
        return seeded_uniform(layer.numel, device, self.seed, rank, layer.index, layer.step)

    def empty_message(self, layer, device):
        return torch.zeros(message_bytes(layer.numel), dtype=torch.uint8, device=device)

    def encode(self, layer, g, ctx):
        u = self.uniforms(layer, g.device, int(ctx.get("rank", 0)))
        msg, _ = encode_message(g, u)
        ctx["sent_units"] = layer.numel
        return msg

    def decode(self, layer, gathered, nranks, ctx):
        return decode_sum(gathered, nranks, layer.numel).view(layer.shape)
