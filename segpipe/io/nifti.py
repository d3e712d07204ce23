"""NIfTI-1/2 through nibabel, every header validated before a voxel is read: its dimensions,
voxel type, spacing, orientation (sform/qform) and declared size. nibabel, not SimpleITK, reads the
voxels, because ITK's NIfTI reader silently replaces NaN voxels by 0 and zero-fills truncated
``.nii.gz`` files. A NIfTI without orientation (qform and sform codes 0) is written back the same
way (:func:`write_unoriented_nifti`)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import ReadError, SegpipeError
from ..geometry import Geometry
from .atomic import atomic_path
from .formats import image_extension
from .limits import DEFLATE_MAX_RATIO, check_declared_size, check_written, valid_geometry

# Largest |cos| between two axes of a NIfTI affine still taken as perpendicular (float32 rounding).
SHEAR_TOLERANCE = 1e-3


@dataclass(frozen=True)
class NiftiInfo:
    """A validated NIfTI header: the stored size, the channel layout and the grid."""

    shape: tuple[int, ...]  # the header's dims, (x, y, z, ...)
    layout: tuple[int, ...]  # the voxel array's shape once read: (x, y[, z[, c]]) or (x, y, z, 1, c)
    channels: int
    vector: bool
    dtype: np.dtype
    geometry: Geometry
    memory_bytes: int
    stream: tuple[str, int]


def nifti_raw_header(p: Path) -> Any:
    """The NIfTI-1/2 header of ``p`` exactly as stored.

    nibabel's loader silently "repairs" zero or negative pixdim (to 1 or to its absolute value),
    which would hide the faults segpipe must report, so the header is parsed without checks.
    Reading a case asks for the same header twice (validation, then warnings): the last few
    are kept, keyed by path, size and modification time, and handed out as copies.
    """
    try:
        st = p.stat()
    except OSError:
        return _parse_nifti_header(str(p), -1, -1).copy()
    return _parse_nifti_header(str(p), st.st_size, st.st_mtime_ns).copy()


@lru_cache(maxsize=8)
def _parse_nifti_header(path: str, size: int, mtime_ns: int) -> Any:
    import nibabel as nib

    p = Path(path)
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(p)) as f:
            block = f.read(540)
    except Exception as exc:  # OSError, EOFError, zlib.error, gzip.BadGzipFile, ...
        raise ReadError(
            f"{p}: cannot read the NIfTI header ({type(exc).__name__}: {str(exc)[:120]})",
            hint="the file is damaged or not a NIfTI image; re-export or replace it",
        ) from None
    header_class: Any = None
    size = 0
    if len(block) >= 4:
        for endian in "<>":
            size = struct.unpack(f"{endian}i", block[:4])[0]
            if size in (348, 540):
                header_class = nib.Nifti1Header if size == 348 else nib.Nifti2Header
                break
    if header_class is None or len(block) < size:
        raise ReadError(
            f"{p}: not a NIfTI file (no valid NIfTI header in its first {len(block)} bytes)",
            hint="the file is truncated or not a NIfTI image; re-export it or name it after its format",
        )
    try:
        return header_class(block[:size], check=False)
    except Exception as exc:
        raise ReadError(
            f"{p}: cannot parse the NIfTI header ({type(exc).__name__}: {str(exc)[:120]})",
            hint="the file is damaged; re-export or replace it",
        ) from None


@contextmanager
def quiet_nibabel() -> Iterator[None]:
    """Silence nibabel's header-repair log lines; segpipe reports header faults itself.

    (nibabel's own ``LoggingOutputSuppressor`` drops its handler for good and lets the lines
    reach Python's last-resort stderr handler instead.)
    """
    import nibabel.imageglobals

    logger = nibabel.imageglobals.logger
    was = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was


def inspect_nifti(p: Path, ext: str) -> NiftiInfo:
    """Validate the header of ``p`` (dims, voxel type, spacing, orientation, declared size vs file).

    Every fault is a :class:`ReadError` naming the file; nibabel's own exceptions on headers
    this function does not foresee become one too.
    """
    try:
        with quiet_nibabel():
            return _inspect_nifti_header(p, ext)
    except SegpipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises HeaderDataError, ValueError, KeyError, ...
        raise ReadError(
            f"{p}: invalid NIfTI header ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})",
            hint="the header is damaged; re-export the image from its source",
        ) from None


class _Layout(NamedTuple):
    """The size a NIfTI header declares and how its voxels are laid out as channels."""

    shape: tuple[int, ...]  # the header's dims, (x, y, z, ...)
    layout: tuple[int, ...]  # the voxel array's shape once read
    vector: bool  # a NIfTI vector image, (x, y, z, 1, c)
    channels: int


def _inspect_nifti_header(p: Path, ext: str) -> NiftiInfo:
    hdr = nifti_raw_header(p)
    vox_offset = _voxel_offset(p, hdr)
    shape, layout, vector, channels = _voxel_layout(p, hdr)
    dtype = _voxel_dtype(p, hdr)
    _check_spacing_and_orientation(p, hdr, shape)
    slope, inter, scaled = _intensity_scaling(p, hdr)

    n_vox = int(np.prod(shape, dtype=np.int64))
    stored = n_vox * dtype.itemsize
    memory = stored + (n_vox * max(dtype.itemsize, 4) if scaled and (slope, inter) != (1.0, 0.0) else 0)
    file_size = p.stat().st_size
    if ext == ".nii.gz":
        stream = ("deflate", max(0, DEFLATE_MAX_RATIO * file_size - int(vox_offset)))
    else:
        stream = ("raw", max(0, file_size - int(vox_offset)))
    affine, oriented = _nifti_affine(p, hdr)
    geometry = nifti_geometry(p, affine, shape[:3])
    if not oriented:
        geometry = geometry.replace(oriented=False)
    return NiftiInfo(shape, layout, channels, vector, dtype, geometry, memory, stream)


def _voxel_offset(p: Path, hdr: Any) -> float:
    """Where the voxels start in a single-file NIfTI (vox_offset), refusing a separate .img file or an
    offset inside the header."""
    magic = bytes(hdr["magic"]).rstrip(b"\0")
    if magic not in (b"n+1", b"n+2"):
        detail = (
            "the header puts the voxels in a separate .img file" if magic in (b"ni1", b"ni2") else f"magic {magic!r}"
        )
        raise ReadError(
            f"{p}: not a single-file NIfTI image ({detail})",
            hint="convert it to a single .nii/.nii.gz file (e.g. with nibabel or SimpleITK)",
        )
    vox_offset = float(hdr["vox_offset"])
    minimum = int(hdr["sizeof_hdr"]) + 4
    if not np.isfinite(vox_offset) or vox_offset < minimum:
        raise ReadError(
            f"{p}: the header's data offset (vox_offset {vox_offset:g}) is invalid (at least {minimum})",
            hint="the header is damaged; re-export the image from its source",
        )
    return vox_offset


def _voxel_layout(p: Path, hdr: Any) -> _Layout:
    """The declared size and its channel layout, refusing empty axes and images beyond 4-D (or 5-D vectors)."""
    dims = [int(d) for d in hdr["dim"]]
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        raise ReadError(
            f"{p}: the header declares {ndim} dimensions (NIfTI allows 1 to 7)",
            hint="the header is damaged; re-export the file",
        )
    shape = tuple(dims[1 : ndim + 1])
    if min(shape) < 1:
        raise ReadError(
            f"{p}: the header declares size {shape}, with an empty axis",
            hint="the image holds no voxels; re-export or remove the file",
        )
    layout = shape
    while len(layout) > 4 and layout[-1] == 1:  # (x, y, z, t, 1, 1) is (x, y, z, t)
        layout = layout[:-1]
    vector = len(layout) == 5 and layout[3] == 1  # NIfTI vector images: (x, y, z, 1, c)
    if len(layout) < 2 or (len(layout) > 4 and not vector):
        raise ReadError(
            f"{p}: {len(shape)}-D image of size {shape} is not supported",
            hint="segpipe reads 2-D, 3-D and 4-D images (one channel per volume); split the file",
        )
    channels = layout[4] if vector else (layout[3] if len(layout) == 4 else 1)
    return _Layout(shape, layout, vector, channels)


def _voxel_dtype(p: Path, hdr: Any) -> np.dtype:
    """The voxel type the header declares, refusing unknown codes and types that are not real numbers."""
    try:
        dtype = hdr.get_data_dtype()
    except Exception:  # noqa: BLE001 - nibabel: KeyError/HeaderDataError for unknown codes
        raise ReadError(
            f"{p}: unknown voxel type code {int(hdr['datatype'])} in the header",
            hint="the header is damaged; re-export the image from its source",
        ) from None
    if dtype.fields is not None or dtype.kind not in "biuf":
        label = hdr.get_value_label("datatype")
        raise ReadError(
            f"{p}: voxel type {label} (datatype code {int(hdr['datatype'])}) is not supported",
            hint="store real-valued grey levels (one file per channel; RGB as three channels)",
        )
    return dtype


def _check_spacing_and_orientation(p: Path, hdr: Any, shape: tuple[int, ...]) -> None:
    """Refuse a voxel spacing (pixdim) that is not a positive number, and a qform or sform holding NaN
    or infinite values."""
    pixdim = [float(v) for v in hdr["pixdim"][1:4]]
    for axis, (n, v) in enumerate(zip(shape[:3], pixdim)):
        if np.isfinite(v) and (v > 0 or (v == 0 and n == 1)):
            continue  # an unused spacing of zero along a one-voxel axis is harmless
        why = "not a number" if not np.isfinite(v) else ("zero" if v == 0 else "negative")
        raise ReadError(
            f"{p}: voxel spacing (pixdim) {tuple(pixdim[: len(shape[:3])])} is {why} along axis {'xyz'[axis]}",
            hint="write the true voxel size into the header (pixdim) or re-export the image",
        )
    if int(hdr["qform_code"]) > 0:
        quatern = [
            float(hdr[k]) for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")
        ]
        if not np.all(np.isfinite(quatern)):
            raise ReadError(
                f"{p}: the header's qform (quaternion orientation) holds NaN or infinite values",
                hint="correct the qform (or set qform_code to 0), or re-export the image",
            )
    if int(hdr["sform_code"]) > 0:
        srows = np.stack([np.asarray(hdr[k], dtype=float) for k in ("srow_x", "srow_y", "srow_z")])
        if not np.all(np.isfinite(srows)):
            raise ReadError(
                f"{p}: the header's sform affine holds NaN or infinite values",
                hint="correct the sform (or set sform_code to 0), or re-export the image",
            )


def _intensity_scaling(p: Path, hdr: Any) -> tuple[float, float, bool]:
    """The header's intensity scaling (scl_slope, scl_inter) and whether it applies, refusing
    infinite values."""
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    scaled = bool(np.isfinite(slope) and slope != 0)  # NIfTI: a slope of 0 or NaN means "no scaling"
    if np.isinf(slope) or (scaled and not np.isfinite(inter)):
        raise ReadError(
            f"{p}: the header's intensity scaling (scl_slope {slope:g}, scl_inter {inter:g}) is not finite",
            hint="set scl_slope to 1 and scl_inter to 0 (or to the true scaling), or re-export the image",
        )
    return slope, inter, scaled


def _nifti_affine(p: Path, hdr: Any) -> tuple[np.ndarray, bool]:
    """The affine ``nib.load(...).affine`` gives (sform when set, else qform, else pixdim), and
    whether the header declares an orientation at all (a valid sform or qform code).

    Computed from the header with nibabel's load-time repairs applied (invalid xform codes
    dropped; what is left of pixdim, after :func:`inspect_nifti`'s checks, is a zero along a
    one-voxel axis, which becomes 1). Without an orientation the affine is nibabel's default
    placement (the grid centred on the origin, x mirrored), not the one ITK gives the same file
    (origin 0, identity directions).
    """
    with quiet_nibabel():
        fixed = type(hdr)(hdr.binaryblock, check=True)
        oriented = int(fixed["sform_code"]) > 0 or int(fixed["qform_code"]) > 0
        try:
            return np.asarray(fixed.get_best_affine(), dtype=float), oriented
        except ValueError as exc:  # e.g. a quaternion that is not a rotation
            raise ReadError(
                f"{p}: the header's orientation cannot be computed ({exc})",
                hint="correct the sform/qform in the header, or re-export the image",
            ) from None


def nifti_geometry(p: Path, affine: np.ndarray, shape_xyz: tuple[int, ...]) -> Geometry:
    """Geometry from a NIfTI affine, refusing NaN, zero, singular and sheared affines with a ReadError."""
    a = np.array(affine, dtype=float)
    shape3 = tuple(shape_xyz) + (1,) * (3 - len(shape_xyz))
    where = f"{p}: the header's affine"
    fix = "correct the sform/qform in the header, or re-export the image from its source"
    if not np.all(np.isfinite(a)):
        raise ReadError(f"{where} holds NaN or infinite values", hint=fix)
    m = a[:3, :3]
    zooms = np.linalg.norm(m, axis=0)
    for j in range(3):
        if zooms[j] > 0:
            continue
        others = [k for k in range(3) if k != j]
        if shape3[j] == 1 and all(zooms[k] > 0 for k in others):  # one-voxel axis: 1 mm, perpendicular
            # right-handed: column j = (column j+1) x (column j+2), cyclically; for j = 1 that is -(c0 x c2)
            normal = np.cross(m[:, others[0]], m[:, others[1]])
            if np.linalg.norm(normal) > 0:
                m[:, j] = normal / np.linalg.norm(normal) * (1 if j != 1 else -1)
                zooms[j] = 1.0
                continue
        raise ReadError(f"{where} gives zero voxel spacing along axis {'xyz'[j]} (column {j} is zero)", hint=fix)
    direction = m / zooms
    if abs(np.linalg.det(direction)) < 1e-6:
        raise ReadError(f"{where} is singular: two voxel axes point the same way", hint=fix)
    cosines = np.abs(direction.T @ direction - np.eye(3))
    if cosines.max() > SHEAR_TOLERANCE:
        raise ReadError(
            f"{where} is sheared: voxel axes are not perpendicular (|cos| up to {cosines.max():.3g})",
            hint="resample the image onto a grid with perpendicular axes, or correct the sform/qform",
        )
    a[:3, :3] = m
    return valid_geometry(p, lambda: Geometry.from_nifti_affine(a, shape3))


def header_warnings(path: str | os.PathLike[str]) -> list[str]:
    """Header oddities that do not stop reading but deserve a look (NIfTI: sform and qform disagree).

    Empty for other formats and for headers that cannot be read (reading reports those).
    """
    p = Path(path)
    if image_extension(p) not in (".nii", ".nii.gz") or not p.is_file():
        return []
    try:
        hdr = nifti_raw_header(p)
        if int(hdr["sform_code"]) <= 0 or int(hdr["qform_code"]) <= 0:
            return []
        shape = tuple(int(d) for d in hdr["dim"][1 : int(hdr["dim"][0]) + 1])[:3]
        with quiet_nibabel():
            sform, qform = hdr.get_sform(), hdr.get_qform()
        s_geo = nifti_geometry(p, sform, shape)
        q_geo = nifti_geometry(p, qform, shape)
    except Exception:  # noqa: BLE001 - reading the image reports what is wrong with the header
        return []
    diff = s_geo.differences(q_geo, check_shape=False, names=("sform", "qform"))
    if not diff:
        return []
    return [
        f"sform and qform describe different grids ({'; '.join(diff)}); segpipe uses the sform, "
        "tools that prefer the qform (ITK, SimpleITK) place the image elsewhere"
    ]


#: what `segpipe check` advises for a NIfTI without orientation
NO_ORIENTATION_FIX = (
    "if the image must line up with other scans, write the scanner orientation into its header "
    "(convert the original DICOM again, e.g. with dcm2niix)"
)


def no_orientation_warning(path: str | os.PathLike[str]) -> str | None:
    """A warning when ``path`` is a NIfTI whose header declares no orientation (qform and sform codes 0).

    None for other files, for oriented headers and for headers that cannot be read (reading
    reports those).
    """
    p = Path(path)
    ext = image_extension(p)
    if ext not in (".nii", ".nii.gz") or not p.is_file():
        return None
    try:
        info = inspect_nifti(p, ext)
    except SegpipeError:
        return None
    if info.geometry.oriented:
        return None
    return (
        "no orientation in the header (qform and sform codes 0): nibabel centres the image with x mirrored, "
        "ITK puts it at the origin; segpipe writes results the same way, so each tool overlays them on the image"
    )


def read_nifti(p: Path, ext: str) -> tuple[np.ndarray, Geometry]:
    """NIfTI through nibabel, after the header passed :func:`inspect_nifti`.

    nibabel, not SimpleITK, because ITK's NIfTI reader silently replaces NaN voxels by 0 and
    zero-fills truncated .nii.gz files — both faults `segpipe check` must see. The affine is
    nibabel's choice (sform when set, else qform), converted from RAS to LPS.
    """
    import nibabel as nib

    info = inspect_nifti(p, ext)
    check_declared_size(p, info.shape, info.dtype, 1, info.stream, memory_bytes=info.memory_bytes)
    try:
        with quiet_nibabel():
            img: Any = nib.load(str(p))
            data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        raise ReadError(
            f"{p}: cannot read ({type(exc).__name__}: {' '.join(str(exc).split())[:160] or 'truncated data'})",
            hint="the file is truncated or not a valid NIfTI image; re-export or replace it",
        ) from None
    data = data.reshape(info.layout)
    if info.vector:
        data = data[:, :, :, 0, :]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 3:
        data = data[..., None]
    # (x, y, z, c) -> (c, z, y, x)
    return np.ascontiguousarray(data.transpose(3, 2, 1, 0)), info.geometry


def unoriented_nifti_header(arr: np.ndarray, geometry: Geometry) -> Any | None:
    """The NIfTI header (qform and sform codes 0) of ``arr`` [C, Z, Y, X] when ``geometry`` is the
    grid every reader gives such a header (nibabel's default placement of its shape and voxel
    size); None when the grid lies elsewhere (cropped, resampled) and needs an orientation."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(arr.dtype)
    shape_xyz = tuple(reversed(arr.shape[1:]))
    header.set_data_shape(shape_xyz if arr.shape[0] == 1 else (*shape_xyz, arr.shape[0]))
    header.set_zooms(geometry.sitk_spacing if arr.shape[0] == 1 else (*geometry.sitk_spacing, 1.0))
    header.set_xyzt_units("mm")
    header.set_qform(None, code=0)
    header.set_sform(None, code=0)
    with quiet_nibabel():
        base = Geometry.from_nifti_affine(header.get_base_affine(), shape_xyz)
    same = (
        np.allclose(base.spacing, geometry.spacing, rtol=1e-6, atol=0)
        and np.allclose(base.origin, geometry.origin, rtol=0, atol=1e-4)
        and np.allclose(base.direction, geometry.direction, rtol=0, atol=1e-6)
    )
    return header if same else None


def write_unoriented_nifti(target: Path, ext: str, arr: np.ndarray, header: Any) -> None:
    """Write ``arr`` [C, Z, Y, X] atomically with ``header`` (no orientation) through nibabel
    (SimpleITK always writes an orientation)."""
    import nibabel as nib

    data = arr[0].transpose(2, 1, 0) if arr.shape[0] == 1 else arr.transpose(3, 2, 1, 0)  # -> (x, y, z[, c])
    image = nib.Nifti1Image(np.ascontiguousarray(data), None, header=header, dtype=arr.dtype)
    image.header.set_qform(None, code=0)  # nibabel fills both from the affine unless told
    image.header.set_sform(None, code=0)
    with atomic_path(target, ext=ext) as tmp:
        with quiet_nibabel():
            nib.save(image, str(tmp))
        check_written(tmp, target, ext, int(arr.nbytes))
