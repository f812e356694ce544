"""The bad-input catalogue (issue "Reliability"): every probe that once crashed, hid the key or
lost something, run quickly so a change cannot bring one back. The multi-process probes
(fp16 false alarm at -np 2, torch.sparse at -np 2, skip after a non-finite step) live in
test_horovod.py; the CLI probes run the real ``python -m hvd_rsgc.train`` in one process."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from support import ROOT

from hvd_rsgc.algorithms.memory import all_finite, all_finite_each
from hvd_rsgc.app import checkpoint as ckpt
from hvd_rsgc.app.config import Config, coerce, load_config, parse_overrides
from hvd_rsgc.app.report import Reporter, json_safe

SYNTH = os.path.join(ROOT, "examples", "configs", "synthetic.yaml")


# ----------------------------------------------------------------------------- defect 1
def test_all_finite_does_not_overflow_in_half_precision():
    g = torch.full((100_000,), 4.0, dtype=torch.float16)
    assert torch.isinf(g.sum())                   # the old check: an fp16 sum overflows
    assert all_finite(g) and all_finite(g.bfloat16())
    big = torch.full((10,), 3e38)                 # finite fp32 whose fp32 sum overflows
    assert all_finite(big)
    for bad in (float("inf"), float("nan"), float("-inf")):
        x = torch.ones(1000, dtype=torch.float16)
        x[17] = bad
        assert not all_finite(x)
    assert all_finite(torch.empty(0))
    # the bucket's form: one host sync for many tensors, the same answers
    bad = [torch.ones(1000, dtype=torch.float16) for _ in range(3)]
    for x, v in zip(bad, (float("inf"), float("nan"), float("-inf"))):
        x[17] = v
    ts = [g, bad[0], big, torch.empty(0), bad[1], g.bfloat16(), torch.ones(5, dtype=torch.float64),
          bad[2], torch.tensor([float("nan")], dtype=torch.float64)]
    assert all_finite_each(ts) == [all_finite(t) for t in ts] == \
        [True, False, True, True, False, True, True, False, False]
    assert all_finite_each([]) == []


def test_fp16_compression_at_size_one_has_no_false_alarm():
    hvd = pytest.importorskip("horovod.torch")
    import hvd_rsgc
    hvd.init()
    m = torch.nn.Linear(1000, 100)
    o = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01),
                                 named_parameters=m.named_parameters(),
                                 compression=hvd_rsgc.FP16Compression(m))
    m(torch.ones(4, 1000)).sum().backward()
    o.step()                                      # raised FloatingPointError before the fix
    assert torch.isfinite(m.weight).all()
    mh = torch.nn.Linear(1000, 100).half()        # every compressor on a .half() model
    comp = hvd_rsgc.RSDGCCompression(mh, density=0.01)
    o = hvd.DistributedOptimizer(hvd_rsgc.DGCSGD(mh.parameters(), lr=0.01),
                                 named_parameters=mh.named_parameters(), compression=comp)
    mh(torch.ones(4, 1000, dtype=torch.float16)).float().sum().backward()
    o.step()
    assert torch.isfinite(mh.weight).all()


# ----------------------------------------------------------------------------- defect 2
def test_scientific_notation_is_a_number_on_the_command_line_and_in_files(tmp_path):
    cfg = load_config(None, parse_overrides(["--lr", "1e-3", "--weight_decay", "5e-4",
                                             "--density", "1e-3", "--milestones", "0.5,0.75"]))
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.compression.density) == (1e-3, 5e-4, 1e-3)
    assert cfg.optim.milestones == [0.5, 0.75]
    f = tmp_path / "c.yaml"
    f.write_text("weight_decay: 5e-4\nlr: 1e-2\ndensity: 1E-3\nepochs: 3\nfp16_values: yes\n")
    cfg = load_config(str(f))
    assert cfg.optim.weight_decay == 5e-4 and cfg.optim.lr == 0.01 and cfg.compression.density == 1e-3
    assert cfg.compression.fp16_values is True and cfg.optim.epochs == 3


@pytest.mark.parametrize("args, key", [
    (["--lr", "abc"], "lr"), (["--seed", "abc"], "seed"), (["--epochs", "2.5"], "epochs"),
    (["--milestones", "a,b"], "milestones"), (["--density", "2"], "density"),
    (["--fp16_values", "maybe"], "fp16_values"), (["--compression", "bogus"], "compression"),
    (["--lr", "nan"], "lr"), (["--batch_size", "0"], "batch_size"), (["--model", "resnet7"], "model"),
    (["--nonfinite", "ignore"], "nonfinite"), (["--compression_options", "[1]"], "compression_options"),
])
def test_wrong_values_name_their_key(args, key):
    with pytest.raises(ValueError, match=rf"^{key}[: ]"):
        load_config(None, parse_overrides(args))


def test_wrong_values_in_a_file_name_the_key_and_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: fast\n")
    with pytest.raises(ValueError, match=r"lr: expected a number.*c\.yaml"):
        load_config(str(f))


def test_checks_across_keys_run_on_the_config_as_it_ends_up(tmp_path):
    """A file's ``amp: fp16`` with ``--nonfinite skip`` on the command line is a valid config;
    the file used to be checked alone, before the command line came in, and refused. A
    combination that stays wrong is still refused, naming both sources."""
    f = tmp_path / "c.yaml"
    f.write_text("amp: fp16\n")
    cfg = load_config(str(f), {"nonfinite": "skip"})
    assert cfg.optim.amp == "fp16" and cfg.get("nonfinite") == "skip"
    with pytest.raises(ValueError, match=r"amp fp16 needs nonfinite skip.*c\.yaml \+ command line"):
        load_config(str(f), {"epochs": "2"})
    with pytest.raises(ValueError, match="amp fp16 needs nonfinite skip"):
        load_config(str(f))


def test_flat_round_trip_and_help_lists_every_key():
    from hvd_rsgc.app.config import KEYS, help_text
    flat = Config().to_flat()
    assert Config.from_flat(flat).to_flat() == flat and set(flat) == set(KEYS)
    text = help_text()
    for k in KEYS:
        assert f"--{k} (" in text
    assert "rsdgc" in text and "vgg19" in text and "demo" in text and "rdpsgd" in text


# ----------------------------------------------------------------------------- defect 3
def _checkpoint_dir(tmp_path, epochs):
    d = tmp_path / "run"
    for e in range(epochs):
        ckpt.atomic_save({"format": ckpt.CKPT_FORMAT, "epoch": e}, ckpt.main_path(str(d), e))
    return d


def test_zero_byte_checkpoint_is_named_and_the_older_one_offered(tmp_path):
    d = _checkpoint_dir(tmp_path, 2)
    open(ckpt.main_path(str(d), 2), "w").close()          # `: > epoch0002.pt`
    with pytest.raises(ValueError, match=r"epoch0002\.pt.*empty.*previous checkpoint is .*epoch0001\.pt"):
        ckpt.resolve(str(d))
    run_dir, path = ckpt.resolve(ckpt.main_path(str(d), 1))  # resuming from the file offered
    assert path.endswith("epoch0001.pt") and os.path.samefile(run_dir, d)
    single = tmp_path / "b" / "run"
    os.makedirs(single / "checkpoints")
    open(ckpt.main_path(str(single), 0), "w").close()
    with pytest.raises(ValueError, match="empty.*no older checkpoint"):
        ckpt.resolve(str(single))


# ----------------------------------------------------------------------------- gaps
def test_write_errors_name_the_path_say_no_space_and_leave_no_tmp(tmp_path, monkeypatch):
    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    target = tmp_path / "c" / "epoch0000.pt"
    with pytest.raises(OSError, match=r"cannot write checkpoint .*epoch0000\.pt.*no space left"):
        ckpt.atomic_save({"x": 1}, str(target))
    assert os.listdir(tmp_path / "c") == []


def test_an_interrupted_or_unpicklable_save_leaves_no_tmp_and_a_bare_name_saves(tmp_path, monkeypatch):
    """Ctrl-C (or an object torch cannot save) in the middle of a checkpoint: the error goes
    on as it was, and no ``.tmp`` stays beside the checkpoints; a path without a directory
    is written in the working directory (it failed: ``makedirs('')``)."""
    def interrupted(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(torch, "save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ckpt.atomic_save({"x": 1}, str(tmp_path / "c" / "epoch0000.pt"))
    assert os.listdir(tmp_path / "c") == []
    with pytest.raises(Exception):             # noqa: B017 - whatever pickle raises, as it was
        ckpt.atomic_save({"f": lambda: 0}, str(tmp_path / "c" / "epoch0001.pt"))
    assert os.listdir(tmp_path / "c") == []
    monkeypatch.chdir(tmp_path)
    assert ckpt.atomic_save({"x": 1}, "bare.pt") == "bare.pt" and (tmp_path / "bare.pt").exists()


def test_a_really_full_disk_is_named_as_such(tmp_path):
    """On a disk that fills up, torch.save raises "unexpected pos ..." (a RuntimeError), not
    ENOSPC: the error must still say the disk is full, and leave no partial file behind."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs mounts, for a 1 MiB file system")
    try:
        with pytest.raises(OSError, match=r"cannot write checkpoint .*epoch0000\.pt.*no space left") as info:
            ckpt.atomic_save({"x": torch.zeros(1 << 20)}, str(mnt / "epoch0000.pt"))
        assert info.value.errno == errno.ENOSPC
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)       # lazy: a failed assert holds open files


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_named(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(OSError, match=r"cannot write checkpoint .*ro.*permission denied"):
        ckpt.atomic_save({"x": 1}, str(ro / "a.pt"))


def test_resume_truncates_logged_rows_past_the_checkpoint(tmp_path, monkeypatch):
    """metrics.jsonl / .csv keep the epochs up to the checkpoint; TensorBoard's writer purges
    the later ones (a stand-in module records what the real one would be asked). A row cut
    off by a killed job is dropped (it used to stop --resume with a JSON parse error)."""
    import types
    writers = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            self.purge_step, self.scalars = purge_step, []
            writers.append(self)

        def add_scalar(self, k, v, step):
            self.scalars.append((k, step))

        def close(self):
            pass
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    rep = Reporter(str(tmp_path), 0, quiet=True, progress=False)
    rep.truncate(0)                                   # what a new run does first
    for e in (1, 2, 3):
        rep.epoch({"epoch": e, "lr": 0.1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0,
                   "top1": 0.5, "oa": 0.5, "aa": float("nan"), "kappa": 0.1, "bytes_per_worker": 1,
                   "dense_bytes_per_worker": 2, "compression_ratio": 2.0, "cum_bytes_per_worker": e,
                   "seconds": 1.0, "skipped_steps": 0, "consensus_distance": None}, 3)
    with open(tmp_path / "metrics.jsonl", "a") as f:     # a row cut off by a killed job
        f.write('{"epoch": 4, "lr": 0.1, "confusion": [[1, 2], [3')
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("4,0.1,1.0")
    rep.truncate(1)
    rep.epoch({"epoch": 2, "lr": 0.1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0,
               "top1": 0.5, "oa": 0.5, "aa": 0.5, "kappa": 0.1, "bytes_per_worker": 1,
               "dense_bytes_per_worker": 2, "compression_ratio": 2.0, "cum_bytes_per_worker": 2,
               "seconds": 1.0, "skipped_steps": 0, "consensus_distance": None}, 3)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["aa"] is None   # NaN written as null
    csv_rows = open(tmp_path / "metrics.csv").read().split()
    assert len(csv_rows) == 3 and csv_rows[1].startswith("1,") and csv_rows[2].startswith("2,")
    assert [w.purge_step for w in writers] == [1, 2]
    assert {s for _, s in writers[1].scalars} == {2}


def test_json_safe_turns_nan_into_null():
    out = json.dumps(json_safe({"aa": float("nan"), "pc": [1.0, float("inf")]}), allow_nan=False)
    assert out == '{"aa": null, "pc": [1.0, null]}'


def test_hidden_folders_are_not_classes_and_unreadable_classes_are_named(tmp_path):
    from PIL import Image

    from hvd_rsgc.app.data import scan_folder
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "x.png")
    (tmp_path / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".cache" / "y.png")
    assert scan_folder(str(tmp_path)).classes == ["a", "b"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "z.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"class folder .*c' has no readable images"):
        scan_folder(str(tmp_path))


def test_compressor_memory_is_reported():
    import hvd_rsgc
    m = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 10))
    comp = hvd_rsgc.RSDGCCompression(m, density=0.01, min_numel=100)
    for e in comp.engine.table.compressed:      # allocate as the first step would
        comp.engine.begin(e, torch.zeros_like(e.param), 1)
    mem = comp.stats()["memory"]
    n = sum(p.numel() for p in m.parameters())
    # residual + momentum, fp32, in unit layout (3x3 tiles: edges padded)
    # 100x100 and 10x100 weights in 3x3 tiles: 34x34 and 4x34 tiles of 9 cells (biases: dense)
    cells = (34 * 34 + 4 * 34) * 9
    assert [e.name for e in comp.engine.table.compressed] == ["0.weight", "1.weight"]
    assert mem["state_bytes"] == 2 * 4 * cells
    assert mem["words_per_parameter"] == pytest.approx((2 * 4 * cells + mem["workspace_bytes"]) / (4 * n))


