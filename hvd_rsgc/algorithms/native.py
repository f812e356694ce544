"""Native CPU kernels (``kernels="native"``): the residual update and what selection reads,
fused into ONE pass over memory, written in C and loaded with ``ctypes``.

The eager route makes one PyTorch kernel per operation: ``u = m*u + g`` and ``v += u`` (two
passes), then the NSI (``|v|``, ``v*v`` and three unit sums: six more), or the block extremes
that the threshold filter reads (``select.AtLeast``: two more). Each pass streams the whole
tensor through memory. Here one loop per tensor reads ``g``, ``u``, ``v`` once and writes
``u``, ``v`` and the small per-unit output (NSI scores, or the max / min of each block of
``select.BLOCK`` entries) while the values are still in registers -- five streams, the floor
of a momentum-corrected residual (``python -m hvd_rsgc.bench compress``).

Loops for every memory a sparse method uses (none, error feedback ``e += g``, momentum
correction ``u = m*u + g; v += u``, its Nesterov form ``u = m*(u + g); v += u + g``):

* ``hr_units``: contiguous units of S cells (element and kernel layouts) -> NSI per unit;
* ``hr_tiles``: the padded ``(Hp, Wp)`` storage of tile layouts (``layout.TileLayout``): the
  gradient ``(H, W)`` is added row by row while the column sums of the tile-row are taken,
  then each tile sums its columns; padded cells are never written and do not count;
* ``hr_blocks``: one flat vector -> max and min of every block (NaN propagates, as ``amax``);
* ``hr_atleast``: the threshold filter's compaction -- the indices at or above a threshold,
  reading only the blocks whose extremes reach it (``select.AtLeast``);
* ``hr_scatter``: a bucket's decode (``bucket.BucketCodec``) -- every received unit added to
  its cells in message order, the cells' positions computed per unit instead of as index
  tensors (bit-identical to the index-tensor route, ``base.add_in_order``);
* ``hr_group_scores`` / ``hr_group_blocks``, ``hr_group_topk`` / ``hr_group_sampled``,
  ``hr_group_take`` (+ ``hr_group_keep`` for fp16 / int8 values): the encode of a whole
  bucket group (``encode_group``; RS-DGC, Top-k, DGC): every layer's update and scores (NSI,
  or block extremes), every layer's selection (exact top-k by radix select over the
  candidates that the k-th largest block maximum leaves; DGC's sampled threshold and its
  re-adjust rounds, over |v| for DGC and over the NSI scores for RS-DGC's
  ``selection="sampled"``), the chosen units copied into the message and out of the residual --
  three or four calls per group instead of a dozen PyTorch calls per layer. The candidate
  blocks lie scattered and are read with a software prefetch (``gather_at_least``).

Arithmetic: IEEE single precision, no FMA contraction (``-ffp-contract=off``), vectorised
across units and never within one unit's sum, so the clone chosen at load for each x86-64
level computes the same bits. The results equal the eager route to float rounding, not bit
for bit (PyTorch's vector ``add`` uses an FMA for ``g + m*u``): a rank's kernels change only
which units it sends, by rounding; decoding the gathered messages does not depend on them,
so parameters stay bit-identical across ranks whichever kernels each rank uses (tested).

The library is built once per machine into ``$HVD_RSGC_CACHE`` (default
``~/.cache/hvd_rsgc``) with ``$CC`` (default ``cc``; a few seconds; ranks starting together
wait on a file lock) and reused; without a compiler ``"native"`` raises and ``"auto"`` falls
back to eager with one warning.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = r"""
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <xmmintrin.h>                /* _mm_stream_ps (hr_zero) */
#endif

enum { MEM_NONE = 0, MEM_EF = 1, MEM_MOMENTUM = 2, MEM_NESTEROV = 3 };
#define LANES 16

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
/* arch=x86-64-v3/v4 in target_clones: GCC 12 and later (GCC 11, Ubuntu 22.04's, refuses it) */
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* finite: neither inf nor NaN */
#define FIN(x) (fabsf(x) <= FLT_MAX)

/* the gradient is checked for inf / NaN in stretches of about CHECK entries, each just before
   its update reads it again from L1 (longer stretches cost more: the check then streams g
   alone, without u and v beside it). Measured with `bench update`: hr_units / hr_blocks as
   fast as without a check, hr_tiles (SEL_ below) +0.03-0.09x its abs pass. */
#define CHECK 256

/* 1 when an entry of x[a, b) is not finite */
static inline int any_nonfinite(const float *restrict x, int64_t a, int64_t b) {
  int nf = 0;
  for (int64_t j = a; j < b; ++j) nf |= !FIN(x[j]);
  return nf;
}

/* the formulas, written once: the momentum u' of gradient gj and momentum uj, and the
   accumulated value from the residual vj (memory.py's torch reference, the same order) */
#define MOM_U(gj, uj)      ((gj) + m * (uj))
#define MOM_Y(gj, uu, vj)  ((vj) + (uu))
#define NES_U(gj, uj)      (((uj) + (gj)) * m)
#define NES_Y(gj, uu, vj)  (((vj) + (uu)) + (gj))

/* the residual update of entries [a, b): straight loops the compiler vectorises */
static inline void update_plain(int mem, float m, const float *restrict g, float *restrict u,
                                float *restrict v, int64_t a, int64_t b) {
  switch (mem) {
  case MEM_EF:
    for (int64_t j = a; j < b; ++j) v[j] = v[j] + g[j];
    break;
  case MEM_MOMENTUM:
    for (int64_t j = a; j < b; ++j) { float uu = MOM_U(g[j], u[j]); u[j] = uu; v[j] = MOM_Y(g[j], uu, v[j]); }
    break;
  case MEM_NESTEROV:
    for (int64_t j = a; j < b; ++j) { float uu = NES_U(g[j], u[j]); u[j] = uu; v[j] = NES_Y(g[j], uu, v[j]); }
    break;
  default:
    break;
  }
}

/* the update of one entry j, leaving the accumulated value in y (STEP_: the stretch's gradient
   is finite; SAFE_: it holds an entry that is not, which is skipped: u, v as they were; SEL_:
   not checked before, each entry selects its result and a non-finite one sets nf -- in the
   tiles' loop, which does more per entry, one select costs less than a check ahead) */
#define STEP_EF(g, u, v)   { y = v[j] + g[j]; v[j] = y; }
#define STEP_MOM(g, u, v)  { float uu = MOM_U(g[j], u[j]); u[j] = uu; y = MOM_Y(g[j], uu, v[j]); v[j] = y; }
#define STEP_NES(g, u, v)  { float uu = NES_U(g[j], u[j]); u[j] = uu; y = NES_Y(g[j], uu, v[j]); v[j] = y; }
#define SAFE(STEP)         { y = v[j]; if (FIN(g[j])) STEP(g, u, v) }
#define SAFE_EF(g, u, v)   SAFE(STEP_EF)
#define SAFE_MOM(g, u, v)  SAFE(STEP_MOM)
#define SAFE_NES(g, u, v)  SAFE(STEP_NES)

/* update_plain where the gradient holds an entry that is not finite: that entry is skipped
   (its u, v stay as they were: no inf / NaN reaches the residual) */
static inline void update_safe(int mem, float m, const float *restrict g, float *restrict u,
                               float *restrict v, int64_t a, int64_t b) {
  for (int64_t j = a; j < b; ++j) {
    float y;
    switch (mem) {
    case MEM_EF: SAFE_EF(g, u, v) break;
    case MEM_MOMENTUM: SAFE_MOM(g, u, v) break;
    case MEM_NESTEROV: SAFE_NES(g, u, v) break;
    default: break;
    }
    (void)y;
  }
}

/* a stretch [a, b) of the gradient checked (MEM_NONE: nothing to protect, not checked), then
   updated, read again from cache. Returns 1 when it held an entry that is not finite. */
static inline int update(int mem, float m, const float *restrict g, float *restrict u,
                         float *restrict v, int64_t a, int64_t b) {
  const int rb = mem != MEM_NONE && any_nonfinite(g, a, b);
  if (rb) update_safe(mem, m, g, u, v, a, b);
  else update_plain(mem, m, g, u, v, a, b);
  return rb;
}

static inline float nsi(float sa, float s1, float s2, float n, float beta) {
  float mu = sa / n, mean = s1 / n, var = s2 / n - mean * mean;
  if (var < 0.f) var = 0.f;                               /* clamp_min(0); NaN stays NaN */
  return beta * mu + (1.f - beta) * sqrtf(var);
}

/* NSI of units [i0, i0 + cnt) of S contiguous cells of x; lanes run over units, so every
   unit's sums are taken in cell order (the same bits whatever the vector width) */
