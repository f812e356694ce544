"""What a run shows and writes: the progress bar (rank 0 only), one line per epoch, metrics
as JSONL + CSV (rows past the resumed epoch are dropped first, so a resume never duplicates
them), TensorBoard events if installed, plots and ``summary.json`` (strict JSON: a metric that
is not a number is written as null)."""
from __future__ import annotations

import csv
import json
import math
import os
import sys

import torch

CSV_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "top1", "aa", "kappa",
               "bytes_per_worker", "dense_bytes_per_worker", "compression_ratio",
               "cum_bytes_per_worker", "seconds", "skipped_steps"]


def json_safe(x):
    """NaN/inf -> None, recursively (``json.dump(allow_nan=False)`` then never fails)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _row(line: str):
    """One metrics.jsonl row, or None for a blank or cut-off line."""
    try:
        rec = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) else None


class Reporter:
    """Rank 0's reporting for one run directory; on other ranks every call does nothing."""

    def __init__(self, run_dir: str, rank: int, quiet: bool, progress: bool):
        self.run_dir = run_dir
        self.active = rank == 0
        self.quiet = quiet or not self.active
        self.progress = progress and self.active and not quiet
        self.tb = None                  # opened by truncate(), which knows where the run goes on

    def truncate(self, last_epoch: int) -> None:
        """Drop logged rows after ``last_epoch`` (1-based), e.g. when resuming from an older
        checkpoint than the last logged epoch, or all of them for a new run in a directory
        that has some; TensorBoard's events too (``purge_step``: a resumed run's superseded
        epochs, or an earlier run's curves, are not shown beside this one's)."""
        if not self.active:
            return
        if self.tb:
            self.tb.close()
        self.tb = _tensorboard(self.run_dir, purge_step=last_epoch + 1)
        # a row cut off by a job killed while it was written (rows go out before the epoch's
        # checkpoint, so it is one of the dropped epochs) is dropped, not a parse error; each
        # file is rewritten through a temporary one, so a kill now leaves the old or the new
        jl = os.path.join(self.run_dir, "metrics.jsonl")
        if os.path.exists(jl):
            with open(jl) as f:
                keep = [ln for ln in f if (rec := _row(ln)) is not None and rec["epoch"] <= last_epoch]
            with open(jl + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(jl + ".tmp", jl)
        path = os.path.join(self.run_dir, "metrics.csv")
        if os.path.exists(path):
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            head, body = (rows[0], rows[1:]) if rows else (CSV_COLUMNS, [])
            with open(path + ".tmp", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(head)
                w.writerows(r for r in body if len(r) == len(head) and r[0].isdigit()
                            and int(r[0]) <= last_epoch)
            os.replace(path + ".tmp", path)

    def bar(self, total: int, desc: str):
        if not self.progress:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        # under horovodrun (or into a log) stderr is a pipe that prefixes every update with
        # "[0]<stderr>:": update rarely there, so a log stays readable; a terminal gets a live bar
        tty = sys.stderr.isatty()
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=tty, ncols=None if tty else 80,
                    mininterval=0.1 if tty else 15.0, file=sys.stderr)

    def epoch(self, rec: dict, epochs: int) -> None:
        if not self.active:
            return
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(json_safe(rec), allow_nan=False) + "\n")
        path = os.path.join(self.run_dir, "metrics.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(CSV_COLUMNS)
            w.writerow([rec.get(c) for c in CSV_COLUMNS])
        if self.tb:
            for k in ("train_loss", "train_acc", "val_loss", "top1", "aa", "kappa", "lr"):
                self.tb.add_scalar(k, rec[k], rec["epoch"])
            self.tb.add_scalar("cum_bytes_per_worker", rec["cum_bytes_per_worker"], rec["epoch"])
        if not self.quiet:
            ratio = f"{rec['compression_ratio']:.0f}x" if rec["compression_ratio"] else "-"
            cons = rec.get("consensus_distance")
            cons = f"  consensus {cons:.3g}" if cons is not None else ""
            skipped = f"  skipped {rec['skipped_steps']}" if rec.get("skipped_steps") else ""
            print(f"epoch {rec['epoch']:3d}/{epochs}  loss {rec['train_loss']:.4f}  "
                  f"train {rec['train_acc']:.3f}  OA {rec['oa']:.4f}  AA {rec['aa']:.4f}  "
                  f"kappa {rec['kappa']:.4f}  sent {rec['bytes_per_worker'] / 2**20:.2f} "
                  f"MiB/worker ({ratio})  {rec['seconds']:.1f}s{cons}{skipped}", flush=True)

    def finish(self, history: list, classes: list, flat: dict, skipped_images=()) -> dict:
        last = history[-1] if history else {}
        best = max(history, key=lambda r: r["top1"]) if history else {}
        summary = {"run_dir": self.run_dir, "compression": flat["compression"],
                   "algorithm": flat["algorithm"], "model": flat["model"],
                   "dataset": flat["dataset"], "epochs": len(history),
                   "final_top1": last.get("top1"), "best_top1": best.get("top1"),
                   "final_aa": last.get("aa"), "final_kappa": last.get("kappa"),
                   "bytes_per_worker": sum(r["bytes_per_worker"] for r in history),
                   "dense_bytes_per_worker": sum(r["dense_bytes_per_worker"] for r in history),
                   "seconds": sum(r["seconds"] for r in history),
                   "torch_threads": torch.get_num_threads(),
                   "classes": classes, "per_class": last.get("per_class"),
                   "skipped_images": len(skipped_images),
                   "skipped_image_files": list(skipped_images)[:20]}
        b = summary["bytes_per_worker"]
        summary["compression_ratio"] = summary["dense_bytes_per_worker"] / b if b else None
        if not self.active:
            return summary
        summary["plots"] = _plots(self.run_dir, history)
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(json_safe(summary), f, indent=2, allow_nan=False)
        if self.tb:
            self.tb.close()
        if not self.quiet:
            _print_summary(summary, flat, classes, last)
        return summary


def _print_summary(s, flat, classes, last):
    print("\n== summary ==")
    print(f"run dir            {s['run_dir']}")
    method = flat["compression"] if flat["algorithm"] == "horovod" else \
        f"{flat['algorithm']} (p={flat['sparsity_ratio'] if flat['algorithm'] == 'rdpsgd' else 1.0}, " \
        f"{flat['topology']})"
    print(f"method / model     {method} / {flat['model']} on {flat['dataset']}")
    print(f"threads per rank   {s['torch_threads']} (OMP_NUM_THREADS, else CPUs / ranks on a node)")
    print(f"final top-1 (OA)   {s['final_top1']:.4f}   best {s['best_top1']:.4f}")
    print(f"AA / kappa         {s['final_aa']:.4f} / {s['final_kappa']:.4f}")
    print("per class          " + ", ".join(f"{c}: {a:.2f}" for c, a in zip(classes, last.get("per_class", []))))
    print(f"sent per worker    {s['bytes_per_worker'] / 2**20:.2f} MiB (dense "
          f"{s['dense_bytes_per_worker'] / 2**20:.1f} MiB, ratio {s['compression_ratio'] or 0:.1f}x)")
    for p in s["plots"]:
        print(f"plot               {p}")


def _tensorboard(run_dir, purge_step=None):
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)
    except Exception:      # noqa: BLE001 - tensorboard not installed
        return None


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
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    ax[1].plot(ep, [r["train_acc"] for r in history], label="train acc")
    ax[1].plot(ep, [r["top1"] for r in history], label="val top-1")
    ax[1].set_xlabel("epoch")
    ax[1].legend()
    p1 = os.path.join(run_dir, "curves.png")
    fig.tight_layout()
    fig.savefig(p1, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r["cum_bytes_per_worker"] / 2**20 for r in history], [r["top1"] for r in history], "o-")
    ax.set_xlabel("cumulative MiB sent per worker")
    ax.set_ylabel("val top-1")
    p2 = os.path.join(run_dir, "accuracy_vs_bytes.png")
    fig.tight_layout()
    fig.savefig(p2, dpi=100)
    plt.close(fig)
    return [p1, p2]
