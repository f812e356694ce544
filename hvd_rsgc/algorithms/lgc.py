"""Learned Gradient Compression (Abrahamyan, Chen, Bekoulis, Deligiannis, IEEE TNNLS 2021,
arXiv 2103.08870), pure tensor parts: the autoencoder, its losses, the side information.

Provenance (see docs/ALGORITHMS.md section 6). From the paper (abstract/summary): gradients
of different nodes are correlated; a lightweight autoencoder trained during the first stages of
training captures their common information; two instances, parameter server (PS) and
ring-allreduce (RAR). The full text could not be retrieved here, so the rest follows an
unofficial public re-implementation [LGC-code] or is our documented choice [choice]:

* signal: top-k (ratio r_g) of each compressed tensor's error-feedback accumulator under
  *common* indices, concatenated into one vector x of length K [LGC-code];
* encoder: Conv1d(1,64,3,s2) -> Conv1d(64,128,3,s2) -> Conv1d(128,256,3,s2) ->
  Conv1d(256,64,3,s2) -> Conv1d(64,4,1), LeakyReLU after each, no padding [LGC-code]: a code of
  4 x L4 values, L_{j+1} = floor((L_j - 3)/2) + 1, about K/4;
* decoder: ConvTranspose1d(4,32,3,s2) -> (32,64) -> (64,128) -> (128,32), LeakyReLU, linear
  interpolation to K, then (PS) concatenated with the 1-channel side signal, Conv1d(.,1,1)
  [LGC-code]; PS has one decoder per node, RAR one shared decoder;
* losses: PS 0.5*L_rec + 0.5*L_sim with L_rec = sum_n MSE(x_n, D_n(E(x_c), side_n)) for a random
  node c and L_sim = sum_{i != j} MSE(E(x_i), E(x_j)) [LGC-code]; RAR
  MSE(D(mean_n E(x_n)), mean_n x_n) + lambda * L_sim [choice];
* inputs are divided by a scale common to all nodes (the mean RMS, one allreduced float) so
  that the autoencoder sees O(1) values [choice]; Adam, lr 1e-3, one step per iteration [choice:
  the re-implementation uses SGD, which barely moves on gradient-sized values];
* side information for PS: the k_inno largest-magnitude entries of each node's x_n, as
  positions in [0, K) and values, zeros elsewhere [choice, cleaner than packing them in top-k
  order].
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def code_length(K: int) -> int:
    L = K
    for _ in range(4):
        L = (L - 3) // 2 + 1
    return L


def check_signal(K: int, code_size_limit_ratio: float = 1.0, code_channels: int = 4) -> int:
    """The code (``code_channels`` x L4 values) must be smaller than the K values it replaces."""
    L4 = code_length(K)
    if L4 < 1 or code_channels * L4 >= K * code_size_limit_ratio:
        raise ValueError(f"LGC: the code ({code_channels} x {max(L4, 0)} values) is not smaller than "
                         f"the k = {K} top-k values it would replace: raise density (r_g), compress "
                         "more tensors or lower code_channels")
    return code_channels * L4


class Encoder(nn.Module):
    def __init__(self, code_channels: int = 4):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(1, 64, 3, 2), nn.Conv1d(64, 128, 3, 2),
                                    nn.Conv1d(128, 256, 3, 2), nn.Conv1d(256, 64, 3, 2)])
        self.out = nn.Conv1d(64, code_channels, 1)

    def forward(self, x):               # x: (B, K) -> (B, C, L4)
        h = x.unsqueeze(1)
        for c in self.convs:
            h = F.leaky_relu(c(h))
        return self.out(h)


class Decoder(nn.Module):
    def __init__(self, code_channels: int = 4, side: bool = False):
        super().__init__()
        self.deconvs = nn.ModuleList([nn.ConvTranspose1d(code_channels, 32, 3, 2),
                                      nn.ConvTranspose1d(32, 64, 3, 2),
                                      nn.ConvTranspose1d(64, 128, 3, 2),
                                      nn.ConvTranspose1d(128, 32, 3, 2)])
        self.side = side
        self.out = nn.Conv1d(32 + (1 if side else 0), 1, 1)

    def forward(self, z, K: int, side_signal=None):   # z: (B, C, L4) -> (B, K)
        h = z
        for d in self.deconvs:
            h = F.leaky_relu(d(h))
        h = F.interpolate(h, size=K, mode="linear", align_corners=False)
        if self.side:
            h = torch.cat([h, side_signal.unsqueeze(1)], dim=1)
        return self.out(h).squeeze(1)


class LGCAutoencoder(nn.Module):
    """One shared encoder; one decoder (RAR) or one per node (PS)."""

    def __init__(self, nodes: int, mode: str, code_channels: int = 4):
        super().__init__()
        if mode not in ("ps", "rar"):
            raise ValueError(f"mode must be 'ps' or 'rar', got {mode!r}")
        self.mode = mode
        self.encoder = Encoder(code_channels)
        n_dec = nodes if mode == "ps" else 1
        self.decoders = nn.ModuleList([Decoder(code_channels, side=(mode == "ps")) for _ in range(n_dec)])

    # ------------------------------------------------------------------ losses (stage 2)
    def loss_rar(self, X: torch.Tensor, sim_weight: float = 0.1) -> torch.Tensor:
        """X: (P, K) normalised values of every node under common indices."""
        Z = self.encoder(X)
        rec = self.decoders[0](Z.mean(0, keepdim=True), X.shape[1])
        loss = F.mse_loss(rec, X.mean(0, keepdim=True))
        return loss + sim_weight * similarity(Z)

    def loss_ps(self, X: torch.Tensor, sides: torch.Tensor, c: int) -> torch.Tensor:
        Z = self.encoder(X)
        zc = Z[c:c + 1]
        rec = sum(F.mse_loss(self.decoders[n](zc, X.shape[1], sides[n:n + 1]), X[n:n + 1])
                  for n in range(X.shape[0]))
        return 0.5 * rec + 0.5 * similarity(Z)

    # ------------------------------------------------------------------ stage 3
    @torch.no_grad()
    def reconstruct_rar(self, z_mean: torch.Tensor, K: int) -> torch.Tensor:
        return self.decoders[0](z_mean, K)

    @torch.no_grad()
    def reconstruct_ps(self, z_leader: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
        K = sides.shape[1]
        return torch.cat([self.decoders[n](z_leader, K, sides[n:n + 1]) for n in range(sides.shape[0])])


def similarity(Z: torch.Tensor) -> torch.Tensor:
    """sum_{i != j} MSE(Z_i, Z_j) over nodes, vectorised (pairwise squared distances)."""
    P = Z.shape[0]
    if P < 2:
        return Z.sum() * 0
    flat = Z.reshape(P, -1)
    d = torch.cdist(flat, flat).square() / flat.shape[1]
    return d.sum()


def side_signal(x: torch.Tensor, k_inno: int):
    """(positions int32 (k_inno,), values (k_inno,)) of the largest |x| entries, and the dense
    length-K side signal holding them (zeros elsewhere)."""
    k = max(1, min(k_inno, x.numel()))
    pos = torch.topk(x.abs(), k, sorted=False).indices.sort().values
    return pos.to(torch.int32), x[pos]


def side_dense(pos: torch.Tensor, vals: torch.Tensor, K: int) -> torch.Tensor:
    out = torch.zeros(K, dtype=vals.dtype, device=vals.device)
    out[pos.long()] = vals
    return out


# ----------------------------------------------------------------------------- the method
class LGC:
    """LGC as a multi-round method: ``accumulate`` per tensor (error-feedback accumulator),
    then one ``run`` per step over a :class:`~hvd_rsgc.transport.Transport` for all compressed
    tensors at once. Stages by step count:

    1. ``step < warmup_steps``: top-k under *common* indices (the leader's top-k of its
       accumulators, broadcast as K int32); every node's values there averaged by allreduce.
    2. ``warmup_steps <= step < warmup_steps + ae_steps``: the same values allgathered; every
       rank trains the autoencoder identically on them and applies their exact mean.
    3. afterwards, autoencoder frozen. RAR: codes E(x_n) allreduced (mean), every rank decodes.
       PS: the leader's code broadcast, every node's innovation allgathered as side
       information, every rank reconstructs each node's vector and averages.

    Error feedback: every node zeroes its accumulator at the common indices after sending; the
    reconstruction error is not fed back [choice]. Collective names ``hvd_rsgc.lgc.*``.
    """

    name = "lgc"
    rounds = "multi"
    momentum_correction = False
    communicator = "rounds"

    def __init__(self, mode: str, density: float, *, warmup_steps: int, ae_steps: int,
                 innovation_density: float | None, leader: int, code_channels: int,
                 ae_lr: float, sim_weight: float, ae_updates: int, replay: int, seed: int):
        from .layout import Workspace
        self.mode, self.density = mode, density
        self.warmup_steps, self.ae_steps = warmup_steps, ae_steps
        self.innovation_density = innovation_density
        self.leader, self.code_channels = leader, code_channels
        self.ae_lr, self.sim_weight = ae_lr, sim_weight
        self.ae_updates, self.replay, self.seed = ae_updates, replay, seed
        self.workspace = Workspace()
        self.ks: list[int] = []
        self.K = self.code_size = self.k_inno = 0
        self.ae: LGCAutoencoder | None = None
        self.ae_opt: Any = None             # Adam, made with the autoencoder
        self.buffer: list[torch.Tensor] = []
        self.ae_loss: list[tuple[int, float]] = []
        self.synced = False
        self.step = 0
        self.stage_bytes = {1: 0, 2: 0, 3: 0}
        self.stage_steps = {1: 0, 2: 0, 3: 0}

    # -- Method hooks the engine uses -------------------------------------------------------
    def make_layout(self, shape):
        from .layout import Layout
        return Layout(shape)

    def units_for(self, layer, density):
        from .select import ceil_count
        return max(1, ceil_count(self.density, layer.numel))

    def on_density(self, layer):
        pass

    def init_memory(self, layer, device):
        layer.memory = {"v": torch.zeros(layer.numel, dtype=torch.float32, device=device)}

    def rng_state(self):
        return {}

    def load_rng_state(self, state):
        pass

    def setup(self, numels: list[int]) -> None:
        """Signal length from the compressed tensors' sizes (called once by the compressor)."""
        import math

        from .select import ceil_count
        self.ks = [max(1, ceil_count(self.density, n)) for n in numels]
        self.K = sum(self.ks)
        self.code_size = check_signal(self.K, code_channels=self.code_channels)
        ratio = self.innovation_density if self.innovation_density else self.density / 10
        self.k_inno = max(1, math.ceil(self.K * ratio / self.density))

    def stage(self, step: int | None = None) -> int:
        s = self.step if step is None else step
        if s < self.warmup_steps:
            return 1
        return 2 if s < self.warmup_steps + self.ae_steps else 3

    def accumulate(self, layer, g: torch.Tensor) -> None:
        layer.memory["v"].add_(g.reshape(-1).float())

    def autoencoder(self, nodes: int, device) -> LGCAutoencoder:
        ae = self.ae
        if ae is None:
            if self.mode == "ps" and nodes < 2:
                raise ValueError("LGC-PS needs at least 2 ranks (a leader and side-information nodes)")
            # the CPU generator alone (it initialises the weights, built on the CPU):
            # torch.manual_seed would reseed every CUDA generator too, restarting the caller's
            # dropout streams, and forking those would initialise CUDA in a CPU run
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(self.seed)
                ae = self.ae = LGCAutoencoder(nodes, self.mode, self.code_channels)
            self.ae_opt = torch.optim.Adam(ae.parameters(), lr=self.ae_lr)
        if next(ae.parameters()).device != torch.device(device):
            # with everything that belongs to it: a state loaded on the CPU (load_state_dict)
            # and trained on a GPU had Adam's moments and the replay buffer left on the CPU
            ae.to(device)
            for st in self.ae_opt.state.values():
                for key, val in st.items():
                    if isinstance(val, torch.Tensor) and key != "step":    # Adam keeps step on the CPU
                        st[key] = val.to(device)
            self.buffer = [b.to(device) for b in self.buffer]
        return ae

    # -- one step -------------------------------------------------------------------------
    def run(self, layers, transport, average: bool, step: int) -> list[torch.Tensor]:
        """All rounds of one step; returns each layer's aggregated gradient (its shape)."""
        import math
        device = layers[0].memory["v"].device
        meter = transport.meter
        bytes0 = meter.totals["bytes"] if meter is not None else 0
        s, stage, P, rank = self.step, self.stage(), transport.size, transport.rank
        ae = self.autoencoder(P, device)
        leader = (s % P) if self.mode == "rar" else self.leader
        if not 0 <= leader < P:
            raise ValueError(f"leader must be a rank in [0, {P}), got {leader}")
        key = "hvd_rsgc.lgc"
        # 1. common indices: the leader's top-k of each accumulator
        if rank == leader:
            idx = torch.cat([torch.topk(st.memory["v"].abs(), k, sorted=False).indices.sort().values
                             for st, k in zip(layers, self.ks)]).to(torch.int32)
        else:
            idx = torch.zeros(self.K, dtype=torch.int32, device=device)
        idx = transport.broadcast(idx, leader, "hvd_rsgc.lgc.indices", key=key)
        parts = torch.split(idx.long(), self.ks)
        # 2. this node's values there; error feedback: zero them in the accumulator
        x = torch.cat([st.memory["v"][i] for st, i in zip(layers, parts)])
        for st, i in zip(layers, parts):
            st.memory["v"][i] = 0.0
        # 3. a scale common to all nodes
        rms = (x.norm() / math.sqrt(self.K)).reshape(1)
        scale = transport.allreduce(rms, "hvd_rsgc.lgc.scale", key=key)
        scale = float(scale) if float(scale) > 0 else 1.0
        xn = x / scale
        if stage == 1:
            agg = transport.allreduce(xn, "hvd_rsgc.lgc.values", key=key)
        elif stage == 2:
            X = transport.allgather(xn.unsqueeze(0), "hvd_rsgc.lgc.train", key=key)
            agg = X.mean(0)
            self._train(ae, X, step)
        else:
            if not self.synced and P > 1:
                # every rank trained the same autoencoder on the same data: compare a 24-byte
                # signature, and broadcast rank 0's weights only where they differ (e.g. a
                # non-deterministic GPU kernel)
                flat = torch.cat([t.reshape(-1).double() for _, t in sorted(ae.state_dict().items())])
                pos = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
                sig = torch.stack([flat.sum(), (flat * flat).sum(), (flat * pos).sum()]).unsqueeze(0)
                sigs = transport.allgather(sig, "hvd_rsgc.lgc.ae.signature", key=key)
                if not bool((sigs == sigs[0]).all()):
                    for name, t in sorted(ae.state_dict().items()):
                        t.copy_(transport.broadcast(t, 0, f"hvd_rsgc.lgc.ae.{name}", key=key))
            self.synced = True
            ae.eval()
            with torch.no_grad():
                if self.mode == "rar":
                    z = ae.encoder(xn.unsqueeze(0))
                    zm = transport.allreduce(z, "hvd_rsgc.lgc.code", key=key)
                    agg = ae.reconstruct_rar(zm, self.K)[0]
                else:
                    z = ae.encoder(xn.unsqueeze(0)) if rank == leader else \
                        torch.zeros(1, self.code_channels, self.code_size // self.code_channels,
                                    device=device)
                    z = transport.broadcast(z, leader, "hvd_rsgc.lgc.code", key=key)
                    pos, vals = side_signal(xn, self.k_inno)
                    msg = torch.stack([vals, pos.view(torch.float32)], dim=1).unsqueeze(0)
                    allm = transport.allgather(msg, "hvd_rsgc.lgc.side", key=key)
                    sides = torch.stack([side_dense(m[:, 1].contiguous().view(torch.int32), m[:, 0],
                                                    self.K) for m in allm])
                    agg = ae.reconstruct_ps(z, sides).mean(0)
        agg = agg * scale
        if not average:
            agg = agg * P
        outs = []
        for st, i, a in zip(layers, parts, torch.split(agg, self.ks)):
            out = torch.zeros(st.numel, dtype=torch.float32, device=device)
            out[i] = a
            outs.append(out.view(st.shape))
        step_bytes = (meter.totals["bytes"] - bytes0) if meter is not None else 0
        self.stage_bytes[stage] += step_bytes + 4 * len(layers)
        self.stage_steps[stage] += 1
        self.step += 1
        return outs

    def _train(self, ae, X, step):
        """``ae_updates`` Adam steps per iteration, each on the current nodes' vectors and one
        from a replay buffer of the last ``replay`` iterations [choice: one step per iteration
        on a non-stationary signal barely moves the autoencoder in a few hundred steps].
        The loss logged is the one on the current vectors, before this iteration's updates."""
        from .select import splitmix_seed
        ae.train()
        self.buffer.append(X.detach())
        self.buffer = self.buffer[-self.replay:]
        P = X.shape[0]
        g = torch.Generator().manual_seed(splitmix_seed(self.seed, step))

        def loss_on(Xb):
            if self.mode == "rar":
                return ae.loss_rar(Xb, self.sim_weight)
            sides = torch.stack([side_dense(pos, vals, self.K)
                                 for pos, vals in (side_signal(Xb[n], self.k_inno) for n in range(P))])
            c = int(torch.randint(0, P, (1,), generator=g))
            return ae.loss_ps(Xb, sides, c)

        with torch.enable_grad():
            for u in range(self.ae_updates):
                j = int(torch.randint(0, len(self.buffer), (1,), generator=g))
                batch = [X] if u == 0 else [X, self.buffer[j]]
                self.ae_opt.zero_grad()
                loss = sum(loss_on(b) for b in batch) / len(batch)
                loss.backward()
                if u == 0:
                    self.ae_loss.append((self.step, float(loss.detach())))
                self.ae_opt.step()

    # -- state ----------------------------------------------------------------------------
    def state_dict(self, nodes: int) -> dict:
        here = next(self.ae.parameters()).device if self.ae is not None else "cpu"   # not moved
        return {"step": self.step, "ae": self.autoencoder(nodes, here).state_dict(),
                "ae_opt": self.ae_opt.state_dict(), "ae_loss": list(self.ae_loss),
                "synced": self.synced, "mode": self.mode, "K": self.K,
                "replay": [b.detach().cpu().clone() for b in self.buffer],
                "stage_bytes": dict(self.stage_bytes), "stage_steps": dict(self.stage_steps)}

    def check_state(self, lg, nodes: int) -> None:
        """Refuse a state that :meth:`load_state_dict` could not load whole, before anything is
        changed (the caller checks the engine's part too, then loads both)."""
        if not isinstance(lg, dict) or lg.get("mode") != self.mode or lg.get("K") != self.K:
            raise ValueError("LGC state does not match this compressor (mode or signal length differ)")
        missing = [k for k in ("step", "ae", "ae_opt", "ae_loss", "synced", "stage_bytes",
                               "stage_steps") if k not in lg]
        if missing:
            raise ValueError(f"LGC state lacks {missing}")
        here = next(self.ae.parameters()).device if self.ae is not None else "cpu"
        want = {k: tuple(v.shape) for k, v in self.autoencoder(nodes, here).state_dict().items()}
        got = {k: tuple(v.shape) for k, v in lg["ae"].items()}
        if want != got:
            diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
            raise ValueError(f"LGC state's autoencoder does not match this one (another rank "
                             f"count or code_channels?): {diff[:4]}")
        if len(lg["ae_opt"].get("param_groups", ())) != len(self.ae_opt.param_groups):
            raise ValueError("LGC state's autoencoder optimizer does not match this one")

    def load_state_dict(self, lg: dict, nodes: int) -> None:
        self.check_state(lg, nodes)
        self.step = int(lg["step"])
        ae = self.autoencoder(nodes, "cpu")
        ae.load_state_dict(lg["ae"])
        self.ae_opt.load_state_dict(lg["ae_opt"])
        self.ae_loss = [tuple(x) for x in lg["ae_loss"]]
        self.synced = bool(lg["synced"])
        dev = next(ae.parameters()).device
        self.buffer = [b.to(dev) for b in lg.get("replay", [])]
        self.stage_bytes = {int(k): v for k, v in lg["stage_bytes"].items()}
        self.stage_steps = {int(k): v for k, v in lg["stage_steps"].items()}
