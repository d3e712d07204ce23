"""Reliability: DICOM series that readers get wrong, through `check`, `plan`, `preprocess`, `train`
and a batch `segpipe infer`.

Synthetic series (written with segpipe's own DICOM writer, then broken: mixed sizes, a duplicated,
truncated or missing slice, non-image objects only, a second series, a DICOMDIR alone) and every
series of the real-scanner corpus's ``failing/`` folder: each bad case is one clear error naming
the case and the file — `check` and `plan` refuse the dataset, a batch `infer` reports and skips
the case and writes the others — never a silently wrong volume.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from segpipe import cli
from segpipe.demo_data import generate_dicom_demo_dataset
from segpipe.inference.batch_report import is_report_file

REPO = Path(__file__).resolve().parents[2]
DICOM = Path(os.environ.get("SEGPIPE_TEST_DATA") or REPO.parent / "shared" / "data") / "dicom"
FAILING = DICOM / "dicom2nifti" / "failing"
DICOMDIRTESTS = DICOM / "pydicom_dicomdirtests"

#: case folder in the batch -> (source folder, words of the reason the batch reports)
BAD_SERIES = {
    "gantry_tilt": (FAILING / "gantrytilting" / "001", "gantry tilt"),
    "not_a_volume": (FAILING / "notavolume" / "001", "not"),
    "too_few_slices": (FAILING / "slicecount" / "001", "only 2 slices"),
    "missing_slice": (FAILING / "sliceincrement" / "001", "missing slice"),
    "tilted_and_missing_slice": (FAILING / "sliceincrement" / "002", "gantry tilt"),
    "mixed_orientations": (FAILING / "sliceorientation" / "001", "mixed slice orientations"),
    "several_series_no_selector": (DICOMDIRTESTS / "77654033", "series"),
}


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.skipif(not FAILING.is_dir() or not DICOMDIRTESTS.is_dir(), reason=f"no DICOM corpus at {DICOM}")
def test_a_batch_reports_and_skips_every_bad_series_and_writes_the_good_case(
    tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each bad DICOM case of a batch `infer` is reported with its reason and skipped; the good one is written (exit 3)."""
    model, good = tiny_model
    batch = tmp_path / "batch"
    batch.mkdir()
    for name, (source, _) in BAD_SERIES.items():
        (batch / name).symlink_to(source, target_is_directory=True)
    dicomdir_only = batch / "dicomdir_only"
    dicomdir_only.mkdir()
    shutil.copy(DICOMDIRTESTS / "DICOMDIR", dicomdir_only / "DICOMDIR")
    shutil.copy(good, batch / "good.nii.gz")
    out = tmp_path / "out"
    code = cli.main(["infer", str(batch), "-o", str(out), "-m", str(model), "tta=false", "--json"])
    captured = capsys.readouterr()
    assert code == 3, captured.err[-3000:]
    result = json.loads(captured.out)
    assert result["written"] == ["good"]
    failed = {f["case"]: f["error"] for f in result["failed"]}
    assert set(failed) == {*BAD_SERIES, "dicomdir_only"}, failed
    for name, (_, words) in BAD_SERIES.items():
        assert words in failed[name].lower() or words in failed[name], (name, failed[name])
        assert "\n" not in failed[name]
    assert sorted(p.name for p in out.iterdir() if not is_report_file(p)) == [
        "good.json",
        "good.nii.gz",
        "good_labels.json",
    ]
    assert (out / "report.html").is_file()  # the batch's report, failed series included


DCMQI = DICOM / "dcmqi_seg"


@pytest.mark.realdata
@pytest.mark.skipif(not DCMQI.is_dir(), reason=f"no DICOM-SEG corpus at {DCMQI}")
def test_a_dicom_seg_whose_references_do_not_match_is_refused() -> None:
    """A DICOM-SEG read against another series, or onto a grid its voxels miss, is one error naming the SEG, never a wrong mask."""
    from segpipe.errors import DicomError
    from segpipe.geometry import Geometry
    from segpipe.io.dicom_seg import read_dicom_seg

    seg = DCMQI / "liver.dcm"
    with pytest.raises(DicomError) as other_series:
        read_dicom_seg(seg, DCMQI / "24x38x3" / "image")
    assert str(other_series.value.message).startswith(str(seg)) and "references series" in other_series.value.message
    far_away = Geometry(shape=(3, 16, 16), spacing=(1.0, 1.0, 1.0), origin=(5000.0, 5000.0, 5000.0))
    with pytest.raises(DicomError) as off_grid:
        read_dicom_seg(seg, far_away)
    assert "\n" not in off_grid.value.message and off_grid.value.hint


