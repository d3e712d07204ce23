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


# ---------------------------------------------------------------------------- bad folders
@pytest.fixture
def nnunet_copy(tmp_path):
    """A writable copy of the plain 3-D fixture's model folder, named as nnU-Net names it, and its input."""
    src = FIXTURES / "plain3d_zscore"
    if not src.is_dir():
        pytest.skip("tests/data/nnunet/plain3d_zscore is missing")
    model = tmp_path / "Dataset901_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    shutil.copytree(src / "model", model)
    shutil.copytree(src / "input", tmp_path / "input")
    return model


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_recognised_by_its_files(nnunet_copy, tmp_path):
    assert is_nnunet_folder(nnunet_copy)
    assert not is_nnunet_folder(tmp_path / "input")
    model = load_nnunet_folder(nnunet_copy, folds=["0"])
    assert [m.fold for m in model.members] == ["0"]
    assert model.plan.settings["nnunet"]["mirror_axes"] == [0, 1, 2]
    assert model.members[0].weights is not None


def test_missing_plans_json(nnunet_copy):
    (nnunet_copy / "plans.json").unlink()
    with pytest.raises(StateError, match=r"plans\.json: missing") as exc:
        load_nnunet_folder(nnunet_copy)
    assert "copy plans.json" in exc.value.hint


def test_unknown_architecture_class(nnunet_copy):
    def change(plans):
        plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "my_package.nets.MyUNet"

    _edit(nnunet_copy / "plans.json", change)
    with pytest.raises(
        ConfigError, match=r"network class 'my_package.nets.MyUNet' is not one segpipe can build"
    ) as exc:
        load_nnunet_folder(nnunet_copy)
    assert "PlainConvUNet" in exc.value.hint


def test_unknown_operator_is_refused(nnunet_copy):
    def change(plans):
        plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "os.system"

    _edit(nnunet_copy / "plans.json", change)
    with pytest.raises(ConfigError, match=r"nonlin 'os.system' is not an operator segpipe builds"):
        load_nnunet_folder(nnunet_copy)


def test_unknown_normalisation(nnunet_copy):
    def change(plans):
        plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["MyNormalization"]

    _edit(nnunet_copy / "plans.json", change)
    with pytest.raises(
        ConfigError, match=r"normalisation 'MyNormalization' of channel 0 is not one segpipe reproduces"
    ):
        load_nnunet_folder(nnunet_copy)


def test_checkpoint_that_needs_unpickling_is_refused(nnunet_copy):
    import argparse

    path = nnunet_copy / "fold_0" / "checkpoint_final.pth"
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["init_args"] = argparse.Namespace(evil=True)  # any class: loading it would import and call code
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"checkpoint needs Python code to load \(argparse.Namespace\)"):
        load_nnunet_folder(nnunet_copy)


def test_missing_fold(nnunet_copy):
    with pytest.raises(StateError, match=r"no checkpoint at .*fold_7.checkpoint_final\.pth"):
        load_nnunet_folder(nnunet_copy, folds=["7"])
    shutil.rmtree(nnunet_copy / "fold_0")
    shutil.rmtree(nnunet_copy / "fold_1", ignore_errors=True)
    (nnunet_copy / "fold_0").mkdir()
    with pytest.raises(StateError, match=r"no fold_<k>/checkpoint_final\.pth"):
        load_nnunet_folder(nnunet_copy)


def test_cascade_stage_without_its_first_stage_is_refused(nnunet_copy):
    def change(plans):
        plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}

    _edit(nnunet_copy / "plans.json", change)
    cascade = nnunet_copy.parent / "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres"
    nnunet_copy.rename(cascade)
    with pytest.raises(
        StateError, match=r"3d_cascade_fullres runs after 3d_lowres, but .*__3d_lowres is missing"
    ) as exc:
        load_nnunet_folder(cascade)
    assert "put the 3d_lowres model folder" in exc.value.hint


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segpipe", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_bad_folder_one_line_nothing_written(nnunet_copy, tmp_path):
    (nnunet_copy / "plans.json").unlink()
    out = tmp_path / "out"
    res = _cli("infer", str(tmp_path / "input"), "-m", str(nnunet_copy), "-o", str(out))
    assert res.returncode == 4, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert "plans.json: missing" in errors[0] and len(errors) <= 2, res.stderr
    assert not out.exists()