static inline void nsi_rows(const float *restrict x, int64_t i0, int64_t cnt, int64_t S,
                            float beta, float *restrict score) {
  float sa[LANES], s1[LANES], s2[LANES];
  for (int64_t k = 0; k < LANES; ++k) { sa[k] = 0.f; s1[k] = 0.f; s2[k] = 0.f; }
  for (int64_t j = 0; j < S; ++j)
    for (int64_t k = 0; k < cnt; ++k) {
      float y = x[(i0 + k) * S + j];
      sa[k] += fabsf(y); s1[k] += y; s2[k] += y * y;
    }
  for (int64_t k = 0; k < cnt; ++k) score[i0 + k] = nsi(sa[k], s1[k], s2[k], (float)S, beta);
}

/* U units of S contiguous cells: update, then the NSI of every unit. Returns 1 when a
   gradient entry was not finite (skipped by the update) */
CLONES int hr_units(const float *g, float *u, float *v, int64_t U, int64_t S, int mem,
                    float m, float *score, float beta, int nt) {
  const float *x = mem == MEM_NONE ? g : v;
  const int64_t nchunks = (U + LANES - 1) / LANES;
  const int64_t per = CHECK / (LANES * S) > 1 ? CHECK / (LANES * S) : 1;   /* chunks per check */
  const int64_t ntask = (nchunks + per - 1) / per;
  int nf = 0;
  #pragma omp parallel for num_threads(nt) schedule(static) reduction(| : nf)
  for (int64_t t = 0; t < ntask; ++t) {
    const int64_t c1 = (t + 1) * per < nchunks ? (t + 1) * per : nchunks;
    const int64_t u1 = c1 * LANES < U ? c1 * LANES : U;
    const int rb = mem != MEM_NONE && any_nonfinite(g, t * per * LANES * S, u1 * S);
    nf |= rb;
    for (int64_t c = t * per; c < c1; ++c) {
      int64_t i0 = c * LANES, cnt = U - i0 < LANES ? U - i0 : LANES;
      if (rb) update_safe(mem, m, g, u, v, i0 * S, (i0 + cnt) * S);
      else update_plain(mem, m, g, u, v, i0 * S, (i0 + cnt) * S);
      nsi_rows(x, i0, cnt, S, beta, score);
    }
  }
  return nf;
}

#define SEL_EF(g, u, v)    { const float gj = g[j], vj = v[j]; const int ok = FIN(gj);             \
                             y = ok ? vj + gj : vj; v[j] = y; nf |= !ok; }
#define SEL(U, Y)          { const float gj = g[j], uj = u[j], vj = v[j]; const int ok = FIN(gj);  \
                             const float uu = U(gj, uj);                                           \
                             u[j] = ok ? uu : uj; y = ok ? Y(gj, uu, vj) : vj; v[j] = y; nf |= !ok; }
#define SEL_MOM(g, u, v)   SEL(MOM_U, MOM_Y)
#define SEL_NES(g, u, v)   SEL(NES_U, NES_Y)
#define STEP_NONE(g, u, v) { y = g[j]; }
/* one row of W entries: update, and add |y|, y, y*y into the column sums */
#define ROW(STEP)                                                                           \
  for (int64_t c = 0; c < W; ++c) {                                                         \
    const int64_t j = c; float y;                                                           \
    STEP(g, u, v)                                                                           \
    ca[c] += fabsf(y); c1[c] += y; c2[c] += y * y;                                          \
  }

/* the NSI of nb full tiles of 3 columns from their column sums (3x3 tiles, the default
   radius): a separate loop over tiles, so the compiler vectorises it across tiles -- the
   per-tile division and square root dominated the scalar loop it replaces (tiles 1.5x
   faster, same bits) */
static inline void tiles_nsi3(const float *restrict ca, const float *restrict c1,
                              const float *restrict c2, int64_t nb, float n, float beta,
                              float *restrict score) {
  for (int64_t b = 0; b < nb; ++b) {
    float sa = ca[3 * b], s1 = c1[3 * b], s2 = c2[3 * b];
    sa += ca[3 * b + 1]; s1 += c1[3 * b + 1]; s2 += c2[3 * b + 1];
    sa += ca[3 * b + 2]; s1 += c1[3 * b + 2]; s2 += c2[3 * b + 2];
    score[b] = nsi(sa, s1, s2, n, beta);
  }
}

/* g (H, W) into u, v (Hp, Wp): the rows a*s .. a*s+s-1 are updated while their column sums
   (over the tile-row) are taken, then each tile sums its s columns: the NSI of the tiles in
   row-major order. Padded cells are not written and do not count. Per tile, cells are summed
   rows first, then columns: one fixed order. Returns 1 when out of memory (nothing scored),
   else 2 when a gradient entry was not finite (skipped by the update), else 0. */
CLONES int hr_tiles(const float *restrict gm, float *um, float *vm, int64_t H, int64_t W,
                     int64_t Hp, int64_t Wp, int64_t s, int mem, float m,
                     float *restrict score, float beta, int nt) {
  const int64_t A = Hp / s, B = Wp / s;
  int failed = 0, nf = 0;
  #pragma omp parallel num_threads(nt) reduction(| : nf)
  {
    float *const buf = (float *)malloc(3 * (size_t)W * sizeof(float));
    float *restrict ca = buf, *restrict c1 = buf + W, *restrict c2 = buf + 2 * W;
    if (!buf) failed = 1;
    #pragma omp for schedule(static)
    for (int64_t a = 0; a < A; ++a) {
      if (!buf) continue;
      const int64_t r0 = a * s, rn = H - r0 < s ? H - r0 : s;
      for (int64_t c = 0; c < 3 * W; ++c) buf[c] = 0.f;
      for (int64_t r = r0; r < r0 + rn; ++r) {
        const float *restrict g = gm + r * W;
        float *u = um + r * Wp, *v = vm + r * Wp;
        switch (mem) {
        case MEM_EF: ROW(SEL_EF) break;
        case MEM_MOMENTUM: ROW(SEL_MOM) break;
        case MEM_NESTEROV: ROW(SEL_NES) break;
        default: ROW(STEP_NONE) break;
        }
      }
      int64_t b0 = 0;
      if (s == 3) {                  /* full tiles vectorised, the last partial one below */
        b0 = W / 3;
        tiles_nsi3(ca, c1, c2, b0, (float)(rn * 3), beta, score + a * B);
      }
      for (int64_t b = b0; b < B; ++b) {
        const int64_t c0 = b * s, cn = W - c0 < s ? W - c0 : s;
        float sa = ca[c0], s1 = c1[c0], s2 = c2[c0];
        for (int64_t q = 1; q < cn; ++q) { sa += ca[c0 + q]; s1 += c1[c0 + q]; s2 += c2[c0 + q]; }
        score[a * B + b] = nsi(sa, s1, s2, (float)(rn * cn), beta);
      }
    }
    free(buf);
  }
  return failed ? 1 : (nf ? 2 : 0);
}

/* blocks [b0, b1) of `block` entries: update and extremes in one loop, lanes over entries;
   a block whose gradient holds an entry that is not finite (checked first, then read from
   L1) takes SAFE, which skips that entry */
#define BLOCK_LOOP(STEP)                                                                    \
    for (int64_t j0 = b * block; j0 < (b + 1) * block; j0 += LANES)                         \
      for (int64_t k = 0; k < LANES; ++k) {                                                 \
        const int64_t j = j0 + k; float y;                                                  \
        STEP(g, u, v)                                                                       \
        h[k] = y > h[k] ? y : h[k]; l[k] = y < l[k] ? y : l[k]; bad[k] |= y != y;           \
      }
#define BLOCKS(STEP, SAFE)                                                                  \
  for (int64_t b = b0; b < b1; ++b) {                                                       \
    float h[LANES], l[LANES]; int bad[LANES];                                               \
    for (int64_t k = 0; k < LANES; ++k) { h[k] = -INFINITY; l[k] = INFINITY; bad[k] = 0; }  \
    const int rb = mem != MEM_NONE && any_nonfinite(g, b * block, (b + 1) * block);         \
    nf |= rb;                                                                               \
    if (!rb) { BLOCK_LOOP(STEP) } else { BLOCK_LOOP(SAFE) }                                 \
    float hh = h[0], ll = l[0]; int nan = bad[0];                                           \
    for (int64_t k = 1; k < LANES; ++k) {                                                   \
      hh = h[k] > hh ? h[k] : hh; ll = l[k] < ll ? l[k] : ll; nan |= bad[k];                \
    }                                                                                       \
    hi[b] = nan ? NAN : hh;                                                                 \
    if (lo) lo[b] = nan ? NAN : ll;                                                         \
  }

