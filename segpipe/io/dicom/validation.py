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


@dataclass(frozen=True)
class _SeriesErrors:
    """Where a series was read from, as its errors name it (the path, and the series within a folder)."""

    where: str

    def fail(self, problem: str, hint: str) -> DicomError:
        """A :class:`DicomError` about this series."""
        return DicomError(f"{self.where}: {problem}", hint=hint)

    def grid(
        self,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        origin: Any,
        direction: tuple[float, ...],
    ) -> Geometry:
        """The voxel grid the headers give, or a :class:`DicomError` when they give no valid one."""
        try:
            return Geometry(shape, spacing, (float(origin[0]), float(origin[1]), float(origin[2])), direction)
        except ValueError as exc:  # the header checks should leave nothing for this to catch
            raise self.fail(
                f"the headers give no valid voxel grid ({exc})", "the series' geometry tags are damaged; re-export it"
            ) from None


@dataclass(frozen=True)
class _SliceStack:
    """The slices of a volume series sorted along the slice normal, with their positions and in-plane axes."""

    frames: list[Frame]
    pos: np.ndarray  # ImagePositionPatient of each slice (mm)
    t: np.ndarray  # positions along the normal (mm), ascending
    r: np.ndarray  # row direction
    c: np.ndarray  # column direction
    n: np.ndarray  # slice normal
    dy: float  # pixel spacing between rows (mm)
    dx: float  # pixel spacing between columns (mm)

    @property
    def direction(self) -> tuple[float, ...]:
        """The grid's direction cosines (row, column and normal as columns)."""
        return tuple(np.column_stack([self.r, self.c, self.n]).ravel())


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
    errors = _SeriesErrors(f"{where} ({name})" if where.is_dir() and series.folder != where else f"{where}")
    _check_frames(series, errors)
    frames = series.frames
    if len(frames) == 1 and frames[0].position is None:
        return _single_image_plan(series, errors)
    iops, ps_arr = _check_volume_headers(frames, errors)
    stack = _sorted_stack(frames, iops, ps_arr)
    steps = np.diff(stack.t)
    _check_duplicate_positions(stack, steps, errors)
    if len(stack.frames) == 1:
        f = stack.frames[0]
        spacing = (f.thickness or 1.0, stack.dy, stack.dx)
        geometry = errors.grid((1, f.rows, f.cols), spacing, tuple(stack.pos[0]), stack.direction)
        return ReadPlan(stack.frames, geometry, stack.t, np.zeros((1, 2)), False)
    if len(stack.frames) == 2 and not allow_few_slices:
        raise errors.fail(
            "only 2 slices: too few to validate the slice spacing",
            "pass allow_few_slices=True if you know this 2-slice series is a regular volume",
        )
    uv, tilted = _in_plane_offsets(stack, errors, allow_gantry_tilt=allow_gantry_tilt)
    mean_step, uneven = _check_slice_spacing(
        stack, steps, errors, tolerance=spacing_tolerance, allow_uneven_spacing=allow_uneven_spacing
    )
    f0 = stack.frames[0]
    if not (tilted or uneven):
        shape = (len(stack.frames), f0.rows, f0.cols)
        geometry = errors.grid(shape, (mean_step, stack.dy, stack.dx), tuple(stack.pos[0]), stack.direction)
        return ReadPlan(stack.frames, geometry, stack.t, uv, False)
    return _resampled_plan(stack, steps, uv, errors, uneven=uneven, mean_step=mean_step)


def _check_frames(series: DicomSeries, errors: _SeriesErrors) -> None:
    """Refuse a series without image frames, or whose frames differ in size or carry damaged spacing/orientation."""
    frames = series.frames
    if not frames:
        raise errors.fail(
            f"{series.kind} object(s) ({series.sop_class_name}) without image pixels", "select an image series"
        )
    if series.multiframe_without_geometry:
        raise errors.fail(
            "multi-frame object without per-frame positions (no functional groups)",
            "convert it to an enhanced multi-frame or single-frame series",
        )
    sizes = Counter((f.rows, f.cols, f.samples) for f in frames)
    if len(sizes) > 1:
        desc = ", ".join(f"{r}x{c}{'x' + str(s) if s > 1 else ''} ({n} slices)" for (r, c, s), n in sizes.most_common())
        raise errors.fail(
            f"mixed sizes: {desc}",
            "select a series whose slices all have the same size (not a summary/screenshot series)",
        )
    for f in frames:
        if f.pixel_spacing is not None:
            _check_pixel_spacing(f.pixel_spacing, f.path.name, errors)
        if f.orientation is not None:
            _check_orientation(f.orientation, f.path.name, errors)