# ---------------------------------------------------------------------------- synthetic bad series
def _slices(series: Path) -> list[Path]:
    return sorted(series.glob("*.dcm"))


def mixed_sizes(series: Path, other: Path) -> None:
    ds = pydicom.dcmread(str(_slices(series)[2]))
    ds.Rows = ds.Rows // 2
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(str(_slices(series)[2]))


def duplicated_slice(series: Path, other: Path) -> None:
    shutil.copy(_slices(series)[2], series / "copy_of_slice.dcm")


def truncated_slice(series: Path, other: Path) -> None:
    victim = _slices(series)[2]
    victim.write_bytes(victim.read_bytes()[:-40])


def missing_slice(series: Path, other: Path) -> None:
    _slices(series)[3].unlink()


def only_non_image_objects(series: Path, other: Path) -> None:
    """A structured report left alone in the folder (no pixel data, no image geometry)."""
    template = pydicom.dcmread(str(_slices(series)[0]))
    for f in _slices(series):
        f.unlink()
    for tag in ("PixelData", "Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if tag in template:
            delattr(template, tag)
    template.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    template.Modality = "SR"
    template.save_as(str(series / "report.dcm"))


def several_series(series: Path, other: Path) -> None:
    for f in _slices(other):
        shutil.copy(f, series / f"other_{f.name}")


def dicomdir_alone(series: Path, other: Path) -> None:
    for f in _slices(series):
        f.unlink()
    dicomdir = DICOMDIRTESTS / "DICOMDIR"
    if not dicomdir.is_file():
        pytest.skip(f"no DICOMDIR at {dicomdir}")
    shutil.copy(dicomdir, series / "DICOMDIR")


#: name -> (how a good series folder is broken (with another good series at hand), words of the error)
SYNTHETIC: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "mixed_image_sizes": (mixed_sizes, "mixed sizes"),
    "duplicated_slice": (duplicated_slice, "duplicate slice positions"),
    "truncated_slice": (truncated_slice, "cannot decode pixel data"),
    "missing_slice": (missing_slice, "missing slice"),
    "only_non_image_objects": (only_non_image_objects, "no image series"),
    "several_series_no_selector": (several_series, "2 image series"),
    "dicomdir_alone": (dicomdir_alone, "dicomdir"),
}


@pytest.fixture(scope="module")
def dicom_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dicom_demo_dataset(tmp_path_factory.mktemp("dicom") / "Scans", num_cases=3, num_test=0)


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_a_bad_series_in_a_dicom_dataset_stops_check_and_plan_naming_the_case(
    name: str, dicom_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mixed sizes, a duplicated, truncated or missing slice, non-image objects only, two series, a DICOMDIR alone: refused by `check` and `plan`, naming the case."""
    breaks, words = SYNTHETIC[name]
    root = tmp_path / "Scans"
    shutil.copytree(dicom_dataset, root)
    breaks(root / "dicom_001" / "image", root / "dicom_002" / "image")
    work = tmp_path / "work"
    code = cli.main(["check", str(root), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["cases_with_errors"] == ["dicom_001"], report
    message = next(f["message"] for f in report["findings"] if f["case"] == "dicom_001")
    assert words in message.lower() or words in message, message
    code = cli.main(["plan", str(root), f"work_dir={work}", "configurations=[3d_fullres]"])
    err = capsys.readouterr().err
    assert code == 3 and "case dicom_001" in err and str(root / "dicom_001") in err and "Traceback" not in err, err
    assert not (work / "Scans" / "plans.json").exists() and not (work / "Scans" / "fingerprint.json").exists()


def test_a_slice_linking_outside_a_dicom_dataset_is_refused_unless_declared(
    dicom_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A slice of a series folder that is a link leading outside the dataset is refused by `check`, unless `"external_links": true`."""
    root = tmp_path / "Scans"
    shutil.copytree(dicom_dataset, root)
    victim = _slices(root / "dicom_001" / "image")[4]
    outside = tmp_path / "pacs" / victim.name
    outside.parent.mkdir()
    shutil.move(str(victim), outside)
    victim.symlink_to(outside)
    code = cli.main(["check", str(root)])
    err = capsys.readouterr().err
    assert code == 3 and str(victim) in err and "outside the dataset folder" in err and "external_links" in err, err
    desc = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**desc, "external_links": True}))
    assert cli.main(["check", str(root), "--json"]) == 0, capsys.readouterr().err


