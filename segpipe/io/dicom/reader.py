"""Entry points that scan, choose and validate: :func:`read_dicom`, :func:`dicom_geometry`, :func:`describe_dicom`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DicomError, UsageError
from ...geometry import Geometry
from ...settings import DicomOptions
from .discovery import REPORTED, DicomSeries, scan_folder
from .headers import short_error
from .pixels import apply_rescale, decode_frames, resample_to_plan
from .selection import choose_series, log, select_series
from .validation import ReadPlan, plan_series

READ_OPTIONS = (
    "series",
    "modality",
    "allow_uneven_spacing",
    "allow_few_slices",
    "allow_gantry_tilt",
    "spacing_tolerance",
)


def _assess(series: DicomSeries) -> tuple[str | None, list[str]]:
    """Why the series cannot be read as it is (None when it can), and what reading it would
    assume (warnings); never raises."""
    try:
        strict = DicomOptions.from_conf(allow_uneven_spacing=False, allow_few_slices=False, allow_gantry_tilt=False)
        plan = plan_series(series, Path(series.folder), options=strict)
    except DicomError as exc:
        return exc.message.split(": ", 1)[-1], []
    except Exception as exc:  # a listing describes every series it can and reports the others
        return f"cannot be described ({short_error(exc)})", []
    return None, list(plan.warnings)


def _problem(series: DicomSeries) -> str | None:
    """Why the series cannot be read as it is (None when it can); never raises."""
    return _assess(series)[0]


def describe_dicom(
    path: str | os.PathLike[str], *, series: str | None = None, modality: str | None = None
) -> dict[str, Any]:
    """JSON-serialisable summary of every series under ``path`` (headers only), for ``segpipe info``.

    Keys:

    * ``series``: one dict per series: uid, modality, description, series_number, sop_class, kind,
      folder, files, frames, sizes, frame_of_reference, readable, problem (why it cannot be read
      as it is, or None), synthetic (True for files without SeriesInstanceUID grouped by the
      remaining tags) and warnings (list of strings);
    * ``skipped``: counts of skipped files by category; ``skipped_reasons``: one human-readable
      line per category with examples (file and why), for printing;
    * ``warnings``: human-readable warnings about the listing (synthetic series) and about what
      reading a series would assume (no PixelSpacing: 1 mm);
    * ``chosen``: the UID that :func:`read_dicom` would read with this ``series``/``modality``
      selection, or None, and ``choice_problem``: why none can be chosen.

    A file or series that cannot be described is reported (skipped or with its ``problem``);
    it never aborts the listing. A malformed ``re:`` selector is a :class:`UsageError`.
    """
    scan = scan_folder(path)
    items = []
    warnings_: list[str] = []
    for s in scan.series:
        problem, assumed = _assess(s) if s.kind in ("image", "secondary-capture") else (None, [])
        sizes = sorted({(f.rows, f.cols) for f in s.frames})
        items.append(
            {
                "uid": s.uid,
                "modality": s.modality,
                "description": s.description,
                "series_number": s.series_number,
                "sop_class": s.sop_class_name,
                "kind": s.kind,
                "folder": str(s.folder),
                "files": len(s.files),
                "frames": len(s.frames),
                "sizes": [list(sz) for sz in sizes],
                "frame_of_reference": s.frame_of_reference,
                "readable": s.kind in ("image", "secondary-capture") and problem is None,
                "problem": problem,
                "synthetic": s.synthetic,
                "warnings": [*s.warnings, *assumed],
            }
        )
        warnings_.extend([*s.warnings, *assumed])
    REPORTED.update(warnings_)  # shown in the listing: reading the series does not log them again
    chosen, reason = None, None
    try:
        chosen = choose_series(
            scan.series, Path(path), series=series, modality=modality, skipped_reasons=scan.reasons()
        ).uid
    except DicomError as exc:
        reason = exc.message.split(": ", 1)[-1]
    return {
        "path": str(path),
        "series": items,
        "skipped": dict(scan.skipped),
        "skipped_reasons": scan.reasons(),
        "warnings": warnings_,
        "chosen": chosen,
        "choice_problem": reason,
    }


def _check_options(unknown: dict[str, Any]) -> None:
    if unknown:
        raise UsageError(f"unknown DICOM option(s) {sorted(unknown)}", hint=f"valid options: {', '.join(READ_OPTIONS)}")


def _read_plan(path: str | os.PathLike[str], options: dict[str, Any]) -> tuple[Path, ReadPlan, DicomSeries]:
    """The series ``options`` choose in ``path`` (options: :data:`READ_OPTIONS`, each None or absent
    for ``conf/dicom``'s default), where it lies, and how it is read (from headers only)."""
    unknown = {k: v for k, v in options.items() if k not in READ_OPTIONS}
    _check_options(unknown)
    opts = DicomOptions.from_conf(**options)
    where, chosen = select_series(path, opts.series, opts.modality)
    return where, plan_series(chosen, where, options=opts), chosen


def dicom_geometry(path: str | os.PathLike[str], **options: Any) -> tuple[Geometry, DicomSeries]:
    """Geometry that :func:`read_dicom` would return with the same ``options``, from headers only,
    and the chosen series."""
    _where, plan, chosen = _read_plan(path, options)
    return plan.geometry, chosen


def dicom_source_frames(path: str | os.PathLike[str], **options: Any) -> tuple[list[Any], Geometry, bool]:
    """The frames :func:`read_dicom` reads with the same ``options``, in the order of the volume's
    first axis (slice ``z`` of the array is frame ``z``), its geometry, and whether the volume was
    resampled (then slices no longer match frames one to one). From headers only."""
    _where, plan, _chosen = _read_plan(path, options)
    return list(plan.frames), plan.geometry, bool(plan.resample)


def read_dicom(path: str | os.PathLike[str], **options: Any) -> tuple[np.ndarray, Geometry]:
    """Read a DICOM series (folder) or file as ``(array[C, Z, Y, X], Geometry)``. ``options``:
    ``series``, ``modality``, ``allow_uneven_spacing``, ``allow_few_slices``, ``allow_gantry_tilt``,
    ``spacing_tolerance`` (:mod:`segpipe.io.dicom`; an option left out or None takes ``conf/dicom``'s default)."""
    tolerance = options.get("spacing_tolerance")
    if tolerance is not None and not 0 < tolerance < 1:
        raise UsageError(f"spacing_tolerance must be in (0, 1), got {tolerance}")
    where, plan, _chosen = _read_plan(path, options)
    for warning in plan.warnings:  # what the grid assumes, said once per process (or by the listing)
        if warning not in REPORTED:
            REPORTED.add(warning)
            log.warning("%s", warning)
    data = apply_rescale(decode_frames(plan, where), plan.frames)
    data = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    if plan.resample:
        data = resample_to_plan(data, plan)
    return np.ascontiguousarray(data), plan.geometry
