"""Tests of segpipe.io.dicom: series discovery/choice, validation, pixel decoding, writing.

Real-data tests use ../shared/data/dicom (dicom2nifti reference series with NIfTI ground
truth, pydicom's DICOMDIR test folders, dcmqi's multi-frame images) and skip when it is absent;
the synthetic tests write their own series with ``write_dicom_series``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SHARED_DATA as DATA
from conftest import SKIP_HOW

from segpipe.errors import DicomError, UsageError
from segpipe.geometry import Geometry
from segpipe.io.dicom import describe_dicom, list_series, read_dicom, write_dicom_series
from segpipe.io.image import read_image

DICOM2NIFTI = DATA / "dicom" / "dicom2nifti"
DICOMDIRTESTS = DATA / "dicom" / "pydicom_dicomdirtests"
DCMQI = DATA / "dicom" / "dcmqi_seg"
NO_DATA = f"shared test data not found at {DATA / 'dicom'}: {SKIP_HOW}"


def needs(root: Path):
    """Mark a test as using ../shared/data and skip it when ``root`` is absent."""
    return lambda test: pytest.mark.realdata(pytest.mark.skipif(not root.is_dir(), reason=NO_DATA)(test))


def _params(items: list, ids: list[str], root: Path) -> list:
    if not root.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=NO_DATA))]
    return [pytest.param(item, id=i, marks=pytest.mark.realdata) for item, i in zip(items, ids)]


def _ground_truth_pairs(failing: bool) -> list:
    if not DICOM2NIFTI.is_dir():
        return _params([], [], DICOM2NIFTI)
    pairs = []
    for gt in sorted(DICOM2NIFTI.rglob("*_ground_truth.nii.gz")):
        folder = gt.with_name(gt.name[: -len("_ground_truth.nii.gz")])
        if folder.is_dir() and (folder.relative_to(DICOM2NIFTI).parts[0] == "failing") == failing:
            pairs.append((folder, gt))
    return _params(pairs, [str(f.relative_to(DICOM2NIFTI)) for f, _ in pairs], DICOM2NIFTI)


def _nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """First volume of a NIfTI and its (i, j, k) -> LPS matrix."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    return data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine


def _in_reference_space(geometry: Geometry, ref_affine: np.ndarray, ref_shape: tuple[int, ...]) -> np.ndarray:
    """Integer reference (i, j, k) index of every voxel of ``geometry``, checking the grids coincide."""
    m = np.linalg.inv(ref_affine) @ geometry.index_to_world_matrix
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in geometry.shape], indexing="ij"), -1).reshape(-1, 3)
    ref = idx @ m[:3, :3].T + m[:3, 3]
    assert np.abs(ref - np.round(ref)).max() < 0.01, "voxel centres are not on the reference grid"
    ref = np.round(ref).astype(int)
    assert ref.min(axis=0).tolist() == [0, 0, 0]
    assert (ref.max(axis=0) + 1).tolist() == list(ref_shape), "grids cover different extents"
    return ref


def _corners_world(geometry: Geometry) -> np.ndarray:
    corners = [
        [z, y, x]
        for z in (0, geometry.shape[0] - 1)
        for y in (0, geometry.shape[1] - 1)
        for x in (0, geometry.shape[2] - 1)
    ]
    return geometry.index_to_world(np.array(corners, dtype=float))


# ------------------------------------------------------------------------------ dicom2nifti series
@pytest.mark.parametrize("pair", _ground_truth_pairs(failing=False))
def test_series_matches_ground_truth(pair: tuple[Path, Path]) -> None:
    folder, gt = pair
    array, geometry = read_dicom(folder)
    ref, affine = _nifti(gt)
    assert array.shape[0] == 1 and array.ndim == 4
    assert sorted(geometry.shape) == sorted(ref.shape)
    ref_idx = _in_reference_space(geometry, affine, ref.shape)
    expected = ref[tuple(ref_idx.T)].reshape(geometry.shape)
    if np.issubdtype(ref.dtype, np.floating):
        np.testing.assert_allclose(array[0], expected, rtol=1e-5, atol=1e-4)
    else:
        assert array.dtype.kind in "iu"
        np.testing.assert_array_equal(array[0], expected)


