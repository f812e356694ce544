"""Top-k ("gradient dropping", Aji & Heafield 2017) with error feedback: exact per-tensor
``torch.topk(|e + g|, k)``, k = ceil(rho*n); values + indices by allgather."""
from __future__ import annotations

from .base import SparseMethod
from .select import topk_indices


class TopK(SparseMethod):
    name = "topk"

    def select(self, layer, acc):
        return topk_indices(acc.view(-1), layer.k, magnitude=True)
