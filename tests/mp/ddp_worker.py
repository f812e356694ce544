"""DDP scenarios under a real ``torchrun`` (Gloo), launched by tests/test_ddp.py. Every rank
writes ``<out>/rank<r>.json``. Bytes are counted by wrapping torch.distributed's collective
functions (what the library hands to torch.distributed), not by the library's own meter."""
import argparse
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accumulators  # noqa: E402

import hvd_rsgc  # noqa: E402

MIN_NUMEL = 100
OPTS = {"topk": {"density": 0.05}, "randomk": {"density": 0.05}, "dgc": {"density": 0.05},
        "rsdgc": {"density": 0.05, "update_every": 5}, "qsgd": {}, "none": {}, "fp16": {},
        "lgc-rar": {"density": 0.1, "warmup_steps": 3, "ae_steps": 4},
        "lgc-ps": {"density": 0.1, "warmup_steps": 3, "ae_steps": 4},
        "powersgd": {"rank": 2}, "signsgd": {}, "efsignsgd": {}, "terngrad": {}, "natural": {},
        "threshold": {"threshold": 0.005}}
VARIANTS = {"rsdgc-int8": ("rsdgc", {"int8_values": True}),    # kind -> (registry name, options)
            # the per-tensor reference path of the bucketed defaults
            "topk-pt": ("topk", {"fused": False}), "dgc-pt": ("dgc", {"fused": False}),
            "rsdgc-pt": ("rsdgc", {"fused": False}), "rsdgc-nobias": ("rsdgc", {}),
            "rsdgc-rs": ("rsdgc", {"communicator": "reduce_scatter"})}
LR = {"signsgd": 0.002}           # signSGD's step is +-lr per element


class Net(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=bias)
        self.fc1 = nn.Linear(16 * 4 * 4, 64, bias=bias)
        self.fc2 = nn.Linear(64, 10, bias=bias)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def make_data(seed, n):
    protos = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return protos[y] + 1.0 * torch.randn(n, 3, 8, 8, generator=g), y


class Counter:
    """Bytes this rank hands to torch.distributed collectives (input tensors; all_gather of a
    padded tensor counts the padding)."""

    def __init__(self):
        self.bytes = 0
        self.on = False
        for fn in ("all_reduce", "all_gather", "broadcast", "all_to_all_single"):
            orig = getattr(dist, fn)

            def wrap(*a, _orig=orig, _fn=fn, **kw):
                if self.on:
                    t = a[1] if _fn in ("all_gather", "all_to_all_single") else a[0]
                    if _fn == "all_to_all_single":
                        n, r = dist.get_world_size(), dist.get_rank()
                        split = kw.get("input_split_sizes")
                        rows = t.shape[0] - (split[r] if split else t.shape[0] // n)
                        self.bytes += rows * (t[0].numel() if t.dim() > 1 else 1) * t.element_size()
                    elif _fn == "broadcast":
                        self.bytes += t.numel() * t.element_size() if dist.get_rank() == kw.get("src", a[1] if len(a) > 1 else 0) else 0
                    else:
                        self.bytes += t.numel() * t.element_size()
                return _orig(*a, **kw)
            setattr(dist, fn, wrap)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def identical(model):
    x = flat(model)
    outs = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(outs, x)
    return all(torch.equal(o, outs[0]) for o in outs)


EXTRA: dict = {}           # --options: extra compressor options for every run
COUNTER = None             # the Counter main() installs


def build(kind, bucket_mb=0.01, comp_opts=None, **extra):
    torch.manual_seed(0)
    model = Net(bias=not kind.endswith("-nobias"))   # -nobias: DDP buckets without a dense tensor
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb, **extra)
    name, more = VARIANTS.get(kind, (kind, {}))
    comp = hvd_rsgc.make_compression(name, model, min_numel=MIN_NUMEL,
                                     **{**OPTS.get(name, {}), **more, **EXTRA, **(comp_opts or {})},
                                     ignore_unknown=True) \
        if kind != "plain" else None
    if comp is not None:
        ddp.register_comm_hook(state=comp, hook=hvd_rsgc.ddp_comm_hook)
    opt = hvd_rsgc.make_optimizer(comp, model.parameters(), lr=LR.get(kind, 0.05), momentum=0.9) if comp is not None \
        else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, ddp, comp, opt


