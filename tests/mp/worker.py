"""Multi-process scenarios, launched for real by tests/test_horovod.py with ``horovodrun``.

Every rank writes ``<out>/rank<r>.json``; the pytest side makes the assertions. Scenarios:
``train``   every compressor through the stock ``hvd.DistributedOptimizer``: N steps on a
            learnable synthetic task, ``zero_grad(set_to_none=True)``; per step the bytes this
            rank submitted to Horovod (intercepted), the library's own count, the model's
            parameters gathered from all ranks (bit-identity), eval loss before/after.
``equiv``   density=1, no momentum correction / error feedback vs ``hvd.Compression.none``.
``bpps``    backward_passes_per_step=2.
``nonfinite`` a NaN gradient on one rank: every rank must raise FloatingPointError, residual clean.
``momentum``  SGD(momentum) next to a momentum-correcting compressor: error on every rank.
``die``     rank 1 exits in the middle of training (the launcher must end the job).
"""
import argparse
import hashlib
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import horovod.torch as hvd  # noqa: E402

import hvd_rsgc  # noqa: E402
import accumulators  # noqa: E402
from wirecount import WireCounter  # noqa: E402

DENSITY = 0.02
MIN_NUMEL = 100


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)      # 432 weights
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)     # 4608 weights
        self.proj = nn.Conv2d(32, 32, 1)                 # 1x1 conv: tiled units
        self.fc = nn.Linear(32 * 4 * 4, 10)              # 5120 weights: tiled units

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.proj(x))
        return self.fc(x.flatten(1))


def make_data(seed, n):
    """Learnable synthetic task: 10 class prototypes (same on every rank) + noise."""
    protos = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = protos[y] + 1.5 * torch.randn(n, 3, 8, 8, generator=g)
    return x, y


def compressor(kind, model, density=DENSITY, **kw):
    """``kind+fused``: the bucketed path explicitly; plain kinds: the compressor's default."""
    kind, _, suffix = kind.partition("+")
    if suffix == "fused":
        kw.setdefault("fused", True)
    elif suffix == "perlayer":                  # the per-tensor reference path
        kw.setdefault("fused", False)
    elif suffix == "rs":                        # the sparse reduce-scatter
        kw.setdefault("communicator", "reduce_scatter")
    common = dict(min_numel=MIN_NUMEL)
    if kind == "none":
        return hvd_rsgc.NoneCompression(model, **kw)
    if kind == "fp16":
        return hvd_rsgc.FP16Compression(model, **kw)
    if kind == "topk":
        return hvd_rsgc.TopKCompression(model, density=density, **common, **kw)
    if kind == "randomk":
        return hvd_rsgc.RandomKCompression(model, density=density, **common, **kw)
    if kind == "dgc":
        return hvd_rsgc.DGCCompression(model, density=density, **common, **kw)
    if kind == "qsgd":
        return hvd_rsgc.QSGDCompression(model, **common, **kw)
    if kind == "qsgd_ef":                       # with error feedback: a dense residual
        return hvd_rsgc.QSGDCompression(model, error_feedback=True, **common, **kw)
    if kind == "efsignsgd":
        return hvd_rsgc.EFSignSGDCompression(model, **common, **kw)
    if kind == "rsdgc":
        return hvd_rsgc.RSDGCCompression(model, density=density, update_every=5, **common, **kw)
    if kind == "rsdgc_fp16":
        return hvd_rsgc.RSDGCCompression(model, density=DENSITY, fp16_values=True, **common, **kw)
    if kind == "rsdgc_int8":
        return hvd_rsgc.RSDGCCompression(model, density=DENSITY, int8_values=True, **common, **kw)
    if kind == "lgc":
        return hvd_rsgc.LGCCompression(model, density=0.1, warmup_steps=3, ae_steps=4, **common, **kw)
    raise ValueError(kind)


