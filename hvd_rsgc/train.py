"""RS scene classification with any compressor, under Horovod.

    horovodrun -np 4 python -m hvd_rsgc.train --config examples/configs/demo.yaml [--key value ...]
    horovodrun -np 4 python -m hvd_rsgc.train --resume runs/<run>          # continue bit-exactly

Every config key (see DEFAULTS) can be overridden as ``--key value`` (YAML syntax for the value:
``--milestones [0.5,0.75]``, ``--fp16_values true``). Writes a run directory with the resolved
config, per-epoch metrics (JSONL + CSV), checkpoints (atomic, last N kept, loaded with
``weights_only=True``), plots, TensorBoard events (if installed) and a summary.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

DEFAULTS = {
    # data
    "dataset": "synthetic", "data_root": None, "train_split": None, "val_split": None,
    "train_ratio": 0.8, "image_size": 32, "num_classes": None,
    "synthetic_train": 512, "synthetic_val": 256, "workers": 0,
    "augment": True, "mean": [93.894, 97.112, 87.568], "std": [51.849, 47.237, 47.063],
    # model / optimisation
    "model": "resnet20", "epochs": 5, "batch_size": 16, "lr": 0.1, "momentum": 0.9,
    "weight_decay": 1e-4, "nesterov": False, "lr_schedule": "cosine",
    "milestones": [0.5, 0.75], "gamma": 0.1, "lr_warmup_epochs": 0,
    "max_steps_per_epoch": None,
    # algorithm: "horovod" (allreduce with a compressor) or decentralized "rdpsgd" / "dpsgd"
    # (ring neighbour averaging over mpi4py; launch with mpirun or horovodrun --mpi)
    "algorithm": "horovod", "sparsity_ratio": 0.1, "topology": "ring", "sync_every": 1,
    "send_indices": False, "rd_timeout": 120,
    # compression
    "compression": "rsdgc", "density": 0.001, "beta": 0.5, "radius": 1, "neighbourhood": True,
    "dynamic": True, "update_every": 100, "density_floor": 0.1, "selection": "topk",
    "compression_warmup_epochs": 0, "fp16_values": False, "min_numel": 1024,
    "exclude": [], "error_feedback": True, "qsgd_levels": 1, "qsgd_bucket": 512, "clip_norm": None,
    "lgc_warmup_steps": 200, "lgc_ae_steps": 300, "lgc_innovation_density": None,
    # run
    "seed": 0, "out_dir": "runs", "run_name": None, "keep_checkpoints": 2, "progress": True,
    "stop_after": None,
    "device": "auto",         # auto: cuda:<local rank> when CUDA is available, else cpu       # stop after this many epochs in this invocation (preemption, tests)
}
COMPRESSIONS = ("none", "fp16", "topk", "randomk", "dgc", "qsgd", "rsdgc", "lgc-rar", "lgc-ps")
CKPT_FORMAT = "hvd_rsgc.checkpoint/1"
SHARD_FORMAT = "hvd_rsgc.checkpoint-shard/1"


# ----------------------------------------------------------------------------- config
def load_config(path: str | None, overrides: list[str]) -> dict:
    import yaml
    cfg = dict(DEFAULTS)
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r} must hold a mapping")
        _merge(cfg, data, path)
    _merge(cfg, parse_overrides(overrides), "command line")
    validate(cfg)
    return cfg


def parse_overrides(items: list[str]) -> dict:
    import yaml
    out, i = {}, 0
    while i < len(items):
        tok = items[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected argument {tok!r} (overrides are --key value)")
        key = tok[2:].replace("-", "_")
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ValueError(f"--{key} needs a value")
            val = items[i + 1]
            i += 2
        out[key] = yaml.safe_load(val)
    return out


def _merge(cfg, data, where):
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {where}; known: {sorted(DEFAULTS)}")
    cfg.update(data)


def validate(cfg):
    if cfg["algorithm"] not in ("horovod", "rdpsgd", "dpsgd"):
        raise ValueError(f"algorithm must be horovod, rdpsgd or dpsgd, got {cfg['algorithm']!r}")
    if cfg["algorithm"] != "horovod" and cfg["topology"] != "ring":
        raise ValueError(f"topology: only 'ring' from the CLI (the RDPSGD class takes any "
                         f"mixing matrix), got {cfg['topology']!r}")
    if cfg["compression"] not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {cfg['compression']!r}")
    for k in ("epochs", "batch_size", "image_size"):
        if not isinstance(cfg[k], int) or cfg[k] < 1:
            raise ValueError(f"{k} must be an integer >= 1, got {cfg[k]!r}")
    if not cfg["lr"] > 0:
        raise ValueError(f"lr must be > 0, got {cfg['lr']!r}")
    if cfg["lr_schedule"] not in ("cosine", "multistep", "constant"):
        raise ValueError(f"lr_schedule must be cosine, multistep or constant, got {cfg['lr_schedule']!r}")
    if not isinstance(cfg["keep_checkpoints"], int) or cfg["keep_checkpoints"] < 1:
        raise ValueError(f"keep_checkpoints must be an integer >= 1, got {cfg['keep_checkpoints']!r}")


# ----------------------------------------------------------------------------- factories
def make_compression(cfg: dict, model):
    import hvd_rsgc as H
    name = cfg["compression"]
    common = dict(min_numel=cfg["min_numel"], exclude=tuple(cfg["exclude"] or ()))
    if name == "none":
        return H.NoneCompression(model)
    if name == "fp16":
        return H.FP16Compression(model)
    if name == "topk":
        return H.TopKCompression(model, cfg["density"], error_feedback=cfg["error_feedback"],
                                 fp16_values=cfg["fp16_values"], **common)
    if name == "randomk":
        return H.RandomKCompression(model, cfg["density"], error_feedback=cfg["error_feedback"],
                                    seed=cfg["seed"], fp16_values=cfg["fp16_values"], **common)
    if name == "qsgd":
        return H.QSGDCompression(model, levels=cfg["qsgd_levels"], bucket_size=cfg["qsgd_bucket"],
                                 error_feedback=False, seed=cfg["seed"], **common)
    if name.startswith("lgc-"):
        return H.LGCCompression(model, mode=name[4:], density=cfg["density"],
                                warmup_steps=cfg["lgc_warmup_steps"], ae_steps=cfg["lgc_ae_steps"],
                                innovation_density=cfg["lgc_innovation_density"], seed=cfg["seed"],
                                **common)
    warm = dict(warmup_epochs=cfg["compression_warmup_epochs"],
                steps_per_epoch=0 if cfg["compression_warmup_epochs"] else None)
    mom = dict(momentum=cfg["momentum"], nesterov=cfg["nesterov"], clip_norm=cfg["clip_norm"])
    if name == "dgc":
        return H.DGCCompression(model, cfg["density"], fp16_values=cfg["fp16_values"],
                                seed=cfg["seed"], **mom, **warm, **common)
    return H.RSDGCCompression(model, cfg["density"], beta=cfg["beta"], radius=cfg["radius"],
                              neighbourhood=cfg["neighbourhood"], dynamic=cfg["dynamic"],
                              update_every=cfg["update_every"], density_floor=cfg["density_floor"],
                              selection=cfg["selection"], fp16_values=cfg["fp16_values"],
                              seed=cfg["seed"], **mom, **warm, **common)


def make_optimizer(cfg, model, comp):
    import hvd_rsgc as H
    if getattr(comp, "method", None) is not None and comp.method.momentum_correction and comp.momentum > 0:
        return H.DGCSGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                        weight_decay=cfg["weight_decay"], nesterov=cfg["nesterov"])
    return torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                           weight_decay=cfg["weight_decay"], nesterov=cfg["nesterov"])


def lr_at(cfg, epoch_float: float, world: int) -> float:
    base, E = cfg["lr"], cfg["epochs"]
    warm = cfg["lr_warmup_epochs"]
    if warm and epoch_float < warm:          # linear from base/P to base (DGC's schedule)
        return base / world + (base - base / world) * epoch_float / warm
    if cfg["lr_schedule"] == "cosine":
        return 0.5 * base * (1 + math.cos(math.pi * min(epoch_float, E) / E))
    if cfg["lr_schedule"] == "multistep":
        return base * cfg["gamma"] ** sum(epoch_float >= m * E for m in cfg["milestones"])
    return base


# ----------------------------------------------------------------------------- checkpoints
def atomic_save(obj, path: str) -> str:
    """Write to a temporary file, fsync, rename: a crash mid-write never destroys the last
    good file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def shard_path(main_path: str, rank: int) -> str:
    return main_path[: -len(".pt")] + f".rank{rank:03d}.pt"


