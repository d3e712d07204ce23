"""Reading and writing image volumes: NIfTI through nibabel, NRRD and MHA through SimpleITK.

Readers return ``(array[C, Z, Y, X], Geometry)``; writers take the same. Folders and ``.dcm``
files are handed to the DICOM reader. Every write is atomic: a temporary file in the target
folder, renamed over the target once complete, so no half-written file is ever left behind.

Every header is validated before a voxel is allocated: its declared size against the file
(or what its compressed stream can expand to) and the available memory, its spacing and
orientation against zero, negative, NaN, singular and sheared values, its voxel type. Each
refusal is a :class:`~segpipe.errors.ReadError` naming the file and the fix.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReadError, SegpipeError, UsageError
from ..geometry import Geometry, GeometryError
from .atomic import atomic_path

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
FORMAT_NAMES = {
    ".nii.gz": "NIfTI (gzip)",
    ".nii": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD (detached header)",
    ".mha": "MetaImage",
    ".mhd": "MetaImage (detached header)",
}

# Deflate (the compression of .nii.gz and of gzip-encoded NRRD/MetaImage data) never expands
# more than 1032:1 (zlib's documented limit), so n compressed bytes hold at most 1032·n bytes.
DEFLATE_MAX_RATIO = 1032
# An image is refused when its voxels would need more than this share of the available memory.
MEMORY_SHARE = 0.8
# Largest |cos| between two axes of a NIfTI affine still taken as perpendicular (float32 rounding).
SHEAR_TOLERANCE = 1e-3


def image_extension(path: str | os.PathLike[str]) -> str | None:
    """The recognised image extension of ``path`` (``'.nii.gz'``, ...) or None."""
    name = str(path).lower()
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return None


def is_dicom_source(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a DICOM file or a folder to read as DICOM, judged by content.

    A file counts when named ``*.dcm``/``*.dicom``/``*.ima`` or when it carries the ``DICM``
    preamble (extension-less exports); a folder when it holds DICOM files (by name or preamble)
    or no NIfTI/NRRD/MHA image at all. See :func:`segpipe.io.dicom.looks_like_dicom`.
    """
    from .dicom import looks_like_dicom

    return looks_like_dicom(path)


@dataclass(frozen=True)
class ImageHeader:
    """What a reader learns without decoding voxels."""

    path: str
    format: str
    geometry: Geometry
    channels: int
    dtype: str
    dimension: int


def _sitk() -> Any:
    import SimpleITK as sitk

    return sitk


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise ReadError(f"{path}: file not found", hint="check the path (and the dataset description)")


def _extension_or_refuse(p: Path) -> str:
    ext = image_extension(p)
    if ext is None:
        raise ReadError(
            f"{p}: unsupported file type",
            hint=f"use one of {', '.join(IMAGE_EXTENSIONS)} or a DICOM series folder",
        )
    return ext


def read_header(path: str | os.PathLike[str]) -> ImageHeader:
    """Header of a NIfTI/NRRD/MHA file: geometry, channels, dtype, without reading voxels.

    The header is validated as :func:`read_image` validates it (except against available
    memory), so a header this function accepts describes a grid segpipe can use.
    """
    p = Path(path)
    _check_exists(p)
    ext = _extension_or_refuse(p)
    if ext in (".nii", ".nii.gz"):
        info = _inspect_nifti(p, ext)
        _check_declared_size(p, info.shape, info.dtype, 1, info.stream, check_memory=False)
        dtype = _itk_type_name(info.dtype, vector=info.vector)
        return ImageHeader(str(p), FORMAT_NAMES[ext], info.geometry, info.channels, dtype, len(info.layout))
    reader = _sitk_reader(p)
    dim = reader.GetDimension()
    ncomp = reader.GetNumberOfComponents()
    size = reader.GetSize()
    channels = ncomp * (size[3] if dim >= 4 else 1)
    _check_declared_size(p, tuple(size), _sitk_dtype(reader), ncomp, _sitk_stream_limit(p, ext), check_memory=False)
    _check_sitk_spacing(p, reader)
    geometry = _valid_geometry(p, lambda: _geometry_from_reader(reader))
    dtype = _sitk().GetPixelIDValueAsString(reader.GetPixelID())
    return ImageHeader(str(p), FORMAT_NAMES[ext], geometry, int(channels), dtype, int(dim))


