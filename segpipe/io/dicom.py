"""Reading DICOM image series (and writing simple ones) with validation before trust.

A folder is scanned recursively, **headers only**; DICOMDIR files (any byte order) are
skipped and every object is grouped by SeriesInstanceUID (a series whose SOP instances occur in
several folders, i.e. copies, is split per folder). Files without a SeriesInstanceUID (some
anonymisers remove it) are grouped by the tags that remain (folder, StudyInstanceUID,
SeriesNumber, SeriesDescription, Modality, SOP class, FrameOfReferenceUID, rows/columns and
orientation) into a *synthetic* series with a ``synthetic-…`` UID and a warning, then validated as
usual. SEG, RTSTRUCT, SR, presentation states and other objects without pixel rows/columns are
listed but never read as images; secondary captures are listed but only read when selected
explicitly (by ``series``, or by passing the file itself). A file that cannot be read or described is skipped with its reason (``skipped`` and
``skipped_reasons`` of :func:`describe_dicom`); it never stops the listing of the others.

Choosing the series (:func:`read_dicom` options):

* ``series``: a SeriesInstanceUID (exact), a case-insensitive glob matched against the whole
  SeriesDescription (``"t1*"`` matches ``T1post`` and ``T1pre_reg``, not ``T2_reg``; without
  wildcards it is an exact, case-insensitive match), or, with the prefix ``re:``, a
  case-insensitive regular expression searched in the SeriesDescription (``"re:^t1(?!.*reg)"``);
  ``modality``: e.g. ``"CT"`` (case-insensitive glob).
* Without a selector the only image series present is read; several candidates are an error
  that lists them (UID, modality, description, size, files). :func:`describe_dicom` shows the
  same list (``segpipe info FOLDER``).

Validation, computed from ImagePositionPatient / ImageOrientationPatient / PixelSpacing (the
per-frame and shared functional groups for enhanced and legacy-converted multi-frame objects),
never from optional tags alone. Slices are sorted by their position along the slice normal
``n = row × column`` (not by InstanceNumber), so array index z grows along ``n``:

1. all slices have the same rows/columns/samples (else *mixed sizes*), the same orientation
   (cosines within 1e-3) and the same pixel spacing (0.1 %); the pixel spacing is positive and
   the orientation is two unit vectors at a right angle;
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
lossless, JPEG-LS, JPEG 2000, RLE; 12-bit JPEG Extended needs pylibjpeg-libjpeg). pydicom's log
messages and warnings are silenced while reading; a decoding failure is one
:class:`~segpipe.errors.DicomError` naming the file, the transfer syntax and the decoder to install.
Rescale slope/intercept (per file or per frame) is applied:
float32 output when any slope/intercept is not integral, else an integer dtype wide enough
(the stored dtype, int16, int32 or int64, the first that holds the data). RGB data give three
channels. Errors are :class:`~segpipe.errors.DicomError` with one line naming the path and the
problem, and a ``fix:`` hint. MONOCHROME1 data are returned as stored (not inverted), as ITK does.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import hashlib
import logging
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import group_defaults
from ..errors import DicomError, UsageError
from ..geometry import Geometry
from .atomic import atomic_folder

log = logging.getLogger(__name__)

ORIENTATION_ATOL = 1e-3
PIXEL_SPACING_RTOL = 1e-3
TILT_PIXEL_FRACTION = 0.1
DEFAULT_SPACING_TOLERANCE = float(group_defaults("dicom")["spacing_tolerance"])  # written once, in conf/dicom/

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "SR", "PR", "KO", "DOC", "REG", "FID", "RWV"}
NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.88",
    "1.2.840.10008.5.1.4.1.1.11",
    "1.2.840.10008.5.1.4.1.1.481",
    "1.2.840.10008.5.1.4.1.1.104",
)
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
SKIP_SUFFIXES = (
    ".nii",
    ".nii.gz",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
    ".txt",
    ".md",
    ".json",
    ".yaml",
    ".py",
    ".png",
    ".jpg",
    ".zip",
    ".gz",
    ".csv",
    ".pdf",
    ".html",
)
READ_OPTIONS = (
    "series",
    "modality",
    "allow_uneven_spacing",
    "allow_few_slices",
    "allow_gantry_tilt",
    "spacing_tolerance",
)


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
    synthetic: bool = False  # no SeriesInstanceUID: grouped by the remaining tags
    warnings: list[str] = field(default_factory=list)

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
        return (
            f"{self.uid} [{self.modality}{desc}, {len(self.frames)} x {size}, {len(self.files)} files, {self.folder}]"
        )


@dataclass
class ReadPlan:
    """Validated series: frames sorted along the normal and the output grid."""

    frames: list[Frame]
    geometry: Geometry
    t: np.ndarray  # positions along the normal (mm), ascending
    uv: np.ndarray  # in-plane offsets of each slice from the first (columns, rows) in pixels
    resample: bool


# ---------------------------------------------------------------------------------------- scanning
@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
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


def _dcmread(path: Path, **kwargs: Any) -> Any:
    import pydicom

    with _quiet_pydicom():
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


def _number(value: Any, default: float) -> float:
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


def _frames_of(ds: Any, path: Path) -> tuple[list[Frame], bool]:
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
            thick = _number(get(item, "PixelMeasuresSequence", "SliceThickness"), 0.0)
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
                    _number(get(item, "PixelValueTransformationSequence", "RescaleSlope"), 1.0) or 1.0,
                    _number(get(item, "PixelValueTransformationSequence", "RescaleIntercept"), 0.0),
                    thick if thick > 0 else None,
                )
            )
        return frames, False
    ps = _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or (), 2)
    thick = abs(_number(ds.get("SpacingBetweenSlices"), 0.0)) or _number(ds.get("SliceThickness"), 0.0)
    frame = Frame(
        path,
        None,
        rows,
        cols,
        samples,
        _floats(ds.get("ImagePositionPatient") or (), 3),
        _floats(ds.get("ImageOrientationPatient") or (), 6),
        None if ps is None else (float(ps[0]), float(ps[1])),
        _number(ds.get("RescaleSlope"), 1.0) or 1.0,
        _number(ds.get("RescaleIntercept"), 0.0),
        thick if thick > 0 else None,
    )
    return [frame], nframes > 1


def _short_error(exc: BaseException) -> str:
    """First informative line of an exception, for one-line messages."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


