"""`segpipe check`: read every case once and report every problem, with case and file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .io.datasets import Dataset, Finding, check_case_ids, inspect_case, load_dataset
from .splits import too_few_for_folds

#: the ``case`` of a finding about the whole dataset rather than one case
DATASET_WIDE = "(dataset)"


@dataclass
class CheckReport:
    dataset: dict[str, Any]
    cases_checked: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def cases_with_errors(self) -> list[str]:
        return sorted({f.case for f in self.errors if f.case != DATASET_WIDE})

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "cases_checked": self.cases_checked,
            "ok": self.ok,
            "cases_with_errors": self.cases_with_errors,
            "findings": [f.to_dict() for f in self.findings],
        }


def _image_dtype(path: Any) -> str | None:
    """The stored voxel type of an image file (None for a DICOM series or an unreadable header)."""
    from .errors import SegpipeError
    from .io.formats import image_extension
    from .io.image import read_header

    if image_extension(path) is None:
        return None
    try:
        return read_header(path).dtype
    except SegpipeError:
        return None


def _orientation_findings(ds: Dataset, case: Any) -> list[Finding]:
    """A warning for each NIfTI file of the case whose header declares no orientation."""
    from .io.nifti import NO_ORIENTATION_FIX, no_orientation_warning

    out = []
    for path in case.files():
        warning = no_orientation_warning(path)
        if warning:
            try:
                name = str(path.relative_to(ds.root))
            except ValueError:
                name = str(path)
            out.append(Finding(case.id, name, "no_orientation", warning, NO_ORIENTATION_FIX, "warning"))
    return out


def _dicom_assumptions(ds: Dataset, case: Any) -> list[tuple[Any, str]]:
    """What reading each DICOM image source of ``case`` assumes (1 mm for a missing PixelSpacing, …):
    (source, warning) for the series the dataset's selection reads."""
    from .errors import SegpipeError
    from .io.dicom import describe_dicom
    from .io.image import is_dicom_source

    out = []
    options = dict(ds.dicom_options or {})
    for source in case.images:
        if not is_dicom_source(source):
            continue
        try:
            listing = describe_dicom(source, series=options.get("series"), modality=options.get("modality"))
        except SegpipeError:
            continue  # reading it reports the problem
        for item in listing["series"]:
            if item["uid"] == listing["chosen"]:
                out += [(source, text) for text in item["warnings"]]
    return out


def _relative(path: Any, ds: Dataset) -> str:
    try:
        return str(Path(path).relative_to(ds.root))
    except ValueError:
        return str(path)