FAILING = {
    "gantrytilting/001": "gantry tilt",
    "notavolume/001": "duplicate slice positions",
    "slicecount/001": "only 2 slices",
    "sliceincrement/001": "missing slice",
    "sliceincrement/002": "gantry tilt",  # tilted and a missing slice: the first problem found
    "sliceorientation/001": "mixed slice orientations",
}


def _failing_folders() -> list:
    root = DICOM2NIFTI / "failing"
    folders = sorted(p for p in root.glob("*/*") if p.is_dir()) if root.is_dir() else []
    return _params(folders, [str(p.relative_to(root)) for p in folders], root)


@pytest.mark.parametrize("folder", _failing_folders())
def test_failing_series_refused_by_default(folder: Path) -> None:
    name = folder.relative_to(DICOM2NIFTI / "failing").as_posix()
    with pytest.raises(DicomError) as info:
        read_dicom(folder)
    assert info.value.message.startswith(str(folder))
    assert "\n" not in info.value.message and info.value.hint
    assert FAILING[name] in info.value.message


OPT_INS = {
    "slicecount/001": {"allow_few_slices": True},
    "sliceincrement/002": {"allow_gantry_tilt": True, "allow_uneven_spacing": True},
}


@pytest.mark.parametrize("pair", _ground_truth_pairs(failing=True))
def test_failing_series_opt_in_covers_reference(pair: tuple[Path, Path]) -> None:
    folder, gt = pair
    options = OPT_INS[folder.relative_to(DICOM2NIFTI / "failing").as_posix()]
    array, geometry = read_dicom(folder, **options)
    ref, affine = _nifti(gt)
    ref_geometry = Geometry.from_nifti_affine(np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine, ref.shape)
    ours, theirs = _corners_world(geometry), _corners_world(ref_geometry)
    voxel = max(ref_geometry.spacing)
    np.testing.assert_allclose(ours.min(axis=0), theirs.min(axis=0), atol=voxel)
    np.testing.assert_allclose(ours.max(axis=0), theirs.max(axis=0), atol=voxel)
    assert array.shape[1:] == geometry.shape


@needs(DICOM2NIFTI)
def test_missing_slice_opt_in_interpolates_between_neighbours() -> None:
    folder = DICOM2NIFTI / "failing" / "sliceincrement" / "001"
    array, geometry = read_dicom(folder, allow_uneven_spacing=True)
    assert geometry.shape == (5, 512, 512) and geometry.spacing[0] == pytest.approx(5.0, rel=1e-3)
    files = sorted(folder.glob("*.dcm"))
    raw = [pydicom.dcmread(str(f)).pixel_array.astype(np.int32) - 1024 for f in files]
    for k, z in enumerate((0, 1, 2, 4)):  # the originals are kept where they lie
        np.testing.assert_array_equal(array[0, z], raw[k])
    np.testing.assert_allclose(array[0, 3], (raw[2] + raw[3]) / 2, atol=0.51)


@needs(DICOM2NIFTI)
def test_gantry_tilt_opt_in_resamples_onto_regular_grid() -> None:
    array, geometry = read_dicom(DICOM2NIFTI / "failing" / "gantrytilting" / "001", allow_gantry_tilt=True)
    assert geometry.shape[0] == 4 and geometry.shape[1] > 512 and geometry.shape[2] == 512
    d = geometry.direction_matrix
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-6)  # an orthogonal grid
    assert array.shape[1:] == geometry.shape and array.dtype == np.int16


# ----------------------------------------------------------------------------- dicomdir test folders
@needs(DICOMDIRTESTS)
def test_dicomdirtests_listing() -> None:
    info = describe_dicom(DICOMDIRTESTS)
    by_uid = {s["uid"]: s for s in info["series"]}
    assert len(info["series"]) == 14
    assert info["skipped"]["DICOMDIR"] == 8  # all DICOMDIR variants, big-endian included
    images = [s for s in info["series"] if s["kind"] == "image"]
    assert len(images) == 13 and sum(s["files"] for s in images) == 31
    counts = sorted((s["description"], s["files"]) for s in images)
    assert ("SmartScore - Gated 0.5 sec", 5) in counts and ("Routine Brain", 4) in counts
    assert [s["description"] for s in images].count("FAST LOCALIZER") == 4
    tiny = [s for s in info["series"] if s["kind"] == "no-pixel-data"]
    assert len(tiny) == 1 and tiny[0]["files"] == 50
    assert info["chosen"] is None and "13 image series" in info["choice_problem"]
    problems = {s["description"]: s["problem"] for s in images if s["problem"]}
    assert "missing slice" in problems["Routine Brain"]
    assert "mixed slice orientations" in problems["ANGIO Projected from   C"]
    smart = next(u for u, s in by_uid.items() if s["description"].startswith("SmartScore"))
    assert by_uid[smart]["readable"] and by_uid[smart]["problem"] is None
    import json

    json.dumps(info)
    chosen = describe_dicom(DICOMDIRTESTS, series="smartscore*")
    assert chosen["chosen"] == smart and chosen["choice_problem"] is None


