"""Training strategies: how the workers of a run combine their work. The loop (``train.py``)
calls the same steps for each, so it has no per-strategy branches.

* :class:`AllreduceStrategy` -- Horovod's ``DistributedOptimizer`` with a registered
  compressor (``--algorithm horovod``, the default).
* :class:`DDPStrategy` -- PyTorch DDP with the compressor as its comm hook (``--backend ddp``,
  launched with ``torchrun``).
* :class:`GossipStrategy` -- decentralized RD-PSGD / D-PSGD over MPI: every node keeps its
  own model, mixes a random parameter subset with its ring neighbours after backward and
  takes a local SGD step; evaluation uses the average model.
"""
from __future__ import annotations

import contextlib

import torch


def _sgd(model, o):
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum,
                           weight_decay=o.weight_decay, nesterov=o.nesterov)


def compression_options(cfg) -> dict:
    """The compression section (and momentum/seed) as keyword options for the registry; each
    compressor takes the options it understands. Unset (None) options keep the compressor's
    own default."""
    c, o = cfg.compression, cfg.optim
    opts = {k: v for k, v in vars(c).items()
            if k not in ("compression", "compression_options") and v is not None}
    opts["exclude"] = tuple(c.exclude or ())
    opts.update(momentum=o.momentum, nesterov=o.nesterov, seed=cfg.run.seed)
    if c.compression_warmup_epochs:
        opts["warmup_epochs"] = c.compression_warmup_epochs
        opts["steps_per_epoch"] = 0            # driven by set_epoch()
    opts.pop("compression_warmup_epochs", None)
    if c.qsgd_levels is not None:
        opts["levels"] = opts.pop("qsgd_levels")
    if c.qsgd_bucket is not None:
        opts["bucket_size"] = opts.pop("qsgd_bucket")
    for key in ("lgc_warmup_steps", "lgc_ae_steps", "lgc_innovation_density"):
        if key in opts:
            opts[key[4:]] = opts.pop(key)
    return opts


class AllreduceStrategy:
    name = "horovod"

    def __init__(self, cfg, model, hvd):
        import hvd_rsgc
        self.cfg, self.model, self.hvd = cfg, model, hvd
        c = cfg.compression
        options = compression_options(cfg)
        explicit = dict(c.compression_options or {})
        self.comp = hvd_rsgc.make_compression(c.compression, model, ignore_unknown=True,
                                              **{**options, **explicit})
        if explicit:       # options named by the user must all be understood
            known = set(hvd_rsgc.registry.spec(c.compression).options())
            bad = sorted(set(explicit) - known)
            if bad:
                raise ValueError(f"compression_options: {c.compression!r} does not take {bad}; "
                                 f"it takes {sorted(known)}")
        o = cfg.optim
        base = hvd_rsgc.make_optimizer(self.comp, model.parameters(), lr=o.lr,
                                       momentum=o.momentum, weight_decay=o.weight_decay,
                                       nesterov=o.nesterov)
        self.opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                            compression=self.comp)
        self.skip = c.nonfinite == "skip"
        self._bytes0 = self._dense0 = 0

    # -- the loop's steps -------------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        self.comp.set_epoch(epoch)
        st = self.comp.stats()
        self._bytes0, self._dense0 = st["total_bytes"], st["total_dense_bytes"]
        self._skipped0 = st["skipped_steps"]

    def after_backward(self) -> None:
        pass

    def forward(self, x):
        return self.model(x)

    def step(self) -> None:
        if not self.skip:
            self.opt.step()
            return
        self.comp.synchronize(self.opt)
        if self.comp.step_nonfinite:          # every rank agrees; the state was not touched
            self.opt.zero_grad()
            return
        with self.opt.skip_synchronize():
            self.opt.step()

    def epoch_bytes(self) -> tuple[int, int, int]:
        st = self.comp.stats()
        return (st["total_bytes"] - self._bytes0, st["total_dense_bytes"] - self._dense0,
                st["skipped_steps"] - self._skipped0)

    @contextlib.contextmanager
    def evaluation_model(self):
        yield None

    # -- state ------------------------------------------------------------------------------
    def broadcast_initial(self, resumed: bool) -> None:
        self.hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        self.hvd.broadcast_optimizer_state(self.opt, root_rank=0)

    def shard_state(self) -> dict:
        return {"compression": self.comp.state_dict()}

    def load(self, main: dict, shard: dict) -> None:
        self.model.load_state_dict(main["model"])
        self.opt.load_state_dict(main["optimizer"])
        self.comp.load_state_dict(shard["compression"])