@dataclass
class _Scan:
    """Everything a scan found: series, skipped files by category, and examples of why."""

    series: list[DicomSeries]
    skipped: Counter[str]
    examples: dict[str, list[str]]

    def reasons(self) -> list[str]:
        """One human-readable line per skip category: count, meaning, examples (file: why)."""
        out = []
        for category, count in self.skipped.items():
            files = "file" if count == 1 else "files"
            examples = self.examples.get(category, [])
            eg = f" (e.g. {'; '.join(examples)})" if examples else ""
            out.append(f"{count} {files}: {SKIP_EXPLANATIONS.get(category, category)}{eg}")
        return out


# Categories of skipped files (keys of ``skipped``) and what they mean.
SKIP_DICOMDIR = "DICOMDIR"
SKIP_BY_NAME = "not DICOM"
SKIP_UNREADABLE = "not DICOM or unreadable"
SKIP_BAD_HEADER = "unusable header"
SKIP_EXPLANATIONS = {
    SKIP_DICOMDIR: "DICOMDIR index, skipped (the images it lists are read from their own files)",
    SKIP_BY_NAME: "skipped as not DICOM by name (images, text, archives)",
    SKIP_UNREADABLE: "skipped as not DICOM or unreadable (no DICOM header could be parsed)",
    SKIP_BAD_HEADER: "skipped: DICOM header with unusable image values (Rows/Columns/frames)",
}
MAX_SKIP_EXAMPLES = 3
_REPORTED: set[str] = set()  # series warnings already shown to the user (logged or listed)
SYNTHETIC_PREFIX = "synthetic-"


