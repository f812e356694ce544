"""Per-layer density: DGC's warm-up schedule and RS-DGC's layer-wise dynamic ratio (eq. 3-5).

Dynamic ratio (RS-DGC III-B): rank every weight of the compressed tensors together by |w|;
``tau`` is the ceil(rho*M)-th largest; layer l's density is the fraction of its weights with
``|w| >= tau``:  rho_l = (1/N_l) * sum_j 1(|w_j^l| >= tau).  So sum_l rho_l*N_l ~= rho*M.
Guard rail (our choice, documented): a layer entirely below tau would never communicate, so
``rho_l = min(1, max(rho_l, floor * rho))`` (the caller still keeps at least one unit).
Ties at tau (the papers are silent; our choice): the weights strictly above tau count in full
and the ``ceil(rho*M) - #(|w| > tau)`` places left go to the layers in proportion to how many
of their weights equal tau, so the layers keep ``ceil(rho*M)`` in all. Counting every tie
(``|w| >= tau`` literally) gave every layer density 1 when most weights are equal -- all-zero
(zero-initialised) weights sent more than dense fp32 -- and more than rho*M whenever many
weights share tau's value (quantised weights). Without ties it is eq. 5 exactly.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .select import ceil_count

# DGC paper: sparsity 75%, 93.75%, 98.4375%, 99.6% over the first four epochs, then the target.
DGC_WARMUP = (0.25, 0.0625, 0.015625, 0.004)


def warmup_density(epoch: int, target: float, schedule: Sequence[float]) -> float:
    """Density in ``epoch`` (0-based): ``schedule[epoch]`` while it lasts, never below target."""
    if epoch < len(schedule):
        return max(float(schedule[epoch]), target)
    return target


# The ramp's levels: 4 per factor of 4 in density (16 over 0.25 ... 0.25^4.75).
RAMP_LEVELS = 16


def ramp_density(step: int, steps: int, target: float) -> float:
    """DGC's warm-up made continuous over ``steps`` steps, as LGC's reference code warms up
    CLT-k: ``0.25^(1 + 4t/T)`` at step ``t`` of ``T`` -- DGC's per-epoch list 0.25, 0.0625,
    0.015625, 0.004, 0.001 at t = 0, T/4, T/2, 3T/4, T -- held in ``RAMP_LEVELS`` levels
    (a density change re-plans every tensor and, with RS-DGC's dynamic ratio, re-ranks the
    weights: 16 changes, not one per step). Never below ``target``; ``target`` from step T."""
    if step >= steps:
        return target
    level = (RAMP_LEVELS * step) // steps
    return max(0.25 ** (1 + 4 * level / RAMP_LEVELS), target)


def dynamic_densities(weights: Sequence[torch.Tensor], density: float,
                      floor: float = 0.1) -> list[float]:
    """Eq. 4-5 with the starvation floor. ``weights``: the compressed tensors' weights."""
    if not weights:
        return []
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    flat = torch.cat([w.detach().reshape(-1).abs().float() for w in weights])
    M = flat.numel()
    K = max(1, ceil_count(density, M))
    if K >= M:
        tau = flat.min()
    else:
        tau = torch.topk(flat, K, sorted=False).values.min()
    mags = torch.split(flat, [w.numel() for w in weights])            # views of the ranking
    above = torch.stack([(a > tau).sum() for a in mags]).tolist()      # one host sync each
    tied = torch.stack([(a == tau).sum() for a in mags]).tolist()
    rest, T = K - sum(above), sum(tied)          # 1 <= rest <= T: places left for the ties
    out = []
    for w, a, t in zip(weights, above, tied):
        kept = a + (t if rest >= T else rest * t / T)
        out.append(min(1.0, max(kept / w.numel(), floor * density)))
    return out