def _geometry_from_reader(reader: Any) -> Geometry:
    class _Proxy:  # ImageFileReader exposes the same getters as an Image.
        def GetDimension(self) -> int:
            return reader.GetDimension()

        def GetSize(self) -> tuple[int, ...]:
            return reader.GetSize()

        def GetSpacing(self) -> tuple[float, ...]:
            return reader.GetSpacing()

        def GetOrigin(self) -> tuple[float, ...]:
            return reader.GetOrigin()

        def GetDirection(self) -> tuple[float, ...]:
            return reader.GetDirection()

    return Geometry.from_sitk(_Proxy())


def _valid_geometry(p: Path, build: Callable[[], Geometry]) -> Geometry:
    """``build()``, with an impossible grid (zero/NaN spacing, NaN origin, ...) reported as a ReadError on ``p``."""
    try:
        return build()
    except GeometryError as exc:
        detail = exc.message.removeprefix("Geometry.")
        raise ReadError(
            f"{p}: the header describes an impossible voxel grid ({detail})",
            hint="correct the voxel spacing/orientation in the header, or re-export the image",
        ) from None


def read_image(path: str | os.PathLike[str], **dicom_options: Any) -> tuple[np.ndarray, Geometry]:
    """Read an image file or DICOM series as ``(array[C, Z, Y, X], Geometry)``.

    NIfTI/NRRD/MHA: 3-D images give ``C = 1``; 4-D images and vector images give one channel
    per volume/component; 2-D images are one-slice volumes. A folder or a ``.dcm`` file is read
    by :func:`segpipe.io.dicom.read_dicom` with ``dicom_options``. Voxels keep their stored dtype.

    The header is checked before any voxel is allocated: its declared size against what the
    file (or its compressed stream) can hold and against the available memory, its spacing and
    orientation for zero, negative, NaN, singular or sheared values. Every refusal is a
    :class:`ReadError` naming the file and the fix.
    """
    p = Path(path)
    _check_exists(p)
    if is_dicom_source(p):
        try:
            from .dicom import read_dicom
        except ImportError:  # pragma: no cover - the DICOM reader ships with the package
            raise ReadError(f"{p}: DICOM reading is not available in this installation") from None
        return read_dicom(p, **dicom_options)
    if dicom_options:
        raise UsageError(f"{p}: DICOM options {sorted(dicom_options)} given for a non-DICOM file")
    ext = _extension_or_refuse(p)
    if ext in (".nii", ".nii.gz"):
        return _read_nifti(p, ext)
    return _read_sitk(p, ext)