def _scan(path: str | os.PathLike[str]) -> _Scan:
    root = Path(path)
    if not root.exists():
        raise DicomError(f"{root}: no such file or folder", hint="check the path")
    files = (
        [root]
        if root.is_file()
        else sorted(
            p
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    )
    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)

    def skip(category: str, f: Path, why: str = "") -> None:
        skipped[category] += 1
        if len(examples[category]) < MAX_SKIP_EXAMPLES:
            name = f.name if f == root else str(f.relative_to(root))
            examples[category].append(f"{name}: {why}" if why else name)

    groups: dict[str, DicomSeries] = {}
    anonymous: dict[tuple[Any, ...], DicomSeries] = {}
    for f in files:
        name = f.name.lower()
        if name.startswith("dicomdir"):
            skip(SKIP_DICOMDIR, f)
            continue
        if f != root and (name.endswith(SKIP_SUFFIXES) or name.startswith(("license", "readme"))):
            skip(SKIP_BY_NAME, f)
            continue
        try:
            ds = _dcmread(f, stop_before_pixels=True)
        except Exception as exc:  # anything pydicom raises means "not a readable DICOM file"
            invalid = type(exc).__name__ == "InvalidDicomError"
            skip(SKIP_UNREADABLE, f, "no DICOM header" if invalid else _short_error(exc))
            continue
        try:
            meta = getattr(ds, "file_meta", None)
            sop = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")
            if sop == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
                skip(SKIP_DICOMDIR, f)
                continue
            frames, no_geometry = _frames_of(ds, f)
            uid = str(ds.get("SeriesInstanceUID") or "").strip()
            sop_name = str(getattr(ds.get("SOPClassUID"), "name", sop) if ds.get("SOPClassUID") else sop)
            number = _number(ds.get("SeriesNumber"), float("nan"))
            modality = str(ds.get("Modality") or "")
            description = str(ds.get("SeriesDescription") or "").strip()
            frame_of_reference = str(ds.get("FrameOfReferenceUID") or "")
            sop_instance = str(ds.get("SOPInstanceUID") or f)
            study = str(ds.get("StudyInstanceUID") or "")
        except Exception as exc:  # malformed values in a parsed header
            skip(SKIP_BAD_HEADER, f, _short_error(exc))
            continue
        series_number = int(number) if np.isfinite(number) else None
        key: tuple[Any, ...] | None = None
        if uid:
            series = groups.get(uid)
        else:  # anonymised: group by what remains
            iop = frames[0].orientation if frames else None
            key = (
                str(f.parent),
                study,
                series_number,
                description,
                modality,
                sop,
                frame_of_reference,
                frames[0].rows if frames else None,
                frames[0].cols if frames else None,
                None if iop is None else tuple(np.round(iop, 3).tolist()),
            )
            series = anonymous.get(key)
            if series is None:
                uid = SYNTHETIC_PREFIX + hashlib.sha1(repr(key).encode()).hexdigest()[:12]
        if series is None:
            series = DicomSeries(
                uid,
                modality,
                description,
                series_number,
                sop,
                sop_name,
                f.parent,
                frame_of_reference=frame_of_reference,
                synthetic=key is not None,
            )
            if key is not None:
                anonymous[key] = series
            else:
                groups[uid] = series
        series.files.append(f)
        series.frames.extend(frames)
        series.sop_instances.append(sop_instance)
        series.multiframe_without_geometry |= no_geometry
    found: list[DicomSeries] = []
    for series in [*groups.values(), *anonymous.values()]:
        found.extend(_split_copies(series))
    for s in found:
        if len(s.files) > 1:
            s.folder = Path(os.path.commonpath([str(p.parent) for p in s.files]))
        if s.synthetic:
            s.warnings.append(
                f"{len(s.files)} file(s) in {s.folder} have no SeriesInstanceUID: grouped as series {s.uid} by folder, "
                "StudyInstanceUID, SeriesNumber, description, modality, FrameOfReferenceUID, size and orientation; "
                "check that they form one series"
            )
    found.sort(key=lambda s: (s.kind != "image", str(s.folder), s.series_number or 0, s.uid))
    return _Scan(found, skipped, dict(examples))


