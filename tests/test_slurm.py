"""slurm/*.sbatch against a real one-node Slurm cluster started by the test (tests/slurm_local.py):
submit the user's nwpu.sbatch in a tiny configuration, requeue it and check it resumed; run the
multi-node template's srun --mpi=pmix path (Horovod's MPI controller) on one node."""
import json
import os
import sys

import pytest

from slurm_local import LocalSlurm, available
from support import assert_one_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.dirname(os.path.dirname(sys.executable))
why = available()
pytestmark = [pytest.mark.multiproc,
              pytest.mark.skipif(why is not None, reason=f"Slurm cannot run here: {why}")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalSlurm(str(tmp_path_factory.mktemp("slurm")))
    c.start()
    yield c
    assert c.stop(), "a Slurm daemon did not stop"


def env_for(tmp_path, **kw):
    e = {"CONFIG": os.path.join(ROOT, "examples", "configs", "synthetic.yaml"),
         "RUN_DIR": str(tmp_path / "run"), "HVD_RSGC_HOME": ROOT, "VENV": VENV,
         "OVERRIDES": "--epochs 2 --stop_after 1 --max_steps_per_epoch 3"}
    e.update(kw)
    return e


def small(tmp_path):
    return ["-n", "2", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=15",
            f"--output={tmp_path}/job-%j.out", f"--error={tmp_path}/job-%j.err"]


def epochs_logged(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return [json.loads(line)["epoch"] for line in open(path)] if os.path.exists(path) else []


def test_nwpu_sbatch_completes_then_requeue_resumes(cluster, tmp_path):
    job = cluster.sbatch(os.path.join(ROOT, "slurm", "nwpu.sbatch"), small(tmp_path),
                         env_for(tmp_path), cwd=ROOT)
    st = cluster.wait(job)
    out = (tmp_path / f"job-{job}.out").read_text()
    err = (tmp_path / f"job-{job}.err").read_text()
    assert st == "COMPLETED", out[-3000:] + err[-3000:] + cluster.logs()
    assert "new run" in out and "launcher=horovodrun tasks=2" in out
    run = str(tmp_path / "run")
    assert epochs_logged(run) == [1]
    assert os.path.exists(os.path.join(run, "checkpoints", "epoch0000.pt"))
    # requeue the same job (what --requeue / the USR1 trap do): same job id -> same RUN_DIR
    cluster.requeue(job)
    st = cluster.wait(job)
    out = (tmp_path / f"job-{job}.out").read_text()          # --open-mode=append
    assert st == "COMPLETED", out[-3000:] + cluster.logs()
    assert "resuming from" in out
    assert epochs_logged(run) == [1, 2]
    assert os.path.exists(os.path.join(run, "checkpoints", "epoch0001.pt"))


def test_srun_pmix_launch_with_horovod_mpi_controller(cluster, tmp_path):
    job = cluster.sbatch(os.path.join(ROOT, "slurm", "multinode.sbatch"),
                         small(tmp_path) + ["--nodes=1"],
                         env_for(tmp_path, OVERRIDES="--epochs 1 --max_steps_per_epoch 3"), cwd=ROOT)
    st = cluster.wait(job)
    out = (tmp_path / f"job-{job}.out").read_text()
    err = (tmp_path / f"job-{job}.err").read_text()
    assert st == "COMPLETED", out[-3000:] + err[-3000:]
    assert "launcher=srun tasks=2" in out
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["epochs"] == 1 and summary["compression_ratio"] > 1
    assert_one_world(tmp_path / "run", 2)