/* n entries: update, and the max / min of each of the n / block full blocks of the
   accumulated vector (block: a multiple of LANES; a block holding a NaN gets NaN, as
   amax / amin; hi = NULL: the update only). Returns 1 when a gradient entry was not finite
   (skipped by the update). */
CLONES int hr_blocks(const float *restrict g, float *u, float *v, int64_t n, int mem,
                     float m, float *restrict hi, float *restrict lo, int64_t block, int nt) {
  const int64_t nb = hi ? n / block : 0;
  const int64_t per = 64;                      /* blocks per task */
  const int64_t ntask = (nb + per - 1) / per;
  int nf = 0;
  #pragma omp parallel for num_threads(nt) schedule(static) reduction(| : nf)
  for (int64_t t = 0; t < ntask; ++t) {
    const int64_t b0 = t * per, b1 = (t + 1) * per < nb ? (t + 1) * per : nb;
    switch (mem) {
    case MEM_EF: BLOCKS(STEP_EF, SAFE_EF) break;
    case MEM_MOMENTUM: BLOCKS(STEP_MOM, SAFE_MOM) break;
    case MEM_NESTEROV: BLOCKS(STEP_NES, SAFE_NES) break;
    default: BLOCKS(STEP_NONE, STEP_NONE) break;
    }
  }
  /* entries past the full blocks: update only, in parallel chunks */
  const int64_t start = nb * block, rest = n - start, chunk = 1 << 14;
  const int64_t nc = (rest + chunk - 1) / chunk;
  #pragma omp parallel for num_threads(nt) schedule(static) reduction(| : nf)
  for (int64_t c = 0; c < nc; ++c) {
    int64_t a = start + c * chunk, e = a + chunk < n ? a + chunk : n;
    nf |= update(mem, m, g, u, v, a, e);
  }
  return nf;
}

/* indices (ascending) of the entries of x (n) with x >= t, or |x| >= t with `magnitude`,
   reading only the blocks whose extremes (hi, lo: max / min of each of the n / block full
   blocks) can reach t, and every entry past the last full block. NaN never passes; a block
   with a NaN extreme is read. out needs room for every entry read: if cap is smaller,
   nothing is written and -(the room needed) is returned; else the number that pass. */
int64_t hr_atleast(const float *restrict x, int64_t n, const float *restrict hi,
                   const float *restrict lo, int64_t block, float t, int magnitude,
                   int64_t *restrict out, int64_t cap) {
  const int64_t nb = n / block;
  int64_t kept = 0;
  for (int64_t b = 0; b < nb; ++b)
    kept += !(hi[b] < t) || (magnitude && lo[b] <= -t);
  const int64_t need = kept * block + (n - nb * block);
  if (need > cap) return -need;
  int64_t cnt = 0;                   /* branch-free: write every index read, keep the passing */
  for (int64_t b = 0; b < nb; ++b) {
    if (hi[b] < t && !(magnitude && lo[b] <= -t)) continue;
    for (int64_t j = b * block; j < (b + 1) * block; ++j) {
      float y = magnitude ? fabsf(x[j]) : x[j];
      out[cnt] = j; cnt += y >= t;
    }
  }
  for (int64_t j = nb * block; j < n; ++j) {
    float y = magnitude ? fabsf(x[j]) : x[j];
    out[cnt] = j; cnt += y >= t;
  }
  return cnt;
}

/* every cell c of every received unit k, in message order (row rows[k], group-global: the
   layer l by binary search over unit_end, its cells from elem_off[l] -- tiles through their
   tile row / column, padded cells skipped; kernel and element units contiguous), with q the
   cell's position among the unit's S values; BODY runs once per (k, c, q). */
#define HR_CELLS(BODY)                                                                        \
  int64_t l = 0;                                                                              \
  for (int64_t k = 0; k < n; ++k) {                                                           \
    const int64_t row = rows[k];                                                              \
    if (row < (l ? unit_end[l - 1] : 0) || row >= unit_end[l]) {   /* binary search */       \
      int64_t a = 0, b = L - 1;                                                               \
      while (a < b) { int64_t mid = (a + b) / 2; if (row < unit_end[mid]) b = mid; else a = mid + 1; } \
      l = a;                                                                                  \
    }                                                                                         \
    const int64_t loc = row - (l ? unit_end[l - 1] : 0), base = elem_off[l];                  \
    if (H[l] > 0) {                                                                           \
      const int64_t tr = loc / tiles_w[l], tc = loc - tr * tiles_w[l], w = W[l];              \
      const int64_t rn = H[l] - tr * s < s ? H[l] - tr * s : s;                               \
      const int64_t cn = w - tc * s < s ? w - tc * s : s;                                     \
      for (int64_t i = 0; i < rn; ++i)                                                        \
        for (int64_t j = 0; j < cn; ++j) {                                                    \
          const int64_t c = base + (tr * s + i) * w + tc * s + j, q = i * s + j; BODY         \
        }                                                                                     \
    } else {                                                                                  \
      for (int64_t j = 0; j < S; ++j) { const int64_t c = base + loc * S + j, q = j; BODY }   \
    }                                                                                         \
  }
/* a bucket group's decode: the n received units (rows: group-global unit indices, checked in
   range by the caller; vals: row r's S values at vals + r * vstride) added into the flat
   output, one unit after the other in message order, cells in order -- every element gets
   its contributions in message order, as base.add_in_order adds them: the same sums, bit
   for bit. Layer l of the group (L): units [unit_end[l-1], unit_end[l]), elements from
   elem_off[l]; tiled layers (H[l] > 0) place cell (i, j) of tile (tr, tc) at row
   tr*s + i, column tc*s + j of their (H[l], W[l]) matrix, and drop the padded cells. */
void hr_scatter(float *restrict out, const float *restrict vals, int64_t vstride,
                const int64_t *restrict rows, int64_t n, int64_t S, int64_t s, int64_t L,
                const int64_t *restrict unit_end, const int64_t *restrict elem_off,
                const int64_t *restrict tiles_w, const int64_t *restrict H,
                const int64_t *restrict W) {
  HR_CELLS(out[c] += vals[k * vstride + q];)
}
/* after hr_scatter (same units, same geometry): every cell that some unit reached divided by d
   once -- the cells no unit reached are +0 and stay +0 = +0 / d -- so the sum becomes the
   average without a pass over the whole output. mark: (cells + 8) / 8 zero bytes, a bit per
   cell (a cell reached by several ranks' units is divided once); left zero again. */
void hr_divide_touched(float *restrict out, const int64_t *restrict rows, int64_t n, int64_t S,
                       int64_t s, int64_t L, const int64_t *restrict unit_end,
                       const int64_t *restrict elem_off, const int64_t *restrict tiles_w,
                       const int64_t *restrict H, const int64_t *restrict W, float d,
                       uint8_t *restrict mark) {
  {
    HR_CELLS((void)q; if (!(mark[c >> 3] & (1u << (c & 7)))) { mark[c >> 3] |= (uint8_t)(1u << (c & 7)); out[c] = out[c] / d; })
  }
  {
    HR_CELLS((void)q; mark[c >> 3] = 0;)
  }
}
/* out[0, n) = +0, for a decode's output before its units are added. A decode buffer is
   larger than the caches and is read next by the scatter at a few cells and then by the
   optimizer: ordinary stores first read every line in (a zero pass then moves as many bytes
   as an abs pass, `bench compress`), non-temporal stores write the lines without reading
   them -- 0.26x an abs pass against torch's zero_ at 0.73x on this 2-core machine. Below
   ZERO_STREAM bytes (which the caches hold for the scatter) and off x86-64: memset. */
#define ZERO_STREAM (1 << 20)
void hr_zero(float *out, int64_t n, int nt) {
#if defined(__x86_64__)
  if ((int64_t)sizeof(float) * n >= ZERO_STREAM) {
    const int64_t chunk = 1 << 16;                  /* floats per piece of work */
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t a = 0; a < n; a += chunk) {
      const int64_t b = a + chunk < n ? a + chunk : n;
      int64_t i = a;
      for (; i < b && ((uintptr_t)(out + i) & 15); ++i) out[i] = 0.f;   /* to 16 bytes */
      const __m128 z = _mm_setzero_ps();
      for (; i + 4 <= b; i += 4) _mm_stream_ps(out + i, z);
      for (; i < b; ++i) out[i] = 0.f;
      _mm_sfence();                     /* the streamed lines visible before the barrier */
    }
    return;
  }
#else
  (void)nt;
#endif
  memset(out, 0, sizeof(float) * (size_t)n);
}
/* ---- a bucket group in three calls (bucket.BucketCodec through SparseMethod.encode_group) ----
   Per layer l of the group, geo[8 l ..]: kind (1: tile), U (units), S, H, W, Hp, Wp, s. */
