"""RS scene classification with any registered compressor (Horovod allreduce) or with
decentralized RD-PSGD / D-PSGD (MPI gossip).

    horovodrun -np 4 python -m hvd_rsgc.train --config examples/configs/demo.yaml [--key value ...]
    horovodrun -np 4 python -m hvd_rsgc.train --resume runs/<run> [--epochs 20]   # continue bit-exactly

Writes a run directory: the resolved config, per-epoch metrics (JSONL + CSV), checkpoints
(atomic, last N kept, loaded with ``weights_only=True``), plots, TensorBoard events (if
installed) and a summary. ``--help`` lists every config key.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from ..horovod import horovod_torch
from . import checkpoint as ckpt
from .config import Config, help_text, load_config, parse_overrides
from .report import Reporter
from .strategies import strategy_for

# names kept for users and older scripts
CKPT_FORMAT, SHARD_FORMAT = ckpt.CKPT_FORMAT, ckpt.SHARD_FORMAT


def lr_at(o, epoch_float: float, world: int) -> float:
    """Learning rate at a fractional epoch: linear warm-up from lr/P (DGC), then the schedule."""
    base, E, warm = o.lr, o.epochs, o.lr_warmup_epochs
    if warm and epoch_float < warm:
        return base / world + (base - base / world) * epoch_float / warm
    if o.lr_schedule == "cosine":
        return 0.5 * base * (1 + math.cos(math.pi * min(epoch_float, E) / E))
    if o.lr_schedule == "multistep":
        return base * o.gamma ** sum(epoch_float >= m * E for m in o.milestones)
    return base


def _seed_gen(*parts) -> torch.Generator:
    from ..algorithms.select import splitmix_seed
    return torch.Generator().manual_seed(splitmix_seed(*parts))


def pick_device(name: str, hvd) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            raise ValueError(f"device: {name!r} was asked for, but this torch "
                             f"({torch.__version__}) sees no CUDA device; use --device cpu or auto")
        if name == "cuda":
            torch.cuda.set_device(hvd.local_rank() % torch.cuda.device_count())
            return torch.device("cuda", torch.cuda.current_device())
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and dev.index is not None:    # cuda:N: the current device too, so
        if dev.index >= torch.cuda.device_count():      # that what reads "the" CUDA device
            raise ValueError(f"device: {name!r} was asked for, but this machine has "   # reads N
                             f"{torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(dev)
    return dev


def average_buffers(model, hvd):
    """BatchNorm running statistics differ per rank (local batches): average them so every
    rank evaluates and checkpoints the same model."""
    for name, b in model.named_buffers():
        if b.dtype.is_floating_point:
            b.copy_(hvd.allreduce(b, op=hvd.Average, name=f"hvd_rsgc.buffer.{name}"))


def model_input(x, dataset, cfg):
    """A stacked batch of ``dataset``'s images as the model takes it (no augmentation)."""
    from .data.augment import normalize
    return x.float() if getattr(dataset, "prenormalized", False) else \
        normalize(x, cfg.data.mean, cfg.data.std)


def train_inputs(dataset, indices, batch_size, cfg, device, batches):
    """Up to ``batches`` input batches of this rank's training images, in the order
    ``indices``, without augmentation (re-estimating BatchNorm statistics)."""
    for s in range(0, min(len(indices), batches * batch_size), batch_size):
        x = torch.stack([dataset[i][0] for i in indices[s:s + batch_size]]).to(device)
        yield model_input(x, dataset, cfg)


def evaluate(model, dataset, cfg, hvd, num_classes):
    from .metrics import confusion_matrix
    model.eval()
    idx = list(range(hvd.rank(), len(dataset), hvd.size()))         # no padding duplicates
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    bs = cfg.optim.batch_size * 4
    dev = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, len(idx), bs):
            items = [dataset[i] for i in idx[s:s + bs]]
            x = model_input(torch.stack([t[0] for t in items]).to(dev), dataset, cfg)
            y = torch.tensor([t[1] for t in items], device=dev)
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").double().cpu()
            cm += confusion_matrix(out.argmax(1), y, num_classes).cpu()
    cm = hvd.allreduce(cm, op=hvd.Sum, name="hvd_rsgc.eval.cm")
    loss_sum = hvd.allreduce(loss_sum, op=hvd.Sum, name="hvd_rsgc.eval.loss")
    model.train()
    return cm, loss_sum.item() / max(1, int(cm.sum()))


