"""QSGD (Alistarh et al. 2017): s-level stochastic quantisation per bucket, unbiased.

    a_j = s * |v_j| / ||v_bucket||_2;  l_j = floor(a_j);  xi_j = l_j + Bernoulli(a_j - l_j)
    Q(v_j) = ||v_bucket||_2 * sign(v_j) * xi_j / s

Wire format (fixed width instead of the paper's Elias coding): one uint8 message per tensor =
``ceil(n/d)`` fp32 bucket norms (as bytes) followed by the codes packed at
``b = 1 + ceil(log2(s+1))`` bits per element (sign bit + level). s = 1 (the RS-DGC paper's
"1-bit QSGD") is 2 bits per element: ~16x, the nominal "32x" of the paper is not reachable
with a sign and a zero. Bytes: ``4*ceil(n/d) + ceil(n*b/8)``.
"""
from __future__ import annotations

import math

import torch

from .base import Method


def code_bits(levels: int) -> int:
    return 1 + max(1, math.ceil(math.log2(levels + 1)))


def message_bytes(n: int, levels: int, bucket_size: int) -> int:
    return 4 * math.ceil(n / bucket_size) + math.ceil(n * code_bits(levels) / 8)


def _bucketed(x: torch.Tensor, bucket_size: int) -> torch.Tensor:
    n = x.numel()
    nb = math.ceil(n / bucket_size)
    flat = x.reshape(-1)
    if nb * bucket_size != n:
        flat = torch.nn.functional.pad(flat, (0, nb * bucket_size - n))
    return flat.view(nb, bucket_size)


def quantize(x: torch.Tensor, levels: int, bucket_size: int, generator=None):
    """-> (norms fp32 (nb,), codes int (n,) in [0, 2*levels+1]): code = 2*xi + (v<0)."""
    n = x.numel()
    b = _bucketed(x.float(), bucket_size)
    norms = torch.linalg.vector_norm(b, dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    a = b.abs() * (levels / safe).unsqueeze(1)
    low = a.floor()
    rnd = torch.rand(a.shape, generator=generator, device=a.device)
    xi = low + (rnd < (a - low)).to(a.dtype)
    xi.clamp_(max=levels)
    codes = xi.to(torch.int32) * 2 + (b < 0).to(torch.int32)
    return norms, codes.view(-1)[:n]


def dequantize(norms: torch.Tensor, codes: torch.Tensor, levels: int, bucket_size: int,
               n: int) -> torch.Tensor:
    """Inverse of :func:`quantize` for one message (flat fp32 of n elements)."""
    codes = codes[:n].to(torch.int32)
    xi = (codes >> 1).float()
    sign = 1.0 - 2.0 * (codes & 1).float()
    nb = norms.numel()
    scale = torch.repeat_interleave(norms / levels, bucket_size)[:n] if nb > 1 else norms / levels
    return xi * sign * scale


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative ints (< 2**bits) into a uint8 tensor, little-endian bit order."""
    n = codes.numel()
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    expanded = ((codes.to(torch.int32).unsqueeze(1) >> shifts) & 1).to(torch.uint8).view(-1)
    total = n * bits
    pad = (-total) % 8
    if pad:
        expanded = torch.nn.functional.pad(expanded, (0, pad))
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32))
    return (expanded.view(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits` -> int32 codes (n,). ``packed`` may be (..., nbytes)."""
    need = math.ceil(n * bits / 8)
    if packed.shape[-1] != need:
        raise ValueError(f"QSGD message has {packed.shape[-1]} code bytes, expected {need}")
    lead = packed.shape[:-1]
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    bitstream = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(*lead, -1)
    bitstream = bitstream[..., : n * bits].reshape(*lead, n, bits)
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32))
    return (bitstream * weights).sum(-1)


def encode_message(x: torch.Tensor, levels: int, bucket_size: int, generator=None):
    """-> (uint8 message, dequantised values actually sent (fp32, shape of x))."""
    n = x.numel()
    norms, codes = quantize(x, levels, bucket_size, generator)
    msg = torch.cat([norms.contiguous().view(torch.uint8), pack_bits(codes, code_bits(levels))])
    sent = dequantize(norms, codes, levels, bucket_size, n)
    return msg, sent.view(x.shape)


def decode_sum(gathered: torch.Tensor, nranks: int, levels: int, bucket_size: int,
               n: int) -> torch.Tensor:
    """Sum of the dequantised messages of ``nranks`` ranks (gathered uint8, concatenated)."""
    per = message_bytes(n, levels, bucket_size)
    if gathered.numel() != per * nranks:
        raise ValueError(f"QSGD gathered {gathered.numel()} bytes, expected {nranks} x {per}")
    nb = math.ceil(n / bucket_size)
    msgs = gathered.view(nranks, per)
    norms = msgs[:, : 4 * nb].reshape(-1).view(torch.float32).view(nranks, nb)
    codes = unpack_bits(msgs[:, 4 * nb:].contiguous(), code_bits(levels), n)  # (P, n)
    xi = (codes >> 1).float()
    sign = 1.0 - 2.0 * (codes & 1).float()
    scale = torch.repeat_interleave(norms / levels, bucket_size, dim=1)[:, :n]
    return (xi * sign * scale).sum(0)


class QSGD(Method):
    """Method wrapper: allgather of one uint8 message per rank; decode sums the ranks'
    dequantised tensors. Error feedback off by default (QSGD is unbiased); with an
    ``ErrorFeedback`` memory it is the Karimireddy et al. variant."""

    name = "qsgd"
    communicator = "allgather"
    momentum_correction = False

    def __init__(self, memory, levels: int = 1, bucket_size: int = 512, seed: int = 0):
        if not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be an integer >= 1, got {levels!r}")
        if not isinstance(bucket_size, int) or bucket_size < 1:
            raise ValueError(f"bucket_size must be an integer >= 1, got {bucket_size!r}")
        super().__init__(memory)
        self.levels = levels
        self.bucket_size = bucket_size
        self.seed = seed
        self._generators: dict = {}

    def units_for(self, layer, density):
        return layer.numel

    def _generator(self, device, rank: int = 0):
        """This rank's stream: the ranks' rounding draws must be independent (the same draws on
        every rank would correlate their quantisation noise, and averaging over P ranks would
        no longer divide its variance by P)."""
        key = str(device)
        if key not in self._generators:
            from .select import splitmix_seed
            self._generators[key] = torch.Generator(device=device).manual_seed(splitmix_seed(self.seed, rank))
        return self._generators[key]

    def rng_state(self):
        return {dev: g.get_state() for dev, g in self._generators.items()}

    def load_rng_state(self, state):
        for dev, st in state.items():
            self._generator(dev).set_state(st)

    def empty_message(self, layer, device):
        return torch.zeros(message_bytes(layer.numel, self.levels, self.bucket_size),
                           dtype=torch.uint8, device=device)

    def encode(self, layer, g, ctx):
        gu = layer.layout.to_units(g.float() if g.dtype != torch.float32 else g)
        acc = self.memory.accumulate(layer.memory, gu)
        msg, sent = encode_message(acc, self.levels, self.bucket_size,
                                   self._generator(acc.device, int(ctx.get("rank", 0))))
        self.memory.mark_sent(layer.memory, None, sent)
        ctx["sent_units"] = layer.numel
        return msg

    def decode(self, layer, gathered, nranks, ctx):
        return decode_sum(gathered, nranks, self.levels, self.bucket_size,
                          layer.numel).view(layer.shape)