@needs(DICOMDIRTESTS)
def test_dicomdirtests_read_by_selector() -> None:
    found, _ = list_series(DICOMDIRTESTS)
    smart = next(s for s in found if s.description.startswith("SmartScore"))
    by_uid, geometry = read_dicom(DICOMDIRTESTS, series=smart.uid)
    assert by_uid.shape == (1, 5, 16, 16) and geometry.spacing[0] == pytest.approx(2.5)
    by_glob, _ = read_dicom(DICOMDIRTESTS, series="smartscore*")
    by_regex, _ = read_dicom(DICOMDIRTESTS, series=r"re:Gated 0\.5")
    np.testing.assert_array_equal(by_uid, by_glob)
    np.testing.assert_array_equal(by_uid, by_regex)
    # z grows along the normal although the files are stored head to feet
    assert geometry.index_to_world([1, 0, 0])[2] > geometry.origin[2]
    cr, cr_geometry = read_dicom(DICOMDIRTESTS, series="cervical lat", modality="CR")
    assert cr.shape == (1, 1, 16, 16) and cr_geometry.shape == (1, 16, 16)
    with pytest.raises(DicomError, match="3 image series match modality='cr'"):
        read_dicom(DICOMDIRTESTS, modality="cr")
    with pytest.raises(DicomError, match="4 image series match series='FAST LOCALIZER'"):
        read_dicom(DICOMDIRTESTS, series="FAST LOCALIZER")
    with pytest.raises(DicomError, match="no image series matches"):  # a glob matches the whole description
        read_dicom(DICOMDIRTESTS, series="Gated 0.5")
    with pytest.raises(
        DicomError, match=r"(?s)no image series matches series='nothing' \(found: 14 series: .*segpipe info"
    ):
        read_dicom(DICOMDIRTESTS, series="nothing")
    with pytest.raises(DicomError, match="missing slice"):
        read_dicom(DICOMDIRTESTS, series="Routine Brain")
    with pytest.raises(DicomError, match="no image series found"):
        read_dicom(DICOMDIRTESTS / "TINY_ALPHA")


@needs(DICOMDIRTESTS)
def test_dicomdir_detected_by_content_not_name(tmp_path: Path) -> None:
    shutil.copytree(DICOMDIRTESTS / "98892001" / "CT5N", tmp_path / "ct")
    shutil.copy(DICOMDIRTESTS / "DICOMDIR-bigEnd", tmp_path / "index.dcm")
    shutil.copy(DICOMDIRTESTS / "DICOMDIR", tmp_path / "ct" / "catalogue")
    found, skipped = list_series(tmp_path)
    assert skipped["DICOMDIR"] == 2 and len(found) == 1
    assert read_dicom(tmp_path)[0].shape == (1, 5, 16, 16)


@needs(DCMQI)
def test_non_image_objects_skipped_and_multiframe_matches_single_frames(tmp_path: Path) -> None:
    shutil.copytree(DCMQI / "ct-3slice", tmp_path / "ct")
    shutil.copy(DCMQI / "liver.dcm", tmp_path / "ct" / "seg.dcm")
    info = describe_dicom(tmp_path)
    assert sorted(s["kind"] for s in info["series"]) == ["image", "non-image"]
    array, geometry = read_dicom(tmp_path)  # the only image series
    assert array.shape == (1, 3, 512, 512) and array.dtype == np.int16 and array.min() < 0
    for size in ("23x38x3", "24x38x3"):
        single, g1 = read_dicom(DCMQI / size / "image")
        multi, g2 = read_dicom(DCMQI / size / "multiframe" / "mf.dcm")
        assert g1.same_grid(g2), g1.differences(g2)
        np.testing.assert_array_equal(single, multi)