def optimizer_for(kind, model, comp, lr=0.05, **kw):
    if isinstance(comp, (hvd_rsgc.DGCCompression, hvd_rsgc.RSDGCCompression)) and comp.momentum > 0:
        base = hvd_rsgc.DGCSGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    else:
        base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    return hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                    compression=comp, **kw)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def identical_across_ranks(model):
    flat = flat_params(model)
    allp = hvd.allgather(flat.unsqueeze(0), name="test.params")
    return bool(all(torch.equal(allp[0], allp[i]) for i in range(allp.shape[0])))


def eval_loss(model, x, y):
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y).item()
    model.train()
    return loss


def train(kind, steps, counter, batch=32, options=None):
    torch.manual_seed(0)                                # same init on every rank
    model = Net()
    opts = {k: v for k, v in (options or {}).items() if k != "dump"}
    if kind in ("topk", "dgc", "rsdgc", "rsdgc_fp16", "rsdgc_int8"):
        # plain sparse kinds: the per-tensor reference path, whose wire format (one allgather
        # per tensor) the per-tensor byte checks verify; "+fused" kinds: the bucketed default
        opts.setdefault("fused", False)
    comp = compressor(kind, model, **opts)
    # 1-bit QSGD (s=1, bucket 512) has variance up to sqrt(512)x the gradient's: smaller lr
    opt = optimizer_for(kind, model, comp, lr=0.01 if kind == "qsgd" else 0.05)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    x, y = make_data(100 + hvd.rank(), steps * batch)
    ex, ey = make_data(999, 512)
    loss0 = eval_loss(model, ex, ey)
    counter.take()
    per_step = []
    for s in range(steps):
        xb, yb = x[s * batch:(s + 1) * batch], y[s * batch:(s + 1) * batch]
        opt.zero_grad()                       # torch default: set_to_none=True
        grads_none = all(p.grad is None for p in model.parameters())
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        wire = counter.take()
        st = comp.stats()
        per_step.append({"wire": {n: b for n, (k, b) in wire.items()},
                         "kinds": {n: k for n, (k, b) in wire.items()},
                         "alltoall_own": counter.last_own,
                         "lib_step_bytes": st["step_bytes"], "grads_none": grads_none})
    same = identical_across_ranks(model)
    counter.take()
    st = comp.stats()
    return {
        "identical": same, "loss0": loss0, "loss1": eval_loss(model, ex, ey),
        "steps": per_step,
        "shapes": {n: list(p.shape) for n, p in model.named_parameters()},
        "compressed": comp.compressed_names,
        "layers": {n: {"density": r["density"], "units": r["units"], "unit_size": r["unit_size"]}
                   for n, r in st["layers"].items()},
        "ratio": st["compression_ratio"],
        "collective": st.get("collective"),
        "params_sha": hashlib.sha256(flat_params(model).numpy().tobytes()).hexdigest(),
        "params": flat_params(model).tolist() if options and options.get("dump") else None,
        "memory_finite": all(torch.isfinite(v).all().item()
                             for lay in comp.state_dict()["layers"].values()
                             for v in lay["memory"].values()),
    }


def equivalence(steps=8):
    """density=1, momentum 0, no error feedback: every sparsifier must reproduce plain dense.
    Also through the stock optimizer's grouped path (groups=2) and with op=hvd.Sum."""
    out = {}
    ref = None
    kinds = ["none", "topk", "randomk", "dgc", "rsdgc", "rsdgc@groups", "none@sum", "topk@sum"]
    for variant in kinds:
        kind, _, how = variant.partition("@")
        torch.manual_seed(0)
        model = Net()
        extra = {"error_feedback": False}
        if kind in ("dgc", "rsdgc"):
            extra["momentum"] = 0.0
        if how == "sum":
            extra["average"] = False
        if kind == "none":
            comp = hvd.Compression.none
        else:
            comp = compressor(kind, model, density=1.0, **extra)
        # op=Sum doubles the step at 2 ranks: halve the lr so the reference stays the same
        base = torch.optim.SGD(model.parameters(), lr=0.05 / (hvd.size() if how == "sum" else 1),
                               momentum=0.9)
        kw = {"groups": 2} if how == "groups" else {"op": hvd.Sum} if how == "sum" else {}
        opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                       compression=comp, **kw)
        x, y = make_data(200 + hvd.rank(), steps * 16)
        for s in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x[s * 16:(s + 1) * 16]), y[s * 16:(s + 1) * 16]).backward()
            opt.step()
        flat = flat_params(model)
        if ref is None:
            ref = flat
        out[variant] = {"max_abs_diff": (flat - ref).abs().max().item(),
                     "ref_scale": ref.abs().max().item(),
                     "identical": identical_across_ranks(model)}
    return out