# ---------------------------------------------------------------------------- declared size
def available_memory() -> int:
    """Bytes of memory available to a new allocation now (psutil's ``available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _check_declared_size(
    p: Path,
    shape: tuple[int, ...],
    dtype: np.dtype,
    components: int,
    stream: tuple[str, int] | None,
    *,
    check_memory: bool = True,
    memory_bytes: int | None = None,
) -> None:
    """Refuse, before anything is allocated, a header declaring more voxels than the file or the memory can hold.

    ``shape`` is the header's size in the file's own axis order; ``stream`` is ``("raw", bytes)``
    for uncompressed data or ``("deflate", bytes)`` for the most a compressed stream can expand
    to; ``memory_bytes`` is what reading needs in memory (default: the stored size).
    """
    n_vox = 1
    for s in shape:
        n_vox *= int(s)
    stored = n_vox * int(components) * int(dtype.itemsize)
    size = "(" + ", ".join(str(int(s)) for s in shape) + ")"
    what = f"{p}: the header declares size {size} of {dtype.name}{'' if components == 1 else f' × {components}'} ({_bytes(stored)})"
    if stream is not None:
        kind, limit = stream
        if stored > limit:
            if kind == "raw":
                holds = f"the file holds only {_bytes(limit)} of voxel data"
            else:
                holds = (
                    f"its {_bytes(limit / DEFLATE_MAX_RATIO)} of compressed data can expand to at most {_bytes(limit)}"
                )
            raise ReadError(
                f"{what}, but {holds}", hint="the file is truncated or its header is damaged; re-export or replace it"
            )
    if check_memory:
        need = stored if memory_bytes is None else memory_bytes
        available = available_memory()
        if need > MEMORY_SHARE * available:
            raise ReadError(
                f"{what}, but reading it needs {_bytes(need)} and only {_bytes(available)} of memory is available",
                hint="free memory (fewer workers, close other programs) or crop/downsample the image; "
                "if the size is wrong, the header is damaged: re-export the file",
            )


# ---------------------------------------------------------------------------- NIfTI
@dataclass(frozen=True)
class _NiftiInfo:
    """A validated NIfTI header: the stored size, the channel layout and the grid."""

    shape: tuple[int, ...]  # the header's dims, (x, y, z, ...)
    layout: tuple[int, ...]  # the voxel array's shape once read: (x, y[, z[, c]]) or (x, y, z, 1, c)
    channels: int
    vector: bool
    dtype: np.dtype
    geometry: Geometry
    memory_bytes: int
    stream: tuple[str, int]


def _nifti_raw_header(p: Path) -> Any:
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
def _quiet_nibabel() -> Iterator[None]:
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


def _inspect_nifti(p: Path, ext: str) -> _NiftiInfo:
    """Validate the header of ``p`` (dims, voxel type, spacing, orientation, declared size vs file).

    Every fault is a :class:`ReadError` naming the file; nibabel's own exceptions on headers
    this function does not foresee become one too.
    """
    try:
        with _quiet_nibabel():
            return _inspect_nifti_header(p, ext)
    except SegpipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises HeaderDataError, ValueError, KeyError, ...
        raise ReadError(
            f"{p}: invalid NIfTI header ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})",
            hint="the header is damaged; re-export the image from its source",
        ) from None


def _inspect_nifti_header(p: Path, ext: str) -> _NiftiInfo:
    hdr = _nifti_raw_header(p)
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
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    scaled = bool(np.isfinite(slope) and slope != 0)  # NIfTI: a slope of 0 or NaN means "no scaling"
    if np.isinf(slope) or (scaled and not np.isfinite(inter)):
        raise ReadError(
            f"{p}: the header's intensity scaling (scl_slope {slope:g}, scl_inter {inter:g}) is not finite",
            hint="set scl_slope to 1 and scl_inter to 0 (or to the true scaling), or re-export the image",
        )

    n_vox = int(np.prod(shape, dtype=np.int64))
    stored = n_vox * dtype.itemsize
    memory = stored + (n_vox * max(dtype.itemsize, 4) if scaled and (slope, inter) != (1.0, 0.0) else 0)
    file_size = p.stat().st_size
    if ext == ".nii.gz":
        stream = ("deflate", max(0, DEFLATE_MAX_RATIO * file_size - int(vox_offset)))
    else:
        stream = ("raw", max(0, file_size - int(vox_offset)))
    affine, oriented = _nifti_affine(p, hdr)
    geometry = _nifti_geometry(p, affine, shape[:3])
    if not oriented:
        geometry = geometry.replace(oriented=False)
    return _NiftiInfo(shape, layout, channels, vector, dtype, geometry, memory, stream)


def _nifti_affine(p: Path, hdr: Any) -> tuple[np.ndarray, bool]:
    """The affine ``nib.load(...).affine`` gives (sform when set, else qform, else pixdim), and
    whether the header declares an orientation at all (a valid sform or qform code).

    Computed from the header with nibabel's load-time repairs applied (invalid xform codes
    dropped; what is left of pixdim, after :func:`_inspect_nifti`'s checks, is a zero along a
    one-voxel axis, which becomes 1). Without an orientation the affine is nibabel's default
    placement (the grid centred on the origin, x mirrored), not the one ITK gives the same file
    (origin 0, identity directions).
    """
    with _quiet_nibabel():
        fixed = type(hdr)(hdr.binaryblock, check=True)
        oriented = int(fixed["sform_code"]) > 0 or int(fixed["qform_code"]) > 0
        try:
            return np.asarray(fixed.get_best_affine(), dtype=float), oriented
        except ValueError as exc:  # e.g. a quaternion that is not a rotation
            raise ReadError(
                f"{p}: the header's orientation cannot be computed ({exc})",
                hint="correct the sform/qform in the header, or re-export the image",
            ) from None


def _nifti_geometry(p: Path, affine: np.ndarray, shape_xyz: tuple[int, ...]) -> Geometry:
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
    return _valid_geometry(p, lambda: Geometry.from_nifti_affine(a, shape3))


def header_warnings(path: str | os.PathLike[str]) -> list[str]:
    """Header oddities that do not stop reading but deserve a look (NIfTI: sform and qform disagree).

    Empty for other formats and for headers that cannot be read (reading reports those).
    """
    p = Path(path)
    if image_extension(p) not in (".nii", ".nii.gz") or not p.is_file():
        return []
    try:
        hdr = _nifti_raw_header(p)
        if int(hdr["sform_code"]) <= 0 or int(hdr["qform_code"]) <= 0:
            return []
        shape = tuple(int(d) for d in hdr["dim"][1 : int(hdr["dim"][0]) + 1])[:3]
        with _quiet_nibabel():
            sform, qform = hdr.get_sform(), hdr.get_qform()
        s_geo = _nifti_geometry(p, sform, shape)
        q_geo = _nifti_geometry(p, qform, shape)
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
        info = _inspect_nifti(p, ext)
    except SegpipeError:
        return None
    if info.geometry.oriented:
        return None
    return (
        "no orientation in the header (qform and sform codes 0): nibabel centres the image with x mirrored, "
        "ITK puts it at the origin; segpipe writes results the same way, so each tool overlays them on the image"
    )


def _itk_type_name(dtype: np.dtype, *, vector: bool) -> str:
    """SimpleITK's name of a voxel type ("16-bit signed integer"), as ``read_header`` reports it."""
    try:
        sitk = _sitk()
        image = sitk.GetImageFromArray(np.zeros((1, 1, 2) if vector else (1, 1), dtype=dtype), isVector=vector)
        return str(sitk.GetPixelIDValueAsString(image.GetPixelID()))
    except Exception:  # noqa: BLE001 - a name for display only
        return dtype.name


