"""Datasets and `check`: ambiguous case ids, wrong file_ending, readable mismatch messages, bad headers per case."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_case_folder, make_msd, make_nnunet, tiny_case

from segpipe import DatasetError, check, load_dataset
from segpipe.checks import check_dataset
from segpipe.io.datasets import Case, Dataset
from segpipe.io.image import write_image


def _rename_msd_case(root: Path, old: str, new: str) -> None:
    """Rename case ``old`` of an MSD dataset to ``new`` (files and dataset.json)."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub / f"{old}.nii.gz").rename(root / sub / f"{new}.nii.gz")
    desc_path = root / "dataset.json"
    text = desc_path.read_text().replace(f"/{old}.nii.gz", f"/{new}.nii.gz")
    desc_path.write_text(text)


# ---------------------------------------------------------------------------- ambiguous case ids
def test_case_and_case_seg_are_refused_naming_both(tmp_path):
    root = make_msd(tmp_path / "ds")
    _rename_msd_case(root, "case_001", "case_000_seg")
    with pytest.raises(DatasetError) as info:
        load_dataset(root)
    err = info.value
    assert "'case_000'" in err.message and "'case_000_seg'" in err.message and "_seg" in err.message
    assert "rename" in (err.hint or "").lower()
    assert "\n" not in err.message


