"""Reading DICOM image series (and writing simple ones) with validation before trust.

A folder is scanned recursively, **headers only**; DICOMDIR files (any byte order) are
skipped and every object is grouped by SeriesInstanceUID (a series whose SOP instances occur in
several folders, i.e. copies, is split per folder). SEG, RTSTRUCT, SR, presentation states and
other objects without pixel rows/columns are listed but never read as images; secondary
captures are listed but only read when selected explicitly.

Choosing the series (:func:`read_dicom` options):

* ``series``: a SeriesInstanceUID, or a case-insensitive glob (``"t1*"``) or regular expression
  matched against SeriesDescription; ``modality``: e.g. ``"CT"`` (case-insensitive glob).
* Without a selector the only image series present is read; several candidates are an error
  that lists them (UID, modality, description, size, files). :func:`describe_dicom` shows the
  same list (``segpipe info FOLDER``).

Validation, computed from ImagePositionPatient / ImageOrientationPatient / PixelSpacing (the
per-frame and shared functional groups for enhanced and legacy-converted multi-frame objects),
never from optional tags alone. Slices are sorted by their position along the slice normal
``n = row × column`` (not by InstanceNumber), so array index z grows along ``n``:

1. all slices have the same rows/columns/samples (else *mixed sizes*), the same orientation
   (cosines within 1e-3) and the same pixel spacing (0.1 %);
2. slice positions are unique (else *duplicate positions*: several volumes in one series);
3. one slice is a single-slice volume; two slices are refused unless ``allow_few_slices=True``;
4. every slice origin lies on the line through the first one along ``n``: an in-plane offset of
   more than 0.1 pixel between slices is a *gantry tilt* (detected geometrically; the tilt tag
   is not needed). Refused unless ``allow_gantry_tilt=True``, which resamples (linearly) onto a
   regular grid aligned with the slices, widened in-plane to cover every slice;
5. the steps between slices along ``n`` are uniform: every slice lies within
   ``spacing_tolerance`` (relative, default 0.02 = 2 % of the mean step) of a regular grid. The
   reference series in the test data deviate by at most 2e-4 (rounding of DS positions), a
   missing slice by 100 %: 2 % leaves room for scanner jitter and still catches every gap. A missing slice is reported with the gap; ``allow_uneven_spacing=True``
   resamples linearly onto a regular grid with the median step, spanning first to last slice.
   Voxels a resampling cannot fill get the series minimum.

Pixel data are decoded by pydicom's handlers (GDCM / pylibjpeg / pyjpegls: JPEG baseline and
lossless, JPEG-LS, JPEG 2000, RLE). Rescale slope/intercept (per file or per frame) is applied:
float32 output when any slope/intercept is not integral, else an integer dtype wide enough
(the stored dtype, int16, int32 or int64, the first that holds the data). RGB data give three
channels. Errors are :class:`~segpipe.errors.DicomError` with one line naming the path and the
problem, and a ``fix:`` hint. MONOCHROME1 data are returned as stored (not inverted), as ITK does.
"""

from __future__ import annotations

import datetime
import fnmatch
import os
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DicomError, UsageError
from ..geometry import Geometry
from .atomic import atomic_folder

ORIENTATION_ATOL = 1e-3
PIXEL_SPACING_RTOL = 1e-3
TILT_PIXEL_FRACTION = 0.1
DEFAULT_SPACING_TOLERANCE = 0.02

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "SR", "PR", "KO", "DOC", "REG", "FID", "RWV"}
NON_IMAGE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.88", "1.2.840.10008.5.1.4.1.1.11",
                          "1.2.840.10008.5.1.4.1.1.481", "1.2.840.10008.5.1.4.1.1.104")
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
SKIP_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".txt", ".md", ".json", ".yaml", ".py", ".png",
                 ".jpg", ".zip", ".gz", ".csv", ".pdf", ".html")
