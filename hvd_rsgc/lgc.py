"""LGCCompression: Learned Gradient Compression through stock ``hvd.DistributedOptimizer``.

    compression = LGCCompression(model, mode="rar", density=0.001, warmup_steps=200, ae_steps=300)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(...momentum...), named_parameters=...,
                                         compression=compression)

Stages by step count (one step = one optimizer step):
1. ``step < warmup_steps``: top-k with error feedback under *common* indices (the leader's
   top-k of its accumulator, broadcast as K int32; every node sends its values at those
   indices; values averaged by allreduce).
2. ``warmup_steps <= step < warmup_steps + ae_steps``: the same, but the values are allgathered:
   every rank gets all nodes' vectors, trains the autoencoder one step on them (identically on
   every rank), and applies their exact mean. ``stats()["lgc"]["ae_loss"]`` shows the loss.
3. afterwards: compressed training with the autoencoder frozen.
   RAR: every node sends its code E(x_n) (about K/4 values) to an allreduce (mean) and every
   rank decodes D(mean code) -> the aggregate. The leader rotates each step.
   PS: the leader (fixed) sends its code E(x_L); every node sends its innovation (the
   ``innovation_density`` largest entries of its x_n, positions + values) as side information;
   every rank acts as the server: x^_n = D_n(E(x_L), side_n) for all n, and applies their mean.

Error feedback: every node zeroes its accumulator at the common indices after sending; the
reconstruction error is not fed back [choice; ALGORITHMS.md section 6]. Dense tensors (1-D,
small, excluded) go through the stock allreduce. Where this implementation comes from: see
``hvd_rsgc/algorithms/lgc.py``.

Mechanics: stock ``synchronize()`` calls every ``compress()`` of a step before the first
``decompress()``. ``compress()`` only accumulates and returns the 1-element health flag;
the first ``decompress()`` of a step runs the step's collectives (same order on every rank,
stable names ``hvd_rsgc.lgc.*``) for all compressed tensors at once and caches each tensor's
result.
"""
from __future__ import annotations

import math

import torch

from .adapter import HorovodCompression, _Ctx, _FLAG_NONFINITE, _FLAG_OK, _hvd, _check_density
from .algorithms.layout import Layout
from .algorithms.lgc import LGCAutoencoder, check_signal, side_dense, side_signal
from .algorithms.select import ceil_count, splitmix_seed


