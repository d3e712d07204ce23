"""Reading and writing image volumes (NIfTI, NRRD, MHA) through SimpleITK.

Readers return ``(array[C, Z, Y, X], Geometry)``; writers take the same. Folders and ``.dcm``
files are handed to the DICOM reader. Every write is atomic: a temporary file in the target
folder, renamed over the target once complete, so no half-written file is ever left behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReadError, UsageError
from ..geometry import Geometry
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


def image_extension(path: str | os.PathLike[str]) -> str | None:
    """The recognised image extension of ``path`` (``'.nii.gz'``, ...) or None."""
    name = str(path).lower()
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return None


def is_dicom_source(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder (a DICOM series) or a ``.dcm`` file."""
    p = Path(path)
    return p.is_dir() or p.suffix.lower() == ".dcm"


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


def read_header(path: str | os.PathLike[str]) -> ImageHeader:
    """Header of a NIfTI/NRRD/MHA file: geometry, channels, dtype, without reading voxels."""
    p = Path(path)
    _check_exists(p)
    ext = image_extension(p)
    if ext is None:
        raise ReadError(
            f"{p}: unsupported file type",
            hint=f"use one of {', '.join(IMAGE_EXTENSIONS)} or a DICOM series folder",
        )
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ReadError(f"{p}: cannot read header ({_short(exc)})", hint="the file is damaged or not an image; re-export it") from None
    dim = reader.GetDimension()
    ncomp = reader.GetNumberOfComponents()
    size = reader.GetSize()
    channels = ncomp * (size[3] if dim >= 4 else 1)
    geometry = _geometry_from_reader(reader)
    dtype = sitk.GetPixelIDValueAsString(reader.GetPixelID())
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


def read_image(path: str | os.PathLike[str], **dicom_options: Any) -> tuple[np.ndarray, Geometry]:
    """Read an image file or DICOM series as ``(array[C, Z, Y, X], Geometry)``.

    NIfTI/NRRD/MHA are read with SimpleITK: 3-D images give ``C = 1``; 4-D images and vector
    images give one channel per volume/component; 2-D images are one-slice volumes. A folder or
    a ``.dcm`` file is read by :func:`segpipe.io.dicom.read_dicom` with ``dicom_options``.
    Voxels keep their stored dtype.
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
    ext = image_extension(p)
    if ext is None:
        raise ReadError(
            f"{p}: unsupported file type",
            hint=f"use one of {', '.join(IMAGE_EXTENSIONS)} or a DICOM series folder",
        )
    if ext in (".nii", ".nii.gz"):
        return _read_nifti(p)
    sitk = _sitk()
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise ReadError(
            f"{p}: cannot read ({_short(exc)})",
            hint="the file is truncated or not a valid image; re-export or replace it",
        ) from None
    geometry = Geometry.from_sitk(image)
    array = sitk.GetArrayFromImage(image)
    dim = image.GetDimension()
    ncomp = image.GetNumberOfComponentsPerPixel()
    if dim == 2:
        array = array[None, None] if ncomp == 1 else np.moveaxis(array, -1, 0)[:, None]
    elif dim == 3:
        array = array[None] if ncomp == 1 else np.moveaxis(array, -1, 0)
    elif dim == 4:
        if ncomp != 1:
            raise ReadError(f"{p}: 4-D vector images are not supported", hint="store one channel per file")
        # SimpleITK gives (t, z, y, x) for 4-D: channels first already.
    else:
        raise ReadError(f"{p}: {dim}-D images are not supported", hint="segpipe reads 2-D, 3-D and 4-D images")
    return np.ascontiguousarray(array), geometry


def _read_nifti(p: Path) -> tuple[np.ndarray, Geometry]:
    """NIfTI through nibabel.

    nibabel, not SimpleITK, because ITK's NIfTI reader silently replaces NaN voxels by 0 and
    zero-fills truncated .nii.gz files — both faults `segpipe check` must see. The affine is
    nibabel's choice (sform when set, else qform), converted from RAS to LPS.
    """
    import nibabel as nib

    try:
        img = nib.load(str(p))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        raise ReadError(
            f"{p}: cannot read ({type(exc).__name__}: {str(exc)[:160] or 'truncated data'})",
            hint="the file is truncated or not a valid NIfTI image; re-export or replace it",
        ) from None
    shape = data.shape
    if data.ndim == 5 and shape[3] == 1:  # NIfTI vector images: (x, y, z, 1, c)
        data = data[:, :, :, 0, :]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise ReadError(f"{p}: {len(shape)}-D images are not supported", hint="segpipe reads 2-D, 3-D and 4-D images")
    geometry = Geometry.from_nifti_affine(img.affine, data.shape[:3])
    # (x, y, z, c) -> (c, z, y, x)
    return np.ascontiguousarray(data.transpose(3, 2, 1, 0)), geometry


def write_image(
    path: str | os.PathLike[str],
    array: np.ndarray,
    geometry: Geometry,
    *,
    compress: bool = True,
) -> Path:
    """Write ``array`` ([C, Z, Y, X] or [Z, Y, X]) with ``geometry`` atomically; returns the path.

    One channel gives a 3-D image; several give a 4-D NIfTI or a vector NRRD/MHA. Booleans are
    stored as uint8.
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
    return target


def _short(exc: BaseException) -> str:
    """The informative last line of a (long, multi-line) SimpleITK/ITK exception."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Description:" in ln:
            return ln.split("Description:", 1)[1].strip()
    return lines[-1][:200] if lines else type(exc).__name__
