"""Image readers refuse what they cannot read safely: every header oddity is a ReadError naming the file.

The headers are crafted byte by byte (nibabel's header class, our own voxel bytes), because
nibabel's writer would repair most of the faults these tests plant.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segpipe import read_image
from segpipe.errors import EXIT_DATA, ReadError, SegpipeError
from segpipe.geometry import Geometry
from segpipe.io import image as image_io
from segpipe.io import limits
from segpipe.io.image import read_header
from segpipe.io.nifti import header_warnings

REPO = Path(__file__).resolve().parents[1]


def craft_nifti(
    path: Path,
    *,
    shape: tuple[int, ...] = (4, 5, 6),
    dtype: type | np.dtype = np.float32,
    tweak: Callable[[nib.Nifti1Header], None] | None = None,
    data: bool = True,
) -> Path:
    """A NIfTI-1 file with exactly the header fields we set (sform = qform = diag(1, 2, 3) unless tweaked)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    hdr["vox_offset"] = 352
    if tweak is not None:
        tweak(hdr)
    raw = hdr.binaryblock + b"\0\0\0\0"
    if data:
        raw += np.ones(shape, dtype=dtype).tobytes(order="F")
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def pixdim(values: list[float]) -> Callable[[nib.Nifti1Header], None]:
    """No sform, no qform: the spacing comes from pixdim alone."""

    def tweak(h: nib.Nifti1Header) -> None:
        h["sform_code"] = 0
        h["qform_code"] = 0
        h["pixdim"][1:4] = values

    return tweak


def sform(matrix: np.ndarray) -> Callable[[nib.Nifti1Header], None]:
    def tweak(h: nib.Nifti1Header) -> None:
        h["srow_x"], h["srow_y"], h["srow_z"] = matrix[0], matrix[1], matrix[2]
        h["sform_code"] = 2
        h["qform_code"] = 0

    return tweak


def _affine(**cells: float) -> np.ndarray:
    a = np.diag([1.0, 2.0, 3.0, 1.0])
    for key, value in cells.items():  # e.g. c0_3=nan sets a[0, 3]
        r, c = key[1:].split("_")
        a[int(r), int(c)] = value
    return a


def _singular() -> np.ndarray:
    a = np.diag([1.0, 2.0, 3.0, 1.0])
    a[:3, 1] = a[:3, 0]
    return a


def _nan_quaternion(h: nib.Nifti1Header) -> None:
    h["sform_code"] = 0
    h["quatern_b"] = np.nan


def _big_quaternion(h: nib.Nifti1Header) -> None:
    h["sform_code"] = 0
    h["quatern_b"] = 5.0


def _infinite_inter(h: nib.Nifti1Header) -> None:
    h["scl_slope"] = 2.0
    h["scl_inter"] = np.inf


