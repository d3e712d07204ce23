"""Reliability: DICOM series that readers get wrong, in a batch `segpipe infer`.

Every series of the real-scanner corpus's ``failing/`` folder, a folder of several series with
no selector and a folder of only a DICOMDIR go into one batch beside a good image: each bad case
is reported with its reason and skipped, nothing is written for it, the good case is segmented,
and the exit code says that something failed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from segpipe import cli

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
    assert sorted(p.name for p in out.iterdir()) == ["good.json", "good.nii.gz"]


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
