"""Top-k ("gradient dropping", Aji & Heafield 2017) with error feedback: exact per-tensor
``torch.topk(|e + g|, k)``, k = ceil(rho*n); values + indices by allgather."""
from __future__ import annotations

from . import grouped, native
from .base import SparseMethod
from .select import topk_expected, topk_indices


class TopK(SparseMethod):
    name = "topk"
    KERNELS = ("auto", "eager", "native", "grouped")

    def filter_expected(self, layer):
        return topk_expected(layer.numel, layer.k, "cpu")

    def select(self, layer, acc, pre=None):
        return topk_indices(acc.view(-1), layer.k, magnitude=True, extremes=pre,
                            native=self.kernels == "native")

    def encode_group(self, group, grads, ctxs):
        # native kernels: a bucket group in three C calls (native.encode_group); grouped: a few
        # whole-group tensor operations (grouped.py)
        if self.kernels == "grouped":
            return grouped.encode_group(self, group, grads, ctxs, None)
        if self.kernels != "native":
            return None
        return native.encode_group(self, group, grads, ctxs, "magnitude")