def train(kind, steps, counter, **extra):
    model, ddp, comp, opt = build(kind, **extra)
    x, y = make_data(100 + dist.get_rank(), steps * 16)
    ex, ey = make_data(999, 256)
    with torch.no_grad():
        before = F.cross_entropy(model(ex), ey).item()
    same, wire, lib = [], [], []
    for s in range(steps):
        opt.zero_grad()
        counter.bytes, counter.on = 0, True
        F.cross_entropy(ddp(x[s * 16:(s + 1) * 16]), y[s * 16:(s + 1) * 16]).backward()
        counter.on = False
        opt.step()
        wire.append(counter.bytes)
        lib.append(comp.stats()["step_bytes"] if comp is not None else None)
        same.append(identical(model))
    with torch.no_grad():
        after = F.cross_entropy(model(ex), ey).item()
    st = comp.stats() if comp is not None else {}
    return {"collective": st.get("collective"), "identical": same, "before": before, "after": after, "wire": wire, "lib": lib,
            "dense": st.get("step_dense_bytes"), "flat": flat(model).tolist() if kind in ("plain", "topk1") else None,
            "sha": hashlib.sha256(flat(model).numpy().tobytes()).hexdigest()}


def equivalence(steps):
    """density 1, no error feedback: the same parameters as plain DDP, bit for bit; also with
    two micro-batches accumulated under no_sync() into bucket views (the hook must reduce
    both micro-batches' gradients, as plain DDP does)."""
    out = {}
    for kind in ("plain", "topk"):
        for micro in (1, 2):
            torch.manual_seed(0)
            model = Net()
            ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.01,
                                                      gradient_as_bucket_view=micro == 2)
            if kind == "topk":
                comp = hvd_rsgc.TopKCompression(model, density=1.0, error_feedback=False,
                                                min_numel=MIN_NUMEL)
                ddp.register_comm_hook(state=comp, hook=hvd_rsgc.ddp_comm_hook)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            x, y = make_data(300 + dist.get_rank(), steps * 16 * micro)
            for s in range(steps):
                opt.zero_grad()
                for h in range(micro):
                    i = (s * micro + h) * 16
                    if h < micro - 1:
                        with ddp.no_sync():
                            F.cross_entropy(ddp(x[i:i + 16]), y[i:i + 16]).backward()
                    else:
                        F.cross_entropy(ddp(x[i:i + 16]), y[i:i + 16]).backward()
                opt.step()
            out[kind, micro] = flat(model)
    return {"max_diff": float((out["plain", 1] - out["topk", 1]).abs().max()),
            "max_diff_nosync": float((out["plain", 2] - out["topk", 2]).abs().max()),
            "nosync_moved": float((out["plain", 2] - out["plain", 1]).abs().max())}


def no_sync_and_views(steps):
    """gradient_as_bucket_view=True + no_sync() accumulation of 2 micro-batches; then a static
    graph (PyTorch does not allow no_sync() in a static graph's first iteration)."""
    out = {}
    for label, extra, micro in (("nosync_views", {"gradient_as_bucket_view": True}, 2),
                                ("static", {"static_graph": True}, 1)):
        model, ddp, comp, opt = build("rsdgc", **extra)
        x, y = make_data(500 + dist.get_rank(), steps * 32)
        same = []
        for s in range(steps):
            opt.zero_grad()
            if micro == 2:
                with ddp.no_sync():
                    F.cross_entropy(ddp(x[s * 32:s * 32 + 16]), y[s * 32:s * 32 + 16]).backward()
            F.cross_entropy(ddp(x[s * 32 + 16:(s + 1) * 32]), y[s * 32 + 16:(s + 1) * 32]).backward()
            opt.step()
            same.append(identical(model))
        out[label] = {"identical": same, "steps": comp.stats()["steps"]}
    return out


def resume(steps, kind="rsdgc"):
    """k steps, state_dict of model/optimizer/compressor, fresh objects, load, k more steps ==
    2k steps straight, bit for bit."""
    def run(first, second, state=None):
        model, ddp, comp, opt = build(kind)
        x, y = make_data(700 + dist.get_rank(), 2 * steps * 16)       # the same data in every run
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            comp.load_state_dict(state["comp"])
        for s in range(first, first + second):
            opt.zero_grad()
            F.cross_entropy(ddp(x[s * 16:(s + 1) * 16]), y[s * 16:(s + 1) * 16]).backward()
            opt.step()
        return model, opt, comp
    straight, _, _ = run(0, 2 * steps)
    m1, o1, c1 = run(0, steps)
    st = {"model": m1.state_dict(), "opt": o1.state_dict(), "comp": c1.state_dict()}
    resumed, _, _ = run(steps, steps, st)
    return {"equal": torch.equal(flat(straight), flat(resumed))}