READ_OPTIONS = ("series", "modality", "allow_uneven_spacing", "allow_few_slices", "allow_gantry_tilt", "spacing_tolerance")


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


@dataclass
class DicomSeries:
    """A series found by scanning: what `segpipe info` lists."""

    uid: str
    modality: str
    description: str
    series_number: int | None
    sop_class: str
    sop_class_name: str
    folder: Path
    files: list[Path] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    frame_of_reference: str = ""
    sop_instances: list[str] = field(default_factory=list)
    multiframe_without_geometry: bool = False

    @property
    def kind(self) -> str:
        if self.modality.upper() in NON_IMAGE_MODALITIES or self.sop_class.startswith(NON_IMAGE_SOP_PREFIXES):
            return "non-image"
        if not self.frames:
            return "no-pixel-data"
        if self.sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
            return "secondary-capture"
        return "image"

    def label(self) -> str:
        desc = f" '{self.description}'" if self.description else ""
        sizes = sorted({(f.rows, f.cols) for f in self.frames})
        size = ", ".join(f"{r}x{c}" for r, c in sizes) or "no pixels"
        return f"{self.uid} [{self.modality}{desc}, {len(self.frames)} x {size}, {len(self.files)} files, {self.folder}]"


@dataclass
class ReadPlan:
    """Validated series: frames sorted along the normal and the output grid."""

    frames: list[Frame]
    geometry: Geometry
    t: np.ndarray  # positions along the normal (mm), ascending
    uv: np.ndarray  # in-plane offsets of each slice from the first (columns, rows) in pixels
    resample: bool


# ---------------------------------------------------------------------------------------- scanning
def _dcmread(path: Path, **kwargs: Any) -> Any:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
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


def _item(ds: Any, keyword: str) -> Any:
    seq = ds.get(keyword) if ds is not None else None
    return seq[0] if seq else None


def _frames_of(ds: Any, path: Path) -> tuple[list[Frame], bool]:
    """Frames of one dataset (header only) and whether it is a multi-frame without per-frame geometry."""
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        return [], False
    rows, cols, samples = int(rows), int(cols), int(ds.get("SamplesPerPixel", 1) or 1)
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
            thick = get(item, "PixelMeasuresSequence", "SliceThickness")
            frames.append(Frame(
                path, i, rows, cols, samples,
                _floats(get(item, "PlanePositionSequence", "ImagePositionPatient") or (), 3),
                _floats(get(item, "PlaneOrientationSequence", "ImageOrientationPatient") or (), 6),
                None if ps is None else (float(ps[0]), float(ps[1])),
                float(get(item, "PixelValueTransformationSequence", "RescaleSlope") or 1.0),
                float(get(item, "PixelValueTransformationSequence", "RescaleIntercept") or 0.0),
                float(thick) if thick else None,
            ))
        return frames, False
    ps = _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or (), 2)
    thick = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    frame = Frame(
        path, None, rows, cols, samples,
        _floats(ds.get("ImagePositionPatient") or (), 3), _floats(ds.get("ImageOrientationPatient") or (), 6),
        None if ps is None else (float(ps[0]), float(ps[1])),
        float(ds.get("RescaleSlope") or 1.0), float(ds.get("RescaleIntercept") or 0.0),
        float(thick) if thick else None,
    )
    return [frame], nframes > 1


