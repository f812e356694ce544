"""A throw-away one-node Slurm cluster for tests: munged, slurmctld and slurmd started under a
temporary directory with their own config, sockets and ports, stopped again by ``stop()``
(exactly the daemons this object started). Needs Debian's slurm-wlm and munge."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time


def available() -> str | None:
    """None if a local cluster can be started, else the reason."""
    for exe in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol"):
        if shutil.which(exe) is None and not os.path.exists(f"/usr/sbin/{exe}"):
            return f"{exe} not installed (Debian: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the local test cluster runs its daemons as root (SlurmUser=root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name):
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    def __init__(self, base: str, cpus: int | None = None, gpus: int = 4):
        self.base = os.path.abspath(base)
        self.cpus = cpus or os.cpu_count() or 1
        self.gpus = gpus
        self.procs: list[subprocess.Popen] = []
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.base, "etc", "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60):
        """Start munged, slurmctld and slurmd; if any of it fails, the daemons already started
        are stopped (they run in sessions of their own and would outlive the test run)."""
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float):
        for d in ("etc", "state", "spool", "log", "munge"):
            os.makedirs(os.path.join(self.base, d), exist_ok=True)
        os.chmod(os.path.join(self.base, "munge"), 0o700)
        key = os.path.join(self.base, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = os.path.join(self.base, "munge", "munge.socket")
        self._spawn([_exe("munged"), "--foreground", "--force", f"--key-file={key}",
                     f"--socket={self.munge_socket}",
                     f"--pid-file={os.path.join(self.base, 'munge', 'munged.pid')}",
                     f"--seed-file={os.path.join(self.base, 'munge', 'munged.seed')}",
                     f"--log-file={os.path.join(self.base, 'log', 'munged.log')}"])
        self._wait(lambda: os.path.exists(self.munge_socket), timeout, "munged socket")
        ctl, d = _free_port(), _free_port()
        b = self.base
        conf = f"""
ClusterName=hvdrsgctest
SlurmctldHost={self.host}
SlurmctldPort={ctl}
SlurmdPort={d}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/state/slurmctld.pid
SlurmdPidFile={b}/spool/slurmd.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
MailProg=/bin/true
GresTypes=gpu
NodeName={self.host} CPUs={self.cpus} Gres=gpu:{self.gpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
        with open(self.conf, "w") as f:
            f.write(conf)
        # Placeholder "GPU" files so that jobs asking for --gpus-per-task schedule; nothing is
        # bound (CPU tests; the scheduler only counts them).
        os.makedirs(os.path.join(b, "dev"), exist_ok=True)
        for i in range(self.gpus):
            open(os.path.join(b, "dev", f"gpu{i}"), "a").close()
        with open(os.path.join(b, "etc", "gres.conf"), "w") as f:
            f.write(f"AutoDetect=off\nNodeName={self.host} Name=gpu File={b}/dev/gpu[0-{self.gpus - 1}]\n")
        os.makedirs(os.path.join(b, "spool", self.host), exist_ok=True)
        self._spawn([_exe("slurmctld"), "-D", "-c", "-f", self.conf])
        self._spawn([_exe("slurmd"), "-D", "-f", self.conf])
        self._wait(self._node_idle, timeout, "node to become idle")
        return self

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 20
        for p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        stopped = all(p.poll() is not None for p in self.procs)
        self.procs = []
        return stopped

    def _spawn(self, cmd):
        log = open(os.path.join(self.base, "log", os.path.basename(cmd[0]) + ".out"), "ab")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))
        time.sleep(0.3)
        if self.procs[-1].poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited at start; see {self.base}/log")

    def _wait(self, cond, timeout, what):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if cond():
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} died; logs in {self.base}/log:\n{self.logs()}")
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}; logs:\n{self.logs()}")

    def _node_idle(self):
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
        return r.returncode == 0 and r.stdout.strip() in ("idle", "mixed")

    def logs(self) -> str:
        out = []
        for f in sorted(os.listdir(os.path.join(self.base, "log"))):
            with open(os.path.join(self.base, "log", f), errors="replace") as fh:
                out.append(f"--- {f}\n" + fh.read()[-3000:])
        return "\n".join(out)

    # ------------------------------------------------------------------ jobs
    def sbatch(self, script: str, args=(), env=None, cwd=None) -> int:
        e = dict(self.env, **(env or {}))
        r = subprocess.run(["sbatch", "--parsable", *args, script], capture_output=True, text=True,
                           env=e, cwd=cwd)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed: {r.stderr}")
        return int(r.stdout.strip().split(";")[0])

    def state(self, job: int) -> str:
        r = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True, text=True,
                           env=self.env)
        for tok in r.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job: int, timeout: float = 300) -> str:
        t0 = time.time()
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
        while time.time() - t0 < timeout:
            st = self.state(job)
            if st in final:
                return st
            time.sleep(1)
        subprocess.run(["scancel", str(job)], env=self.env)
        raise TimeoutError(f"job {job} still {self.state(job)} after {timeout}s")

    def requeue(self, job: int):
        r = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True, env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"scontrol requeue failed: {r.stderr}")
