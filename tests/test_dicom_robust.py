"""Robustness of DICOM reading: odd files in a listing, the series selector, anonymised series,
DICOM detection by content, decoder failures, table UIDs, and every folder of the real corpus.

Synthetic fixtures are written with ``write_dicom_series`` and edited with pydicom; the
12-bit JPEG Extended files are pydicom's own test files (shipped inside the pydicom package);
the corpus walk uses ../shared/data/dicom and skips when it is absent.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import DICOM_DATA, SKIP_HOW

from segpipe import api
from segpipe.cli import main
from segpipe.errors import EXIT_DATA, DicomError, UsageError
from segpipe.geometry import Geometry
from segpipe.io.dicom import (
    choose_series,
    describe_dicom,
    list_series,
    read_dicom,
    unique_suffixes,
    write_dicom_series,
)
from segpipe.io.image import is_dicom_source, read_image

CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"


def _volume(shape: tuple[int, int, int] = (4, 6, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 2000, size=shape).astype(np.int16)


def _series(
    folder: Path, description: str = "segpipe", shape: tuple[int, int, int] = (4, 6, 8), seed: int = 0, **kwargs: object
) -> tuple[Path, np.ndarray]:
    data = _volume(shape, seed)
    write_dicom_series(
        folder, data, Geometry(shape, (2.0, 0.8, 0.8), (10.0, -5.0, 30.0)), series_description=description, **kwargs
    )
    return folder, data


def _edit(path: Path, delete: tuple[str, ...] = (), **changes: object) -> None:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        ds = pydicom.dcmread(str(f))
        for key in delete:
            if key in ds:
                delattr(ds, key)
        for key, value in changes.items():
            setattr(ds, key, value)
        ds.save_as(str(f))


def _cr_with_zero_spacing(target: Path, tmp: Path) -> Path:
    """A projection radiograph (CR) file with PixelSpacing 0\\0 and no position/orientation."""
    folder, _ = _series(tmp / "cr_src", "chest PA", shape=(1, 6, 8), seed=3)
    src = next(folder.glob("*.dcm"))
    _edit(
        src,
        delete=("ImagePositionPatient", "ImageOrientationPatient", "SliceThickness", "SpacingBetweenSlices"),
        Modality="CR",
        SOPClassUID=CR_SOP_CLASS,
        PixelSpacing=["0", "0"],
        SeriesInstanceUID=pydicom.uid.generate_uid(),
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(target))
    shutil.rmtree(folder)
    return target


def _run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


# ------------------------------------------------------------------ one odd file never aborts a listing
def test_zero_pixel_spacing_file_is_listed_not_fatal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "study"
    _series(root / "ct", "abdomen")
    cr = _cr_with_zero_spacing(root / "cr" / "IM0001.dcm", tmp_path)
    info = describe_dicom(root)
    by_modality = {s["modality"]: s for s in info["series"]}
    assert set(by_modality) == {"CT", "CR"}
    assert by_modality["CT"]["readable"] and by_modality["CT"]["problem"] is None
    assert not by_modality["CR"]["readable"]
    assert "PixelSpacing 0\\0 is not positive" in by_modality["CR"]["problem"]
    # reading it as a volume is a one-line DicomError (exit 3), for the file and for the folder
    for path, options in ((cr, {}), (root, {"modality": "CR"})):
        with pytest.raises(DicomError) as err:
            read_dicom(path, **options)
        assert "PixelSpacing 0\\0 is not positive" in err.value.message and "\n" not in err.value.message
        assert err.value.exit_code == EXIT_DATA and err.value.hint
    assert read_dicom(root, modality="CT")[0].shape == (1, 4, 6, 8)  # the other series still reads
    code, text = _run_cli(capsys, "info", str(cr))
    assert code == EXIT_DATA and "PixelSpacing" in text and "internal error" not in text
    code, text = _run_cli(capsys, "info", str(root))
    assert code in (0, EXIT_DATA) and "internal error" not in text and "chest PA" in text


def test_unreadable_and_malformed_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    folder, data = _series(tmp_path / "s")
    (folder / "junk.dcm").write_bytes(b"\0" * 64 + b"not DICOM")
    (folder / "notes.txt").write_text("hello")
    bad, _ = _series(tmp_path / "bad", shape=(1, 6, 8))
    bad_file = next(bad.glob("*.dcm"))
    _edit(bad_file, Rows=0)
    shutil.move(str(bad_file), str(folder / "zero_rows.dcm"))
    info = describe_dicom(folder)
    assert [s["files"] for s in info["series"]] == [4]
    assert info["skipped"] == {"not DICOM": 1, "not DICOM or unreadable": 1, "unusable header": 1}
    reasons = " | ".join(info["skipped_reasons"])
    assert len(info["skipped_reasons"]) == 3
    assert "junk.dcm" in reasons and "notes.txt" in reasons and "zero_rows.dcm: ValueError: Rows/Columns 0x8" in reasons
    np.testing.assert_array_equal(read_dicom(folder)[0][0], data)


def test_a_series_that_cannot_be_described_does_not_abort_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _series(tmp_path / "a", "first")
    _series(tmp_path / "b", "second", seed=1)
    import segpipe.io.dicom as dicom

    real = dicom.plan_series

    def flaky(series: dicom.DicomSeries, where: Path, **kwargs: object) -> dicom.ReadPlan:
        if series.description == "second":
            raise KeyError("SliceLocation")
        return real(series, where, **kwargs)

    monkeypatch.setattr(dicom.reader, "plan_series", flaky)  # describe_dicom (reader) looks it up there
    info = describe_dicom(tmp_path)
    problems = {s["description"]: s["problem"] for s in info["series"]}
    assert problems["first"] is None and problems["second"].startswith("cannot be described (KeyError")


@pytest.mark.parametrize("tag", ["PixelSpacing", "ImageOrientationPatient"])
def test_degenerate_geometry_tags_are_dicom_errors(tmp_path: Path, tag: str) -> None:
    folder, _ = _series(tmp_path / "s")
    value = ["0", "0"] if tag == "PixelSpacing" else ["1", "0", "0", "1", "0", "0"]  # parallel cosines
    _edit(folder, **{tag: value})
    with pytest.raises(DicomError) as err:
        read_dicom(folder)
    assert tag in err.value.message and "\n" not in err.value.message
    assert describe_dicom(folder)["series"][0]["problem"].startswith(tag)


# ---------------------------------------------------------------------------------- series selector
@pytest.fixture
def mr_study(tmp_path: Path) -> dict[str, str]:
    study = pydicom.uid.generate_uid()
    uids = {}
    for k, name in enumerate(("T1post", "T1pre_reg", "T2_reg")):
        uid = pydicom.uid.generate_uid()
        _series(
            tmp_path / "study" / name,
            name,
            seed=k,
            modality="MR",
            study_instance_uid=study,
            series_instance_uid=uid,
            series_number=k + 1,
        )
        uids[name] = uid
    uids["root"] = str(tmp_path / "study")
    return uids


def _chosen(study: dict[str, str], selector: str) -> str | None:
    """Description of the series ``selector`` picks, None when it picks none or several."""
    found, _ = list_series(study["root"])
    try:
        return choose_series(found, Path(study["root"]), series=selector).description
    except DicomError:
        return None


def test_glob_is_a_glob_and_regex_needs_the_prefix(mr_study: dict[str, str]) -> None:
    root = mr_study["root"]
    with pytest.raises(DicomError, match="2 image series match series='t1\\*'.*T1post.*T1pre_reg"):
        read_dicom(root, series="t1*")
    assert _chosen(mr_study, "t1po*") == "T1post"
    assert _chosen(mr_study, "t1p*") is None  # T1post and T1pre_reg
    assert _chosen(mr_study, "t1post") == "T1post"  # no wildcard: the whole description, any case
    assert _chosen(mr_study, "T1PRE*") == "T1pre_reg"
    assert _chosen(mr_study, "*2_reg") == "T2_reg"
    assert _chosen(mr_study, "t1") is None  # a glob is not a substring search
    assert _chosen(mr_study, "t1?") is None
    assert _chosen(mr_study, "re:^t1(?!.*reg)") == "T1post"
    assert _chosen(mr_study, "re:2_REG$") == "T2_reg"
    assert _chosen(mr_study, mr_study["T1pre_reg"]) == "T1pre_reg"  # the exact SeriesInstanceUID
    assert _chosen(mr_study, mr_study["T1pre_reg"][:-1] + "*") is None  # UIDs are not globbed
    with pytest.raises(DicomError, match="2 image series match series='re:_reg'"):
        read_dicom(root, series="re:_reg")
    with pytest.raises(UsageError, match="invalid regular expression"):
        read_dicom(root, series="re:t1(")
    info = describe_dicom(root, series="t1*")
    assert info["chosen"] is None and "2 image series" in info["choice_problem"]
    assert describe_dicom(root, series="t1po*")["chosen"] == mr_study["T1post"]
    with pytest.raises(DicomError) as err:
        read_dicom(root, series="post")
    assert "series='*post*'" in (err.value.hint or "") and "'re:post'" in (err.value.hint or "")


# --------------------------------------------------------------------- anonymised: no SeriesInstanceUID
def test_series_without_series_uid_is_grouped_into_a_synthetic_series(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, data = _series(tmp_path / "ct", "anon CT", shape=(20, 6, 8))
    _edit(folder, delete=("SeriesInstanceUID",))
    with caplog.at_level(logging.WARNING, logger="segpipe.io.dicom"):
        array, geometry = read_dicom(folder)
        read_dicom(folder)
    np.testing.assert_array_equal(array[0], data)
    assert geometry.shape == (20, 6, 8)
    logged = [r.getMessage() for r in caplog.records if "no SeriesInstanceUID" in r.getMessage()]
    assert len(logged) == 1  # once, not once per read
    info = describe_dicom(folder)
    assert len(info["series"]) == 1
    series = info["series"][0]
    assert series["synthetic"] and series["uid"].startswith("synthetic-") and series["files"] == 20
    assert series["readable"] and series["problem"] is None
    assert series["warnings"] and "20 file(s)" in series["warnings"][0] and series["warnings"][0] in logged[0]
    assert info["warnings"] == series["warnings"] and info["chosen"] == series["uid"]
    assert describe_dicom(folder)["series"][0]["uid"] == series["uid"]  # stable across scans
    np.testing.assert_array_equal(read_dicom(folder, series=series["uid"])[0], array)


def test_anonymised_series_are_kept_apart_by_remaining_tags(tmp_path: Path) -> None:
    study, frame = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    root = tmp_path / "study"
    _series(root / "a", "anon", series_number=1, study_instance_uid=study, frame_of_reference_uid=frame)
    _series(root / "b", "anon", series_number=2, study_instance_uid=study, frame_of_reference_uid=frame, seed=1)
    for name in ("a", "b"):
        _edit(root / name, delete=("SeriesInstanceUID",))
    for f in sorted((root / "b").iterdir()):  # both series in one folder: told apart by SeriesNumber
        shutil.move(str(f), str(root / "a" / f"b_{f.name}"))
    info = describe_dicom(root)
    assert sorted(s["series_number"] for s in info["series"]) == [1, 2]
    assert all(s["synthetic"] and s["readable"] and s["files"] == 4 for s in info["series"])
    assert len(info["warnings"]) == 2
    with pytest.raises(DicomError, match="2 image series"):
        read_dicom(root)
    by_number = {s["series_number"]: s["uid"] for s in info["series"]}
    assert read_dicom(root, series=by_number[2])[0].shape == (1, 4, 6, 8)


def test_no_image_series_message_names_the_skipped_files(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(b"garbage")
    with pytest.raises(DicomError) as err:
        read_dicom(tmp_path)
    assert "no image series found" in err.value.message and "a.dcm" in err.value.message
    assert "\n" not in err.value.message


# ------------------------------------------------------------------------- DICOM detected by content
def test_extensionless_dicom_detected_by_preamble(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, data = _series(tmp_path / "s", shape=(3, 6, 8))
    plain = tmp_path / "plain"
    plain.mkdir()
    for k, f in enumerate(sorted(folder.glob("*.dcm"))):
        shutil.copy(f, plain / f"{k:08d}")
    single = plain / "00000001"
    assert is_dicom_source(single) and is_dicom_source(plain)
    array, geometry = read_image(single)
    np.testing.assert_array_equal(array[0, 0], data[1])
    np.testing.assert_array_equal(read_image(plain)[0][0], data)
    code, text = _run_cli(capsys, "info", str(single))
    assert code == 0 and "unsupported file type" not in text
    assert api.info(single)["format"] == "DICOM"


def test_dicom_source_detection_rules(tmp_path: Path) -> None:
    text = tmp_path / "notes"
    text.write_text("x" * 300)
    assert not is_dicom_source(text)
    nifti_folder = tmp_path / "nifti"
    nifti_folder.mkdir()
    (nifti_folder / "case_0000.nii.gz").write_bytes(b"\x1f\x8b")
    (nifti_folder / "LICENSE").write_text("text")
    assert not is_dicom_source(nifti_folder)  # images and no DICOM: not a DICOM source
    (tmp_path / "empty").mkdir()
    assert is_dicom_source(tmp_path / "empty")  # reports "no image series found" with what it skipped
    _series(nifti_folder / "sub" / "series")
    assert is_dicom_source(nifti_folder)  # DICOM found at any depth
    assert is_dicom_source(tmp_path / "x.dcm") is False  # a missing file is nothing
    named = tmp_path / "scan.DCM"
    named.write_bytes(b"")
    assert is_dicom_source(named)


# ---------------------------------------------------------------------------------- decoding failures
def _pydicom_test_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name)
    except Exception:  # pragma: no cover - pydicom without its bundled test files
        path = None
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not installed with pydicom")
    return Path(str(path))


def test_12bit_jpeg_extended_reads_quietly(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    src = _pydicom_test_file("JPGExtended.dcm")
    shutil.copy(src, tmp_path / "nm.dcm")
    with caplog.at_level(logging.DEBUG):
        array, geometry = read_dicom(tmp_path / "nm.dcm")
    assert array.shape == (1, 1, 1024, 256) and geometry.spacing[1:] == pytest.approx((2.26, 2.26))
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "GDCM" not in captured.err


def test_undecodable_jpeg_extended_is_one_line_with_the_fix(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    src = _pydicom_test_file("JPEG-lossy.dcm")  # 12-bit JPEG Extended that every decoder refuses
    target = tmp_path / "lossy.dcm"
    shutil.copy(src, target)
    with caplog.at_level(logging.DEBUG), pytest.raises(DicomError) as err:
        read_dicom(target)
    message, hint = err.value.message, err.value.hint or ""
    assert message.startswith(f"{target}: cannot decode pixel data (JPEG Extended") and "12-bit" in message
    assert "\n" not in message and "every installed decoder failed (pylibjpeg: " in message  # the 12-bit one first
    assert "decompress" in hint
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    assert "Traceback" not in capfd.readouterr().err


def test_missing_decoder_hint_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _pydicom_test_file("JPGExtended.dcm")
    shutil.copy(src, tmp_path / "nm.dcm")
    import pydicom.pixels

    from segpipe.io.dicom import pixels

    class _NoLibjpeg:
        available_plugins = ("gdcm", "pillow")

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda ts: _NoLibjpeg())
    ds = pydicom.dcmread(str(tmp_path / "nm.dcm"))
    error = pixels.decode_failure(
        tmp_path / "nm.dcm",
        ds,
        RuntimeError(
            "Unable to decode as exceptions were raised by all available plugins:\n  gdcm: no 12-bit\n  pillow: no"
        ),
    )
    assert "every installed decoder failed (gdcm: no 12-bit; pillow: no)" in error.message
    assert error.hint and "pip install pylibjpeg pylibjpeg-libjpeg" in error.hint


# --------------------------------------------------------------------------------------- table UIDs
def test_unique_suffixes() -> None:
    a = "1.2.840.113619.2.55.3.1234.5678.90.11"
    b = "1.2.840.113619.2.55.3.9999.5678.90.11"
    c = "1.2.3.4"
    shown = unique_suffixes([a, b, c, a])
    assert shown[2] == c and shown[0] == shown[3]  # short UIDs in full; copies of one UID look alike
    assert len(shown[0]) >= 12 and shown[1] != shown[0][-len(shown[1]) :]
    assert b.endswith(shown[1]) and not a.endswith(shown[1])
    assert unique_suffixes([a, b]) == ["4.5678.90.11", "9.5678.90.11"]
    d = "1.2.840.113619.2.55.3.1334.5678.90.11"
    assert unique_suffixes([a, d]) == ["234.5678.90.11", "334.5678.90.11"]  # longer only where needed
    assert unique_suffixes([a, d, c], min_len=4) == ["234.5678.90.11", "334.5678.90.11", ".3.4"]
    assert unique_suffixes(["x" * 20 + "1", "x" * 20 + "2"]) == ["x" * 11 + "1", "x" * 11 + "2"]
    assert unique_suffixes([]) == []


# ------------------------------------------------------------------------------ every real DICOM folder
def _corpus_targets() -> list:
    if not DICOM_DATA.is_dir():
        return [
            pytest.param(
                None,
                marks=pytest.mark.skip(reason=f"shared DICOM test data not found at {DICOM_DATA}: {SKIP_HOW}"),
            )
        ]
    paths = [DICOM_DATA, *sorted(p for p in DICOM_DATA.rglob("*") if p.is_dir())]
    paths += sorted(p for p in DICOM_DATA.glob("*/*") if p.is_file())  # the loose files (SEG, RTSTRUCT, CT slices)
    return [
        pytest.param(p, id=str(p.relative_to(DICOM_DATA)) or ".", marks=[pytest.mark.realdata, pytest.mark.slow])
        for p in paths
        if is_dicom_source(p)
    ]


@pytest.mark.parametrize("path", _corpus_targets())
def test_info_on_every_real_dicom_folder_is_a_volume_or_a_reason(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = _run_cli(capsys, "info", str(path))
    assert code in (0, EXIT_DATA), text
    assert "internal error" not in text and "Traceback" not in text
    if code == EXIT_DATA:
        assert "error" in text or "no volume read" in text, text
    else:
        assert "shape" in text