def _inspect_findings(ds: Dataset, case: Any) -> tuple[list[Finding], dict[str, Any] | None]:
    """One case's findings, and what the dataset-wide checks need of it: the classes its label
    holds, each channel's 0.5-99.5 % intensity range and the stored voxel type (None after an error)."""
    import numpy as np

    data, findings = inspect_case(case, ds)
    findings += _orientation_findings(ds, case)
    findings += [  # what a reader assumed is a finding too: the geometry segpipe uses rests on it
        Finding(
            case.id,
            _relative(source, ds),
            "reader_assumption",
            text,
            "check the header; the geometry segpipe uses is what this says",
            "warning",
        )
        for source, text in _dicom_assumptions(ds, case)
    ]
    if data is None:
        return findings, None
    ranges = []
    for c in range(data.image.shape[0]):
        channel = data.image[c]
        step = max(1, channel.size // 200_000)  # a strided sample is plenty for a range
        lo, hi = np.percentile(channel.ravel()[::step], [0.5, 99.5])
        ranges.append((float(lo), float(hi)))
    stats = {
        "classes": None if data.label is None else sorted(int(v) for v in np.unique(data.label)),
        "ranges": ranges,
        "dtype": _image_dtype(case.images[0]),
    }
    return findings, stats


#: cases whose intensity ranges differ by more than this factor are worth a look (uint8 beside float)
RANGE_RATIO_WARN = 100.0


def _dataset_findings(ds: Dataset, stats: list[dict[str, Any]]) -> list[Finding]:
    """What no single case shows: no foreground anywhere, a declared class in no case, intensity
    ranges or voxel types mixed across cases."""
    import numpy as np

    out: list[Finding] = []
    labelled = [s for s in stats if s["classes"] is not None]
    if labelled and len(labelled) == len(ds.cases):  # judged on every label map, not on what could be read
        present = set().union(*(s["classes"] for s in labelled))
        declared = sorted(v for v in ds.labels if v > 0 and str(ds.labels[v]).lower() != "ignore")
        if not present - {0} - {v for v in ds.labels if str(ds.labels[v]).lower() == "ignore"}:
            out.append(
                Finding(
                    DATASET_WIDE,
                    "dataset.json",
                    "no_foreground",
                    f"none of the {len(labelled)} readable label maps holds any foreground: there is nothing to learn",
                    "check the label files (exported empty? wrong files?) and the label values of dataset.json",
                )
            )
        else:
            absent = [v for v in declared if v not in present]
            if absent:
                names = ", ".join(f"{v} ({ds.labels[v]})" for v in absent)
                out.append(
                    Finding(
                        DATASET_WIDE,
                        "dataset.json",
                        "absent_class",
                        f"declared class {names} is in no label map: the network cannot learn it",
                        "add cases that contain it, or remove it from dataset.json's labels and renumber",
                        "warning",
                    )
                )
    channels = min((len(s["ranges"]) for s in stats), default=0)
    for c in range(channels):
        widths = np.array([max(abs(s["ranges"][c][0]), abs(s["ranges"][c][1])) for s in stats])
        widths = widths[widths > 0]
        if widths.size >= 2 and widths.max() / widths.min() > RANGE_RATIO_WARN:
            order = np.argsort([max(abs(s["ranges"][c][0]), abs(s["ranges"][c][1])) for s in stats])
            lo_s, hi_s = stats[int(order[0])], stats[int(order[-1])]
            out.append(
                Finding(
                    DATASET_WIDE,
                    "dataset.json",
                    "mixed_intensity_ranges",
                    f"channel {c}: intensity ranges differ {widths.max() / widths.min():.0f}-fold across cases "
                    f"(case {lo_s['case']}: {lo_s['ranges'][c][0]:.4g}..{lo_s['ranges'][c][1]:.4g}, "
                    f"case {hi_s['case']}: {hi_s['ranges'][c][0]:.4g}..{hi_s['ranges'][c][1]:.4g}, 0.5-99.5 %)",
                    "fine when each image is normalised on its own (z-score); check the export otherwise "
                    "(rescaled or raw values mixed)",
                    "warning",
                )
            )
    dtypes = sorted({s["dtype"] for s in stats if s["dtype"]})
    if len(dtypes) > 1:
        counts = {d: sum(1 for s in stats if s["dtype"] == d) for d in dtypes}
        out.append(
            Finding(
                DATASET_WIDE,
                "dataset.json",
                "mixed_voxel_types",
                "images are stored with different voxel types: " + ", ".join(f"{n} {d}" for d, n in counts.items()),
                "usually harmless; check that all images went through the same export",
                "warning",
            )
        )
    return out


def check_dataset(
    dataset: str | os.PathLike[str] | Dataset, *, num_workers: int | None = None, include_test: bool = True
) -> CheckReport:
    """Read every case of ``dataset`` once, on :mod:`segpipe.parallel`'s worker processes.

    Processes rather than threads: a case that exhausts memory kills one worker (a clear error
    naming the case) instead of the whole command, and pure-Python parsing runs in parallel.
    """
    from .parallel import parallel_list

    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    check_case_ids(ds.all_cases(), ds.root)  # load_dataset did so already; a Dataset built by hand did not
    cases = ds.all_cases() if include_test else list(ds.cases)
    findings: list[Finding] = []
    per_case = parallel_list(
        partial(_inspect_findings, ds),
        cases,
        num_workers=num_workers,
        desc="check",
        names=lambda i: f"case {cases[i].id}",
        context=str(ds.root),
        first_in_parent=True,
    )
    stats: list[dict[str, Any]] = []
    for case, (result, case_stats) in zip(cases, per_case, strict=True):  # input order: deterministic report
        findings.extend(result)
        if case_stats is not None:
            stats.append({"case": case.id, **case_stats})
    few = too_few_for_folds(len(ds.cases))
    if few:
        findings.append(
            Finding(
                DATASET_WIDE,
                "dataset.json",
                "too_few_cases",
                few,
                "add labelled cases" + (" (or train with fold=all)" if ds.cases else ""),
                # nothing at all is an error; unlabelled cases alone can still be segmented
                "warning" if ds.all_cases() else "error",
            )
        )
    findings.extend(_dataset_findings(ds, stats))
    return CheckReport(ds.summary(), len(cases), findings)