class DDPStrategy(AllreduceStrategy):
    """PyTorch DDP with the registered compressor as its comm hook (``--backend ddp``)."""

    name = "ddp"

    def __init__(self, cfg, model, hvd):
        import hvd_rsgc
        from hvd_rsgc.ddp.process import wrap_ddp
        self.cfg, self.model, self.hvd = cfg, model, hvd
        c, o = cfg.compression, cfg.optim
        self.comp = hvd_rsgc.make_compression(c.compression, model, ignore_unknown=True,
                                              **{**compression_options(cfg), **(c.compression_options or {})})
        self.ddp = wrap_ddp(model)
        self.ddp.register_comm_hook(state=self.comp, hook=hvd_rsgc.ddp_comm_hook)
        self.opt = hvd_rsgc.make_optimizer(self.comp, model.parameters(), lr=o.lr, momentum=o.momentum,
                                           weight_decay=o.weight_decay, nesterov=o.nesterov)
        self.skip = c.nonfinite == "skip"

    def forward(self, x):
        return self.ddp(x)

    def step(self) -> None:
        if self.skip and self.comp.step_nonfinite:      # the hook already ran in backward
            self.opt.zero_grad()
            return
        self.opt.step()

    def broadcast_initial(self, resumed: bool) -> None:
        self.hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)   # after a resume too


class GossipStrategy:
    name = "rdpsgd"

    def __init__(self, cfg, model, hvd):
        import hvd_rsgc
        from hvd_rsgc.mpi import world_size
        from hvd_rsgc.rdpsgd import RDPSGD
        world = hvd.size()
        if world_size() != world:
            raise ValueError("algorithm rdpsgd/dpsgd exchanges parameters over MPI: launch with "
                             "mpirun or horovodrun --mpi (this job's MPI world has "
                             f"{world_size()} process(es), Horovod {world})")
        d = cfg.decentral
        self.cfg, self.model, self.hvd = cfg, model, hvd
        self.comp = hvd_rsgc.NoneCompression(model)      # state only (checkpoint format)
        self.rd = RDPSGD(model, sparsity_ratio=1.0 if d.algorithm == "dpsgd" else d.sparsity_ratio,
                         sync_every=d.sync_every, send_indices=d.send_indices,
                         seed=cfg.run.seed, timeout=d.rd_timeout)
        self.opt = _sgd(model, cfg.optim)
        self.consensus = None

    def begin_epoch(self, epoch: int) -> None:
        self._bytes0, self._rounds0 = self.rd.bytes_sent, self.rd.rounds

    def forward(self, x):
        return self.model(x)

    def after_backward(self) -> None:
        self.rd.mix()          # x <- W x on a random subset; the gradient was taken before

    def step(self) -> None:
        self.opt.step()

    def epoch_bytes(self) -> tuple[int, int, int]:
        # dense D-PSGD: every round sends the whole fp32 vector to each neighbour
        dense = (self.rd.rounds - self._rounds0) * 4 * self.rd.numel * len(self.rd.neighbours)
        return self.rd.bytes_sent - self._bytes0, dense, 0

    @contextlib.contextmanager
    def evaluation_model(self):
        """Evaluate the average model; yields the consensus distance."""
        avg = self.rd.average_parameters()
        self.consensus = self.rd.consensus_distance(avg)
        local = [p.detach().clone() for p in self.model.parameters()]
        with torch.no_grad():
            for p, a in zip(self.model.parameters(), avg):
                p.copy_(a.to(p.device))
        try:
            yield self.consensus
        finally:
            with torch.no_grad():
                for p, v in zip(self.model.parameters(), local):
                    p.copy_(v)

    def broadcast_initial(self, resumed: bool) -> None:
        if not resumed:          # decentralized nodes keep their own models on resume
            self.hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
            self.hvd.broadcast_optimizer_state(self.opt, root_rank=0)

    def shard_state(self) -> dict:
        return {"compression": self.comp.state_dict(), "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "rdpsgd": self.rd.state_dict()}

    def load(self, main: dict, shard: dict) -> None:
        self.model.load_state_dict(shard["model"])
        self.opt.load_state_dict(shard["optimizer"])
        self.comp.load_state_dict(shard["compression"])
        self.rd.load_state_dict(shard["rdpsgd"])


STRATEGIES = {"horovod": AllreduceStrategy, "ddp": DDPStrategy, "rdpsgd": GossipStrategy,
              "dpsgd": GossipStrategy}


def strategy_for(cfg):
    d = cfg.decentral
    return STRATEGIES["ddp" if d.algorithm == "horovod" and d.backend == "ddp" else d.algorithm]
