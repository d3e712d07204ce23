"""Batch prediction: what ``segpipe infer INPUT`` segments, where the results go, and re-runs.

**Inputs** (:func:`discover_inputs`): an image file (NIfTI, NRRD, MHA) or a DICOM file or series
folder is one case; a dataset folder (with ``dataset.json``) gives its test cases (``imagesTs``);
any other folder gives one case per image file in it (nnU-Net's channel naming
``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, … groups a multi-channel case) and one case per
subfolder (a DICOM series, or the channel files of one case).

**Outputs** (:func:`infer_cases`), per case in the output folder: ``<case>.nii.gz`` (the label
map on the input's own grid; ``format=nrrd|mha`` too), for a DICOM series also ``<case>_seg.dcm``
(a DICOM-SEG referencing the source series, one segment per class), ``<case>.json`` (volume per class in mL,
the model, the options, versions and timings) and, on request, ``<case>_probabilities.npy``
(float16 [K, Z, Y, X] on the same grid). Every file is written atomically and the report last, so
a case counts as finished only when its report exists, names the same model and options, and every
file it names is there: a re-run (after a kill, say) skips finished cases and redoes the rest;
``overwrite`` redoes all. A case's outputs are all or nothing: a case that cannot be read, segmented
or written (a DICOM-SEG its series' headers cannot give, say) is reported with its fix and leaves
none of its files; the others go on, and the result lists the failures (the CLI's exit code is then
non-zero). A full or read-only disk stops a one-process batch instead, since every later case would fail
too. With ``trainer=ddp devices=N`` the cases are shared out among several processes, each written
by one of them (:mod:`segpipe.inference.distributed`); the files and the summary are the same.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, SegpipeError, UsageError
from ..io.atomic import save_npy, sweep_temporaries
from ..io.formats import CHANNEL_NAME, IMAGE_EXTENSIONS, case_id_of, image_extension
from ..io.image import write_image
from ..io.jsonio import read_json, write_json
from ..settings import configured
from .batch_report import BatchReport, case_figures, remove_figures
from .flags import channel_flags, class_intensities, output_flags
from .predictor import Prediction, Predictor

__all__ = [
    "OUTPUT_FORMATS",
    "CaseOutcome",
    "InputCase",
    "default_output_dir",
    "discover_inputs",
    "infer_cases",
    "prediction_identity",
    "prepare_output",
    "segment_case",
]

log = logging.getLogger("segpipe")

#: ``format=`` of the label maps and the extension it writes
OUTPUT_FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "nrrd": ".nrrd", "mha": ".mha", "seg.nrrd": ".seg.nrrd"}
REPORT_FORMAT = "segpipe.prediction"


@dataclass(frozen=True)
class InputCase:
    """One case to segment: its id (the output's name) and its sources (channel files or one DICOM source)."""

    id: str
    sources: tuple[Path, ...]
    channel_names: tuple[str, ...] | None = None  # what the input's own dataset.json calls its channels


def _is_dicom_file(path: Path) -> bool:
    from ..io.image import is_dicom_source

    return path.is_file() and image_extension(path) is None and is_dicom_source(path)


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _group_images(files: list[Path], in_channels: int, where: Path) -> list[InputCase]:
    """Image files of one folder as cases: ``<case>_0000…`` names group channels, others are one case each."""
    groups: dict[str, list[tuple[int, Path]]] = {}
    cases = []
    for f in files:
        stem = f.name[: -len(image_extension(f) or "")]
        m = CHANNEL_NAME.match(stem)
        if m:
            groups.setdefault(m["case"], []).append((int(m["channel"]), f))
        else:
            cases.append(InputCase(stem, (f,)))
    for case_id, members in sorted(groups.items()):
        members.sort()
        channels = [c for c, _ in members]
        if channels != list(range(len(members))):
            raise UsageError(
                f"{where}: case {case_id} has channel files {', '.join(p.name for _, p in members)}",
                hint="name the channels <case>_0000, <case>_0001, … without gaps",
            )
        if in_channels > 1 and len(members) > 1 and len(members) != in_channels:
            raise UsageError(
                f"{where}: case {case_id} has {len(members)} channel files, the model expects {in_channels}",
                hint="provide every channel as <case>_0000 … (or one multi-channel file)",
            )
        cases.append(InputCase(case_id, tuple(p for _, p in members)))
    return cases


def discover_inputs(path: str | os.PathLike[str], *, in_channels: int = 1) -> list[InputCase]:
    """The cases of an ``infer`` input (see the module docstring), in name order."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(
            f"{p}: no such file or folder", hint="give an image file, a DICOM folder, or a folder of cases"
        )
    if p.is_file():
        if image_extension(p) is None and not _is_dicom_file(p):
            raise UsageError(
                f"{p}: not an image segpipe reads",
                hint=f"give a {', '.join(IMAGE_EXTENSIONS)} file, a DICOM file or a DICOM series folder",
            )
        return [InputCase(case_id_of(p), (p,))]
    if (p / "dataset.json").is_file():
        from ..io.datasets import load_dataset

        ds = load_dataset(p)
        if not ds.test_cases:
            raise UsageError(
                f"{p}: the dataset lists no test cases (imagesTs)",
                hint="give the folder of images to segment instead, or add them to imagesTs",
            )
        names = tuple(str(v) for _, v in sorted(ds.channel_names.items()))
        return [InputCase(c.id, tuple(c.images), names) for c in ds.test_cases]
    entries = _visible(p)
    images = [e for e in entries if e.is_file() and image_extension(e)]
    dicom_files = [e for e in entries if e.is_file() and not image_extension(e) and _is_dicom_file(e)]
    folders = [e for e in entries if e.is_dir()]
    if dicom_files and not images:
        return [InputCase(p.name, (p,))]  # one DICOM series folder (the reader picks and checks the series)
    cases = _group_images(images, in_channels, p)
    for folder in folders:
        inner = [e for e in _visible(folder) if e.is_file() and image_extension(e)]
        if inner:
            if len(inner) > 1 and in_channels == 1:
                raise UsageError(
                    f"{folder}: {len(inner)} image files in one case folder, the model takes one channel",
                    hint="put one image per case folder, or give the folder of images itself",
                )
            cases.append(InputCase(folder.name, tuple(sorted(inner))))
        else:
            cases.append(InputCase(folder.name, (folder,)))  # a DICOM series (checked when read)
    if not cases:
        raise UsageError(f"{p}: no image or DICOM series found", hint="give an image file or a folder of cases")
    ids = [c.id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise UsageError(
            f"{p}: several inputs would be written as {', '.join(dupes)}",
            hint="rename them so that every case has its own name",
        )
    return sorted(cases, key=lambda c: c.id)


def default_output_dir(path: str | os.PathLike[str]) -> Path:
    """``<INPUT>_segpipe`` beside the input (``scan.nii.gz`` → ``scan_segpipe/``)."""
    p = Path(path).expanduser().resolve()
    name = p.name
    ext = image_extension(p)
    if ext and p.is_file():
        name = name[: -len(ext)]
    return p.parent / f"{name}_segpipe"


def _finished_report(report_path: Path, label_path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The report of a finished case (it names ``identity`` and every file it names is there), else None."""
    if not (report_path.is_file() and label_path.is_file()):
        return None
    try:
        report = read_json(report_path, what="prediction report", hint="segment the case again", expect=None)
    except Exception:  # noqa: BLE001 - an unreadable report means the case is redone
        return None
    if not (isinstance(report, dict) and report.get("format") == REPORT_FORMAT and report.get("identity") == identity):
        return None
    named = [report.get(key) for key in ("label_map", "dicom_seg", "probabilities", "labels_file")]
    done = all((report_path.parent / name).is_file() for name in named if isinstance(name, str) and name)
    return report if done else None


def _report(
    case: InputCase, pred: Prediction, label_path: Path, identity: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    from .._version import versions

    return {
        "format": REPORT_FORMAT,
        "case": case.id,
        "sources": [str(s) for s in case.sources],
        "label_map": label_path.name,
        "labels": {str(k): v for k, v in pred.labels.items()},
        **({"region_volume_ml": _region_volumes(pred, identity["regions"])} if identity.get("regions") else {}),
        "geometry": pred.geometry.to_dict(),
        "identity": identity,
        "seconds": round(pred.seconds, 3),
        "timings": {k: round(v, 3) for k, v in pred.timings.items()},
        "versions": versions(),
        **extra,
    }


def _region_volumes(pred: Prediction, regions: dict[str, Any]) -> dict[str, float]:
    """Each region's volume in millilitres: the voxels holding one of its label values."""
    voxel_ml = float(np.prod(pred.geometry.spacing)) / 1000.0
    counts = np.bincount(pred.label.ravel())
    return {
        name: float(sum(int(counts[v]) for v in r["labels"] if v < counts.size)) * voxel_ml
        for name, r in regions.items()
    }


#: the label names beside a label map (``<case>_labels.json``); a ``seg.nrrd`` carries them itself
LABELS_SUFFIX = "_labels.json"


def _write_label_map(path: Path, pred: Prediction, case_id: str, fmt: str) -> dict[str, Any]:
    """The label map in ``fmt``: a Slicer ``seg.nrrd`` with named, coloured segments, or an image
    file with ``<case>_labels.json`` naming its labels; returns what the report names."""
    from ..io.seg_nrrd import write_label_sidecar, write_seg_nrrd

    if fmt == "seg.nrrd":
        write_seg_nrrd(path, pred.label, pred.geometry, pred.labels)
        return {}
    write_image(path, pred.label, pred.geometry)
    sidecar = path.with_name(f"{case_id}{LABELS_SUFFIX}")
    write_label_sidecar(sidecar, pred.labels, label_map=path.name)
    return {"labels_file": sidecar.name}


def _review(pred: Prediction, plan: Any, named: list[dict[str, Any]]) -> dict[str, Any]:
    """What a reviewer needs of a case: the volume per class, the flags (input and output), the mean intensity per class,
    the input's percentiles, and why the input was not compared (see :mod:`.flags`)."""
    check = pred.check
    flags = [*named, *(check.flags if check is not None else [])]
    volumes = pred.volumes_ml()
    flags += output_flags(pred.label, volumes, pred.labels, plan.profile)
    out: dict[str, Any] = {"volume_ml": volumes, "flags": flags}
    if check is not None:
        out["mean_intensity"] = class_intensities(check, pred.label, pred.labels)
        out["input_percentiles"] = check.percentiles
        if check.notes:
            out["input_notes"] = check.notes
    return out


def _is_dicom_case(case: InputCase) -> bool:
    from ..io.image import is_dicom_source

    return len(case.sources) == 1 and image_extension(case.sources[0]) is None and is_dicom_source(case.sources[0])


def _write_seg(path: Path, pred: Prediction, case: InputCase, predictor: Predictor) -> dict[str, Any]:
    """The DICOM-SEG of a DICOM case beside its label map. A series segpipe writes no DICOM-SEG for
    (resampled when read, multi-frame, without SeriesInstanceUID or FrameOfReferenceUID) is noted in
    the report and in a warning with its fix; any other error (headers a DICOM-SEG cannot be made
    from) is raised: the case fails."""
    from ..io.dicom_seg import SegNotSupported, write_dicom_seg

    try:
        regions = (predictor.plan.settings or {}).get("regions")
        if regions:  # one segment per region, named after it
            names = {i: str(n) for i, n in enumerate(regions["names"], start=1)}
            write_dicom_seg(
                path, pred.label, case.sources[0], names, dicom_options=predictor.dicom, regions=regions["regions"]
            )
        else:
            write_dicom_seg(path, pred.label, case.sources[0], pred.labels, dicom_options=predictor.dicom)
    except SegNotSupported as exc:
        path.unlink(missing_ok=True)
        log.warning("%s: no DICOM-SEG: %s%s", case.id, exc.message, f" (fix: {exc.hint})" if exc.hint else "")
        return {"dicom_seg": None, "dicom_seg_skipped": exc.message, "dicom_seg_fix": exc.hint}
    return {"dicom_seg": path.name}


@dataclass(frozen=True)
class CaseOutcome:
    """What became of one case: ``written``, ``skipped`` (already done) or ``failed`` (``failure``:
    ``{case, error, hint}``); ``note`` is its progress line (``"1.2 s"``, ``"already done"``, ``"failed"``)."""

    case: str
    status: str
    note: str
    failure: dict[str, Any] | None = None
    report: dict[str, Any] | None = None


def prepare_output(out_dir: str | os.PathLike[str], fmt: str) -> Path:
    """The output folder (created), after checking ``format=``; a file in its place is refused."""
    if fmt not in OUTPUT_FORMATS:
        raise UsageError(f"format={fmt} is not an output format", hint=f"format={'|'.join(OUTPUT_FORMATS)}")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file", hint="give a folder for -o")
    out.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out)  # what a killed batch left half-written
    return out


def prediction_identity(predictor: Predictor, fmt: str, probabilities: bool) -> dict[str, Any]:
    """What a finished case's report must name for a re-run to skip it: the model and the options."""
    identity = {**predictor.describe(), "format": fmt, "probabilities": bool(probabilities)}
    identity.pop("device", None)  # where it ran does not change what it wrote
    return identity


def segment_case(
    predictor: Predictor,
    case: InputCase,
    out: Path,
    *,
    fmt: str,
    identity: dict[str, Any],
    probabilities: bool | None = None,
    overwrite: bool = False,
    report_extra: dict[str, Any] | None = None,
    stop_on: frozenset[int] | None = None,
    figures: bool = False,
) -> CaseOutcome:
    """Segment one case into ``out`` (a :func:`prepare_output` folder): skip it when its report
    already names ``identity`` (and the files it names are there); otherwise write its files
    atomically, the report (with ``report_extra``) last. Its outputs are all or nothing: any error
    while reading, segmenting or writing it fails this case alone (reported with a fix) and leaves
    none of its files, and so does an interruption (then raised); a write error whose errno is in
    ``stop_on`` (default :data:`STOP_ERRNOS`: a full or read-only disk) is raised, naming the file,
    instead of failing this case alone. With ``figures`` the case's overlays for the batch report
    are written too (:func:`~.batch_report.case_figures`)."""
    probabilities = configured(probabilities, "infer.probabilities")
    ext = OUTPUT_FORMATS[fmt]
    label_path = out / f"{case.id}{ext}"
    report_path = out / f"{case.id}.json"
    prob_path = out / f"{case.id}_probabilities.npy"
    finished = None if overwrite else _finished_report(report_path, label_path, identity)
    if finished is not None:
        return CaseOutcome(case.id, "skipped", "already done", report=finished)
    report_path.unlink(missing_ok=True)  # the case is unfinished until its new report exists
    failure: dict[str, Any]

    def remove_partial() -> None:  # nothing of a failed case is left to be taken as its result
        for stale in (label_path, prob_path, out / f"{case.id}_seg.dcm", out / f"{case.id}{LABELS_SUFFIX}"):
            stale.unlink(missing_ok=True)
        remove_figures(out, case.id)

    try:
        named = channel_flags(case.channel_names, predictor.plan)
        if named and predictor.strict:
            raise DataError(named[0]["message"], hint="check that this is the right model for these images")
        pred = predictor.predict(list(case.sources), case_id=case.id, probabilities=probabilities)
        extra: dict[str, Any] = {**dict(report_extra or {}), "compute": predictor.compute()}
        extra.update(_write_label_map(label_path, pred, case.id, fmt))
        extra.update(_review(pred, predictor.plan, named))
        if figures:
            t_fig = time.perf_counter()
            remove_figures(out, case.id)
            extra["figures"] = case_figures(out, case.id, pred, predictor.plan)
            extra["figure_seconds"] = round(time.perf_counter() - t_fig, 4)
        if _is_dicom_case(case):
            extra.update(_write_seg(out / f"{case.id}_seg.dcm", pred, case, predictor))
        if probabilities and pred.probabilities is not None:
            save_npy(prob_path, np.ascontiguousarray(pred.probabilities))
            extra["probabilities"] = prob_path.name
        written = _report(case, pred, label_path, identity, extra)
        write_json(report_path, written)
    except SegpipeError as exc:
        message = exc.message.removeprefix(f"case {case.id}: ")  # the failure names its case already
        failure = {"case": case.id, "error": message, "hint": exc.hint}
    except Exception as exc:  # whatever else goes wrong with this case is its failure alone; the batch goes on
        if isinstance(exc, OSError) and exc.errno in (STOP_ERRNOS if stop_on is None else stop_on):
            remove_partial()  # every later case would fail too: stop here
            if exc.filename is None:  # numpy, json and torch writers leave it out
                exc.filename = str(out / case.id)
            raise
        failure = {"case": case.id, "error": _one_line(exc), "hint": _unexpected_hint(exc)}
        if isinstance(exc, MemoryError):  # the machine's state, not the data: the batch ends with exit 4
            failure["out_of_memory"] = True
        log.debug("%s", traceback.format_exc())
    except BaseException:  # Ctrl-C, a termination: none of the case's files stays to be taken as its result
        remove_partial()
        raise
    else:
        return CaseOutcome(case.id, "written", f"{pred.seconds:.1f} s", report=written)
    remove_partial()
    log.error("%s: %s%s", case.id, failure["error"], f" (fix: {failure['hint']})" if failure["hint"] else "")
    return CaseOutcome(case.id, "failed", "failed", failure)


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an error segpipe did not foresee."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _unexpected_hint(exc: BaseException) -> str:
    """What to do about an error segpipe did not foresee, by its kind."""
    if isinstance(exc, MemoryError):
        return "free memory, or pass fewer windows at a time (batch_size=1), and run the same command again"
    if isinstance(exc, OSError):
        return "check the file it names (permissions, the disk) and run the same command again"
    return "rerun this case with --debug and report the traceback; the other cases are not affected"


#: write errors that no later case escapes: the batch stops (exit 4) instead of failing case after case
STOP_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)})


