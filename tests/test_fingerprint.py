"""Fingerprint: per-case summaries, aggregation, determinism, parallel reading and the cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from segpipe import fingerprint as fpmod
from segpipe.errors import DatasetError, StateError
from segpipe.fingerprint import (
    FINGERPRINT_FILE,
    FINGERPRINT_VERSION,
    MAX_SAMPLES_PER_CASE,
    compute_fingerprint,
    fingerprint_dataset,
    load_fingerprint,
    samples_per_case,
    summarize_case,
)
from segpipe.geometry import Geometry
from segpipe.io.datasets import load_dataset
from segpipe.io.image import write_image


def _case(seed: int, shape=(8, 12, 10), spacing=(3.0, 0.8, 0.8)):
    """An image with a zero border (crop box known) and two labels; class 1 has two components."""
    rng = np.random.default_rng(seed)
    image = np.zeros((2, *shape), np.float32)
    image[:, 1:7, 2:11, 1:9] = rng.normal(100, 10, size=(2, 6, 9, 8))
    image[1] *= 3
    label = np.zeros(shape, np.uint8)
    label[2:4, 3:5, 2:4] = 1
    label[5:6, 8:10, 6:8] = 1
    label[2:5, 6:8, 4:6] = 2
    return image, label, Geometry(shape=shape, spacing=spacing)


def _write_dataset(root: Path, n: int = 4, spacings=None) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n):
        image, label, geo = _case(i, spacing=(spacings[i] if spacings else (3.0, 0.8, 0.8)))
        write_image(root / "imagesTr" / f"c_{i:03d}.nii.gz", image, geo)
        write_image(root / "labelsTr" / f"c_{i:03d}.nii.gz", label, geo)
        training.append({"image": f"./imagesTr/c_{i:03d}.nii.gz", "label": f"./labelsTr/c_{i:03d}.nii.gz"})
    desc = {
        "name": "fp",
        "modality": {"0": "CT", "1": "T2"},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "numTraining": n,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    spacings = [(3.0, 0.8, 0.8), (2.0, 0.8, 0.8), (3.0, 0.7, 0.7), (5.0, 0.9, 0.9)]
    return load_dataset(_write_dataset(tmp_path_factory.mktemp("fp") / "Task01_fp", spacings=spacings))


def test_summarize_case_measures_crop_classes_and_intensities():
    image, label, geo = _case(0)
    summary, sample = summarize_case(image, label, geo.spacing, case_id="x", case_index=3, n_samples=500)
    assert summary["crop_bbox"] == [[1, 7], [2, 11], [1, 9]]
    assert summary["shape_after_crop"] == [6, 9, 8]
    assert summary["relative_size_after_crop"] == pytest.approx(6 * 9 * 8 / (8 * 12 * 10))
    assert summary["class_voxels"] == {"0": int((label == 0).sum()), "1": 12, "2": 12}
    assert summary["class_components"] == {"1": 2, "2": 1}
    fg = image[:, label > 0]
    for c in range(2):
        stats = summary["foreground_intensity"][c]
        assert stats["n"] == 24
        assert stats["mean"] == pytest.approx(float(fg[c].astype(np.float64).mean()))
        assert stats["min"] == pytest.approx(float(fg[c].min()))
        assert stats["percentile_99_5"] == pytest.approx(float(np.percentile(fg[c].astype(np.float64), 99.5)))
    assert sample.shape == (2, 500) and sample.dtype == np.float32
    assert set(np.unique(sample[0])) <= set(fg[0].tolist())  # drawn from the foreground, with replacement
    again, sample2 = summarize_case(image, label, geo.spacing, case_id="x", case_index=3, n_samples=500)
    assert again == summary and np.array_equal(sample, sample2)  # seeded by (1234, case index)


def test_summarize_case_all_zero_image_and_empty_label():
    image = np.zeros((1, 4, 5, 6), np.float32)
    summary, sample = summarize_case(image, np.zeros((4, 5, 6), np.uint8), (1, 1, 1), n_samples=10)
    assert summary["crop_bbox"] == [[0, 4], [0, 5], [0, 6]]  # nothing nonzero: keep the whole image
    assert summary["foreground_voxels"] == 0 and summary["class_components"] == {}
    assert summary["foreground_intensity"] == [{"n": 0}] and sample.shape == (1, 0)


def test_samples_per_case_is_bounded():
    assert samples_per_case(208) == MAX_SAMPLES_PER_CASE
    assert samples_per_case(10**5) == 1000  # nnU-Net's 1e8 / n_cases once that is smaller


def test_compute_fingerprint_aggregates(tiny):
    fp = compute_fingerprint(tiny, num_workers=1)
    assert fp["num_cases"] == 4 and fp["channel_names"] == {"0": "CT", "1": "T2"}
    assert [c["id"] for c in fp["cases"]] == [c.id for c in tiny.cases]
    assert fp["spacing"]["median"] == pytest.approx([3.0, 0.8, 0.8])
    assert fp["spacing"]["min"] == pytest.approx([2.0, 0.7, 0.7])
    assert fp["shape_after_crop"]["median"] == [6, 9, 8]
    assert fp["median_relative_size_after_crop"] == pytest.approx(0.45)
    assert fp["classes"]["1"]["max_components"] == 2 and fp["classes"]["2"]["case_fraction"] == 1.0
    assert fp["classes"]["1"]["voxels"] == 48
    # min/max are exact over all foreground voxels; mean comes from the (equal-weight) sample
    values = []
    for case in tiny.cases:
        image, label, _ = _case(int(case.id.split("_")[1]))
        values.append(image[1][label > 0])
    allfg = np.concatenate(values).astype(np.float64)
    ch1 = fp["foreground_intensity_per_channel"]["1"]
    assert ch1["max"] == pytest.approx(allfg.max(), rel=1e-6) and ch1["min"] == pytest.approx(allfg.min(), rel=1e-6)
    assert ch1["mean"] == pytest.approx(allfg.mean(), rel=0.01)
    assert ch1["n_samples"] == 4 * MAX_SAMPLES_PER_CASE
    assert fp["fingerprint_version"] == FINGERPRINT_VERSION


def test_intensity_histogram_of_the_pooled_sample(tiny):
    fp = compute_fingerprint(tiny, num_workers=1)
    samples = []
    for index, case in enumerate(tiny.cases):
        image, label, geo = _case(int(case.id.split("_")[1]))
        samples.append(
            summarize_case(
                image, label, geo.spacing, case_index=index, n_samples=fpmod.samples_per_case(len(tiny.cases))
            )[1]
        )
    pooled = np.concatenate(samples, axis=1).astype(np.float64)
    for c in ("0", "1"):
        stats = fp["foreground_intensity_per_channel"][c]
        hist = stats["histogram"]
        lo, hi = hist["range"]
        assert [lo, hi] == [stats["percentile_00_5"], stats["percentile_99_5"]] and lo < hi
        expected, _ = np.histogram(pooled[int(c)], bins=hist["bins"], range=(lo, hi))
        assert hist["counts"] == expected.tolist()
        assert hist["below"] == int((pooled[int(c)] < lo).sum()) and hist["above"] == int((pooled[int(c)] > hi).sum())
        assert sum(hist["counts"]) + hist["below"] + hist["above"] == stats["n_samples"]


def test_histogram_of_a_constant_foreground():
    hist = fpmod._histogram(np.full(10, 7.0), 7.0, 7.0, bins=4)
    assert hist["range"] == [6.5, 7.5] and sum(hist["counts"]) == 10 and hist["below"] == hist["above"] == 0


def test_parallel_equals_serial(tiny):
    serial = compute_fingerprint(tiny, num_workers=1)
    parallel = compute_fingerprint(tiny, num_workers=2)
    assert json.dumps(serial, sort_keys=True) == json.dumps(parallel, sort_keys=True)


def test_cache_reused_until_dataset_changes(tmp_path, monkeypatch):
    ds = load_dataset(_write_dataset(tmp_path / "Task02_cache", n=3))
    out = tmp_path / "work"
    first = fingerprint_dataset(ds, out, num_workers=1)
    text = (out / FINGERPRINT_FILE).read_text()
    assert first["source"]["files"] == 6 and not list(out.glob(".*tmp*"))

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although nothing changed")

    monkeypatch.setattr(fpmod, "compute_fingerprint", boom)
    assert fingerprint_dataset(ds, out) == first
    with pytest.raises(AssertionError):
        fingerprint_dataset(ds, out, force=True)
    monkeypatch.undo()
    # same data → same bytes
    assert fingerprint_dataset(ds, out, force=True, num_workers=2) == first
    assert (out / FINGERPRINT_FILE).read_text() == text
    # a changed file (new size / mtime) invalidates the cache
    label = ds.cases[0].label
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    monkeypatch.setattr(fpmod, "compute_fingerprint", boom)
    with pytest.raises(AssertionError):
        fingerprint_dataset(ds, out)


def test_fingerprint_file_path_and_corrupt_cache(tmp_path, monkeypatch):
    ds = load_dataset(_write_dataset(tmp_path / "Task03_path", n=2))
    path = tmp_path / "work" / "entry" / "fingerprint.json"
    first = fingerprint_dataset(ds, path, num_workers=1)
    assert path.is_file() and load_fingerprint(path) == first
    assert fingerprint_dataset(ds, path.parent) == first  # a folder still means <folder>/fingerprint.json
    path.write_text('{"truncated": ')  # a corrupt cache is recomputed, not trusted and not fatal
    assert fingerprint_dataset(ds, path, num_workers=1) == first
    # a fingerprint of an older version is recomputed (its signature carries the version)
    stale = json.loads(path.read_text())
    stale["source"]["sha256"] = "0" * 64
    path.write_text(json.dumps(stale))
    calls = []
    monkeypatch.setattr(fpmod, "compute_fingerprint", lambda *a, **k: calls.append(1) or dict(first))
    fingerprint_dataset(ds, path)
    assert calls == [1]


def test_load_fingerprint_errors(tmp_path):
    with pytest.raises(StateError, match="no fingerprint") as exc:
        load_fingerprint(tmp_path / "fingerprint.json")
    assert "segpipe plan" in (exc.value.hint or "")
    (tmp_path / "fingerprint.json").write_text("{")
    with pytest.raises(StateError, match="corrupt fingerprint"):
        load_fingerprint(tmp_path / "fingerprint.json")


def test_no_cases_is_a_dataset_error(tiny):
    from dataclasses import replace

    with pytest.raises(DatasetError, match="no labelled training cases"):
        compute_fingerprint(replace(tiny, cases=[]))


def test_whole_image_percentiles_border_classes_and_the_training_profile(tiny):
    from segpipe.fingerprint import data_profile

    image, label, geo = _case(0)
    summary, _ = summarize_case(image, label, geo.spacing, n_samples=10)
    for c in range(2):  # every voxel, background too (the image is small: no stride)
        p01, p50, p99 = np.percentile(image[c].astype(np.float64), [1, 50, 99])
        assert summary["image_intensity"][c] == pytest.approx({"p01": p01, "p50": p50, "p99": p99})
    edge = np.zeros_like(label)
    edge[0, 3, 3] = 2  # on the first slice
    edge[3, 3, 3] = 1  # inside
    assert summarize_case(image, edge, geo.spacing, n_samples=10)[0]["class_border"] == ["2"]

    fp = compute_fingerprint(tiny, num_workers=1)
    spacings = [(3.0, 0.8, 0.8), (2.0, 0.8, 0.8), (3.0, 0.7, 0.7), (5.0, 0.9, 0.9)]  # the fixture's
    volumes = [12 * float(np.prod(sp)) / 1000.0 for sp in spacings]  # class 1: 12 voxels in every case
    assert fp["classes"]["1"]["volume_ml"] == pytest.approx(
        {"min": min(volumes), "median": float(np.median(volumes)), "max": max(volumes)}
    )
    assert fp["classes"]["1"]["border_case_fraction"] == 0.0
    p99 = [c["image_intensity"][1]["p99"] for c in fp["cases"]]
    assert fp["image_intensity_per_channel"]["1"]["p99"] == pytest.approx(
        {"min": min(p99), "median": float(np.median(p99)), "max": max(p99)}
    )
    profile = data_profile(fp)
    assert profile["channels"]["1"]["name"] == "T2" and profile["channels"]["1"]["image"]["p99"]["max"] == max(p99)
    assert profile["spacing"]["min"] == pytest.approx([2.0, 0.7, 0.7])
    assert profile["classes"]["1"]["volume_ml"] == fp["classes"]["1"]["volume_ml"]