def list_series(path: str | os.PathLike[str]) -> tuple[list[DicomSeries], Counter[str]]:
    """Scan ``path`` (a folder, recursively, or one file) reading headers only.

    Returns the series found (image series first) and a count of skipped files by reason.
    """
    root = Path(path)
    if not root.exists():
        raise DicomError(f"{root}: no such file or folder", hint="check the path")
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    skipped: Counter[str] = Counter()
    groups: dict[str, DicomSeries] = {}
    for f in files:
        name = f.name.lower()
        if name.startswith("dicomdir"):
            skipped["DICOMDIR"] += 1
            continue
        if f != root and (name.endswith(SKIP_SUFFIXES) or name.startswith(("license", "readme"))):
            skipped["not DICOM"] += 1
            continue
        try:
            ds = _dcmread(f, stop_before_pixels=True)
            frames, no_geometry = _frames_of(ds, f)
        except Exception:  # anything pydicom raises means "not a readable DICOM file"
            skipped["not DICOM or unreadable"] += 1
            continue
        meta = getattr(ds, "file_meta", None)
        sop = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")
        if sop == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
            skipped["DICOMDIR"] += 1
            continue
        uid = str(ds.get("SeriesInstanceUID") or "")
        if not uid:
            skipped["no SeriesInstanceUID"] += 1
            continue
        series = groups.get(uid)
        if series is None:
            sop_name = getattr(ds.get("SOPClassUID"), "name", sop) if ds.get("SOPClassUID") else sop
            number = ds.get("SeriesNumber")
            series = groups[uid] = DicomSeries(
                uid, str(ds.get("Modality") or ""), str(ds.get("SeriesDescription") or "").strip(),
                int(number) if number not in (None, "") else None, sop, str(sop_name), f.parent,
                frame_of_reference=str(ds.get("FrameOfReferenceUID") or ""),
            )
        series.files.append(f)
        series.frames.extend(frames)
        series.sop_instances.append(str(ds.get("SOPInstanceUID") or f))
        series.multiframe_without_geometry |= no_geometry
    found: list[DicomSeries] = []
    for series in groups.values():
        found.extend(_split_copies(series))
    for s in found:
        if len(s.files) > 1:
            s.folder = Path(os.path.commonpath([str(p.parent) for p in s.files]))
    found.sort(key=lambda s: (s.kind != "image", str(s.folder), s.series_number or 0, s.uid))
    return found, skipped


def _split_copies(series: DicomSeries) -> list[DicomSeries]:
    """Split a series whose SOP instances repeat (copies in several folders) by folder."""
    if len(set(series.sop_instances)) == len(series.sop_instances):
        return [series]
    by_folder: dict[Path, DicomSeries] = {}
    for f, sop in zip(series.files, series.sop_instances):
        part = by_folder.setdefault(f.parent, DicomSeries(
            series.uid, series.modality, series.description, series.series_number, series.sop_class,
            series.sop_class_name, f.parent, frame_of_reference=series.frame_of_reference))
        part.files.append(f)
        part.sop_instances.append(sop)
        part.frames.extend(fr for fr in series.frames if fr.path == f)
    return list(by_folder.values())


def _problem(series: DicomSeries) -> str | None:
    try:
        plan_series(series, Path(series.folder), allow_uneven_spacing=False, allow_few_slices=False,
                    allow_gantry_tilt=False)
    except DicomError as exc:
        return exc.message.split(": ", 1)[-1]
    return None


def describe_dicom(path: str | os.PathLike[str], *, series: str | None = None,
                   modality: str | None = None) -> dict[str, Any]:
    """JSON-serialisable summary of every series under ``path`` (headers only), for ``segpipe info``.

    Keys: ``series`` (one dict per series: uid, modality, description, kind, folder, files, frames,
    sizes, readable, problem), ``skipped`` (file counts by reason), ``chosen`` (the UID that
    :func:`read_dicom` would read with this ``series``/``modality`` selection, or None) and
    ``choice_problem`` (why none can be chosen).
    """
    found, skipped = list_series(path)
    items = []
    for s in found:
        problem = _problem(s) if s.kind in ("image", "secondary-capture") else None
        sizes = sorted({(f.rows, f.cols) for f in s.frames})
        items.append({
            "uid": s.uid, "modality": s.modality, "description": s.description, "series_number": s.series_number,
            "sop_class": s.sop_class_name, "kind": s.kind, "folder": str(s.folder), "files": len(s.files),
            "frames": len(s.frames), "sizes": [list(sz) for sz in sizes], "frame_of_reference": s.frame_of_reference,
            "readable": s.kind in ("image", "secondary-capture") and problem is None, "problem": problem,
        })
    chosen, reason = None, None
    try:
        chosen = choose_series(found, Path(path), series=series, modality=modality).uid
    except DicomError as exc:
        reason = exc.message.split(": ", 1)[-1]
    return {"path": str(path), "series": items, "skipped": dict(skipped), "chosen": chosen, "choice_problem": reason}


