"""Neighbourhood Statistical Indicator (NSI), the scoring rule of RS-DGC (paper eq. 6-11).

For every unit B (a Chebyshev neighbourhood, see ``layout.py``) of the accumulated velocity v:

    mu(B)    = mean_{q in B} |v_q|                                   (eq. 9)
    sigma(B) = sqrt(mean_{q in B} (v_q - mean(v_B))^2)  population std of signed v   (eq. 10)
    NSI(B)   = beta * mu(B) + (1 - beta) * sigma(B)                  (eq. 8)

``beta = 1`` is the "Neighbor only" ablation row; ``beta < 1`` adds the statistic. The paper
gives beta in [0, 1] "adjusted for different models" and no default: we use 0.5.
Means and stds count only real cells (padded tile cells are excluded).

Vectorised: three row reductions over the (U, S) unit matrix, no loop over units.
"""
from __future__ import annotations


import torch

from .layout import Layout
from .select import ceil_count


def nsi_scores(units: torch.Tensor, beta: float, counts: torch.Tensor | None = None,
               scratch: torch.Tensor | None = None) -> torch.Tensor:
    """NSI score per row of ``units`` (U, S). ``counts``: real cells per row (None = S).
    ``scratch``: optional buffer of ``units.numel()`` elements for the |v| and v^2 temporaries
    (row sums of a materialised temporary are ~10x faster on CPU than ``vector_norm(dim=1)``
    over 9-element rows; reusing the buffer avoids page-faulting fresh memory every step)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    S = units.shape[1]
    tmp = scratch.view(units.shape) if scratch is not None else torch.empty_like(units)
    abs_sum = torch.abs(units, out=tmp).sum(1)
    if beta == 1.0:
        return abs_sum / (counts if counts is not None else S)
    sq_sum = torch.mul(units, units, out=tmp).sum(1)
    total = units.sum(1)
    if counts is None:
        inv = 1.0 / S
        mu = abs_sum.mul_(inv)
        mean = total.mul_(inv)
        var = sq_sum.mul_(inv)
    else:
        mu = abs_sum.div_(counts)
        mean = total.div_(counts)
        var = sq_sum.div_(counts)
    var.sub_(mean.square_()).clamp_min_(0.0)
    sigma = var.sqrt_()
    if beta == 0.0:
        return sigma
    return mu.mul_(beta).add_(sigma, alpha=1.0 - beta)


def units_for_density(layout: Layout, density: float) -> int:
    """Eq. 11: K = ceil(rho_l * N_l) gradients to keep, sent as k = ceil(K / |B|) whole units,
    at least one and at most all units. |B| is the mean number of *real* cells per unit
    (N_l / U), so that zero-padded edge tiles still give k = U at density 1."""
    K = ceil_count(density, layout.numel)
    k = -(-K * layout.num_units // layout.numel)
    return max(1, min(layout.num_units, k))

