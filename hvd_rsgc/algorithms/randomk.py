"""Random-k: k = ceil(rho*n) indices drawn without replacement from a generator seeded by
(seed, step, tensor index), so every rank draws the same set: the k values are *allreduced*
and no index travels. With error feedback the values are sent as they are; without it they
are scaled by n/k (unbiased). The global torch RNG is never touched."""
from __future__ import annotations

import torch

from .base import FP16_MAX, Method, scatter_sum, to_wire
from .select import random_indices, splitmix_seed


class RandomK(Method):
    name = "randomk"
    communicator = "allreduce"

    def __init__(self, memory, seed: int = 0, **kw):
        super().__init__(memory, **kw)
        self.seed = int(seed)

    def rows_for(self, layer) -> torch.Tensor:
        gen = torch.Generator().manual_seed(splitmix_seed(self.seed, layer.index, layer.step))
        return random_indices(layer.numel, layer.k, gen)

    def empty_message(self, layer, device):
        return torch.zeros(layer.k, dtype=self.value_dtype, device=device)

    def encode(self, layer, g, ctx):
        gu = layer.layout.to_units(g.float() if g.dtype != torch.float32 else g)
        acc = self.memory.accumulate(layer.memory, gu)
        rows = self.rows_for(layer).to(acc.device)
        values = acc.index_select(0, rows).view(-1)
        if not self.memory.error_feedback:
            values = values * (layer.numel / layer.k)
        # to_wire saturates fp16 at 65504 (the n/k scaling reaches it soon); what is cut off
        # stays in the error-feedback residual, never an inf on the wire or in it. The values
        # are allreduced, summed in fp16 over ``size`` ranks: each rank's saturates at
        # 65504 / size, so the sum cannot overflow either
        size = max(1, int(ctx.get("size", 1)))
        if self.value_dtype == torch.float16 and size > 1:
            values = values.clamp(-FP16_MAX / size, FP16_MAX / size)
        wire, sent = to_wire(values, self.value_dtype)
        self.memory.mark_sent(layer.memory, rows, sent, layer.layout)
        ctx["rows"] = rows
        ctx["sent_units"] = int(rows.numel())
        return wire

    def give_back(self, layer, msg, ctx):
        """``msg``: a copy of the values this rank sent (the allreduce sums in place)."""
        if layer.memory:
            self.memory.keep(layer.memory, ctx["rows"], msg.float(), layer.layout)

    def decode(self, layer, reduced, nranks, ctx):
        """``reduced``: the allreduced values (Horovod has already averaged/summed them)."""
        return scatter_sum(layer.layout, reduced.view(-1, 1), ctx["rows"], torch.float32)