def nonfinite(kind, steps=6):
    """One layer's gradient (conv2.weight, compressed; ``kind@name``: that parameter's) holds
    NaN on rank 1 at step 2, set by a tensor hook so the other layers stay finite. ``kind``'s
    compressor with nonfinite="skip": every rank must see step_nonfinite at step 2 only, skip
    it, keep its state finite and train on in step; with "raise" (kind ending in "!"), every
    rank's backward raises. A multi-round method (LGC) must not run its rounds that step:
    ``kept``, its accumulators then hold what they held plus this rank's finite gradients of
    the step; ``rounds``, the steps whose rounds ran."""
    raising = kind.endswith("!")
    kind, _, where = kind.rstrip("!").partition("@")
    model, ddp, comp, opt = build(kind, comp_opts={"nonfinite": "raise" if raising else "skip"})
    params = dict(model.named_parameters())
    multi = getattr(comp.method, "rounds", "single") == "multi"
    x, y = make_data(800 + dist.get_rank(), steps * 16)
    skipped, nan_grad, same, kept, wire, back = [], True, [], None, [], None
    for s in range(steps):
        opt.zero_grad()
        hooks = []
        if s == 2 and dist.get_rank() == 1:
            hooks.append(params[where or "conv2.weight"].register_hook(lambda g: g * float("nan")))
        if multi and s == 2:         # after the NaN hook: the gradient the comm hook is given
            acc, caught, more = accumulators.watch(comp, params)
            hooks += more
        if s == 2 and not multi:     # the state and raw gradients around the skipped step
            before, raw = comp.state_dict(), {}
            hooks += [p.register_hook(lambda g, n=n, raw=raw: raw.__setitem__(n, g.detach().clone()))
                      for n, p in params.items()]
        COUNTER.bytes, COUNTER.on = 0, True
        try:
            F.cross_entropy(ddp(x[s * 16:(s + 1) * 16]), y[s * 16:(s + 1) * 16]).backward()
        except Exception as e:          # noqa: BLE001 -- what the raise policy gives
            return {"raised": f"{type(e).__name__}: {e}"[:500], "step": s}
        finally:
            COUNTER.on = False
        wire.append((COUNTER.bytes, comp.stats()["step_bytes"]))
        for h in hooks:
            h.remove()
        if multi and s == 2:
            kept = accumulators.kept(comp, acc, caught)
        if comp.step_nonfinite:
            skipped.append(s)
            if not multi:
                back = accumulators.given_back(comp, before, comp.state_dict(), raw)
            # the contract: every rank gets NaN for that tensor, whatever its own gradient was
            nan_grad = nan_grad and bool(torch.isnan(params[where or "conv2.weight"].grad).all())
            continue
        opt.step()
        same.append(identical(model))
    mem = [v for lay in comp.state_dict()["layers"].values() for v in lay["memory"].values()]
    return {"skipped": skipped, "nan_grad": nan_grad, "identical": same,
            "params_finite": bool(torch.isfinite(flat(model)).all()),
            "memory_finite": all(bool(torch.isfinite(v).all()) for v in mem),
            "stats_skipped": comp.stats()["skipped_steps"], "raised": None, "kept": kept, "wire": wire,
            "given_back": back,
            "rounds": comp.method.step if multi else None}


class BranchNet(Net):
    """Net with a second head, fc3, used instead of fc2 while ``alt`` is set."""
    def __init__(self):
        super().__init__()
        self.fc3 = nn.Linear(64, 10)
        self.alt = True

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.relu(self.fc1(F.relu(self.conv2(x)).flatten(1)))
        return self.fc3(h) if self.alt else self.fc2(h)


