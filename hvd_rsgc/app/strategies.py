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


def build_compression(cfg, model):
    """The configured compressor. Options derived from the config that a compressor does not
    take are left out; every option the user named in ``compression_options`` must be taken
    (a misspelt one is an error naming it, on every backend)."""
    import hvd_rsgc
    c = cfg.compression
    explicit = dict(c.compression_options or {})
    if explicit:     # what make_compression would pass on (a variant's fixed keys are not)
        sp = hvd_rsgc.registry.spec(c.compression)
        known = set(sp.options()) - set(sp.defaults)
        bad = sorted(k for k in explicit if sp.aliases.get(k, k) not in known)
        if bad:
            raise ValueError(f"compression_options: {c.compression!r} does not take {bad}; "
                             f"it takes {sorted(known)}")
    return hvd_rsgc.make_compression(c.compression, model, ignore_unknown=True,
                                     **{**compression_options(cfg), **explicit})


def _loss_scaler(cfg, model, comp):
    """``amp fp16``: a GradScaler on the model's device, which the compressor's residuals
    follow (``set_grad_scaler``); None otherwise (bf16 needs no scaler)."""
    if cfg.optim.amp != "fp16":
        return None
    scaler = torch.amp.GradScaler(next(model.parameters()).device.type)
    comp.set_grad_scaler(scaler)
    return scaler


class AllreduceStrategy:
    name = "horovod"

    def __init__(self, cfg, model, hvd):
        import hvd_rsgc
        self.cfg, self.model, self.hvd = cfg, model, hvd
        self.comp = build_compression(cfg, model)
        o = cfg.optim
        base = hvd_rsgc.make_optimizer(self.comp, model.parameters(), lr=o.lr,
                                       momentum=o.momentum, weight_decay=o.weight_decay,
                                       nesterov=o.nesterov)
        groups = None
        if cfg.run.deterministic:             # fixed allreduce buffers (train.deterministic_setup)
            from ..horovod import deterministic
            groups = deterministic.groups(model)
        self.opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                            compression=self.comp, groups=groups)
        self.skip = cfg.compression.nonfinite == "skip"
        self.scaler = _loss_scaler(cfg, model, self.comp)
        self._bytes0 = self._dense0 = 0

    # -- the loop's steps -------------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        self.comp.set_epoch(epoch)
        st = self.comp.stats()
        self._bytes0, self._dense0 = st["total_bytes"], st["total_dense_bytes"]
        self._skipped0 = st["skipped_steps"]

    def backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def after_backward(self) -> None:
        pass

    def forward(self, x):
        return self.model(x)

    def step(self) -> None:
        if not self.skip:
            self.opt.step()
            return
        self.comp.synchronize(self.opt)
        if self.scaler is not None:           # skips the step itself on inf / NaN, backs off
            with self.opt.skip_synchronize():
                self.scaler.step(self.opt)
            self.scaler.update()
            return
        if self.comp.step_nonfinite:          # every rank agrees; no NaN reached any state
            self.opt.zero_grad()
            return
        with self.opt.skip_synchronize():
            self.opt.step()

    def epoch_bytes(self) -> tuple[int, int, int]:
        st = self.comp.stats()
        return (st["total_bytes"] - self._bytes0, st["total_dense_bytes"] - self._dense0,
                st["skipped_steps"] - self._skipped0)

    bn_default = 0          # running statistics, as PyTorch keeps them

    def bn_batches(self) -> int:
        n = self.cfg.run.bn_batches
        return self.bn_default if n is None else n

    @contextlib.contextmanager
    def evaluation_model(self, batches=None):
        """The model to evaluate is the trained one (identical on every rank); with
        ``bn_batches`` its BatchNorm statistics are re-estimated first (kept: training does
        not read them, and the checkpoint then holds what was evaluated)."""
        if batches is not None and self.bn_batches():
            recompute_batchnorm(self.model, batches(self.bn_batches()), self.hvd)
        yield None

    def exported_state(self) -> dict:
        """The model saved in the main checkpoint: the one that was evaluated."""
        return self.model.state_dict()

    # -- state ------------------------------------------------------------------------------
    def broadcast_initial(self, resumed: bool) -> None:
        self.hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        # resumed: every rank loaded the same optimizer state from the main checkpoint. And
        # Horovod initialises an empty state (momentum 0) with one step on zero gradients,
        # which with weight decay moves every parameter: once at the start of a run, not again
        # at each resume
        if not resumed:
            self.hvd.broadcast_optimizer_state(self.opt, root_rank=0)

    def shard_state(self) -> dict:
        out = {"compression": self.comp.state_dict()}
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load(self, main: dict, shard: dict) -> None:
        self.model.load_state_dict(main["model"])
        self.opt.load_state_dict(main["optimizer"])
        self.comp.load_state_dict(shard["compression"])
        if self.scaler is not None and "scaler" in shard:
            self.scaler.load_state_dict(shard["scaler"])


