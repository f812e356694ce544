"""Selection rules shared by the sparsifiers: exact top-k, DGC's sampled threshold with its
re-adjust loop, and seeded random-k. Pure tensor code, no Horovod, no Python loop over
elements (the re-adjust loop runs at most 10 times per tensor)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def ceil_count(density: float, n: int) -> int:
    """ceil(density * n), robust to float noise (0.1 * 30 must be 3, not 4)."""
    return int(math.ceil(round(density * n, 9)))


# exact top-k through a sampled pre-filter when the sample holds at least this many of the k
FILTER_MIN_HITS = 32


def topk_indices(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of a 1-D importance vector (exact), sorted ascending
    so that messages are deterministic and cache-friendly.

    Large vectors with k << n take a pre-filter instead of one ``torch.topk`` over all n
    (which costs many passes on a CPU): a strided sample of ``m = 32 n / k`` entries gives a
    threshold expected to pass ~2k entries (the sample's ``2 m k / n + 8``-th largest); one
    compare pass and one compaction keep the entries at or above it, and ``torch.topk`` runs
    on those only. If fewer than k pass (a sample unlike the vector), the full ``torch.topk``
    runs. Either way the result is the exact top-k set: every entry above the k-th largest
    passes any threshold that at least k entries pass. (Ties at the k-th value may resolve
    differently from a full ``torch.topk``, whose choice among ties is unspecified anyway.)
    CPU only: on a GPU ``torch.topk`` is a radix select already, and the candidate count would
    cost a host sync per tensor (not measured: no GPU was available for this change)."""
    n = importance.numel()
    k = min(k, n)
    stride = k // FILTER_MIN_HITS
    if stride >= 2 and n >= 1 << 16 and importance.device.type == "cpu":
        sample = importance[::stride]
        m = sample.numel()
        ks = min(m, math.ceil(2 * m * k / n) + 8)
        thr = torch.topk(sample, ks, sorted=False).values.min()
        cand = (importance >= thr).nonzero().view(-1)
        if cand.numel() >= k:
            if cand.numel() == k:
                return cand
            sel = torch.topk(importance.index_select(0, cand), k, sorted=False).indices
            return cand.index_select(0, sel).sort().values
    idx = torch.topk(importance, k, sorted=False).indices
    return idx.sort().values


@dataclass(frozen=True)
class SamplePlan:
    """DGC's per-tensor sampling plan (deep-gradient-compression dgc/compression.py), computed
    once per density: stride through the importance vector, take the top of the samples as a
    threshold estimate."""

    n: int
    density: float
    stride: int
    num_samples: int
    top_k_samples: int
    num_selects: int

    @classmethod
    def make(cls, n: int, density: float, sample_ratio: float = 0.01) -> "SamplePlan":
        sample_ratio = min(max(sample_ratio, 0.01), 1.0)
        pct = math.ceil(n * sample_ratio)
        cpr = math.ceil(2 / density)
        if n <= cpr:
            stride, num_samples = 1, n
        else:
            target = max(pct, cpr)
            stride = math.ceil(n / target / 32) * 32 + 1
            num_samples = n // stride
            while num_samples < target:
                stride -= 8
                num_samples = n // stride
        top_k_samples = math.ceil(num_samples * density)
        num_selects = math.ceil(n * density)
        return cls(n, density, stride, num_samples, top_k_samples, num_selects)


def sampled_threshold_indices(importance: torch.Tensor, plan: SamplePlan,
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """DGC selection: threshold from a strided sample, then re-adjust (at most 10 rounds):
    too many (> 1.3x) -> exact top-k among the selected; too few (< 0.8x) -> threshold *= 0.8.
    Returns at most ``plan.num_selects`` indices (ascending)."""
    n = plan.n
    if plan.num_selects >= n:
        return torch.arange(n, device=importance.device)
    if plan.stride == 1:
        samples = importance
    else:
        start = int(torch.randint(0, plan.stride, (1,), generator=generator).item())
        samples = importance[start::plan.stride]
    thr = torch.topk(samples, plan.top_k_samples, sorted=False).values.min()
    mask = importance >= thr
    idx = mask.nonzero().view(-1)
    if n > plan.num_samples:
        for _ in range(10):
            cnt = idx.numel()
            if cnt > plan.num_selects:
                if cnt > 1.3 * plan.num_selects:
                    keep = torch.topk(importance[idx], plan.num_selects, sorted=False).indices
                    idx = idx[keep.sort().values]
                break
            if cnt < 0.8 * plan.num_selects:
                thr = thr * 0.8
                idx = (importance >= thr).nonzero().view(-1)
                continue
            break
    return idx[: plan.num_selects]


def random_indices(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct indices in [0, n), uniformly, ascending. Every rank holding a generator in the
    same state draws the same set (so values can be allreduced without sending indices).
    O(k log k) expected work, not O(n): draw a few more than k with replacement, deduplicate,
    top up in the rare case of too many collisions, then keep a random k of them."""
    if k >= n:
        return torch.arange(n)
    picked = torch.empty(0, dtype=torch.long)
    while picked.numel() < k:
        want = k - picked.numel()
        extra = torch.randint(0, n, (want + want // 8 + 8,), generator=generator)
        picked = torch.unique(torch.cat([picked, extra]))
    if picked.numel() > k:
        keep = torch.randperm(picked.numel(), generator=generator)[:k]
        picked = picked[keep.sort().values]
    return picked


def splitmix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (identical on every process; no hash())."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def seeded_uniform(n: int, device, *seed_parts: int) -> torch.Tensor:
    """``n`` uniform draws in [0, 1) (fp32) from a fresh generator seeded by
    ``splitmix_seed(*seed_parts)`` on ``device``: stochastic quantisers seed with (seed, rank,
    tensor index, step), so ranks draw independently, a run is reproducible whatever order the
    tensors are compressed in, and a resumed run draws what the uninterrupted one drew (the step
    counter is part of the compressor state; there is no generator state to save)."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(splitmix_seed(*seed_parts))
    return torch.rand(n, generator=gen, device=dev)
