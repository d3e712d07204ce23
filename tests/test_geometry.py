"""Geometry and image IO: round trips keep geometry and voxels; axis conventions agree with SimpleITK/nibabel."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from segpipe import Geometry, read_image, write_image
from segpipe.errors import ReadError, UsageError
from segpipe.io.image import read_header


def oblique_geometry(shape=(7, 9, 11)) -> Geometry:
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([1, -1, 1])
    return Geometry(shape=shape, spacing=(3.0, 0.7, 0.9), origin=(10.5, -20.25, 33.0), direction=tuple(rot.ravel()))


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int16])
def test_write_read_round_trip_keeps_geometry_and_voxels(tmp_path, ext, dtype):
    geo = oblique_geometry()
    rng = np.random.default_rng(0)
    arr = (rng.normal(50, 20, size=geo.shape)).astype(dtype)
    path = write_image(tmp_path / f"img{ext}", arr, geo)
    back, geo2 = read_image(path)
    assert back.shape == (1, *geo.shape)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back[0], arr)
    assert geo2.same_grid(geo), geo2.differences(geo)
    np.testing.assert_allclose(geo2.spacing, geo.spacing, rtol=1e-6)
    np.testing.assert_allclose(geo2.origin, geo.origin, atol=1e-4)
    np.testing.assert_allclose(geo2.direction, geo.direction, atol=1e-5)


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd"])
def test_multichannel_round_trip(tmp_path, ext):
    geo = oblique_geometry((4, 5, 6))
    arr = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6)
    back, geo2 = read_image(write_image(tmp_path / f"m{ext}", arr, geo))
    np.testing.assert_array_equal(back, arr)
    assert geo2.same_grid(geo)
    assert read_header(tmp_path / f"m{ext}").channels == 2


def test_index_to_world_matches_simpleitk():
    geo = oblique_geometry()
    img = geo.to_sitk(np.zeros(geo.shape, np.float32))
    for idx_xyz in [(0, 0, 0), (10, 8, 6), (3, 1, 5)]:
        expected = img.TransformIndexToPhysicalPoint(idx_xyz)
        got = geo.index_to_world(np.array(idx_xyz[::-1]))
        np.testing.assert_allclose(got, expected, atol=1e-9)
        np.testing.assert_allclose(geo.world_to_index(got), idx_xyz[::-1], atol=1e-9)


def test_nifti_affine_agrees_with_nibabel(tmp_path):
    geo = oblique_geometry()
    path = write_image(tmp_path / "a.nii.gz", np.zeros(geo.shape, np.int16), geo)
    nimg = nib.load(str(path))
    np.testing.assert_allclose(nimg.affine, geo.nifti_affine(), atol=1e-4)
    assert nimg.shape == geo.sitk_size
    g2 = Geometry.from_nifti_affine(nimg.affine, nimg.shape)
    assert g2.same_grid(geo)


def test_sitk_axis_order_is_reversed_in_numpy_order():
    img = sitk.Image([11, 9, 7], sitk.sitkFloat32)  # x, y, z sizes
    img.SetSpacing((0.5, 0.6, 4.0))
    geo = Geometry.from_sitk(img)
    assert geo.shape == (7, 9, 11)
    assert geo.spacing == (4.0, 0.6, 0.5)
    assert geo.sitk_spacing == (0.5, 0.6, 4.0)
    assert geo.orientation_code() == "LPS"


def test_geometry_differences_detect_a_one_voxel_shift():
    geo = oblique_geometry()
    shifted = geo.replace(origin=(geo.origin[0] + 0.7, geo.origin[1], geo.origin[2]))
    assert geo.differences(shifted) and "origin" in geo.differences(shifted)[0]
    assert geo.same_grid(geo.replace(origin=tuple(o + 1e-5 for o in geo.origin)))
    assert Geometry.from_dict(geo.to_dict()) == geo


def test_geometry_rejects_nonsense():
    with pytest.raises(ValueError):
        Geometry(shape=(0, 2, 2), spacing=(1, 1, 1))
    with pytest.raises(ValueError):
        Geometry(shape=(2, 2, 2), spacing=(1, -1, 1))
    with pytest.raises(ValueError):
        Geometry(shape=(2, 2, 2), spacing=(1, float("nan"), 1))


def test_two_d_image_reads_as_single_slice(tmp_path):
    img = sitk.GetImageFromArray(np.ones((5, 6), np.float32))
    img.SetSpacing((0.5, 0.7))
    sitk.WriteImage(img, str(tmp_path / "a.nii.gz"))
    arr, geo = read_image(tmp_path / "a.nii.gz")
    assert arr.shape == (1, 1, 5, 6)
    np.testing.assert_allclose(geo.spacing, (1.0, 0.7, 0.5), rtol=1e-6)


def test_truncated_and_missing_files_raise_read_error(tmp_path):
    geo = oblique_geometry()
    path = write_image(tmp_path / "t.nii.gz", np.ones(geo.shape, np.float32), geo)
    data = path.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ReadError, match="trunc.nii.gz"):
        read_image(tmp_path / "trunc.nii.gz")
    with pytest.raises(ReadError, match="not found"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "x.png.txt").write_text("hello")
    with pytest.raises(ReadError, match="unsupported"):
        read_image(tmp_path / "x.png.txt")


def test_write_is_atomic_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    geo = oblique_geometry()
    target = tmp_path / "out.nii.gz"
    write_image(target, np.ones(geo.shape, np.float32), geo)
    before = target.read_bytes()
    with pytest.raises(UsageError):
        write_image(target, np.ones((2, 2, 2), np.float32), geo)  # shape mismatch: nothing written

    def crash(image, path, useCompression=True):  # a writer dying half-way through
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", crash)
    with pytest.raises(OSError, match="disk full"):
        write_image(target, np.zeros(geo.shape, np.float32), geo)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]