def list_series(path: str | os.PathLike[str]) -> tuple[list[DicomSeries], Counter[str]]:
    """Scan ``path`` (a folder, recursively, or one file) reading headers only.

    Returns the series found (image series first) and a count of skipped files by reason
    (``describe_dicom`` adds examples of each reason).
    """
    scan = _scan(path)
    return scan.series, scan.skipped


def _split_copies(series: DicomSeries) -> list[DicomSeries]:
    """Split a series whose SOP instances repeat (copies in several folders) by folder."""
    if len(set(series.sop_instances)) == len(series.sop_instances):
        return [series]
    by_folder: dict[Path, DicomSeries] = {}
    for f, sop in zip(series.files, series.sop_instances):
        part = by_folder.setdefault(
            f.parent,
            DicomSeries(
                series.uid,
                series.modality,
                series.description,
                series.series_number,
                series.sop_class,
                series.sop_class_name,
                f.parent,
                frame_of_reference=series.frame_of_reference,
                synthetic=series.synthetic,
            ),
        )
        part.files.append(f)
        part.sop_instances.append(sop)
        part.frames.extend(fr for fr in series.frames if fr.path == f)
        part.multiframe_without_geometry = series.multiframe_without_geometry
    return list(by_folder.values())


def _problem(series: DicomSeries) -> str | None:
    """Why the series cannot be read as it is (None when it can); never raises."""
    try:
        plan_series(
            series, Path(series.folder), allow_uneven_spacing=False, allow_few_slices=False, allow_gantry_tilt=False
        )
    except DicomError as exc:
        return exc.message.split(": ", 1)[-1]
    except Exception as exc:  # a listing describes every series it can and reports the others
        return f"cannot be described ({_short_error(exc)})"
    return None


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
    * ``warnings``: human-readable warnings about the listing (synthetic series);
    * ``chosen``: the UID that :func:`read_dicom` would read with this ``series``/``modality``
      selection, or None, and ``choice_problem``: why none can be chosen.

    A file or series that cannot be described is reported (skipped or with its ``problem``);
    it never aborts the listing. A malformed ``re:`` selector is a :class:`UsageError`.
    """
    scan = _scan(path)
    items = []
    warnings_: list[str] = []
    for s in scan.series:
        problem = _problem(s) if s.kind in ("image", "secondary-capture") else None
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
                "warnings": list(s.warnings),
            }
        )
        warnings_.extend(s.warnings)
    _REPORTED.update(warnings_)  # shown in the listing: reading the series does not log them again
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


def unique_suffixes(uids: list[str], min_len: int = 12) -> list[str]:
    """The shortest suffix of each UID (at least ``min_len`` characters) that tells it from the others.

    Identical UIDs (copies of one series in several folders) cannot be told apart by any suffix;
    they are shortened like the others. The suffix length is chosen per UID, so a long shared
    tail only lengthens the UIDs that share it.
    """
    out = []
    for i, uid in enumerate(uids):
        others = [u for j, u in enumerate(uids) if j != i and u != uid]
        n = min(min_len, len(uid))
        while n < len(uid) and any(o.endswith(uid[-n:]) for o in others):
            n += 1
        out.append(uid[-n:] if n else uid)
    return out


# --------------------------------------------------------------------------------------- selection
REGEX_PREFIX = "re:"


def _matches(pattern: str, text: str) -> bool:
    """Case-insensitive glob on the whole ``text``; ``re:…`` is a case-insensitive regex search."""
    if pattern.startswith(REGEX_PREFIX):
        try:
            return re.search(pattern[len(REGEX_PREFIX) :], text, re.IGNORECASE) is not None
        except re.error as exc:
            raise UsageError(
                f"series={pattern!r}: invalid regular expression ({exc})",
                hint="fix the pattern after 're:', or use a glob without the prefix",
            ) from None
    return fnmatch.fnmatchcase(text.lower(), pattern.lower())


def choose_series(
    found: list[DicomSeries],
    where: Path,
    *,
    series: str | None = None,
    modality: str | None = None,
    skipped_reasons: list[str] | None = None,
) -> DicomSeries:
    """The series selected by UID / description pattern / modality, or the only image series.

    ``series`` is an exact SeriesInstanceUID, a case-insensitive glob on the SeriesDescription, or
    ``re:`` followed by a case-insensitive regular expression searched in it (module docstring).
    """
    listing = "; ".join(s.label() for s in found) or "none"
    if series is not None:
        exact = [s for s in found if s.uid == series]
        if len(exact) == 1 and exact[0].kind in ("image", "secondary-capture"):
            return exact[0]
        if exact and all(s.kind not in ("image", "secondary-capture") for s in exact):
            raise DicomError(
                f"{where}: series {series} holds {exact[0].sop_class_name} objects ({exact[0].kind}), "
                "not an image series",
                hint="select an image series (segpipe info lists them)",
            )
    explicit = series is not None or where.is_file()  # secondary captures are read when asked for
    pool = [s for s in found if s.kind == "image" or (explicit and s.kind == "secondary-capture")]
    if modality is not None:
        pool = [s for s in pool if fnmatch.fnmatchcase(s.modality.lower(), modality.lower())]
    if series is not None:
        pool = [s for s in pool if s.uid == series or _matches(series, s.description)]
    if len(pool) == 1:
        return pool[0]
    wanted = " ".join(
        x for x in (f"series={series!r}" if series else "", f"modality={modality!r}" if modality else "") if x
    )
    if not pool:
        what = f"no image series matches {wanted}" if wanted else "no image series found"
        skipped = f"; {'; '.join(skipped_reasons)}" if skipped_reasons else ""
        hint = "pass a folder holding an image series, or select one of those listed by UID or description"
        if series is not None and not series.startswith(REGEX_PREFIX) and not any(ch in series for ch in "*?["):
            hint += f" (a glob matches the whole description: try series='*{series}*', or 're:{series}' for a regex)"
        raise DicomError(f"{where}: {what} (found: {listing}{skipped})", hint=hint)
    names = "; ".join(s.label() for s in pool)
    raise DicomError(
        f"{where}: {len(pool)} image series{' match ' + wanted if wanted else ''}: {names}",
        hint="select one with series=UID, a description glob or 're:REGEX' (and/or modality=...)",
    )


# -------------------------------------------------------------------------------------- validation
def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def plan_series(
    series: DicomSeries,
    where: Path,
    *,
    allow_uneven_spacing: bool = False,
    allow_few_slices: bool = False,
    allow_gantry_tilt: bool = False,
    spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
) -> ReadPlan:
    """Validate a series from its headers and compute the output grid (see the module docstring)."""
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
        iop = f.orientation if f.orientation is not None else np.array([1.0, 0, 0, 0, 1.0, 0])
        r, c = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
        geometry = grid(
            (1, f.rows, f.cols),
            (f.thickness or 1.0, ps[0], ps[1]),
            (0.0, 0.0, 0.0),
            tuple(np.column_stack([r, c, np.cross(r, c)]).ravel()),
        )
        return ReadPlan(frames, geometry, np.zeros(1), np.zeros((1, 2)), False)
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


# ------------------------------------------------------------------------------------------ pixels
# Decoding plugins of pydicom (its names) that handle a transfer syntax, and what to install.
_JPEG_LIBJPEG = (("pylibjpeg", "gdcm", "pillow"), "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)")
_DECODER_ADVICE: dict[str, tuple[tuple[str, ...], str]] = {
    "1.2.840.10008.1.2.4.50": _JPEG_LIBJPEG,  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": (("pylibjpeg",), "pylibjpeg pylibjpeg-libjpeg (GDCM and Pillow decode 8-bit JPEG only)"),
    "1.2.840.10008.1.2.4.57": (("pylibjpeg", "gdcm"), "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),
    "1.2.840.10008.1.2.4.70": (("pylibjpeg", "gdcm"), "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),
    "1.2.840.10008.1.2.4.80": (("pyjpegls", "pylibjpeg", "gdcm"), "pyjpegls (or python-gdcm)"),
    "1.2.840.10008.1.2.4.81": (("pyjpegls", "pylibjpeg", "gdcm"), "pyjpegls (or python-gdcm)"),
    "1.2.840.10008.1.2.4.90": (("pylibjpeg", "gdcm", "pillow"), "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"),
    "1.2.840.10008.1.2.4.91": (("pylibjpeg", "gdcm", "pillow"), "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"),
    "1.2.840.10008.1.2.5": (("pydicom", "pylibjpeg", "gdcm"), "pylibjpeg pylibjpeg-rle"),
}


def _decode_failure(path: Path, ds: Any, exc: BaseException) -> DicomError:
    """One-line error for pixel data that cannot be decoded: the file, the syntax, why, and what to do."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    bits = ds.get("BitsStored") if ds is not None else None
    plugins, packages = _DECODER_ADVICE.get(str(ts), ((), "")) if ts is not None else ((), "")
    text = str(exc)
    if "exceptions were raised by all available plugins" in text:  # pydicom: one line per plugin
        # the decoder that should handle this syntax first: its reason is the informative one
        lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
        rank = {name: i for i, name in enumerate(plugins)}
        lines.sort(key=lambda ln: rank.get(ln.split(":", 1)[0], len(rank)))
        why = "every installed decoder failed (" + "; ".join(lines)[:300] + ")"
    else:
        why = _short_error(exc)
    syntax = f" ({ts.name}{f', {bits}-bit' if bits else ''})" if ts is not None else ""
    message = f"{path}: cannot decode pixel data{syntax}: {why}"
    if ts is None or not getattr(ts, "is_compressed", False):
        return DicomError(message, hint="the file is truncated or damaged; re-export or replace it")
    try:
        from pydicom.pixels import get_decoder

        available = set(get_decoder(ts).available_plugins)
    except Exception:  # no decoder exists for this syntax at all (video, ...)
        available = set()
    if packages and not available.intersection(plugins):
        hint = f"install a decoder for {ts.name}: pip install {packages}"
    elif packages:
        hint = (
            f"the installed decoders ({', '.join(sorted(available))}) cannot decode it: the data may be damaged or "
            "non-conformant; decompress it with another tool (gdcmconv --raw, dcmdjpeg) or re-export it uncompressed"
        )
    else:
        hint = "segpipe cannot decode this transfer syntax; convert the series to an uncompressed one (gdcmconv --raw)"
    return DicomError(message, hint=hint)


