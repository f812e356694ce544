"""RD-PSGD (Meng et al. 2021), pure tensor parts: mixing matrices, random parameter subsets by
geometric gaps, the 8-bit gap encoding, sparse neighbourhood averaging. No MPI here
(``hvd_rsgc/rdpsgd.py`` moves the bytes).

Per step k on node i (Algorithm 2): draw the index set b_k (each of the N parameter entries
with probability p, the "sparsity ratio" = fraction sent); for l in b_k,
x[l] <- sum_j W_ij x_j[l]; other entries keep their local value; then the local SGD step.
p = 1 is D-PSGD (Lian et al. 2017).

Mask: one mask per mixing round, common to all nodes, drawn from a generator seeded by
(seed, round) [our choice, ALGORITHMS.md section 5]: a common mask keeps every coordinate's
mixing matrix symmetric and doubly stochastic (W or I), which the convergence lemma needs.
The paper builds the mask at a node and sends it; ``send_indices=True`` does that too.
"""
from __future__ import annotations

import math

import torch

# ----------------------------------------------------------------------------- topology


def ring(n: int) -> dict[int, dict[int, float]]:
    """Ring mixing weights: W_ii = W_i,i-1 = W_i,i+1 = 1/3 (n >= 3); n = 2: all 1/2.
    Returns {node: {node or neighbour: weight}} (self weight under the node's own id)."""
    if n < 2:
        raise ValueError(f"a ring needs at least 2 nodes, got {n}")
    if n == 2:
        return {0: {0: 0.5, 1: 0.5}, 1: {1: 0.5, 0: 0.5}}
    return {i: {i: 1 / 3, (i - 1) % n: 1 / 3, (i + 1) % n: 1 / 3} for i in range(n)}


def validate_mixing(weights: dict[int, dict[int, float]], n: int, tol: float = 1e-9) -> None:
    """W must be n x n, non-negative, symmetric and doubly stochastic."""
    if n < 2:
        raise ValueError(f"decentralized training needs at least 2 nodes, got {n}")
    if sorted(weights) != list(range(n)):
        raise ValueError(f"mixing weights must list nodes 0..{n - 1}, got {sorted(weights)}")
    W = mixing_matrix(weights, n)
    if (W < -tol).any():
        raise ValueError("mixing matrix has negative weights")
    if not torch.allclose(W, W.T, atol=tol):
        raise ValueError("mixing matrix is not symmetric (W_ij != W_ji for some link)")
    # each node exchanges with the j of its row with W_ij > 0: a link must exist both ways, or
    # one end waits for a message the other never sends (W_02 = 1e-12 with no W_20 passed
    # the tolerance above and stalled the first round until the timeout)
    one_way = ((W > 0) != (W.T > 0)).nonzero().tolist()
    if one_way:
        i, j = one_way[0]
        raise ValueError(f"mixing matrix links node {i} and node {j} one way only (W_{i}{j} = "
                         f"{W[i, j].item():.3g}, W_{j}{i} = {W[j, i].item():.3g}): every link needs "
                         "a positive weight at both ends")
    if not (torch.allclose(W.sum(0), torch.ones(n, dtype=W.dtype), atol=1e-6)
            and torch.allclose(W.sum(1), torch.ones(n, dtype=W.dtype), atol=1e-6)):
        raise ValueError(f"mixing matrix is not doubly stochastic (row sums {W.sum(1).tolist()})")


def mixing_matrix(weights, n) -> torch.Tensor:
    W = torch.zeros(n, n, dtype=torch.float64)
    for i, row in weights.items():
        for j, w in row.items():
            if not 0 <= j < n:
                raise ValueError(f"node {i} lists neighbour {j} outside 0..{n - 1}")
            W[i, j] = w
    return W


def spectral_rho(W: torch.Tensor) -> float:
    """rho_W = max(|lambda_2|, |lambda_n|)^2 (Lian et al.): the consensus contraction rate."""
    ev = torch.linalg.eigvalsh(W).abs().sort(descending=True).values
    return float(ev[1] ** 2)


# ----------------------------------------------------------------------------- masks


def check_ratio(p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"sparsity_ratio p must be in (0, 1], got {p!r}")