def _read_nifti(p: Path, ext: str) -> tuple[np.ndarray, Geometry]:
    """NIfTI through nibabel, after the header passed :func:`_inspect_nifti`.

    nibabel, not SimpleITK, because ITK's NIfTI reader silently replaces NaN voxels by 0 and
    zero-fills truncated .nii.gz files — both faults `segpipe check` must see. The affine is
    nibabel's choice (sform when set, else qform), converted from RAS to LPS.
    """
    import nibabel as nib

    info = _inspect_nifti(p, ext)
    _check_declared_size(p, info.shape, info.dtype, 1, info.stream, memory_bytes=info.memory_bytes)
    try:
        with _quiet_nibabel():
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


# ---------------------------------------------------------------------------- NRRD, MetaImage
def _sitk_reader(p: Path) -> Any:
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ReadError(
            f"{p}: cannot read header ({_short(exc)})", hint="the file is damaged or not an image; re-export it"
        ) from None
    return reader


def _check_sitk_spacing(p: Path, reader: Any) -> None:
    """Refuse zero, negative or NaN spacing and NaN origin/direction, in the file's own (x, y, z) order."""
    spacing = tuple(float(v) for v in reader.GetSpacing())
    bad = [i for i, v in enumerate(spacing) if not (np.isfinite(v) and v > 0)]
    if bad:
        v = spacing[bad[0]]
        why = "not a number" if not np.isfinite(v) else ("zero" if v == 0 else "negative")
        raise ReadError(
            f"{p}: voxel spacing {spacing} is {why} along axis {'xyzt'[bad[0]]}",
            hint="write the true voxel size into the header, or re-export the image",
        )
    if not (np.all(np.isfinite(reader.GetOrigin())) and np.all(np.isfinite(reader.GetDirection()))):
        raise ReadError(
            f"{p}: the header's origin or direction holds NaN or infinite values",
            hint="correct the origin/direction in the header, or re-export the image",
        )


def _sitk_dtype(reader: Any) -> np.dtype:
    """numpy dtype of one voxel component of the image ``reader`` describes."""
    sitk = _sitk()
    try:
        probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
        return sitk.GetArrayViewFromImage(probe).dtype
    except Exception:  # noqa: BLE001 - unusual pixel types: assume the widest
        return np.dtype(np.float64)