def process_group(cfg):
    """Horovod (``horovod.torch``) or, with ``--backend ddp``, a torch.distributed group with
    the same calls; decentralized runs (RD-PSGD, D-PSGD) an MPI group (no Horovod thread
    beside their own MPI exchange)."""
    if cfg is not None and cfg.decentral.backend == "ddp":
        from ..ddp.process import TorchProcessGroup
        return TorchProcessGroup()
    if cfg is not None and cfg.decentral.algorithm in ("rdpsgd", "dpsgd"):
        from ..mpi.process import MPIProcessGroup
        return MPIProcessGroup()
    return horovod_torch()


def _read_resume(resume: str, overrides: dict | None):
    """The run to continue: (config with ``overrides`` applied, run dir, main checkpoint file,
    its contents). Read once, before the process group starts (which depends on the config)."""
    run_dir, main_file = ckpt.resolve(resume)
    main = ckpt.load(main_file)
    cfg = Config.from_flat(main["config"], f"checkpoint {main_file}")
    if overrides:                            # e.g. --epochs to extend a run; validated
        cfg.update(overrides, "command line")
        now = cfg.to_flat()
        fixed = [k for k in SPLIT_KEYS if k in overrides and now.get(k) != main["config"].get(k)]
        if fixed:
            had = ", ".join(f"{k}={main['config'].get(k)!r}" for k in fixed)
            raise ValueError(
                f"--resume: {', '.join(fixed)} cannot change when a run is resumed (they decide "
                f"the train/val split: the run has {had}; images it validated on would be "
                "trained on); start a new run instead")
    return cfg, run_dir, main_file, main


# the keys that decide which images are trained on and which validated on
SPLIT_KEYS = ("dataset", "seed", "train_ratio", "train_split", "val_split", "houston_train",
              "houston_test", "synthetic_train", "synthetic_val", "num_classes")


def torch_threads(local_size: int) -> int:
    """Intra-op threads per rank: ``OMP_NUM_THREADS`` where the user (or the launcher, as
    torchrun does) set it, else the CPUs this process may run on (taskset, Slurm cpu binding)
    shared by the ranks on this node."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {env!r}")
        return int(env)
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, ncpu // max(1, local_size))


def deterministic_setup(cfg, hvd) -> None:
    """``--deterministic``: before the process group ``hvd`` starts. Horovod: fixed allreduce
    groups (``horovod/deterministic.py``; the strategy passes the groups). Every backend:
    torch's deterministic kernels (a warning, not an error, where an op has none)."""
    if cfg is None or not cfg.run.deterministic:
        return
    if hvd is sys.modules.get("horovod.torch"):   # no import for the DDP / MPI process groups
        from ..horovod import deterministic
        deterministic.enable()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS
    torch.use_deterministic_algorithms(True, warn_only=True)


def check_ranks_agree(hvd, mine: dict) -> None:
    """Every rank must train on the same split from the same point. Each reads the data set
    and the checkpoint folder itself, so a file missing from one node's copy of the data, or a
    stale directory listing on a shared file system after a requeue, would give one rank other
    sizes or another epoch, hence another number of steps: a hang at the first collective it
    misses, or ranks training on what the others validate on. ``mine``: this rank's values;
    every rank compares all of them and raises the same error, naming what differs."""
    every = hvd.allgather_object(mine, name="hvd_rsgc.agree")
    bad = [k for k in mine if any(o.get(k) != mine[k] for o in every)]
    if bad:
        rows = "; ".join(f"rank {i}: " + ", ".join(f"{k}={o.get(k)!r}" for k in bad)
                         for i, o in enumerate(every))
        raise ValueError(f"the ranks do not agree on {', '.join(bad)} ({rows}): every rank must "
                         "read the same data set and resume from the same checkpoint (a file "
                         "missing or unreadable on one node's copy of the data, or a checkpoint "
                         "folder listed differently on one node)")