class DDPStrategy(AllreduceStrategy):
    """PyTorch DDP with the registered compressor as its comm hook (``--backend ddp``)."""

    name = "ddp"

    def __init__(self, cfg, model, hvd):
        import hvd_rsgc
        from hvd_rsgc.ddp.process import wrap_ddp
        self.cfg, self.model, self.hvd = cfg, model, hvd
        c, o = cfg.compression, cfg.optim
        self.comp = build_compression(cfg, model)
        self.ddp = wrap_ddp(model)
        self.ddp.register_comm_hook(state=self.comp, hook=hvd_rsgc.ddp_comm_hook)
        self.opt = hvd_rsgc.make_optimizer(self.comp, model.parameters(), lr=o.lr, momentum=o.momentum,
                                           weight_decay=o.weight_decay, nesterov=o.nesterov)
        self.skip = c.nonfinite == "skip"
        self.scaler = _loss_scaler(cfg, model, self.comp)

    def forward(self, x):
        return self.ddp(x)

    def step(self) -> None:
        if self.scaler is not None:           # skips the step itself on inf / NaN, backs off
            self.scaler.step(self.opt)
            self.scaler.update()
            return
        if self.skip and self.comp.step_nonfinite:      # the hook already ran in backward
            self.opt.zero_grad()
            return
        self.opt.step()

    def broadcast_initial(self, resumed: bool) -> None:
        self.hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)   # after a resume too


class GossipStrategy:
    name = "rdpsgd"
    bn_default = 4          # the average model has no statistics of its own
    bn_batches = AllreduceStrategy.bn_batches

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
        self.exported: dict | None = None       # the evaluated average model

    def begin_epoch(self, epoch: int) -> None:
        self._bytes0, self._rounds0 = self.rd.bytes_sent, self.rd.rounds

    def forward(self, x):
        return self.model(x)

    def backward(self, loss) -> None:
        loss.backward()

    def after_backward(self) -> None:
        self.rd.mix()          # x <- W x on a random subset; the gradient was taken before

    def step(self) -> None:
        self.opt.step()

    def epoch_bytes(self) -> tuple[int, int, int]:
        # dense D-PSGD: every round sends the whole fp32 vector to each neighbour
        dense = (self.rd.rounds - self._rounds0) * 4 * self.rd.numel * len(self.rd.neighbours)
        return self.rd.bytes_sent - self._bytes0, dense, 0

    @contextlib.contextmanager
    def evaluation_model(self, batches=None):
        """Evaluate the average model; yields the consensus distance. ``batches()``: this
        rank's training inputs that re-estimate the average model's BatchNorm statistics
        (:func:`recompute_batchnorm`); the local parameters and buffers come back afterwards."""
        avg = self.rd.average_parameters()
        self.consensus = self.rd.consensus_distance(avg)
        local = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        with torch.no_grad():
            for p, a in zip(self.model.parameters(), avg):
                p.copy_(a.to(p.device))
        if batches is not None and self.bn_batches():
            recompute_batchnorm(self.model, batches(self.bn_batches()), self.hvd)
        self.exported = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        try:
            yield self.consensus
        finally:
            self.model.load_state_dict(local)

    def exported_state(self) -> dict:
        """The average model as evaluated (the local models are in the shards)."""
        return self.exported if self.exported is not None else self.model.state_dict()

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


def recompute_batchnorm(model, batches, hvd) -> bool:
    """BatchNorm running statistics re-estimated for the model as it is now, from ``batches``
    (this rank's inputs) and pooled over the ranks: mean = mean of the ranks' means, variance
    = mean of (variance + mean^2) - mean^2. What SWA does after averaging weights
    (``torch.optim.swa_utils.update_bn``): an average of models that each kept their own
    statistics has statistics of its own -- with the ranks' averaged running statistics,
    RD-PSGD's average VGG-19 on the demo set predicted one class (top-1 0.205) where the same
    weights with re-estimated statistics scored 0.950. Only the BatchNorm layers run in
    training mode (dropout stays off, no random numbers are drawn). False if there is no
    BatchNorm layer."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    if not bns:
        return False
    was_training = model.training
    momenta = [m.momentum for m in bns]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    done = False
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None                 # cumulative average over the batches
            m.train()
        seen = 0
        with torch.no_grad():
            for x in batches:
                model(x)
                seen += 1
        total = int(hvd.allreduce(torch.tensor([seen]), op=hvd.Sum, name="hvd_rsgc.bn.batches"))
        if total == 0:
            raise ValueError("bn_batches: no training batch to re-estimate BatchNorm statistics from")
        for i, m in enumerate(bns):       # pooled, each rank weighted by its batches
            mean, var = m.running_mean.double(), m.running_var.double()
            st = torch.stack([mean, var + mean ** 2]) * seen
            st = hvd.allreduce(st, op=hvd.Sum, name=f"hvd_rsgc.bn.{i}") / total
            m.running_mean.copy_(st[0])
            m.running_var.copy_((st[1] - st[0] ** 2).clamp_(min=0))
        done = True
    finally:                              # on an error the model is as it was: statistics,
        for m, mom, sd in zip(bns, momenta, saved):     # momenta and mode
            m.momentum = mom
            if not done:
                m.load_state_dict(sd)
        model.train(was_training)
    return True


STRATEGIES = {"horovod": AllreduceStrategy, "ddp": DDPStrategy, "rdpsgd": GossipStrategy,
              "dpsgd": GossipStrategy}


def strategy_for(cfg):
    d = cfg.decentral
    return STRATEGIES["ddp" if d.algorithm == "horovod" and d.backend == "ddp" else d.algorithm]