def geometric_indices(N: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """Sorted positions of a Bernoulli(p) mask over N entries, drawn as geometric gaps
    d ~ Geometric(p) on {1, 2, ...}: about p*N random numbers instead of N. Vectorised: one
    batch of draws sized for the expected count plus 6 sigma, topped up in the rare case it
    falls short."""
    check_ratio(p)
    if p >= 1.0:
        return torch.arange(N)
    log1mp = math.log1p(-p)
    out, last = [], -1
    while last < N - 1:
        remaining = N - 1 - last
        cnt = int(p * remaining + 6 * math.sqrt(remaining * p * (1 - p)) + 16)
        u = torch.rand(cnt, generator=gen, dtype=torch.float64)
        gaps = 1 + torch.floor(torch.log1p(-u) / log1mp).long()
        pos = last + torch.cumsum(gaps, 0)
        out.append(pos)
        last = int(pos[-1])
    idx = torch.cat(out)
    return idx[idx < N]


def bernoulli_indices(N: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """The direct way (N draws + thresholding): the baseline of the paper's optimisation."""
    check_ratio(p)
    return (torch.rand(N, generator=gen) < p).nonzero().view(-1)


# ----------------------------------------------------------------------------- 8-bit gaps


def encode_gaps(idx: torch.Tensor) -> torch.Tensor:
    """Sorted indices -> uint8 stream: gap d (d_1 = i_1 + 1, d_j = i_j - i_{j-1}) as one byte
    for 1 <= d <= 255; larger gaps as byte 0 followed by the uint32 gap, little-endian.
    Vectorised: the escapes are spliced in with one scatter."""
    idx = idx.long()
    gaps = torch.diff(idx, prepend=torch.tensor([-1]))
    if gaps.numel() and int(gaps.min()) < 1:
        raise ValueError("indices must be strictly increasing and >= 0")
    big = gaps > 255
    width = torch.where(big, 5, 1)
    starts = torch.cumsum(width, 0) - width
    out = torch.zeros(int(width.sum()), dtype=torch.uint8)
    small = ~big
    out[starts[small]] = gaps[small].to(torch.uint8)
    if big.any():
        b = gaps[big]
        s = starts[big]
        for k in range(4):
            out[s + 1 + k] = ((b >> (8 * k)) & 0xFF).to(torch.uint8)
    return out


def decode_gaps(data: torch.Tensor, N: int) -> torch.Tensor:
    """Inverse of :func:`encode_gaps`; rejects truncated escapes and positions past N."""
    data = data.to(torch.uint8)
    n = data.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    zero = (data == 0)
    if not zero.any():
        gaps = data.long()
    else:
        # walk the escape structure: a 0 byte owns the next 4 bytes. Escapes are rare
        # (probability (1-p)^255 per gap), so a loop over escapes only is cheap.
        is_payload = torch.zeros(n, dtype=torch.bool)
        esc_pos = []
        i = 0
        zpos = zero.nonzero().view(-1).tolist()
        for z in zpos:
            if z < i:
                continue                  # a zero byte inside a previous escape's payload
            if z + 4 >= n:
                raise ValueError("truncated gap escape in index stream")
            esc_pos.append(z)
            is_payload[z + 1:z + 5] = True
            i = z + 5
        keep = ~is_payload
        gaps = data.long().clone()
        if esc_pos:
            e = torch.tensor(esc_pos)
            val = sum(data[e + 1 + k].long() << (8 * k) for k in range(4))
            gaps[e] = val
        gaps = gaps[keep]
    if (gaps < 1).any():
        raise ValueError("zero gap in index stream")
    idx = torch.cumsum(gaps, 0) - 1
    if idx.numel() and int(idx[-1]) >= N:
        raise ValueError(f"index stream runs past the parameter count ({int(idx[-1])} >= {N})")
    return idx


def message_bytes(m: int, escapes: int, send_indices: bool) -> int:
    """Per neighbour per round: 4m value bytes (+ m + 4e gap bytes + a 4-byte count)."""
    return 4 * m + ((m + 4 * escapes + 4) if send_indices else 0)


# ----------------------------------------------------------------------------- mixing


def sparse_mix(x: torch.Tensor, idx: torch.Tensor, self_weight: float,
               received: list[tuple[float, torch.Tensor]]) -> None:
    """In place on the flat parameter vector x: x[idx] = w_ii x[idx] + sum_j w_ij x_j[idx]."""
    acc = x.index_select(0, idx).mul_(self_weight)
    for w, vals in received:
        acc.add_(vals * w)        # multiply, then add (no fused alpha): equals dense D-PSGD bitwise
    x.index_copy_(0, idx, acc)