def test_case_ids_differing_only_in_letter_case_are_refused(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    for f in (root / "imagesTr").glob("pt01_*"):
        f.rename(f.with_name(f.name.replace("pt01", "PT00")))
    (root / "labelsTr" / "pt01.nii.gz").rename(root / "labelsTr" / "PT00.nii.gz")
    with pytest.raises(DatasetError, match=r"'PT00'.*'pt00'|'pt00'.*'PT00'") as info:
        load_dataset(root)
    assert "letter case" in info.value.message and "rename" in (info.value.hint or "").lower()


@pytest.mark.parametrize("bad", ["sub/patient0", ".hidden"])
def test_case_ids_with_separators_or_leading_dots_are_refused(tmp_path, bad):
    root = make_case_folder(tmp_path / "ds")
    target = root / bad
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(root / "patient1", target)
    desc = json.loads((root / "dataset.json").read_text())
    desc["cases"] = ["patient0", bad]
    (root / "dataset.json").write_text(json.dumps(desc))
    with pytest.raises(DatasetError, match=f"case id '{bad}'") as info:
        load_dataset(root)
    assert "rename" in (info.value.hint or "").lower()


def test_check_refuses_a_prebuilt_dataset_with_ambiguous_ids(tmp_path):
    ds = load_dataset(make_msd(tmp_path / "ds"))
    first = ds.cases[0]
    clash = Case(f"{first.id}_seg", first.images, first.label)
    ambiguous = Dataset(ds.name, ds.root, ds.layout, ds.channel_names, ds.labels, [*ds.cases, clash])
    with pytest.raises(DatasetError, match="_seg"):
        check_dataset(ambiguous, num_workers=1)


def test_ids_that_merely_look_alike_are_fine(tmp_path):
    root = make_msd(tmp_path / "ds")
    _rename_msd_case(root, "case_001", "case_000_segment")
    assert len(load_dataset(root).cases) == 3


# ---------------------------------------------------------------------------- file_ending
def test_wrong_file_ending_names_file_ending_and_the_endings_found(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    desc = json.loads((root / "dataset.json").read_text())
    desc["file_ending"] = ".nii"
    (root / "dataset.json").write_text(json.dumps(desc))
    with pytest.raises(DatasetError) as info:
        load_dataset(root)
    err = info.value
    assert "file_ending" in err.message and "'.nii'" in err.message and ".nii.gz" in err.message
    assert '"file_ending"' in (err.hint or "") and '".nii.gz"' in (err.hint or "")


# ---------------------------------------------------------------------------- mismatch message order
def test_label_mismatch_message_names_each_file_with_its_own_shape(tmp_path):
    root = make_msd(tmp_path / "ds")
    _, label, geo = tiny_case(2)
    write_image(root / "labelsTr" / "case_002.nii.gz", label[:, :5], geo.replace(shape=(6, 5, 12)))
    report = check(root)
    (f,) = report.errors
    assert f.problem == "geometry_mismatch" and f.file == "labelsTr/case_002.nii.gz"
    # the sentence names the label first, so the label's shape comes first, each next to its name
    assert "label" in f.message and "imagesTr/case_002.nii.gz" in f.message
    assert "shape: label (6, 5, 12) vs image (6, 10, 12)" in f.message, f.message


def test_channel_mismatch_message_names_both_channels(tmp_path):
    root = make_nnunet(tmp_path / "ds")
    image, _, geo = tiny_case(1)
    write_image(root / "imagesTr" / "pt01_0001.nii.gz", image, geo.replace(spacing=(5.0, 0.8, 0.8)))
    report = check(root)
    (f,) = report.errors
    assert f.file == "imagesTr/pt01_0001.nii.gz" and "imagesTr/pt01_0000.nii.gz" in f.message
    assert "spacing: pt01_0001.nii.gz (5, 0.8, 0.8) vs pt01_0000.nii.gz (2.5, 0.8, 0.8)" in f.message, f.message


# ---------------------------------------------------------------------------- bad headers, one case
def _zero_spacing_copy(src: Path) -> None:
    """Rewrite ``src`` with a zero first column in its sform (zero voxel spacing along x)."""
    img = nib.load(str(src))
    data = np.asanyarray(img.dataobj)
    hdr = img.header.copy()
    affine = hdr.get_best_affine()
    affine[:3, 0] = 0.0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
    hdr["sform_code"] = 2
    hdr["qform_code"] = 0
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0\0\0\0" + data.astype(hdr.get_data_dtype()).tobytes(order="F")
    with gzip.open(src, "wb") as f:
        f.write(raw)


def test_check_reports_a_zero_spacing_case_and_goes_on(tmp_path):
    root = make_msd(tmp_path / "ds", n=4)
    _zero_spacing_copy(root / "imagesTr" / "case_001.nii.gz")
    _zero_spacing_copy(root / "labelsTr" / "case_003.nii.gz")
    report = check(root)
    assert report.cases_checked == 5
    assert report.cases_with_errors == ["case_001", "case_003"]
    by_case = {f.case: f for f in report.errors}
    assert by_case["case_001"].file == "imagesTr/case_001.nii.gz" and by_case["case_001"].problem == "unreadable"
    assert "spacing" in by_case["case_001"].message or "affine" in by_case["case_001"].message
    assert by_case["case_003"].file == "labelsTr/case_003.nii.gz"


def test_check_reports_a_header_bomb_as_a_finding(tmp_path):
    root = make_msd(tmp_path / "ds")
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape((1600, 1600, 1600))
    hdr["vox_offset"] = 352
    with gzip.open(root / "imagesTr" / "case_002.nii.gz", "wb") as f:
        f.write(hdr.binaryblock + b"\0\0\0\0")
    report = check(root)
    assert report.cases_with_errors == ["case_002"]
    (f,) = report.errors
    assert "1600" in f.message and f.problem == "unreadable"


def test_sform_qform_disagreement_is_a_warning_in_check(tmp_path):
    root = make_msd(tmp_path / "ds")
    path = root / "imagesTr" / "case_000.nii.gz"
    img = nib.load(str(path))
    sform = img.header.get_sform()
    sform[0, 3] += 20.0
    img.header.set_sform(sform, code=2)
    data = np.asanyarray(img.dataobj)
    out = nib.Nifti1Image(data, None, header=img.header)
    nib.save(out, str(path))
    # move the label the same way, so only the header disagreement remains
    lab_path = root / "labelsTr" / "case_000.nii.gz"
    lab = nib.load(str(lab_path))
    lab.header.set_sform(sform, code=2)
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj), None, header=lab.header), str(lab_path))
    report = check(root)
    assert report.ok, [f.line() for f in report.findings]
    warnings = [f for f in report.findings if f.problem == "header_disagreement"]
    assert {f.file for f in warnings} == {"imagesTr/case_000.nii.gz", "labelsTr/case_000.nii.gz"}
    assert all(f.severity == "warning" for f in warnings)
