"""PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019): rank-r approximation by one step of
subspace (power) iteration per training step, warm-started, with error feedback.

Each compressed tensor is an n x m matrix M (a conv weight (C_out, C_in, kh, kw) reshaped to
(C_out, C_in*kh*kw), a linear weight as it is). With the residual e (zero at the start) and
Q (m x r) kept between steps (warm start; initially i.i.d. normal from a generator seeded by
(seed, tensor index), so identical on every rank):

    M = e + g                                    (error feedback; without it M = g)
    P = M Q;          P = allreduce_mean(P)      (round 1: every tensor's P in one buffer)
    P = orthonormal basis of span(P)             (reduced QR: columns orthonormal)
    Q = M^T P;        Q = allreduce_mean(Q)      (round 2: every tensor's Q in one buffer)
    out = P Q^T;      e = M - out;   Q kept for the next step

``out`` equals P P^T mean_r(M_r), the projection of the ranks' average onto span(P), and is
the same on every rank (it is computed from allreduced values only). ``e`` is each rank's own
``M`` minus that common approximation (the paper's Algorithm 2). ``op=Sum`` multiplies ``out``
by the number of ranks (the residual still uses the mean).

r is ``min(rank, n, m)``. A matrix for which the factors are not smaller than the matrix,
``r*(n + m) >= n*m``, is sent exactly inside the round-1 buffer (4nm bytes, no residual).
The first ``start_step`` steps send every compressed tensor exactly, in one allreduce (the
PyTorch DDP hook's ``start_powerSGD_iter``; default 0: compress from the first step).

Bytes per compressed tensor per rank per step: ``4*r*(n + m)`` (fp32 P and Q), in two
allreduces per step for all tensors together (``hvd_rsgc.powersgd.p`` / ``.q``).
Orthogonalisation: Householder QR (``torch.linalg.qr``) rather than the paper's Gram-Schmidt,
which loses orthogonality on (nearly) rank-deficient P; any orthonormal basis of span(P)
gives the same ``out``.
"""
from __future__ import annotations

import torch

from .layout import Layout, Workspace
from .select import splitmix_seed

KEY = "hvd_rsgc.powersgd"