def bpps():
    torch.manual_seed(0)
    model = Net()
    comp = compressor("rsdgc", model)
    base = hvd_rsgc.DGCSGD(model.parameters(), lr=0.05)
    opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                   compression=comp, backward_passes_per_step=2)
    x, y = make_data(300 + hvd.rank(), 8 * 16)

    def two_passes_a_step(model, opt):
        for s in range(4):
            opt.zero_grad()
            for h in range(2):
                i = (2 * s + h) * 16
                F.cross_entropy(model(x[i:i + 16]), y[i:i + 16]).backward()
            opt.step()
    two_passes_a_step(model, opt)
    steps = {e.name: e.layer.step for e in comp.engine.table}
    # density 1, no memory: the compressors must give what Horovod's own accumulation of the
    # two passes gives (one that compressed only the last pass's gradient would not)
    ref, diff = None, {}
    for kind in ("none", "topk", "rsdgc", "rsdgc+fused"):
        name, _, fused = kind.partition("+")
        torch.manual_seed(0)
        m = Net()
        extra = {"momentum": 0.0} if name == "rsdgc" else {}
        c = hvd.Compression.none if name == "none" else compressor(
            name, m, density=1.0, error_feedback=False, fused=bool(fused), **extra)
        o = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
                                     named_parameters=m.named_parameters(), compression=c,
                                     backward_passes_per_step=2)
        two_passes_a_step(m, o)
        flat = flat_params(m)
        ref = flat if ref is None else ref
        diff[kind] = {"max_abs_diff": (flat - ref).abs().max().item(), "ref_scale": ref.abs().max().item()}
    return {"identical": identical_across_ranks(model), "compress_calls": steps, "dense_equiv": diff}


def missing_grad():
    """A branch used only on rank 0 and only on even steps: on the other steps/ranks its
    parameters have no gradient (Horovod submits zeros for them in synchronize())."""
    def run(explicit_zeros):
        torch.manual_seed(0)
        model = Net()
        model.branch = torch.nn.Linear(10, 10)       # 110 params, compressed with min_numel=100
        comp = compressor("rsdgc", model)
        opt = optimizer_for("rsdgc", model, comp)
        x, y = make_data(500 + hvd.rank(), 6 * 16)
        for s in range(6):
            opt.zero_grad()
            out = model(x[s * 16:(s + 1) * 16])
            if hvd.rank() == 0 and s % 2 == 0:
                out = model.branch(out)
            F.cross_entropy(out, y[s * 16:(s + 1) * 16]).backward()
            if explicit_zeros:                       # the twin: zeros given by hand
                for p in model.branch.parameters():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            opt.step()
        return model, comp
    model, comp = run(False)
    twin, twin_comp = run(True)
    mem = comp.state_dict()["layers"]["branch.weight"]["memory"]
    twin_mem = twin_comp.state_dict()["layers"]["branch.weight"]["memory"]
    return {"identical": identical_across_ranks(model), "steps": comp.engine.table.of(model.branch.weight).layer.step,
            "compressed": "branch.weight" in comp.compressed_names,
            # a missing gradient is a zero one: the same parameters and residuals, bit for bit
            "as_zeros": torch.equal(flat_params(model), flat_params(twin))
            and mem.keys() == twin_mem.keys() and all(torch.equal(v, twin_mem[k]) for k, v in mem.items())}


