"""Houston2013 (HSI + LiDAR) support, on generated fixtures -- the data set cannot be
downloaded here:

* a fixture with Houston's full shapes (349 x 1905 x 144 CASI cube as a ``.tif``, LiDAR DSM as
  a ``.tif``, train/test maps as MATLAB ``.mat`` with the release's keys): shapes, per-band
  standardisation, one sample per labelled pixel, patches equal to a plain slice of the
  reflect-padded scene;
* the ``.mat`` cube in band-first order and ``.npy`` files; v7.3 (HDF5) ``.mat``;
* bad input named by its parameter: band count, HSI/LiDAR grid mismatch, labels out of range,
  overlapping splits, missing / unknown files;
* the CCR-Net- and ExViT-style models: shapes, reconstruction loss, gradients;
* training through the CLI under ``horovodrun -np 2`` with RS-DGC: OA / AA / kappa and
  per-class accuracy in the metrics, bytes compressed.
"""
import json
import os

import numpy as np
import pytest
import torch

from hvd_rsgc.app.data.houston import CLASSES, HoustonPatches, load_scene, read_array
from hvd_rsgc.app.models import build_model

from support import ROOT, run_module

scipy_io = pytest.importorskip("scipy.io")
tifffile = pytest.importorskip("tifffile")


def scene(H, W, B, seed=0, n_train=40, n_test=60):
    g = np.random.default_rng(seed)
    hsi = g.integers(0, 10_000, size=(H, W, B), dtype=np.uint16)
    lidar = g.normal(20.0, 5.0, size=(H, W)).astype(np.float32)
    tr = np.zeros((H, W), np.uint8)
    te = np.zeros((H, W), np.uint8)
    flat = g.permutation(H * W)
    tr.flat[flat[:n_train]] = g.integers(1, 16, n_train)
    te.flat[flat[n_train:n_train + n_test]] = g.integers(1, 16, n_test)
    return hsi, lidar, tr, te


def write(tmp, hsi, lidar, tr, te, fmt="mat"):
    paths = {k: str(tmp / f"{k}.{fmt}") for k in ("hsi", "lidar", "train", "test")}
    keys = {"hsi": "HSI", "lidar": "LiDAR", "train": "TRLabel", "test": "TSLabel"}
    for k, a in zip(("hsi", "lidar", "train", "test"), (hsi, lidar, tr, te)):
        if fmt == "mat":
            scipy_io.savemat(paths[k], {keys[k]: a})
        elif fmt == "tif":
            tifffile.imwrite(paths[k], a)
        else:
            np.save(paths[k], a)
    return paths


def test_full_houston_shapes_tif_and_mat(tmp_path):
    hsi, lidar, tr, te = scene(349, 1905, 144, n_train=2832, n_test=12197)
    tifffile.imwrite(tmp_path / "casi.tif", hsi)
    tifffile.imwrite(tmp_path / "lidar.tif", lidar)
    scipy_io.savemat(tmp_path / "TRLabel.mat", {"TRLabel": tr})
    scipy_io.savemat(tmp_path / "TSLabel.mat", {"TSLabel": te})
    cube, trm, tem = load_scene(str(tmp_path / "casi.tif"), str(tmp_path / "lidar.tif"),
                                str(tmp_path / "TRLabel.mat"), str(tmp_path / "TSLabel.mat"))
    assert cube.shape == (145, 349, 1905) and cube.dtype == torch.float32
    assert cube.mean(dim=(1, 2)).abs().max() < 1e-3
    assert (cube.std(dim=(1, 2)) - 1).abs().max() < 1e-3
    train = HoustonPatches(cube, trm, 11)
    test = HoustonPatches(cube, tem, 11)
    assert len(train) == 2832 and len(test) == 12197 and len(CLASSES) == 15
    assert torch.equal(torch.bincount(train.targets, minlength=15),
                       torch.bincount(torch.from_numpy(tr[tr > 0].astype(np.int64)) - 1, minlength=15))
    # a patch = the 11x11 window of the standardised, reflect-padded scene around its pixel
    ref = torch.nn.functional.pad(cube[None], (5, 5, 5, 5), mode="reflect")[0]
    for i in (0, len(train) // 2, len(train) - 1):
        y, x = (int(v) for v in train.coords[i])
        patch, label = train[i]
        assert patch.shape == (145, 11, 11) and label == int(tr[y, x]) - 1
        assert torch.equal(patch, ref[:, y:y + 11, x:x + 11])
        assert torch.equal(patch[:, 5, 5], cube[:, y, x])             # centre = the pixel


def test_band_first_mat_npy_and_v73(tmp_path):
    hsi, lidar, tr, te = scene(20, 30, 12)
    a = load_scene(*write(tmp_path, hsi, lidar, tr, te, "npy").values(), bands=12)
    p = write(tmp_path, np.moveaxis(hsi, 2, 0), lidar, tr, te, "mat")          # (B, H, W)
    b = load_scene(p["hsi"], p["lidar"], p["train"], p["test"], bands=12)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "v73.mat", "w", userblock_size=512) as f:   # MATLAB stores transposed
        f.create_dataset("HSI", data=hsi.T)
    with open(tmp_path / "v73.mat", "r+b") as f:                           # MATLAB's 128-byte header
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Nov 23 2026 HDF5 schema 1.00 .".ljust(116)
                + b"\0" * 8 + b"\x00\x02IM")
    v73 = read_array(str(tmp_path / "v73.mat"), "hsi", "houston_hsi")
    assert np.array_equal(v73, hsi)


