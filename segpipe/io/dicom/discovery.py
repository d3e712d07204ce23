"""Finding DICOM: which files and folders are DICOM, and the series a folder holds (headers only)."""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ...errors import DicomError
from ..formats import image_extension
from .headers import Frame, as_number, dcmread, frames_of, short_error

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
class FolderScan:
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
REPORTED: set[str] = set()  # series warnings already shown to the user (logged or listed)
SYNTHETIC_PREFIX = "synthetic-"


@dataclass
class _Skipped:
    """Files a scan skipped, counted by category, with the first few (file: why) of each as examples."""

    root: Path
    counts: Counter[str] = field(default_factory=Counter)
    examples: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, category: str, f: Path, why: str = "") -> None:
        """Count ``f`` as skipped in ``category``, keeping it as an example while there are few."""
        self.counts[category] += 1
        if len(self.examples[category]) < MAX_SKIP_EXAMPLES:
            name = f.name if f == self.root else str(f.relative_to(self.root))
            self.examples[category].append(f"{name}: {why}" if why else name)


class _FileHeader(NamedTuple):
    """What a scan keeps of one DICOM file's header: its frames and the tags that group it into a series."""

    frames: list[Frame]
    no_geometry: bool
    uid: str
    sop: str
    sop_name: str
    series_number: int | None
    modality: str
    description: str
    frame_of_reference: str
    sop_instance: str
    study: str


@dataclass
class _SeriesGroups:
    """Series gathered by a scan: by SeriesInstanceUID, and anonymised files by the tags that remain."""

    by_uid: dict[str, DicomSeries] = field(default_factory=dict)
    anonymous: dict[tuple[Any, ...], DicomSeries] = field(default_factory=dict)

    def add(self, f: Path, header: _FileHeader) -> None:
        """Add the file ``f`` and its frames to its series, starting the series when it is the first file."""
        frames, uid = header.frames, header.uid
        key: tuple[Any, ...] | None = None
        if uid:
            series = self.by_uid.get(uid)
        else:  # anonymised: group by what remains
            iop = frames[0].orientation if frames else None
            key = (
                str(f.parent),
                header.study,
                header.series_number,
                header.description,
                header.modality,
                header.sop,
                header.frame_of_reference,
                frames[0].rows if frames else None,
                frames[0].cols if frames else None,
                None if iop is None else tuple(np.round(iop, 3).tolist()),
            )
            series = self.anonymous.get(key)
            if series is None:
                uid = SYNTHETIC_PREFIX + hashlib.sha1(repr(key).encode()).hexdigest()[:12]
        if series is None:
            series = DicomSeries(
                uid,
                header.modality,
                header.description,
                header.series_number,
                header.sop,
                header.sop_name,
                f.parent,
                frame_of_reference=header.frame_of_reference,
                synthetic=key is not None,
            )
            if key is not None:
                self.anonymous[key] = series
            else:
                self.by_uid[uid] = series
        series.files.append(f)
        series.frames.extend(frames)
        series.sop_instances.append(header.sop_instance)
        series.multiframe_without_geometry |= header.no_geometry


def scan_folder(path: str | os.PathLike[str]) -> FolderScan:
    root = Path(path)
    if not root.exists():
        raise DicomError(f"{root}: no such file or folder", hint="check the path")
    skipped = _Skipped(root)
    groups = _SeriesGroups()
    for f in _files_to_scan(root):
        header = _read_header(f, root, skipped)
        if header is not None:
            groups.add(f, header)
    found = _finished_series(groups)
    return FolderScan(found, skipped.counts, dict(skipped.examples))


def _files_to_scan(root: Path) -> list[Path]:
    """``root`` itself when it is a file, else every file under it outside hidden folders, sorted."""
    if root.is_file():
        return [root]
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _read_header(f: Path, root: Path, skipped: _Skipped) -> _FileHeader | None:
    """The header of the DICOM file ``f`` (pixels not read), or None when ``f`` is skipped: a DICOMDIR,
    not DICOM by name, unreadable, or with unusable values."""
    name = f.name.lower()
    if name.startswith("dicomdir"):
        skipped.add(SKIP_DICOMDIR, f)
        return None
    if f != root and (name.endswith(SKIP_SUFFIXES) or name.startswith(("license", "readme"))):
        skipped.add(SKIP_BY_NAME, f)
        return None
    try:
        ds = dcmread(f, stop_before_pixels=True)
    except Exception as exc:  # anything pydicom raises means "not a readable DICOM file"
        invalid = type(exc).__name__ == "InvalidDicomError"
        skipped.add(SKIP_UNREADABLE, f, "no DICOM header" if invalid else short_error(exc))
        return None
    try:
        meta = getattr(ds, "file_meta", None)
        sop = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")
        if sop == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
            skipped.add(SKIP_DICOMDIR, f)
            return None
        frames, no_geometry = frames_of(ds, f)
        uid = str(ds.get("SeriesInstanceUID") or "").strip()
        sop_name = str(getattr(ds.get("SOPClassUID"), "name", sop) if ds.get("SOPClassUID") else sop)
        number = as_number(ds.get("SeriesNumber"), float("nan"))
        modality = str(ds.get("Modality") or "")
        description = str(ds.get("SeriesDescription") or "").strip()
        frame_of_reference = str(ds.get("FrameOfReferenceUID") or "")
        sop_instance = str(ds.get("SOPInstanceUID") or f)
        study = str(ds.get("StudyInstanceUID") or "")
    except Exception as exc:  # malformed values in a parsed header
        skipped.add(SKIP_BAD_HEADER, f, short_error(exc))
        return None
    series_number = int(number) if np.isfinite(number) else None
    return _FileHeader(
        frames,
        no_geometry,
        uid,
        sop,
        sop_name,
        series_number,
        modality,
        description,
        frame_of_reference,
        sop_instance,
        study,
    )


def _finished_series(groups: _SeriesGroups) -> list[DicomSeries]:
    """The series a scan found, copies in several folders split apart, each with its common folder and
    warnings, image series first."""
    found: list[DicomSeries] = []
    for series in [*groups.by_uid.values(), *groups.anonymous.values()]:
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
    return found


def list_series(path: str | os.PathLike[str]) -> tuple[list[DicomSeries], Counter[str]]:
    """Scan ``path`` (a folder, recursively, or one file) reading headers only.

    Returns the series found (image series first) and a count of skipped files by reason
    (``describe_dicom`` adds examples of each reason).
    """
    scan = scan_folder(path)
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
