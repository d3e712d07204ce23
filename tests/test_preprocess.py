"""Preprocessing: restore(preprocess(x)) is the exact inverse; the cache is keyed correctly."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from scipy import ndimage

from segpipe import Geometry, load_dataset, read_case, write_image
from segpipe.demo_data import make_case
from segpipe.preprocessing import (
    Cache,
    ChannelNorm,
    PreprocessSpec,
    crop_box,
    load_cached_case,
    normalize,
    preprocess_arrays,
    preprocess_dataset,
    resample,
    resample_label,
    restore,
    separate_z_axis,
)


def boundary_band(label: np.ndarray, widths) -> np.ndarray:
    """Voxels with another class within ``widths`` voxels (per axis) — the boundary band."""
    size = tuple(2 * int(w) + 1 for w in widths)
    return ndimage.maximum_filter(label, size=size) != ndimage.minimum_filter(label, size=size)


ZSCORE = (ChannelNorm("zscore", use_mask=True),)


@pytest.mark.parametrize(
    "spacing, transpose",
    [
        ((2.5, 0.9, 0.9), (0, 1, 2)),  # downsample in-plane, upsample z a bit
        ((1.0, 1.0, 1.0), (0, 1, 2)),  # isotropic target: z upsampled 2-3x (separable cubic on all axes)
        ((2.5, 0.6, 0.6), (0, 1, 2)),  # ratio > 3: separate-z (nearest along z)
        ((0.9, 2.5, 0.9), (1, 0, 2)),  # a transposed plan
    ],
)
def test_restore_inverts_preprocess(spacing, transpose):
    image, label, geo = make_case(5)
    spec = PreprocessSpec(spacing=spacing, normalization=ZSCORE, transpose=transpose)
    img, lab, props = preprocess_arrays(image[None], label, geo, spec, 4)
    assert img.dtype == np.float32 and lab.dtype == label.dtype
    assert img.shape[1:] == tuple(props["shape_after_resample"]) == lab.shape
    back = restore(lab, props)
    assert back.shape == label.shape
    assert Geometry.from_dict(props["original_geometry"]) == geo
    wrong = back != label
    # every disagreement lies within one voxel (of the coarser of the two grids) of a class boundary
    widths = [max(1, int(np.ceil(t / o))) for t, o in zip(spacing, (geo.spacing[a] for a in transpose))]
    widths = [widths[list(transpose).index(a)] for a in range(3)]
    assert not (wrong & ~boundary_band(label, widths)).any()
    assert wrong.mean() < 0.01
    for c in range(1, 4):
        a, b = back == c, label == c
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85
    # probabilities: one-hot through restore gives the same labels; background outside the crop box
    onehot = np.eye(4, dtype=np.float32)[lab].transpose(3, 0, 1, 2)
    probs = restore(onehot, props)
    assert probs.shape == (4, *label.shape)
    np.testing.assert_array_equal(probs.argmax(0), back)


def test_crop_box_and_restore_pad_outside():
    image = np.zeros((1, 10, 12, 14), np.float32)
    image[0, 2:5, 3:9, 4:6] = 1.0
    assert crop_box(image) == [[2, 5], [3, 9], [4, 6]]
    label = (image[0] > 0).astype(np.uint8)
    geo = Geometry(shape=(10, 12, 14), spacing=(1, 1, 1))
    spec = PreprocessSpec(spacing=(1, 1, 1), normalization=(ChannelNorm("none"),))
    img, lab, props = preprocess_arrays(image, label, geo, spec, 2)
    assert img.shape == (1, 3, 6, 2)
    np.testing.assert_array_equal(restore(lab, props), label)
    assert props["class_locations"]["1"] and all(lab[tuple(p)] == 1 for p in props["class_locations"]["1"])


def test_normalisation_by_hand():
    x = np.array([[[[0, 0, 2, 4, 6]]]], np.float32)
    out, used = normalize(x, [ChannelNorm("zscore", use_mask=True)])
    vals = np.array([2, 4, 6], np.float64)
    np.testing.assert_allclose(out[0, 0, 0, 2:], (vals - vals.mean()) / vals.std(), rtol=1e-6)
    assert (out[0, 0, 0, :2] == 0).all()
    out, _ = normalize(x, [ChannelNorm("zscore")])
    allv = x.ravel().astype(np.float64)
    np.testing.assert_allclose(out.ravel(), (allv - allv.mean()) / allv.std(), rtol=1e-5, atol=1e-6)
    ct = ChannelNorm("ct", clip=(1.0, 5.0), mean=3.0, std=2.0)
    out, used = normalize(x, [ct])
    np.testing.assert_allclose(out.ravel(), (np.clip(allv, 1, 5) - 3) / 2)
    assert used[0]["scheme"] == "ct"
    out, _ = normalize(x, [ChannelNorm("rescale_to_0_1")])
    np.testing.assert_allclose(out.ravel(), allv / 6.0)
    out, _ = normalize(np.array([[[[0, 51, 255, 300]]]], np.float32), [ChannelNorm("rgb_to_0_1")])
    np.testing.assert_allclose(out.ravel(), [0, 0.2, 1, 1])


def test_resampling_rules():
    assert separate_z_axis((5.0, 0.7, 0.7)) == 0
    assert separate_z_axis((2.0, 0.7, 0.7)) is None
    # cubic reproduces a linear ramp exactly away from the borders; labels never get new values
    ramp = np.broadcast_to(np.arange(20, dtype=np.float32)[None, :, None, None], (1, 20, 8, 8)).copy()
    up = resample(ramp, (40, 8, 8), kind="cubic")
    np.testing.assert_allclose(up[0, 4:-4, 4, 4], (np.arange(40)[4:-4] + 0.5) / 2 - 0.5, atol=1e-4)
    lab = np.zeros((9, 9, 9), np.uint8)
    lab[2:7, 2:7, 2:7] = 2
    lab[4, 4, 4] = 1
    r = resample_label(lab, (17, 17, 17), 3)
    assert set(np.unique(r)) <= {0, 1, 2}
    assert resample_label(lab, (9, 9, 9), 3) is lab


def _spec():
    return PreprocessSpec(spacing=(2.5, 1.0, 1.0), normalization=ZSCORE)


def test_cache_is_reused_and_rebuilt(demo_dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(demo_dataset, root)
    ds = load_dataset(root)
    cases = ds.cases[:3]
    cache = tmp_path / "cache"
    r1 = preprocess_dataset(ds, _spec(), cache, cases=cases, num_workers=1)
    assert r1.processed == [c.id for c in cases] and r1.reused == []
    image, label, props = load_cached_case(cache, cases[0].id)
    assert isinstance(image, np.memmap) and image.dtype == np.float32 and label.dtype == np.uint8
    data = read_case(cases[0], ds)
    back = restore(np.asarray(label), props)
    assert back.shape == data.label.shape and (back != data.label).mean() < 0.01

    r2 = preprocess_dataset(ds, _spec(), cache, cases=cases, num_workers=1)
    assert r2.processed == [] and r2.reused == [c.id for c in cases]

    # a changed source file is redone, the others kept
    other = read_case(cases[1], ds)
    write_image(cases[1].images[0], other.image * 2, other.geometry)
    os.utime(cases[1].images[0], ns=(1, 1))
    r3 = preprocess_dataset(ds, _spec(), cache, cases=cases, num_workers=1)
    assert r3.processed == [cases[1].id] and sorted(r3.reused) == sorted([cases[0].id, cases[2].id])

    # a changed plan redoes everything
    spec2 = PreprocessSpec(spacing=(2.0, 1.0, 1.0), normalization=ZSCORE)
    r4 = preprocess_dataset(ds, spec2, cache, cases=cases, num_workers=2)
    assert r4.processed == [c.id for c in cases]
    props = Cache(cache).properties(cases[0].id)
    assert props["spacing"] == [2.0, 1.0, 1.0]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "no temporary files left"


def test_2d_keeps_each_case_slice_spacing():
    image, label, geo = make_case(2)
    spec = PreprocessSpec(spacing=(9.9, 1.0, 1.0), normalization=ZSCORE, resample_slices=False)
    img, lab, props = preprocess_arrays(image[None], label, geo, spec, 4)
    assert img.shape[1] == props["shape_after_crop"][0]
    assert props["spacing"][0] == pytest.approx(geo.spacing[0])
    assert restore(lab, props).shape == label.shape


def test_preprocess_command_uses_the_plan_and_refuses_bad_cases(demo_dataset, tmp_path):
    import subprocess
    import sys

    work = tmp_path / "work"
    root = tmp_path / "ds"
    shutil.copytree(demo_dataset, root)

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "segpipe", *args, f"work_dir={work}"], capture_output=True, text=True, timeout=600
        )

    r = run("preprocess", str(root))
    assert r.returncode == 4 and "run `segpipe plan" in r.stderr
    assert run("plan", str(root), "configurations=[3d_fullres]").returncode == 0
    r = run("preprocess", str(root), "--json", "configuration=3d_fullres")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["configurations"]["3d_fullres"]
    assert len(res["processed"]) == 12
    plan = json.loads((work / "ds" / "plans.json").read_text())
    cache = Cache(work / "ds" / "cache" / plan["configurations"]["3d_fullres"]["data_identifier"])
    props = cache.properties("demo_000")
    assert props["spacing"] == pytest.approx(plan["configurations"]["3d_fullres"]["spacing"])
    r = run("preprocess", str(root), "--json", "configuration=3d_fullres")
    assert len(json.loads(r.stdout)["configurations"]["3d_fullres"]["reused"]) == 12

    # a NaN in one image: one-line error naming case and file, exit 3, that entry not rewritten
    data = read_case(load_dataset(root).case("demo_003"), load_dataset(root))
    bad = data.image.copy()
    bad[0, 1, 1, 1] = np.nan
    write_image(root / "imagesTr" / "demo_003.nii.gz", bad, data.geometry)
    before = cache.image_path("demo_003").stat().st_mtime_ns
    r = run("preprocess", str(root), "configuration=3d_fullres")
    assert r.returncode == 3
    assert "demo_003" in r.stderr and "imagesTr/demo_003.nii.gz" in r.stderr and "Traceback" not in r.stderr
    assert cache.image_path("demo_003").stat().st_mtime_ns == before
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".")]