def test_launcher_overrides_are_not_glob_expanded_and_may_be_empty(tmp_path):
    (tmp_path / "5").write_text("")
    env = dict(os.environ, CONFIG="x.yaml", HVD_RSGC_DRY_RUN="1", HVD_RSGC_HOME=str(tmp_path),
               OVERRIDES="--milestones [0.5,0.75] --epochs 3")
    out = subprocess.run(["bash", os.path.join(ROOT, "slurm", "launch.sh")], env=env,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert "[0.5,0.75]" in out and "5" not in out
    env["OVERRIDES"] = ""
    out = subprocess.run(["bash", os.path.join(ROOT, "slurm", "launch.sh")], env=env,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[-3:-1] == ["--progress", "false"]


def test_launcher_command_per_mode(tmp_path):
    """The launch command (dry run): srun passes the job's --cpus-per-task on (Slurm >= 22.05
    does not inherit it: one CPU per task); a pyxis image runs through srun on one node too,
    with the image's python and the checkout, RUN_DIR's parent and DATA_ROOT mounted;
    Apptainer binds the same; pyxis with horovodrun is refused."""
    def launch(**kw):
        env = dict(os.environ, CONFIG="x.yaml", HVD_RSGC_DRY_RUN="1", HVD_RSGC_HOME=str(tmp_path),
                   RUN_DIR=str(tmp_path / "runs" / "r"), DATA_ROOT="/data/set", **kw)
        p = subprocess.run(["bash", os.path.join(ROOT, "slurm", "launch.sh")], env=env,
                           capture_output=True, text=True, timeout=60)
        return p, [x[len("launch: "):] for x in p.stdout.split("\n") if x.startswith("launch: ")]
    runs = str(tmp_path / "runs")
    _, cmd = launch(LAUNCHER="srun", SLURM_CPUS_PER_TASK="4", SLURM_JOB_NUM_NODES="2")
    assert cmd[:4] == ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", "--cpus-per-task=4"], cmd
    assert cmd[-3:] == [os.path.join(str(tmp_path), ".venv", "bin", "python"), "-m", "hvd_rsgc.train"]
    _, cmd = launch(CONTAINER_IMAGE="reg#hvd_rsgc:gpu", SLURM_JOB_NUM_NODES="1")
    assert cmd[0] == "srun" and "--container-image=reg#hvd_rsgc:gpu" in cmd and cmd[-3] == "python", cmd
    mounts = [c for c in cmd if c.startswith("--container-mounts=")][0].split("=", 1)[1].split(",")
    assert mounts == [f"{tmp_path}:{tmp_path}", f"{runs}:{runs}", "/data/set:/data/set:ro"], mounts
    _, cmd = launch(CONTAINER="/img/x.sif", LAUNCHER="horovodrun", SLURM_NTASKS="2")
    assert cmd[:5] == ["apptainer", "exec", "--nv", "--bind", f"{tmp_path},{runs},/data/set:/data/set:ro"], cmd
    assert "horovodrun" in cmd and "-np" in cmd
    p, _ = launch(CONTAINER_IMAGE="reg#img", LAUNCHER="horovodrun")
    assert p.returncode == 2 and "CONTAINER_IMAGE (pyxis) needs LAUNCHER=srun" in p.stderr


def test_launcher_fails_a_job_whose_tasks_never_ran_although_srun_exited_0(tmp_path):
    """Slurm 22.05's srun exits 0 when it could not launch the step's tasks at all (seen on the
    emulated cluster: a PMIx socket path over 107 bytes); the job must not end COMPLETED."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\necho 'srun: error: task 0 launch failed' >&2\nexit 0\n")
    (fake / "srun").chmod(0o755)
    env = dict(os.environ, CONFIG="x.yaml", HVD_RSGC_HOME=ROOT, LAUNCHER="srun", RUN_DIR=str(tmp_path / "run"),
               PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.run(["bash", os.path.join(ROOT, "slurm", "launch.sh")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and "wrote no" in p.stderr and "summary.json" in p.stderr, p.stderr
    # a task that did write its summary (this run) is a success
    (fake / "srun").write_text(f"#!/bin/sh\nmkdir -p {tmp_path}/run && echo {{}} > {tmp_path}/run/summary.json\n")
    p = subprocess.run(["bash", os.path.join(ROOT, "slurm", "launch.sh")], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_launcher_requeues_on_usr1_only_after_a_new_checkpoint(tmp_path):
    """USR1 (time limit near) requeues the job only if this allocation wrote a checkpoint: one
    that wrote none would start again from the same point, again and again. The refused requeue
    says why, and the training goes on (the trap must not end the wait for it)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    run = tmp_path / "run"
    (fake / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    (fake / "srun").write_text(
        f"#!/bin/sh\nmkdir -p {run}/checkpoints\n[ -n \"$WRITE_CKPT\" ] && : > {run}/checkpoints/epoch0001.pt\n"
        f": > {tmp_path}/started\nsleep 3\necho {{}} > {run}/summary.json\n")
    for f in ("scontrol", "srun"):
        (fake / f).chmod(0o755)
    old = run / "checkpoints" / "epoch0000.pt"       # a previous allocation's checkpoint
    old.parent.mkdir(parents=True)
    old.write_text("")
    os.utime(old, (time.time() - 3600, time.time() - 3600))

    def job(**kw):
        for f in ("started", "scontrol.log"):
            (tmp_path / f).unlink(missing_ok=True)
        env = dict(os.environ, CONFIG="x.yaml", HVD_RSGC_HOME=ROOT, LAUNCHER="srun", RUN_DIR=str(run),
                   SLURM_JOB_ID="77", PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", **kw)
        p = subprocess.Popen(["bash", os.path.join(ROOT, "slurm", "launch.sh")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 30
        while not (tmp_path / "started").exists() and time.time() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGUSR1)
        out, err = p.communicate(timeout=60)
        log = tmp_path / "scontrol.log"
        return p.returncode, err, log.read_text() if log.exists() else ""

    rc, err, calls = job()
    assert calls == "" and "wrote no checkpoint" in err and "Not requeueing job 77" in err, err
    assert rc == 0, err                               # the training ran on to its end
    rc, err, calls = job(WRITE_CKPT="1")
    assert calls == "requeue 77\n" and rc == 0, (calls, err)


def test_installer_without_python_says_so_before_installing_anything(tmp_path):
    """scripts/install.sh on a machine without python3: one clear line, exit 1, before any
    apt-get (errexit used to end it at the failed lookup without a word -- or, with MPI
    missing, after installing Open MPI)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("bash", "dirname"):
        os.symlink(shutil.which(tool), bin_ / tool)
    for extra in ({}, {"PYTHON": "/opt/none/python3"}):
        p = subprocess.run([str(bin_ / "bash"), os.path.join(ROOT, "scripts", "install.sh")],
                           env={"PATH": str(bin_), "HOME": str(tmp_path), **extra},
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and "ERROR: no Python interpreter" in p.stderr, p.stderr
        assert "Open MPI" not in p.stderr and "apt-get update" not in p.stderr, p.stderr
        assert extra.get("PYTHON", "python3.11 nor python3") in p.stderr


# ----------------------------------------------------------------------------- the CLI
def _train(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "hvd_rsgc.train", *args], capture_output=True,
                          text=True, timeout=300, cwd=str(cwd), env=env)


def test_cli_bad_input_gives_one_clear_line_not_a_traceback(tmp_path):
    for args, want in ((["--lr", "abc"], "lr: expected a number"),
                       (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
                       (["--config", SYNTH, "--resume", "x"], "do not go together"),
                       (["--resume", str(tmp_path / "none")], "no such run directory")):
        p = _train(args, tmp_path)
        assert p.returncode != 0 and want in p.stderr and "Traceback" not in p.stderr, (args, p.stderr[-2000:])


def test_cli_resume_validates_overrides_and_reads_an_empty_checkpoint_clearly(tmp_path):
    base = ["--config", SYNTH, "--out_dir", str(tmp_path), "--run_name", "z", "--epochs", "2",
            "--max_steps_per_epoch", "2", "--synthetic_train", "64", "--synthetic_val", "32",
            "--progress", "false"]
    p = _train(base, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "z"
    p = _train(["--resume", str(run), "--compression", "bogus"], tmp_path)
    assert p.returncode != 0 and "compression must be one of" in p.stderr
    # the split may not change under a resumed run (validation images would be trained on)
    p = _train(["--resume", str(run), "--seed", "1", "--synthetic_val", "32"], tmp_path)
    assert p.returncode != 0 and "seed cannot change when a run is resumed" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    p = _train([x if x != "z" else "m" for x in base] + ["--mean", "1,2", "--std", "1,2"], tmp_path)
    assert p.returncode != 0 and "mean / std have 2 / 2 values but the synthetic images have 3 " \
        "channels" in p.stderr, p.stderr[-2000:]
    assert "bogus" not in open(run / "config.yaml").read()
    open(run / "checkpoints" / "epoch0001.pt", "w").close()
    p = _train(["--resume", str(run), "--epochs", "3"], tmp_path)
    assert p.returncode != 0 and "epoch0001.pt" in p.stderr and "epoch0000.pt" in p.stderr
    assert "Traceback" not in p.stderr
    p = _train(["--resume", str(run / "checkpoints" / "epoch0000.pt"), "--epochs", "2"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x)["epoch"] for x in open(run / "metrics.jsonl")]
    assert rows == [1, 2]                      # epoch 2 re-run once, not duplicated
    assert coerce("lr", "1e-3") == 1e-3


def test_checkpoints_past_epoch_9999_and_rank_999_are_found_ordered_and_pruned(tmp_path):
    """``epoch10000.pt`` was neither found on resume nor rotated (the glob wanted 4 digits, and
    the names sorted as text); ``.rank1000`` shards were not set aside."""
    run = str(tmp_path / "run")
    for e in (9998, 9999, 10000):
        path = ckpt.main_path(run, e)
        for r in (999, 1000):
            ckpt.atomic_save({"format": ckpt.SHARD_FORMAT, "rank": r}, ckpt.shard_path(path, r))
        ckpt.atomic_save({"format": ckpt.CKPT_FORMAT, "epoch": e}, path)
    assert [os.path.basename(p) for p in ckpt.checkpoints(run)] == \
        ["epoch9998.pt", "epoch9999.pt", "epoch10000.pt"]
    assert ckpt.resolve(run)[1].endswith("epoch10000.pt")
    ckpt.save_main(run, 10001, {"format": ckpt.CKPT_FORMAT, "epoch": 10001}, keep=2)
    left = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert left == ["epoch10000.pt", "epoch10000.rank1000.pt", "epoch10000.rank999.pt",
                    "epoch10001.pt"], left
    folder, moved = ckpt.set_aside(run, 9999, "superseded")
    assert sorted(moved) == ["epoch10000.pt", "epoch10000.rank1000.pt", "epoch10000.rank999.pt",
                             "epoch10001.pt"]


def test_the_largest_accepted_seed_builds_the_synthetic_set():
    """seed is accepted up to 2^63 - 1; the synthetic set's per-image seed overflowed
    manual_seed above ~1.8e13 ("Overflow when unpacking long long", naming nothing)."""
    from hvd_rsgc.app.config import Config
    from hvd_rsgc.app.data.synthetic import SyntheticScenes
    Config.from_flat({"seed": 2 ** 63 - 1})
    img, _ = SyntheticScenes(4, 3, 8, seed=2 ** 63 - 1)[3]
    assert img.shape == (3, 8, 8)


def test_ranks_that_read_other_data_or_another_checkpoint_are_named():
    """Each rank reads the data and the checkpoint folder itself: one that saw other sizes or
    another epoch would run another number of steps (a hang). Every rank compares them and
    raises the same error naming what differs and each rank's value."""
    from types import SimpleNamespace

    from hvd_rsgc.app.train import check_ranks_agree
    mine = {"resumed_epoch": 3, "train_images": 600, "steps_per_epoch": 9}
    same = SimpleNamespace(allgather_object=lambda obj, name=None: [dict(obj), dict(obj)])
    check_ranks_agree(same, mine)
    other = dict(mine, resumed_epoch=2, train_images=599)
    differ = SimpleNamespace(allgather_object=lambda obj, name=None: [dict(obj), other])
    with pytest.raises(ValueError, match=r"do not agree on resumed_epoch, train_images \(rank 0: "
                                         r"resumed_epoch=3, train_images=600; rank 1: "
                                         r"resumed_epoch=2, train_images=599\)"):
        check_ranks_agree(differ, mine)