def _sitk_stream_limit(p: Path, ext: str) -> tuple[str, int] | None:
    """``("raw"|"deflate", most voxel bytes)`` the data of an NRRD/MetaImage file can hold; None when unknown."""
    try:
        with open(p, "rb") as f:
            text = f.read(65536).decode("latin-1")
    except OSError:
        return None
    fields: dict[str, str] = {}
    if ext in (".nrrd", ".nhdr"):
        for line in text.split("\n")[1:]:
            line = line.rstrip("\r")
            if not line:
                break  # a blank line ends the header
            key, sep, value = line.partition(":")
            if sep and not line.startswith("#") and not value.startswith("="):
                fields[key.strip().lower()] = value.strip()
        encoding = fields.get("encoding", "raw").lower()
        data_file = fields.get("data file") or fields.get("datafile")
    else:
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                fields[key.strip().lower()] = value.strip()
                if key.strip().lower() == "elementdatafile":
                    break
        encoding = "gzip" if fields.get("compresseddata", "false").lower() == "true" else "raw"
        data_file = fields.get("elementdatafile")
        if data_file is not None and data_file.upper() == "LOCAL":
            data_file = None
    if data_file:
        if " " in data_file or "%" in data_file or data_file.upper().startswith("LIST"):
            return None  # several data files
        target = p.parent / data_file
        if not target.is_file():
            return None  # the reader reports the missing file
        payload = target.stat().st_size
    else:
        payload = p.stat().st_size
    if encoding == "raw":
        return ("raw", payload)
    if encoding in ("gzip", "gz"):
        return ("deflate", DEFLATE_MAX_RATIO * payload)
    return None  # bzip2, text, hex: no cheap bound


def _read_sitk(p: Path, ext: str) -> tuple[np.ndarray, Geometry]:
    """NRRD/MetaImage through SimpleITK; the header is validated before the voxels are read."""
    sitk = _sitk()
    reader = _sitk_reader(p)
    dim = reader.GetDimension()
    ncomp = reader.GetNumberOfComponents()
    if dim not in (2, 3, 4):
        raise ReadError(f"{p}: {dim}-D images are not supported", hint="segpipe reads 2-D, 3-D and 4-D images")
    if dim == 4 and ncomp != 1:
        raise ReadError(f"{p}: 4-D vector images are not supported", hint="store one channel per file")
    dtype = _sitk_dtype(reader)
    if dtype.kind not in "biuf":
        raise ReadError(
            f"{p}: voxel type {sitk.GetPixelIDValueAsString(reader.GetPixelID())} is not supported",
            hint="store real-valued grey levels (one file per channel)",
        )
    _check_declared_size(p, tuple(reader.GetSize()), dtype, ncomp, _sitk_stream_limit(p, ext))
    _check_sitk_spacing(p, reader)
    geometry = _valid_geometry(p, lambda: _geometry_from_reader(reader))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ReadError(
            f"{p}: cannot read ({_short(exc)})",
            hint="the file is truncated or not a valid image; re-export or replace it",
        ) from None
    array = sitk.GetArrayFromImage(image)
    if dim == 2:
        array = array[None, None] if ncomp == 1 else np.moveaxis(array, -1, 0)[:, None]
    elif dim == 3:
        array = array[None] if ncomp == 1 else np.moveaxis(array, -1, 0)
    # 4-D: SimpleITK gives (t, z, y, x), channels first already.
    return np.ascontiguousarray(array), geometry


def write_image(
    path: str | os.PathLike[str],
    array: np.ndarray,
    geometry: Geometry,
    *,
    compress: bool = True,
) -> Path:
    """Write ``array`` ([C, Z, Y, X] or [Z, Y, X]) with ``geometry`` atomically; returns the path.

    One channel gives a 3-D image; several give a 4-D NIfTI or a vector NRRD/MHA. Booleans are
    stored as uint8. The grid of a NIfTI read without orientation (``geometry.oriented`` False)
    is written as a NIfTI without orientation too (qform and sform codes 0, through nibabel), so
    that nibabel and ITK each place the result where they place the source; any other grid is
    written with its orientation (SimpleITK).
    """
    target = Path(path)
    ext = image_extension(target)
    if ext is None or ext in (".nhdr", ".mhd"):
        raise UsageError(
            f"{target}: cannot write this file type",
            hint="write .nii.gz, .nii, .nrrd or .mha",
        )
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise UsageError(f"{target}: expected an array [C, Z, Y, X] or [Z, Y, X], got shape {arr.shape}")
    if tuple(arr.shape[1:]) != geometry.shape:
        raise UsageError(f"{target}: array shape {arr.shape[1:]} does not match geometry shape {geometry.shape}")
    if ext in (".nii", ".nii.gz") and not geometry.oriented:
        header = _unoriented_nifti_header(arr, geometry)
        if header is not None:  # the source's own grid: written as the source was, without orientation
            _write_unoriented_nifti(target, ext, arr, header)
            return target
    sitk = _sitk()
    if arr.shape[0] == 1:
        image = geometry.to_sitk(arr[0])
    elif ext in (".nii", ".nii.gz"):
        vols = [geometry.to_sitk(c) for c in arr]
        image = sitk.JoinSeries(vols)
        image.SetOrigin(tuple(geometry.origin) + (0.0,))
        image.SetSpacing(tuple(geometry.sitk_spacing) + (1.0,))
        d4 = np.eye(4)
        d4[:3, :3] = geometry.direction_matrix
        image.SetDirection(tuple(d4.ravel()))
    else:
        image = sitk.GetImageFromArray(np.moveaxis(arr, 0, -1), isVector=True)
        geometry.apply_to_sitk(image)
    with atomic_path(target, ext=ext) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress and ext != ".nii")
        _check_written(tmp, target, ext, int(arr.nbytes))
    return target