# --------------------------------------------------------------------------------------- selection
def _matches(pattern: str, text: str) -> bool:
    if fnmatch.fnmatch(text.lower(), pattern.lower()):
        return True
    try:
        return re.search(pattern, text, re.IGNORECASE) is not None
    except re.error:
        return False


def choose_series(found: list[DicomSeries], where: Path, *, series: str | None = None,
                  modality: str | None = None) -> DicomSeries:
    """The series selected by UID / description pattern / modality, or the only image series."""
    listing = "; ".join(s.label() for s in found) or "none"
    if series is not None:
        exact = [s for s in found if s.uid == series]
        if len(exact) == 1 and exact[0].kind in ("image", "secondary-capture"):
            return exact[0]
        if exact and all(s.kind not in ("image", "secondary-capture") for s in exact):
            raise DicomError(f"{where}: series {series} holds {exact[0].sop_class_name} objects ({exact[0].kind}), "
                             "not an image series", hint="select an image series (segpipe info lists them)")
    pool = [s for s in found if s.kind == "image" or (series is not None and s.kind == "secondary-capture")]
    if modality is not None:
        pool = [s for s in pool if fnmatch.fnmatch(s.modality.lower(), modality.lower())]
    if series is not None:
        pool = [s for s in pool if s.uid == series or _matches(series, s.description)]
    if len(pool) == 1:
        return pool[0]
    wanted = " ".join(x for x in (f"series={series!r}" if series else "", f"modality={modality!r}" if modality else "") if x)
    if not pool:
        what = f"no image series matches {wanted}" if wanted else "no image series found"
        raise DicomError(f"{where}: {what} (found: {listing})",
                         hint="pass a folder holding an image series, or select one of those listed by UID or description")
    names = "; ".join(s.label() for s in pool)
    raise DicomError(f"{where}: {len(pool)} image series{' match ' + wanted if wanted else ''}: {names}",
                     hint="select one with series=UID or a description pattern (and/or modality=...)")