def matrix_shape(shape) -> tuple[int, int]:
    """(n, m): the tensor reshaped to (shape[0], -1)."""
    shape = torch.Size(shape)
    n = int(shape[0]) if len(shape) else 1
    numel = int(shape.numel())
    return n, (numel // n if n else 0)


def effective_rank(shape, rank: int) -> int:
    n, m = matrix_shape(shape)
    return min(rank, n, m)


def is_compressible(shape, rank: int) -> bool:
    """The factors (r*(n + m) values) are smaller than the matrix (n*m values)."""
    n, m = matrix_shape(shape)
    r = effective_rank(shape, rank)
    return r >= 1 and r * (n + m) < n * m


def wire_bytes(shape, rank: int) -> int:
    """Bytes this tensor contributes per step (4r(n+m), or 4nm when sent exactly)."""
    n, m = matrix_shape(shape)
    return 4 * effective_rank(shape, rank) * (n + m) if is_compressible(shape, rank) else 4 * n * m


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (n x r) of the column span of p (n x r, n >= r)."""
    return torch.linalg.qr(p, mode="reduced").Q


def initial_q(shape, rank: int, seed: int, index: int, device=None) -> torch.Tensor:
    """The warm-start Q of step 0: (m x r) standard normal, the same on every rank."""
    _, m = matrix_shape(shape)
    gen = torch.Generator().manual_seed(splitmix_seed(seed, index))
    q = torch.randn(m, effective_rank(shape, rank), generator=gen)
    return q.to(device) if device is not None else q


class PowerSGD:
    """A multi-round method: ``accumulate`` per tensor, one ``run`` per step over a
    :class:`~hvd_rsgc.transport.Transport` for all compressed tensors (see ``lgc.LGC``)."""

    name = "powersgd"
    rounds = "multi"
    communicator = "rounds"
    momentum_correction = False

    def __init__(self, rank: int = 4, *, start_step: int = 0, seed: int = 0,
                 error_feedback: bool = True):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0, got {start_step!r}")
        self.rank = rank
        self.start_step = start_step
        self.seed = int(seed)
        self.error_feedback = bool(error_feedback)
        self.workspace = Workspace()
        self._fresh: set[int] = set()      # tensors accumulated since the last run

    # -- Method hooks the engine uses -------------------------------------------------------
    def make_layout(self, shape):
        return Layout(shape)

    def units_for(self, layer, density):
        """fp32 values sent per step: r*(n + m), or n*m for a tensor sent exactly."""
        return wire_bytes(layer.shape, self.rank) // 4

    def on_density(self, layer):
        pass

    def init_memory(self, layer, device):
        layer.memory = {"e": torch.zeros(layer.numel, dtype=torch.float32, device=device)}
        if is_compressible(layer.shape, self.rank):
            layer.memory["q"] = initial_q(layer.shape, self.rank, self.seed, layer.index, device)

    def rng_state(self):
        return {}

    def load_rng_state(self, state):
        pass

    # -- one step -------------------------------------------------------------------------
    def accumulate(self, layer, g: torch.Tensor) -> None:
        layer.memory["e"].add_(g.reshape(-1).float())
        self._fresh.add(layer.index)

    def run(self, layers, transport, average: bool, step: int) -> list[torch.Tensor]:
        """Both rounds of one step; returns each layer's aggregated gradient (its shape).
        ``step``: 1-based count of this tensor's steps (the first ``start_step`` go exact)."""
        fresh, self._fresh = self._fresh, set()
        Ms = [st.memory["e"].view(matrix_shape(st.shape)) for st in layers]
        if step <= self.start_step:
            flat = torch.cat([M.reshape(-1) for M in Ms])
            mean = transport.allreduce(flat, f"{KEY}.warmup", op="average", key=KEY)
            outs = [a.view(M.shape) for a, M in zip(torch.split(mean, [M.numel() for M in Ms]), Ms)]
            for st in layers:
                if st.index in fresh:
                    st.memory["e"].zero_()
        else:
            outs = self._power_step(layers, Ms, fresh, transport)
        world = transport.size
        return [(o if average or world == 1 else o * world).reshape(st.shape)
                for o, st in zip(outs, layers)]

    def _power_step(self, layers, Ms, fresh, transport) -> list[torch.Tensor]:
        low = [i for i, st in enumerate(layers) if "q" in st.memory]
        exact = [i for i in range(len(layers)) if "q" not in layers[i].memory]
        # round 1: P = M Q for the low-rank tensors, M itself for the others
        parts = [(Ms[i] @ layers[i].memory["q"]) for i in low] + [Ms[i] for i in exact]
        sizes = [t.numel() for t in parts]
        buf = transport.allreduce(torch.cat([t.reshape(-1) for t in parts]), f"{KEY}.p",
                                  op="average", key=KEY)
        chunks = torch.split(buf, sizes)
        outs: list[torch.Tensor | None] = [None] * len(layers)
        for j, i in enumerate(exact):
            outs[i] = chunks[len(low) + j].view(Ms[i].shape).clone()
        if low:
            Ps = [orthonormalize(chunks[j].view(Ms[i].shape[0], -1)) for j, i in enumerate(low)]
            # round 2: Q = M^T P
            qs = [Ms[i].t() @ P for i, P in zip(low, Ps)]
            qbuf = transport.allreduce(torch.cat([q.reshape(-1) for q in qs]), f"{KEY}.q",
                                       op="average", key=KEY)
            for j, (i, P, q) in enumerate(zip(low, Ps, torch.split(qbuf, [q.numel() for q in qs]))):
                q = q.view(qs[j].shape)
                layers[i].memory["q"].copy_(q)                 # warm start for the next step
                outs[i] = P @ q.t()
        result = []
        for i, st in enumerate(layers):
            out = outs[i]
            assert out is not None
            if st.index in fresh:
                e = st.memory["e"]
                if self.error_feedback and "q" in st.memory:
                    e.sub_(out.reshape(-1))                    # e = M - out
                else:
                    e.zero_()
            result.append(out)
        return result
