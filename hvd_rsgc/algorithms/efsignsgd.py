"""EF-signSGD (Karimireddy, Rebjock, Stich, Jaggi, ICML 2019, "Error Feedback Fixes SignSGD").

Per compressed tensor on every rank, with an error-feedback residual e (zero at the start):

    p = e + g;   delta = (||p||_1 / n) * sign(p);   e = p - delta

``delta`` travels as one fp32 scale and one sign bit per element (sign(0) is sent as +1; the
residual keeps the difference). The aggregate is the average of the ranks' deltas (the
adapter divides the decoded sum by the number of ranks for ``op=Average``).

Wire format: one uint8 message per tensor per rank, allgathered: the fp32 scale (4 bytes, its
bit pattern) followed by the packed sign bits (see ``signsgd.pack_signs``):
``4 + ceil(n/8)`` bytes.
"""
from __future__ import annotations

import torch

from .base import Method, header_words
from .memory import ErrorFeedback
from .signsgd import pack_signs, sign_bytes, unpack_signs


def message_bytes(n: int) -> int:
    return 4 + sign_bytes(n)


def encode_message(p: torch.Tensor):
    """p (any shape, fp32) -> (uint8 message, delta actually sent (fp32, p's shape))."""
    flat = p.reshape(-1)
    scale = (flat.abs().sum() / flat.numel()).reshape(1)
    negative = flat < 0
    delta = torch.where(negative, -scale, scale)
    msg = torch.cat([scale.contiguous().view(torch.uint8), pack_signs(negative)])
    return msg, delta.view(p.shape)


def decode_sum(gathered: torch.Tensor, nranks: int, n: int) -> torch.Tensor:
    """Sum over ranks of scale_r * sign_r: float32 (n,)."""
    per = message_bytes(n)
    if gathered.dtype != torch.uint8 or gathered.numel() != per * nranks:
        raise ValueError(f"EF-signSGD gathered {gathered.numel()} bytes of {gathered.dtype}, "
                         f"expected {nranks} x {per} uint8")
    msgs = gathered.reshape(nranks, per)
    scales = header_words(msgs, torch.float32)           # (P, 1)
    negative = unpack_signs(msgs[:, 4:].contiguous(), n)           # (P, n)
    return torch.where(negative, -scales, scales).sum(0)


class EFSignSGD(Method):
    name = "efsignsgd"
    communicator = "allgather"

    def __init__(self):
        super().__init__(ErrorFeedback())

    def units_for(self, layer, density):
        return layer.numel

    def empty_message(self, layer, device):
        return torch.zeros(message_bytes(layer.numel), dtype=torch.uint8, device=device)

    def encode(self, layer, g, ctx):
        gu = layer.layout.to_units(g.float() if g.dtype != torch.float32 else g)
        p = self.memory.accumulate(layer.memory, gu)
        msg, delta = encode_message(p)
        self.memory.mark_sent(layer.memory, None, delta)
        ctx["sent_units"] = layer.numel
        return msg

    def decode(self, layer, gathered, nranks, ctx):
        return decode_sum(gathered, nranks, layer.numel).view(layer.shape)
