"""Deep Gradient Compression (Lin et al., ICLR 2018): momentum correction + momentum factor
masking (``memory.MomentumCorrection``), local gradient clipping (``memory.clip_local``, done by
the adapter before accumulation), warm-up densities (``density.warmup_density``) and the
reference implementation's sampled threshold with its re-adjust loop (``select``)."""
from __future__ import annotations

import torch

from . import grouped, native
from .base import SparseMethod
from .select import SamplePlan, sampled_threshold_indices


class DGC(SparseMethod):
    name = "dgc"
    momentum_correction = True
    KERNELS = ("auto", "eager", "native", "grouped")

    def __init__(self, memory, sample_ratio: float = 0.01, seed: int = 0, **kw):
        super().__init__(memory, **kw)
        if not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in (0, 1], got {sample_ratio}")
        self.sample_ratio = sample_ratio
        self.generator = torch.Generator().manual_seed(seed)

    def units_for(self, layer, density):
        return SamplePlan.make(layer.numel, density, self.sample_ratio).num_selects

    def on_density(self, layer):
        layer.plan = SamplePlan.make(layer.numel, layer.density, self.sample_ratio)

    def filter_expected(self, layer):
        return layer.plan.density if layer.plan.num_selects < layer.numel else None

    def select(self, layer, acc, pre=None):
        return sampled_threshold_indices(acc.view(-1), layer.plan, self.generator,
                                         magnitude=True, extremes=pre,
                                         native=self.kernels == "native")

    def encode_group(self, group, grads, ctxs):
        # native kernels: a bucket group in a few C calls (native.encode_group); grouped: a few
        # whole-group tensor operations (grouped.py). Both draw the sample offsets from this
        # generator in the per-layer route's order, so they give its thresholds
        if self.kernels == "grouped":
            return grouped.encode_group(self, group, grads, ctxs, None, selection="sampled")
        if self.kernels != "native":
            return None
        return native.encode_group(self, group, grads, ctxs, "magnitude", selection="sampled")