def save_checkpoint(run_dir: str, epoch: int, payload: dict, keep: int) -> str:
    """Rank 0's main file (model, optimizer, config, history). Per-rank shards (residuals,
    RNG) are written first by every rank; the main file appears last, so its presence means
    the checkpoint is complete."""
    d = os.path.join(run_dir, "checkpoints")
    path = atomic_save(payload, os.path.join(d, f"epoch{epoch:04d}.pt"))
    mains = sorted(glob.glob(os.path.join(d, "epoch[0-9][0-9][0-9][0-9].pt")))
    for old in mains[:-keep]:
        for f in [old] + glob.glob(old[: -len(".pt")] + ".rank*.pt"):
            os.remove(f)
    return path


def latest_checkpoint(run_dir: str) -> str:
    files = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "epoch[0-9][0-9][0-9][0-9].pt")))
    if not files:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(run_dir, 'checkpoints')!r}")
    return files[-1]


def load_checkpoint(path: str, kind: str = CKPT_FORMAT) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:      # noqa: BLE001 - truncated zip, pickle refused, ...
        raise ValueError(f"checkpoint {path!r} is unreadable or not a hvd_rsgc checkpoint "
                         f"(truncated, or contains code): {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ck, dict) or ck.get("format") != kind:
        raise ValueError(f"checkpoint {path!r} is not a hvd_rsgc checkpoint (format "
                         f"{ck.get('format') if isinstance(ck, dict) else type(ck).__name__!r})")
    return ck


# ----------------------------------------------------------------------------- training
def _seed_gen(*parts) -> torch.Generator:
    from .algorithms.select import splitmix_seed
    return torch.Generator().manual_seed(splitmix_seed(*parts))


def average_buffers(model, hvd):
    """BatchNorm running statistics differ per rank (local batches): average them so every
    rank evaluates and checkpoints the same model."""
    for name, b in model.named_buffers():
        if b.dtype.is_floating_point:
            b.copy_(hvd.allreduce(b, op=hvd.Average, name=f"hvd_rsgc.buffer.{name}"))


def evaluate(model, dataset, cfg, hvd, num_classes):
    from .data.augment import normalize
    from .metrics import confusion_matrix
    model.eval()
    idx = list(range(hvd.rank(), len(dataset), hvd.size()))         # no padding duplicates
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    bs = cfg["batch_size"] * 4
    with torch.no_grad():
        for s in range(0, len(idx), bs):
            items = [dataset[i] for i in idx[s:s + bs]]
            dev = next(model.parameters()).device
            x = normalize(torch.stack([t[0] for t in items]).to(dev), cfg["mean"], cfg["std"])
            y = torch.tensor([t[1] for t in items], device=dev)
            out = model(x)
            loss_sum += F.cross_entropy(out, y, reduction="sum").double().cpu()
            cm += confusion_matrix(out.argmax(1), y, num_classes).cpu()
    cm = hvd.allreduce(cm, op=hvd.Sum, name="hvd_rsgc.eval.cm")
    loss_sum = hvd.allreduce(loss_sum, op=hvd.Sum, name="hvd_rsgc.eval.loss")
    model.train()
    return cm, loss_sum.item() / max(1, int(cm.sum()))


def run(cfg: dict, resume: str | None = None, quiet: bool = False) -> dict:
    import horovod.torch as hvd
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from .data import build_datasets
    from .data.augment import augment, normalize
    from .metrics import summarize
    from .models import build_model

    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    dev_cfg = cfg.get("device", "auto")
    if dev_cfg == "auto":
        dev_cfg = "cuda" if torch.cuda.is_available() else "cpu"
    if dev_cfg == "cuda":
        torch.cuda.set_device(hvd.local_rank() % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device(dev_cfg)
    # the CPUs this process may run on (taskset, Slurm cpu binding), shared by the local ranks
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, ncpu // max(1, hvd.local_size())))
    ck = shard = None
    if resume:
        main_path = latest_checkpoint(resume)
        ck = load_checkpoint(main_path)
        saved = dict(ck["config"])
        for k, v in cfg.get("_overrides", {}).items():   # e.g. --epochs to extend a run
            saved[k] = v
        cfg, run_dir = saved, resume
        if ck["world_size"] != world:
            raise ValueError(f"checkpoint {main_path!r} was written by {ck['world_size']} ranks, this "
                             f"job has {world}: per-rank residuals cannot be mapped (resume with the same -np)")
        shard = load_checkpoint(shard_path(main_path, rank), SHARD_FORMAT)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}

    train_ds, val_ds, classes = build_datasets(cfg)
    nc = len(classes)
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["model"], nc, cfg["image_size"]).to(device)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg["seed"], drop_last=True)
    loader = DataLoader(train_ds, batch_size=cfg["batch_size"], sampler=sampler,
                        num_workers=cfg["workers"], drop_last=True,
                        persistent_workers=cfg["workers"] > 0)
    steps_per_epoch = len(loader)
    if cfg["max_steps_per_epoch"]:
        steps_per_epoch = min(steps_per_epoch, cfg["max_steps_per_epoch"])
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train_ds)} training images are too few for batch_size "
                         f"{cfg['batch_size']} x {world} ranks")
    decentral = cfg["algorithm"] in ("rdpsgd", "dpsgd")
    rd = None
    if decentral:
        from mpi4py import MPI

        from .rdpsgd import RDPSGD
        if MPI.COMM_WORLD.Get_size() != world:
            raise ValueError("algorithm rdpsgd/dpsgd exchanges parameters over MPI: launch with "
                             "mpirun or horovodrun --mpi (this job's MPI world has "
                             f"{MPI.COMM_WORLD.Get_size()} process(es), Horovod {world})")
        comp = make_compression(dict(cfg, compression="none"), model)   # byte counter only
        rd = RDPSGD(model, sparsity_ratio=1.0 if cfg["algorithm"] == "dpsgd" else cfg["sparsity_ratio"],
                    sync_every=cfg["sync_every"], send_indices=cfg["send_indices"],
                    seed=cfg["seed"], timeout=cfg["rd_timeout"])
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                              weight_decay=cfg["weight_decay"], nesterov=cfg["nesterov"])
    else:
        comp = make_compression(cfg, model)
        base_opt = make_optimizer(cfg, model, comp)
        opt = hvd.DistributedOptimizer(base_opt, named_parameters=model.named_parameters(),
                                       compression=comp)
    start_epoch, history, cum_bytes = 0, [], 0
    if ck is not None:
        model.load_state_dict(shard["model"] if decentral else ck["model"])
        opt.load_state_dict(shard["optimizer"] if decentral else ck["optimizer"])
        comp.load_state_dict(shard["compression"])
        if decentral:
            rd.load_state_dict(shard["rdpsgd"])
        torch.set_rng_state(shard["torch_rng"])
        if device.type == "cuda" and shard.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(shard["cuda_rng"])
        start_epoch, history = ck["epoch"] + 1, ck["history"]
        cum_bytes = history[-1]["cum_bytes_per_worker"] if history else 0
    else:
        run_name = cfg["run_name"] or time.strftime(f"{cfg['compression']}-{cfg['model']}-%Y%m%d-%H%M%S")
        run_dir = os.path.join(cfg["out_dir"], run_name)
        if rank == 0:
            os.makedirs(run_dir, exist_ok=True)
    run_dir = hvd.broadcast_object(run_dir, root_rank=0, name="hvd_rsgc.run_dir")
    if ck is None or not decentral:      # decentralized nodes keep their own models on resume
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(opt, root_rank=0)
    if rank == 0:
        import yaml
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=True)
    tb = _tensorboard(run_dir) if rank == 0 else None
    show = rank == 0 and cfg["progress"] and not quiet

    end_epoch = cfg["epochs"]
    if cfg.get("stop_after"):
        end_epoch = min(end_epoch, start_epoch + int(cfg["stop_after"]))
    for epoch in range(start_epoch, end_epoch):
        t0 = time.time()
        sampler.set_epoch(epoch)
        comp.set_epoch(epoch)
        gen = _seed_gen(cfg["seed"], rank, epoch)
        if decentral:
            bytes0, rounds0 = rd.bytes_sent, rd.rounds
        else:
            st0 = comp.stats()
            bytes0, dense0 = st0["total_bytes"], st0["total_dense_bytes"]
        loss_sum, correct, seen = 0.0, 0, 0
        it = iter(loader)
        bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg['epochs']}") if show else None
        for step in range(steps_per_epoch):
            x, y = next(it)
            lr = lr_at(cfg, epoch + step / steps_per_epoch, world)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            xf = x.float()
            if cfg["augment"]:
                xf = augment(xf, gen)
            xb = normalize(xf, cfg["mean"], cfg["std"])
            opt.zero_grad()
            out = model(xb)
            loss = F.cross_entropy(out, y)
            loss.backward()
            if decentral:
                rd.mix()          # x <- W x on a random subset; the gradient was taken before
            opt.step()
            lv = loss.item()
            loss_sum += lv * y.numel()
            correct += int((out.argmax(1) == y).sum())
            seen += y.numel()
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{lv:.3f}", lr=f"{lr:.4f}")
        if bar:
            bar.close()
        del it
        average_buffers(model, hvd)
        consensus = None
        if decentral:
            avg = rd.average_parameters()
            consensus = rd.consensus_distance(avg)
            local = [p.detach().clone() for p in model.parameters()]
            with torch.no_grad():                      # evaluate the average model
                for p, a in zip(model.parameters(), avg):
                    p.copy_(a.to(p.device))
        tr = hvd.allreduce(torch.tensor([loss_sum, correct, seen], dtype=torch.float64),
                           op=hvd.Sum, name="hvd_rsgc.train.stats")
        cm, val_loss = evaluate(model, val_ds, cfg, hvd, nc)
        m = summarize(cm)
        if decentral:
            with torch.no_grad():
                for p, v in zip(model.parameters(), local):
                    p.copy_(v)
            ep_bytes = rd.bytes_sent - bytes0
            # dense D-PSGD: every round sends the whole fp32 vector to each neighbour
            ep_dense = (rd.rounds - rounds0) * 4 * rd.numel * len(rd.neighbours)
        else:
            st = comp.stats()
            ep_bytes = st["total_bytes"] - bytes0
            ep_dense = st["total_dense_bytes"] - dense0
        all_bytes = hvd.allgather_object(ep_bytes, name="hvd_rsgc.bytes")
        cum_bytes += ep_bytes
        rec = {"epoch": epoch + 1, "lr": lr, "train_loss": tr[0].item() / tr[2].item(),
               "train_acc": tr[1].item() / tr[2].item(), "val_loss": val_loss,
               "top1": m["oa"], "oa": m["oa"], "aa": m["aa"], "kappa": m["kappa"],
               "per_class": m["per_class"],
               "bytes_per_worker": ep_bytes, "bytes_mean_over_workers": sum(all_bytes) / world,
               "dense_bytes_per_worker": ep_dense,
               "compression_ratio": ep_dense / ep_bytes if ep_bytes else None,
               "cum_bytes_per_worker": cum_bytes, "seconds": time.time() - t0,
               "consensus_distance": consensus,
               "confusion": cm.tolist()}
        history.append(rec)
        main_path = os.path.join(run_dir, "checkpoints", f"epoch{epoch:04d}.pt")
        atomic_save({"format": SHARD_FORMAT, "rank": rank, "epoch": epoch,
                     "compression": comp.state_dict(), "torch_rng": torch.get_rng_state(),
                     **({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "rdpsgd": rd.state_dict()} if decentral else {}),
                     "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None},
                    shard_path(main_path, rank))
        hvd.barrier()
        if rank == 0:
            _log_epoch(run_dir, rec, tb)
            payload = {"format": CKPT_FORMAT, "epoch": epoch, "config": cfg,
                       "model": model.state_dict(), "optimizer": opt.state_dict(),
                       "history": history, "classes": classes, "world_size": world}
            save_checkpoint(run_dir, epoch, payload, cfg["keep_checkpoints"])
            if not quiet:
                ratio = f"{rec['compression_ratio']:.0f}x" if rec["compression_ratio"] else "-"
                cons = f"  consensus {consensus:.3g}" if consensus is not None else ""
                print(f"epoch {epoch + 1:3d}/{cfg['epochs']}  loss {rec['train_loss']:.4f}  "
                      f"train {rec['train_acc']:.3f}  OA {m['oa']:.4f}  AA {m['aa']:.4f}  "
                      f"kappa {m['kappa']:.4f}  sent {ep_bytes / 2**20:.2f} MiB/worker ({ratio})  "
                      f"{rec['seconds']:.1f}s{cons}", flush=True)
        hvd.barrier()
    summary = _finish(run_dir, history, classes, cfg, rank, quiet)
    if tb:
        tb.close()
    return summary


def _progress(total, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _tensorboard(run_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(os.path.join(run_dir, "tb"))
    except Exception:      # noqa: BLE001 - tensorboard not installed
        return None


def _log_epoch(run_dir, rec, tb):
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    cols = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "top1", "aa", "kappa",
            "bytes_per_worker", "dense_bytes_per_worker", "compression_ratio",
            "cum_bytes_per_worker", "seconds"]
    path = os.path.join(run_dir, "metrics.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(cols)
        w.writerow([rec[c] for c in cols])
    if tb:
        for k in ("train_loss", "train_acc", "val_loss", "top1", "aa", "kappa", "lr"):
            tb.add_scalar(k, rec[k], rec["epoch"])
        tb.add_scalar("cum_bytes_per_worker", rec["cum_bytes_per_worker"], rec["epoch"])


def _finish(run_dir, history, classes, cfg, rank, quiet):
    last = history[-1] if history else {}
    best = max(history, key=lambda r: r["top1"]) if history else {}
    summary = {"run_dir": run_dir, "compression": cfg["compression"], "algorithm": cfg["algorithm"],
               "model": cfg["model"],
               "dataset": cfg["dataset"], "epochs": len(history),
               "final_top1": last.get("top1"), "best_top1": best.get("top1"),
               "final_aa": last.get("aa"), "final_kappa": last.get("kappa"),
               "bytes_per_worker": sum(r["bytes_per_worker"] for r in history),
               "dense_bytes_per_worker": sum(r["dense_bytes_per_worker"] for r in history),
               "classes": classes, "per_class": last.get("per_class")}
    b = summary["bytes_per_worker"]
    summary["compression_ratio"] = summary["dense_bytes_per_worker"] / b if b else None
    if rank == 0:
        summary["plots"] = _plots(run_dir, history)
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if not quiet:
            print("\n== summary ==")
            print(f"run dir            {run_dir}")
            method = cfg["compression"] if cfg["algorithm"] == "horovod" else \
                f"{cfg['algorithm']} (p={cfg['sparsity_ratio'] if cfg['algorithm'] == 'rdpsgd' else 1.0}, {cfg['topology']})"
            print(f"method / model     {method} / {cfg['model']} on {cfg['dataset']}")
            print(f"final top-1 (OA)   {summary['final_top1']:.4f}   best {summary['best_top1']:.4f}")
            print(f"AA / kappa         {summary['final_aa']:.4f} / {summary['final_kappa']:.4f}")
            print("per class          " + ", ".join(f"{c}: {a:.2f}" for c, a in zip(classes, last.get("per_class", []))))
            print(f"sent per worker    {b / 2**20:.2f} MiB (dense {summary['dense_bytes_per_worker'] / 2**20:.1f} MiB"
                  f", ratio {summary['compression_ratio'] or 0:.1f}x)")
            for p in summary["plots"]:
                print(f"plot               {p}")
    return summary


def _plots(run_dir, history):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    ep = [r["epoch"] for r in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [r["train_loss"] for r in history], label="train loss")
    ax[0].plot(ep, [r["val_loss"] for r in history], label="val loss")
    ax[0].set_xlabel("epoch"); ax[0].legend()
    ax[1].plot(ep, [r["train_acc"] for r in history], label="train acc")
    ax[1].plot(ep, [r["top1"] for r in history], label="val top-1")
    ax[1].set_xlabel("epoch"); ax[1].legend()
    p1 = os.path.join(run_dir, "curves.png")
    fig.tight_layout(); fig.savefig(p1, dpi=100); plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r["cum_bytes_per_worker"] / 2**20 for r in history], [r["top1"] for r in history], "o-")
    ax.set_xlabel("cumulative MiB sent per worker"); ax.set_ylabel("val top-1")
    p2 = os.path.join(run_dir, "accuracy_vs_bytes.png")
    fig.tight_layout(); fig.savefig(p2, dpi=100); plt.close(fig)
    return [p1, p2]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hvd_rsgc.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--resume", default=None, metavar="RUN_DIR")
    args, rest = ap.parse_known_args(argv)
    overrides = parse_overrides(rest)
    if args.resume:
        cfg = dict(DEFAULTS)
        _merge(cfg, overrides, "command line")
        cfg["_overrides"] = overrides
    else:
        cfg = load_config(args.config, rest)
    run(cfg, resume=args.resume)


if __name__ == "__main__":
    main()