# -------------------------------------------------------------------------------------- validation
def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def plan_series(series: DicomSeries, where: Path, *, allow_uneven_spacing: bool = False,
                allow_few_slices: bool = False, allow_gantry_tilt: bool = False,
                spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE) -> ReadPlan:
    """Validate a series from its headers and compute the output grid (see the module docstring)."""
    name = f"series '{series.description}'" if series.description else f"series {series.uid}"
    where_s = f"{where} ({name})" if where.is_dir() and series.folder != where else f"{where}"

    def fail(problem: str, hint: str) -> DicomError:
        return DicomError(f"{where_s}: {problem}", hint=hint)

    frames = series.frames
    if not frames:
        raise fail(f"{series.kind} object(s) ({series.sop_class_name}) without image pixels", "select an image series")
    if series.multiframe_without_geometry:
        raise fail("multi-frame object without per-frame positions (no functional groups)",
                   "convert it to an enhanced multi-frame or single-frame series")
    sizes = Counter((f.rows, f.cols, f.samples) for f in frames)
    if len(sizes) > 1:
        desc = ", ".join(f"{r}x{c}{'x' + str(s) if s > 1 else ''} ({n} slices)" for (r, c, s), n in sizes.most_common())
        raise fail(f"mixed sizes: {desc}", "select a series whose slices all have the same size (not a summary/screenshot series)")
    if len(frames) == 1 and frames[0].position is None:
        f = frames[0]
        ps = f.pixel_spacing or (1.0, 1.0)
        iop = f.orientation if f.orientation is not None else np.array([1.0, 0, 0, 0, 1.0, 0])
        r, c = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
        geometry = Geometry((1, f.rows, f.cols), (f.thickness or 1.0, ps[0], ps[1]), (0.0, 0.0, 0.0),
                            tuple(np.column_stack([r, c, np.cross(r, c)]).ravel()))
        return ReadPlan(frames, geometry, np.zeros(1), np.zeros((1, 2)), False)
    missing = [f.path.name for f in frames if f.position is None or f.orientation is None]
    if missing:
        raise fail(f"{len(missing)} slice(s) without ImagePositionPatient/ImageOrientationPatient (e.g. {missing[0]})",
                   "this is not a volume series (a projection or screenshot?); select another series")
    iops = np.array([f.orientation for f in frames])
    distinct = np.unique(np.round(iops / ORIENTATION_ATOL).astype(np.int64), axis=0)
    if np.max(np.abs(iops - iops[0])) > ORIENTATION_ATOL:
        raise fail(f"mixed slice orientations: {len(distinct)} different ImageOrientationPatient values "
                   f"(e.g. {_fmt(iops[0])} and {_fmt(iops[np.argmax(np.abs(iops - iops[0]).max(axis=1))])})",
                   "this series holds several stacks (localizer/3-plane?); split it or select another series")
    spacings = [f.pixel_spacing for f in frames]
    if any(s is None for s in spacings):
        raise fail("slices without PixelSpacing", "the series lacks pixel spacing; re-export it with spacing")
    ps_arr = np.array(spacings, dtype=float)
    if not np.allclose(ps_arr, ps_arr[0], rtol=PIXEL_SPACING_RTOL, atol=0):
        raise fail(f"mixed pixel spacings {_fmt(ps_arr.min(axis=0))} to {_fmt(ps_arr.max(axis=0))}",
                   "select a series whose slices share one pixel spacing")
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
        raise fail(f"duplicate slice positions: {involved} of {len(frames)} slices share a position with another (up to "
                   f"{max(per_pos.values())} at one position, e.g. {frames[dups[0]].path.name} and "
                   f"{frames[dups[0] + 1].path.name} at {t[dups[0]]:.2f} mm along the normal)",
                   "the series holds several volumes (time points, echoes) or repeated slices; split it")
    geometry_dir = tuple(np.column_stack([r, c, n]).ravel())
    if len(frames) == 1:
        f = frames[0]
        geometry = Geometry((1, f.rows, f.cols), (f.thickness or 1.0, dy, dx), tuple(pos[0]), geometry_dir)
        return ReadPlan(frames, geometry, t, np.zeros((1, 2)), False)
    if len(frames) == 2 and not allow_few_slices:
        raise fail("only 2 slices: too few to validate the slice spacing",
                   "pass allow_few_slices=True if you know this 2-slice series is a regular volume")
    rel = pos - pos[0]
    in_plane = rel - np.outer(rel @ n, n)
    uv = np.column_stack([in_plane @ r / dx, in_plane @ c / dy])
    shift = float(np.max(np.linalg.norm(in_plane, axis=1)))
    tilted = shift > TILT_PIXEL_FRACTION * min(dx, dy)
    if tilted and not allow_gantry_tilt:
        angle = np.degrees(np.arctan2(np.linalg.norm(in_plane[-1]), t[-1] - t[0]))
        raise fail(f"gantry tilt / sheared stack: slice positions drift {shift:.2f} mm in-plane over "
                   f"{t[-1] - t[0]:.1f} mm ({angle:.1f} degrees from the slice normal)",
                   "pass allow_gantry_tilt=True to resample onto a regular grid, or reconstruct without tilt")
    mean_step = (t[-1] - t[0]) / (len(t) - 1)
    deviation = np.abs(t - (t[0] + mean_step * np.arange(len(t))))
    uneven = float(deviation.max()) > spacing_tolerance * mean_step
    if uneven and not allow_uneven_spacing:
        med = float(np.median(steps))
        k = int(np.argmax(np.abs(steps - med)))
        ratio = steps[k] / med
        if ratio > 1.5 and abs(ratio - round(ratio)) < 0.2:
            what = (f"missing slice(s): gap of {steps[k]:.3g} mm between {frames[k].path.name} ({t[k]:.2f} mm) and "
                    f"{frames[k + 1].path.name} ({t[k + 1]:.2f} mm) along the slice normal where the spacing is "
                    f"{med:.3g} mm ({int(round(ratio)) - 1} slice(s) missing)")
        else:
            what = (f"uneven slice spacing: steps from {steps.min():.3g} to {steps.max():.3g} mm (largest at "
                    f"{frames[k].path.name}); tolerance {spacing_tolerance:.0%} of {mean_step:.3g} mm")
        raise fail(what, "add the missing files, or pass allow_uneven_spacing=True to resample onto a regular grid")
    f0 = frames[0]
    if not (tilted or uneven):
        geometry = Geometry((len(frames), f0.rows, f0.cols), (mean_step, dy, dx), tuple(pos[0]), geometry_dir)
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
    geometry = Geometry((nz, nrows, ncols), (sz, dy, dx), tuple(origin), geometry_dir)
    return ReadPlan(frames, geometry, t, uv - lo, True)


