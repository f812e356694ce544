"""Time to accuracy under thin links, on the emulated cluster (scripts/cluster.sh).

    python -m hvd_rsgc.bench tta [--nodes 4] [--links 100mbit,1gbit]
                                 [--methods none,fp16,dgc,rsdgc,rsdgc-int8,rdpsgd] [--out runs/tta] ...

Brings up N namespace nodes (or uses the cluster that is up, --reuse), and for each link rate
reshapes every node's link, then trains every method on N nodes x 1 rank from node1:
Horovod methods with ``horovodrun --gloo -H node1:1,...``, RD-PSGD with ``horovodrun --mpi``
(its exchange is mpi4py). Each run is the training application (``hvd_rsgc.train``) with the
same data, model, schedule and seed; only the method differs. While a run trains, the
benchmark watches its metrics.jsonl and records the wall-clock time (from the launch) at which
each epoch's line appears.

Reported per link and method: accuracy after every epoch against
  * training time: the sum of the epochs' ``seconds`` (forward/backward, compression,
    communication, evaluation; without start-up and checkpoint writes), and
  * wall-clock time from the launch (start-up, checkpoint writes included);
the time to reach the target accuracy (default: the dense fp32 run's final top-1 on that link;
``--target 0.8`` for a fixed one), speed-ups against fp32 and fp16, bytes sent per worker.
Writes ``tta.json``, ``tta.md`` and one ``tta_<link>.png`` (accuracy vs time) per link into
--out; the runs' own directories are under ``--out/<link>/<method>``. ``--report`` only
re-reads finished runs and rewrites the report.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from .emucluster import ROOT, EmuCluster, unavailable

METHODS = {
    # name: (label, overrides, controller)
    "none": ("dense fp32", ["--compression", "none"], "--gloo"),
    "fp16": ("fp16", ["--compression", "fp16"], "--gloo"),
    "topk": ("Top-k", ["--compression", "topk"], "--gloo"),
    "dgc": ("DGC", ["--compression", "dgc"], "--gloo"),
    "rsdgc": ("RS-DGC", ["--compression", "rsdgc"], "--gloo"),
    "rsdgc-int8": ("RS-DGC, int8 values", ["--compression", "rsdgc", "--int8_values", "true"], "--gloo"),
    "rdpsgd": ("RD-PSGD", ["--algorithm", "rdpsgd"], "--mpi"),
}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m hvd_rsgc.bench tta", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--links", default="100mbit,1gbit", help="comma-separated tc rates")
    ap.add_argument("--methods", default="none,fp16,dgc,rsdgc,rsdgc-int8,rdpsgd")
    ap.add_argument("--out", default=os.path.join("runs", "tta"))
    ap.add_argument("--dataset", default="demo")
    ap.add_argument("--model", default="vgg19")
    ap.add_argument("--image_size", type=int, default=32)
    ap.add_argument("--batch_size", type=int, default=16, help="per worker")
    ap.add_argument("--epochs", type=int, default=5, help="schedule length of dense fp32 and fp16")
    ap.add_argument("--epochs_sparse", type=int, default=10,
                    help="schedule length of DGC, RS-DGC, Top-k and RD-PSGD (they learn less per step)")
    ap.add_argument("--max_steps_per_epoch", type=int, default=None)
    ap.add_argument("--lr", default="0.02")
    ap.add_argument("--lr_warmup_epochs", default="1")
    ap.add_argument("--augment", default="false")
    ap.add_argument("--density", default="0.01", help="DGC / RS-DGC / Top-k density")
    ap.add_argument("--compression_warmup_epochs", default="2",
                    help="DGC's density warm-up (0.25, 0.0625, ... per epoch) for DGC / RS-DGC")
    ap.add_argument("--warmup_ramp_steps", type=int, default=0,
                    help="DGC / RS-DGC: warm up with the per-step ramp 0.25^(1+4t/T) over T steps "
                         "instead of --compression_warmup_epochs")
    ap.add_argument("--sparsity_ratio", default="0.1", help="RD-PSGD's p")
    ap.add_argument("--bn_batches", default="4",
                    help="training batches per rank that re-estimate BatchNorm statistics before "
                         "each evaluation, for every method alike (RD-PSGD's average model needs "
                         "them; the others get the same treatment so that all are measured the same way)")
    ap.add_argument("--deterministic", default="true", choices=("true", "false"),
                    help="every run with --deterministic (fixed allreduce groups: two runs of one "
                         "seed give the same accuracies, so the dense target is pinned; README, "
                         "'Reproducible runs'); false: Horovod's timing-dependent fusion")
    ap.add_argument("--extra", default="", help="more training overrides for every run, e.g. '--seed 1'")
    ap.add_argument("--target", default="dense-final",
                    help="dense-final | dense-best | an accuracy in [0, 1]")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--no_stop", action="store_true",
                    help="train every run to its last epoch (default: stop a run once it reached the "
                         "target, or once its training time passed --cap x the dense run's time to target)")
    ap.add_argument("--cap", type=float, default=1.0)
    ap.add_argument("--reuse", action="store_true", help="use the cluster that is up (N nodes)")
    ap.add_argument("--keep", action="store_true", help="leave the cluster up afterwards")
    ap.add_argument("--skip_done", action="store_true", help="keep finished runs found in --out")
    ap.add_argument("--report", action="store_true", help="only rebuild the report from --out")
    args = ap.parse_args(argv)
    args.links = [x for x in args.links.split(",") if x]
    args.methods = [x for x in args.methods.split(",") if x]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; known: {sorted(METHODS)}")
    if args.target not in ("dense-final", "dense-best"):
        try:
            ok = 0.0 <= float(args.target) <= 1.0
        except ValueError:
            ok = False
        if not ok:
            ap.error(f"--target: dense-final, dense-best or an accuracy in [0, 1], got {args.target!r}")
    for name in ("nodes", "epochs", "epochs_sparse", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.links or not args.methods:
        ap.error("--links and --methods need at least one entry each")
    return args


SPARSE = ("dgc", "rsdgc", "rsdgc-int8", "topk", "rdpsgd")


def epochs_of(args, method):
    return args.epochs_sparse if method in SPARSE else args.epochs


def train_overrides(args, method):
    ov = ["--dataset", args.dataset, "--model", args.model, "--image_size", str(args.image_size),
          "--batch_size", str(args.batch_size), "--epochs", str(epochs_of(args, method)),
          "--lr", str(args.lr), "--lr_warmup_epochs", str(args.lr_warmup_epochs),
          "--lr_schedule", "cosine", "--augment", str(args.augment), "--density", str(args.density),
          "--sparsity_ratio", str(args.sparsity_ratio), "--progress", "false",
          "--keep_checkpoints", "1", "--workers", "0", "--bn_batches", str(args.bn_batches),
          "--deterministic", args.deterministic]
    if method in ("dgc", "rsdgc", "rsdgc-int8"):
        ov += (["--compression_warmup_epochs", "0", "--warmup_ramp_steps", str(args.warmup_ramp_steps)]
               if args.warmup_ramp_steps else
               ["--compression_warmup_epochs", str(args.compression_warmup_epochs)])
    if args.max_steps_per_epoch:
        ov += ["--max_steps_per_epoch", str(args.max_steps_per_epoch)]
    ov += METHODS[method][1]
    ov += args.extra.split()
    return ov


def _run_pids(run_dir):
    """Processes (in any node: the nodes share this PID namespace) of this run: their command
    line has ``--out_dir <parent> --run_name <name>`` (the training's argv; the whole path
    appears in none of them) or the run directory itself."""
    whole = run_dir.encode()
    parent = b"\0" + os.path.dirname(run_dir).encode() + b"\0"
    name = b"--run_name\0" + os.path.basename(run_dir).encode() + b"\0"
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read()
            except OSError:
                continue
            if whole in argv or (name in argv and parent in argv):
                pids.append(int(d))
    return pids


def stop_run(proc, run_dir, grace=20.0):
    """Stop a run: SIGTERM to the launcher (horovodrun tears its ranks down), then SIGKILL to
    what is left of it in every node."""
    import signal
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for pid in _run_pids(run_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        t0 = time.time()
        while time.time() - t0 < grace and (proc.poll() is None or _run_pids(run_dir)):
            time.sleep(0.2)
        if proc.poll() is not None and not _run_pids(run_dir):
            return
    proc.wait()


def _follow(proc, args, run_dir, metrics, t0, target, budget):
    """Poll a run's metrics until it ends, reaches ``target``, spends ``budget`` or times out;
    -> (rc, why it was stopped or None, wall time of each epoch)."""
    walls, seen, train_s, stopped = [], 0, 0.0, None
    while True:
        rc = proc.poll()
        if os.path.exists(metrics):
            with open(metrics) as f:
                lines = f.read().splitlines()
            while seen < len(lines) and lines[seen].endswith("}"):
                walls.append(time.time() - t0)
                rec = json.loads(lines[seen])
                train_s += rec["seconds"]
                print(f"[tta]   epoch {rec['epoch']:3d}  top-1 {rec['top1']:.3f}  "
                      f"{rec['seconds']:7.1f} s  wall {walls[-1]:7.1f} s", flush=True)
                seen += 1
                if rc is None and target is not None and rec["top1"] >= target - 1e-9:
                    stopped = "target reached"
                elif rc is None and budget is not None and train_s > budget:
                    stopped = "budget spent"
        if rc is not None:
            return rc, stopped, walls
        if stopped:
            print(f"[tta]   stopping the run: {stopped}", flush=True)
            stop_run(proc, run_dir)
            return 0, stopped, walls
        if time.time() - t0 > args.timeout:
            stop_run(proc, run_dir)
            return "timeout", stopped, walls
        time.sleep(0.25)


def launch(cluster, args, link, method, run_dir, target=None, budget=None):
    """Train one method on the cluster; returns the run record (epochs with wall times).
    With ``target``, the run is stopped once an epoch reaches it; with ``budget`` (training
    seconds), once its training time passed the budget without reaching the target."""
    label, _, controller = METHODS[method]
    n = args.nodes
    py = sys.executable
    venv_bin = os.path.dirname(py)
    cmd = [os.path.join(venv_bin, "horovodrun"), "-np", str(n), "-H", cluster.hosts(1, n), controller,
           "--start-timeout", "300",          # a loaded box needs more than the default 30 s
           "env", f"PYTHONPATH={ROOT}", py, "-m", "hvd_rsgc.train",
           "--out_dir", os.path.dirname(run_dir), "--run_name", os.path.basename(run_dir),
           *train_overrides(args, method)]
    env = {"PYTHONPATH": ROOT, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    os.makedirs(run_dir, exist_ok=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    for f in os.listdir(run_dir):                 # a fresh run: no stale metrics/checkpoints
        p = os.path.join(run_dir, f)
        if os.path.isfile(p):
            os.remove(p)
    log_path = os.path.join(os.path.dirname(run_dir), f"{method}.log")
    print(f"[tta] {link} {label}: {' '.join(cmd[:8])} ... ({epochs_of(args, method)} epochs"
          + (f"; stop at top-1 {target:.3f}" if target is not None else "")
          + (f" or after {budget:.0f} s of training" if budget is not None else "") + ")", flush=True)
    load0 = os.getloadavg()
    with open(log_path, "w") as log:
        t0 = time.time()
        proc = cluster.popen("node1", cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc, stopped, walls = _follow(proc, args, run_dir, metrics, t0, target, budget)
        except BaseException:                 # Ctrl-C (the run is in its own session), a bug
            stop_run(proc, run_dir)
            raise
        total = time.time() - t0
    if rc != 0:
        tail = open(log_path, errors="replace").read()[-3000:]
        raise RuntimeError(f"{link} {method}: training failed (rc {rc}); log {log_path}:\n{tail}")
    recs = [json.loads(line) for line in open(metrics) if line.endswith("}\n") or line.endswith("}")]
    walls += [total] * (len(recs) - len(walls))   # lines written in the last poll interval
    out = {"method": method, "label": label, "link": link, "run_dir": run_dir, "total_wall_s": total,
           "schedule_epochs": epochs_of(args, method), "stopped": stopped,
           "nodes": args.nodes, "overrides": train_overrides(args, method),
           "loadavg_before": load0, "loadavg_after": os.getloadavg(),
           "epochs": [{"epoch": r["epoch"], "top1": r["top1"], "seconds": r["seconds"],
                       "bytes_per_worker": r["bytes_per_worker"],
                       "dense_bytes_per_worker": r["dense_bytes_per_worker"],
                       "wall_s": w} for r, w in zip(recs, walls)]}
    with open(os.path.join(run_dir, "tta_run.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


# ----------------------------------------------------------------------------- analysis
def time_to(run, target, key):
    """Time (cumulative training seconds, or wall seconds) at the first epoch reaching target."""
    cum = 0.0
    for e in run["epochs"]:
        cum += e["seconds"]
        if e["top1"] >= target - 1e-9:
            return cum if key == "train" else e["wall_s"]
    return None


def analyse(results, target_spec, missing=None):
    """results: {link: {method: run}} -> {link: {"target": t, "rows": {method: row}}}.
    ``missing``: a list that collects the links left out for want of the dense run the target
    needs (else that is an error)."""
    report = {}
    for link, runs in results.items():
        if target_spec in ("dense-final", "dense-best"):
            if "none" not in runs:
                if missing is not None:
                    missing.append(f"{link}: no report (target {target_spec} needs the dense run, "
                                   "which did not finish)")
                    continue
                raise ValueError(f"target {target_spec} needs the dense run ('none') on {link}")
            accs = [e["top1"] for e in runs["none"]["epochs"]]
            target = accs[-1] if target_spec == "dense-final" else max(accs)
        else:
            target = float(target_spec)
        rows = {}
        for m, run in runs.items():
            ep = run["epochs"]
            rows[m] = {"label": run["label"], "epochs": len(ep), "final_top1": ep[-1]["top1"],
                       "best_top1": max(e["top1"] for e in ep),
                       "train_s": sum(e["seconds"] for e in ep), "wall_s": run["total_wall_s"],
                       "s_per_epoch": sum(e["seconds"] for e in ep) / len(ep),
                       "bytes_per_worker": sum(e["bytes_per_worker"] for e in ep),
                       "dense_bytes_per_worker": sum(e["dense_bytes_per_worker"] for e in ep),
                       "tta_train_s": time_to(run, target, "train"),
                       "tta_wall_s": time_to(run, target, "wall")}
        for r in rows.values():
            for ref in ("none", "fp16"):
                for key in ("train", "wall"):
                    a = rows.get(ref, {}).get(f"tta_{key}_s")
                    b = r[f"tta_{key}_s"]
                    r[f"speedup_{key}_vs_{ref}"] = (a / b) if (a and b) else None
        report[link] = {"target": target, "rows": rows}
    return report


def _f(x, fmt="{:.1f}", none="not reached"):
    return none if x is None else fmt.format(x)


def markdown(report, args_desc):
    out = ["# Time to accuracy on the emulated cluster\n", args_desc, ""]
    for link, rep in report.items():
        out.append(f"## links {link}: target top-1 {rep['target']:.3f}\n")
        out.append("| method | final / best top-1 | MiB sent per worker | s per epoch | time to target: training s | wall s | speed-up vs fp32 | vs fp16 |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in rep["rows"].values():
            out.append(f"| {r['label']} | {r['final_top1']:.3f} / {r['best_top1']:.3f} | "
                       f"{r['bytes_per_worker'] / 2**20:,.1f} | {r['s_per_epoch']:.1f} | "
                       f"{_f(r['tta_train_s'])} | {_f(r['tta_wall_s'])} | "
                       f"{_f(r['speedup_train_vs_none'], '{:.2f}x', '-')} | "
                       f"{_f(r['speedup_train_vs_fp16'], '{:.2f}x', '-')} |")
        out.append("")
    return "\n".join(out)


def plot(results, report, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for link, runs in results.items():
        if not runs or link not in report:        # every run on this link failed
            continue
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for run in runs.values():
            cum, xs = 0.0, []
            for e in run["epochs"]:
                cum += e["seconds"]
                xs.append(cum)
            ys = [e["top1"] for e in run["epochs"]]
            ax[0].plot(xs, ys, "o-", ms=3, label=run["label"])
            ax[1].plot([e["wall_s"] for e in run["epochs"]], ys, "o-", ms=3, label=run["label"])
        for a, name in zip(ax, ("training time (s)", "wall-clock from launch (s)")):
            a.axhline(report[link]["target"], color="grey", ls="--", lw=1, label="target")
            a.set_xlabel(name)
            a.set_ylabel("val top-1")
            a.set_title(f"links {link}")
            a.legend(fontsize=8)
        p = os.path.join(out_dir, f"tta_{link}.png")
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    results = {}
    desc = (f"{args.nodes} nodes x 1 rank, {args.model} on {args.dataset} at {args.image_size} px, "
            f"batch {args.batch_size}/worker, augment {args.augment}, lr {args.lr} (warm-up "
            f"{args.lr_warmup_epochs} epoch) cosine over {args.epochs} epochs (fp32, fp16) / "
            f"{args.epochs_sparse} epochs (DGC, RS-DGC, Top-k, RD-PSGD)"
            + (f" of {args.max_steps_per_epoch} steps" if args.max_steps_per_epoch else "")
            + f"; density {args.density} with "
            + (f"a {args.warmup_ramp_steps}-step warm-up ramp" if args.warmup_ramp_steps
               else f"{args.compression_warmup_epochs} warm-up epochs") + " (DGC, RS-DGC), "
            f"RD-PSGD p={args.sparsity_ratio}; BatchNorm statistics re-estimated from "
            f"{args.bn_batches} batches per rank before each evaluation"
            + ("; deterministic (fixed allreduce groups)" if args.deterministic == "true" else
               "; Horovod's own (timing-dependent) fusion")
            + (f"; extra: {args.extra}" if args.extra else "") + f"; target: {args.target}"
            + ("" if args.no_stop else f"; runs stop at the target or after {args.cap} x the dense "
               "run's time to target") + ".")
    cluster = None
    if not args.report:
        why = unavailable()
        if why:
            sys.exit(f"bench_tta: {why}")
        if args.dataset == "demo":
            # built here, where PyPI is reachable: the nodes' namespaces have no route out, and
            # every node reads the same cache under $HOME
            from .data.demo import build
            print(f"[tta] demo set: {build(quiet=True)}", flush=True)
        cluster = EmuCluster()
        if args.reuse:
            if not cluster.is_up() or cluster.size() < args.nodes:
                sys.exit(f"bench_tta: --reuse needs a cluster of >= {args.nodes} nodes up "
                         f"(scripts/cluster.sh up {args.nodes})")
        else:
            print(f"[tta] bringing up {args.nodes} nodes", flush=True)
            cluster.up(args.nodes, bw=args.links[0])
    t_all = time.time()
    failed = []
    try:
        for link in args.links:
            results[link] = {}
            if cluster is not None:
                cluster.shape("all", bw=link)
            for m in args.methods:
                run_dir = os.path.join(out, link, m)
                done = os.path.join(run_dir, "tta_run.json")
                if args.report or (args.skip_done and os.path.exists(done)):
                    kept = json.load(open(done)) if os.path.exists(done) else None
                    same = kept is not None and kept.get("overrides") == train_overrides(args, m) \
                        and kept.get("nodes") == args.nodes
                    if kept is not None and (same or args.report):
                        results[link][m] = kept
                        continue
                    if args.report:
                        continue
                    if kept is not None:                     # another seed, model, ...: not reused
                        print(f"[tta] {link} {m}: the run in {run_dir} had other settings; "
                              "running it again", flush=True)
                target = budget = None
                if not args.no_stop and m != "none":
                    try:
                        rep = analyse({link: results[link]}, args.target)[link]
                        target = rep["target"]
                        dense_t = rep["rows"].get("none", {}).get("tta_train_s")
                        budget = args.cap * dense_t if dense_t else None
                    except ValueError:
                        pass
                for attempt in (1, 2):        # a launch can fail at start-up on a loaded box
                    try:
                        results[link][m] = launch(cluster, args, link, m, run_dir, target, budget)
                        break
                    except RuntimeError as e:
                        print(f"[tta] {link} {m}: attempt {attempt} failed: {str(e)[:300]}", flush=True)
                        if attempt == 2:
                            failed.append(f"{link} {m}: {str(e).splitlines()[0]}")
    finally:
        if cluster is not None and not args.keep and not args.reuse:
            cluster.down(check=False)
    report = analyse({k: v for k, v in results.items() if v}, args.target, missing=failed)
    if args.report and os.path.exists(os.path.join(out, "tta.json")):   # the runs' own setup
        desc = json.load(open(os.path.join(out, "tta.json"))).get("description", desc)
    md = markdown(report, desc + ("" if args.report else f" Benchmark wall time {time.time() - t_all:.0f} s.")
                  + "".join(f"\n\nFAILED: {f}" for f in failed))
    with open(os.path.join(out, "tta.json"), "w") as f:
        json.dump({"config": vars(args), "description": desc, "report": report, "runs": results}, f, indent=1)
    with open(os.path.join(out, "tta.md"), "w") as f:
        f.write(md + "\n")
    plots = plot(results, report, out)
    print(md)
    for p in plots:
        print(f"plot {p}")
    return report


if __name__ == "__main__":
    main()
