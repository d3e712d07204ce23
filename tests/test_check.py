"""`segpipe check`: finds exactly the planted faults, passes clean data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_case_folder, make_msd, tiny_case

from segpipe import check, read_image, write_image


def test_clean_tiny_dataset_passes(tmp_path):
    report = check(make_msd(tmp_path / "ds"))
    assert report.ok and report.cases_checked == 4
    # 3 labelled cases: one warning about the dataset as a whole (5 folds need 5), none about a case
    assert [(f.case, f.problem, f.severity) for f in report.findings] == [("(dataset)", "too_few_cases", "warning")]


@pytest.mark.realdata
def test_hippocampus_passes(hippocampus):
    report = check(hippocampus)
    assert report.ok, [f.line() for f in report.findings]
    assert report.cases_checked == 338


@pytest.mark.realdata
@pytest.mark.slow
def test_planted_faults_name_exactly_three_cases(hippocampus, tmp_path):
    root = tmp_path / "hippo"
    shutil.copytree(hippocampus, root)
    # 1. a label shifted in origin
    lab, geo = read_image(root / "labelsTr" / "hippocampus_006.nii.gz")
    write_image(
        root / "labelsTr" / "hippocampus_006.nii.gz", lab, geo.replace(origin=(geo.origin[0] + 2.0, *geo.origin[1:]))
    )
    # 2. one NaN voxel in an image
    img, geo = read_image(root / "imagesTr" / "hippocampus_007.nii.gz")
    img = img.astype(np.float32)
    img[0, 5, 5, 5] = np.nan
    write_image(root / "imagesTr" / "hippocampus_007.nii.gz", img, geo)
    # 3. one stray label value
    lab, geo = read_image(root / "labelsTr" / "hippocampus_008.nii.gz")
    lab[0, 0, 0, 0] = 5
    write_image(root / "labelsTr" / "hippocampus_008.nii.gz", lab, geo)

    report = check(root)
    assert not report.ok
    assert report.cases_with_errors == ["hippocampus_006", "hippocampus_007", "hippocampus_008"]
    by_case = {f.case: f for f in report.errors}
    assert by_case["hippocampus_006"].problem == "geometry_mismatch" and "origin" in by_case["hippocampus_006"].message
    assert by_case["hippocampus_006"].file == "labelsTr/hippocampus_006.nii.gz"
    assert by_case["hippocampus_007"].problem == "nan_inf" and "1 NaN" in by_case["hippocampus_007"].message
    assert by_case["hippocampus_008"].problem == "label_values" and "[5]" in by_case["hippocampus_008"].message
    json.dumps(report.to_dict())


def test_each_kind_of_fault_is_reported(tmp_path):
    root = make_msd(tmp_path / "ds", n=6)
    image, label, geo = tiny_case(0)
    write_image(root / "imagesTr" / "case_000.nii.gz", np.zeros_like(image), geo)  # empty image
    write_image(root / "imagesTr" / "case_001.nii.gz", np.stack([image, image]), geo)  # extra channel
    write_image(root / "labelsTr" / "case_002.nii.gz", label[:, :5], geo.replace(shape=(6, 5, 12)))  # shape mismatch
    data = (root / "imagesTr" / "case_003.nii.gz").read_bytes()
    (root / "imagesTr" / "case_003.nii.gz").write_bytes(data[:200])  # truncated
    write_image(root / "imagesTr" / "case_004.nii.gz", image[:1], geo.replace(shape=(1, 10, 12)))  # 2-D
    write_image(root / "labelsTr" / "case_005.nii.gz", np.zeros_like(label), geo)  # empty label: warning only
    report = check(root)
    problems = {(f.case, f.problem, f.severity) for f in report.findings}
    assert problems == {
        ("case_000", "empty_image", "error"),
        ("case_001", "missing_channels", "error"),
        ("case_002", "geometry_mismatch", "error"),
        ("case_003", "unreadable", "error"),
        ("case_004", "wrong_dimension", "error"),
        ("case_004", "geometry_mismatch", "error"),
        ("case_005", "empty_label", "warning"),
    }
    assert report.cases_with_errors == ["case_000", "case_001", "case_002", "case_003", "case_004"]


def test_refused_dicom_series_is_reported_with_its_gap(tmp_path):
    from segpipe.demo_data import generate_dicom_demo_dataset

    root = generate_dicom_demo_dataset(tmp_path / "dcm", num_cases=2, num_test=0)
    files = sorted((root / "dicom_001" / "image").iterdir())
    files[len(files) // 2].unlink()  # a missing slice
    report = check(root)
    assert report.cases_with_errors == ["dicom_001"]
    (f,) = report.errors
    assert f.problem == "dicom_refused" and f.file == "dicom_001/image" and "missing slice" in f.message
    assert "allow_uneven_spacing" in f.fix


def test_a_dataset_of_unlabelled_cases_only_is_checked_with_a_warning(tmp_path):
    root = make_case_folder(tmp_path / "cf", n=0, unlabelled=2)
    report = check(root)
    assert report.ok and report.cases_checked == 2
    assert [(f.problem, f.severity) for f in report.findings] == [("too_few_cases", "warning")]
    assert report.findings[0].message.startswith("0 labelled case(s)")