def _unoriented_nifti_header(arr: np.ndarray, geometry: Geometry) -> Any | None:
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
    with _quiet_nibabel():
        base = Geometry.from_nifti_affine(header.get_base_affine(), shape_xyz)
    same = (
        np.allclose(base.spacing, geometry.spacing, rtol=1e-6, atol=0)
        and np.allclose(base.origin, geometry.origin, rtol=0, atol=1e-4)
        and np.allclose(base.direction, geometry.direction, rtol=0, atol=1e-6)
    )
    return header if same else None


def _write_unoriented_nifti(target: Path, ext: str, arr: np.ndarray, header: Any) -> None:
    """Write ``arr`` [C, Z, Y, X] atomically with ``header`` (no orientation) through nibabel
    (SimpleITK always writes an orientation)."""
    import nibabel as nib

    data = arr[0].transpose(2, 1, 0) if arr.shape[0] == 1 else arr.transpose(3, 2, 1, 0)  # -> (x, y, z[, c])
    image = nib.Nifti1Image(np.ascontiguousarray(data), None, header=header, dtype=arr.dtype)
    image.header.set_qform(None, code=0)  # nibabel fills both from the affine unless told
    image.header.set_sform(None, code=0)
    with atomic_path(target, ext=ext) as tmp:
        with _quiet_nibabel():
            nib.save(image, str(tmp))
        _check_written(tmp, target, ext, int(arr.nbytes))


def _check_written(tmp: Path, target: Path, ext: str, data_bytes: int) -> None:
    """Raise ``OSError`` unless ``tmp`` holds the whole image.

    SimpleITK's NIfTI writer reports a failed write (a full disk, a quota) only on stderr and
    returns normally, leaving a short file that would be renamed into place as a finished result:
    a compressed file is read to its end (a truncated gzip stream fails), an uncompressed one must
    hold at least the voxel bytes.
    """
    import gzip
    import shutil

    problem = None
    if ext.endswith(".gz"):
        try:
            with gzip.open(tmp, "rb") as f:
                total = 0
                while chunk := f.read(1 << 22):
                    total += len(chunk)
            if total < data_bytes:
                problem = f"holds {total} of at least {data_bytes} bytes"
        except (OSError, EOFError) as exc:
            problem = f"is incomplete ({exc})"
    elif ext == ".nii" or not tmp.stat().st_size:
        size, need = tmp.stat().st_size, data_bytes
        if ext == ".nii" and size >= 4:  # the voxels start at the header's vox_offset
            with open(tmp, "rb") as f:
                head = f.read(176)
            sizeof_hdr = struct.unpack("<i", head[:4])[0]
            if sizeof_hdr == 348 and len(head) >= 112:
                need += int(struct.unpack("<f", head[108:112])[0])
            elif sizeof_hdr == 540 and len(head) >= 176:
                need += int(struct.unpack("<q", head[168:176])[0])
        if size < need:
            problem = f"holds {size} of at least {need} bytes"
    if problem is None:
        return
    if shutil.disk_usage(tmp.parent).free < data_bytes:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    raise OSError(errno.EIO, f"the image written {problem}", str(target))


def _short(exc: BaseException) -> str:
    """The informative last line of a (long, multi-line) SimpleITK/ITK exception."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Description:" in ln:
            return ln.split("Description:", 1)[1].strip()
    return lines[-1][:200] if lines else type(exc).__name__
