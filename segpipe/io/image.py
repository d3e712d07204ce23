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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReadError, UsageError
from ..geometry import Geometry
from .atomic import atomic_path
from .formats import FORMAT_NAMES, IMAGE_EXTENSIONS, image_extension
from .itk import (
    check_sitk_spacing,
    geometry_from_reader,
    itk_type_name,
    read_sitk,
    sitk_dtype,
    sitk_module,
    sitk_reader,
    sitk_stream_limit,
)
from .limits import check_declared_size, check_written, valid_geometry
from .nifti import inspect_nifti, read_nifti, unoriented_nifti_header, write_unoriented_nifti


def is_dicom_source(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a DICOM file or a folder to read as DICOM, judged by content.

    A file counts when named ``*.dcm``/``*.dicom``/``*.ima`` or when it carries the ``DICM``
    preamble (extension-less exports); a folder when it holds DICOM files (by name or preamble)
    or no NIfTI/NRRD/MHA image at all. See :func:`segpipe.io.dicom.looks_like_dicom`.
    """
    from .dicom import looks_like_dicom  # the DICOM reader (pydicom) loads on first use

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
        info = inspect_nifti(p, ext)
        check_declared_size(p, info.shape, info.dtype, 1, info.stream, check_memory=False)
        dtype = itk_type_name(info.dtype, vector=info.vector)
        return ImageHeader(str(p), FORMAT_NAMES[ext], info.geometry, info.channels, dtype, len(info.layout))
    reader = sitk_reader(p)
    dim = reader.GetDimension()
    ncomp = reader.GetNumberOfComponents()
    size = reader.GetSize()
    channels = ncomp * (size[3] if dim >= 4 else 1)
    check_declared_size(p, tuple(size), sitk_dtype(reader), ncomp, sitk_stream_limit(p, ext), check_memory=False)
    check_sitk_spacing(p, reader)
    geometry = valid_geometry(p, lambda: geometry_from_reader(reader))
    dtype = sitk_module().GetPixelIDValueAsString(reader.GetPixelID())
    return ImageHeader(str(p), FORMAT_NAMES[ext], geometry, int(channels), dtype, int(dim))


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
        return read_nifti(p, ext)
    return read_sitk(p, ext)


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
        header = unoriented_nifti_header(arr, geometry)
        if header is not None:  # the source's own grid: written as the source was, without orientation
            write_unoriented_nifti(target, ext, arr, header)
            return target
    sitk = sitk_module()
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
        check_written(tmp, target, ext, int(arr.nbytes))
    return target
