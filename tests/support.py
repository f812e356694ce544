"""Test support in one place: the repository root, the launchers (real ``horovodrun``,
``mpirun``), reading the per-rank JSON the workers under ``tests/mp/`` write, and the
throw-away local Slurm cluster (``slurm_local.py``), the emulated multi-node cluster a test may
bring up (``emulated_cluster``), and a transport whose ranks are threads (``run_threads``)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import types
import weakref

import pytest
import torch

from hvd_rsgc.engine import ByteMeter
from hvd_rsgc.transport import Handle, Transport

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MP = os.path.join(ROOT, "tests", "mp")


def _env(**extra):
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra)


def _exe(name: str, hint: str) -> str:
    exe = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.fail(f"{name} not found: {hint}")
    return exe


def horovodrun() -> str:
    return _exe("horovodrun", "run scripts/install.sh (the README's test command does)")


def launch(np_, out, *args, timeout=600, worker=os.path.join(MP, "worker.py"), controller="--gloo"):
    """``horovodrun -np N <controller> python <worker> --out OUT args``; (process, seconds)."""
    cmd = [horovodrun(), "-np", str(np_), controller, sys.executable, worker, "--out", str(out), *args]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    return proc, time.time() - t0


def read_ranks(out, np_) -> list[dict]:
    res = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(np_)]
    assert [r["size"] for r in res] == [np_] * np_
    return res


def results(np_, out, *args, **kw) -> list[dict]:
    """Launch a worker, require success, return every rank's JSON."""
    proc, _ = launch(np_, out, *args, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_ranks(out, np_)


def run_module(np_, args, cwd, timeout=600, check=True):
    """``horovodrun -np N --gloo python -m <args>`` (the CLIs); returns the process."""
    cmd = [horovodrun(), "-np", str(np_), "--gloo", sys.executable, "-m", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=str(cwd))
    if check:
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p


def mpirun_python(np_, *py_args, timeout=300, cwd=None):
    """``mpirun -np N --oversubscribe python <py_args>``; (process, seconds)."""
    cmd = [_exe("mpirun", "scripts/install.sh installs Open MPI"), "-np", str(np_), "--oversubscribe",
           sys.executable, *py_args]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=cwd)
    return p, time.time() - t0