# ------------------------------------------------------------------------------------- synthetic
def _oblique_direction(flip_z: bool = False) -> tuple[float, ...]:
    a, b = np.radians(20.0), np.radians(-35.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    d = rz @ rx @ np.diag([-1.0, -1.0, 1.0])  # x and y flipped: still right-handed
    if flip_z:
        d[:, 2] *= -1
    return tuple(d.ravel())


def _volume(shape: tuple[int, int, int] = (6, 10, 12), dtype: type = np.int16) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(-1000, 3000, size=shape).astype(dtype)


@pytest.mark.parametrize("direction", [tuple(np.eye(3).ravel()), _oblique_direction()], ids=["axial", "oblique"])
def test_round_trip_exact(tmp_path: Path, direction: tuple[float, ...]) -> None:
    data = _volume()
    geometry = Geometry(data.shape, (2.5, 0.7, 0.9), (-12.5, 30.0, 101.25), direction)
    folder = write_dicom_series(tmp_path / "series", data, geometry, modality="MR", series_description="rt")
    assert len(list(folder.glob("*.dcm"))) == data.shape[0]
    array, read_geometry = read_dicom(folder)
    assert read_geometry.same_grid(geometry), read_geometry.differences(geometry)
    np.testing.assert_array_equal(array[0], data)
    assert array.dtype == np.int16
    image, _ = read_image(folder)  # the generic reader dispatches folders here
    np.testing.assert_array_equal(image, array)


def test_round_trip_left_handed_geometry_is_physically_identical(tmp_path: Path) -> None:
    data = _volume()
    geometry = Geometry(data.shape, (2.0, 0.8, 0.8), (5.0, -3.0, 40.0), _oblique_direction(flip_z=True))
    array, read_geometry = read_dicom(write_dicom_series(tmp_path / "s", data, geometry))
    # DICOM slices are ordered along row x column: z comes back reversed, same world positions
    np.testing.assert_array_equal(array[0], data[::-1])
    np.testing.assert_allclose(
        read_geometry.index_to_world([[5, 0, 0], [0, 9, 11]]),
        geometry.index_to_world([[0, 0, 0], [5, 9, 11]]),
        atol=1e-4,
    )


def test_round_trip_float_rescaled(tmp_path: Path) -> None:
    data = np.linspace(-3.2, 7.7, 4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    geometry = Geometry(data.shape, (1.0, 1.0, 1.0))
    array, _ = read_dicom(write_dicom_series(tmp_path / "f", data, geometry))
    assert array.dtype == np.float32
    np.testing.assert_allclose(array[0], data, atol=(7.7 + 3.2) / 65535)
    with pytest.raises(UsageError, match="rescale=True"):
        write_dicom_series(tmp_path / "g", data, geometry, rescale=False)


def test_write_is_atomic_and_replaces(tmp_path: Path) -> None:
    geometry = Geometry((3, 4, 4), (1.0, 1.0, 1.0))
    write_dicom_series(tmp_path / "s", np.zeros((3, 4, 4), np.int16), geometry)
    write_dicom_series(tmp_path / "s", np.ones((3, 4, 4), np.int16), geometry)
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    assert read_dicom(tmp_path / "s")[0].min() == 1
    with pytest.raises(UsageError):
        write_dicom_series(tmp_path / "t", np.zeros((2, 4, 4)), geometry)
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def _set(folder: Path, **changes: object) -> None:
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(str(f))
        for key, value in changes.items():
            setattr(ds, key, value)
        ds.save_as(str(f))


@pytest.mark.parametrize(
    ("slope", "intercept", "dtype"),
    [("1", "-1024", np.int16), ("2", "0", np.int16), ("1", "-100000", np.int32), ("0.5", "0", np.float32)],
)
def test_rescale_dtype(tmp_path: Path, slope: str, intercept: str, dtype: type) -> None:
    data = np.abs(_volume((3, 4, 5)))
    folder = write_dicom_series(tmp_path / "s", data, Geometry(data.shape, (1.0, 1.0, 1.0)))
    _set(folder, RescaleSlope=slope, RescaleIntercept=intercept)
    array, _ = read_dicom(folder)
    assert array.dtype == dtype
    np.testing.assert_allclose(array[0], data * float(slope) + float(intercept))


def test_validation_on_synthetic_series(tmp_path: Path) -> None:
    geometry = Geometry((5, 4, 4), (3.0, 1.0, 1.0))
    folder = write_dicom_series(tmp_path / "s", _volume((5, 4, 4)), geometry)
    (folder / "IM00003.dcm").unlink()
    with pytest.raises(DicomError, match=r"missing slice.*gap of 6 mm.*IM00002.dcm.*IM00004.dcm"):
        read_dicom(folder)
    array, g = read_dicom(folder, allow_uneven_spacing=True)
    assert g.shape == (5, 4, 4) and g.spacing[0] == pytest.approx(3.0)
    for name in ("IM00004.dcm", "IM00005.dcm"):
        (folder / name).unlink()
    with pytest.raises(DicomError, match="only 2 slices"):
        read_dicom(folder)
    assert read_dicom(folder, allow_few_slices=True)[1].spacing[0] == pytest.approx(3.0)
    (folder / "IM00002.dcm").unlink()
    single, g1 = read_dicom(folder)
    assert single.shape == (1, 1, 4, 4) and g1.shape == (1, 4, 4)


def test_mixed_sizes_and_shear_refused(tmp_path: Path) -> None:
    uid = pydicom.uid.generate_uid()
    write_dicom_series(
        tmp_path / "a", _volume((3, 4, 4)), Geometry((3, 4, 4), (1.0, 1.0, 1.0)), series_instance_uid=uid
    )
    write_dicom_series(
        tmp_path / "b", _volume((3, 6, 6)), Geometry((3, 6, 6), (1.0, 1.0, 1.0), (0, 0, 3.0)), series_instance_uid=uid
    )
    with pytest.raises(DicomError, match=r"mixed sizes: .*6x6 \(3 slices\)"):
        read_dicom(tmp_path)
    folder = write_dicom_series(tmp_path / "c", _volume((4, 8, 8)), Geometry((4, 8, 8), (2.0, 1.0, 1.0)))
    for k, f in enumerate(sorted(folder.glob("*.dcm"))):  # shift each slice 0.5 mm along y: a 14 degree tilt
        ds = pydicom.dcmread(str(f))
        ds.ImagePositionPatient = [0.0, 0.5 * k, 2.0 * k]
        ds.save_as(str(f))
    with pytest.raises(DicomError, match="gantry tilt"):
        read_dicom(folder)
    array, g = read_dicom(folder, allow_gantry_tilt=True)
    assert g.shape == (4, 10, 8) and array.shape == (1, 4, 10, 8)


def test_bad_input_is_one_line_dicom_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.dcm").write_text("not a dicom file\n")
    folder = write_dicom_series(tmp_path / "s", _volume((3, 4, 4)), Geometry((3, 4, 4), (1.0, 1.0, 1.0)))
    victim = folder / "IM00002.dcm"
    victim.write_bytes(victim.read_bytes()[:-20])  # truncated pixel data
    cases = [
        (tmp_path / "empty", "no image series found"),
        (tmp_path / "text.dcm", "not a readable DICOM file"),
        (tmp_path / "missing", "no such file or folder"),
        (folder, "cannot decode pixel data"),
    ]
    for path, problem in cases:
        with pytest.raises(DicomError) as info:
            read_dicom(path)
        message = info.value.message
        assert "\n" not in message and problem in message, message
        assert str(path if problem != "cannot decode pixel data" else victim) in message
    with pytest.raises(UsageError, match="unknown DICOM option"):
        read_dicom(folder, allow_everything=True)


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless", "JPEGBaseline8Bit"])
def test_compressed_transfer_syntaxes(tmp_path: Path, syntax: str) -> None:
    data = (np.arange(3 * 40 * 48).reshape(3, 40, 48) % 200).astype(np.int16)
    folder = write_dicom_series(tmp_path / "s", data, Geometry(data.shape, (1.5, 0.5, 0.5)))
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(str(f))
        if syntax == "JPEGBaseline8Bit":  # no pydicom encoder: encapsulate a Pillow JPEG by hand
            import io

            from PIL import Image

            buffer = io.BytesIO()
            Image.fromarray(ds.pixel_array.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
            ds.PixelData = pydicom.encaps.encapsulate([buffer.getvalue()])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
        else:
            ds.compress(getattr(pydicom.uid, syntax))
        ds.save_as(str(f))
    array, _ = read_dicom(folder)
    tolerance = 8 if syntax == "JPEGBaseline8Bit" else 0
    np.testing.assert_allclose(array[0].astype(float), data, atol=tolerance)