def _resume(read, world: int, rank: int):
    """``read``: what ``_read_resume`` returned; checked against this job, plus this rank's shard."""
    cfg, run_dir, main_file, main = read
    if main["world_size"] != world:
        raise ValueError(f"checkpoint {main_file!r} was written by {main['world_size']} ranks, "
                         f"this job has {world}: per-rank residuals cannot be mapped (resume "
                         "with the same -np)")
    shard = ckpt.load(ckpt.shard_path(main_file, rank), ckpt.SHARD_FORMAT)
    if shard.get("epoch") != main["epoch"] or shard.get("rank") != rank:
        raise ValueError(f"checkpoint shard {ckpt.shard_path(main_file, rank)!r} is of epoch "
                         f"{shard.get('epoch')} rank {shard.get('rank')}, not of its main file's "
                         f"epoch {main['epoch']} rank {rank}: the files of two runs are mixed")
    return cfg, run_dir, main, shard


def make_loader(train_ds, batch_size: int, sampler, workers: int, seed: int, rank: int):
    """The training loader. With worker processes (persistent) the loader draws its workers'
    base seed once, when its first iterator starts; from the global RNG that draw would happen
    in the first epoch of an uninterrupted run but in the first epoch after a resume, shifting
    every later dropout mask, so resume would not be bit-exact. It draws from its own generator
    instead. Without workers a new iterator each epoch draws from the global RNG, the same in
    both runs (kept as it is: the runs recorded so far depend on it)."""
    from torch.utils.data import DataLoader
    gen = _seed_gen(seed, rank, 0x10ADE2) if workers > 0 else None
    return DataLoader(train_ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=True, persistent_workers=workers > 0, generator=gen)


