"""RS-DGC (the main method): DGC's momentum-corrected residual (eq. 12) + NSI-scored
Chebyshev-neighbourhood units (``nsi.py``) + layer-wise dynamic density (``density.py``).

Each ingredient switches off for the paper's ablation (Table I):
* ``neighbourhood=False`` -> units of one element (NSI of one value = |v|: plain top-k);
* ``beta=1`` -> no statistic (mean |v| only);
* dynamic density is the adapter's ``dynamic=`` switch.

Selection is exact top-k over unit scores (``selection="topk"``), or DGC's sampled threshold
over the scores (``selection="sampled"``) for very many units.
"""
from __future__ import annotations

import dataclasses

import torch

from .base import SparseMethod
from . import grouped, native
from .kernels import compiled_nsi
from .layout import make_layout
from .nsi import nsi_scores, units_for_density
from .select import SamplePlan, sampled_threshold_indices, topk_indices


class RSDGC(SparseMethod):
    name = "rsdgc"
    momentum_correction = True
    KERNELS = ("auto", "eager", "compiled", "native", "grouped")

    def __init__(self, memory, beta: float = 0.5, radius: int = 1, neighbourhood: bool = True,
                 selection: str = "topk", sample_ratio: float = 0.01, seed: int = 0,
                 kernels: str = "eager", **kw):
        super().__init__(memory, kernels=kernels, **kw)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if not isinstance(radius, int) or radius < 0:
            raise ValueError(f"radius must be an integer >= 0, got {radius!r}")
        if selection not in ("topk", "sampled"):
            raise ValueError(f"selection must be 'topk' or 'sampled', got {selection!r}")
        if not 0.0 < sample_ratio <= 1.0:                # as DGC's: NaN, 0 and 2 refused
            raise ValueError(f"sample_ratio must be in (0, 1], got {sample_ratio}")
        self.beta = float(beta)
        self.radius = radius
        self.neighbourhood = neighbourhood
        self.selection = selection
        self.sample_ratio = sample_ratio
        self.generator = torch.Generator().manual_seed(seed)

    def make_layout(self, shape):
        return make_layout(shape, self.neighbourhood, self.radius)

    def units_for(self, layer, density):
        return units_for_density(layer.layout, density)

    def on_density(self, layer):
        if self.selection == "sampled":
            dens_units = layer.k / layer.layout.num_units
            plan = SamplePlan.make(layer.layout.num_units, min(1.0, dens_units), self.sample_ratio)
            # ceil(U * (k / U)) is k + 1 where the quotient rounds up (U=25, k=7: 8): at most k,
            # and so the threshold's rank in the sample, which with stride 1 is every unit (a
            # (k+1)-th best threshold let k + 1 through, and the lowest rows of them were kept:
            # the best unit could be the one dropped)
            if plan.num_selects > layer.k:
                plan = dataclasses.replace(plan, num_selects=layer.k,
                                           top_k_samples=min(plan.top_k_samples, layer.k))
            layer.plan = plan

    def scores(self, layer, acc):
        counts = layer.layout.valid_counts(acc.device, acc.dtype)
        units = layer.layout.score_view(acc)
        if self.kernels == "compiled":
            return compiled_nsi()(units, self.beta, counts)
        scratch = self.workspace.get("nsi", acc.numel(), acc.device, acc.dtype)
        return nsi_scores(units, self.beta, counts, scratch)

    def unit_scores(self, values, counts):
        return nsi_scores(values, self.beta, counts)

    def native_pass(self, layer, g):
        out = self.workspace.get("scores", layer.layout.num_units, g.device)
        return native.accumulate_scores(self.memory, layer, g, self.beta, out), out

    def encode_group(self, group, grads, ctxs):
        # native kernels: three C calls per bucket group; grouped: a few whole-group tensor
        # operations (grouped.py); either with exact top-k or the sampled threshold
        if self.kernels == "grouped":
            return grouped.encode_group(self, group, grads, ctxs, self.beta, self.selection)
        if self.kernels != "native":
            return None
        return native.encode_group(self, group, grads, ctxs, "nsi", self.beta, self.selection)

    def select(self, layer, acc, pre=None):
        s = self.scores(layer, acc) if pre is None else pre
        nat = self.kernels == "native"
        if self.selection == "sampled":
            return sampled_threshold_indices(s, layer.plan, self.generator, native=nat)
        return topk_indices(s, layer.k, native=nat)