def _check_pixel_spacing(ps: tuple[float, float], name: str, errors: _SeriesErrors) -> None:
    """Refuse a PixelSpacing that is not positive along both in-plane axes."""
    if not (ps[0] > 0 and ps[1] > 0):
        raise errors.fail(
            f"PixelSpacing {ps[0]:g}\\{ps[1]:g} is not positive (in {name})",
            "the file lacks a usable pixel spacing (a projection image or a damaged export); "
            "re-export it with PixelSpacing, or select another series",
        )


def _check_orientation(iop: np.ndarray, name: str, errors: _SeriesErrors) -> None:
    """Refuse an ImageOrientationPatient that is not two perpendicular directions."""
    norms = np.linalg.norm(iop[:3]), np.linalg.norm(iop[3:])
    if min(norms) < 0.5 or abs(float(np.dot(iop[:3], iop[3:]))) > 0.05 * norms[0] * norms[1]:
        raise errors.fail(
            f"ImageOrientationPatient {_fmt(iop)} is not two perpendicular directions (in {name})",
            "the series' orientation tags are damaged; re-export it",
        )


def _single_image_plan(series: DicomSeries, errors: _SeriesErrors) -> ReadPlan:
    """The grid of a single image without ImagePositionPatient (ultrasound, screen capture): placed at
    the origin, with 1 mm assumed for a pixel spacing the headers do not give."""
    f = series.frames[0]
    ps = f.pixel_spacing or (1.0, 1.0)
    assumed = []
    if f.pixel_spacing is None:  # ultrasound and screen captures often have none
        assumed.append(
            f"{f.path}: no PixelSpacing ({series.modality or 'unknown modality'}): the pixel spacing is unknown "
            "and 1 mm is assumed, so sizes and volumes are in pixels, not millimetres"
        )
    iop = f.orientation if f.orientation is not None else np.array([1.0, 0, 0, 0, 1.0, 0])
    r, c = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    geometry = errors.grid(
        (1, f.rows, f.cols),
        (f.thickness or 1.0, ps[0], ps[1]),
        (0.0, 0.0, 0.0),
        tuple(np.column_stack([r, c, np.cross(r, c)]).ravel()),
    )
    return ReadPlan(series.frames, geometry, np.zeros(1), np.zeros((1, 2)), False, assumed)


def _check_volume_headers(frames: list[Frame], errors: _SeriesErrors) -> tuple[np.ndarray, np.ndarray]:
    """Refuse slices without position or orientation, mixed orientations and mixed pixel spacings;
    return each slice's ImageOrientationPatient and PixelSpacing."""
    missing = [f.path.name for f in frames if f.position is None or f.orientation is None]
    if missing:
        raise errors.fail(
            f"{len(missing)} slice(s) without ImagePositionPatient/ImageOrientationPatient (e.g. {missing[0]})",
            "this is not a volume series (a projection or screenshot?); select another series",
        )
    iops = np.array([f.orientation for f in frames])
    distinct = np.unique(np.round(iops / ORIENTATION_ATOL).astype(np.int64), axis=0)
    if np.max(np.abs(iops - iops[0])) > ORIENTATION_ATOL:
        raise errors.fail(
            f"mixed slice orientations: {len(distinct)} different ImageOrientationPatient values "
            f"(e.g. {_fmt(iops[0])} and {_fmt(iops[np.argmax(np.abs(iops - iops[0]).max(axis=1))])})",
            "this series holds several stacks (localizer/3-plane?); split it or select another series",
        )
    spacings = [f.pixel_spacing for f in frames]
    if any(s is None for s in spacings):
        raise errors.fail("slices without PixelSpacing", "the series lacks pixel spacing; re-export it with spacing")
    ps_arr = np.array(spacings, dtype=float)
    if not np.allclose(ps_arr, ps_arr[0], rtol=PIXEL_SPACING_RTOL, atol=0):
        raise errors.fail(
            f"mixed pixel spacings {_fmt(ps_arr.min(axis=0))} to {_fmt(ps_arr.max(axis=0))}",
            "select a series whose slices share one pixel spacing",
        )
    return iops, ps_arr


def _sorted_stack(frames: list[Frame], iops: np.ndarray, ps_arr: np.ndarray) -> _SliceStack:
    """The slices sorted by their position along the mean slice normal."""
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
    return _SliceStack(frames, pos, t, r, c, n, dy, dx)


