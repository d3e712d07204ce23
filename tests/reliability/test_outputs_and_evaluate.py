"""Reliability: what `segpipe infer` writes for each case when writing its outputs goes wrong,
DICOM-SEG for anonymised series, and `segpipe evaluate` on predictions of part of the references.

Each test is one case; its docstring's first line says the behaviour. A case's outputs are all or
nothing: a failure while writing them is that case's error (with its fix), the batch goes on and
ends with exit 3, and a rerun redoes the case. The network is a small one with random weights (the
``tiny_model`` fixture): what is tested happens around it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from segpipe import cli
from segpipe.errors import DicomError
from segpipe.inference.batch_report import is_report_file
from segpipe.io.dicom import write_dicom_series
from segpipe.io.image import read_image

REPO = Path(__file__).resolve().parents[2]
#: one thread: a subprocess leaves the other core to the test
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
DICOM = Path(os.environ.get("SEGPIPE_TEST_DATA") or REPO.parent / "shared" / "data") / "dicom"
#: a real anonymised MR series (4 slices) without PatientBirthDate, PatientSex, ReferringPhysicianName,
#: AccessionNumber and FrameOfReferenceUID
ANONYMISED = DICOM / "dicom2nifti" / "generic" / "anatomical" / "002_non_isotropic"
#: a real CT whose SpecificCharacterSet is present but empty
EMPTY_CHARSET = DICOM / "dcmqi_seg" / "ct-3slice"
#: the type 2 attributes of the Patient and General Study modules a DICOM-SEG copies from its source
TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
)


def _series_of(image: Path, folder: Path, **changes: Any) -> Path:
    """``image`` written as a CT series into ``folder``, with ``changes`` (attribute: value, or None to
    delete it) made to every slice."""
    array, geometry = read_image(image)
    write_dicom_series(folder, array[0], geometry, modality="CT")
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(str(f))
        for key, value in changes.items():
            if value is None:
                if key in ds:
                    delattr(ds, key)
            else:
                setattr(ds, key, value)
        ds.save_as(str(f))
    return folder


def _infer(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    code = cli.main(["infer", *args, "tta=false", "--json"])
    captured = capsys.readouterr()
    result = json.loads(captured.out) if captured.out.strip() else {}
    return code, result, captured.err


def _dciodvfy_errors(path: Path) -> list[str]:
    """Errors of dicom3tools' IOD validator on ``path`` (none when it is not installed)."""
    beside = Path(sys.executable).parent / "dciodvfy"
    tool = str(beside) if beside.is_file() else shutil.which("dciodvfy")
    if not tool:
        return []
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_a_series_whose_dicom_seg_cannot_be_written_fails_alone_and_the_batch_goes_on(
    tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A CT series with an empty SOPClassUID among three inputs fails alone, naming the series, the attribute and the fix, and leaves no file; the other two are written (exit 3) and a rerun redoes only it."""
    model, good = tiny_model
    batch = tmp_path / "batch"
    bad = _series_of(good, batch / "a_no_sop_class", SOPClassUID="")
    _series_of(good, batch / "b_series")
    shutil.copy(good, batch / "c_scan.nii.gz")
    out = tmp_path / "out"
    code, result, err = _infer(capsys, str(batch), "-o", str(out), "-m", str(model))
    assert code == 3, err[-3000:]
    assert result["written"] == ["b_series", "c_scan"], result
    [failure] = result["failed"]
    assert failure["case"] == "a_no_sop_class" and str(bad) in failure["error"], failure
    assert "SOPClassUID" in failure["error"] and "\n" not in failure["error"] and failure["hint"], failure
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1 and logged[0].startswith("a_no_sop_class: ") and "(fix: " in logged[0], logged
    assert "internal error" not in err and "Traceback" not in err, err
    names = sorted(p.name for p in out.iterdir() if not is_report_file(p))
    assert names == [
        "b_series.json",
        "b_series.nii.gz",
        "b_series_labels.json",
        "b_series_seg.dcm",
        "c_scan.json",
        "c_scan.nii.gz",
        "c_scan_labels.json",
    ], names
    # the same command again: the finished cases are kept, the failed one is tried again (and fails again)
    code, result, err = _infer(capsys, str(batch), "-o", str(out), "-m", str(model))
    assert code == 3 and result["skipped"] == ["b_series", "c_scan"], result
    assert [f["case"] for f in result["failed"]] == ["a_no_sop_class"], result
    # the writer on its own: headers a DICOM-SEG cannot be made from are one line naming the series and the fix
    label = read_image(out / "b_series.nii.gz")[0][0]
    for name, changes, words in (
        ("empty_sop_class", {"SOPClassUID": ""}, "SOPClassUID"),
        ("unknown_sop_class", {"SOPClassUID": "1.2.3.4"}, "SOPClassUID 1.2.3.4"),
        ("no_study_uid", {"StudyInstanceUID": None}, "StudyInstanceUID"),
        ("no_sop_instance_uid", {"SOPInstanceUID": ""}, "SOPInstanceUID"),
        ("bad_patient_sex", {"PatientSex": "male"}, "male"),
    ):
        from segpipe.io.dicom_seg import write_dicom_seg

        series = _series_of(good, tmp_path / "writer" / name, **changes)
        target = tmp_path / "writer" / f"{name}_seg.dcm"
        with pytest.raises(DicomError) as info:
            write_dicom_seg(target, label, series, {0: "background", 1: "a", 2: "b", 3: "c"})
        message = info.value.message
        assert message.startswith(str(series)) and words in message and "\n" not in message, (name, message)
        assert info.value.hint, name
        assert not target.exists(), name


def test_a_failure_while_writing_a_case_leaves_none_of_its_files_and_a_rerun_redoes_it(
    tiny_model: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unexpected error or Ctrl-C while a case's files are written leaves none of them (no label map without its report), the batch goes on after the error, and a rerun redoes the case; so is a finished case missing a file its report names."""
    from segpipe.inference import batch as batch_module

    model, good = tiny_model
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("case_a", "case_b"):
        shutil.copy(good, inputs / f"{name}.nii.gz")
    real_write_json = batch_module.write_json

    def failing(exc: BaseException) -> Any:
        def write_json(path: Path, data: Any, *args: Any, **kwargs: Any) -> Any:
            if Path(path).name == "case_a.json":
                raise exc
            return real_write_json(path, data, *args, **kwargs)

        return write_json

    out = tmp_path / "out"
    monkeypatch.setattr(batch_module, "write_json", failing(KeyError("volume_ml")))
    code, result, err = _infer(capsys, str(inputs), "-o", str(out), "-m", str(model))
    assert code == 3, err[-3000:]
    assert result["written"] == ["case_b"] and [f["case"] for f in result["failed"]] == ["case_a"], result
    assert "KeyError" in result["failed"][0]["error"] and result["failed"][0]["hint"], result
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1 and logged[0].startswith("case_a: KeyError") and "(fix: " in logged[0], logged
    assert "internal error" not in err, err
    assert sorted(p.name for p in out.iterdir() if not is_report_file(p)) == [
        "case_b.json",
        "case_b.nii.gz",
        "case_b_labels.json",
    ]
    assert not list((out / "report_files").glob("case_a.*"))  # nor its overlays
    # Ctrl-C while the files of a case are written: interrupted (exit 130), none of that case's files left
    monkeypatch.setattr(batch_module, "write_json", failing(KeyboardInterrupt()))
    code, _, err = _infer(capsys, str(inputs), "-o", str(out), "-m", str(model))
    assert code == 130, err[-3000:]
    assert sorted(p.name for p in out.iterdir() if not is_report_file(p)) == [
        "case_b.json",
        "case_b.nii.gz",
        "case_b_labels.json",
    ]
    monkeypatch.setattr(batch_module, "write_json", real_write_json)
    code, result, err = _infer(capsys, str(inputs), "-o", str(out), "-m", str(model))
    assert code == 0 and result["written"] == ["case_a"] and result["skipped"] == ["case_b"], result
    # a finished case whose report names a file that is gone is not taken as done
    probs = tmp_path / "probs"
    code, result, _ = _infer(capsys, str(inputs), "-o", str(probs), "-m", str(model), "probabilities=true")
    assert code == 0 and result["written"] == ["case_a", "case_b"], result
    (probs / "case_a_probabilities.npy").unlink()
    code, result, _ = _infer(capsys, str(inputs), "-o", str(probs), "-m", str(model), "probabilities=true")
    assert code == 0 and result["written"] == ["case_a"] and result["skipped"] == ["case_b"], result
    assert (probs / "case_a_probabilities.npy").is_file()


def _check_seg(seg: Path, series: Path, label_map: Path) -> None:
    """``seg`` reads back as the label map, holds every type 2 attribute (empty where the source has
    none) and passes dicom3tools' validator when it is installed."""
    from segpipe.io.dicom_seg import read_dicom_seg

    back, _ = read_dicom_seg(seg, series)
    np.testing.assert_array_equal(back[0], read_image(label_map)[0][0])
    ds = pydicom.dcmread(str(seg))
    assert all(key in ds for key in TYPE_2), [key for key in TYPE_2 if key not in ds]
    assert not _dciodvfy_errors(seg), _dciodvfy_errors(seg)


def test_a_series_without_type_2_patient_and_study_attributes_gets_its_dicom_seg(
    tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A series without PatientName, PatientID, PatientBirthDate, PatientSex, StudyDate, StudyTime, ReferringPhysicianName, AccessionNumber and StudyID gets its DICOM-SEG, with those attributes present and empty."""
    model, good = tiny_model
    series = _series_of(good, tmp_path / "inputs" / "anonymised", **dict.fromkeys(TYPE_2))
    out = tmp_path / "out"
    code, result, err = _infer(capsys, str(series), "-o", str(out), "-m", str(model))
    assert code == 0 and result["written"] == ["anonymised"], err[-3000:]
    assert "DICOM-SEG" not in caplog.text, caplog.text
    report = json.loads((out / "anonymised.json").read_text())
    assert report["dicom_seg"] == "anonymised_seg.dcm" and "dicom_seg_skipped" not in report, report
    _check_seg(out / "anonymised_seg.dcm", series, out / "anonymised.nii.gz")
    ds = pydicom.dcmread(str(out / "anonymised_seg.dcm"))
    assert all(str(ds[key].value or "") == "" for key in TYPE_2), {key: ds[key].value for key in TYPE_2}


@pytest.mark.realdata
@pytest.mark.skipif(not EMPTY_CHARSET.is_dir(), reason=f"no DICOM corpus at {EMPTY_CHARSET}")
def test_a_real_ct_with_an_empty_character_set_gets_its_dicom_seg(
    tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real CT series whose SpecificCharacterSet is present but empty (the default repertoire) is segmented with its DICOM-SEG, which references the series."""
    model, _ = tiny_model
    source = pydicom.dcmread(str(next(EMPTY_CHARSET.glob("*.dcm"))), stop_before_pixels=True)
    assert "SpecificCharacterSet" in source and not str(source.SpecificCharacterSet).strip()  # this case
    out = tmp_path / "out"
    code, result, err = _infer(capsys, str(EMPTY_CHARSET), "-o", str(out), "-m", str(model))
    assert code == 0 and result["written"] == [EMPTY_CHARSET.name], err[-3000:]
    seg = pydicom.dcmread(str(out / f"{EMPTY_CHARSET.name}_seg.dcm"))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID


@pytest.mark.realdata
@pytest.mark.skipif(not ANONYMISED.is_dir(), reason=f"no DICOM corpus at {ANONYMISED}")
def test_a_real_anonymised_series_gets_its_label_map_and_a_dicom_seg_once_it_has_a_frame_of_reference(
    tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A real anonymised MR series without PatientBirthDate, PatientSex, ReferringPhysicianName, AccessionNumber and FrameOfReferenceUID gets its label map (exit 0) and one warning naming FrameOfReferenceUID and the fix; given one, it gets its DICOM-SEG."""
    model, _ = tiny_model
    source = pydicom.dcmread(str(next(ANONYMISED.glob("*.dcm"))), stop_before_pixels=True)
    assert "PatientBirthDate" not in source and "FrameOfReferenceUID" not in source  # what this case is about
    name = ANONYMISED.name
    out = tmp_path / "out"
    code, result, err = _infer(capsys, str(ANONYMISED), "-o", str(out), "-m", str(model))
    assert code == 0 and result["written"] == [name], err[-3000:]
    warned = [r.getMessage() for r in caplog.records if "DICOM-SEG" in r.getMessage()]
    assert len(warned) == 1 and "FrameOfReferenceUID" in warned[0] and "(fix: " in warned[0], warned
    report = json.loads((out / f"{name}.json").read_text())
    assert report["dicom_seg"] is None and "FrameOfReferenceUID" in report["dicom_seg_skipped"], report
    assert report["dicom_seg_fix"], report
    assert sorted(p.name for p in out.iterdir() if not is_report_file(p)) == [
        f"{name}.json",
        f"{name}.nii.gz",
        f"{name}_labels.json",
    ]
    # the same files given a FrameOfReferenceUID (the other attributes still missing): a DICOM-SEG too
    series = tmp_path / name
    series.mkdir()
    frame_of_reference = pydicom.uid.generate_uid()
    for f in sorted(ANONYMISED.glob("*.dcm")):
        ds = pydicom.dcmread(str(f))
        ds.FrameOfReferenceUID = frame_of_reference
        ds.save_as(str(series / f.name))
    caplog.clear()
    out = tmp_path / "out_with_frame_of_reference"
    code, result, err = _infer(capsys, str(series), "-o", str(out), "-m", str(model))
    assert code == 0 and result["written"] == [name], err[-3000:]
    assert "DICOM-SEG" not in caplog.text, caplog.text
    report = json.loads((out / f"{name}.json").read_text())
    assert report["dicom_seg"] == f"{name}_seg.dcm", report
    _check_seg(out / f"{name}_seg.dcm", series, out / f"{name}.nii.gz")
    seg = pydicom.dcmread(str(out / f"{name}_seg.dcm"))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.PatientID == source.PatientID and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.PatientBirthDate == "" and seg.FrameOfReferenceUID == frame_of_reference


def test_a_series_segpipe_writes_no_dicom_seg_for_says_why_and_the_fix_on_the_terminal(
    tiny_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """A series read with a missing slice resampled (`allow_uneven_spacing=true`) gets its label map (exit 0) and, on stderr, one warning saying why it has no DICOM-SEG and what to use instead."""
    model, good = tiny_model
    series = _series_of(good, tmp_path / "inputs" / "gap")
    sorted(series.glob("*.dcm"))[2].unlink()
    out = tmp_path / "out"
    command = [sys.executable, "-m", "segpipe", "infer", str(series), "-o", str(out), "-m", str(model)]
    run = subprocess.run(
        [*command, "tta=false", "allow_uneven_spacing=true"],
        cwd=REPO,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if "DICOM-SEG" in line]
    assert len(lines) == 1 and lines[0].startswith("segpipe infer: warning: gap: no DICOM-SEG: "), run.stderr
    assert "resampled" in lines[0] and "(fix: use the label map" in lines[0], lines
    report = json.loads((out / "gap.json").read_text())
    assert report["dicom_seg"] is None and report["dicom_seg_skipped"] and report["dicom_seg_fix"], report
    assert sorted(p.name for p in out.iterdir() if not is_report_file(p)) == [
        "gap.json",
        "gap.nii.gz",
        "gap_labels.json",
    ]


def test_evaluate_scores_the_predicted_cases_with_a_warning_and_strict_refuses(
    tiny_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """`evaluate` with predictions for 1 of 3 references scores that case with a warning naming the 2 without one (listed in summary.json); `strict=true` refuses, and a stray prediction is still refused."""
    labels = sorted((tiny_model[1].parents[1] / "labelsTr").glob("*.nii.gz"))
    assert len(labels) == 3
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    for folder in (pred, ref):
        folder.mkdir()
    for f in labels:
        shutil.copy(f, ref / f.name)
    shutil.copy(labels[1], pred / labels[1].name)
    case = labels[1].name[: -len(".nii.gz")]
    missing = sorted(f.name[: -len(".nii.gz")] for f in (labels[0], labels[2]))
    code = cli.main(["evaluate", str(pred), str(ref), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no prediction for 2 of 3" in warnings[0], warnings
    assert all(m in warnings[0] for m in missing) and "strict=true" in warnings[0], warnings
    result = json.loads(captured.out)
    summary = json.loads((pred / "summary.json").read_text())
    for scored in (result, summary):
        assert scored["n_cases"] == 1 and [c["case"] for c in scored["metric_per_case"]] == [case], scored
        assert scored["missing_predictions"] == [
            {"case": m, "reference_file": str(ref / f"{m}.nii.gz")} for m in missing
        ]
        assert scored["foreground_mean"]["Dice"] == 1.0
    # the text summary says how many references were left out
    assert cli.main(["evaluate", str(pred), str(ref), "-q"]) == 0
    assert "2 reference case(s) without a prediction left out" in capsys.readouterr().out
    # strict=true: refused as before, no tables written
    for name in ("evaluation.csv", "summary.json", "dice_boxplot.png", "report.html"):
        (pred / name).unlink()
    code = cli.main(["evaluate", str(pred), str(ref), "strict=true"])
    err = capsys.readouterr().err
    assert code == 3 and "no prediction for 2 of 3" in err and "Traceback" not in err, err
    assert sorted(p.name for p in pred.iterdir()) == [labels[1].name]
    # a prediction without a reference is refused either way
    shutil.copy(labels[1], pred / "stray.nii.gz")
    code = cli.main(["evaluate", str(pred), str(ref)])
    err = capsys.readouterr().err
    assert code == 3 and "stray" in err, err
    assert sorted(p.name for p in pred.iterdir()) == sorted([labels[1].name, "stray.nii.gz"])
