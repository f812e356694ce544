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

# block filter: elements per block, and the largest expected survivor fraction it is used for
BLOCK = 64
BLOCK_MAX_FRACTION = 1.0 / 128


def blocked(n: int, expected: float | None, device) -> bool:
    """Whether :class:`AtLeast` reads block extremes for ``n`` entries of which a fraction
    ``expected`` is expected to pass (None: no filter runs)."""
    return (expected is not None and torch.device(device).type == "cpu"
            and expected <= BLOCK_MAX_FRACTION and n // BLOCK >= 256)


def topk_route(n: int, k: int, device) -> str | None:
    """Which pre-filter exact top-k uses (:func:`topk_indices`): ``"blocks"`` (the k-th largest
    block maximum as the threshold; k at most 1/8 of the blocks), ``"sample"`` (a strided
    sample's threshold; k >= 64) or None (one ``torch.topk`` over everything). CPU only."""
    k = min(k, n)
    if k < 1 or torch.device(device).type != "cpu":
        return None
    if n // BLOCK >= 256 and 8 * k <= n // BLOCK:
        return "blocks"
    if k // FILTER_MIN_HITS >= 2 and n >= 1 << 16:
        return "sample"
    return None


def topk_expected(n: int, k: int, device) -> float | None:
    """The passing fraction the exact top-k pre-filter expects (None: no pre-filter)."""
    k = min(k, n)
    route = topk_route(n, k, device)
    if route is None:
        return None
    return k / n if route == "blocks" else 2.0 * k / n


class AtLeast:
    """Indices ``i`` (int64, ascending) with ``|x_i| >= t`` (``magnitude=True``) or
    ``x_i >= t``, exactly what ``((x.abs() if magnitude else x) >= t).nonzero()`` gives, for
    one vector and any number of thresholds ``t``.

    When few entries pass (``expected``: the expected passing fraction, at most
    ``BLOCK_MAX_FRACTION``) on a CPU, it reads ``x`` once for the maximum (and, for
    magnitudes, the minimum) of each block of ``BLOCK`` entries -- read-only reductions, no
    ``|x|`` temporary, no full-length mask -- keeps the blocks whose extremes reach ``t``
    (about ``BLOCK * expected`` of them) and compares only those. The eager route (``|x|``,
    compare, ``nonzero`` over all n) costs ~2.7x more on this 2-core CPU at 0.2% passing
    (``python -m hvd_rsgc.bench compress``). A threshold re-tried (DGC's re-adjust loop)
    reuses the block extremes. Elsewhere (GPU, dense survivors, short vectors): the eager
    route. NaN never passes either way."""

    def __init__(self, x: torch.Tensor, magnitude: bool, expected: float = 1.0,
                 extremes: tuple | None = None, native: bool = False):
        self.x, self.magnitude = x.reshape(-1), magnitude
        n = self.x.numel()
        self.nb = n // BLOCK
        self.blocked = blocked(n, expected, x.device)
        # native (``native.py``): extremes in one pass, compaction in one loop, fp32 only
        self.native = native and self.blocked and x.dtype == torch.float32
        if self.blocked:
            w = self.x[: self.nb * BLOCK].view(self.nb, BLOCK)
            self.w = w
            if extremes is not None:        # computed with the residual update (native.py)
                self.hi, self.lo = extremes[0][: self.nb], (extremes[1][: self.nb] if magnitude else None)
            elif self.native:
                from . import native as nat
                self.hi = torch.empty(self.nb)
                self.lo = torch.empty(self.nb) if magnitude else None
                nat.extremes(self.x, BLOCK, magnitude, self.hi, self.lo)
            else:
                self.hi = w.amax(1)
                self.lo = w.amin(1) if magnitude else None

    def values(self, idx: torch.Tensor) -> torch.Tensor:
        """Importance (|x| or x) of the entries ``idx``."""
        v = self.x.index_select(0, idx)
        return v.abs() if self.magnitude else v

    def sample(self, start: int, stride: int) -> torch.Tensor:
        v = self.x[start::stride]
        return v.abs() if self.magnitude else v

    def importance(self) -> torch.Tensor:
        return self.x.abs() if self.magnitude else self.x

    def __call__(self, t) -> torch.Tensor:
        if not self.blocked:
            return (self.importance() >= t).nonzero().view(-1)
        if self.native:
            from . import native as nat
            return nat.at_least(self.x, self.hi, self.lo, BLOCK, t, self.magnitude)
        keep = ~(self.hi < t)               # a block holding a NaN has NaN extremes: kept
        if self.magnitude:
            keep |= self.lo <= -t
        blocks = keep.nonzero().view(-1)
        cand = self.w.index_select(0, blocks)
        cand = cand.abs() if self.magnitude else cand
        hit = (cand >= t).nonzero()
        idx = blocks.index_select(0, hit[:, 0]).mul_(BLOCK).add_(hit[:, 1])
        tail = self.x[self.nb * BLOCK:]
        if tail.numel():
            tail = tail.abs() if self.magnitude else tail
            idx = torch.cat([idx, (tail >= t).nonzero().view(-1) + self.nb * BLOCK])
        return idx


def topk_indices(importance: torch.Tensor, k: int, magnitude: bool = False,
                 extremes: tuple | None = None, native: bool = False) -> torch.Tensor:
    """Indices of the k largest entries of a 1-D importance vector (exact), sorted ascending
    so that messages are deterministic and cache-friendly. ``magnitude=True``: the importance
    is ``|importance|`` (never materialised on the pre-filtered route).

    Large vectors with k << n take a pre-filter instead of one ``torch.topk`` over all n
    (which costs many passes on a CPU). With k at most 1/8 of the blocks of ``BLOCK``
    entries (``topk_route`` "blocks", e.g. density <= 1/512), the threshold is the k-th
    largest *block maximum* (of ``|x|`` for magnitudes): k blocks hold an entry at or above
    it, so at least k entries pass, and usually not many more; one ``torch.topk`` over n/64
    block maxima instead of over n entries (RS-DGC's unit scores and Top-k on ResNet-50 at
    density 0.001: 5.2 -> 3.3 ms per step for the scores, same indices). Otherwise, for k >=
    64 ("sample"), a strided sample of ``m = 32 n / k`` entries gives a threshold expected to
    pass ~2k entries (the sample's ``2 m k / n + 8``-th largest). The entries at or above the
    threshold are found by :class:`AtLeast` (block extremes, then the few blocks that reach
    it), and ``torch.topk`` runs on those only. If fewer than k pass (a sample unlike the
    vector; NaN block maxima), the full ``torch.topk`` runs. Either way the result is the
    exact top-k set: every entry above the k-th largest passes any threshold that at least k
    entries pass. (Ties at the k-th value may resolve differently from a full ``torch.topk``,
    whose choice among ties is unspecified anyway.) CPU only: on a GPU ``torch.topk`` is a
    radix select already, and the candidate count would cost a host sync per tensor (not
    measured: no GPU was available for this change). ``extremes``: the block extremes of
    ``importance`` when already computed (``native.py``); ``native``: the filter's passes in C."""
    n = importance.numel()
    k = min(k, n)
    route = topk_route(n, k, importance.device)
    if route is not None:
        expected = k / n if route == "blocks" else 2.0 * k / n      # = topk_expected()
        filt = AtLeast(importance, magnitude, expected=expected, extremes=extremes, native=native)
        if route == "blocks":                   # filt.blocked: the block extremes exist
            hi, lo = filt.hi, filt.lo
            assert hi is not None and (lo is not None or not magnitude)
            top = torch.maximum(hi, lo.neg()) if lo is not None and magnitude else hi
            thr = torch.topk(top, k, sorted=False).values.min()
        else:
            sample = filt.sample(0, k // FILTER_MIN_HITS)
            m = sample.numel()
            ks = min(m, math.ceil(2 * m * k / n) + 8)
            thr = torch.topk(sample, ks, sorted=False).values.min()
        cand = filt(thr)
        if cand.numel() >= k:
            if cand.numel() == k:
                return cand
            sel = torch.topk(filt.values(cand), k, sorted=False).indices
            return cand.index_select(0, sel).sort().values
    imp = importance.abs() if magnitude else importance
    idx = torch.topk(imp, k, sorted=False).indices
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
                              generator: torch.Generator | None = None,
                              magnitude: bool = False, extremes: tuple | None = None,
                              native: bool = False, start: int | None = None) -> torch.Tensor:
    """DGC selection: threshold from a strided sample, then re-adjust (at most 10 rounds):
    too many (> 1.3x) -> exact top-k among the selected; too few (< 0.8x) -> threshold *= 0.8.
    Returns at most ``plan.num_selects`` indices (ascending). ``magnitude=True``: the
    importance is ``|importance|``; the entries above a threshold are found by
    :class:`AtLeast` (no full-length ``|x|`` or mask when few pass). ``start``: the sample's
    offset when already drawn from ``generator`` (``native.encode_group``)."""
    n = plan.n
    if plan.num_selects >= n:
        return torch.arange(n, device=importance.device)
    filt = AtLeast(importance, magnitude, expected=plan.density, extremes=extremes, native=native)
    if plan.stride == 1:
        samples = filt.importance()
    else:
        if start is None:
            start = int(torch.randint(0, plan.stride, (1,), generator=generator).item())
        samples = filt.sample(start, plan.stride)
    thr = torch.topk(samples, plan.top_k_samples, sorted=False).values.min()
    idx = filt(thr)
    if n > plan.num_samples:
        for _ in range(10):
            cnt = idx.numel()
            if cnt > plan.num_selects:
                if cnt > 1.3 * plan.num_selects:
                    # the largest, ties to the lower rows (a stable sort, as the grouped route
                    # does: torch.topk's choice among equal values is its own)
                    keep = torch.sort(filt.values(idx), descending=True, stable=True).indices
                    idx = idx[keep[: plan.num_selects].sort().values]
                break
            if cnt < 0.8 * plan.num_selects:
                thr = thr * 0.8
                idx = filt(thr)
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