BAD_HEADERS = {
    "zero spacing": (dict(tweak=pixdim([0.0, 2.0, 3.0])), "spacing"),
    "negative spacing": (dict(tweak=pixdim([-1.0, 2.0, 3.0])), "spacing"),
    "NaN spacing": (dict(tweak=pixdim([np.nan, 2.0, 3.0])), "spacing"),
    "NaN in the affine": (dict(tweak=sform(_affine(c0_3=np.nan))), "affine"),
    "all-zero affine": (dict(tweak=sform(np.zeros((4, 4)))), "affine"),
    "zero column in the affine": (dict(tweak=sform(_affine(c0_0=0.0))), "affine"),
    "singular affine": (dict(tweak=sform(_singular())), "affine"),
    "sheared affine": (dict(tweak=sform(_affine(c0_1=0.5))), "shear"),
    "NaN quaternion": (dict(tweak=_nan_quaternion), "qform"),
    "5-D with 2 time points": (dict(shape=(4, 5, 6, 2, 3)), "5-D"),
    "complex voxels": (dict(dtype=np.complex64), "complex"),
    "RGB voxels": (dict(dtype=np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])), "RGB"),
    "zero size": (dict(shape=(4, 0, 6), data=False), "size"),
    "unknown voxel type code": (dict(tweak=lambda h: h.__setitem__("datatype", 9999)), "voxel type"),
    "wrong magic": (dict(tweak=lambda h: h.__setitem__("magic", b"xx")), "NIfTI"),
    "separate .img file": (dict(tweak=lambda h: h.__setitem__("magic", b"ni1")), ".img"),
    "quaternion that is no rotation": (dict(tweak=_big_quaternion), "orientation"),
    "NaN data offset": (dict(tweak=lambda h: h.__setitem__("vox_offset", np.nan)), "vox_offset"),
    "infinite intensity offset": (dict(tweak=_infinite_inter), "scaling"),
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_odd_nifti_headers_are_read_errors_naming_the_file(tmp_path, name, ext):
    kwargs, word = BAD_HEADERS[name]
    path = craft_nifti(tmp_path / f"odd{ext}", **kwargs)
    for reader in (read_image, read_header):
        with pytest.raises(ReadError) as info:
            reader(path)
        err = info.value
        assert err.exit_code == EXIT_DATA
        assert str(path) in err.message and word.lower() in err.message.lower(), err.message
        assert err.hint, f"{name}: no fix given"
        assert "\n" not in err.message


def test_header_repairs_print_nothing(tmp_path, capfd):
    path = craft_nifti(tmp_path / "code.nii.gz", tweak=lambda h: h.__setitem__("qform_code", 77))
    read_image(path)
    read_header(path)
    header_warnings(path)
    assert capfd.readouterr().err == ""


def test_two_d_nifti_without_slice_spacing_reads_as_one_slice(tmp_path):
    def tweak(h: nib.Nifti1Header) -> None:
        pixdim([0.7, 0.8, 0.0])(h)

    path = craft_nifti(tmp_path / "flat.nii.gz", shape=(4, 5), tweak=tweak)
    array, geo = read_image(path)
    assert array.shape == (1, 1, 5, 4)
    assert geo.shape == (1, 5, 4)
    np.testing.assert_allclose(geo.spacing[1:], (0.8, 0.7))


def test_valid_nifti_still_reads(tmp_path):
    path = craft_nifti(tmp_path / "ok.nii.gz")
    array, geo = read_image(path)
    assert array.shape == (1, 6, 5, 4) and geo.spacing == (3.0, 2.0, 1.0)
    assert header_warnings(path) == []


def test_sform_qform_disagreement_is_a_warning_not_an_error(tmp_path):
    def tweak(h: nib.Nifti1Header) -> None:
        h.set_sform(_affine(c0_3=50.0), code=2)
        h.set_qform(np.diag([1.0, 2.0, 3.0, 1.0]), code=1)

    path = craft_nifti(tmp_path / "two.nii.gz", tweak=tweak)
    _, geo = read_image(path)  # the sform wins, as in nibabel
    assert geo.origin[0] == pytest.approx(-50.0)
    (warning,) = header_warnings(path)
    assert "sform" in warning and "qform" in warning and "50" in warning