def unused(kind, steps=5, skip=False):
    """A head (fc3, compressed) that no rank uses at steps 1 and 3, under
    DDP(find_unused_parameters=True): DDP leaves its .grad None and drops the hook's result, so
    after opt.step() what each rank sent of it in those steps must be back in its residual --
    the state of a step with a zero gradient of which nothing went out
    (``accumulators.given_back`` with g = 0, checked for fc3.weight alone) -- and fc3 must not
    move. Returns, per unused step, that check's result, whether fc3 stayed put, and whether
    the ranks are bit-identical after every step."""
    torch.manual_seed(0)
    model = BranchNet()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.01, find_unused_parameters=True)
    name, more = VARIANTS.get(kind, (kind, {}))
    comp = hvd_rsgc.make_compression(name, model, min_numel=MIN_NUMEL,
                                     **{**OPTS.get(name, {}), **more, **EXTRA,
                                        **({"nonfinite": "skip"} if skip else {})},
                                     ignore_unknown=True)
    ddp.register_comm_hook(state=comp, hook=hvd_rsgc.ddp_comm_hook)
    opt = hvd_rsgc.make_optimizer(comp, model.parameters(), lr=0.05, momentum=0.9)
    x, y = make_data(300 + dist.get_rank(), steps * 16)
    back, still, same, moms, twice = [], [], [], 0, []
    for s in range(steps):
        model.alt = s % 2 == 0
        opt.zero_grad()
        before = comp.state_dict()
        w = model.fc3.weight.detach().clone()
        F.cross_entropy(ddp(x[s * 16:(s + 1) * 16]), y[s * 16:(s + 1) * 16]).backward()
        opt.step()
        same.append(identical(model))
        # a second step() after zero_grad() (or a second optimizer's) gives nothing back again
        done = comp.state_dict()
        opt.zero_grad()
        opt.step()
        again = comp.state_dict()
        twice.append(all(torch.equal(done["layers"][n]["memory"][k], v)
                         for n, lay in again["layers"].items() for k, v in lay["memory"].items()))
        if model.alt:
            continue
        # g = 0 for fc3.weight; NaN leaves every other (used) layer out of the check
        grads = {e.name: torch.zeros_like(e.param) if e.name == "fc3.weight"
                 else torch.full_like(e.param, float("nan")) for e in comp.engine.table.compressed}
        after = comp.state_dict()
        back.append(accumulators.given_back(comp, before, after, grads))
        mom = [torch.equal(before["layers"][n]["memory"]["u"], after["layers"][n]["memory"]["u"])
               for n in ("fc3.bias",) if before["layers"].get(n, {}).get("memory", {}).get("u") is not None]
        still.append(model.fc3.weight.grad is None and torch.equal(model.fc3.weight.detach(), w)
                     and all(mom))      # a dense tensor's local momentum (DGC, RS-DGC) kept too
        moms += len(mom)
    return {"given_back": back, "still": still, "identical": same, "momentum_checked": moms,
            "not_twice": twice}


def loss_scaled(kind, steps=8):
    """DDP twin of worker.py's ``loss_scaled``: a GradScaler whose scale doubles after two good
    steps and halves at rank 1's NaN step 3, against the same run unscaled; with
    ``set_grad_scaler`` the parameters must be equal bit for bit."""
    def run(scaled):
        model, ddp, comp, opt = build(kind, comp_opts={"nonfinite": "skip"})
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2) \
            if scaled else None
        if scaled:
            comp.set_grad_scaler(scaler)
        x, y = make_data(870 + dist.get_rank(), steps * 16)
        scales, skipped = [], []
        for s in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x[s * 16:(s + 1) * 16]), y[s * 16:(s + 1) * 16])
            if s == 3 and dist.get_rank() == 1:
                loss = loss * float("nan")
            (scaler.scale(loss) if scaled else loss).backward()
            if comp.step_nonfinite:
                skipped.append(s)
            if scaled:
                scales.append(scaler.get_scale())
                scaler.step(opt)
                scaler.update()
            elif not comp.step_nonfinite:
                opt.step()
        return flat(model), scales, skipped
    plain, _, skipped_plain = run(False)
    scaled, scales, skipped = run(True)
    return {"equal": torch.equal(plain, scaled), "scales": scales, "skipped": skipped,
            "skipped_plain": skipped_plain}


def double_momentum():
    model, ddp, comp, _ = build("dgc")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = make_data(1, 16)
    F.cross_entropy(ddp(x), y).backward()
    try:
        opt.step()
        return None
    except ValueError as e:
        return str(e)


