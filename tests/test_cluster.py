"""The emulated multi-node cluster (scripts/cluster.sh): 2 network-namespace nodes with their own
hostnames, shaped links, sshd and slurmd; one Slurm job across both nodes (slurm/nwpu.sbatch,
srun --mpi=pmix), horovodrun and mpirun across nodes, a shaped transfer timed against the
configured rate, faults (a node killed mid-training then --resume bit-exactly, 1% packet loss,
a link down for 10 s), and `down` leaving nothing behind.

The test cluster uses its own state directory, interface prefix (hrtK-), subnet (10.77.(100+K).0/24)
and slurmctld port, K a slot no other live test session holds, so neither a cluster a user
started on the defaults nor a test suite running at the same time is ever touched."""
import glob
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from hvd_rsgc.app.emucluster import SCRIPT, unavailable  # noqa: E402
from support import assert_same_checkpoint, emulated_cluster, sbatch_across_two_nodes  # noqa: E402

VENV_BIN = os.path.dirname(sys.executable)
PY = sys.executable
SYNTH = os.path.join(ROOT, "examples", "configs", "synthetic.yaml")
RATE = 100e6                       # bit/s of the test cluster's links
why = unavailable()
if why is None and not os.path.exists(os.path.join(VENV_BIN, "horovodrun")):
    why = f"horovodrun not in {VENV_BIN} (run scripts/install.sh)"
needs_cluster = pytest.mark.skipif(why is not None, reason=f"emulated cluster cannot run here: {why}")
pytestmark = pytest.mark.multiproc

# a tiny, deterministic training run (synthetic textures, ResNet-20, 2 steps per epoch)
TRAIN = ["-m", "hvd_rsgc.train", "--config", SYNTH, "--progress", "false", "--max_steps_per_epoch", "2",
         "--synthetic_train", "128", "--synthetic_val", "64", "--compression", "dgc",
         "--compression_warmup_epochs", "1"]


def test_cluster_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    t0 = time.time()
    with emulated_cluster(str(tmp_path_factory.mktemp("emucluster")), 2, bw="100mbit") as c:
        c.up_seconds = time.time() - t0
        yield c