enum { G_KIND, G_U, G_S, G_H, G_W, G_HP, G_WP, G_SIDE, G_N };
#define TOPK_BLOCK 64                       /* = select.BLOCK */

/* every layer: the residual update and the NSI of its units into score + ustart[l]
   (hr_units / hr_tiles, each parallel inside); bad[l] = 1 where layer l's gradient held an
   entry that is not finite (skipped by the update). Returns 1 when a tile layer is out of
   memory. */
int hr_group_scores(int64_t L, const int64_t *gp, const int64_t *up, const int64_t *vp,
                    const int64_t *geo, const int64_t *ustart, int mem, float m,
                    float *score, float beta, int32_t *bad, int nt) {
  for (int64_t l = 0; l < L; ++l) {
    const int64_t *q = geo + G_N * l;
    const float *g = (const float *)gp[l];
    float *u = (float *)up[l], *v = (float *)vp[l];
    if (q[G_KIND] == 1) {
      const int rc = hr_tiles(g, u, v, q[G_H], q[G_W], q[G_HP], q[G_WP], q[G_SIDE], mem, m,
                              score + ustart[l], beta, nt);
      if (rc == 1) return 1;
      bad[l] = rc == 2;
    } else {
      bad[l] = hr_units(g, u, v, q[G_U], q[G_S], mem, m, score + ustart[l], beta, nt);
    }
  }
  return 0;
}

/* every layer (element units, U = geo[G_U] entries): the residual update and the max / min
   of each full block of TOPK_BLOCK entries into hi / lo + bstart[l] (hr_blocks); bad[l] as
   in hr_group_scores */
void hr_group_blocks(int64_t L, const int64_t *gp, const int64_t *up, const int64_t *vp,
                     const int64_t *geo, const int64_t *bstart, int mem, float m,
                     float *hi, float *lo, int32_t *bad, int nt) {
  for (int64_t l = 0; l < L; ++l)
    bad[l] = hr_blocks((const float *)gp[l], (float *)up[l], (float *)vp[l], geo[G_N * l + G_U],
                       mem, m, hi + bstart[l], lo + bstart[l], TOPK_BLOCK, nt);
}

/* floats <-> unsigned keys in the same order (negatives flipped; NaN excluded by callers) */
static inline uint32_t fkey(float f) {
  uint32_t u; memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
static inline float funkey(uint32_t u) {
  u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  float f; memcpy(&f, &u, sizeof f); return f;
}

/* the k-th largest (1 <= k <= n) of a[0..n) (no NaN), overwriting a: radix select on the
   order-preserving keys, 11 + 11 + 10 bits, each pass a histogram and a compaction of the
   keys that share the digits found so far -- no data-dependent branches, unlike a
   quickselect's partitions (which made the selection over Top-k's ~400k block maxima of a
   ResNet-50 step cost 6 ms) */
static float kth_largest(float *a, int64_t n, int64_t k) {
  uint32_t *key = (uint32_t *)a;
  int64_t cnt[2048];
  for (int64_t i = 0; i < n; ++i) key[i] = fkey(a[i]);
  uint32_t prefix = 0;
  for (int pass = 0; pass < 3; ++pass) {
    const int bits = pass < 2 ? 11 : 10, shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
    const uint32_t dm = (1u << bits) - 1;
    for (int b = 0; b <= (int)dm; ++b) cnt[b] = 0;
    for (int64_t i = 0; i < n; ++i) ++cnt[(key[i] >> shift) & dm];
    int64_t acc = 0;
    uint32_t bin = dm;
    for (;; --bin) {                            /* from the top digit down to the k-th key */
      if (acc + cnt[bin] >= k || bin == 0) break;
      acc += cnt[bin];
    }
    k -= acc;
    prefix |= bin << shift;
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) { const uint32_t y = key[i]; key[m] = y; m += ((y >> shift) & dm) == bin; }
    n = m;
  }
  return funkey(prefix);
}

/* the maximum of each of the nb full TOPK_BLOCK blocks of x (of |x| with magnitude) into cv:
   from given block extremes (h0: maxima; l0: minima, or NULL) where h0 is not NULL, else
   from x itself. Returns 1 if a block holds a NaN (its maximum is then NaN). */
static int block_maxima(const float *x, int64_t nb, int magnitude, const float *h0,
                        const float *l0, float *cv) {
  int nan = 0;
  if (h0) {
    for (int64_t b = 0; b < nb; ++b) {
      float h = h0[b];
      if (magnitude && l0) { float nl = -l0[b]; h = nl > h ? nl : h; }
      nan |= h != h; cv[b] = h;                    /* a block with a NaN has NaN extremes */
    }
  } else {
    for (int64_t b = 0; b < nb; ++b) {
      const float *xb = x + b * TOPK_BLOCK;
      float h = -INFINITY; int bad = 0;
      for (int64_t j = 0; j < TOPK_BLOCK; ++j) {
        const float y = magnitude ? fabsf(xb[j]) : xb[j];
        h = y > h ? y : h; bad |= y != y;
      }
      nan |= bad; cv[b] = h;
    }
  }
  return nan;
}

/* the entries y (|x| with mag, else x) >= t of the blocks whose maximum cv[b] reaches t and
   of the tail past the nb full blocks: index into ci, value into tmp, ascending; returns how
   many. The passing blocks lie scattered (~6% of them at density 0.001), each a demand miss
   that the hardware prefetcher cannot foresee, so they are listed first (into bl) and read
   with a software prefetch PF_AHEAD blocks ahead; the selection is the same. */
#define PF_AHEAD 8
static int64_t gather_at_least(const float *x, int64_t n, const float *cv, int64_t nb, float t,
                               int mag, int64_t *bl, int64_t *ci, float *tmp) {
  int64_t nbl = 0, cnt = 0;
  for (int64_t b = 0; b < nb; ++b) { bl[nbl] = b; nbl += !(cv[b] < t); }
  for (int64_t i = 0; i < nbl; ++i) {
    if (i + PF_AHEAD < nbl) {
      const char *pf = (const char *)(x + bl[i + PF_AHEAD] * TOPK_BLOCK);
      __builtin_prefetch(pf); __builtin_prefetch(pf + 64); __builtin_prefetch(pf + 128);
      __builtin_prefetch(pf + 192); __builtin_prefetch(pf + 4 * TOPK_BLOCK - 1);
    }
    const int64_t j0 = bl[i] * TOPK_BLOCK;
    for (int64_t j = j0; j < j0 + TOPK_BLOCK; ++j) {
      const float y = mag ? fabsf(x[j]) : x[j];
      ci[cnt] = j; tmp[cnt] = y; cnt += y >= t;
    }
  }
  for (int64_t j = nb * TOPK_BLOCK; j < n; ++j) {
    const float y = mag ? fabsf(x[j]) : x[j];
    ci[cnt] = j; tmp[cnt] = y; cnt += y >= t;
  }
  return cnt;
}

/* the kk largest of the cnt candidates (values tmp, indices ci; 1 <= kk <= cnt), ascending
   as they come, ties at the kk-th value to the first (lowest rows): their indices into dst
   (may be ci itself); cv is overwritten (a copy of the values). Returns kk. */
static int64_t take_largest(int64_t cnt, int64_t kk, float *cv, float *tmp, const int64_t *ci,
                            int64_t *dst) {
  for (int64_t c = 0; c < cnt; ++c) cv[c] = tmp[c];
  const float kv = kth_largest(tmp, cnt, kk);
  int64_t above = 0;
  for (int64_t c = 0; c < cnt; ++c) above += cv[c] > kv;
  int64_t ties = kk - above, w = 0;
  for (int64_t c = 0; c < cnt; ++c) {
    const int take = cv[c] > kv || (cv[c] == kv && ties > 0);
    if (cv[c] == kv && take) --ties;
    if (take) dst[w++] = ci[c];
  }
  return w;
}

/* the exact top-kk of y (|x| with mag) over n entries whose nb full blocks have maxima cv
   (1 <= kk <= nb): only the blocks whose maximum reaches the kk-th largest block maximum (kk
   blocks hold an entry at or above it, so at least kk entries pass) are read; indices of the
   chosen, ascending, ties to the lowest, into ci; cv and tmp are overwritten. Returns kk. */
static int64_t top_of_blocks(const float *x, int64_t n, float *cv, int64_t nb, int64_t kk,
                             int mag, int64_t *bl, int64_t *ci, float *tmp) {
  for (int64_t b = 0; b < nb; ++b) tmp[b] = cv[b];
  const float t = kth_largest(tmp, nb, kk);
  const int64_t cnt = gather_at_least(x, n, cv, nb, t, mag, bl, ci, tmp);
  return take_largest(cnt, kk, cv, tmp, ci, ci);
}