def nonfinite():
    torch.manual_seed(0)
    model = Net()
    comp = compressor("rsdgc", model)
    opt = optimizer_for("rsdgc", model, comp)
    x, y = make_data(400 + hvd.rank(), 3 * 16)
    raised = []
    for s in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[s * 16:(s + 1) * 16]), y[s * 16:(s + 1) * 16])
        if s == 2 and hvd.rank() == 1:
            loss = loss * float("nan")          # NaN gradients on rank 1 only, during backward
        loss.backward()
        try:
            opt.step()
        except FloatingPointError as e:
            raised.append(str(e))
    finite = all(torch.isfinite(v).all().item() for lay in comp.state_dict()["layers"].values()
                 for v in lay["memory"].values())
    return {"raised": raised, "memory_finite": finite,
            "params_finite": bool(torch.isfinite(flat_params(model)).all())}


def nonfinite_skip(kind):
    """nonfinite="skip": rank 1 gets a NaN gradient on step 2; every rank must see
    step_nonfinite, skip that step, keep its state finite and go on training in step.
    ``kind@conv2``: only conv2.weight's gradient holds NaN (a tensor hook), the rest is finite:
    in a bucket, its flag row is all the other rank learns it from. A multi-round method (LGC)
    must not run its rounds that step: ``kept``, its accumulators then hold what they held plus
    this rank's finite gradients of the step (nothing sent and thrown away); ``rounds``, the
    steps whose rounds ran."""
    kind, _, only = kind.partition("@")
    torch.manual_seed(0)
    model = Net()
    comp = compressor(kind, model, nonfinite="skip")
    opt = optimizer_for(kind, model, comp)
    x, y = make_data(450 + hvd.rank(), 6 * 16)
    skipped, nan_grad, kept, back = [], True, None, None
    multi = getattr(comp.method, "rounds", "single") == "multi"
    bad = [getattr(model, only).weight] if only else list(model.parameters())
    for s in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[s * 16:(s + 1) * 16]), y[s * 16:(s + 1) * 16])
        hooks = []
        if s == 2 and hvd.rank() == 1:
            if only:
                hooks.append(getattr(model, only).weight.register_hook(lambda g: g * float("nan")))
            else:
                loss = loss * float("nan")
        if multi and s == 2:         # after the NaN hook: the gradient compress() is given
            acc, caught, more = accumulators.watch(comp, dict(model.named_parameters()))
            hooks += more
        if s == 2 and not multi:     # the state and raw gradients around the skipped step
            before, raw = comp.state_dict(), {}
            hooks += [p.register_hook(lambda g, n=n, raw=raw: raw.__setitem__(n, g.detach().clone()))
                      for n, p in model.named_parameters()]
        loss.backward()
        for h in hooks:
            h.remove()
        comp.synchronize(opt)
        if multi and s == 2:
            kept = accumulators.kept(comp, acc, caught)
        if comp.step_nonfinite:
            skipped.append(s)
            if not multi:
                back = accumulators.given_back(comp, before, comp.state_dict(), raw)
            # the contract: every rank gets NaN for the tensor(s) of that step, whatever its
            # own gradient was (rank 0's was finite)
            nan_grad = nan_grad and all(bool(torch.isnan(p.grad).all()) for p in bad)
            opt.zero_grad()
            continue
        with opt.skip_synchronize():
            opt.step()
    mem = [v for lay in comp.state_dict()["layers"].values() for v in lay["memory"].values()]
    return {"skipped": skipped, "nan_grad": nan_grad, "identical": identical_across_ranks(model),
            "params_finite": bool(torch.isfinite(flat_params(model)).all()),
            "memory_finite": all(bool(torch.isfinite(v).all()) for v in mem),
            "stats_skipped": comp.stats()["skipped_steps"], "kept": kept, "given_back": back,
            "rounds": comp.method.step if multi else None}


