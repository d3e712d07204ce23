"""Reliability: what no single case shows, found across the dataset by `segpipe check` and `plan`.

Each test is one case; its docstring's first line says the behaviour. The datasets are small
copies of the embedded demo dataset, changed the way a user's export goes wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segpipe import cli
from segpipe.demo_data import generate_demo_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("wide") / "Wide", num_cases=5, num_test=0)


def _copy(demo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "Wide"
    shutil.copytree(demo, root)
    return root


def _rewrite_labels(root: Path, fn) -> None:
    for path in sorted((root / "labelsTr").glob("*.nii.gz")):
        nii = nib.load(str(path))
        data = fn(np.asarray(nii.dataobj))
        nib.save(nib.Nifti1Image(data.astype(np.uint8), nii.affine), str(path))


def _check(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict]]:
    code = cli.main(["check", str(root), "--json"])
    return code, json.loads(capsys.readouterr().out)["findings"]


def test_labels_without_any_foreground_stop_check_and_plan(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Label maps that are all background in every case: `check` reports it dataset-wide as an error (exit 1) and `plan` refuses (exit 3), writing no plan."""
    root = _copy(demo, tmp_path)
    _rewrite_labels(root, np.zeros_like)
    code, findings = _check(root, capsys)
    wide = [f for f in findings if f["case"] == "(dataset)" and f["problem"] == "no_foreground"]
    assert code == 1 and len(wide) == 1 and wide[0]["severity"] == "error", findings
    work = tmp_path / "work"
    assert cli.main(["plan", str(root), f"work_dir={work}"]) == 3
    err = capsys.readouterr().err
    assert "nothing to learn" in err and "Traceback" not in err
    assert not (work / "Wide" / "plans.json").exists()


def test_a_declared_class_in_no_case_is_named_by_check_and_plan(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A class that `dataset.json` declares but no label map holds: `check` and `plan` warn naming it (exit 0)."""
    root = _copy(demo, tmp_path)
    desc = json.loads((root / "dataset.json").read_text())
    top = max(int(k) for k in desc["labels"])
    _rewrite_labels(root, lambda a: np.where(a == top, 0, a))
    code, findings = _check(root, capsys)
    absent = [f for f in findings if f["problem"] == "absent_class"]
    assert code == 0 and len(absent) == 1 and absent[0]["severity"] == "warning", findings
    assert f"{top} ({desc['labels'][str(top)]})" in absent[0]["message"]
    assert cli.main(["plan", str(root), f"work_dir={tmp_path / 'work'}"]) == 0
    assert f"declared class {top} ({desc['labels'][str(top)]}) is in no label map" in caplog.text


def test_intensity_ranges_and_voxel_types_mixed_across_cases_are_a_warning(
    demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cases stored as uint8 0-139 beside float32 images up to ~1.5 million (as in a real MR collection): `check` warns dataset-wide with both ranges and the voxel types, and still exits 0."""
    root = _copy(demo, tmp_path)
    images = sorted((root / "imagesTr").glob("*.nii.gz"))
    for i, path in enumerate(images):
        nii = nib.load(str(path))
        a = np.asarray(nii.dataobj, dtype=np.float64)
        a = (a - a.min()) / (np.ptp(a) or 1.0)
        if i < 2:
            data = np.round(a * 139).astype(np.uint8)
        else:
            data = (a * 1.5e6).astype(np.float32)
        nib.save(nib.Nifti1Image(data, nii.affine), str(path))
    code, findings = _check(root, capsys)
    wide = {f["problem"]: f for f in findings if f["case"] == "(dataset)"}
    assert code == 0, findings
    assert "mixed_intensity_ranges" in wide and "fold" in wide["mixed_intensity_ranges"]["message"], findings
    types = wide["mixed_voxel_types"]["message"]
    assert "2 8-bit unsigned integer" in types and "3 32-bit float" in types, types
    # the demo as generated: one voxel type, comparable ranges, no such warning
    code, findings = _check(demo, capsys)
    assert not {"mixed_intensity_ranges", "mixed_voxel_types", "absent_class", "no_foreground"} & {
        f["problem"] for f in findings
    }, findings