# ------------------------------------------------------------------------------------------ pixels
def _decode(plan: ReadPlan, where: Path) -> np.ndarray:
    """Stored values of every frame in plan order: (Z, Y, X) or (Z, Y, X, samples)."""
    f0 = plan.frames[0]
    by_file: dict[Path, list[tuple[int, Frame]]] = defaultdict(list)
    for k, fr in enumerate(plan.frames):
        by_file[fr.path].append((k, fr))
    out: np.ndarray | None = None
    for path, items in by_file.items():
        try:
            ds = _dcmread(path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixels = ds.pixel_array
        except Exception as exc:  # decoder errors come from many libraries
            msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) if "ds" in locals() else None
            raise DicomError(f"{path}: cannot decode pixel data{f' ({ts.name})' if ts else ''}: {msg}",
                             hint="the file is damaged or uses an unsupported compression; re-export it uncompressed") from None
        single = f0.samples == 1
        nframes = int(ds.get("NumberOfFrames", 1) or 1)
        if nframes > 1 and pixels.ndim == (3 if single else 4):
            stack = pixels
        else:
            stack = pixels[None]
        if stack.shape[1:3] != (f0.rows, f0.cols):
            raise DicomError(f"{path}: pixel data shape {stack.shape[1:]} does not match Rows/Columns",
                             hint="the file is damaged; re-export it")
        if out is None:
            out = np.empty((len(plan.frames),) + stack.shape[1:], dtype=stack.dtype)
        for k, fr in items:
            out[k] = stack[fr.index or 0] if fr.index is not None else stack[0]
    assert out is not None
    return out


def _apply_rescale(stored: np.ndarray, frames: list[Frame]) -> np.ndarray:
    slopes = np.array([f.slope for f in frames], dtype=float)
    inters = np.array([f.intercept for f in frames], dtype=float)
    shape = (-1,) + (1,) * (stored.ndim - 1)
    if np.all(slopes == 1) and np.all(inters == 0):
        return stored
    if np.all(slopes == np.round(slopes)) and np.all(inters == np.round(inters)) and stored.dtype.kind in "iu":
        vals = stored.astype(np.int64) * slopes.astype(np.int64).reshape(shape) + inters.astype(np.int64).reshape(shape)
        lo, hi = int(vals.min()), int(vals.max())
        for dt in (stored.dtype, np.int16, np.int32, np.int64):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                return vals.astype(dt)
    return (stored.astype(np.float32) * slopes.astype(np.float32).reshape(shape)
            + inters.astype(np.float32).reshape(shape))