def test_a_batch_infer_reports_and_skips_every_synthetic_bad_series_and_writes_the_good_one(
    tiny_model: tuple[Path, Path], dicom_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same broken series as case folders of one batch `infer`: each reported with its reason and skipped; the good series written."""
    model, _ = tiny_model
    batch = tmp_path / "batch"
    for name, (breaks, _) in SYNTHETIC.items():
        shutil.copytree(dicom_dataset / "dicom_001" / "image", batch / name)
        breaks(batch / name, dicom_dataset / "dicom_002" / "image")
    shutil.copytree(dicom_dataset / "dicom_000" / "image", batch / "good_series")
    out = tmp_path / "out"
    code = cli.main(["infer", str(batch), "-o", str(out), "-m", str(model), "tta=false", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 3 and result["written"] == ["good_series"], result
    failed = {f["case"]: f["error"] for f in result["failed"]}
    assert set(failed) == set(SYNTHETIC), failed
    for name, (_, words) in SYNTHETIC.items():
        assert words in failed[name].lower() or words in failed[name], (name, failed[name])
    # a DICOM input gets a DICOM-SEG beside its label map
    assert sorted(p.name for p in out.iterdir() if not is_report_file(p)) == [
        "good_series.json",
        "good_series.nii.gz",
        "good_series_labels.json",
        "good_series_seg.dcm",
    ]


def test_stray_non_dicom_files_among_the_slices_are_skipped_and_the_volume_is_unchanged(
    dicom_dataset: Path, tmp_path: Path
) -> None:
    """A text file and an unreadable extension-less file among a series' slices are skipped: the same volume, no error."""
    from segpipe.io.image import read_image

    series = tmp_path / "series"
    shutil.copytree(dicom_dataset / "dicom_001" / "image", series)
    expected, geometry = read_image(series)
    (series / "notes.txt").write_text("scanned on the second scanner\n")
    (series / "IM_EXTRA").write_bytes(b"\0" * 300)
    array, again = read_image(series)
    np.testing.assert_array_equal(array, expected)
    assert again.same_grid(geometry)


@pytest.mark.slow
def test_a_series_damaged_after_planning_stops_preprocess_naming_the_case_and_train_warns(
    dicom_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A DICOM dataset plans, preprocesses and trains; a slice truncated afterwards stops `preprocess` naming the case and file, and `train` says the sources changed."""
    root = tmp_path / "Scans"
    shutil.copytree(dicom_dataset, root)
    work = tmp_path / "work"
    plan = ["plan", str(root), f"work_dir={work}", "configurations=[3d_fullres]", "base_features=4"]
    assert cli.main([*plan, "max_features_3d=16", "-q"]) == 0
    assert cli.main(["preprocess", f"work_dir={work}", "-q"]) == 0
    train = ["train", f"work_dir={work}", "fold=all", "epochs=1", "iterations_per_epoch=1", "val_batches=1", "-q"]
    assert cli.main(train) == 0
    capsys.readouterr()
    truncated_slice(root / "dicom_001" / "image", root / "dicom_002" / "image")
    victim = _slices(root / "dicom_001" / "image")[2]
    code = cli.main(["preprocess", f"work_dir={work}", "force=true", "-q"])
    err = capsys.readouterr().err
    assert code == 3 and "case dicom_001" in err and str(victim) in err and "Traceback" not in err, err
    # `train` goes on from the cache made before the damage, and says that the sources changed
    code = cli.main([*train[:-1], "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and "changed since" in result["dataset_changed_since_plan"], result
    assert "changed since" in caplog.text
