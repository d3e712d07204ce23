"""Reading one DICOM header quietly and describing its image planes (:class:`Frame`), headers only."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Frame:
    """One 2-D image plane: a single-frame file or one frame of a multi-frame file."""

    path: Path
    index: int | None  # frame number in a multi-frame file, None for single-frame
    rows: int
    cols: int
    samples: int
    position: np.ndarray | None
    orientation: np.ndarray | None  # 6 direction cosines (row, column)
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns)
    slope: float = 1.0
    intercept: float = 0.0
    thickness: float | None = None


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's loggers and warnings (a decoder that fails before another succeeds logs a traceback)."""
    try:  # create pydicom's per-module loggers (pydicom.pixels.*) so that they can be silenced too
        import pydicom.pixels  # noqa: F401
    except ImportError:  # pragma: no cover - pydicom < 3 logs only to "pydicom"
        pass
    manager = logging.Logger.manager
    loggers = [logging.getLogger("pydicom")] + [
        lg
        for name, lg in list(manager.loggerDict.items())
        if name.startswith("pydicom.") and isinstance(lg, logging.Logger)
    ]
    previous = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, was in zip(loggers, previous):
            lg.disabled = was


def dcmread(path: Path, **kwargs: Any) -> Any:
    import pydicom

    with quiet_pydicom():
        try:
            return pydicom.dcmread(str(path), **kwargs)
        except pydicom.errors.InvalidDicomError:
            ds = pydicom.dcmread(str(path), force=True, **kwargs)
            if "SOPClassUID" not in ds and "DirectoryRecordSequence" not in ds:
                raise
            return ds


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return arr if arr.size == n and np.all(np.isfinite(arr)) else None


def as_number(value: Any, default: float) -> float:
    """A numeric header value (DS/IS, possibly empty or malformed) as float, ``default`` when unusable."""
    if value is None or value == "":
        return default
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


def _item(ds: Any, keyword: str) -> Any:
    seq = ds.get(keyword) if ds is not None else None
    return seq[0] if seq else None


def frames_of(ds: Any, path: Path) -> tuple[list[Frame], bool]:
    """Frames of one dataset (header only) and whether it is a multi-frame without per-frame geometry."""
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        return [], False
    rows, cols, samples = int(rows), int(cols), int(ds.get("SamplesPerPixel", 1) or 1)
    if rows < 1 or cols < 1:
        raise ValueError(f"Rows/Columns {rows}x{cols}")
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        shared = _item(ds, "SharedFunctionalGroupsSequence")

        def get(item: Any, seq: str, attr: str) -> Any:
            for group in (item, shared):
                sub = _item(group, seq)
                if sub is not None and attr in sub:
                    return sub.get(attr)
            return ds.get(attr)

        frames = []
        for i, item in enumerate(per_frame):
            ps = _floats(get(item, "PixelMeasuresSequence", "PixelSpacing") or (), 2)
            thick = as_number(get(item, "PixelMeasuresSequence", "SliceThickness"), 0.0)
            frames.append(
                Frame(
                    path,
                    i,
                    rows,
                    cols,
                    samples,
                    _floats(get(item, "PlanePositionSequence", "ImagePositionPatient") or (), 3),
                    _floats(get(item, "PlaneOrientationSequence", "ImageOrientationPatient") or (), 6),
                    None if ps is None else (float(ps[0]), float(ps[1])),
                    as_number(get(item, "PixelValueTransformationSequence", "RescaleSlope"), 1.0) or 1.0,
                    as_number(get(item, "PixelValueTransformationSequence", "RescaleIntercept"), 0.0),
                    thick if thick > 0 else None,
                )
            )
        return frames, False
    ps = _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or (), 2)
    thick = abs(as_number(ds.get("SpacingBetweenSlices"), 0.0)) or as_number(ds.get("SliceThickness"), 0.0)
    frame = Frame(
        path,
        None,
        rows,
        cols,
        samples,
        _floats(ds.get("ImagePositionPatient") or (), 3),
        _floats(ds.get("ImageOrientationPatient") or (), 6),
        None if ps is None else (float(ps[0]), float(ps[1])),
        as_number(ds.get("RescaleSlope"), 1.0) or 1.0,
        as_number(ds.get("RescaleIntercept"), 0.0),
        thick if thick > 0 else None,
    )
    return [frame], nframes > 1


def short_error(exc: BaseException) -> str:
    """First informative line of an exception, for one-line messages."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__