def run(cfg: Config | None = None, resume: str | None = None, quiet: bool = False,
        overrides: dict | None = None) -> dict:
    """Train one run (every rank calls this). ``resume``: a run directory or checkpoint file;
    ``overrides`` (flat ``key: value``) apply on top of the resumed config."""
    from torch.utils.data.distributed import DistributedSampler

    from .data import build_datasets
    from .data.augment import augment, normalize
    from .metrics import summarize
    from .models import build_model

    read = error = None
    if resume:
        try:
            read = _read_resume(resume, overrides)
        except (ValueError, FileNotFoundError) as e:
            error = e                        # raised once the process group is up
    planned = read[0] if read else (None if resume else cfg)
    hvd = process_group(planned)
    deterministic_setup(planned, hvd)
    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    main = shard = None
    if error is not None:
        raise error
    if read:
        cfg, run_dir, main, shard = _resume(read, world, rank)
    cfg = cfg or Config()
    d, o, r = cfg.data, cfg.optim, cfg.run
    device = pick_device(r.device, hvd)
    torch.set_num_threads(torch_threads(hvd.local_size()))

    train_ds, val_ds, classes = build_datasets(d, r.seed)
    nc = len(classes)
    torch.manual_seed(r.seed)
    model = build_model(o.model, nc, d.image_size, **getattr(train_ds, "model_kwargs", {})).to(device)
    prenormalized = getattr(train_ds, "prenormalized", False)
    if not prenormalized and len(train_ds):
        channels = train_ds[0][0].shape[0]
        if len(d.mean) != channels or len(d.std) != channels:
            raise ValueError(f"mean / std have {len(d.mean)} / {len(d.std)} values but the "
                             f"{d.dataset} images have {channels} channels: give one per channel")
    crop = getattr(train_ds, "crop_augment", True)       # per-pixel patches: the centre is the label
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                 seed=r.seed, drop_last=True)
    loader = make_loader(train_ds, o.batch_size, sampler, d.workers, r.seed, rank)
    steps_per_epoch = len(loader)
    if o.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, o.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train_ds)} training images are too few for batch_size "
                         f"{o.batch_size} x {world} ranks")
    check_ranks_agree(hvd, {
        "resumed_epoch": None if main is None else main["epoch"],
        "train_images": len(train_ds), "val_images": len(val_ds),
        "classes": hashlib.sha256("\n".join(map(str, classes)).encode()).hexdigest()[:12],
        "steps_per_epoch": steps_per_epoch})
    strategy = strategy_for(cfg)(cfg, model, hvd)

    start_epoch, history, cum_bytes = 0, [], 0
    if main is not None:
        strategy.load(main, shard)
        torch.set_rng_state(shard["torch_rng"])
        if device.type == "cuda" and shard.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(shard["cuda_rng"], device)
        start_epoch, history = main["epoch"] + 1, main["history"]
        cum_bytes = history[-1]["cum_bytes_per_worker"] if history else 0
    else:
        c = cfg.compression.compression
        run_name = r.run_name or time.strftime(f"{c}-{o.model}-%Y%m%d-%H%M%S")
        run_dir = os.path.join(r.out_dir, run_name)
        if rank == 0:
            os.makedirs(run_dir, exist_ok=True)
    if rank == 0:       # files this run would delete (rotation) or mix with (resume): moved away
        after = -1 if main is None else main["epoch"]
        folder, moved = ckpt.set_aside(run_dir, after, "replaced" if main is None else "superseded")
        if moved:
            print(f"hvd_rsgc: {len(moved)} checkpoint file(s) of "
                  f"{'an earlier run' if main is None else 'epochs after the resumed one'} in "
                  f"{run_dir!r} moved to {folder!r} (this run would have replaced them)",
                  file=sys.stderr, flush=True)
    run_dir = hvd.broadcast_object(run_dir, root_rank=0, name="hvd_rsgc.run_dir")
    strategy.broadcast_initial(resumed=main is not None)
    flat = cfg.to_flat()
    report = Reporter(run_dir, rank, quiet, r.progress)
    if rank == 0:
        import yaml
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(flat, f, sort_keys=True)
        report.truncate(start_epoch)

    end_epoch = o.epochs if not r.stop_after else min(o.epochs, start_epoch + r.stop_after)
    # mixed precision (--amp): forward and loss in bf16 / fp16; fp16's loss scaler is the strategy's
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if o.amp == "bf16" else torch.float16,
                              enabled=o.amp != "off")
    for epoch in range(start_epoch, end_epoch):
        t0 = time.time()
        sampler.set_epoch(epoch)
        strategy.begin_epoch(epoch)
        gen = _seed_gen(r.seed, rank, epoch)
        loss_sum, correct, seen, loss_seen = 0.0, 0, 0, 0
        it = iter(loader)
        bar = report.bar(steps_per_epoch, f"epoch {epoch + 1}/{o.epochs}")
        for step in range(steps_per_epoch):
            x, y = next(it)
            lr = lr_at(o, epoch + step / steps_per_epoch, world)
            for g in strategy.opt.param_groups:
                g["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            xf = augment(x.float(), gen, crop=crop) if d.augment else x.float()
            strategy.opt.zero_grad()
            with autocast:
                out = strategy.forward(xf if prenormalized else normalize(xf, d.mean, d.std))
                loss = F.cross_entropy(out, y)
                extra = getattr(model, "extra_loss", None)  # e.g. CCR-Net's reconstruction loss
                if extra is not None:
                    loss = loss + extra
            strategy.backward(loss)
            strategy.after_backward()
            strategy.step()
            lv = loss.item()
            if math.isfinite(lv):           # an fp16 (--amp) overflow: not in the mean
                loss_sum += lv * y.numel()
                loss_seen += y.numel()
            correct += int((out.argmax(1) == y).sum())
            seen += y.numel()
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{lv:.3f}", lr=f"{lr:.4f}")
        if bar:
            bar.close()
        del it
        average_buffers(model, hvd)
        tr = hvd.allreduce(torch.tensor([loss_sum, correct, seen, loss_seen], dtype=torch.float64),
                           op=hvd.Sum, name="hvd_rsgc.train.stats")
        with strategy.evaluation_model(functools.partial(
                train_inputs, train_ds, list(sampler), o.batch_size, cfg, device)) as consensus:
            cm, val_loss = evaluate(model, val_ds, cfg, hvd, nc)
        m = summarize(cm)
        ep_bytes, ep_dense, skipped = strategy.epoch_bytes()
        all_bytes = hvd.allgather_object(ep_bytes, name="hvd_rsgc.bytes")
        cum_bytes += ep_bytes
        rec = {"epoch": epoch + 1, "lr": lr, "train_loss": tr[0].item() / tr[3].item() if tr[3].item() else float("nan"),
               "nonfinite_loss_samples": int(tr[2].item() - tr[3].item()),
               "train_acc": tr[1].item() / tr[2].item(), "val_loss": val_loss,
               "top1": m["oa"], "oa": m["oa"], "aa": m["aa"], "kappa": m["kappa"],
               "per_class": m["per_class"],
               "bytes_per_worker": ep_bytes, "bytes_mean_over_workers": sum(all_bytes) / world,
               "dense_bytes_per_worker": ep_dense,
               "compression_ratio": ep_dense / ep_bytes if ep_bytes else None,
               "cum_bytes_per_worker": cum_bytes, "seconds": time.time() - t0,
               "time": time.time(), "skipped_steps": skipped,
               "consensus_distance": consensus, "confusion": cm.tolist()}
        history.append(rec)
        path = ckpt.main_path(run_dir, epoch)
        ckpt.atomic_save({"format": ckpt.SHARD_FORMAT, "rank": rank, "epoch": epoch,
                          "torch_rng": torch.get_rng_state(), **strategy.shard_state(),
                          "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                         ckpt.shard_path(path, rank))
        hvd.barrier()
        if rank == 0:
            report.epoch(rec, o.epochs)
            ckpt.save_main(run_dir, epoch, {
                "format": ckpt.CKPT_FORMAT, "epoch": epoch, "config": flat,
                "model": strategy.exported_state(), "optimizer": strategy.opt.state_dict(),
                "history": history, "classes": classes, "world_size": world}, r.keep_checkpoints)
        hvd.barrier()
    # + this process's place in the run's group (compare writes its results from rank 0
    # without asking a group that may be down by then)
    return {**report.finish(history, classes, flat, getattr(train_ds, "skipped", ())),
            "rank": rank, "world_size": world}


def main(argv=None):
    """The command line; a rank that fails in a decentralized (MPI) run ends the whole job
    (:func:`hvd_rsgc.mpi.process.abort_peers`) instead of leaving its peers waiting."""
    try:
        _main(argv)
    except SystemExit as e:
        if e.code not in (None, 0):
            _abort_mpi_peers(str(e.code))
        raise
    except BaseException as e:
        _abort_mpi_peers(f"{type(e).__name__}: {e}", traceback=True)
        raise


def _abort_mpi_peers(why: str, traceback: bool = False) -> None:
    mod = sys.modules.get("hvd_rsgc.mpi.process")
    if mod is not None and mod.active_size() > 1:
        if traceback:                       # MPI_Abort ends the process before Python prints it
            import traceback as tb
            tb.print_exc()
        mod.abort_peers(why.splitlines()[0][:300] if why else "error")


def _main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hvd_rsgc.train", description=__doc__,
                                 epilog=help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML file of config keys")
    ap.add_argument("--resume", default=None, metavar="RUN_DIR_OR_FILE",
                    help="continue a run (its latest checkpoint, or the checkpoint file given)")
    args, rest = ap.parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        if args.resume:
            if args.config:
                raise ValueError("--config and --resume do not go together: a resumed run uses "
                                 "the config saved in its checkpoint (override keys with --key value)")
            # each key checked before starting; the checks across keys run on the run's
            # own config with the overrides (_read_resume), not on the defaults
            Config().update(overrides, "command line", validate=False)
            run(None, resume=args.resume, overrides=overrides)
        else:
            run(load_config(args.config, overrides))
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