@pytest.mark.parametrize("case,match", [
    ("bands", "houston_hsi: the cube has 10 bands"),
    ("grid", "houston_lidar: the DSM is"),
    ("label_range", "houston_train: label values must be in 0..15"),
    ("label_grid", "houston_test: the label map is"),
    ("overlap", "disjoint"),
    ("missing", "houston_lidar: .* is not a file"),
    ("ext", "houston_hsi: .* is not a .mat"),
    ("nan", "NaN"),
    ("unlabelled", "houston_test: the test label map labels no pixel"),
])
def test_bad_input_names_the_parameter(tmp_path, case, match):
    hsi, lidar, tr, te = scene(20, 30, 12)
    bands = 12
    if case == "bands":
        hsi = hsi[:, :, :10]
    if case == "grid":
        lidar = lidar[:, :29]
    if case == "label_range":
        tr[0, 0] = 16
    if case == "label_grid":
        te = te[:19]
    if case == "overlap":
        te[tr > 0] = 1
    if case == "nan":
        lidar[3, 3] = np.nan
    if case == "unlabelled":
        te = np.zeros_like(te)
    p = write(tmp_path, hsi, lidar, tr, te, "npy")
    if case == "missing":
        p["lidar"] = str(tmp_path / "nope.mat")
    if case == "ext":
        (tmp_path / "cube.hdr").write_text("x")
        p["hsi"] = str(tmp_path / "cube.hdr")
    with pytest.raises(ValueError, match=match):
        load_scene(p["hsi"], p["lidar"], p["train"], p["test"], bands=bands)


def test_models_shapes_reconstruction_loss_and_errors():
    torch.manual_seed(0)
    x = torch.randn(6, 13, 7, 7)
    for name in ("ccrnet", "exvit"):
        m = build_model(name, 15, 7, hsi_bands=12)
        out = m(x)
        assert out.shape == (6, 15)
        loss = torch.nn.functional.cross_entropy(out, torch.arange(6))
        if name == "ccrnet":
            assert m.extra_loss is not None and m.extra_loss.item() > 0      # training mode
            loss = loss + m.extra_loss
            m.eval()
            m(x)
            assert m.extra_loss is None
            m.train()
        loss.backward()
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad), name
        with pytest.raises(ValueError, match="13"):
            m(torch.randn(2, 5, 7, 7))
    with pytest.raises(ValueError, match="dataset houston"):
        build_model("ccrnet", 15, 11)
    with pytest.raises(ValueError, match="ccrnet"):
        build_model("resnet20", 15, 11, hsi_bands=144)


@pytest.mark.multiproc
@pytest.mark.parametrize("model", ["ccrnet", "exvit"])
def test_training_cli_on_a_houston_fixture_np2(tmp_path, model):
    hsi, lidar, tr, te = scene(24, 40, 16, n_train=160, n_test=120)
    # learnable: each class shifts its pixels' spectra (and heights) by its own amount
    for lab in (tr, te):
        for c in range(1, 16):
            hsi[lab == c] = np.clip(hsi[lab == c].astype(np.int64) + 400 * c, 0, 65535).astype(np.uint16)
            lidar[lab == c] += 2.0 * c
    p = write(tmp_path, hsi, lidar, tr, te, "mat")
    cfg = os.path.join(ROOT, "examples", "configs", "houston_ccrnet_rsdgc.yaml")
    run_module(2, ["hvd_rsgc.train", "--config", cfg, "--out_dir", str(tmp_path), "--run_name", "h",
                   "--houston_hsi", p["hsi"], "--houston_lidar", p["lidar"], "--houston_train", p["train"],
                   "--houston_test", p["test"], "--houston_bands", "16", "--image_size", "5",
                   "--model", model, "--epochs", "3", "--batch_size", "16", "--lr", "0.05",
                   "--compression_warmup_epochs", "0", "--min_numel", "256", "--density", "0.05",
                   "--progress", "false"], tmp_path, timeout=900)
    recs = [json.loads(line) for line in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]
    cm = torch.tensor(last["confusion"])
    assert cm.shape == (15, 15) and int(cm.sum()) == 120              # every test pixel once
    # the metrics logged are those of the logged matrix (rows: true class), by hand
    c = cm.double()
    rows, diag, n = c.sum(1), c.diag(), c.sum()
    seen = rows > 0
    pe = float((rows * c.sum(0)).sum() / n ** 2)
    assert last["oa"] == pytest.approx(float(diag.sum() / n), abs=1e-9)
    per_class = [float(d / r) if r > 0 else None for d, r in zip(diag, rows)]
    assert len(last["per_class"]) == 15
    for got, want in zip(last["per_class"], per_class):
        assert want is None or got == pytest.approx(want, abs=1e-9), (got, want)
    assert last["aa"] == pytest.approx(float((diag[seen] / rows[seen]).mean()), abs=1e-9)
    assert last["kappa"] == pytest.approx((last["oa"] - pe) / (1 - pe), abs=1e-9)
    assert last["bytes_per_worker"] < last["dense_bytes_per_worker"] / 3
    assert last["train_loss"] < recs[0]["train_loss"]
