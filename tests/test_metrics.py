"""Dice with nnU-Net's rules: hand-computed counts, NaN when both are empty, the ignore label, the
summary's means, and agreement with MONAI's DiceMetric and scikit-learn's F1 on random label maps."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from segpipe.errors import DataError
from segpipe.evaluation import (
    CaseMetrics,
    class_mean_dice,
    confusion_counts,
    dice_from_counts,
    dice_per_class,
    evaluate_case,
    mean_foreground_dice,
    summarize,
    write_case_metrics,
    write_summary,
)

REF = np.array([[0, 1, 1, 2], [0, 1, 2, 2], [0, 0, 0, 0]], dtype=np.uint8)
PRED = np.array([[0, 1, 0, 2], [1, 1, 2, 0], [0, 0, 0, 3]], dtype=np.uint8)
# class 1: ref at (0,1) (0,2) (1,1); pred at (0,1) (1,0) (1,1) → TP 2, FP 1, FN 1 → Dice 4/6
# class 2: ref at (0,3) (1,2) (1,3); pred at (0,3) (1,2)       → TP 2, FP 0, FN 1 → Dice 4/5
# class 3: ref none; pred at (2,3)                              → TP 0, FP 1, FN 0 → Dice 0
# class 4: in neither                                           → NaN


def test_counts_and_dice_by_hand():
    counts = confusion_counts(PRED, REF, [1, 2, 3, 4])
    assert counts.dtype == np.int64
    assert counts.tolist() == [[2, 1, 1], [2, 0, 1], [0, 1, 0], [0, 0, 0]]
    dice = dice_per_class(PRED, REF, [1, 2, 3, 4])
    assert list(dice) == [1, 2, 3, 4]
    assert dice[1] == pytest.approx(4 / 6) and dice[2] == pytest.approx(4 / 5) and dice[3] == 0.0
    assert math.isnan(dice[4])
    # background counts too when asked: ref 0 at 6 voxels, pred 0 at 6; both 0 at (0,0) (2,0) (2,1) (2,2)
    assert confusion_counts(PRED, REF, [0]).tolist() == [[4, 2, 2]]


def test_torch_inputs_and_label_order_do_not_matter():
    counts = confusion_counts(torch.from_numpy(PRED), torch.from_numpy(REF).long(), [2, 1])
    assert counts.tolist() == [[2, 0, 1], [2, 1, 1]]


def test_ignore_label_drops_its_reference_voxels():
    ref = REF.copy()
    ref[0, 2] = 9  # was a class-1 miss (FN)
    ref[1, 0] = 9  # was a class-1 false positive
    ref[2, 3] = 9  # was the class-3 false positive
    counts = confusion_counts(PRED, ref, [1, 2, 3], ignore_index=9)
    assert counts.tolist() == [[2, 0, 0], [2, 0, 1], [0, 0, 0]]
    dice = dice_per_class(PRED, ref, [1, 2, 3], ignore_index=9)
    assert dice[1] == 1.0 and dice[2] == pytest.approx(0.8) and math.isnan(dice[3])
    # negative ignore values work as well (they never reach the bincount)
    neg = ref.astype(np.int16)
    neg[ref == 9] = -1
    assert confusion_counts(PRED, neg, [1, 2, 3], ignore_index=-1).tolist() == counts.tolist()


def test_bad_inputs():
    with pytest.raises(DataError, match="differ in size"):
        confusion_counts(PRED[:2], REF, [1])
    with pytest.raises(DataError, match="integer labels"):
        confusion_counts(PRED.astype(np.float32), REF, [1])
    with pytest.raises(DataError, match="ignore_index"):
        confusion_counts(PRED, REF.astype(np.int8) - 1, [1])
    with pytest.raises(DataError, match="distinct"):
        confusion_counts(PRED, REF, [1, 1])


def test_dice_from_counts():
    d = dice_from_counts(np.array([[3, 1, 1], [0, 0, 0], [0, 2, 0]]))
    assert d[0] == pytest.approx(6 / 8) and math.isnan(d[1]) and d[2] == 0.0


def test_means_skip_nan_per_class_then_average_classes():
    cases = [{1: 0.5, 2: math.nan}, {1: 1.0, 2: 0.6}, {1: math.nan, 2: 0.8}]
    assert class_mean_dice(cases) == {1: pytest.approx(0.75), 2: pytest.approx(0.7)}
    # per class over cases first (0.75, 0.7), then over classes: 0.725 (a per-case mean first would give 0.7)
    assert mean_foreground_dice(cases) == pytest.approx(0.725)
    # background is left out; a class NaN in every case is skipped
    assert mean_foreground_dice([{0: 0.1, 1: 0.4, 3: math.nan}]) == pytest.approx(0.4)
    assert math.isnan(mean_foreground_dice([{0: 1.0, 1: math.nan}]))
    assert math.isnan(mean_foreground_dice([]))


def test_summary_and_csv(tmp_path):
    a = evaluate_case(PRED, REF, [1, 2, 4], case="case_a")
    b = CaseMetrics("case_b", (1, 2, 4), np.array([[1, 0, 0], [0, 0, 0], [0, 0, 0]]))
    assert a.dice[1] == pytest.approx(4 / 6)
    summary = summarize([a, b])
    assert summary["mean"]["1"]["Dice"] == pytest.approx((4 / 6 + 1) / 2)
    assert summary["mean"]["2"]["Dice"] == pytest.approx(0.8)  # case_b's NaN skipped
    assert summary["mean"]["4"]["Dice"] is None
    assert summary["foreground_mean"]["Dice"] == pytest.approx(((4 / 6 + 1) / 2 + 0.8) / 2)
    first = summary["metric_per_case"][0]
    assert first["case"] == "case_a"
    assert first["metrics"]["1"] == {"Dice": pytest.approx(4 / 6), "TP": 2, "FP": 1, "FN": 1, "n_ref": 3, "n_pred": 3}
    assert first["metrics"]["4"]["Dice"] is None

    path = write_summary(tmp_path / "summary.json", [a, b])
    assert json.loads(path.read_text())["foreground_mean"]["Dice"] == pytest.approx(summary["foreground_mean"]["Dice"])

    table = write_case_metrics(tmp_path / "dice.csv", [a, b], labels={1: "anterior", 2: "posterior"})
    rows = list(csv.reader(table.open()))
    assert rows[0] == ["case", "dice_1_anterior", "dice_2_posterior", "dice_4", "foreground_mean"]
    assert rows[1] == ["case_a", "0.666667", "0.800000", "nan", "0.733333"]
    assert rows[2] == ["case_b", "1.000000", "nan", "nan", "1.000000"]
    plain = write_case_metrics(tmp_path / "plain.csv", [{1: 0.5}, {1: math.nan}], case_ids=["x", "y"])
    assert list(csv.reader(plain.open()))[1:] == [["x", "0.500000", "0.500000"], ["y", "nan", "nan"]]
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind


@pytest.mark.slow  # importing MONAI's metrics and scikit-learn takes seconds
def test_agrees_with_monai_and_sklearn_on_random_label_maps():
    from monai.metrics import DiceMetric
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    k = 4
    for trial in range(5):
        ref = rng.integers(0, k, size=(9, 11, 7))
        pred = np.where(rng.random(ref.shape) < 0.7, ref, rng.integers(0, k, size=ref.shape))
        if trial == 4:  # one class absent from both: NaN in ours and MONAI's (ignore_empty)
            ref[ref == 3] = 0
            pred[pred == 3] = 1
        ours = dice_per_class(pred, ref, range(1, k))
        onehot = [torch.nn.functional.one_hot(torch.from_numpy(a), k).movedim(-1, 0)[None] for a in (pred, ref)]
        monai = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(*onehot)[0].numpy()
        np.testing.assert_allclose([ours[c] for c in range(1, k)], monai, rtol=1e-6)
        f1 = f1_score(ref.ravel(), pred.ravel(), labels=[1, 2], average=None)
        np.testing.assert_allclose([ours[1], ours[2]], f1, rtol=1e-9)