/* exact top-k of every layer's scores (layer l: the U = geo[G_U] floats at xp[l], of which
   |x| with `magnitude`; k[l] of them), the rows of the chosen units (ustart[l] + position,
   ascending) into rows + row_off[l]. The threshold is the k-th largest of the candidates:
   where k is at most 1/8 of the full blocks of 64 scores (and there are >= 256), only the
   blocks whose maximum reaches the k-th largest block maximum (k blocks hold an entry at or
   above it: at least k pass), else every score. Block maxima come from bhi / blo (max / min of
   each full block from bstart[l], hr_blocks) where given, else from a pass over the scores.
   Ties at the threshold: the lowest rows. A layer holding a NaN gets status 1 and nothing
   written (the caller selects it as select.topk_indices does); status 2: out of memory. */
void hr_group_topk(int64_t L, const int64_t *xp, const int64_t *ustart, const int64_t *geo,
                   const int64_t *k, const int64_t *row_off, int64_t *rows, int32_t *status,
                   int magnitude, const float *bhi, const float *blo, const int64_t *bstart,
                   int nt) {
  #pragma omp parallel num_threads(nt)
  {
    float *cv = NULL, *tmp = NULL; int64_t *ci = NULL, *bl = NULL, cap = 0;
    #pragma omp for schedule(dynamic, 1)
    for (int64_t l = 0; l < L; ++l) {
      const float *x = (const float *)xp[l];
      const int64_t U = geo[G_N * l + G_U];
      const int64_t kk = k[l] < U ? k[l] : U;
      status[l] = 0;
      if (kk <= 0) continue;
      const int64_t nb = U / TOPK_BLOCK;
      const int blocked = nb >= 256 && 8 * kk <= nb;
      if (cap < (U > nb ? U : nb)) {
        cap = U > nb ? U : nb;
        free(cv); free(tmp); free(ci); free(bl);
        cv = (float *)malloc(cap * sizeof(float)); tmp = (float *)malloc(cap * sizeof(float));
        ci = (int64_t *)malloc(cap * sizeof(int64_t));
        bl = (int64_t *)malloc((cap / TOPK_BLOCK + 1) * sizeof(int64_t));
        if (!cv || !tmp || !ci || !bl) { status[l] = 2; cap = 0; continue; }
      }
      int nan = 0;
      if (blocked) {                                 /* block maxima into cv */
        nan = block_maxima(x, nb, magnitude, bhi ? bhi + bstart[l] : NULL,
                           bhi && blo ? blo + bstart[l] : NULL, cv);
        for (int64_t j = nb * TOPK_BLOCK; j < U; ++j) nan |= x[j] != x[j];
      } else {
        for (int64_t j = 0; j < U; ++j) nan |= x[j] != x[j];
      }
      if (nan) { status[l] = 1; continue; }
      int64_t w;
      if (blocked) {
        w = top_of_blocks(x, U, cv, nb, kk, magnitude, bl, ci, tmp);
      } else {
        for (int64_t j = 0; j < U; ++j) { ci[j] = j; tmp[j] = magnitude ? fabsf(x[j]) : x[j]; }
        w = take_largest(U, kk, cv, tmp, ci, ci);
      }
      int64_t *out = rows + row_off[l];
      for (int64_t c = 0; c < w; ++c) out[c] = ci[c] + ustart[l];
    }
    free(cv); free(tmp); free(ci); free(bl);
  }
}

/* DGC's sampled threshold for every layer (select.sampled_threshold_indices, the same
   selection): layer l's |x| (n = geo[G_U] entries at xp[l]; block extremes bhi / blo from
   bstart[l]), plan pl[6 l ..] = stride, start (drawn by the caller), top_k_samples,
   num_selects, num_samples. The threshold is the top_k_samples-th largest of |x[start::stride]|;
   then at most 10 rounds: more than 1.3x num_selects pass -> the num_selects largest of them
   (ties: the lowest rows); fewer than 0.8x -> threshold * 0.8 and again. At most num_selects
   rows (ustart[l] + position, ascending) into rows + row_off[l], their count into cnt_out[l].
   bhi = NULL: the block maxima are read from x (RS-DGC's NSI scores, which are >= 0).
   status 1: a NaN met (nothing written: the caller selects as per layer); 2: out of memory. */
void hr_group_sampled(int64_t L, const int64_t *xp, const int64_t *ustart, const int64_t *geo,
                      const int64_t *pl, const int64_t *row_off, int64_t *rows,
                      int64_t *cnt_out, int32_t *status, const float *bhi, const float *blo,
                      const int64_t *bstart, int nt) {
  #pragma omp parallel num_threads(nt)
  {
    float *cv = NULL, *tmp = NULL; int64_t *ci = NULL, *bl = NULL, cap = 0;
    #pragma omp for schedule(dynamic, 1)
    for (int64_t l = 0; l < L; ++l) {
      const float *x = (const float *)xp[l];
      const int64_t n = geo[G_N * l + G_U], *q = pl + 6 * l;
      const int64_t stride = q[0], start = q[1], tks = q[2], ns = q[3], nsamp = q[4];
      int64_t *out = rows + row_off[l];
      status[l] = 0; cnt_out[l] = 0;
      if (ns >= n) {
        for (int64_t j = 0; j < n; ++j) out[j] = ustart[l] + j;
        cnt_out[l] = n;
        continue;
      }
      if (cap < n) {
        cap = n;
        free(cv); free(tmp); free(ci); free(bl);
        cv = (float *)malloc(cap * sizeof(float)); tmp = (float *)malloc(cap * sizeof(float));
        ci = (int64_t *)malloc(cap * sizeof(int64_t));
        bl = (int64_t *)malloc((cap / TOPK_BLOCK + 1) * sizeof(int64_t));
        if (!cv || !tmp || !ci || !bl) { status[l] = 2; cap = 0; continue; }
      }
      const int64_t nb = n / TOPK_BLOCK;
      /* block maxima of |x| into cv: from the given extremes, or from x (NSI scores) */
      int nan = block_maxima(x, nb, 1, bhi ? bhi + bstart[l] : NULL,
                             bhi ? blo + bstart[l] : NULL, cv);
      for (int64_t j = nb * TOPK_BLOCK; j < n; ++j) nan |= x[j] != x[j];
      if (nan) { status[l] = 1; continue; }
      int64_t m = 0;
      for (int64_t j = start; j < n; j += stride) tmp[m++] = fabsf(x[j]);
      float t = kth_largest(tmp, m, tks);
      int64_t cnt = 0;
      for (int round = 0;; ++round) {
        if (n > nsamp && round < 10 && ns >= 1) {
          /* more than 1.3x ns blocks reach t: as many entries do, so the round below would
             end in "the ns largest of them", which are the ns largest of all -- taken from
             the blocks that reach the ns-th largest block maximum instead of from every
             block that reaches t (a threshold lowered by 0.8 lets ~1/3 of the blocks pass) */
          int64_t nbp = 0;
          for (int64_t b = 0; b < nb; ++b) nbp += !(cv[b] < t);
          if ((double)nbp > 1.3 * (double)ns) {
            cnt = top_of_blocks(x, n, cv, nb, ns, 1, bl, ci, tmp);
            break;
          }
        }
        cnt = gather_at_least(x, n, cv, nb, t, 1, bl, ci, tmp);   /* |x| >= t, ascending */
        if (n <= nsamp || round == 10) break;
        if (cnt > ns) {
          if ((double)cnt > 1.3 * (double)ns)     /* the ns largest of them, ascending */
            cnt = take_largest(cnt, ns, cv, tmp, ci, ci);   /* block maxima not needed now */
          break;
        }
        if ((double)cnt < 0.8 * (double)ns) { t = t * 0.8f; continue; }
        break;
      }
      if (cnt > ns) cnt = ns;
      for (int64_t c = 0; c < cnt; ++c) out[c] = ci[c] + ustart[l];
      cnt_out[l] = cnt;
    }
    free(cv); free(tmp); free(ci); free(bl);
  }
}

/* the chosen units of every layer (rows + row_off[l], group-global) into the message: row r
   of msg (cols floats) gets the unit's S values from v (cell order of layout.gather_units:
   a tile's cells row by row) and the row index in the columns after them (int32, or int64
   with index64); the unit's cells of v become zero (sent exactly), and of u too with
   zero_u (momentum factor masking); without zero_v, v is left for hr_group_keep. index64 < 0:
   no index written (values only). */
