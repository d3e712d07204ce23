"""Surface distances, HD95 and the normalized surface Dice on anisotropic grids (hand-computed boxes, a
brute-force check, spheres), and folder evaluation: pairing, refusals, the summary, the CSV and the pictures."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from segpipe.errors import DataError, UsageError
from segpipe.evaluation import (
    DEFAULT_TOLERANCE_MM,
    hd95,
    normalized_surface_dice,
    surface_distances,
    surface_metrics_per_class,
)
from segpipe.geometry import Geometry
from segpipe.io.image import write_image
from segpipe.workflows.evaluate import evaluate_folders
from segpipe.workflows.evaluation_plots import qc_slices

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SP = (2.0, 0.7, 1.5)  # mm along z, y, x
SHAPE = (10, 8, 8)


def box(z=(2, 6), y=(2, 6), x=(2, 6), shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[z[0] : z[1], y[0] : y[1], x[0] : x[1]] = True
    return m


# ============================================================================ surface metrics
def test_box_shifted_one_slice_by_hand():
    # Two 4×4×4 boxes, the prediction one slice (2 mm) higher. Each border has 56 voxels (64 minus the
    # 2×2×2 interior). Prediction → reference: its bottom face's 12 rim voxels and the rims of its
    # middle slices lie on the reference's border (0 mm, 36 voxels); its bottom face's 4 inner voxels
    # sit inside the reference, one row (0.7 mm along y) from its rim; its top face (16) is one slice
    # (2 mm) above the reference's top face. By symmetry the other direction is the same multiset.
    ref, pred = box(z=(2, 6)), box(z=(3, 7))
    d_pred, d_ref = surface_distances(pred, ref, SP)
    expected = [0.0] * 36 + [0.7] * 4 + [2.0] * 16
    np.testing.assert_allclose(np.sort(d_pred), expected)
    np.testing.assert_allclose(np.sort(d_ref), expected)
    # pooled: 72 zeros, 8 × 0.7, 32 × 2.0; the 95th percentile sits at position 0.95·111 = 105.45 → 2.0
    assert hd95(pred, ref, SP) == pytest.approx(2.0)
    assert normalized_surface_dice(pred, ref, SP, 0.5) == pytest.approx(72 / 112)
    assert normalized_surface_dice(pred, ref, SP, 1.0) == pytest.approx(80 / 112)
    assert normalized_surface_dice(pred, ref, SP, 2.0) == 1.0  # "within" includes the tolerance itself


def test_one_voxel_outlier_is_outside_the_95th_percentile():
    # The reference box plus one voxel on top of its top face's inner voxel (5, 3, 3), which thereby
    # leaves the prediction's border: 55 shared border voxels, the new voxel 2 mm from (5, 3, 3), and
    # (5, 3, 3) 0.7 mm (one row along y) from the prediction's border.
    ref = box(z=(2, 6))
    pred = ref.copy()
    pred[6, 3, 3] = True
    d_pred, d_ref = surface_distances(pred, ref, SP)
    np.testing.assert_allclose(np.sort(d_pred), [0.0] * 55 + [2.0])
    np.testing.assert_allclose(np.sort(d_ref), [0.0] * 55 + [0.7])
    assert hd95(pred, ref, SP) == 0.0  # positions 105 and 106 of 112 sorted values are both 0
    assert normalized_surface_dice(pred, ref, SP, 0.5) == pytest.approx(110 / 112)
    assert normalized_surface_dice(pred, ref, SP, 1.0) == pytest.approx(111 / 112)
    assert normalized_surface_dice(pred, ref, SP, 2.5) == 1.0


def test_identical_empty_and_one_empty_masks():
    ref = box()
    assert hd95(ref, ref, SP) == 0.0
    assert normalized_surface_dice(ref, ref, SP, 0.0) == 1.0
    empty = np.zeros(SHAPE, dtype=bool)
    d_pred, d_ref = surface_distances(empty, empty, SP)
    assert d_pred.size == 0 and d_ref.size == 0
    assert math.isnan(hd95(empty, empty, SP))
    assert math.isnan(normalized_surface_dice(empty, empty, SP, 1.0))
    diagonal = math.sqrt((10 * 2.0) ** 2 + (8 * 0.7) ** 2 + (8 * 1.5) ** 2)
    for pred, truth in ((empty, ref), (ref, empty)):
        assert hd95(pred, truth, SP) == pytest.approx(diagonal)
        assert normalized_surface_dice(pred, truth, SP, 100.0) == 0.0
    d_pred, d_ref = surface_distances(empty, ref, SP)
    assert d_pred.size == 0 and d_ref.size == 56 and np.isinf(d_ref).all()


def _brute_border(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def _brute_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    pa = np.argwhere(_brute_border(a)) * np.asarray(spacing)
    pb = np.argwhere(_brute_border(b)) * np.asarray(spacing)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)


def test_random_masks_match_a_brute_force_computation_and_cropping_changes_nothing():
    rng = np.random.default_rng(3)
    for _ in range(3):
        pred = rng.random((5, 6, 7)) < 0.35
        ref = rng.random((5, 6, 7)) < 0.35
        d_pred, d_ref = surface_distances(pred, ref, SP)
        np.testing.assert_allclose(d_pred, _brute_distances(pred, ref, SP))
        np.testing.assert_allclose(d_ref, _brute_distances(ref, pred, SP))
        # the same masks inside a larger volume (cropped back to their box plus one voxel)
        big_p, big_r = np.zeros((9, 12, 10), bool), np.zeros((9, 12, 10), bool)
        big_p[2:7, 3:9, 1:8], big_r[2:7, 3:9, 1:8] = pred, ref
        e_pred, e_ref = surface_distances(big_p, big_r, SP)
        np.testing.assert_allclose(e_pred, d_pred)
        np.testing.assert_allclose(e_ref, d_ref)


def sphere(radius_mm: float, shape=(14, 26, 20), spacing=(2.0, 1.0, 1.5), centre_mm=(14.0, 13.0, 15.0)) -> np.ndarray:
    grids = np.meshgrid(*(np.arange(n) * s - c for n, s, c in zip(shape, spacing, centre_mm)), indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2


def test_concentric_spheres():
    sp = (2.0, 1.0, 1.5)
    outer, inner = sphere(10.0), sphere(7.0)
    h = hd95(inner, outer, sp)
    assert abs(h - 3.0) <= 2.0  # the radii differ by 3 mm; the borders are voxelised to within a voxel
    assert hd95(outer, inner, sp) == pytest.approx(h)
    tolerances = [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0]
    nsd = [normalized_surface_dice(inner, outer, sp, t) for t in tolerances]
    assert nsd == sorted(nsd)  # monotone in the tolerance
    assert nsd[0] == 0.0 and nsd[-1] == 1.0  # no shared border voxel; every distance ≤ 3 + 2 mm


def test_one_slice_volumes_use_the_in_plane_contour():
    square = np.zeros((1, 5, 5), dtype=bool)
    square[0, 1:4, 1:4] = True
    d_pred, d_ref = surface_distances(square, square, (5.0, 1.0, 1.0))
    assert d_pred.size == 8 and d_ref.size == 8  # the 3×3 square's rim, not its centre
    assert not d_pred.any()


def test_per_class_with_the_ignore_label_and_tolerances():
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    ref[0] = 9  # unlabelled slice
    pred = np.zeros(SHAPE, dtype=np.int16)
    pred[3:7, 2:6, 2:6] = 1  # the shifted box of the hand computation above
    pred[0, 2:6, 2:6] = 1  # predicted on unlabelled voxels: not counted with ignore_label=9
    got = surface_metrics_per_class(pred, ref, SP, [1, 2], {1: 1.0, 2: 4.0}, ignore_label=9)
    assert got[1]["HD95"] == pytest.approx(2.0)
    assert got[1]["NSD"] == pytest.approx(80 / 112)
    assert math.isnan(got[2]["HD95"]) and math.isnan(got[2]["NSD"])
    counted = surface_metrics_per_class(pred, ref, SP, [1], 1.0)  # without the ignore label
    assert counted[1]["NSD"] < got[1]["NSD"]
    # a mapping overrides the default per class
    assert surface_metrics_per_class(pred, ref, SP, [1], {}, ignore_label=9)[1]["NSD"] == pytest.approx(80 / 112)
    assert DEFAULT_TOLERANCE_MM == 1.0
    assert surface_metrics_per_class(pred, ref, SP, [1], {1: 0.5}, ignore_label=9)[1]["NSD"] == pytest.approx(72 / 112)


def test_bad_inputs():
    ref = box()
    with pytest.raises(UsageError, match="not evaluated"):
        surface_metrics_per_class(ref.astype(np.uint8), ref.astype(np.uint8), SP, [1], {3: 1.0})
    with pytest.raises(UsageError, match="mm"):
        normalized_surface_dice(ref, ref, SP, -1.0)
    with pytest.raises(UsageError, match="one value"):
        hd95(ref, ref, (1.0, 1.0))
    with pytest.raises(UsageError, match="positive"):
        hd95(ref, ref, (1.0, 0.0, 1.0))
    with pytest.raises(DataError, match="differ in size"):
        hd95(ref[:-1], ref, SP)
    with pytest.raises(DataError, match="integer labels"):
        surface_metrics_per_class(ref.astype(np.float32), ref.astype(np.uint8), SP, [1])


# ============================================================================ folders
GEO = Geometry(shape=(4, 6, 8), spacing=(2.0, 1.0, 0.5), origin=(1.0, -2.0, 3.0))  # 1 mm³ voxels
DIAGONAL = math.sqrt((4 * 2.0) ** 2 + (6 * 1.0) ** 2 + (8 * 0.5) ** 2)


def labels_a() -> tuple[np.ndarray, np.ndarray]:
    """case_a: class 1, a 2×3×4 box, predicted without its first column (x = 1): TP 18, FN 6, Dice 36/42;
    both boxes are two slices thick, so all their voxels are border voxels, and the 6 missed voxels lie
    0.5 mm (one voxel along x) from the prediction: pooled distances 36 × 0 and 6 × 0.5, HD95 0.5.
    Class 2, a 1×2×2 box, predicted exactly."""
    ref = np.zeros(GEO.shape, dtype=np.uint8)
    ref[1:3, 1:4, 1:5] = 1
    ref[0:1, 4:6, 6:8] = 2
    pred = np.zeros(GEO.shape, dtype=np.uint8)
    pred[1:3, 1:4, 2:5] = 1
    pred[0:1, 4:6, 6:8] = 2
    return ref, pred


def labels_b() -> tuple[np.ndarray, np.ndarray]:
    """case_b: class 1 predicted exactly; class 2 in neither (NaN)."""
    ref = np.zeros(GEO.shape, dtype=np.uint8)
    ref[1:3, 1:4, 1:5] = 1
    return ref, ref.copy()


def make_folders(root: Path) -> tuple[Path, Path]:
    pred_dir, ref_dir = root / "pred", root / "ref"
    for case, (ref, pred) in (("case_a", labels_a()), ("case_b", labels_b())):
        write_image(ref_dir / f"{case}.nii.gz", ref, GEO)
        write_image(pred_dir / f"{case}.nii.gz", pred, GEO)
    return pred_dir, ref_dir


def test_folder_summary_csv_and_boxplot_by_hand(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    summary = evaluate_folders(pred_dir, ref_dir)
    on_disk = json.loads((pred_dir / "summary.json").read_text())
    assert on_disk == summary
    per_case = {entry["case"]: entry["metrics"] for entry in summary["metric_per_case"]}
    a, b = per_case["case_a"], per_case["case_b"]
    assert a["1"]["Dice"] == pytest.approx(36 / 42)
    assert (a["1"]["TP"], a["1"]["FP"], a["1"]["FN"]) == (18, 0, 6)
    assert a["1"]["HD95"] == pytest.approx(0.5) and a["1"]["NSD"] == 1.0
    assert a["1"]["volume_ref_ml"] == pytest.approx(0.024) and a["1"]["volume_pred_ml"] == pytest.approx(0.018)
    assert a["2"] == {
        "Dice": 1.0,
        "HD95": 0.0,
        "NSD": 1.0,
        "TP": 4,
        "FP": 0,
        "FN": 0,
        "n_ref": 4,
        "n_pred": 4,
        "volume_ref_ml": pytest.approx(0.004),
        "volume_pred_ml": pytest.approx(0.004),
    }
    # background: 192 voxels, 164 in the reference's background, all predicted so, plus the 6 misses
    assert (a["0"]["TP"], a["0"]["FP"], a["0"]["FN"]) == (164, 6, 0)
    assert a["0"]["Dice"] == pytest.approx(328 / 334)
    assert a["0"]["HD95"] is None  # surface metrics are for the foreground classes
    assert b["2"]["Dice"] is None and b["2"]["HD95"] is None and b["2"]["NSD"] is None  # both empty: null
    assert b["1"]["Dice"] == 1.0 and b["1"]["HD95"] == 0.0
    mean = summary["mean"]
    assert set(mean) == {"0", "1", "2"}
    assert mean["1"]["Dice"] == pytest.approx((36 / 42 + 1) / 2)
    assert mean["1"]["HD95"] == pytest.approx(0.25)
    assert mean["2"]["Dice"] == 1.0  # case_b's NaN is skipped
    assert summary["foreground_mean"]["Dice"] == pytest.approx(((36 / 42 + 1) / 2 + 1) / 2)
    assert summary["foreground_mean"]["HD95"] == pytest.approx((0.25 + 0.0) / 2)
    assert summary["tolerance_mm"] == {"1": 1.0, "2": 1.0} and summary["n_cases"] == 2

    rows = list(csv.DictReader((pred_dir / "evaluation.csv").read_text().splitlines()))
    assert len(rows) == 6  # 2 cases × classes 0, 1, 2
    row = next(r for r in rows if r["case"] == "case_b" and r["class"] == "2")
    assert row["Dice"] == "nan" and row["TP"] == "0"
    png = pred_dir / "dice_boxplot.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert not any(p.name.startswith(".") for p in pred_dir.iterdir())  # no temporary left behind


def test_folder_tolerances_labels_and_out_dir(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    out = tmp_path / "eval"
    summary = evaluate_folders(pred_dir, ref_dir, tolerance_mm={1: 0.25}, out_dir=out)
    a = summary["metric_per_case"][0]["metrics"]
    assert a["1"]["NSD"] == pytest.approx(36 / 42)  # the 6 voxels at 0.5 mm are outside 0.25 mm
    assert a["2"]["NSD"] == 1.0
    assert summary["tolerance_mm"] == {"1": 0.25, "2": 1.0}
    assert (out / "summary.json").is_file() and not (pred_dir / "summary.json").exists()
    # labels choose and name the classes (dataset.json's {name: value} is accepted too)
    summary = evaluate_folders(pred_dir, ref_dir, labels={"background": 0, "liver": 1}, out_dir=out)
    assert set(summary["mean"]) == {"0", "1"} and summary["labels"] == {"0": "background", "1": "liver"}
    rows = list(csv.DictReader((out / "evaluation.csv").read_text().splitlines()))
    assert len(rows) == 4 and {r["name"] for r in rows} == {"background", "liver"}
    with pytest.raises(UsageError, match="does not list"):
        evaluate_folders(pred_dir, ref_dir, labels={1: "liver"}, tolerance_mm={2: 1.0}, out_dir=out)


def test_per_class_tolerances_on_the_command_line(tmp_path, capsys):
    from segpipe import cli

    pred_dir, ref_dir = make_folders(tmp_path)
    out = tmp_path / "eval_cli"
    code = cli.main(["evaluate", str(pred_dir), str(ref_dir), "-o", str(out), "tolerance_mm={1:0.25}", "--json"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tolerance_mm"] == {"1": 0.25, "2": 1.0}
    assert summary["metric_per_case"][0]["metrics"]["1"]["NSD"] == pytest.approx(36 / 42)
    assert cli.main(["evaluate", str(pred_dir), str(ref_dir), "-o", str(out), "tolerance_mm=wide"]) != 0
    assert "tolerance_mm" in capsys.readouterr().err


def test_folder_one_empty_side_and_whole_valued_float_labels(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    ref, pred = labels_a()
    pred[pred == 2] = 0  # class 2 missed
    write_image(ref_dir / "c.nii.gz", ref, GEO)
    write_image(pred_dir / "c.nii.gz", pred.astype(np.float32), GEO)
    c2 = evaluate_folders(pred_dir, ref_dir)["metric_per_case"][0]["metrics"]["2"]
    assert c2["Dice"] == 0.0 and c2["NSD"] == 0.0
    assert c2["HD95"] == pytest.approx(DIAGONAL)


def test_folder_ignore_label(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    ref, pred = labels_a()
    ref[3, 0:2, 0:2] = 3  # unlabelled
    pred[3, 0:2, 0:2] = 1  # predicted there: not counted
    write_image(ref_dir / "c.nii.gz", ref, GEO)
    write_image(pred_dir / "c.nii.gz", pred, GEO)
    summary = evaluate_folders(pred_dir, ref_dir, ignore_label=3)
    assert set(summary["mean"]) == {"0", "1", "2"}
    c1 = summary["metric_per_case"][0]["metrics"]["1"]
    assert (c1["TP"], c1["FP"], c1["FN"]) == (18, 0, 6)
    assert c1["HD95"] == pytest.approx(0.5)


def test_folder_refusals(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    # a prediction off its reference's grid
    ref_b, pred_b = labels_b()
    bad = pred_dir / "case_b.nii.gz"
    write_image(bad, pred_b, GEO.replace(spacing=(2.0, 1.0, 0.6)))
    with pytest.raises(DataError) as err:
        evaluate_folders(pred_dir, ref_dir)
    message = str(err.value)
    assert "case_b" in message and str(bad) in message and str(ref_dir / "case_b.nii.gz") in message
    assert "spacing" in message and "fix:" in message
    # fractional labels
    write_image(bad, pred_b.astype(np.float32) * 0.5, GEO)
    with pytest.raises(DataError, match="non-integer values"):
        evaluate_folders(pred_dir, ref_dir)
    # a missing prediction
    bad.unlink()
    with pytest.raises(DataError, match=r"no prediction for 1 of 2 reference case\(s\): case_b"):
        evaluate_folders(pred_dir, ref_dir, strict=True)
    # a prediction without a reference
    write_image(bad, pred_b, GEO)
    write_image(pred_dir / "case_c.nii.gz", pred_b, GEO)
    with pytest.raises(DataError, match="have no reference.*case_c"):
        evaluate_folders(pred_dir, ref_dir)
    with pytest.raises(DataError, match="does not exist"):
        evaluate_folders(tmp_path / "nowhere", ref_dir)


def test_qc_overlays(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for case in ("case_a", "case_b"):
        write_image(images / f"{case}_0000.nii.gz", rng.normal(100, 10, GEO.shape).astype(np.float32), GEO)
    evaluate_folders(pred_dir, ref_dir, qc_image_dir=images)
    for case in ("case_a", "case_b"):
        assert (pred_dir / "qc" / f"{case}.png").read_bytes()[:8] == PNG_SIGNATURE
    (images / "case_b_0000.nii.gz").unlink()
    with pytest.raises(DataError, match="no image for 1 case.*case_b"):
        evaluate_folders(pred_dir, ref_dir, qc_image_dir=images)


def test_qc_slices_centre_on_the_foreground():
    mask = np.zeros((10, 3, 3), dtype=bool)
    mask[2:7, 1, 1] = True  # slices 2..6, centre 4
    assert qc_slices(mask) == [3, 4, 5]
    assert qc_slices(np.zeros((8, 2, 2), dtype=bool)) == [2, 4, 6]
