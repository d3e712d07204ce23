"""Tests of segpipe.io.dicom_seg: DICOM-SEG (binary and label-map) onto the image grid.

Real-data tests compare dcmqi's SEG files with the NRRD label maps shipped beside them and skip
when ../shared/data is absent; synthetic tests build SEGs with highdicom on written series.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SHARED_DATA as DATA
from conftest import SKIP_HOW

from segpipe.errors import DicomError, UsageError
from segpipe.geometry import Geometry
from segpipe.io.dicom import read_dicom, write_dicom_series
from segpipe.io.dicom_seg import read_dicom_seg
from segpipe.io.image import read_image

DCMQI = DATA / "dicom" / "dcmqi_seg"
_skip = pytest.mark.skipif(not DCMQI.is_dir(), reason=f"shared test data not found at {DCMQI}: {SKIP_HOW}")


def needs_data(test):
    """Mark a test as using ../shared/data and skip it when the dcmqi folder is absent."""
    return pytest.mark.realdata(_skip(test))


# (SEG, referenced image series, NRRD label map made from the same segmentation)
PAIRS = [
    ("liver.dcm", "ct-3slice", "liver_seg.nrrd"),
    ("23x38x3/seg/label.seg", "23x38x3/image", "23x38x3/nrrd/label.nrrd"),
    ("24x38x3/seg/label.seg", "24x38x3/image", "24x38x3/nrrd/label.nrrd"),
    ("sparse-labelmap-noppv.dcm", "24x38x3/image", "sparse_labelmap_noppv_seg.nrrd"),
    ("sparse-labelmap-ppv5.dcm", "24x38x3/image", "sparse_labelmap_ppv5_seg.nrrd"),
]


@needs_data
@pytest.mark.parametrize(("seg", "image", "nrrd"), PAIRS, ids=[p[0] for p in PAIRS])
def test_seg_matches_nrrd(seg: str, image: str, nrrd: str) -> None:
    labels, geometry = read_dicom_seg(DCMQI / seg, DCMQI / image)
    expected, expected_geometry = read_image(DCMQI / nrrd)
    _, image_geometry = read_dicom(DCMQI / image)
    assert labels.dtype == np.uint8 and labels.shape == (1,) + geometry.shape
    assert geometry.same_grid(image_geometry) and geometry.same_grid(expected_geometry)
    if "ppv5" in seg:
        # dcmqi fills the frame missing from this sparse label map with the PixelPaddingValue 5,
        # which is no segment; segpipe gives background there.
        padded = expected == 5
        assert padded.sum() == np.prod(geometry.shape[1:])
        assert not labels[padded].any()
        expected = np.where(padded, 0, expected)
    np.testing.assert_array_equal(labels, expected)


@needs_data
def test_reference_by_geometry_or_parent_folder() -> None:
    _, image_geometry = read_dicom(DCMQI / "24x38x3" / "image")
    by_geometry, _ = read_dicom_seg(DCMQI / "24x38x3/seg/label.seg", image_geometry)
    # the folder holding many series: the one the SEG references is chosen
    by_folder, geometry = read_dicom_seg(DCMQI / "24x38x3/seg/label.seg", DCMQI)
    assert geometry.same_grid(image_geometry)
    np.testing.assert_array_equal(by_geometry, by_folder)


@needs_data
def test_partial_overlaps_need_priority() -> None:
    seg, ct = DCMQI / "partial_overlaps.dcm", DCMQI / "ct-3slice"
    with pytest.raises(DicomError) as info:
        read_dicom_seg(seg, ct)
    assert "overlapping segments: labels 1 and 2" in info.value.message and "priority" in info.value.hint
    assert str(seg) in info.value.message and "\n" not in info.value.message
    nrrds = [read_image(DCMQI / f"partial_overlaps-{i}.nrrd")[0][0] for i in (1, 2, 3)]
    truth = {v: np.any([n == v for n in nrrds], axis=0) for v in range(1, 6)}
    high_first, _ = read_dicom_seg(seg, ct, priority=[5, 4, 3, 2, 1])
    low_first, _ = read_dicom_seg(seg, ct, priority=["green", "ORANGE", "PURPLE", "LIGHT_BLUE", "DARK_BLUE"])
    for labels, order in ((high_first[0], [5, 4, 3, 2, 1]), (low_first[0], [1, 2, 3, 4, 5])):
        claimed = np.zeros_like(labels, dtype=bool)
        for value in order:
            np.testing.assert_array_equal(labels == value, truth[value] & ~claimed)
            claimed |= truth[value]
        np.testing.assert_array_equal(labels > 0, claimed)
    assert (high_first != low_first).any()
    with pytest.raises(DicomError, match="labels 2 and 3"):
        read_dicom_seg(seg, ct, priority=[1])  # does not order the overlapping 2 and 3


@needs_data
@pytest.mark.parametrize("segment", [1, 2, 3, 4, 5])
def test_partial_overlaps_each_segment_via_mapping(segment: int) -> None:
    nrrds = [read_image(DCMQI / f"partial_overlaps-{i}.nrrd")[0][0] for i in (1, 2, 3)]
    truth = np.any([n == segment for n in nrrds], axis=0)
    mapping = {n: (7 if n == segment else 0) for n in range(1, 6)}
    labels, _ = read_dicom_seg(DCMQI / "partial_overlaps.dcm", DCMQI / "ct-3slice", mapping=mapping)
    np.testing.assert_array_equal(labels[0] == 7, truth)
    assert set(np.unique(labels)) == {0, 7}


@needs_data
def test_mapping_by_label_and_errors() -> None:
    seg, ct = DCMQI / "liver.dcm", DCMQI / "ct-3slice"
    plain, _ = read_dicom_seg(seg, ct)
    mapped, _ = read_dicom_seg(seg, ct, mapping={"liver": 3})
    np.testing.assert_array_equal(mapped, plain * 3)
    with pytest.raises(DicomError, match="mapping key 'Lung' names no segment.*1: 'Liver'"):
        read_dicom_seg(seg, ct, mapping={"Lung": 1})
    with pytest.raises(DicomError, match=r"segments \[2, 3, 4, 5\] are not in the mapping"):
        read_dicom_seg(DCMQI / "partial_overlaps.dcm", ct, mapping={1: 1})
    with pytest.raises(UsageError, match="not an integer 0..255"):
        read_dicom_seg(seg, ct, mapping={1: 300})


@needs_data
def test_mismatched_reference_is_refused() -> None:
    seg = DCMQI / "23x38x3" / "seg" / "label.seg"
    with pytest.raises(DicomError) as info:
        read_dicom_seg(seg, DCMQI / "24x38x3" / "image")
    message = info.value.message
    assert message.startswith(str(seg)) and "references series" in message and "Image 24x38x3" in message
    far = Geometry((3, 38, 23), (2.5, 0.7, 0.7), (500.0, 500.0, 500.0))
    with pytest.raises(DicomError, match="lie outside the reference image grid"):
        read_dicom_seg(seg, far)
    with pytest.raises(DicomError, match="not a DICOM-SEG object"):
        read_dicom_seg(DCMQI / "ct-3slice" / "01.dcm", DCMQI / "ct-3slice")


# ------------------------------------------------------------------------------------- synthetic
def _oblique() -> tuple[float, ...]:
    a = np.radians(30.0)
    return tuple(
        (np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]) @ np.diag([1, -1, -1])).ravel()
    )


def _synthetic_seg(tmp_path: Path, labelmap: bool) -> tuple[Path, Path, Geometry, np.ndarray]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    geometry = Geometry((4, 10, 12), (2.0, 0.8, 0.9), (10.0, -20.0, 30.0), _oblique())
    folder = write_dicom_series(tmp_path / "image", np.zeros(geometry.shape, np.int16), geometry)
    sources = [pydicom.dcmread(str(f)) for f in sorted(folder.glob("*.dcm"))]
    masks = np.zeros(geometry.shape + (2,), dtype=np.uint8)
    masks[1:3, 2:6, 3:8, 0] = 1
    masks[2:4, 4:9, 5:10, 1] = 1
    if labelmap:
        masks[..., 0][masks[..., 1] > 0] = 0  # label maps cannot overlap
        pixels = masks[..., 0] + 2 * masks[..., 1]
        seg_type = hd.seg.SegmentationTypeValues.LABELMAP
    else:
        pixels, seg_type = masks, hd.seg.SegmentationTypeValues.BINARY
    descriptions = [
        hd.seg.SegmentDescription(n, name, codes.SCT.Tissue, codes.SCT.Organ, hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, name in ((1, "kidney"), (2, "tumour"))
    ]
    seg = hd.seg.Segmentation(
        sources, pixels, seg_type, descriptions, hd.UID(), 2, hd.UID(), 1, "segpipe", "tests", "0", "0"
    )
    seg.save_as(tmp_path / "seg.dcm")
    return tmp_path / "seg.dcm", folder, geometry, masks


@pytest.mark.parametrize("labelmap", [False, True], ids=["binary", "labelmap"])
def test_synthetic_seg_on_oblique_series(tmp_path: Path, labelmap: bool) -> None:
    seg, folder, geometry, masks = _synthetic_seg(tmp_path, labelmap)
    expected = np.where(masks[..., 1] > 0, 2, masks[..., 0]).astype(np.uint8)  # tumour over kidney
    if not labelmap:
        with pytest.raises(DicomError, match=r"labels 1 and 2 \(6 voxels\)"):
            read_dicom_seg(seg, folder)
    labels, read_geometry = read_dicom_seg(seg, folder, priority=["tumour", "kidney"])
    assert read_geometry.same_grid(geometry)
    np.testing.assert_array_equal(labels[0], expected)
    # nearest-neighbour resampling onto a coarser grid with the same first voxel
    coarse = geometry.replace(shape=(2, 5, 6), spacing=tuple(2 * s for s in geometry.spacing))
    resampled, _ = read_dicom_seg(seg, coarse, priority=[2, 1])
    np.testing.assert_array_equal(resampled[0], expected[::2, ::2, ::2])


def test_damaged_seg_files_are_one_line_dicom_errors(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    seg, folder, geometry, _ = _synthetic_seg(tmp_path, labelmap=False)
    raw = seg.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[: len(raw) // 2])
    ds = pydicom.dcmread(str(seg))
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [0, 0]
    zero = tmp_path / "zero_spacing.dcm"
    ds.save_as(str(zero))
    for path, problem in ((truncated, "invalid or truncated DICOM-SEG"), (zero, "do not form a regular volume")):
        for reference in (folder, geometry):
            with pytest.raises(DicomError) as info:
                read_dicom_seg(path, reference, priority=[2, 1])
            assert info.value.message.startswith(str(path)) and problem in info.value.message
            assert "\n" not in info.value.message and info.value.hint
    assert "Traceback" not in capfd.readouterr().err