void hr_group_take(int64_t L, const int64_t *up, const int64_t *vp, const int64_t *geo,
                   const int64_t *ustart, const int64_t *row_off, const int64_t *rows,
                   float *msg, int64_t cols, int zero_v, int zero_u, int index64, int nt) {
  #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t l = 0; l < L; ++l) {
    const int64_t *q = geo + G_N * l;
    float *u = (float *)up[l], *v = (float *)vp[l];
    const int64_t S = q[G_S], s = q[G_SIDE], Wp = q[G_WP], tw = q[G_KIND] == 1 ? Wp / s : 1;
    for (int64_t r = row_off[l]; r < row_off[l + 1]; ++r) {
      const int64_t loc = rows[r] - ustart[l];
      float *o = msg + r * cols;
      if (q[G_KIND] == 1) {
        const int64_t tr = loc / tw, tc = loc - tr * tw, base = tr * s * Wp + tc * s;
        for (int64_t i = 0; i < s; ++i)
          for (int64_t j = 0; j < s; ++j) {
            const int64_t e = base + i * Wp + j;
            o[i * s + j] = v[e];
            if (zero_v) v[e] = 0.f;
            if (zero_u) u[e] = 0.f;
          }
      } else {
        for (int64_t j = 0; j < S; ++j) {
          const int64_t e = loc * S + j;
          o[j] = v[e];
          if (zero_v) v[e] = 0.f;
          if (zero_u) u[e] = 0.f;
        }
      }
      if (index64 > 0) { int64_t w = rows[r]; memcpy(o + S, &w, sizeof w); }
      else if (index64 == 0) { int32_t w = (int32_t)rows[r]; memcpy(o + S, &w, sizeof w); }
    }
  }
}

/* a lossy codec's sent values (sent: (K, S) fp32, the decoded values of row r for rows[r])
   subtracted from the residual v at the chosen units' cells: v - sent, what the receivers did
   not get, as memory.mark_sent's index_add_(alpha=-1) leaves it (padded tile cells: 0 - 0) */