def _decode(plan: ReadPlan, where: Path) -> np.ndarray:
    """Stored values of every frame in plan order: (Z, Y, X) or (Z, Y, X, samples)."""
    f0 = plan.frames[0]
    by_file: dict[Path, list[tuple[int, Frame]]] = defaultdict(list)
    for k, fr in enumerate(plan.frames):
        by_file[fr.path].append((k, fr))
    out: np.ndarray | None = None
    for path, items in by_file.items():
        ds = None
        try:
            ds = _dcmread(path)
            with _quiet_pydicom():
                pixels = ds.pixel_array
        except Exception as exc:  # decoder errors come from many libraries
            raise _decode_failure(path, ds, exc) from None
        single = f0.samples == 1
        nframes = int(ds.get("NumberOfFrames", 1) or 1)
        if nframes > 1 and pixels.ndim == (3 if single else 4):
            stack = pixels
        else:
            stack = pixels[None]
        if stack.shape[1:3] != (f0.rows, f0.cols) or stack.shape[3:] != (() if single else (f0.samples,)):
            raise DicomError(
                f"{path}: pixel data shape {stack.shape[1:]} does not match Rows/Columns/SamplesPerPixel "
                f"({f0.rows}, {f0.cols}, {f0.samples})",
                hint="the file is damaged; re-export it",
            )
        if out is None:
            out = np.empty((len(plan.frames),) + stack.shape[1:], dtype=stack.dtype)
        for k, fr in items:
            index = fr.index or 0
            if index >= len(stack):
                raise DicomError(
                    f"{path}: frame {index + 1} is described in the header but the pixel data hold "
                    f"{len(stack)} frame(s)",
                    hint="the file is truncated or damaged; re-export it",
                )
            out[k] = stack[index]
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
    return stored.astype(np.float32) * slopes.astype(np.float32).reshape(shape) + inters.astype(np.float32).reshape(
        shape
    )


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
            cache[k] = np.stack(
                [
                    ndimage.affine_transform(
                        data[ch, k].astype(np.float32),
                        np.eye(2),
                        offset=(-off_v, -off_u),
                        output_shape=g.shape[1:],
                        order=1,
                        cval=fill,
                    )
                    for ch in range(data.shape[0])
                ]
            )
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
    scan = _scan(where)
    if where.is_file() and not scan.series:
        if scan.skipped.get(SKIP_DICOMDIR):
            raise DicomError(
                f"{where}: a DICOMDIR index file, not an image", hint="pass the folder holding the series it lists"
            )
        why = "; ".join(e.split(": ", 1)[-1] for examples in scan.examples.values() for e in examples)
        raise DicomError(
            f"{where}: not a readable DICOM file{f' ({why})' if why else ''}",
            hint="check the file (it may be truncated or not DICOM)",
        )
    chosen = choose_series(scan.series, where, series=series, modality=modality, skipped_reasons=scan.reasons())
    for warning in chosen.warnings:
        if warning not in _REPORTED:  # once per process; describe_dicom's listing counts as reported
            _REPORTED.add(warning)
            log.warning("%s: %s", where, warning)
    return where, chosen