def torchrun(np_, *py_args, timeout=300, cwd=ROOT):
    """``python -m torch.distributed.run --nproc_per_node N <py_args>``; (process, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(np_),
           *py_args]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env=_env(OMP_NUM_THREADS="1"), cwd=cwd)
    return p, time.time() - t0


def assert_same_checkpoint(run_a, run_b, epoch: int, ranks: int):
    """Two runs' checkpoints of ``epoch`` hold the same model and, on every rank, the same
    compressor residuals, bit for bit (what a bit-exact resume or rerun must give). Returns
    the two main files' contents and run A's shards."""
    def load(run, suffix):
        return torch.load(os.path.join(run, "checkpoints", f"epoch{epoch:04d}{suffix}.pt"), weights_only=True)
    a, b = load(run_a, ""), load(run_b, "")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["model"].keys() == b["model"].keys() and a["model"]
    shards, kept = [], False
    for r in range(ranks):
        sa, sb = load(run_a, f".rank{r:03d}"), load(run_b, f".rank{r:03d}")
        # the loss scaler (--amp fp16) and the scale the residuals are in
        assert sa.get("scaler") == sb.get("scaler"), (r, sa.get("scaler"), sb.get("scaler"))
        assert sa["compression"].get("loss_scale") == sb["compression"].get("loss_scale"), r
        la, lb = sa["compression"]["layers"], sb["compression"]["layers"]
        assert la.keys() == lb.keys(), (r, sorted(la.keys() ^ lb.keys())[:4])
        for name, lay in la.items():
            assert lay["memory"].keys() == lb[name]["memory"].keys(), (r, name)
            for key, t in lay["memory"].items():
                assert torch.equal(t, lb[name]["memory"][key]), (r, name, key)
                kept = kept or bool(t.count_nonzero())
        shards.append(sa)
    # the same residuals, not two empty states (a compressor that kept nothing matched)
    assert kept or not any(s["compression"]["layers"] for s in shards), "no residual was kept"
    return a, b, shards


def claim_cluster_slot():
    """A cluster identity (prefix, subnet, slurmctld port) that no other live test session on
    this box uses: slot k is held by an flock on /tmp/hvd_rsgc-test-cluster-k.lock for the whole
    session (released when the process ends, even if it crashes). Two suites running at the same
    time (several engineers on one machine) thus never share, or tear down, each other's nodes."""
    import fcntl
    for k in range(1, 60):
        f = open(f"/tmp/hvd_rsgc-test-cluster-{k}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        return f, k
    pytest.skip("no free test-cluster slot (59 test sessions hold one)")


@contextlib.contextmanager
def emulated_cluster(state_dir: str, n: int = 2, bw: str = "100mbit"):
    """``scripts/cluster.sh up n`` on a slot of its own (own state directory, interface prefix
    hrtK-, subnet 10.77.(100+K).0/24 and slurmctld port); ``down`` afterwards, whatever happened."""
    from hvd_rsgc.app.emucluster import EmuCluster
    lock, k = claim_cluster_slot()
    c = EmuCluster(state_dir=state_dir, prefix=f"hrt{k}", net=f"10.77.{100 + k}", port=17900 + 2 * k)
    try:
        if c.leftovers():          # left by a crashed session that held this slot before
            c.down()
        c.up(n, bw=bw)
        yield c
    finally:
        if c.is_up() or c.leftovers():
            c.down(check=False)
        lock.close()


def sbatch_across_two_nodes(c, script: str, env: dict, tmp, timeout: float = 240) -> dict:
    """Submit ``script`` to the emulated cluster ``c`` with one task on each of 2 nodes; assert
    it COMPLETED on node[1-2] through srun with node2's slurmd running the step; -> the run's
    summary.json (``env["RUN_DIR"]``)."""
    args = ["--nodes=2", "-n", "2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10",
            f"--output={tmp}/job-%j.out", f"--error={tmp}/job-%j.err"]
    job = c.sbatch(script, args, env, cwd=ROOT)
    st = c.wait(job, timeout=timeout)
    info = c.job(job)
    out = open(os.path.join(tmp, f"job-{job}.out")).read()
    err = open(os.path.join(tmp, f"job-{job}.err")).read()
    assert st == "COMPLETED", out[-3000:] + err[-3000:]
    assert info["NumNodes"] == "2" and info["NodeList"] == "node[1-2]", info
    assert "launcher=srun tasks=2 nodes=2" in out
    # the step's task really ran on node2 too (its slurmd launched it)
    assert f"StepId={job}.0" in open(os.path.join(c.dir, "log", "slurmd-node2.log")).read()
    assert_one_world(env["RUN_DIR"], 2)          # one job across the nodes, not one per node
    return json.load(open(os.path.join(env["RUN_DIR"], "summary.json")))


class ThreadTransport(Transport):
    """``size`` ranks as threads of one process (a shared ``board`` and a
    ``threading.Barrier(size)``): allreduce sums, allgather concatenates in rank order, broadcast
    hands every rank the root's tensor, alltoall hands rank j the rows every rank addressed to it. Collectives complete at submission (every
    thread passes the barrier twice), so a test drives pure code over several "ranks" without
    launching processes."""

    def __init__(self, rank, size, board, barrier):
        super().__init__(ByteMeter())
        self.rank, self.size, self.board, self.barrier = rank, size, board, barrier

    def _post(self, name, value):
        self.board[(name, self.rank)] = value
        self.barrier.wait()
        got = [self.board[(name, r)] for r in range(self.size)]
        self.barrier.wait()
        return got

    def _allreduce(self, t, name, op):
        total = sum(self._post(name, t.clone()))
        return Handle(total / self.size if op == "average" else total)

    def _allgather(self, t, name, key):
        return Handle(torch.cat(self._post(name, t.clone())))

    def _broadcast(self, t, root, name):
        return Handle(self._post(name, t.clone())[root])

    def _alltoall(self, t, splits, name, key):
        parts = self._post(name, (t.clone(), list(splits)))
        rows, rsplits = [], []
        for src, sp in parts:
            lo = sum(sp[:self.rank])
            rows.append(src[lo:lo + sp[self.rank]])
            rsplits.append(sp[self.rank])
        return Handle((torch.cat(rows), rsplits))


def run_threads(size, fn):
    """``fn(rank, transport)`` on ``size`` threads sharing one :class:`ThreadTransport` board;
    returns {rank: result}; re-raises the first thread's exception."""
    import threading
    board, barrier, res, errs = {}, threading.Barrier(size), {}, []

    def main(r):
        try:
            res[r] = fn(r, ThreadTransport(r, size, board, barrier))
        except BaseException as exc:       # noqa: BLE001 - re-raised in the caller
            errs.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errs:
        raise errs[0]
    return res


def reachable_storage_bytes(root, exclude_ptrs=()) -> int:
    """Bytes of every tensor storage reachable from ``root`` through attributes, dicts and
    sequences (each storage once; ``exclude_ptrs``: storages not to count, e.g. the model's
    parameters): the memory an object holds, counted without asking it."""
    seen, storages, stack = set(), {}, [root]
    skip = (str, bytes, int, float, bool, complex, type(None), types.ModuleType, type,
            types.FunctionType, types.BuiltinFunctionType, types.MethodType, weakref.ref,
            torch.dtype, torch.device, torch.Generator)
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, skip):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if o.device.type != "meta":
                s = o.untyped_storage()
                if s.data_ptr() not in exclude_ptrs:
                    storages[s.data_ptr()] = s.nbytes()
            continue
        if isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        else:
            d = getattr(o, "__dict__", None)
            if isinstance(d, dict):
                stack.extend(d.values())
            for sl in getattr(type(o), "__slots__", ()):
                if hasattr(o, sl):
                    stack.append(getattr(o, sl))
    return sum(storages.values())


def assert_one_world(run, ranks: int):
    """The tasks formed one job of ``ranks`` ranks (PMIx wired up), not ``ranks`` jobs of one
    writing the same run directory: the first checkpoint says so, and every rank wrote its
    shard."""
    ck = os.path.join(str(run), "checkpoints", "epoch0000")
    main = torch.load(ck + ".pt", weights_only=True)
    assert main["world_size"] == ranks, main["world_size"]
    for r in range(ranks):
        assert torch.load(ck + f".rank{r:03d}.pt", weights_only=True)["rank"] == r


def tool(name: str) -> str:
    """The path of a lint tool the test command installs (the venv's first), or a failure that
    says so."""
    exe = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.fail(f"{name} not installed: scripts/test.sh installs it (pip install {name})")
    return exe