void hr_group_keep(int64_t L, const int64_t *vp, const int64_t *geo, const int64_t *ustart,
                   const int64_t *row_off, const int64_t *rows, const float *sent, int nt) {
  #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t l = 0; l < L; ++l) {
    const int64_t *q = geo + G_N * l;
    float *v = (float *)vp[l];
    const int64_t S = q[G_S], s = q[G_SIDE], Wp = q[G_WP], tw = q[G_KIND] == 1 ? Wp / s : 1;
    for (int64_t r = row_off[l]; r < row_off[l + 1]; ++r) {
      const int64_t loc = rows[r] - ustart[l];
      const float *e = sent + r * S;
      if (q[G_KIND] == 1) {
        const int64_t tr = loc / tw, tc = loc - tr * tw, base = tr * s * Wp + tc * s;
        for (int64_t i = 0; i < s; ++i)
          for (int64_t j = 0; j < s; ++j) v[base + i * Wp + j] -= e[i * s + j];
      } else {
        for (int64_t j = 0; j < S; ++j) v[loc * S + j] -= e[j];
      }
    }
  }
}
"""

FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]

_LIB = None
_ERROR: str | None = None


def cache_dir() -> Path:
    """``$HVD_RSGC_CACHE``, else ``~/.cache/hvd_rsgc``; where that cannot be created (a
    read-only or missing home in a container), a per-user directory under the temp dir."""
    env = os.environ.get("HVD_RSGC_CACHE")
    if env:
        return Path(env)
    d = Path.home() / ".cache" / "hvd_rsgc"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except (OSError, RuntimeError):
        pass
    return _private_dir(Path(tempfile.gettempdir()) / f"hvd_rsgc-{os.getuid()}")


def _private_dir(d: Path) -> Path:
    """A cache directory in a world-writable place (the temp directory): created 0700 and
    refused unless this user owns it and no one else may write to it -- another user could
    otherwise plant a library under the predictable name and have every rank load it."""
    try:
        d.mkdir(mode=0o700, exist_ok=True)
        st = d.stat()
    except OSError as e:
        raise RuntimeError(f"cache directory {str(d)!r}: {e}") from None
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise RuntimeError(f"cache directory {str(d)!r} is not this user's own (owner uid "
                           f"{st.st_uid}, mode {oct(st.st_mode & 0o777)}): set HVD_RSGC_CACHE "
                           "to a private directory")
    return d


def _build(path: Path) -> None:
    """Compile ``SOURCE`` into ``path`` (a private name in the cache directory)."""
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "hvd_rsgc_native.c"
        src.write_text(SOURCE)
        proc = subprocess.run([cc, *FLAGS, str(src), "-o", str(path), "-lm"],
                              capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")


def library() -> ctypes.CDLL:
    """The compiled kernels (built on first use, then cached). Raises ``RuntimeError`` naming
    the compiler's message when they cannot be built."""
    global _LIB, _ERROR
    if _LIB is not None:
        return _LIB
    if _ERROR is not None:
        raise RuntimeError(_ERROR)
    key = hashlib.sha1((SOURCE + " ".join(FLAGS) + platform.machine()
                        + os.environ.get("CC", "cc")).encode()).hexdigest()[:16]
    try:
        d = cache_dir()
        path = d / f"native-{key}.so"
        d.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            with open(d / f"native-{key}.lock", "w") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX)       # one rank builds, the others wait
                except OSError:     # a file system without flock (Lustre's noflock): ranks may
                    pass            # build side by side; each renames its own file in atomically
                if not path.exists():
                    tmp = d / f".native-{key}-{os.getpid()}.so"
                    _build(tmp)
                    os.replace(tmp, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _ERROR = f"hvd_rsgc native kernels unavailable: {exc}"
        raise RuntimeError(_ERROR) from exc
    f, i64, i32, p = ctypes.c_float, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.hr_units.argtypes = [p, p, p, i64, i64, i32, f, p, f, i32]
    lib.hr_tiles.argtypes = [p, p, p, i64, i64, i64, i64, i64, i32, f, p, f, i32]
    lib.hr_atleast.argtypes = [p, i64, p, p, i64, f, i32, p, i64]
    lib.hr_blocks.argtypes = [p, p, p, i64, i32, f, p, p, i64, i32]
    lib.hr_scatter.argtypes = [p, p, i64, p, i64, i64, i64, i64, p, p, p, p, p]
    lib.hr_divide_touched.argtypes = [p, p, i64, i64, i64, i64, p, p, p, p, p, f, p]
    lib.hr_group_scores.argtypes = [i64, p, p, p, p, p, i32, f, p, f, p, i32]
    lib.hr_group_topk.argtypes = [i64, p, p, p, p, p, p, p, i32, p, p, p, i32]
    lib.hr_group_blocks.argtypes = [i64, p, p, p, p, p, i32, f, p, p, p, i32]
    lib.hr_group_keep.argtypes = [i64, p, p, p, p, p, p, i32]
    lib.hr_group_sampled.argtypes = [i64, p, p, p, p, p, p, p, p, p, p, p, i32]
    lib.hr_group_take.argtypes = [i64, p, p, p, p, p, p, p, i64, i32, i32, i32, i32]
    lib.hr_zero.argtypes = [p, i64, i32]
    lib.hr_group_scores.restype = i32
    for fn in (lib.hr_scatter, lib.hr_divide_touched, lib.hr_zero,
               lib.hr_group_topk, lib.hr_group_take,
               lib.hr_group_blocks, lib.hr_group_keep, lib.hr_group_sampled):
        fn.restype = None
    lib.hr_tiles.restype = i32
    lib.hr_units.restype = i32
    lib.hr_blocks.restype = i32
    lib.hr_atleast.restype = i64
    _LIB = lib
    return lib


def available() -> bool:
    try:
        library()
        return True
    except RuntimeError:
        return False


_WARNED = False


def resolve(kernels: str) -> str:
    """``"auto"`` -> ``"native"`` when the kernels build here, else ``"eager"`` (one warning)."""
    global _WARNED
    if kernels != "auto":
        if kernels == "native":
            library()
        return kernels
    if available():
        return "native"
    if not _WARNED:
        _WARNED = True
        warnings.warn(f"{_ERROR}; kernels='auto' uses the eager kernels", stacklevel=3)
    return "eager"


def _mem_kind(memory) -> tuple[int, float] | None:
    from .memory import ErrorFeedback, MomentumCorrection, NoMemory
    if type(memory) is MomentumCorrection:
        return (3 if memory.nesterov else 2), memory.momentum
    if type(memory) is ErrorFeedback:
        return 1, 0.0
    if type(memory) is NoMemory:
        return 0, 0.0
    return None


def applies(memory, g: torch.Tensor, st: dict | None = None, storage_numel: int = 0) -> bool:
    """Whether the native loops can run: a CPU fp32 gradient, a memory they cover, and (``st``)
    residual buffers that are contiguous CPU fp32 of the storage size (a state loaded from a
    checkpoint could hold anything else: those take the eager route instead of being misread)."""
    if g.device.type != "cpu" or g.dtype != torch.float32 or _mem_kind(memory) is None:
        return False
    for buf in (st or {}).values():
        if not (isinstance(buf, torch.Tensor) and buf.device.type == "cpu"
                and buf.dtype == torch.float32 and buf.is_contiguous()
                and buf.numel() == storage_numel):
            return False
    return True


def _buffers(memory, st: dict, g: torch.Tensor):
    km = _mem_kind(memory)
    if km is None:
        raise TypeError(f"native kernels do not cover the memory {type(memory).__name__}")
    kind, m = km
    if kind >= 2:
        u, v = st["u"], st["v"]
    elif kind == 1:
        u = v = st["e"]
    else:
        u = v = g
    return kind, m, u, v


def _threads() -> int:
    return max(1, torch.get_num_threads())


def accumulate_scores(memory, layer, g: torch.Tensor, beta: float, out: torch.Tensor):
    """Residual update of ``layer`` with gradient ``g`` and the NSI of every unit into ``out``
    ((U,) fp32). Returns the accumulated buffer in storage form (``g`` itself without memory).
    ``g`` is finite (the engine checked it; an entry that is not would be left out of the
    residual by the kernel)."""
    lib = library()
    g = g.contiguous()
    lay = layer.layout
    kind, m, u, v = _buffers(memory, layer.memory, g)
    if lay.kind == "tile":
        if kind == 0 and lay.padded:
            raise ValueError("native tiles without a residual need an unpadded layout")
        if lib.hr_tiles(g.data_ptr(), u.data_ptr(), v.data_ptr(), lay.H, lay.W, lay.Hp, lay.Wp,
                        lay.s, kind, m, out.data_ptr(), beta, _threads()) == 1:
            raise MemoryError(f"native NSI of {layer.name}: no memory for {3 * lay.W} column sums")
        return v if kind else g.view(lay.H, lay.W)
    lib.hr_units(g.data_ptr(), u.data_ptr(), v.data_ptr(), lay.num_units, lay.unit_size, kind,
                 m, out.data_ptr(), beta, _threads())
    return (v if kind else g).view(lay.num_units, lay.unit_size)


def accumulate_extremes(memory, layer, g: torch.Tensor, block: int,
                        hi: torch.Tensor | None, lo: torch.Tensor | None):
    """Residual update of an element-layout ``layer`` and the max (and, with ``lo``, min)
    of every full block of ``block`` entries of the accumulated vector into ``hi`` / ``lo``
    (``hi=None``: the update only). Returns the accumulated buffer in storage form."""
    lib = library()
    g = g.contiguous()
    kind, m, u, v = _buffers(memory, layer.memory, g)
    n = layer.layout.numel
    if hi is None:
        block = n + 1                   # no full block: the update only
    lib.hr_blocks(g.data_ptr(), u.data_ptr(), v.data_ptr(), n, kind, m,
                  hi.data_ptr() if hi is not None else None,
                  lo.data_ptr() if lo is not None else None, block, _threads())
    return (v if kind else g).view(layer.layout.num_units, layer.layout.unit_size)


def extremes(x: torch.Tensor, block: int, magnitude: bool, hi: torch.Tensor,
             lo: torch.Tensor | None) -> None:
    """Max (and min) of every full block of ``block`` entries of the fp32 vector ``x``, in one
    read-only pass (the eager route: ``amax`` and ``amin``, two)."""
    x = x.contiguous()
    library().hr_blocks(x.data_ptr(), x.data_ptr(), x.data_ptr(), x.numel(), 0, 0.0,
                        hi.data_ptr(), lo.data_ptr() if (magnitude and lo is not None) else None,
                        block, _threads())


def zero(x: torch.Tensor) -> torch.Tensor:
    """``x.zero_()`` for a decode's output, with non-temporal stores where it is large
    (``hr_zero``): a contiguous fp32 CPU tensor; anything else goes to ``zero_``."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and x.numel():
        library().hr_zero(x.data_ptr(), x.numel(), _threads())
        return x
    return x.zero_()


def scatter(flat: torch.Tensor, vals: torch.Tensor, rows: torch.Tensor, S: int, s: int,
            geometry: dict, divide: int = 1, mark: torch.Tensor | None = None) -> None:
    """Add the units ``rows`` (int64, group-global, in range) with values ``vals`` ((n, S)
    fp32, rows may be strided) into the group's zeroed ``flat`` output in message order
    (``bucket.BucketCodec``'s decode; the same sums as ``base.add_in_order``, bit for bit).
    ``divide`` > 1: then every cell a unit reached divided by it once (``mark``: a zeroed
    uint8 workspace of ``(flat.numel() + 8) // 8`` bytes, left zeroed) -- the same values as
    ``flat.div_(divide)``, without a pass over the cells no unit reached (they stay +0)."""
    if vals.stride(1) != 1:
        vals = vals.contiguous()
    rows = rows.contiguous()
    g = geometry
    lib = library()
    args = (rows.data_ptr(), rows.numel(), S, s, g["unit_end"].numel(), g["unit_end"].data_ptr(),
            g["elem_off"].data_ptr(), g["tiles_w"].data_ptr(), g["H"].data_ptr(), g["W"].data_ptr())
    lib.hr_scatter(flat.data_ptr(), vals.data_ptr(), vals.stride(0), *args)
    if divide > 1:
        if mark is None or mark.dtype != torch.uint8 or mark.numel() < (flat.numel() + 8) // 8:
            raise ValueError("native.scatter: divide needs a zeroed uint8 mark of "
                             f"{(flat.numel() + 8) // 8} bytes")
        lib.hr_divide_touched(flat.data_ptr(), *args, float(divide), mark.data_ptr())


def at_least(x: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor | None, block: int, t: float,
             magnitude: bool) -> torch.Tensor:
    """Ascending int64 indices of the entries with ``x >= t`` (``|x| >= t``), reading only the
    blocks whose extremes reach ``t`` (``select.AtLeast``'s compaction in one serial pass)."""
    lib = library()
    x = x.contiguous()
    args = (x.data_ptr(), x.numel(), hi.data_ptr(), lo.data_ptr() if lo is not None else None,
            block, float(t), int(magnitude))
    need = -lib.hr_atleast(*args, None, 0)          # the room: entries of the blocks read
    if need <= 0:
        return torch.empty(0, dtype=torch.int64)
    out = torch.empty(need, dtype=torch.int64)     # only the first (passing) pages are touched
    cnt = lib.hr_atleast(*args, out.data_ptr(), need)
    return out[:cnt].clone()


def encode_group(method, group, grads: dict, ctxs: dict, scoring: str = "nsi",
                 beta: float = 0.5, selection: str = "topk") -> torch.Tensor | None:
    """One bucket group's message (``bucket.BucketCodec``) for a method with exact top-k and a
    residual (values fp32, or fp16 / int8 through ``base.to_wire`` with the rounding kept in
    the residual by ``hr_group_keep``), in three C calls for the whole group instead of a dozen PyTorch
    calls per layer: every layer's update and what selection reads (``scoring="nsi"``: the NSI
    of its units, ``hr_group_scores``, RS-DGC; ``"magnitude"``: the block extremes of the
    residual, whose |entries| are the scores, ``hr_group_blocks``, Top-k and DGC), every
    layer's selection (``selection="topk"``: its exact top-k, ``hr_group_topk``; ``"sampled"``:
    DGC's sampled threshold over the scores, ``hr_group_sampled``, DGC and RS-DGC with
    ``selection="sampled"``), the chosen units into the message and out of the residual
    (``hr_group_take``). The message and the residual are what the per-layer route
    (``SparseMethod.pick``, ``to_wire``, ``memory.mark_sent``, ``pack_sparse``) gives, bit for
    bit (tested), save that ties at a layer's k-th score go to the lowest rows. Fills
    ``ctxs[name]["sent_units"]``. None where a layer does not qualify: nothing has been
    touched, the caller takes the per-layer route."""
    km = _mem_kind(method.memory)
    if km is None or km[0] == 0 or method.index_dtype not in (torch.int32, torch.int64):
        return None
    kind, mom = km
    present, gs = [], []
    for st, uoff in zip(group.layers, group.unit_off):
        g = grads.get(st.name)
        if g is None:
            continue
        if scoring != "nsi" and st.layout.unit_size != 1:
            return None
        g = (g.float() if g.dtype != torch.float32 else g).contiguous()
        rows_, cols_ = st.layout.storage_shape
        if not applies(method.memory, g, st.memory, rows_ * cols_):
            return None
        present.append((st, uoff))
        gs.append(g)
    lib = library()
    from .base import message_columns, pack_sparse, to_wire
    idx64 = method.index_dtype == torch.int64
    exact = method.value_dtype == torch.float32     # else: fp32 values, then the wire codec
    width = group.S + (2 if idx64 else 1) if exact else group.S
    for st in group.layers:
        ctxs[st.name]["sent_units"] = 0
    def empty():                        # a message of no units
        return torch.zeros(0, message_columns(group.S, method.value_dtype, method.index_dtype),
                           dtype=method.value_dtype)
    if not present:
        return empty()
    L = len(present)
    key = tuple(st.name for st, _ in present)
    static = group.native_tables.get(key)
    if static is None:
        geo, bstart = [], [0]
        for st, _ in present:
            lay = st.layout
            tile = lay.kind == "tile"
            geo += [int(tile), lay.num_units, lay.unit_size, lay.H if tile else 0,
                    lay.W if tile else 0, lay.Hp if tile else 0, lay.Wp if tile else 0,
                    lay.s if tile else 1]
            bstart.append(bstart[-1] + lay.num_units // 64)
        static = group.native_tables[key] = (
            torch.tensor(geo, dtype=torch.int64),
            torch.tensor([uoff for _, uoff in present], dtype=torch.int64),
            torch.tensor(bstart, dtype=torch.int64))
    geo_t, start_t, bstart_t = static
    st_of = [st for st, _ in present]
    if kind == 1:
        ubufs = vbufs = [st.memory["e"] for st in st_of]
    else:
        ubufs = [st.memory["u"] for st in st_of]
        vbufs = [st.memory["v"] for st in st_of]
    cpu = torch.device("cpu")
    nt = _threads()
    if scoring == "nsi":
        score = method.workspace.get("group_scores", group.units, cpu)
        xs = [score.data_ptr() + 4 * uoff for _, uoff in present]
    else:
        xs = [b.data_ptr() for b in vbufs]
    # the update; it skips a gradient's entries that are not finite (they never reach the
    # residual) and marks their layer: nothing of it is selected, ctxs[name]["nonfinite"]
    ptrs = torch.tensor([g.data_ptr() for g in gs] + [b.data_ptr() for b in ubufs]
                        + [b.data_ptr() for b in vbufs], dtype=torch.int64)
    gp, up, vp = (ptrs.data_ptr() + 8 * L * i for i in range(3))
    bad = torch.zeros(L, dtype=torch.int32)
    hi = lo = None
    if scoring == "nsi":
        if lib.hr_group_scores(L, gp, up, vp, geo_t.data_ptr(), start_t.data_ptr(), kind, mom,
                               score.data_ptr(), beta, bad.data_ptr(), nt):
            raise MemoryError(f"native NSI of a bucket group of {L} layers: no memory for column sums")
    else:
        nb = int(bstart_t[-1])
        hi = method.workspace.get("group_hi", max(nb, 1), cpu)
        lo = method.workspace.get("group_lo", max(nb, 1), cpu)
        lib.hr_group_blocks(L, gp, up, vp, geo_t.data_ptr(), bstart_t.data_ptr(), kind, mom,
                            hi.data_ptr(), lo.data_ptr(), bad.data_ptr(), nt)
    if bool(bad.any()):                 # select from the finite layers only
        keep = []
        for i, b in enumerate(bad.tolist()):
            if b:
                ctxs[st_of[i].name]["nonfinite"] = True
            else:
                keep.append(i)
        if not keep:
            return empty()
        present, st_of = [present[i] for i in keep], [st_of[i] for i in keep]
        ubufs, vbufs, xs = [ubufs[i] for i in keep], [vbufs[i] for i in keep], [xs[i] for i in keep]
        idx = torch.tensor(keep, dtype=torch.int64)
        # the same per-layer offsets (hi / lo were written at the layers' own bstart)
        geo_t = geo_t.view(L, -1)[idx].reshape(-1).contiguous()
        start_t, bstart_t = start_t[idx].contiguous(), bstart_t[idx].contiguous()
        L = len(keep)
    if selection == "sampled":          # room for at most num_selects (all: n) per layer
        ks = [st.layout.num_units if st.plan.num_selects >= st.layout.num_units
              else st.plan.num_selects for st in st_of]
    else:
        ks = [max(0, min(int(st.k), st.layout.num_units)) for st in st_of]
    row_off = [0]
    for k_ in ks:
        row_off.append(row_off[-1] + k_)
    # one int64 table: pointers of u, v, x (what top-k reads), then k and the row offsets
    tab = torch.tensor([b.data_ptr() for b in ubufs] + [b.data_ptr() for b in vbufs] + xs
                       + ks + row_off, dtype=torch.int64)
    up, vp, xp, kp, rp = (tab.data_ptr() + 8 * L * i for i in range(5))
    K = row_off[-1]
    rows = torch.empty(K, dtype=torch.int64)
    status = torch.zeros(L, dtype=torch.int32)
    starts: list[int | None] = []
    if selection == "sampled":
        # the sample offsets drawn in layer order, as the per-layer route draws them
        pl = []
        for st in st_of:
            plan = st.plan
            start = 0
            if plan.num_selects < plan.n and plan.stride != 1:
                start = int(torch.randint(0, plan.stride, (1,), generator=method.generator).item())
            starts.append(start)
            pl += [plan.stride, start, plan.top_k_samples, plan.num_selects, plan.num_samples, 0]
        pl_t = torch.tensor(pl, dtype=torch.int64)
        cnt = torch.zeros(L, dtype=torch.int64)
        # NSI scores: no block extremes yet, hr_group_sampled takes the maxima from the scores
        lib.hr_group_sampled(L, xp, start_t.data_ptr(), geo_t.data_ptr(), pl_t.data_ptr(), rp,
                             rows.data_ptr(), cnt.data_ptr(), status.data_ptr(),
                             hi.data_ptr() if hi is not None else None,
                             lo.data_ptr() if lo is not None else None, bstart_t.data_ptr(), nt)
    else:
        lib.hr_group_topk(L, xp, start_t.data_ptr(), geo_t.data_ptr(), kp, rp, rows.data_ptr(),
                          status.data_ptr(), int(scoring == "magnitude"),
                          hi.data_ptr() if hi is not None else None,
                          lo.data_ptr() if lo is not None else None, bstart_t.data_ptr(), nt)
    if bool(status.any()):
        from .select import sampled_threshold_indices, topk_indices
        for l_, code in enumerate(status.tolist()):
            if code == 2:
                raise MemoryError(f"native top-k of '{st_of[l_].name}': no memory for candidates")
            if code == 1:                      # a NaN met: selected as per layer
                uoff = present[l_][1]
                n_ = st_of[l_].layout.num_units
                sc = score[uoff:uoff + n_] if scoring == "nsi" else vbufs[l_].view(-1)[:n_]
                if selection == "sampled":
                    sel = sampled_threshold_indices(sc, st_of[l_].plan,
                                                    magnitude=scoring == "magnitude",
                                                    start=starts[l_])
                    rows[row_off[l_]:row_off[l_] + sel.numel()] = sel + uoff
                    cnt[l_] = sel.numel()
                else:
                    rows[row_off[l_]:row_off[l_ + 1]] = \
                        topk_indices(sc, ks[l_], magnitude=scoring == "magnitude") + uoff
    if selection == "sampled":          # each layer's rows to the front of its room
        ks = cnt.tolist()
        rows = torch.cat([rows[a:a + c] for a, c in zip(row_off, ks)])
        row_off = [0]
        for k_ in ks:
            row_off.append(row_off[-1] + k_)
        tab[3 * L:] = torch.tensor(ks + row_off, dtype=torch.int64)    # k, row offsets
        K = row_off[-1]
    msg = torch.empty(K, width, dtype=torch.float32)
    zero_u = int(kind >= 2 and getattr(method.memory, "masking", True))
    lib.hr_group_take(L, up, vp, geo_t.data_ptr(), start_t.data_ptr(), rp, rows.data_ptr(),
                      msg.data_ptr(), width, int(exact), zero_u, int(idx64) if exact else -1, nt)
    if not exact:                       # fp16 / int8 values: v keeps what they rounded away
        wire, sent = to_wire(msg, method.value_dtype)
        sent = sent.contiguous()
        lib.hr_group_keep(L, vp, geo_t.data_ptr(), start_t.data_ptr(), rp, rows.data_ptr(),
                          sent.data_ptr(), nt)
        msg = pack_sparse(wire, rows, method.index_dtype)
    for st, k_ in zip(st_of, ks):
        ctxs[st.name]["sent_units"] = k_
    return msg