def loss_scaled(kind, steps=8):
    """Mixed precision's loss scaling (``torch.amp.GradScaler``, here on fp32 CPU tensors: the
    scaling, its overflow skips and its growth are the same) against the same run unscaled.
    Rank 1's loss is NaN at step 3 in both runs: the scaler skips that step and halves its
    scale, the plain run skips it through ``step_nonfinite``; the scale doubles after every
    two good steps. Loss scaling by powers of two is exact, so with the compressor's buffers
    following the scale (``set_grad_scaler``) the parameters must equal the unscaled run's
    bit for bit; ``scales``: the scale at each step (it must have moved both ways)."""
    def run(scaled):
        torch.manual_seed(0)
        model = Net()
        comp = compressor(kind, model, nonfinite="skip")
        opt = optimizer_for(kind, model, comp)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2) \
            if scaled else None
        if scaled:
            comp.set_grad_scaler(scaler)
        x, y = make_data(470 + hvd.rank(), steps * 16)
        scales, skipped = [], []
        for s in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[s * 16:(s + 1) * 16]), y[s * 16:(s + 1) * 16])
            if s == 3 and hvd.rank() == 1:
                loss = loss * float("nan")
            (scaler.scale(loss) if scaled else loss).backward()
            comp.synchronize(opt)
            if comp.step_nonfinite:
                skipped.append(s)
            if scaled:
                scales.append(scaler.get_scale())
                with opt.skip_synchronize():
                    scaler.step(opt)         # skips the step itself when a gradient is not finite
                scaler.update()
            elif comp.step_nonfinite:
                opt.zero_grad()
            else:
                with opt.skip_synchronize():
                    opt.step()
        return flat_params(model), scales, skipped, comp.state_dict()
    plain, _, skipped_plain, _ = run(False)
    scaled, scales, skipped, state = run(True)
    return {"equal": torch.equal(plain, scaled), "scales": scales, "skipped": skipped,
            "skipped_plain": skipped_plain, "saved_scale": state["loss_scale"]}


def fp16_large_gradients(kind="fp16"):
    """Finite fp16 gradients whose fp16 sum overflows (4.0 x 100,000 elements): no alarm.
    ``randomk``: fp16 values scaled by n/k = 1000 without error feedback, 40000 per rank, which
    fit fp16 but whose sum over the ranks does not."""
    model = torch.nn.Linear(1000, 100)
    if kind == "randomk":
        comp = hvd_rsgc.RandomKCompression(model, density=0.001, fp16_values=True, error_feedback=False)
    else:
        comp = hvd_rsgc.FP16Compression(model)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(), compression=comp)
    model(torch.ones(4 if kind == "fp16" else 40, 1000)).sum().backward()
    try:
        opt.step()
        return {"error": None, "params_finite": bool(torch.isfinite(flat_params(model)).all())}
    except FloatingPointError as e:
        return {"error": str(e)}


