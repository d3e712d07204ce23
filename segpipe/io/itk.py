"""NRRD and MetaImage through SimpleITK, the header validated before the voxels are read (spacing,
origin and direction, voxel type, declared size against the data it can hold)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ReadError
from ..geometry import Geometry
from .limits import DEFLATE_MAX_RATIO, check_declared_size, valid_geometry


def sitk_module() -> Any:
    """SimpleITK, imported on first use."""
    import SimpleITK as sitk

    return sitk


def geometry_from_reader(reader: Any) -> Geometry:
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


def itk_type_name(dtype: np.dtype, *, vector: bool) -> str:
    """SimpleITK's name of a voxel type ("16-bit signed integer"), as ``read_header`` reports it."""
    try:
        sitk = sitk_module()
        image = sitk.GetImageFromArray(np.zeros((1, 1, 2) if vector else (1, 1), dtype=dtype), isVector=vector)
        return str(sitk.GetPixelIDValueAsString(image.GetPixelID()))
    except Exception:  # noqa: BLE001 - a name for display only
        return dtype.name


def sitk_reader(p: Path) -> Any:
    sitk = sitk_module()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ReadError(
            f"{p}: cannot read header ({_short(exc)})", hint="the file is damaged or not an image; re-export it"
        ) from None
    return reader


def check_sitk_spacing(p: Path, reader: Any) -> None:
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


def sitk_dtype(reader: Any) -> np.dtype:
    """numpy dtype of one voxel component of the image ``reader`` describes."""
    sitk = sitk_module()
    try:
        probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
        return sitk.GetArrayViewFromImage(probe).dtype
    except Exception:  # noqa: BLE001 - unusual pixel types: assume the widest
        return np.dtype(np.float64)


def sitk_stream_limit(p: Path, ext: str) -> tuple[str, int] | None:
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


def read_sitk(p: Path, ext: str) -> tuple[np.ndarray, Geometry]:
    """NRRD/MetaImage through SimpleITK; the header is validated before the voxels are read."""
    sitk = sitk_module()
    reader = sitk_reader(p)
    dim = reader.GetDimension()
    ncomp = reader.GetNumberOfComponents()
    if dim not in (2, 3, 4):
        raise ReadError(f"{p}: {dim}-D images are not supported", hint="segpipe reads 2-D, 3-D and 4-D images")
    if dim == 4 and ncomp != 1:
        raise ReadError(f"{p}: 4-D vector images are not supported", hint="store one channel per file")
    dtype = sitk_dtype(reader)
    if dtype.kind not in "biuf":
        raise ReadError(
            f"{p}: voxel type {sitk.GetPixelIDValueAsString(reader.GetPixelID())} is not supported",
            hint="store real-valued grey levels (one file per channel)",
        )
    check_declared_size(p, tuple(reader.GetSize()), dtype, ncomp, sitk_stream_limit(p, ext))
    check_sitk_spacing(p, reader)
    geometry = valid_geometry(p, lambda: geometry_from_reader(reader))
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


def _short(exc: BaseException) -> str:
    """The informative last line of a (long, multi-line) SimpleITK/ITK exception."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Description:" in ln:
            return ln.split("Description:", 1)[1].strip()
    return lines[-1][:200] if lines else type(exc).__name__