def dicom_geometry(
    path: str | os.PathLike[str],
    *,
    series: str | None = None,
    modality: str | None = None,
    allow_uneven_spacing: bool = False,
    allow_few_slices: bool = False,
    allow_gantry_tilt: bool = False,
    spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
    **unknown: Any,
) -> tuple[Geometry, DicomSeries]:
    """Geometry that :func:`read_dicom` would return, from headers only, and the chosen series."""
    _check_options(unknown)
    where, chosen = _select(path, series, modality)
    plan = plan_series(
        chosen,
        where,
        allow_uneven_spacing=allow_uneven_spacing,
        allow_few_slices=allow_few_slices,
        allow_gantry_tilt=allow_gantry_tilt,
        spacing_tolerance=spacing_tolerance,
    )
    return plan.geometry, chosen


def read_dicom(
    path: str | os.PathLike[str],
    *,
    series: str | None = None,
    modality: str | None = None,
    allow_uneven_spacing: bool = False,
    allow_few_slices: bool = False,
    allow_gantry_tilt: bool = False,
    spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
    **unknown: Any,
) -> tuple[np.ndarray, Geometry]:
    """Read a DICOM series (folder) or file as ``(array[C, Z, Y, X], Geometry)``; options: module docstring."""
    _check_options(unknown)
    if not 0 < spacing_tolerance < 1:
        raise UsageError(f"spacing_tolerance must be in (0, 1), got {spacing_tolerance}")
    where, chosen = _select(path, series, modality)
    plan = plan_series(
        chosen,
        where,
        allow_uneven_spacing=allow_uneven_spacing,
        allow_few_slices=allow_few_slices,
        allow_gantry_tilt=allow_gantry_tilt,
        spacing_tolerance=spacing_tolerance,
    )
    data = _apply_rescale(_decode(plan, where), plan.frames)
    data = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    if plan.resample:
        data = _resample(data, plan)
    return np.ascontiguousarray(data), plan.geometry


