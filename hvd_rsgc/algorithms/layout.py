"""Unit layouts: how a gradient tensor is cut into the units that are scored and sent.

A *unit* is the smallest thing a sparsifier selects. Element-wise methods (Top-k, DGC,
Random-k) use one element per unit. RS-DGC uses Chebyshev neighbourhoods (see ``nsi.py``):

* a k x k convolution kernel (k > 1) is one unit of k*k values: on the 2-D plane
  ``(C_out*kh, C_in*kw)`` the neighbourhoods of radius r=(k-1)/2 centred on the kernel
  centres are exactly the kernels, so units never overlap;
* linear layers, 1x1 convolutions and other >=2-D tensors are reshaped to ``(shape[0], -1)``
  and tiled into non-overlapping ``(2r+1) x (2r+1)`` patches; edges are zero-padded, padded
  cells are excluded from the statistics and never written back.

Every layout maps a tensor to a 2-D ``(U, S)`` "unit matrix" and back. Residual buffers are
kept in the layout's *storage* form (``storage_shape``), and every access by unit goes through
the layout (``target_view`` to accumulate into, ``gather_units`` / ``fill_units_`` /
``sub_units_`` by unit row, ``units_of`` for the whole ``(U, S)`` matrix):

* element and kernel layouts store the unit matrix itself (units are contiguous rows);
* tiles store the zero-padded ``(Hp, Wp)`` matrix in its natural order: the gradient is added
  row by row (a tile-ordered buffer needs a stride-3 gather that cost ~7x the accumulation of
  contiguous rows on a CPU), the NSI reduces the ``(Hp/s, s, Wp/s, s)`` view, and a unit's
  cells are reached through their storage indices. Padded cells are never accumulated into,
  so they stay zero.

All functions are pure tensor code (no Horovod).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Layout:
    """Base class. ``num_units`` x ``unit_size`` unit matrix for a tensor of ``shape``."""

    kind = "element"

    def __init__(self, shape: torch.Size):
        self.shape = torch.Size(shape)
        self.numel = int(self.shape.numel())
        self.num_units = self.numel
        self.unit_size = 1

    def to_units(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor of ``shape`` -> ``(U, S)``; a view where the layout allows it."""
        return x.reshape(self.num_units, self.unit_size)

    def from_units(self, u: torch.Tensor) -> torch.Tensor:
        """``(U, S)`` -> tensor of ``shape`` (padded cells dropped)."""
        return u.reshape(self.shape)

    # -- the residual's storage ----------------------------------------------------------
    @property
    def storage_shape(self) -> tuple[int, int]:
        """Shape of a residual buffer of this layout."""
        return (self.num_units, self.unit_size)

    def source_view(self, x: torch.Tensor, workspace: "Workspace") -> torch.Tensor:
        """A view of ``x`` shaped like ``target_view(buffer)``, to be added into it (no
        allocation on the hot path)."""
        return x.reshape(self.num_units, self.unit_size)

    def target_view(self, buf: torch.Tensor) -> torch.Tensor:
        """The part of a storage buffer that ``source_view(x)`` adds into."""
        return buf.view(self.num_units, self.unit_size)

    def storage(self, x: torch.Tensor, workspace: "Workspace") -> torch.Tensor:
        """``x`` in storage form when nothing is kept (no residual): a view where possible."""
        return x.reshape(self.num_units, self.unit_size)

    def gather_units(self, buf: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The values ``(k, S)`` of units ``rows`` of a storage buffer (padded cells zero)."""
        return buf.view(self.num_units, self.unit_size).index_select(0, rows)

    def fill_units_(self, buf: torch.Tensor, rows: torch.Tensor, value: float = 0.0) -> None:
        buf.view(self.num_units, self.unit_size).index_fill_(0, rows, value)

    def sub_units_(self, buf: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """``buf[units rows] -= values`` (duplicate rows subtract twice)."""
        buf.view(self.num_units, self.unit_size).index_add_(
            0, rows, values.reshape(-1, self.unit_size), alpha=-1.0)

    def units_of(self, buf: torch.Tensor) -> torch.Tensor:
        """A storage buffer as the ``(U, S)`` unit matrix (a view where the layout allows)."""
        return buf.view(self.num_units, self.unit_size)

    def score_view(self, buf: torch.Tensor) -> torch.Tensor:
        """What the NSI reduces: ``(U, S)``, or ``(a, s, b, s)`` for tiles (``nsi.py``)."""
        return buf.view(self.num_units, self.unit_size)

    def from_legacy(self, buf: torch.Tensor) -> torch.Tensor:
        """A residual buffer saved by compression state format 1 (unit matrix) in storage
        form: the same for every layout but tiles."""
        return buf

    def valid_counts(self, device=None, dtype=torch.float32) -> torch.Tensor | None:
        """Number of real (non-padded) cells per unit, or None when every unit is full."""
        return None

    def element_index(self, rows: torch.Tensor):
        """Flat element indices ``(k, S)`` in the tensor of the units ``rows`` (cell order of
        ``to_units``), and a mask of the real cells (None: all real). Decoding scatters straight
        into the output with these instead of building a ``(U, S)`` matrix and copying it."""
        return rows.view(-1, 1), None

    def describe(self) -> str:
        return f"{self.kind}[{self.num_units}x{self.unit_size}]"


ElementLayout = Layout


class KernelLayout(Layout):
    """A (C_out, C_in, kh, kw) convolution weight with kh*kw > 1: one kernel = one unit."""

    kind = "kernel"

    def __init__(self, shape: torch.Size):
        super().__init__(shape)
        co, ci, kh, kw = self.shape
        self.num_units = co * ci
        self.unit_size = kh * kw


    def element_index(self, rows):
        cells = torch.arange(self.unit_size, device=rows.device)
        return rows.view(-1, 1) * self.unit_size + cells, None


class TileLayout(Layout):
    """``(shape[0], -1)`` matrix tiled into non-overlapping s x s patches, s = 2r+1."""

    kind = "tile"

    def __init__(self, shape: torch.Size, radius: int):
        super().__init__(shape)
        s = 2 * radius + 1
        self.s = s
        self.H = int(self.shape[0])
        self.W = self.numel // self.H
        self.Hp = -(-self.H // s) * s
        self.Wp = -(-self.W // s) * s
        self.num_units = (self.Hp // s) * (self.Wp // s)
        self.unit_size = s * s
        self.padded = (self.Hp, self.Wp) != (self.H, self.W)
        self._counts: torch.Tensor | None = None
        self._offsets: torch.Tensor | None = None
        self._memo: tuple[torch.Tensor, torch.Tensor] | None = None

    def to_units(self, x: torch.Tensor) -> torch.Tensor:
        m = x.reshape(self.H, self.W)
        if self.padded:
            m = F.pad(m, (0, self.Wp - self.W, 0, self.Hp - self.H))
        s = self.s
        return (m.reshape(self.Hp // s, s, self.Wp // s, s)
                .permute(0, 2, 1, 3).reshape(self.num_units, self.unit_size))

    def from_units(self, u: torch.Tensor) -> torch.Tensor:
        s = self.s
        m = u.reshape(self.Hp // s, self.Wp // s, s, s).permute(0, 2, 1, 3).reshape(self.Hp, self.Wp)
        if self.padded:
            m = m[: self.H, : self.W]
        return m.reshape(self.shape)

    @property
    def storage_shape(self):
        return (self.Hp, self.Wp)

    def source_view(self, x, workspace):
        return x.reshape(self.H, self.W)

    def target_view(self, buf):
        return buf.view(self.Hp, self.Wp)[: self.H, : self.W]

    def storage(self, x, workspace):
        """x as a zero-padded (Hp, Wp) matrix (staged in a workspace when padding is needed)."""
        m = x.reshape(self.H, self.W)
        if not self.padded:
            return m
        P = workspace.get("tile", self.Hp * self.Wp, x.device, x.dtype).view(self.Hp, self.Wp)
        P[: self.H, : self.W].copy_(m)
        P[self.H:, :].zero_()
        P[: self.H, self.W:].zero_()
        return P

    def _cells(self, rows):
        """(row, column) in the padded matrix of every cell of units ``rows``: (k, S) each."""
        s, tiles_w = self.s, self.Wp // self.s
        cells = torch.arange(self.unit_size, device=rows.device)
        r = (rows // tiles_w).view(-1, 1) * s + cells // s
        c = (rows % tiles_w).view(-1, 1) * s + cells % s
        return r, c

    def _storage_index(self, rows):
        """Flat storage index of every cell of units ``rows`` ((k*S,)): a unit's top-left
        corner plus the cells' fixed offsets. The last result is kept: one step gathers,
        then zeroes u and v of the same rows."""
        memo = self._memo
        if memo is not None and memo[0] is rows:
            return memo[1]
        s, tiles_w = self.s, self.Wp // self.s
        off = self._offsets
        if off is None or off.device != rows.device:
            cells = torch.arange(self.unit_size, device=rows.device)
            off = self._offsets = (cells // s) * self.Wp + cells % s
        corner = torch.div(rows, tiles_w, rounding_mode="floor").mul_(s * self.Wp) \
            .add_(rows.remainder(tiles_w).mul_(s))
        idx = (corner.view(-1, 1) + off).view(-1)
        self._memo = (rows, idx)
        return idx

    def gather_units(self, buf, rows):
        return buf.view(-1).index_select(0, self._storage_index(rows)).view(-1, self.unit_size)

    def fill_units_(self, buf, rows, value=0.0):
        buf.view(-1).index_fill_(0, self._storage_index(rows), value)

    def sub_units_(self, buf, rows, values):
        buf.view(-1).index_add_(0, self._storage_index(rows), values.reshape(-1), alpha=-1.0)

    def units_of(self, buf):
        s = self.s
        return (buf.view(self.Hp // s, s, self.Wp // s, s).permute(0, 2, 1, 3)
                .reshape(self.num_units, self.unit_size))

    def score_view(self, buf):
        s = self.s
        return buf.view(self.Hp // s, s, self.Wp // s, s)

    def from_legacy(self, buf):
        s = self.s
        return (buf.reshape(self.Hp // s, self.Wp // s, s, s).permute(0, 2, 1, 3)
                .reshape(self.Hp, self.Wp).contiguous())

    def element_index(self, rows):
        r, c = self._cells(rows)
        idx = r * self.W + c
        return idx, ((r < self.H) & (c < self.W)) if self.padded else None

    def valid_counts(self, device=None, dtype=torch.float32):
        if not self.padded:
            return None
        if self._counts is None or self._counts.device != torch.device(device or "cpu") \
                or self._counts.dtype != dtype:
            ones = torch.ones(self.shape, device=device, dtype=dtype)
            self._counts = self.to_units(ones).sum(1)
        return self._counts


class Workspace:
    """Scratch buffers shared by all tensors of one method (hooks run one at a time), grown on
    demand: temporaries on the hot path reuse memory instead of page-faulting fresh pages."""

    def __init__(self):
        self._bufs = {}
        self._kept = {}     # other cached tables (objects with nbytes()), counted in nbytes()

    def get(self, key, numel, device, dtype=torch.float32) -> torch.Tensor:
        k = (key, str(device), dtype)
        buf = self._bufs.get(k)
        if buf is None or buf.numel() < numel:
            buf = self._bufs[k] = torch.empty(numel, device=device, dtype=dtype)
        return buf[:numel]

    def keep(self, key, obj):
        """Cache ``obj`` (anything with ``nbytes()``) under ``key``, counted in :meth:`nbytes`."""
        self._kept[key] = obj
        return obj

    def kept(self, key):
        return self._kept.get(key)

    def drop(self, key) -> None:
        self._kept.pop(key, None)

    def nbytes(self) -> int:
        return (sum(b.numel() * b.element_size() for b in self._bufs.values())
                + sum(o.nbytes() for o in self._kept.values()))


def make_layout(shape, neighbourhood: bool, radius: int = 1) -> Layout:
    """Layout for one tensor. ``neighbourhood=False`` gives element units (plain top-k)."""
    shape = torch.Size(shape)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if not neighbourhood or len(shape) < 2 or radius == 0:
        return ElementLayout(shape)
    if len(shape) == 4 and shape[2] * shape[3] > 1:
        return KernelLayout(shape)
    return TileLayout(shape, radius)