def infer_cases(
    predictor: Predictor,
    cases: list[InputCase],
    out_dir: str | os.PathLike[str],
    *,
    fmt: str = "nii.gz",
    probabilities: bool | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    report: bool | None = None,
) -> dict[str, Any]:
    """Segment ``cases`` into ``out_dir`` (see the module docstring); returns what was written,
    skipped and what failed (``{"output", "written", "skipped", "failed": [{case, error, hint}],
    "flagged": [{case, flags}], "report", ...}``). With ``report`` (``infer.report``) the batch's
    ``report.html`` is written before the first case and after each one (:mod:`.batch_report`)."""
    probabilities = configured(probabilities, "infer.probabilities")
    report = bool(configured(report, "infer.report"))
    out = prepare_output(out_dir, fmt)
    identity = prediction_identity(predictor, fmt, probabilities)
    page = BatchReport(out, [c.id for c in cases], identity, predictor.plan)
    page.include_folder()
    report_s = 0.0  # the report's share of the batch: its overlays and its pages

    def write_page() -> None:  # the report serves people: only a full or read-only disk stops the batch for it
        nonlocal report_s
        t = time.perf_counter()
        try:
            page.write()
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno in STOP_ERRNOS:
                raise
            if not page.failed:
                log.warning("%s: report.html not written: %s (the cases are)", out, _one_line(exc))
            page.failed = True
        report_s += time.perf_counter() - t

    if report:
        write_page()
    written: list[str] = []
    skipped: list[str] = []
    failed: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, case in enumerate(cases):
        outcome = segment_case(
            predictor,
            case,
            out,
            fmt=fmt,
            identity=identity,
            probabilities=probabilities,
            overwrite=overwrite,
            figures=report,
        )
        page.add(case.id, outcome.status, outcome.report, outcome.failure)
        if report:
            report_s += float((outcome.report or {}).get("figure_seconds", 0.0)) if outcome.status == "written" else 0.0
            write_page()
        if outcome.status == "written":
            written.append(case.id)
        elif outcome.status == "skipped":
            skipped.append(case.id)
        else:
            failed.append(outcome.failure or {"case": case.id, "error": "failed", "hint": None})
        if progress:
            progress(i + 1, len(cases), f"{case.id}: {outcome.note}")
    return {
        "output": str(out),
        "written": written,
        "skipped": skipped,
        "failed": failed,
        "flagged": page.flagged(),
        "report": str(out / "report.html") if report else None,
        "report_seconds": round(report_s, 3),
        "format": fmt,
        "seconds": round(time.perf_counter() - t0, 3),
        "model": predictor.describe(),
    }
