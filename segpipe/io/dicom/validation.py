"""Validating a series from its headers (geometry checks) and computing the voxel grid (:class:`ReadPlan`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DicomError
from ...geometry import Geometry
from ...settings import DicomOptions
from .discovery import DicomSeries
from .headers import Frame

ORIENTATION_ATOL = 1e-3
PIXEL_SPACING_RTOL = 1e-3
TILT_PIXEL_FRACTION = 0.1


@dataclass
class ReadPlan:
    """Validated series: frames sorted along the normal and the output grid."""

    frames: list[Frame]
    geometry: Geometry
    t: np.ndarray  # positions along the normal (mm), ascending
    uv: np.ndarray  # in-plane offsets of each slice from the first (columns, rows) in pixels
    resample: bool
    warnings: list[str] = field(default_factory=list)  # what the grid assumes that the headers do not say


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def plan_series(
    series: DicomSeries,
    where: Path,
    *,
    options: DicomOptions | None = None,
) -> ReadPlan:
    """Validate a series from its headers and compute the output grid (checks: :mod:`segpipe.io.dicom`),
    with the read ``options`` (``conf/dicom``'s defaults when None)."""
    opts = options if options is not None else DicomOptions.from_conf()
    allow_uneven_spacing, allow_few_slices = opts.allow_uneven_spacing, opts.allow_few_slices
    allow_gantry_tilt, spacing_tolerance = opts.allow_gantry_tilt, opts.spacing_tolerance
    name = f"series '{series.description}'" if series.description else f"series {series.uid}"
    where_s = f"{where} ({name})" if where.is_dir() and series.folder != where else f"{where}"

    def fail(problem: str, hint: str) -> DicomError:
        return DicomError(f"{where_s}: {problem}", hint=hint)

    def grid(
        shape: tuple[int, int, int], spacing: tuple[float, float, float], origin: Any, direction: tuple[float, ...]
    ) -> Geometry:
        try:
            return Geometry(shape, spacing, (float(origin[0]), float(origin[1]), float(origin[2])), direction)
        except ValueError as exc:  # the checks below should leave nothing for this to catch
            raise fail(
                f"the headers give no valid voxel grid ({exc})", "the series' geometry tags are damaged; re-export it"
            ) from None

    def check_spacing(ps: tuple[float, float], name: str) -> None:
        if not (ps[0] > 0 and ps[1] > 0):
            raise fail(
                f"PixelSpacing {ps[0]:g}\\{ps[1]:g} is not positive (in {name})",
                "the file lacks a usable pixel spacing (a projection image or a damaged export); "
                "re-export it with PixelSpacing, or select another series",
            )

    frames = series.frames
    if not frames:
        raise fail(f"{series.kind} object(s) ({series.sop_class_name}) without image pixels", "select an image series")
    if series.multiframe_without_geometry:
        raise fail(
            "multi-frame object without per-frame positions (no functional groups)",
            "convert it to an enhanced multi-frame or single-frame series",
        )
    sizes = Counter((f.rows, f.cols, f.samples) for f in frames)
    if len(sizes) > 1:
        desc = ", ".join(f"{r}x{c}{'x' + str(s) if s > 1 else ''} ({n} slices)" for (r, c, s), n in sizes.most_common())
        raise fail(
            f"mixed sizes: {desc}",
            "select a series whose slices all have the same size (not a summary/screenshot series)",
        )
    for f in frames:
        if f.pixel_spacing is not None:
            check_spacing(f.pixel_spacing, f.path.name)
        if f.orientation is not None:
            norms = np.linalg.norm(f.orientation[:3]), np.linalg.norm(f.orientation[3:])
            if (
                min(norms) < 0.5
                or abs(float(np.dot(f.orientation[:3], f.orientation[3:]))) > 0.05 * norms[0] * norms[1]
            ):
                raise fail(
                    f"ImageOrientationPatient {_fmt(f.orientation)} is not two perpendicular directions "
                    f"(in {f.path.name})",
                    "the series' orientation tags are damaged; re-export it",
                )
    if len(frames) == 1 and frames[0].position is None:
        f = frames[0]
        ps = f.pixel_spacing or (1.0, 1.0)
        assumed = []
        if f.pixel_spacing is None:  # ultrasound and screen captures often have none
            assumed.append(
                f"{f.path}: no PixelSpacing ({series.modality or 'unknown modality'}): the pixel spacing is unknown "
                "and 1 mm is assumed, so sizes and volumes are in pixels, not millimetres"
            )
        iop = f.orientation if f.orientation is not None else np.array([1.0, 0, 0, 0, 1.0, 0])
        r, c = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
        geometry = grid(
            (1, f.rows, f.cols),
            (f.thickness or 1.0, ps[0], ps[1]),
            (0.0, 0.0, 0.0),
            tuple(np.column_stack([r, c, np.cross(r, c)]).ravel()),
        )
        return ReadPlan(frames, geometry, np.zeros(1), np.zeros((1, 2)), False, assumed)
    missing = [f.path.name for f in frames if f.position is None or f.orientation is None]
    if missing:
        raise fail(
            f"{len(missing)} slice(s) without ImagePositionPatient/ImageOrientationPatient (e.g. {missing[0]})",
            "this is not a volume series (a projection or screenshot?); select another series",
        )
    iops = np.array([f.orientation for f in frames])
    distinct = np.unique(np.round(iops / ORIENTATION_ATOL).astype(np.int64), axis=0)
    if np.max(np.abs(iops - iops[0])) > ORIENTATION_ATOL:
        raise fail(
            f"mixed slice orientations: {len(distinct)} different ImageOrientationPatient values "
            f"(e.g. {_fmt(iops[0])} and {_fmt(iops[np.argmax(np.abs(iops - iops[0]).max(axis=1))])})",
            "this series holds several stacks (localizer/3-plane?); split it or select another series",
        )
    spacings = [f.pixel_spacing for f in frames]
    if any(s is None for s in spacings):
        raise fail("slices without PixelSpacing", "the series lacks pixel spacing; re-export it with spacing")
    ps_arr = np.array(spacings, dtype=float)
    if not np.allclose(ps_arr, ps_arr[0], rtol=PIXEL_SPACING_RTOL, atol=0):
        raise fail(
            f"mixed pixel spacings {_fmt(ps_arr.min(axis=0))} to {_fmt(ps_arr.max(axis=0))}",
            "select a series whose slices share one pixel spacing",
        )
    iop = iops.mean(axis=0)
    r, c = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    n = np.cross(r, c)
    n /= np.linalg.norm(n)
    pos = np.array([f.position for f in frames])
    t_all = pos @ n
    order = np.argsort(t_all, kind="stable")
    frames = [frames[i] for i in order]
    pos, t = pos[order], t_all[order]
    dy, dx = (float(v) for v in ps_arr[0])
    steps = np.diff(t)
    dup_tol = max(1e-3, 1e-3 * float(np.median(steps)) if len(steps) else 0.0)
    dups = np.flatnonzero(steps < dup_tol)
    if len(dups):
        per_pos = Counter(np.round(t / dup_tol).astype(np.int64).tolist())
        involved = sum(c for c in per_pos.values() if c > 1)
        raise fail(
            f"duplicate slice positions: {involved} of {len(frames)} slices share a position with another (up to "
            f"{max(per_pos.values())} at one position, e.g. {frames[dups[0]].path.name} and "
            f"{frames[dups[0] + 1].path.name} at {t[dups[0]]:.2f} mm along the normal)",
            "the series holds several volumes (time points, echoes) or repeated slices; split it",
        )
    geometry_dir = tuple(np.column_stack([r, c, n]).ravel())
    if len(frames) == 1:
        f = frames[0]
        geometry = grid((1, f.rows, f.cols), (f.thickness or 1.0, dy, dx), tuple(pos[0]), geometry_dir)
        return ReadPlan(frames, geometry, t, np.zeros((1, 2)), False)
    if len(frames) == 2 and not allow_few_slices:
        raise fail(
            "only 2 slices: too few to validate the slice spacing",
            "pass allow_few_slices=True if you know this 2-slice series is a regular volume",
        )
    rel = pos - pos[0]
    in_plane = rel - np.outer(rel @ n, n)
    uv = np.column_stack([in_plane @ r / dx, in_plane @ c / dy])
    shift = float(np.max(np.linalg.norm(in_plane, axis=1)))
    tilted = shift > TILT_PIXEL_FRACTION * min(dx, dy)
    if tilted and not allow_gantry_tilt:
        angle = np.degrees(np.arctan2(np.linalg.norm(in_plane[-1]), t[-1] - t[0]))
        raise fail(
            f"gantry tilt / sheared stack: slice positions drift {shift:.2f} mm in-plane over "
            f"{t[-1] - t[0]:.1f} mm ({angle:.1f} degrees from the slice normal)",
            "pass allow_gantry_tilt=True to resample onto a regular grid, or reconstruct without tilt",
        )
    mean_step = (t[-1] - t[0]) / (len(t) - 1)
    deviation = np.abs(t - (t[0] + mean_step * np.arange(len(t))))
    uneven = float(deviation.max()) > spacing_tolerance * mean_step
    if uneven and not allow_uneven_spacing:
        med = float(np.median(steps))
        k = int(np.argmax(np.abs(steps - med)))
        ratio = steps[k] / med
        if ratio > 1.5 and abs(ratio - round(ratio)) < 0.2:
            what = (
                f"missing slice(s): gap of {steps[k]:.3g} mm between {frames[k].path.name} ({t[k]:.2f} mm) and "
                f"{frames[k + 1].path.name} ({t[k + 1]:.2f} mm) along the slice normal where the spacing is "
                f"{med:.3g} mm ({int(round(ratio)) - 1} slice(s) missing)"
            )
        else:
            what = (
                f"uneven slice spacing: steps from {steps.min():.3g} to {steps.max():.3g} mm (largest at "
                f"{frames[k].path.name}); tolerance {spacing_tolerance:.0%} of {mean_step:.3g} mm"
            )
        raise fail(what, "add the missing files, or pass allow_uneven_spacing=True to resample onto a regular grid")
    f0 = frames[0]
    if not (tilted or uneven):
        geometry = grid((len(frames), f0.rows, f0.cols), (mean_step, dy, dx), tuple(pos[0]), geometry_dir)
        return ReadPlan(frames, geometry, t, uv, False)
    if uneven:
        nz = int(round((t[-1] - t[0]) / float(np.median(steps)))) + 1
        sz = (t[-1] - t[0]) / (nz - 1)
    else:
        nz, sz = len(frames), mean_step
    lo = np.floor(uv.min(axis=0) + 1e-6)
    hi = np.ceil(uv.max(axis=0) - 1e-6)
    ncols, nrows = int(f0.cols + hi[0] - lo[0]), int(f0.rows + hi[1] - lo[1])
    origin = pos[0] + lo[0] * dx * r + lo[1] * dy * c
    geometry = grid((nz, nrows, ncols), (sz, dy, dx), tuple(origin), geometry_dir)
    return ReadPlan(frames, geometry, t, uv - lo, True)