def _resample(data: np.ndarray, plan: ReadPlan) -> np.ndarray:
    """Resample (C, Z, Y, X) slices at positions ``plan.t`` with in-plane offsets onto ``plan.geometry``."""
    from scipy import ndimage

    g = plan.geometry
    fill = float(data.min())
    t = plan.t - plan.t[0]
    tz = np.arange(g.shape[0]) * g.spacing[0]
    out = np.empty((data.shape[0],) + g.shape, dtype=np.float32)
    cache: dict[int, np.ndarray] = {}

    def slab(k: int) -> np.ndarray:
        if k not in cache:
            off_u, off_v = plan.uv[k]
            cache[k] = np.stack([
                ndimage.affine_transform(data[ch, k].astype(np.float32), np.eye(2), offset=(-off_v, -off_u),
                                         output_shape=g.shape[1:], order=1, cval=fill)
                for ch in range(data.shape[0])
            ])
        return cache[k]

    for m, tm in enumerate(tz):
        k = int(np.clip(np.searchsorted(t, tm, side="right") - 1, 0, len(t) - 2))
        w = float(np.clip((tm - t[k]) / (t[k + 1] - t[k]), 0.0, 1.0))
        out[:, m] = slab(k) if w < 1e-6 else slab(k + 1) if w > 1 - 1e-6 else (1 - w) * slab(k) + w * slab(k + 1)
        for old in [key for key in cache if key < k]:
            del cache[old]
    if data.dtype.kind in "iu":
        info = np.iinfo(data.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(data.dtype)
    return out.astype(data.dtype, copy=False)


# --------------------------------------------------------------------------------------------- API
def _check_options(unknown: dict[str, Any]) -> None:
    if unknown:
        raise UsageError(f"unknown DICOM option(s) {sorted(unknown)}", hint=f"valid options: {', '.join(READ_OPTIONS)}")


def _select(path: str | os.PathLike[str], series: str | None, modality: str | None) -> tuple[Path, DicomSeries]:
    where = Path(path)
    found, _ = list_series(where)
    if where.is_file() and not found:
        raise DicomError(f"{where}: not a readable DICOM file", hint="check the file (it may be truncated or not DICOM)")
    return where, choose_series(found, where, series=series, modality=modality)


def dicom_geometry(path: str | os.PathLike[str], *, series: str | None = None, modality: str | None = None,
                   allow_uneven_spacing: bool = False, allow_few_slices: bool = False, allow_gantry_tilt: bool = False,
                   spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE, **unknown: Any) -> tuple[Geometry, DicomSeries]:
    """Geometry that :func:`read_dicom` would return, from headers only, and the chosen series."""
    _check_options(unknown)
    where, chosen = _select(path, series, modality)
    plan = plan_series(chosen, where, allow_uneven_spacing=allow_uneven_spacing, allow_few_slices=allow_few_slices,
                       allow_gantry_tilt=allow_gantry_tilt, spacing_tolerance=spacing_tolerance)
    return plan.geometry, chosen


def read_dicom(path: str | os.PathLike[str], *, series: str | None = None, modality: str | None = None,
               allow_uneven_spacing: bool = False, allow_few_slices: bool = False, allow_gantry_tilt: bool = False,
               spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE, **unknown: Any) -> tuple[np.ndarray, Geometry]:
    """Read a DICOM series (folder) or file as ``(array[C, Z, Y, X], Geometry)``; options: module docstring."""
    _check_options(unknown)
    if not 0 < spacing_tolerance < 1:
        raise UsageError(f"spacing_tolerance must be in (0, 1), got {spacing_tolerance}")
    where, chosen = _select(path, series, modality)
    plan = plan_series(chosen, where, allow_uneven_spacing=allow_uneven_spacing, allow_few_slices=allow_few_slices,
                       allow_gantry_tilt=allow_gantry_tilt, spacing_tolerance=spacing_tolerance)
    data = _apply_rescale(_decode(plan, where), plan.frames)
    data = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    if plan.resample:
        data = _resample(data, plan)
    return np.ascontiguousarray(data), plan.geometry


# ----------------------------------------------------------------------------------------- writing
SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def _stored_values(array: np.ndarray, rescale: bool) -> tuple[np.ndarray, float, float]:
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    integral = arr.dtype.kind in "iu" or (arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)))
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if integral and lo >= -32768 and hi <= 32767:
        return arr.astype(np.int16), 1.0, 0.0
    if integral and lo >= 0 and hi <= 65535:
        return arr.astype(np.uint16), 1.0, 0.0
    if not rescale:
        raise UsageError(f"values {lo:g}..{hi:g} do not fit 16-bit integers", hint="pass rescale=True")
    if not np.all(np.isfinite(arr)):
        raise UsageError("array has non-finite values; DICOM cannot store them")
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.clip(np.rint((arr.astype(np.float64) - lo) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, lo


def write_dicom_series(folder: str | os.PathLike[str], array_zyx: np.ndarray, geometry: Geometry, *,
                       modality: str = "CT", series_description: str = "segpipe", patient_id: str = "SEGPIPE",
                       patient_name: str = "SEGPIPE^DEMO", rescale: bool = True, series_number: int = 1,
                       study_instance_uid: str | None = None, frame_of_reference_uid: str | None = None,
                       series_instance_uid: str | None = None) -> Path:
    """Write ``array_zyx`` as a single-frame series (one file per slice) into ``folder`` atomically.

    Slices are written along the geometry's z axis (which must be perpendicular to the slices).
    Integer data fitting 16 bits are stored as they are (slope 1, intercept 0); anything else needs
    ``rescale=True`` and is stored as uint16 with RescaleSlope/RescaleIntercept (floats are then
    quantised to 1/65535 of their range). An existing ``folder`` is replaced.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    modality = modality.upper()
    if modality not in SOP_CLASSES:
        raise UsageError(f"write_dicom_series: modality {modality!r} not supported", hint=f"use one of {sorted(SOP_CLASSES)}")
    arr = np.asarray(array_zyx)
    if arr.shape != geometry.shape:
        raise UsageError(f"write_dicom_series: array shape {arr.shape} does not match geometry {geometry.shape}")
    d = geometry.direction_matrix
    r, c, z = d[:, 0], d[:, 1], d[:, 2]
    if abs(np.dot(np.cross(r, c), z)) < 1 - 1e-6:
        raise UsageError("write_dicom_series: geometry z axis is not perpendicular to the slices",
                         hint="resample to an orthogonal grid first")
    stored, slope, intercept = _stored_values(arr, rescale)
    target = Path(folder)
    study = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_ref = frame_of_reference_uid or generate_uid()
    today = datetime.datetime.now()
    with atomic_folder(target) as tmp:
        for k in range(arr.shape[0]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
            ds.Modality, ds.SeriesDescription, ds.SeriesNumber = modality, series_description, series_number
            ds.PatientID, ds.PatientName = patient_id, patient_name
            ds.PatientBirthDate = ds.PatientSex = ds.ReferringPhysicianName = ds.AccessionNumber = ""
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = today.strftime("%Y%m%d")
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = today.strftime("%H%M%S")
            ds.StudyID, ds.Manufacturer, ds.ImageType = "1", "segpipe", ["DERIVED", "SECONDARY", "AXIAL"]
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame_ref
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [f"{v:.6f}" for v in geometry.index_to_world([k, 0, 0])]
            ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([r, c])]
            ds.PixelSpacing = [f"{geometry.spacing[1]:.8g}", f"{geometry.spacing[2]:.8g}"]
            ds.SliceThickness = ds.SpacingBetweenSlices = f"{geometry.spacing[0]:.8g}"
            ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
            ds.save_as(tmp / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
    return target
