"""The Indian Pines benchmark set (``app/data/indian_pines.py``):

* built from a folder of ``.mat`` files with the release's names, keys, shapes and dtypes
  (a generated fixture: nothing is downloaded), idempotently, with a licence note;
* the spatial split against a reference written here with loops: validation = the tiles of the
  rule, training = labelled pixels of the kept classes whose whole window holds no validation
  pixel; classes renumbered 1..9;
* patches: a plain slice of the reflect-padded standardised cube; ``hsicnn`` on them; RGB models
  refused with a message naming hsicnn;
* bad input named: band count, ground-truth shape, label range, missing files, scene not built;
* on the real scene, where it has been built on this machine: the published class counts
  (10,249 labelled pixels) and every kept class on both sides of the split;
* training through the CLI under ``horovodrun -np 2`` with RS-DGC on the fixture.
"""
import json
import os

import numpy as np
import pytest
import torch

from hvd_rsgc.app.config import load_config
from hvd_rsgc.app.data import build_datasets
from hvd_rsgc.app.data import indian_pines as ip
from hvd_rsgc.app.models import build_model

from support import ROOT, run_module

scipy_io = pytest.importorskip("scipy.io")
CFG = os.path.join(ROOT, "examples", "configs", "indianpines_bench.yaml")
# the published per-class pixel counts of the 16-class ground truth (ids 1..16)
PUBLISHED = [46, 1428, 830, 237, 483, 730, 28, 478, 20, 972, 2455, 593, 205, 1265, 386, 93]


def fixture_scene(seed=0, H=145, W=145, B=200, learnable=False):
    g = np.random.default_rng(seed)
    cube = g.integers(900, 9600, size=(H, W, B), dtype=np.uint16)
    gt = np.zeros((H, W), np.uint8)
    # fields: rectangles of one class each, like the real map
    for _ in range(60):
        y, x = g.integers(0, H - 12), g.integers(0, W - 12)
        gt[y:y + g.integers(4, 12), x:x + g.integers(4, 12)] = g.integers(1, 17)
    if learnable:
        for c in range(1, 17):
            cube[gt == c] = np.clip(cube[gt == c].astype(np.int64) + 300 * c, 0, 65535).astype(np.uint16)
    return cube, gt


def write(folder, cube, gt):
    os.makedirs(folder, exist_ok=True)
    scipy_io.savemat(os.path.join(folder, "Indian_pines_corrected.mat"), {"indian_pines_corrected": cube})
    scipy_io.savemat(os.path.join(folder, "Indian_pines_gt.mat"), {"indian_pines_gt": gt})
    return folder