def _check_duplicate_positions(stack: _SliceStack, steps: np.ndarray, errors: _SeriesErrors) -> None:
    """Refuse slices that share a position along the normal (several volumes or repeated slices)."""
    frames, t = stack.frames, stack.t
    dup_tol = max(1e-3, 1e-3 * float(np.median(steps)) if len(steps) else 0.0)
    dups = np.flatnonzero(steps < dup_tol)
    if len(dups):
        per_pos = Counter(np.round(t / dup_tol).astype(np.int64).tolist())
        involved = sum(c for c in per_pos.values() if c > 1)
        raise errors.fail(
            f"duplicate slice positions: {involved} of {len(frames)} slices share a position with another (up to "
            f"{max(per_pos.values())} at one position, e.g. {frames[dups[0]].path.name} and "
            f"{frames[dups[0] + 1].path.name} at {t[dups[0]]:.2f} mm along the normal)",
            "the series holds several volumes (time points, echoes) or repeated slices; split it",
        )


def _in_plane_offsets(stack: _SliceStack, errors: _SeriesErrors, *, allow_gantry_tilt: bool) -> tuple[np.ndarray, bool]:
    """Each slice's in-plane offset from the first (columns, rows) in pixels, and whether the stack is
    tilted (sheared); a tilt is refused unless ``allow_gantry_tilt``."""
    t, n = stack.t, stack.n
    rel = stack.pos - stack.pos[0]
    in_plane = rel - np.outer(rel @ n, n)
    uv = np.column_stack([in_plane @ stack.r / stack.dx, in_plane @ stack.c / stack.dy])
    shift = float(np.max(np.linalg.norm(in_plane, axis=1)))
    tilted = shift > TILT_PIXEL_FRACTION * min(stack.dx, stack.dy)
    if tilted and not allow_gantry_tilt:
        angle = np.degrees(np.arctan2(np.linalg.norm(in_plane[-1]), t[-1] - t[0]))
        raise errors.fail(
            f"gantry tilt / sheared stack: slice positions drift {shift:.2f} mm in-plane over "
            f"{t[-1] - t[0]:.1f} mm ({angle:.1f} degrees from the slice normal)",
            "pass allow_gantry_tilt=True to resample onto a regular grid, or reconstruct without tilt",
        )
    return uv, tilted


def _check_slice_spacing(
    stack: _SliceStack,
    steps: np.ndarray,
    errors: _SeriesErrors,
    *,
    tolerance: float,
    allow_uneven_spacing: bool,
) -> tuple[float, bool]:
    """The mean step between slices, and whether the spacing is uneven beyond ``tolerance``; uneven
    spacing (missing slices, say) is refused unless ``allow_uneven_spacing``."""
    frames, t = stack.frames, stack.t
    mean_step = (t[-1] - t[0]) / (len(t) - 1)
    deviation = np.abs(t - (t[0] + mean_step * np.arange(len(t))))
    uneven = float(deviation.max()) > tolerance * mean_step
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
                f"{frames[k].path.name}); tolerance {tolerance:.0%} of {mean_step:.3g} mm"
            )
        raise errors.fail(
            what, "add the missing files, or pass allow_uneven_spacing=True to resample onto a regular grid"
        )
    return mean_step, uneven


def _resampled_plan(
    stack: _SliceStack,
    steps: np.ndarray,
    uv: np.ndarray,
    errors: _SeriesErrors,
    *,
    uneven: bool,
    mean_step: float,
) -> ReadPlan:
    """The regular grid a tilted or unevenly spaced stack is resampled onto: it covers every slice."""
    t, f0 = stack.t, stack.frames[0]
    if uneven:
        nz = int(round((t[-1] - t[0]) / float(np.median(steps)))) + 1
        sz = (t[-1] - t[0]) / (nz - 1)
    else:
        nz, sz = len(stack.frames), mean_step
    lo = np.floor(uv.min(axis=0) + 1e-6)
    hi = np.ceil(uv.max(axis=0) - 1e-6)
    ncols, nrows = int(f0.cols + hi[0] - lo[0]), int(f0.rows + hi[1] - lo[1])
    origin = stack.pos[0] + lo[0] * stack.dx * stack.r + lo[1] * stack.dy * stack.c
    geometry = errors.grid((nz, nrows, ncols), (sz, stack.dy, stack.dx), tuple(origin), stack.direction)
    return ReadPlan(stack.frames, geometry, t, uv - lo, True)
