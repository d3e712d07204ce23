"""Region-based training (nnU-Net's regions_class_order): datasets, loss, counts and scores by hand, and the
whole pipeline on a BraTS-like synthetic dataset on the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from segpipe.errors import DatasetError
from segpipe.evaluation import evaluate_regions
from segpipe.io.datasets.layouts import region_labels
from segpipe.losses import build_loss
from segpipe.training.regions import RegionLoss, region_counts, region_masks

REGIONS = [[1, 2, 3], [2, 3], [3]]


def _desc(**over):
    desc = {
        "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]},
        "regions_class_order": [1, 2, 3],
    }
    desc.update(over)
    return desc


def test_region_dataset_json(tmp_path):
    labels, regions = region_labels(_desc(), tmp_path / "dataset.json")
    assert labels == {0: "background", 1: "label 1", 2: "label 2", 3: "label 3"}
    assert regions == {"names": ["whole", "core", "enhancing"], "regions": REGIONS, "class_order": [1, 2, 3]}
    with pytest.raises(DatasetError, match="region 'enhancing' .* writes value 1"):
        region_labels(_desc(regions_class_order=[3, 2, 1]), tmp_path / "dataset.json")
    with pytest.raises(DatasetError, match="one label value per region"):
        region_labels(_desc(regions_class_order=[1, 2]), tmp_path / "dataset.json")
    with pytest.raises(DatasetError, match="includes the background"):
        region_labels(_desc(labels={"background": 0, "a": [0, 1]}, regions_class_order=[1]), tmp_path / "d.json")
    with pytest.raises(DatasetError, match="without gaps"):
        region_labels(_desc(labels={"background": 0, "a": [1, 3]}, regions_class_order=[1]), tmp_path / "d.json")


def test_region_loss_by_hand():
    """Soft Dice on each region's sigmoid (every region scored) + BCE on the logits, weights 1 and 1."""
    logits = torch.tensor([[[[0.0, 2.0]], [[-1.0, 1.0]]]])  # [B=1, R=2, 1, 2]
    labels = torch.tensor([[[[0, 2]]]])  # [B, 1, 1, 2]: voxel 0 background, voxel 1 label 2
    regions = [[1, 2], [2]]
    loss = RegionLoss(build_loss("dice_ce", context={"batch_dice": False}, smooth=0.0), regions)
    p = torch.sigmoid(logits)[0, :, 0]  # [R, 2]
    g = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    dice = [(2 * (p[r] * g[r]).sum()) / (p[r].sum() + g[r].sum()) for r in range(2)]
    bce = -(g * torch.log(torch.sigmoid(logits[0, :, 0])) + (1 - g) * torch.log(1 - torch.sigmoid(logits[0, :, 0])))
    expected = -(dice[0] + dice[1]) / 2 + bce.mean()
    got, per = loss.with_per_sample(logits, labels)
    assert math.isclose(float(got), float(expected), rel_tol=1e-5)
    assert per.shape == (1,) and math.isclose(float(per[0]), float(expected), rel_tol=1e-5)
    with pytest.raises(Exception, match="no region form"):
        RegionLoss(build_loss("focal", context={"batch_dice": False}), regions)


def test_region_masks_and_counts_by_hand():
    labels = torch.tensor([[0, 1, 2, 3, 3]])
    masks = region_masks(labels, REGIONS)
    assert masks[0].int().tolist() == [[0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    logits = torch.tensor([[[1.0, 1.0, 1.0, -1.0, 1.0], [-1.0, -1.0, 1.0, 1.0, 1.0], [1.0, -1.0, -1.0, -1.0, 1.0]]])
    counts = region_counts(logits, labels[:, None], REGIONS)
    # whole: pred 0,1,2,4 vs ref 1,2,3,4 -> tp 3 fp 1 fn 1; core: pred 2,3,4 vs ref 2,3,4 -> 3 0 0;
    # enhancing: pred 0,4 vs ref 3,4 -> 1 1 1
    assert counts.T.tolist() == [[3, 1, 1], [3, 0, 0], [1, 1, 1]]


def test_evaluate_regions_by_hand():
    ref = np.array([0, 1, 2, 3, 3, 0])
    pred = np.array([1, 1, 3, 3, 0, 0])
    m = evaluate_regions(pred, ref, REGIONS, case="c")
    # whole: pred {0,1,2,3} ref {1,2,3,4}: tp 3 fp 1 fn 1; core: pred {2,3} ref {2,3,4}: 2 0 1;
    # enhancing: pred {2,3} ref {3,4}: 1 1 1
    assert m.counts.tolist() == [[3, 1, 1], [2, 0, 1], [1, 1, 1]]
    assert m.dice == pytest.approx({1: 6 / 8, 2: 4 / 5, 3: 2 / 4})


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "segpipe", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_region_pipeline_end_to_end(tmp_path):
    """plan → train → infer → evaluate → find-best on a BraTS-like region dataset, scored by region."""
    from segpipe.demo_data import generate_regions_dataset

    data = generate_regions_dataset(tmp_path / "BratsLike", num_cases=6, num_test=2)
    work = f"work_dir={tmp_path / 'work'}"
    r = _cli("plan", str(data), work, "configurations=[3d_fullres]", "base_features=8", "max_features_3d=32", "-q")
    assert r.returncode == 0, r.stderr
    plans = json.loads((tmp_path / "work" / "BratsLike" / "plans.json").read_text())
    assert plans["settings"]["regions"]["names"] == ["whole tumour", "tumour core", "enhancing tumour"]
    r = _cli("train", "fold=0", work, "epochs=2", "iterations_per_epoch=4", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = tmp_path / "work" / "BratsLike" / "runs" / "3d_fullres" / "fold_0"
    validation = json.loads((run_dir / "validation" / "summary.json").read_text())
    assert set(validation["mean"]) == {"1", "2", "3"}
    assert "whole tumour" in (run_dir / "metrics.csv").read_text().splitlines()[0]
    out = tmp_path / "pred"
    r = _cli("infer", str(data / "imagesTs"), "-o", str(out), work, "tta=false", "-q")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "brats_006.json").read_text())
    assert report["identity"]["regions"]["tumour core"] == {"labels": [2, 3], "value": 2}
    volumes = report["region_volume_ml"]
    assert volumes["whole tumour"] >= volumes["tumour core"] >= volumes["enhancing tumour"]
    r = _cli("evaluate", str(out), str(data / "labelsTs"), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["labels"] == {"1": "whole tumour", "2": "tumour core", "3": "enhancing tumour"}
    r = _cli("find-best", work, "--json")
    assert r.returncode == 0, r.stderr
    best = json.loads(r.stdout)
    assert set(best["class_dice_postprocessed"]) == {"whole tumour", "tumour core", "enhancing tumour"}
    assert best["postprocessing"] == {"largest_component": []}