# ---------------------------------------------------------------------------- declared size
def _rss_growth(path: Path) -> dict[str, object]:
    """Read ``path`` in a fresh interpreter; report the error and the peak-RSS growth of the read alone."""
    code = f"""
import json, resource, sys
import numpy, nibabel, SimpleITK
from segpipe.io.image import read_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {{}}
try:
    read_image({str(path)!r})
except Exception as exc:
    out = {{"type": type(exc).__name__, "message": getattr(exc, "message", str(exc)), "hint": getattr(exc, "hint", None)}}
out["growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tiny_nifti_gz_claiming_1600_cubed_voxels_is_refused_before_allocating(tmp_path):
    path = craft_nifti(tmp_path / "bomb.nii.gz", shape=(1600, 1600, 1600), dtype=np.uint8, data=False)
    assert path.stat().st_size < 200
    out = _rss_growth(path)
    assert out["type"] == "ReadError", out
    assert str(path) in out["message"] and "1600" in out["message"], out
    assert out["hint"]
    assert out["growth_mb"] < 500, out


def test_uncompressed_nifti_larger_than_its_file_is_refused(tmp_path):
    path = craft_nifti(tmp_path / "short.nii", shape=(400, 400, 400), dtype=np.int16, data=False)
    with pytest.raises(ReadError, match=r"short\.nii.*\(400, 400, 400\)"):
        read_image(path)
    with pytest.raises(ReadError, match="400"):
        read_header(path)


def test_metaimage_claiming_more_voxels_than_its_file_is_refused_before_allocating(tmp_path):
    path = tmp_path / "bomb.mha"
    path.write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 1600 1600 1600\nElementType = MET_UCHAR\n"
        b"ElementSpacing = 1 1 1\nElementDataFile = LOCAL\n"
    )
    out = _rss_growth(path)
    assert out["type"] == "ReadError" and "1600" in out["message"], out
    assert out["growth_mb"] < 500, out


def test_compressed_nrrd_claiming_more_than_deflate_can_hold_is_refused(tmp_path):
    path = tmp_path / "bomb.nrrd"
    payload = gzip.compress(b"\0" * 1000)
    path.write_bytes(
        b"NRRD0004\ntype: float\ndimension: 3\nsizes: 1000 1000 1000\nspacings: 1 1 1\n"
        b"endian: little\nencoding: gzip\n\n" + payload
    )
    with pytest.raises(ReadError, match=r"bomb\.nrrd.*\(1000, 1000, 1000\)"):
        read_image(path)


def test_image_larger_than_available_memory_is_refused(tmp_path, monkeypatch):
    path = craft_nifti(tmp_path / "fine.nii.gz", shape=(20, 20, 20))
    monkeypatch.setattr(limits, "available_memory", lambda: 10_000)
    with pytest.raises(ReadError, match=r"fine\.nii\.gz.*\(20, 20, 20\).*memory") as info:
        read_image(path)
    assert "memory" in (info.value.hint or "")
    monkeypatch.undo()
    assert read_image(path)[0].shape == (1, 20, 20, 20)


def test_sitk_formats_with_zero_spacing_are_read_errors(tmp_path):
    path = tmp_path / "flat.mha"
    path.write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
        b"ElementSpacing = 0 1 1\nElementDataFile = LOCAL\n" + bytes(8)
    )
    for reader in (read_image, read_header):
        with pytest.raises(ReadError, match=r"flat\.mha: voxel spacing \(0\.0, 1\.0, 1\.0\) is zero along axis x"):
            reader(path)


def test_geometry_errors_are_data_errors():
    with pytest.raises(SegpipeError) as info:
        Geometry(shape=(2, 2, 2), spacing=(0.0, 1.0, 1.0))
    assert isinstance(info.value, ValueError)  # callers that caught ValueError keep working
    assert info.value.exit_code == EXIT_DATA


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_a_short_written_image_is_an_os_error_not_a_result(tmp_path, ext):
    """SimpleITK reports a failed NIfTI write only on stderr: the written file is checked instead."""
    import errno
    import os

    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    path = image_io.write_image(tmp_path / f"ok{ext}", arr, Geometry((4, 5, 6), (1.0, 1.0, 1.0)))
    limits.check_written(path, path, ext, arr.nbytes)  # complete: no error
    full = path.stat().st_size
    # 200 bytes short: less than the 352-byte header, so the voxel bytes alone would still "fit"
    os.truncate(path, full - (200 if ext == ".nii" else 20))
    with pytest.raises(OSError) as info:
        limits.check_written(path, path, ext, arr.nbytes)
    assert info.value.errno == errno.EIO and info.value.filename == str(path)  # the disk is not full here
