"""Python handle on the emulated cluster of ``scripts/cluster.sh`` (network namespaces as nodes,
shaped links, sshd + slurmd per node, one slurmctld): bring it up and down, run commands inside
a node, reshape links, cut a link, kill and restart a node, submit Slurm jobs. Used by the
time-to-accuracy benchmark (``python -m hvd_rsgc.bench tta``) and tests/test_cluster.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.environ.get("HVD_RSGC_CLUSTER_SH", os.path.join(ROOT, "scripts", "cluster.sh"))
NEEDED = ("ip", "tc", "nsenter", "unshare", "taskset", "sshd", "ssh", "ssh-keygen", "munged",
          "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "nft")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "PREEMPTED", "DEADLINE"}


def _exe(name):
    return shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)


def unavailable() -> str | None:
    """None if an emulated cluster can be started here, else the reason."""
    if not os.path.exists(SCRIPT):
        return f"{SCRIPT} not found"
    if os.geteuid() != 0:
        return "the emulated cluster needs root (network namespaces, tc, nftables, daemons)"
    missing = [e for e in NEEDED if _exe(e) is None]
    if missing:
        return (f"missing {', '.join(missing)} (Debian: apt-get install iproute2 util-linux nftables "
                "openssh-server openssh-client slurm-wlm munge)")
    if not os.path.isdir("/proc/self/ns") or not os.path.exists("/proc/self/ns/net"):
        return "no namespace support in /proc"
    return None


class EmuCluster:
    """One cluster, identified by its state directory, interface prefix and subnet (so a test
    cluster never touches a user's cluster on the defaults)."""

    def __init__(self, state_dir: str | None = None, prefix: str | None = None,
                 net: str | None = None, port: int | None = None):
        self.env = dict(os.environ)
        for key, val in (("HVD_RSGC_CLUSTER_DIR", state_dir), ("HVD_RSGC_CLUSTER_PREFIX", prefix),
                         ("HVD_RSGC_CLUSTER_NET", net), ("HVD_RSGC_CLUSTER_PORT", port)):
            if val is not None:
                self.env[key] = str(val)
        self.dir = self.env.get("HVD_RSGC_CLUSTER_DIR", "/run/hvd_rsgc-cluster")
        self.prefix = self.env.get("HVD_RSGC_CLUSTER_PREFIX", "hrs")
        self.net = self.env.get("HVD_RSGC_CLUSTER_NET", "10.77.0")
        self.slurm_conf = os.path.join(self.dir, "etc", "slurm.conf")

    # ------------------------------------------------------------------ script
    def cmd(self, *args, timeout: float = 300, check: bool = True, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run([SCRIPT, *map(str, args)], env=kw.pop("env", self.env), capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
        if check and p.returncode != 0:
            raise RuntimeError(f"cluster.sh {' '.join(map(str, args))} failed (rc {p.returncode}):\n"
                               f"{p.stdout[-3000:]}{p.stderr[-3000:]}")
        return p

    def up(self, n: int, bw="100mbit", delay="0", loss="0", extra=(), timeout: float = 180):
        return self.cmd("up", n, "--bw", bw, "--delay", delay, "--loss", loss, *extra, timeout=timeout)

    def down(self, check: bool = True):
        return self.cmd("down", check=check, timeout=120)

    def is_up(self) -> bool:
        return os.path.exists(os.path.join(self.dir, "cluster.env"))

    def info(self) -> dict:
        out = {}
        with open(os.path.join(self.dir, "cluster.env")) as f:
            for line in f:
                if "=" in line:
                    k, v = line.strip().split("=", 1)
                    out[k] = v
        return out

    def size(self) -> int:
        return int(self.info()["N"])

    def shape(self, which="all", bw="100mbit", delay="0", loss="0"):
        return self.cmd("shape", which, "--bw", bw, "--delay", delay, "--loss", loss)

    def link(self, node: str, state: str):
        return self.cmd("link", node, state)

    def kill(self, node: str):
        return self.cmd("kill", node)

    def start(self, node: str):
        return self.cmd("start", node, timeout=120)

    def hosts(self, slots: int = 1, n: int | None = None) -> str:
        n = n or self.size()
        return ",".join(f"node{i}:{slots}" for i in range(1, n + 1))

    # ------------------------------------------------------------------ inside a node
    def argv(self, node: str, cmd) -> list:
        return [SCRIPT, "exec", node, *map(str, cmd)]

    def run(self, node: str, cmd, timeout: float = 300, env=None, cwd=None, check=False):
        e = dict(self.env, **(env or {}))
        p = subprocess.run(self.argv(node, cmd), env=e, cwd=cwd, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise RuntimeError(f"{cmd} on {node} failed (rc {p.returncode}):\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
        return p

    def popen(self, node: str, cmd, env=None, cwd=None, **kw) -> subprocess.Popen:
        e = dict(self.env, **(env or {}))
        return subprocess.Popen(self.argv(node, cmd), env=e, cwd=cwd, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kw)

    # ------------------------------------------------------------------ slurm
    def slurm_env(self, **kw) -> dict:
        return dict(self.env, SLURM_CONF=self.slurm_conf, **kw)

    def sbatch(self, script: str, args=(), env=None, cwd=None) -> int:
        r = subprocess.run(["sbatch", "--parsable", *args, script], capture_output=True, text=True,
                           env=self.slurm_env(**(env or {})), cwd=cwd)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed: {r.stderr}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job: int) -> dict:
        r = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True, text=True,
                           env=self.slurm_env())
        out = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                out.setdefault(k, v)
        return out

    def wait(self, job: int, timeout: float = 300) -> str:
        t0 = time.time()
        while time.time() - t0 < timeout:
            st = self.job(job).get("JobState", "UNKNOWN")
            if st in FINAL:
                return st
            time.sleep(1)
        subprocess.run(["scancel", str(job)], env=self.slurm_env())
        raise TimeoutError(f"job {job} still {self.job(job).get('JobState')} after {timeout}s")

    # ------------------------------------------------------------------ leftovers
    def daemon_pids(self) -> list[int]:
        run = os.path.join(self.dir, "run")
        pids = []
        if os.path.isdir(run):
            for f in os.listdir(run):
                if f.endswith(".pid"):
                    try:
                        pids.append(int(open(os.path.join(run, f)).read().strip()))
                    except ValueError:
                        pass
        return pids

    def leftovers(self, pids=()) -> list[str]:
        """What of this cluster still exists: namespaces, interfaces, the nftables table, and
        which of ``pids`` still run (zombies awaiting their reaper count as gone)."""
        left = []
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        left += [f"netns {line.split()[0]}" for line in ns.splitlines()
                 if line.split() and line.split()[0].startswith(f"{self.prefix}-node")]
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        for line in links.splitlines():
            name = line.split(": ")[1].split("@")[0] if ": " in line else ""
            if name.startswith(f"{self.prefix}-"):
                left.append(f"link {name}")
        table = self.prefix.replace("-", "_") + "_loss"
        if _exe("nft") and subprocess.run(["nft", "list", "table", "netdev", table],
                                          capture_output=True).returncode == 0:
            left.append(f"nftables table {table}")
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                if state not in ("Z", "X"):
                    left.append(f"process {pid}")
            except OSError:
                pass
        return left