def subgroups(kind, steps=4):
    """Hybrid parallelism: two DDP replicas groups, ranks {0, 1} and {2, 3}, each DDP on its own
    process group with the compressor on the same group (process_set=G). Every collective must
    stay in the group: ranks identical within it, the groups apart (other data), the average
    over 2 ranks. A Horovod process set is refused for DDP with the parameter named."""
    r = dist.get_rank()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]   # every rank creates every group
    mine = groups[r // 2]
    torch.manual_seed(0)
    model = Net()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.01, process_group=mine)
    name, more = VARIANTS.get(kind, (kind, {}))
    comp = hvd_rsgc.make_compression(name, model, min_numel=MIN_NUMEL, process_set=mine,
                                     **{**OPTS.get(name, {}), **more}, ignore_unknown=True)
    ddp.register_comm_hook(state=comp, hook=hvd_rsgc.ddp_comm_hook)
    opt = hvd_rsgc.make_optimizer(comp, model.parameters(), lr=LR.get(kind, 0.05), momentum=0.9)
    x, y = make_data(100 + (r // 2) * 10 + r % 2, steps * 16)      # the groups see other data
    for s in range(steps):
        opt.zero_grad()
        F.cross_entropy(ddp(x[s * 16:(s + 1) * 16]), y[s * 16:(s + 1) * 16]).backward()
        opt.step()
    v = flat(model)
    outs = [torch.empty_like(v) for _ in range(dist.get_world_size())]
    dist.all_gather(outs, v)
    out = {"same_in_group": torch.equal(outs[r], outs[r ^ 1]),
           "groups_apart": not torch.equal(outs[0], outs[2]), "group_size": comp.ddp.transport.size}
    bad = hvd_rsgc.make_compression(name, Net(), min_numel=MIN_NUMEL, ignore_unknown=True,
                                    process_set=object())
    try:
        _ = bad.ddp
        out["refused"] = None
    except ValueError as e:
        out["refused"] = str(e)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--kinds", default="none,fp16,topk,randomk,dgc,qsgd,rsdgc,rsdgc-int8,lgc-rar,powersgd,"
                                       "signsgd,efsignsgd,terngrad,natural,threshold,topk-pt,dgc-pt,"
                                       "rsdgc-pt,rsdgc-nobias")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--scenarios", default="train,equiv,nosync,resume,momentum")
    ap.add_argument("--options", default="{}", help="JSON: extra compressor options")
    a = ap.parse_args()
    EXTRA.update(json.loads(a.options))
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    global COUNTER
    counter = COUNTER = Counter()
    scen = a.scenarios.split(",")
    res = {"size": dist.get_world_size(), "rank": dist.get_rank()}
    if "train" in scen:
        res["train"] = {k: train(k, a.steps, counter) for k in a.kinds.split(",")}
    if "equiv" in scen:
        res["equiv"] = equivalence(6)
    if "nosync" in scen:
        res["nosync"] = no_sync_and_views(6)
    if "resume" in scen:
        res["resume"] = resume(4)
        # LGC-PS saved in stage 2 and loaded under DDP (it asked Horovod for the ranks: 1)
        res["resume_lgc_ps"] = resume(4, "lgc-ps")
    if "momentum" in scen:
        res["momentum"] = double_momentum()
    if "groups" in scen:
        res["groups"] = {k: subgroups(k) for k in a.kinds.split(",")}
    if "amp" in scen:
        res["amp"] = {k: loss_scaled(k) for k in ("rsdgc", "rsdgc-pt", "dgc", "topk")}
    if "unused" in scen:
        res["unused"] = {k: unused(k) for k in ("topk", "topk-pt", "rsdgc", "rsdgc-pt", "rsdgc-rs", "dgc")}
        # nonfinite="skip" keeps the step's give-backs after the optimizer's step as well
        res["unused"].update({f"{k}+skip": unused(k, skip=True) for k in ("topk", "rsdgc-pt")})
    if "nonfinite" in scen:
        res["nonfinite"] = {k: nonfinite(k) for k in ("rsdgc", "rsdgc-pt", "rsdgc-rs", "dgc", "fp16", "rsdgc!",
                                                      "lgc-rar", "lgc-rar@conv2.bias")}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(res, f)
    # every rank done before Gloo is torn down: without it a rank aborted once at exit
    # ("terminate called without an active exception") after both had written their results
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