@pytest.mark.slow
def test_cli_channels_that_do_not_match(nnunet_copy, tmp_path):
    """The model reads one channel; a case given with two is refused with the channels named."""
    image = next((tmp_path / "input").glob("*_0000.nii.gz"))
    shutil.copy(image, image.with_name(image.name.replace("_0000", "_0001")))
    out = tmp_path / "out"
    res = _cli("infer", str(tmp_path / "input"), "-m", str(nnunet_copy), "-o", str(out))
    assert res.returncode in (2, 3), res.stderr
    assert "channel" in res.stderr
    assert not any(out.glob("*.nii.gz")) if out.exists() else True


@pytest.mark.slow
def test_cli_infer_and_export(nnunet_copy, tmp_path):
    """`segpipe infer -m <nnU-Net folder>` writes nnU-Net's labels with a report that names the model;
    `segpipe export` turns the folder into a segpipe model folder that predicts the same."""
    out = tmp_path / "out"
    res = _cli("infer", str(tmp_path / "input"), "-m", str(nnunet_copy), "-o", str(out), "runtime=torch", "-q")
    assert res.returncode == 0, res.stderr
    label = _read(next(out.glob("*.nii.gz")))
    expected = _read(FIXTURES / "plain3d_zscore" / "expected_tta.nii.gz")
    assert float((label == expected).mean()) >= 0.999
    report = json.loads(next(out.glob("*.json")).read_text())
    text = json.dumps(report)
    assert "nnUNetTrainer" in text and "mirror_axes" in text
    exported = tmp_path / "exported"
    res = _cli("export", str(nnunet_copy), "-o", str(exported))
    assert res.returncode == 0, res.stderr
    assert (exported / "model.json").is_file() and (exported / "README.md").is_file()
    out2 = tmp_path / "out2"
    res = _cli("infer", str(tmp_path / "input"), "-m", str(exported), "-o", str(out2), "runtime=torch", "-q")
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(_read(next(out2.glob("*.nii.gz"))), label)


def test_label_resampling_equals_nnunets_own():
    """resize_labels and the label path of resample_like_nnunet against nnU-Net's resize_segmentation."""
    from segpipe.preprocessing.nnunet_resampling import resize_labels

    stored = np.load(DATA / "nnunet_resampling.npz")
    for i in range(2):
        ref = stored[f"labels_out_{i}"]
        np.testing.assert_array_equal(resize_labels(stored[f"labels_in_{i}"], ref.shape, 1), ref)
    seg = stored["labels_in_0"][None]
    settings = {"order": 1, "order_z": 0, "force_separate_z": None}
    out = resample_like_nnunet(seg, (9, 10, 9), (3.0, 0.7, 0.7), (2.0, 0.6, 0.6), settings, seg=True)[0]
    np.testing.assert_array_equal(out, stored["labels_sepz"].astype(out.dtype))


@pytest.mark.parametrize("tta", [True, False])
def test_nnunet_cascade_same_labels_as_nnunet(tta):
    """An nnU-Net 3d_cascade_fullres folder runs its 3d_lowres sibling first, as nnUNetv2_predict
    -prev_stage_predictions does (tools/make_nnunet_cascade_fixture.py wrote the folders and the answers)."""
    from segpipe import Predictor

    root = FIXTURES / "cascade"
    if not root.is_dir():
        pytest.skip("tests/data/nnunet/cascade is missing")
    models = next(root.glob("Dataset*"))
    inputs = [str(p) for p in sorted((root / "input").glob("*.nii.gz"))]
    suffix = "_tta" if tta else ""
    lowres = Predictor.from_model(models / "nnUNetTrainer__nnUNetPlans__3d_lowres", tta=tta, runtime="torch")
    expected = _read(root / f"expected_lowres{suffix}.nii.gz")
    assert float((lowres.predict(inputs).label == expected).mean()) >= 0.999
    cascade = Predictor.from_model(models / "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres", tta=tta, runtime="torch")
    assert sorted({m.configuration for m in cascade.model.members}) == ["3d_cascade_fullres", "3d_lowres"]
    expected = _read(root / ("expected_tta.nii.gz" if tta else "expected_notta.nii.gz"))
    label = cascade.predict(inputs).label
    assert float((label == expected).mean()) >= 0.999
    assert set(np.unique(label).tolist()) == set(np.unique(expected).tolist())