# ------------------------------------------------------------------------------------- detection
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
MAX_SNIFFED_FILES = 256
_RAW_GROUPS = (b"\x02\x00", b"\x08\x00")  # a DICOM stream without preamble starts with group 0002 or 0008


def _sniff(path: Path, *, raw: bool) -> bool:
    """True when ``path`` starts like DICOM: ``DICM`` at byte 128 (or, with ``raw``, a group 0002/0008 tag)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    return raw and len(head) >= 8 and head[:2] in _RAW_GROUPS and head[3] == 0 and head[2] < 0x80


def looks_like_dicom(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a DICOM file or a folder to read as DICOM, judged by content, not by name.

    A file is DICOM when it is named ``*.dcm``/``*.dicom``/``*.ima``/``DICOMDIR`` or carries the
    ``DICM`` preamble. A folder is read as DICOM when it holds (at any depth) a DICOM file (by name,
    preamble, or, for extension-less files, a raw DICOM header), or when it holds no image file
    (NIfTI/NRRD/MHA) at all (an empty folder then reports "no image series found" with what it
    skipped); a folder of image files without DICOM is not a DICOM source.
    """
    from .image import image_extension

    p = Path(path)
    if p.is_file():
        name = p.name.lower()
        return (
            name.endswith(DICOM_SUFFIXES)
            or name.startswith("dicomdir")
            or (image_extension(p) is None and _sniff(p, raw=False))
        )
    if not p.is_dir():
        return False
    images = False
    sniffed = 0
    for folder, dirs, names in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            low = name.lower()
            if name.startswith(".") or (low.endswith(SKIP_SUFFIXES) and not image_extension(low)):
                continue
            if low.endswith(DICOM_SUFFIXES) or low.startswith("dicomdir"):
                return True
            if image_extension(low):
                images = True
            elif sniffed < MAX_SNIFFED_FILES:
                sniffed += 1
                if _sniff(Path(folder) / name, raw="." not in name):
                    return True
    return not images


