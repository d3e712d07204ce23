"""nnU-Net v2 trained model folders run by segpipe: nnU-Net's answer, its resampling, regions, bad folders.

The fixtures under ``tests/data/nnunet/`` were written by nnU-Net v2 itself (``tools/make_nnunet_fixtures.py``,
run in an environment with nnU-Net): tiny model folders, an input case each, and the label maps
nnU-Net's own predictor gave for it with and without mirroring. nnU-Net is not needed here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from segpipe.arrays import labels_to_regions, regions_to_labels
from segpipe.errors import ConfigError, StateError
from segpipe.inference.nnunet_folder import is_nnunet_folder, load_nnunet_folder
from segpipe.preprocessing.nnunet_resampling import new_shape, resample_like_nnunet, separate_axis

DATA = Path(__file__).parent / "data"
FIXTURES = DATA / "nnunet"


def _fixtures() -> list[str]:
    return sorted(p.name for p in FIXTURES.iterdir() if (p / "model").is_dir()) if FIXTURES.is_dir() else []


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ---------------------------------------------------------------------------- labels and regions, by hand
def test_labels_to_regions_by_hand():
    label = np.array([[0, 1, 2], [3, 2, 0]], dtype=np.uint8)
    masks = labels_to_regions(label, [[1, 2, 3], [2, 3], [3]])
    assert masks.tolist() == [
        [[False, True, True], [True, True, False]],
        [[False, False, True], [True, True, False]],
        [[False, False, False], [True, False, False]],
    ]


def test_regions_to_labels_later_regions_overwrite():
    # whole tumour (value 1) ⊃ core (2) ⊃ enhancing (3): probabilities of 4 voxels
    probs = np.array(
        [
            [0.9, 0.9, 0.9, 0.2],  # whole
            [0.1, 0.7, 0.8, 0.6],  # core
            [0.0, 0.4, 0.51, 0.9],  # enhancing
        ],
        dtype=np.float32,
    )
    assert regions_to_labels(probs, [1, 2, 3]).tolist() == [1, 2, 3, 3]
    # exactly 0.5 is not above the threshold (nnU-Net's "> 0.5")
    assert regions_to_labels(np.full((1, 2), 0.5, np.float32), [4]).tolist() == [0, 0]
    # the round trip of a nested label map
    label = np.array([0, 1, 2, 3, 3, 2], dtype=np.uint8)
    assert (
        regions_to_labels(labels_to_regions(label, [[1, 2, 3], [2, 3], [3]]).astype(np.float32), [1, 2, 3]).tolist()
        == label.tolist()
    )
    with pytest.raises(ValueError, match="2 regions but 3"):
        regions_to_labels(probs[:2], [1, 2, 3])


# ---------------------------------------------------------------------------- nnU-Net's resampling
def test_resampling_equals_nnunets_own():
    """Bit-for-bit what nnU-Net's resample_data_or_seg_to_shape gave (tools/make_nnunet_resampling_fixture.py)."""
    stored = np.load(DATA / "nnunet_resampling.npz")
    cases = json.loads(str(stored["cases"]))
    for i, case in enumerate(cases):
        data = stored[f"input_{i}"]
        shape = new_shape(data.shape[1:], case["current"], case["target"])
        settings = {"order": case["order"], "order_z": case["order_z"], "force_separate_z": None}
        out = resample_like_nnunet(data, shape, case["current"], case["target"], settings)
        ref = stored[f"output_{i}"]
        assert out.shape == ref.shape, case
        np.testing.assert_array_equal(out, ref, err_msg=str(case))


def test_separate_axis_rules():
    assert separate_axis([3.0, 0.7, 0.7], [3.0, 0.9, 0.9], None) == 0
    assert separate_axis([1.0, 1.0, 1.0], [1.0, 1.0, 4.0], None) == 2  # the target's anisotropy decides
    assert separate_axis([2.0, 2.0, 0.5], [1.0, 1.0, 1.0], None) is None  # two axes tie for the largest
    assert separate_axis([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], None) is None
    assert separate_axis([3.0, 0.7, 0.7], [3.0, 0.9, 0.9], False) is None
    assert new_shape([10, 20, 30], [3.0, 1.0, 0.5], [1.5, 2.0, 1.0]) == [20, 10, 15]


# ---------------------------------------------------------------------------- nnU-Net's answer
@pytest.mark.parametrize("name", _fixtures())
@pytest.mark.parametrize("tta", [True, False])
def test_same_labels_as_nnunet(name, tta):
    from segpipe import Predictor

    root = FIXTURES / name
    predictor = Predictor.from_model(root / "model", tta=tta, runtime="torch")
    inputs = sorted((root / "input").glob("*.nii.gz"))
    pred = predictor.predict([str(p) for p in inputs])
    expected = _read(root / ("expected_tta.nii.gz" if tta else "expected_notta.nii.gz"))
    assert pred.label.shape == expected.shape
    agree = float((pred.label == expected).mean())
    assert agree >= 0.999, f"{name}: {agree:.5f} of voxels agree with nnU-Net"
    assert set(np.unique(expected).tolist()) == set(np.unique(pred.label).tolist())