def env_for_ranks():
    """Environment for launches inside the nodes: the worktree's code, the venv's tools."""
    return {"PYTHONPATH": ROOT, "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def horovodrun_argv(c, args, np_=2, controller="--gloo"):
    # `env PYTHONPATH=...` travels with the command to the remote node (ssh)
    return [os.path.join(VENV_BIN, "horovodrun"), "-np", str(np_), "-H", c.hosts(1, np_), controller,
            "--start-timeout", "120", "env", f"PYTHONPATH={ROOT}", PY, *args]


def run_in_node1(c, argv, timeout=300, tmp=None):
    p = c.run("node1", argv, timeout=timeout, env=env_for_ranks(), cwd=str(tmp) if tmp else ROOT)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p


# ----------------------------------------------------------------------------- basics
@needs_cluster
def test_nodes_have_their_own_hostnames_hosts_and_ssh(cluster):
    assert cluster.up_seconds < 60
    names = [cluster.run(f"node{i}", ["hostname"], check=True).stdout.strip() for i in (1, 2)]
    assert names == ["node1", "node2"]
    assert os.uname().nodename not in names             # the root namespace keeps its name
    hosts = cluster.run("node1", ["cat", "/etc/hosts"], check=True).stdout
    assert f"{cluster.net}.12 node2" in hosts
    assert "node2" not in open("/etc/hosts").read()     # the real /etc/hosts is not edited
    p = cluster.run("node1", ["ssh", "node2", "hostname"], check=True, timeout=60)
    assert p.stdout.strip() == "node2"
    # each node runs on its own CPU share
    cpus = [cluster.run(f"node{i}", ["grep", "Cpus_allowed_list", "/proc/self/status"], check=True).stdout for i in (1, 2)]
    assert cpus[0] != cpus[1] or os.cpu_count() == 1
    # a second `up` over a live cluster is refused, not merged
    p = cluster.cmd("up", 2, check=False)
    assert p.returncode != 0 and "down" in p.stderr


XFER = r"""
import socket, sys, time
mode, host, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "serve":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 5999)); s.listen(1); print("ready", flush=True)
    c, _ = s.accept(); got = 0
    while got < n:
        b = c.recv(1 << 20)
        if not b: break
        got += len(b)
    c.sendall(b"k"); print(got)
else:
    c = socket.create_connection((host, 5999)); buf = b"x" * (1 << 20)
    t0 = time.perf_counter(); sent = 0
    while sent < n:
        k = min(len(buf), n - sent); c.sendall(buf[:k]); sent += k
    assert c.recv(1) == b"k"
    print(time.perf_counter() - t0)
"""


def transfer(cluster, tmp_path, nbytes):
    """Seconds to send nbytes node1 -> node2 over TCP (until the receiver acknowledged all)."""
    script = tmp_path / "xfer.py"
    script.write_text(XFER)
    srv = cluster.popen("node2", [PY, str(script), "serve", f"{cluster.net}.12", nbytes], stdout=subprocess.PIPE,
                        text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        p = cluster.run("node1", [PY, str(script), "send", "node2", nbytes], timeout=120, check=True)
        assert srv.wait(60) == 0
        assert int(srv.stdout.read().split()[-1]) == nbytes
    finally:
        if srv.poll() is None:
            srv.kill()
    return float(p.stdout.split()[-1])


@needs_cluster
def test_shaped_transfer_takes_the_time_the_rate_implies(cluster, tmp_path):
    nbytes = 8_000_000
    ideal = nbytes * 8 / RATE                                       # 0.64 s at 100 Mbit/s
    dt = transfer(cluster, tmp_path, nbytes)
    print(f"8 MB node1 -> node2 at 100mbit: {dt:.3f} s = {nbytes * 8 / dt / 1e6:.1f} Mbit/s")
    assert 0.8 * ideal <= dt <= 5 * ideal, (dt, ideal)


@needs_cluster
def test_sbatch_across_two_nodes(cluster, tmp_path):
    """The user's slurm/nwpu.sbatch with --nodes=2: srun --mpi=pmix, one rank per node."""
    env = {"CONFIG": SYNTH, "RUN_DIR": str(tmp_path / "run"), "HVD_RSGC_HOME": ROOT,
           "VENV": os.path.dirname(VENV_BIN), "PYTHONPATH": ROOT,
           "OVERRIDES": "--epochs 1 --max_steps_per_epoch 2 --synthetic_val 64"}
    summary = sbatch_across_two_nodes(cluster, os.path.join(ROOT, "slurm", "nwpu.sbatch"), env, tmp_path)
    assert summary["epochs"] == 1 and summary["compression_ratio"] > 1


HELLO = r"""
import json, os, socket, sys
import torch, horovod.torch as hvd
hvd.init()
t = hvd.allreduce(torch.full((4,), float(hvd.rank() + 1)), op=hvd.Sum, name="x")
json.dump({"rank": hvd.rank(), "size": hvd.size(), "host": socket.gethostname(), "sum": t.tolist()},
          open(os.path.join(sys.argv[1], f"rank{hvd.rank()}.json"), "w"))
"""


@needs_cluster
def test_horovodrun_across_nodes(cluster, tmp_path):
    # (Horovod's MPI controller across nodes runs in the sbatch test: srun --mpi=pmix)
    (tmp_path / "hello.py").write_text(HELLO)
    run_in_node1(cluster, horovodrun_argv(cluster, [str(tmp_path / "hello.py"), str(tmp_path)]), timeout=180)
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert [r["host"] for r in res] == ["node1", "node2"]
    assert all(r["sum"] == [3.0] * 4 and r["size"] == 2 for r in res)


@needs_cluster
def test_mpirun_across_nodes(cluster):
    code = ("from mpi4py import MPI; import socket; c = MPI.COMM_WORLD; "
            "h = c.allgather(socket.gethostname()); c.Get_rank() == 0 and print('hosts=' + ','.join(h))")
    p = run_in_node1(cluster, ["mpirun", "-np", "2", "-H", "node1:1,node2:1", PY, "-c", code], timeout=120)
    assert "hosts=node1,node2" in p.stdout, p.stdout


# ----------------------------------------------------------------------------- faults
def ckpts(run):
    return sorted(glob.glob(os.path.join(run, "checkpoints", "epoch[0-9][0-9][0-9][0-9].pt")))


def all_checkpoints_load(run, world=2):
    from hvd_rsgc.app.checkpoint import CKPT_FORMAT, SHARD_FORMAT, shard_path
    from hvd_rsgc.app.checkpoint import load as load_checkpoint
    files = ckpts(run)
    assert files, f"no checkpoint in {run}"
    for f in files:
        load_checkpoint(f, CKPT_FORMAT)
        for r in range(world):
            load_checkpoint(shard_path(f, r), SHARD_FORMAT)
    return files


def wait_for_file(path, proc, timeout):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, f"training ended (rc {proc.returncode}) before {path} appeared"
        assert time.time() - t0 < timeout, f"{path} did not appear within {timeout}s"
        time.sleep(0.2)


EPOCHS = "3"


@pytest.fixture(scope="module")
def lossy_reference(cluster, tmp_path_factory):
    """One uninterrupted training run with 1% packet loss on every link (and an 8 MB transfer
    under the same loss): the loss test checks it, the node-death test compares against it."""
    tmp = tmp_path_factory.mktemp("lossy")
    cluster.shape("all", bw="100mbit", loss="1")
    try:
        nbytes = 8_000_000
        dt = transfer(cluster, tmp, nbytes)
        p = cluster.run("node1", horovodrun_argv(cluster, TRAIN + ["--out_dir", str(tmp), "--epochs", EPOCHS,
                                                                  "--run_name", "lossy"]),
                        timeout=600, env=env_for_ranks(), cwd=str(tmp))
        drops = subprocess.run(["nft", "list", "table", "netdev", f"{cluster.prefix}_loss"], capture_output=True,
                               text=True).stdout
    finally:
        cluster.shape("all", bw="100mbit", loss="0")
    return {"dir": tmp, "run": str(tmp / "lossy"), "proc": p, "xfer_s": dt, "nbytes": nbytes, "drops": drops}


@needs_cluster
def test_one_percent_packet_loss_slows_but_does_not_break(lossy_reference):
    ref = lossy_reference
    p = ref["proc"]
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    print(f"8 MB at 100mbit with 1% loss: {ref['xfer_s']:.3f} s = {ref['nbytes'] * 8 / ref['xfer_s'] / 1e6:.1f} Mbit/s")
    assert ref["xfer_s"] >= 0.8 * ref["nbytes"] * 8 / RATE
    counts = [int(line.split("counter packets")[1].split()[0]) for line in ref["drops"].splitlines()
              if "counter packets" in line]
    assert sum(counts) > 0, ref["drops"]                # packets were really lost
    assert json.load(open(os.path.join(ref["run"], "summary.json")))["epochs"] == int(EPOCHS)
    all_checkpoints_load(ref["run"])


@needs_cluster
def test_node_killed_mid_training_ends_the_job_then_resume_is_bit_exact(cluster, lossy_reference, tmp_path):
    """Kill node2 after the first checkpoint; the job must end; --resume after the node is back
    must give bit for bit the reference run (which trained uninterrupted, under 1% loss)."""
    ref = lossy_reference
    assert ref["proc"].returncode == 0
    split = str(tmp_path / "split")
    log = open(tmp_path / "split.log", "w")
    proc = cluster.popen("node1", horovodrun_argv(cluster, TRAIN + ["--out_dir", str(tmp_path), "--epochs", EPOCHS,
                                                                   "--run_name", "split"]),
                         env=env_for_ranks(), cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_file(os.path.join(split, "checkpoints", "epoch0000.pt"), proc, 300)
        cluster.kill("node2")                           # power-off: every process of node2 dies
        t0 = time.time()
        rc = proc.wait(90)                              # the job must end, not hang
        ended = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        cluster.start("node2")
    out = (tmp_path / "split.log").read_text()
    print(f"job ended {ended:.1f} s after node2 was killed, rc {rc}")
    assert rc != 0, out[-3000:]
    files = all_checkpoints_load(split)                 # nothing lost, nothing torn
    assert os.path.basename(files[-1]) in ("epoch0000.pt", "epoch0001.pt")
    run_in_node1(cluster, horovodrun_argv(cluster, ["-m", "hvd_rsgc.train", "--resume", split]), tmp=tmp_path)
    a, b, _ = assert_same_checkpoint(ref["run"], split, int(EPOCHS) - 1, ranks=2)
    assert [h["top1"] for h in a["history"]] == [h["top1"] for h in b["history"]]


@needs_cluster
def test_link_down_for_10s_recovers_or_ends_with_a_message(cluster, tmp_path):
    run = str(tmp_path / "flap")
    log = open(tmp_path / "flap.log", "w")
    proc = cluster.popen("node1", horovodrun_argv(cluster, TRAIN + ["--out_dir", str(tmp_path), "--epochs", EPOCHS,
                                                                   "--run_name", "flap"]),
                         env=env_for_ranks(), cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_file(os.path.join(run, "checkpoints", "epoch0000.pt"), proc, 300)
        cluster.link("node2", "down")
        time.sleep(10)
        cluster.link("node2", "up")
        t0 = time.time()
        rc = proc.wait(240)                             # never a silent hang
        after = time.time() - t0
    finally:
        cluster.link("node2", "up")
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    out = (tmp_path / "flap.log").read_text()
    print(f"link node2 down 10 s: job rc {rc}, ended {after:.1f} s after the link came back")
    if rc == 0:
        assert json.load(open(os.path.join(run, "summary.json")))["epochs"] == int(EPOCHS)
    else:
        assert "error" in out.lower() or "exit" in out.lower(), out[-3000:]
    all_checkpoints_load(run)


LONG = os.environ.get("HVD_RSGC_CLUSTER_LONG") == "1"


@needs_cluster
@pytest.mark.skipif(not LONG, reason="takes about 3 minutes (SlurmdTimeout, requeue): set HVD_RSGC_CLUSTER_LONG=1")
def test_slurm_requeues_the_job_of_a_dead_node_and_it_resumes(cluster, tmp_path):
    run = tmp_path / "run"
    env = {"CONFIG": SYNTH, "RUN_DIR": str(run), "HVD_RSGC_HOME": ROOT, "VENV": os.path.dirname(VENV_BIN),
           "PYTHONPATH": ROOT, "OVERRIDES": "--epochs 4 --max_steps_per_epoch 2 --synthetic_val 64 "
                                            "--synthetic_train 128 --compression dgc"}
    args = ["--nodes=2", "-n", "2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=20",
            f"--output={tmp_path}/job-%j.out", f"--error={tmp_path}/job-%j.err"]
    job = cluster.sbatch(os.path.join(ROOT, "slurm", "nwpu.sbatch"), args, env, cwd=ROOT)
    t0 = time.time()
    while not (run / "checkpoints" / "epoch0000.pt").exists():
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), cluster.job(job)
        assert time.time() - t0 < 240, "no checkpoint within 240 s"
        time.sleep(0.5)
    cluster.kill("node2")
    t0 = time.time()
    while cluster.job(job).get("JobState") == "RUNNING":
        assert time.time() - t0 < 150, "the job still runs 150 s after its node died"
        time.sleep(1)
    ended = time.time() - t0
    info = cluster.job(job)
    print(f"job left RUNNING {ended:.0f} s after node2 died: {info.get('JobState')} {info.get('Reason')}")
    cluster.start("node2")
    st = cluster.wait(job, timeout=400)
    out = (tmp_path / f"job-{job}.out").read_text()
    err = (tmp_path / f"job-{job}.err").read_text()
    assert st == "COMPLETED", out[-3000:] + err[-3000:]
    assert int(cluster.job(job).get("Restarts", "0")) >= 1
    assert "resuming from" in out and "Node failure on node2" in err
    epochs = [json.loads(line)["epoch"] for line in open(run / "metrics.jsonl")]
    assert set(epochs) == {1, 2, 3, 4} and epochs[-1] == 4, epochs
    all_checkpoints_load(str(run))


# ----------------------------------------------------------------------------- teardown
@needs_cluster
def test_down_leaves_nothing_behind(cluster):
    pids = cluster.daemon_pids()
    assert len(pids) >= 2 + 3 * 2                         # munged, slurmctld; anchor, sshd, slurmd per node
    p = cluster.down()
    assert "nothing" in p.stderr or "no namespace" in p.stderr
    assert cluster.leftovers(pids) == []
    assert not cluster.is_up()
    assert "no cluster up" in cluster.cmd("status").stdout


@needs_cluster
def test_a_failed_up_leaves_nothing_and_only_our_state_dir_is_wiped(tmp_path):
    """`up` dying half way (here a bad --loss, refused after the bridge and the namespace exist;
    the same path as --delay on a kernel without sch_netem) used to leave them behind, so the
    next `up` refused to start; and `up` wiped any HVD_RSGC_CLUSTER_DIR it was given."""
    from hvd_rsgc.app.emucluster import EmuCluster
    from support import claim_cluster_slot
    lock, k = claim_cluster_slot()
    c = EmuCluster(state_dir=str(tmp_path / "state"), prefix=f"hrt{k}", net=f"10.77.{100 + k}",
                   port=17900 + 2 * k)
    try:
        p = c.cmd("up", 1, "--loss", "abc", check=False)
        assert p.returncode != 0 and "bad loss" in p.stderr and "cleaning up" in p.stderr, p.stderr
        assert c.leftovers() == [] and not c.is_up()
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        (foreign / "keep.txt").write_text("not the cluster's")
        other = EmuCluster(state_dir=str(foreign), prefix=f"hrt{k}", net=f"10.77.{100 + k}", port=17900 + 2 * k)
        p = other.cmd("up", 1, check=False)
        assert p.returncode != 0 and "not a cluster's" in p.stderr and (foreign / "keep.txt").exists()
        assert other.leftovers() == []
    finally:
        if c.leftovers():
            c.down(check=False)
        lock.close()
