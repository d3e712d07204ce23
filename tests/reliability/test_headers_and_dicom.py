"""Reliability: headers that leave something unsaid, through `segpipe info`, `check` and `infer`.

A NIfTI without orientation, a DICOM slice in a vendor's private transfer syntax, an ultrasound
image without pixel spacing and a folder holding several series: each is read the way every
other tool reads it or refused with one line naming the file and the fix, and whatever segpipe
has to assume is said as a warning, never silently.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from segpipe import cli
from segpipe.demo_data import generate_dicom_demo_dataset
from segpipe.geometry import Geometry
from segpipe.inference.batch_report import is_report_file
from segpipe.io.dicom import write_dicom_series

PHILIPS_SYNTAX = "1.3.46.670589.33.1.4.1"


def _unoriented_copy(source: Path, target: Path) -> Path:
    """``source`` saved again with its voxels and voxel size only: qform and sform codes 0."""
    nii = nib.load(str(source))
    out = nib.Nifti1Image(np.asarray(nii.dataobj), None)
    out.header.set_zooms(nii.header.get_zooms()[:3])
    out.header.set_qform(None, code=0)
    out.header.set_sform(None, code=0)
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(target))
    saved = nib.load(str(target)).header
    assert int(saved["qform_code"]) == 0 and int(saved["sform_code"]) == 0
    return target


def _sitk_grid(path: Path) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return (
        tuple(image.GetSize()),
        np.asarray(image.GetSpacing()),
        np.asarray(image.GetOrigin()),
        np.asarray(image.GetDirection()),
    )


def test_a_nifti_without_orientation_is_segmented_onto_the_grid_each_reader_sees_and_info_and_check_warn(
    tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A NIfTI without orientation (qform and sform codes 0) is segmented onto the grid each reader sees for the input (nibabel and SimpleITK alike), and `info`/`check` warn that it has no orientation."""
    model, good = tiny_model
    scan = _unoriented_copy(good, tmp_path / "in" / "scan.nii.gz")
    out = tmp_path / "out"
    code = cli.main(["infer", str(scan), "-o", str(out), "-m", str(model), "tta=false", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["written"] == ["scan"], result
    label = out / "scan.nii.gz"

    # nibabel reads the label on the grid it reads the input on
    image_nii, label_nii = nib.load(str(scan)), nib.load(str(label))
    assert label_nii.shape == image_nii.shape[:3]
    np.testing.assert_allclose(label_nii.affine, image_nii.affine, atol=1e-4)
    assert (int(label_nii.header["qform_code"]), int(label_nii.header["sform_code"])) == (0, 0)  # as the input
    # and so does SimpleITK (ITK places a NIfTI without orientation differently from nibabel)
    size, spacing, origin, direction = _sitk_grid(scan)
    l_size, l_spacing, l_origin, l_direction = _sitk_grid(label)
    assert l_size == size
    np.testing.assert_allclose(l_spacing, spacing, rtol=1e-5)
    np.testing.assert_allclose(l_origin, origin, atol=1e-4)
    np.testing.assert_allclose(l_direction, direction, atol=1e-6)

    # `info` says so, as a warning (exit 0), in text and in JSON
    assert cli.main(["info", str(scan)]) == 0
    text = capsys.readouterr().out
    warning = next((line for line in text.splitlines() if line.startswith("warning:")), "")
    assert "no orientation" in warning and "qform and sform codes 0" in warning, text
    assert cli.main(["info", str(scan), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert any("no orientation" in w for w in info["warnings"]), info

    # `check` lists it as a warning of the case and file, not an error
    root = tmp_path / "Unoriented"
    training = []
    for i in range(5):
        _unoriented_copy(scan, root / "imagesTr" / f"case_{i}.nii.gz")
        _unoriented_copy(good.parent.parent / "labelsTs" / good.name, root / "labelsTr" / f"case_{i}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    desc = {
        "name": "Unoriented",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "organ", "2": "vessel", "3": "lesion"},
        "numTraining": 5,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    code = cli.main(["check", str(root), "--json", "num_workers=1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"], report
    flagged = [f for f in report["findings"] if f["problem"] == "no_orientation"]
    assert {(f["case"], f["file"]) for f in flagged} >= {("case_0", "imagesTr/case_0.nii.gz")}, report
    assert all(f["severity"] == "warning" and f["fix"] for f in flagged), flagged


def test_a_result_keeps_the_header_convention_of_an_unoriented_input_only_on_its_grid(tmp_path: Path) -> None:
    """An image on the grid of a NIfTI without orientation is written without orientation too (qform and sform codes 0); a cropped grid of it is written with its orientation."""
    from segpipe.io.image import read_image, write_image

    nii = nib.Nifti1Image(np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4), None)  # (x, y, z)
    nii.header.set_zooms((0.7, 0.9, 3.0))
    nib.save(nii, str(tmp_path / "scan.nii.gz"))
    array, geometry = read_image(tmp_path / "scan.nii.gz")

    write_image(tmp_path / "same.nii.gz", array, geometry)
    header = nib.load(str(tmp_path / "same.nii.gz")).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (0, 0)
    again, same = read_image(tmp_path / "same.nii.gz")
    np.testing.assert_array_equal(again, array)
    assert same.same_grid(geometry)
    for mine, theirs in zip(_sitk_grid(tmp_path / "same.nii.gz")[1:], _sitk_grid(tmp_path / "scan.nii.gz")[1:]):
        np.testing.assert_allclose(mine, theirs, atol=1e-6)  # spacing, origin, direction as ITK reads them

    cropped = geometry.replace(shape=(4, 5, 5))
    write_image(tmp_path / "cropped.nii.gz", array[:, :, :, :5], cropped)
    header = nib.load(str(tmp_path / "cropped.nii.gz")).header
    assert int(header["sform_code"]) > 0 and int(header["qform_code"]) > 0
    assert read_image(tmp_path / "cropped.nii.gz")[1].same_grid(cropped)


# ---------------------------------------------------------------------------- DICOM
@pytest.fixture(scope="module")
def dicom_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dicom_demo_dataset(tmp_path_factory.mktemp("dicom") / "Scans", num_cases=2, num_test=0)


def _to_private_syntax(path: Path) -> None:
    """Relabel one slice as stored in a private Philips transfer syntax."""
    ds = pydicom.dcmread(str(path))
    ds.file_meta.TransferSyntaxUID = PHILIPS_SYNTAX
    ds.save_as(str(path), implicit_vr=False, little_endian=True)


def test_a_slice_in_a_private_transfer_syntax_is_refused_naming_the_file_and_the_syntax(
    tiny_model: tuple[Path, Path], dicom_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A DICOM slice in a private (Philips) transfer syntax: `info`, `check` and a batch `infer` refuse it (exit 3 / an error of its case) naming the file, the syntax and how to convert it, and the other cases are written."""
    model, good = tiny_model
    root = tmp_path / "Scans"
    shutil.copytree(dicom_dataset, root)
    victim = sorted((root / "dicom_001" / "image").glob("*.dcm"))[2]
    _to_private_syntax(victim)

    for target in (victim, victim.parent):
        code = cli.main(["info", str(target)])
        captured = capsys.readouterr()
        assert code == 3, captured
        line = next(ln for ln in captured.out.splitlines() if ln.startswith("no volume read:"))
        assert str(victim) in line and PHILIPS_SYNTAX in line and "Philips" in line, captured.out
        assert "internal error" not in captured.out + captured.err
        assert "transfer syntax" in captured.out and "uncompressed" in captured.out, captured.out

    code = cli.main(["check", str(root), "--json", "num_workers=1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["cases_with_errors"] == ["dicom_001"], report
    finding = next(f for f in report["findings"] if f["case"] == "dicom_001")
    assert finding["problem"] == "dicom_refused" and PHILIPS_SYNTAX in finding["message"], finding
    assert victim.name in finding["message"] and "uncompressed" in finding["fix"], finding

    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copytree(victim.parent, batch / "philips")
    shutil.copy(good, batch / "good.nii.gz")
    out = tmp_path / "out"
    code = cli.main(["infer", str(batch), "-o", str(out), "-m", str(model), "tta=false", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 3 and result["written"] == ["good"], result
    failure = next(f for f in result["failed"] if f["case"] == "philips")
    assert str(batch / "philips" / victim.name) in failure["error"] and PHILIPS_SYNTAX in failure["error"], failure
    assert "\n" not in failure["error"] and failure["hint"], failure
    assert sorted(p.name for p in out.iterdir() if not is_report_file(p)) == [
        "good.json",
        "good.nii.gz",
        "good_labels.json",
    ]


def _ultrasound(source_slice: Path, target: Path) -> Path:
    """A single-frame ultrasound image made from an MR slice: no PixelSpacing, no position or orientation."""
    ds = pydicom.dcmread(str(source_slice))
    ds.Modality = "US"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    for tag in ("PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "SliceThickness"):
        if tag in ds:
            delattr(ds, tag)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(target))
    return target


def test_an_ultrasound_image_without_pixel_spacing_is_read_with_a_warning_that_1_mm_is_assumed(
    dicom_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A DICOM ultrasound image without PixelSpacing is read with 1 mm pixels; `info`, the reader and `check` (a warning of its case) say that its spacing is unknown and 1 mm is assumed."""
    from segpipe.io.image import read_image

    us = _ultrasound(sorted((dicom_dataset / "dicom_000" / "image").glob("*.dcm"))[3], tmp_path / "us" / "echo.dcm")
    with caplog.at_level(logging.WARNING, logger="segpipe"):
        _, geometry = read_image(us)
    assert geometry.spacing[1:] == (1.0, 1.0)
    assert any(str(us) in r.getMessage() and "1 mm" in r.getMessage() for r in caplog.records), caplog.text

    code = cli.main(["info", str(us)])
    text = capsys.readouterr().out
    assert code == 0, text
    warnings = [line for line in text.splitlines() if line.startswith("warning:")]
    assert any("PixelSpacing" in w and "1 mm" in w and "unknown" in w for w in warnings), text
    assert cli.main(["info", str(us.parent), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["spacing"][1:] == [1.0, 1.0] and any("1 mm" in w for w in info["warnings"]), info
    # `check` lists the assumption as a warning of the case that holds the image
    data = tmp_path / "echo_data"
    (data / "patient1").mkdir(parents=True)
    shutil.copytree(us.parent, data / "patient1" / "image")
    (data / "dataset.json").write_text(
        json.dumps(
            {
                "layout": "case-folder",
                "channel_names": {"0": "US"},
                "labels": {"background": 0, "heart": 1},
                "image": "image",
                "label": "label.nii.gz",
            }
        )
    )
    cli.main(["check", str(data), "--json"])
    findings = json.loads(capsys.readouterr().out)["findings"]
    assumed = [f for f in findings if f["problem"] == "reader_assumption"]
    assert len(assumed) == 1 and assumed[0]["severity"] == "warning" and "1 mm" in assumed[0]["message"], findings
    assert assumed[0]["case"] == "patient1"


def _two_series_in_one_folder(folder: Path, tmp_path: Path) -> dict[str, str]:
    """Two MR series ('T1 axial', 'T2 axial') whose slices share one folder: {description: SeriesInstanceUID}."""
    rng = np.random.default_rng(0)
    geo = Geometry(shape=(6, 24, 20), spacing=(3.0, 0.9, 0.9))
    uids = {}
    for number, description in enumerate(("T1 axial", "T2 axial"), start=1):
        written = write_dicom_series(
            tmp_path / description.replace(" ", "_"),
            (rng.random(geo.shape) * 1000).astype(np.int16),
            geo,
            modality="MR",
            series_description=description,
            series_number=number,
        )
        files = sorted(written.glob("*.dcm"))
        uids[description] = str(pydicom.dcmread(str(files[0])).SeriesInstanceUID)
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, folder / f"s{number}_{f.name}")
    return uids


def test_a_folder_with_several_series_is_refused_in_one_short_line_that_says_how_to_choose(
    tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A DICOM folder holding several series is refused in one short line naming how many and how to choose one (`series=`); `info` lists them as a table, once."""
    model, _ = tiny_model
    study = tmp_path / "study"
    uids = _two_series_in_one_folder(study, tmp_path)

    code = cli.main(["info", str(study)])
    captured = capsys.readouterr()
    assert code == 3, captured
    lines = captured.out.splitlines()
    refusal = next(ln for ln in lines if ln.startswith("no volume read:"))
    assert "2 image series" in refusal and "series=" in captured.out and len(refusal) < 200, refusal
    for description, uid in uids.items():
        assert uid not in refusal
        listed = [ln for ln in lines if description in ln and "MR" in ln]
        assert len(listed) == 1, captured.out  # one table row per series

    code = cli.main(["infer", str(study), "-o", str(tmp_path / "out"), "-m", str(model), "tta=false"])
    captured = capsys.readouterr()
    assert code == 3, captured
    failed = next(ln for ln in captured.out.splitlines() if ln.strip().startswith("failed:"))
    message = failed.split(" (fix:", 1)[0]
    assert "2 image series" in message and len(message) < 250, failed
    assert "series=" in failed and f"segpipe info {study}" in failed, failed
    assert not any(uid in message for uid in uids.values()), failed