def reference_split(gt, patch=9, tile=16, every=4):
    H, W = gt.shape
    r = patch // 2
    val_area = np.zeros((H, W), bool)
    for y in range(H):
        for x in range(W):
            val_area[y, x] = ((y // tile) + 2 * (x // tile)) % every == 0
    new_id = {old: i + 1 for i, old in enumerate(ip.KEPT)}
    tr = np.zeros((H, W), np.int64)
    va = np.zeros((H, W), np.int64)
    for y in range(H):
        for x in range(W):
            c = int(gt[y, x])
            if c not in new_id:
                continue
            if val_area[y, x]:
                va[y, x] = new_id[c]
            elif not val_area[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1].any():
                tr[y, x] = new_id[c]
    return tr, va


def test_build_from_files_split_and_patches(tmp_path):
    cube, gt = fixture_scene()
    src = write(tmp_path / "src", cube, gt)
    root = ip.build(str(tmp_path / "root"), source=str(src), quiet=True)
    assert sorted(os.listdir(root)) == ["DONE", "LICENSES.txt", "scene.npz"]
    assert "doi:10.4231/R7RX991C" in open(os.path.join(root, "LICENSES.txt")).read()
    stamp = os.path.getmtime(os.path.join(root, "scene.npz"))
    assert ip.build(root, source=str(src), quiet=True) == root                # cached
    assert os.path.getmtime(os.path.join(root, "scene.npz")) == stamp
    with np.load(os.path.join(root, "scene.npz")) as z:
        assert z["cube"].dtype == np.uint16 and np.array_equal(z["cube"], cube)
        assert np.array_equal(z["gt"], gt)

    tr, va = ip.split_maps(gt.astype(np.int64))
    rtr, rva = reference_split(gt)
    assert np.array_equal(tr, rtr) and np.array_equal(va, rva)
    assert not ((tr > 0) & (va > 0)).any() and tr.max() <= 9 and va.max() <= 9

    cfg = load_config(CFG, {"data_root": root})
    train, val, classes = build_datasets(cfg.data, seed=0)
    assert classes == list(ip.CLASSES) and len(classes) == 9
    assert len(train) == int((tr > 0).sum()) and len(val) == int((va > 0).sum())
    std = ip.standardize(torch.from_numpy(cube.astype(np.float32)).permute(2, 0, 1))
    padded = torch.nn.functional.pad(std[None], (4, 4, 4, 4), mode="reflect")[0]
    for i in (0, len(val) // 2, len(val) - 1):
        x, y = val[i]
        r, c = (int(v) for v in val.coords[i])
        assert y == va[r, c] - 1
        assert torch.allclose(x, padded[:, r:r + 9, c:c + 9], atol=1e-5)
    assert train.prenormalized and train.model_kwargs == {"in_channels": 200}
    model = build_model("hsicnn", 9, 9, **train.model_kwargs)
    xb = torch.stack([train[i][0] for i in range(4)])
    assert model(xb).shape == (4, 9)
    with pytest.raises(ValueError, match="hsicnn"):
        build_model("resnet20", 9, 9, **train.model_kwargs)
    with pytest.raises(ValueError, match="must be odd"):
        build_datasets(load_config(CFG, {"data_root": root, "image_size": 8}).data, seed=0)


@pytest.mark.parametrize("case,match", [
    ("bands", r"expected \(H, W, 200\) bands"),
    ("gt_shape", r"ground truth is \(145, 144\) but the cube is \(145, 145\)"),
    ("label", "labels must be in 0..16, found 17"),
    ("missing", "--from: .*Indian_pines_gt.mat not found"),
])
def test_bad_input_is_named(tmp_path, case, match):
    cube, gt = fixture_scene(H=145, W=145, B=200)
    if case == "bands":
        cube = cube[:, :, :100]
    elif case == "gt_shape":
        gt = gt[:, :144]
    elif case == "label":
        gt[0, 0] = 17
    src = write(tmp_path / "src", cube, gt)
    if case == "missing":
        os.remove(os.path.join(src, "Indian_pines_gt.mat"))
    with pytest.raises(ValueError, match=match):
        ip.build(str(tmp_path / "root"), source=str(src), quiet=True)
    assert not os.path.exists(tmp_path / "root" / "DONE")


def test_not_built_says_how_to_build(tmp_path):
    with pytest.raises(ValueError, match="--from DIR .* or --pypi"):
        ip.build(str(tmp_path / "nothing"), quiet=True)
    with pytest.raises(ValueError, match="no scene.npz"):
        build_datasets(load_config(CFG, {"data_root": str(tmp_path)}).data, seed=0)


@pytest.mark.skipif(not os.path.exists(os.path.join(ip.default_root(), "DONE")),
                    reason="the real Indian Pines scene is not built on this machine "
                           "(python -m hvd_rsgc.app.data.indian_pines --from DIR | --pypi)")
def test_real_scene_has_the_published_counts_and_every_class_on_both_sides():
    cube, gt = ip.load(ip.default_root())
    assert tuple(cube.shape) == (200, 145, 145)
    assert np.bincount(gt.ravel(), minlength=17)[1:].tolist() == PUBLISHED
    tr, va = ip.split_maps(gt)
    ct, cv = np.bincount(tr.ravel(), minlength=10)[1:], np.bincount(va.ravel(), minlength=10)[1:]
    assert (ct >= 100).all() and (cv >= 50).all(), (ct, cv)
    assert ct.sum() + cv.sum() > 6000                       # "several thousand patches"
    assert 0.3 < cv.sum() / (ct.sum() + cv.sum()) < 0.5


@pytest.mark.multiproc
def test_training_cli_on_the_fixture_np2(tmp_path):
    cube, gt = fixture_scene(learnable=True)
    root = ip.build(str(tmp_path / "root"), source=write(tmp_path / "src", cube, gt), quiet=True)
    run_module(2, ["hvd_rsgc.train", "--config", CFG, "--data_root", root, "--out_dir", str(tmp_path),
                   "--run_name", "ip", "--epochs", "2", "--max_steps_per_epoch", "6",
                   "--compression_warmup_epochs", "0", "--density", "0.01", "--progress", "false"],
               tmp_path, timeout=600)
    recs = [json.loads(line) for line in (tmp_path / "ip" / "metrics.jsonl").read_text().splitlines()]
    _, va = ip.split_maps(gt.astype(np.int64))
    cm = torch.tensor(recs[-1]["confusion"])
    assert cm.shape == (9, 9) and int(cm.sum()) == int((va > 0).sum())     # every val pixel once
    assert len(recs[-1]["per_class"]) == 9
    assert recs[-1]["bytes_per_worker"] < recs[-1]["dense_bytes_per_worker"] / 10
    # the fixture is learnable: the run learns it (the training loss falls, top-1 beats chance)
    assert recs[-1]["train_loss"] < recs[0]["train_loss"], [r["train_loss"] for r in recs]
    assert recs[-1]["oa"] > 1.5 / 9, recs[-1]["oa"]          # chance: 1 / 9 (0.23 measured)