class LGCCompression(HorovodCompression):
    def __init__(self, model, mode: str = "rar", density: float = 0.001, *,
                 warmup_steps: int = 200, ae_steps: int = 300, innovation_density: float | None = None,
                 leader: int = 0, code_channels: int = 4, ae_lr: float = 1e-3,
                 sim_weight: float = 0.1, ae_updates: int = 4, replay: int = 32, min_numel: int = 1024, exclude=(), seed: int = 0,
                 average: bool = True, process_set=None):
        if mode not in ("ps", "rar"):
            raise ValueError(f"mode must be 'ps' or 'rar', got {mode!r}")
        _check_density("density", density)
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if not isinstance(ae_steps, int) or ae_steps < 1:
            raise ValueError(f"ae_steps must be an integer >= 1 (stage 2 is where the autoencoder "
                             f"gets its training data), got {ae_steps!r}")
        if innovation_density is not None:
            _check_density("innovation_density", innovation_density)
            if innovation_density >= density:
                raise ValueError("innovation_density must be smaller than density")
        super().__init__(model, method=None, density=density, min_numel=min_numel,
                         exclude=exclude, average=average, process_set=process_set)
        # which tensors go through LGC (the base class made everything dense: method=None)
        for name, p in self._params:
            self._sparse[id(p)] = self._eligible(name, p)
        self.sparse_layers = [st for (n, p), st in zip(self._params, self._layers) if self._sparse[id(p)]]
        for st in self.sparse_layers:
            st.layout = Layout(st.shape)
        if not self.sparse_layers:
            raise ValueError("LGC: no tensor is large enough to compress (lower min_numel)")
        if mode == "ps":
            try:
                if _hvd().is_initialized() and self._size() < 2:
                    raise ValueError("LGC-PS needs at least 2 ranks (a leader and side-information "
                                     f"nodes); this job has {self._size()}")
            except ImportError:
                pass
            if not 0 <= leader:
                raise ValueError(f"leader must be a rank >= 0, got {leader}")
        self.mode = mode
        self.ks = [max(1, ceil_count(density, st.numel)) for st in self.sparse_layers]
        self.K = sum(self.ks)
        self.code_size = check_signal(self.K) // 4 * code_channels
        self.k_inno = max(1, math.ceil(self.K * (innovation_density if innovation_density
                                                  else density / 10) / density))
        self.warmup_steps, self.ae_steps = warmup_steps, ae_steps
        self.leader = leader
        self.code_channels = code_channels
        self.sim_weight = sim_weight
        self.seed = seed
        self.ae_lr = ae_lr
        if not isinstance(ae_updates, int) or ae_updates < 1:
            raise ValueError(f"ae_updates must be an integer >= 1, got {ae_updates!r}")
        if not isinstance(replay, int) or replay < 1:
            raise ValueError(f"replay must be an integer >= 1, got {replay!r}")
        self.ae_updates, self.replay = ae_updates, replay
        self._buffer: list[torch.Tensor] = []
        self._ae = None
        self._ae_opt = None
        self._ae_loss: list[tuple[int, float]] = []
        self._synced_ae = False
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_step = -1
        self._stage_bytes = {1: 0, 2: 0, 3: 0}
        self._stage_steps = {1: 0, 2: 0, 3: 0}
        self._lgc_step = 0

    # ------------------------------------------------------------------ public
    def stage(self, step: int | None = None) -> int:
        s = self._lgc_step if step is None else step
        if s < self.warmup_steps:
            return 1
        return 2 if s < self.warmup_steps + self.ae_steps else 3

    def stats(self) -> dict:
        st = super().stats()
        st["lgc"] = {"mode": self.mode, "stage": self.stage(), "K": self.K, "code_size": self.code_size,
                     "k_inno": self.k_inno, "ae_loss": list(self._ae_loss),
                     "bytes_per_step_by_stage": {s: (self._stage_bytes[s] / self._stage_steps[s]
                                                     if self._stage_steps[s] else None) for s in (1, 2, 3)}}
        return st

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["lgc"] = {"step": self._lgc_step, "ae": self._autoencoder("cpu").state_dict(),
                     "ae_opt": self._ae_opt.state_dict(), "ae_loss": list(self._ae_loss),
                     "synced": self._synced_ae, "mode": self.mode, "K": self.K,
                     "replay": [b.detach().cpu().clone() for b in self._buffer],
                     "stage_bytes": dict(self._stage_bytes), "stage_steps": dict(self._stage_steps)}
        return sd

    def load_state_dict(self, state: dict) -> None:
        lg = state.get("lgc")
        if lg is None or lg.get("mode") != self.mode or lg.get("K") != self.K:
            raise ValueError("LGC state does not match this compressor (mode or signal length differ)")
        super().load_state_dict(state)
        self._lgc_step = int(lg["step"])
        ae = self._autoencoder("cpu")
        ae.load_state_dict(lg["ae"])
        self._ae_opt.load_state_dict(lg["ae_opt"])
        self._ae_loss = [tuple(x) for x in lg["ae_loss"]]
        self._synced_ae = bool(lg["synced"])
        dev = next(ae.parameters()).device
        self._buffer = [b.to(dev) for b in lg.get("replay", [])]
        self._stage_bytes = {int(k): v for k, v in lg["stage_bytes"].items()}
        self._stage_steps = {int(k): v for k, v in lg["stage_steps"].items()}

    # ------------------------------------------------------------------ Horovod interface
    def compress(self, tensor):
        p, st = self._find(tensor)
        ctx = _Ctx(name=st.name, pid=id(p), dtype=tensor.dtype)
        if not self._sparse[id(p)]:
            return self._compress_dense(tensor, st, ctx)
        v = st.memory.get("v")
        if v is None:
            v = st.memory["v"] = torch.zeros(st.numel, dtype=torch.float32, device=tensor.device)
        st.step += 1
        finite = bool(torch.isfinite(tensor.sum()))
        if finite:
            v.add_(tensor.reshape(-1).float())
        flag = torch.full((1,), _FLAG_OK if finite else _FLAG_NONFINITE, dtype=tensor.dtype,
                          device=tensor.device)
        ctx["kind"], ctx["bytes"] = "lgc", flag.numel() * flag.element_size()
        self._record(st, ctx, tensor)
        return flag, ctx

    def decompress(self, tensor, ctx):
        if ctx["kind"] != "lgc":
            return super().decompress(tensor, ctx)
        st = self._layer_of[ctx["pid"]]
        if float(tensor.reshape(-1)[0]) != _FLAG_OK:
            raise FloatingPointError(f"non-finite gradient for parameter '{st.name}' on at least one "
                                     f"rank (step {st.step}); it was not accumulated into the residual")
        if self._cache_step != st.step:
            self._run_step(st.step, tensor.device)
        return self._cache.pop(st.name).to(ctx["dtype"])

    # ------------------------------------------------------------------ the step
    def _autoencoder(self, device):
        if self._ae is None:
            P = self._size()
            if self.mode == "ps" and P < 2:
                raise ValueError("LGC-PS needs at least 2 ranks (a leader and side-information nodes)")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self._ae = LGCAutoencoder(P, self.mode, self.code_channels)
            self._ae_opt = torch.optim.Adam(self._ae.parameters(), lr=self.ae_lr)
        if next(self._ae.parameters()).device != torch.device(device):
            self._ae.to(device)
        return self._ae

    def _collect(self, kind, tensor, name, root=None):
        """Run one blocking collective and count this rank's bytes; at -np 1 (local mode) the
        tensor is its own result (for allgather it already carries the rank dimension)."""
        if self._local_mode:
            return tensor
        hvd = _hvd()
        ps = self._pset()
        if kind == "broadcast":
            out = hvd.broadcast(tensor, root_rank=root, name=name, process_set=ps)
            nbytes = tensor.numel() * tensor.element_size() if hvd.rank() == root else 0
        elif kind == "allreduce":
            out = hvd.allreduce(tensor, op=hvd.Average, name=name, process_set=ps)
            nbytes = tensor.numel() * tensor.element_size()
        else:
            out = hvd.allgather(tensor, name=name, process_set=ps)
            nbytes = tensor.numel() * tensor.element_size()
        self._step_bytes += nbytes
        return out

    def _run_step(self, step, device):
        self._cache_step = step
        self._step_bytes = 0
        s = self._lgc_step
        stage = self.stage(s)
        local = self._local_mode
        P = self._size()
        rank = 0 if local else _hvd().rank()
        ae = self._autoencoder(device)
        leader = (s % P) if self.mode == "rar" else self.leader
        if not 0 <= leader < P:
            raise ValueError(f"leader must be a rank in [0, {P}), got {leader}")
        # 1. common indices: the leader's top-k of each accumulator
        if rank == leader:
            idx = torch.cat([torch.topk(st.memory["v"].abs(), k, sorted=False).indices.sort().values
                             for st, k in zip(self.sparse_layers, self.ks)]).to(torch.int32)
        else:
            idx = torch.zeros(self.K, dtype=torch.int32, device=device)
        idx = self._collect("broadcast", idx, "hvd_rsgc.lgc.indices", root=leader)
        parts = torch.split(idx.long(), self.ks)
        # 2. this node's values there; error feedback: zero them in the accumulator
        x = torch.cat([st.memory["v"][i] for st, i in zip(self.sparse_layers, parts)])
        for st, i in zip(self.sparse_layers, parts):
            st.memory["v"][i] = 0.0
        # 3. a scale common to all nodes
        rms = (x.norm() / math.sqrt(self.K)).reshape(1)
        scale = self._collect("allreduce", rms, "hvd_rsgc.lgc.scale")
        scale = float(scale) if float(scale) > 0 else 1.0
        xn = x / scale
        if stage == 1:
            agg = self._collect("allreduce", xn, "hvd_rsgc.lgc.values")
        elif stage == 2:
            X = self._collect("allgather", xn.unsqueeze(0), "hvd_rsgc.lgc.train")
            agg = X.mean(0)
            self._train_ae(ae, X, step)
        else:
            if not self._synced_ae and not local:
                # every rank trained the same autoencoder on the same data; make it exact
                _hvd().broadcast_parameters(ae.state_dict(), root_rank=0)
            self._synced_ae = True
            ae.eval()
            with torch.no_grad():
                if self.mode == "rar":
                    z = ae.encoder(xn.unsqueeze(0))
                    zm = self._collect("allreduce", z, "hvd_rsgc.lgc.code")
                    agg = ae.reconstruct_rar(zm, self.K)[0]
                else:
                    z = ae.encoder(xn.unsqueeze(0)) if rank == leader else \
                        torch.zeros(1, self.code_channels, self.code_size // self.code_channels, device=device)
                    z = self._collect("broadcast", z, "hvd_rsgc.lgc.code", root=leader)
                    pos, vals = side_signal(xn, self.k_inno)
                    msg = torch.stack([vals, pos.view(torch.float32)], dim=1).unsqueeze(0)   # (1, k, 2)
                    allm = self._collect("allgather", msg, "hvd_rsgc.lgc.side")
                    sides = torch.stack([side_dense(m[:, 1].contiguous().view(torch.int32), m[:, 0], self.K)
                                         for m in allm])
                    agg = ae.reconstruct_ps(z, sides).mean(0)
        agg = agg * scale
        if not self.average:
            agg = agg * P
        # 4. back into each tensor's shape
        for st, i, a in zip(self.sparse_layers, parts, torch.split(agg, self.ks)):
            out = torch.zeros(st.numel, dtype=torch.float32, device=device)
            out[i] = a
            self._cache[st.name] = out.view(st.shape)
        self._stage_bytes[stage] += self._step_bytes + 4 * len(self.sparse_layers)
        self._stage_steps[stage] += 1
        self._totals["bytes"] += self._step_bytes
        self._last_step["hvd_rsgc.lgc"] = {"step": step, "bytes": self._step_bytes, "dense_bytes": 0,
                                           "sent_units": None}
        self._lgc_step += 1

    def _train_ae(self, ae, X, step):
        """``ae_updates`` Adam steps per iteration, each on the current nodes' vectors and one
        from a replay buffer of the last ``replay`` iterations [choice: one step per iteration
        on a non-stationary signal barely moves the autoencoder in a few hundred steps].
        The loss logged is the one on the current vectors, before this iteration's updates."""
        ae.train()
        self._buffer.append(X.detach())
        self._buffer = self._buffer[-self.replay:]
        P = X.shape[0]
        g = torch.Generator().manual_seed(splitmix_seed(self.seed, step))

        def loss_on(Xb):
            if self.mode == "rar":
                return ae.loss_rar(Xb, self.sim_weight)
            sides = torch.stack([side_dense(*side_signal(Xb[n], self.k_inno), self.K) for n in range(P)])
            c = int(torch.randint(0, P, (1,), generator=g))
            return ae.loss_ps(Xb, sides, c)

        with torch.enable_grad():
            for u in range(self.ae_updates):
                j = int(torch.randint(0, len(self._buffer), (1,), generator=g))
                batch = [X] if u == 0 else [X, self._buffer[j]]
                self._ae_opt.zero_grad()
                loss = sum(loss_on(b) for b in batch) / len(batch)
                loss.backward()
                if u == 0:
                    self._ae_loss.append((self._lgc_step, float(loss.detach())))
                self._ae_opt.step()
