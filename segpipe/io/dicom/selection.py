"""Choosing the series to read: SeriesInstanceUID, description glob or ``re:`` regex, modality."""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from pathlib import Path

from ...errors import DicomError, UsageError
from .discovery import REPORTED, SKIP_DICOMDIR, DicomSeries, scan_folder

log = logging.getLogger("segpipe.io.dicom")  # one logger for the package, as named before the split


REGEX_PREFIX = "re:"
#: descriptions named in the one-line refusal of several series (more are elided)
MAX_NAMED_SERIES = 4


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
    ``re:`` followed by a case-insensitive regular expression searched in it (see :mod:`segpipe.io.dicom`).
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
        if len(found) > MAX_NAMED_SERIES:  # one line however many series: `segpipe info` has the table
            names = list(dict.fromkeys(s.description or s.kind for s in found))
            listing = f"{len(found)} series: " + ", ".join(f"'{n}'" for n in names[:MAX_NAMED_SERIES]) + ", …"
        reasons = list(skipped_reasons or [])
        skipped = f"; {'; '.join(reasons[:2])}" if reasons else ""
        if len(reasons) > 2:
            skipped += f"; {len(reasons) - 2} more skipped"
        hint = (
            "pass a folder holding an image series, or select one of those listed by UID or description "
            f"(`segpipe info {where}` lists them)"
        )
        if series is not None and not series.startswith(REGEX_PREFIX) and not any(ch in series for ch in "*?["):
            hint += f" (a glob matches the whole description: try series='*{series}*', or 're:{series}' for a regex)"
        raise DicomError(f"{where}: {what} (found: {listing}{skipped})", hint=hint)
    # One short line: the count, their descriptions (the words series= takes) and how to choose;
    # the full listing (UIDs, sizes, folders) is a table of its own, `segpipe info`'s.
    descriptions = list(dict.fromkeys(s.description for s in pool if s.description))
    shown = ", ".join(f"'{d}'" for d in descriptions[:MAX_NAMED_SERIES])
    if len(descriptions) > MAX_NAMED_SERIES:
        shown += ", …"
    example = (
        f"series='{descriptions[0]}'"
        if descriptions and sum(s.description == descriptions[0] for s in pool) == 1
        else f"series={pool[0].uid}"
    )
    raise DicomError(
        f"{where}: {len(pool)} image series{' match ' + wanted if wanted else ''}"
        f"{f' ({shown})' if shown else ''}; choose one with series=",
        hint=f"e.g. {example}: series= takes a SeriesInstanceUID, a description glob or 're:REGEX' "
        f"(modality=... narrows the choice); `segpipe info {where}` lists them",
    )


def select_series(path: str | os.PathLike[str], series: str | None, modality: str | None) -> tuple[Path, DicomSeries]:
    where = Path(path)
    scan = scan_folder(where)
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
        if warning not in REPORTED:  # once per process; describe_dicom's listing counts as reported
            REPORTED.add(warning)
            log.warning("%s: %s", where, warning)
    return where, chosen