def sparse_gradient():
    """nn.Embedding(sparse=True): Horovod sends its gradient around the compressor; every rank
    must stop with an error that says so (not a TypeError from inside Horovod)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(200, 16, sparse=True), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 4, 10))
    comp = hvd_rsgc.TopKCompression(model, density=0.1, min_numel=100)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(), compression=comp)
    x = torch.randint(0, 200, (8, 4))
    F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    try:
        opt.step()
        return {"error": None}
    except TypeError as e:
        return {"error": str(e)}


def sparse_as_dense():
    """hvd.DistributedOptimizer(sparse_as_dense=True) hands the compressor p.grad.to_dense(), a
    new tensor: it must be compressed as that parameter's gradient (it used to be refused as
    "belongs to no parameter"), giving exactly what a dense-gradient twin of the model gets."""
    out = {}
    for sparse in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(200, 16, sparse=sparse), torch.nn.Flatten(),
                                    torch.nn.Linear(16 * 4, 10))
        comp = hvd_rsgc.DGCCompression(model, density=0.1, min_numel=100)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters(), compression=comp,
                                       sparse_as_dense=sparse)
        g = torch.Generator().manual_seed(hvd.rank())
        for _ in range(3):
            opt.zero_grad()
            x = torch.randint(0, 200, (8, 4), generator=g)
            F.cross_entropy(model(x), torch.randint(0, 10, (8,), generator=g)).backward()
            opt.step()
        out[sparse] = (flat_params(model), identical_across_ranks(model), comp.compressed_names)
    # not bit for bit: torch's sparse and dense embedding backward sum repeated indices in
    # different orders (1 ulp on the embedding's gradient, with no compressor at all)
    return {"identical": out[True][1], "max_diff_dense_twin": float((out[True][0] - out[False][0]).abs().max()),
            "compressed": out[True][2]}


def momentum_error():
    torch.manual_seed(0)
    model = Net()
    comp = compressor("dgc", model)
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                   compression=comp)
    x, y = make_data(1, 16)
    F.cross_entropy(model(x), y).backward()
    try:
        opt.step()
        return {"error": None}
    except ValueError as e:
        opt.synchronize()                 # drain this step's collectives before moving on
        return {"error": str(e)}


def die():
    torch.manual_seed(0)
    model = Net()
    comp = compressor("rsdgc", model)
    opt = optimizer_for("rsdgc", model, comp)
    x, y = make_data(1, 16)
    for s in range(1000):
        if s == 3 and hvd.rank() == 1:
            os._exit(3)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenarios", default="train,equiv,bpps,missing,nonfinite,momentum")
    ap.add_argument("--kinds", default="none,fp16,topk,randomk,dgc,qsgd,rsdgc,rsdgc_fp16,"
                                       "rsdgc_int8,topk+fused,dgc+fused,rsdgc+fused,"
                                       "rsdgc_int8+fused")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--options", default="{}", help="JSON: extra compressor options (train)")
    args = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    counter = WireCounter().install()
    res = {"size": hvd.size(), "rank": hvd.rank()}
    scen = args.scenarios.split(",")
    if "die" in scen:
        die()
    if "train" in scen:
        opts = json.loads(args.options)
        res["train"] = {k: train(k, args.steps, counter, options=opts) for k in args.kinds.split(",")}
    if "equiv" in scen:
        res["equiv"] = equivalence()
    if "bpps" in scen:
        res["bpps"] = bpps()
    if "missing" in scen:
        res["missing"] = missing_grad()
    if "momentum" in scen:
        res["momentum"] = momentum_error()
    if "skip" in scen:
        res["skip"] = {k: nonfinite_skip(k) for k in ("rsdgc", "topk", "randomk", "fp16",
                                                      "rsdgc@conv2", "dgc@fc", "topk+perlayer@fc",
                                                      "rsdgc+rs@conv2", "qsgd_ef@fc", "efsignsgd@fc",
                                                      "lgc@conv2", "lgc@bn1")}
    if "amp" in scen:
        res["amp"] = {k: loss_scaled(k) for k in ("rsdgc", "dgc", "topk+perlayer", "randomk")}
    if "sparse_as_dense" in scen:
        res["sparse_as_dense"] = sparse_as_dense()
    if "fp16big" in scen:
        res["fp16big"] = fp16_large_gradients()
        res["fp16big_randomk"] = fp16_large_gradients("randomk")
    if "nonfinite" in scen:           # last: leaves the optimizer mid-step
        res["nonfinite"] = nonfinite()
    if "sparse" in scen:              # alone: leaves the optimizer mid-step
        res["sparse"] = sparse_gradient()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