# ----------------------------------------------------------------------------------------- writing
SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def _stored_values(array: np.ndarray, rescale: bool) -> tuple[np.ndarray, float, float]:
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    integral = arr.dtype.kind in "iu" or (
        arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
    )
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


def write_dicom_series(
    folder: str | os.PathLike[str],
    array_zyx: np.ndarray,
    geometry: Geometry,
    *,
    modality: str = "CT",
    series_description: str = "segpipe",
    patient_id: str = "SEGPIPE",
    patient_name: str = "SEGPIPE^DEMO",
    rescale: bool = True,
    series_number: int = 1,
    study_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> Path:
    """Write ``array_zyx`` as a single-frame series (one file per slice) into ``folder`` atomically.

    Slices are written along the geometry's z axis (which must be perpendicular to the slices).
    Integer data fitting 16 bits are stored as they are (slope 1, intercept 0); anything else needs
    ``rescale=True`` and is stored as uint16 with RescaleSlope/RescaleIntercept (floats are then
    quantised to 1/65535 of their range). An existing ``folder`` is replaced.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    modality = modality.upper()
    if modality not in SOP_CLASSES:
        raise UsageError(
            f"write_dicom_series: modality {modality!r} not supported", hint=f"use one of {sorted(SOP_CLASSES)}"
        )
    arr = np.asarray(array_zyx)
    if arr.shape != geometry.shape:
        raise UsageError(f"write_dicom_series: array shape {arr.shape} does not match geometry {geometry.shape}")
    d = geometry.direction_matrix
    r, c, z = d[:, 0], d[:, 1], d[:, 2]
    if abs(np.dot(np.cross(r, c), z)) < 1 - 1e-6:
        raise UsageError(
            "write_dicom_series: geometry z axis is not perpendicular to the slices",
            hint="resample to an orthogonal grid first",
        )
    stored, slope, intercept = _stored_values(arr, rescale)
    target = Path(folder)
    study = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    frame_ref = frame_of_reference_uid or generate_uid()
    today = datetime.datetime.now()
    with atomic_folder(target) as tmp:
        for k in range(arr.shape[0]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = UID(SOP_CLASSES[modality])
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
            ds.ImagePositionPatient = [f"{v:.6f}" for v in geometry.index_to_world(np.array([k, 0, 0]))]
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
