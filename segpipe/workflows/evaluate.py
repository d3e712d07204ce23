"""Evaluate a folder of predicted label maps against a folder of reference label maps.

:func:`evaluate_folders` pairs the files by case id (the file name without ``.nii.gz``, ``.nii``,
``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd``), refuses predictions that are not on their reference's
voxel grid or have no reference, and scores every case predicted and class (references without a
prediction are named in a warning and in ``summary.json``, or refused with ``strict``):

* **Dice** with nnU-Net's rules (:mod:`segpipe.evaluation.metrics`): NaN when reference and
  prediction are both empty, left out of the means;
* **HD95** (mm) and **NSD**, the normalized surface Dice at a tolerance in mm
  (:mod:`segpipe.evaluation.surface`), for the foreground classes. nnU-Net computes neither; the
  tolerance defaults to 1 mm for every class and can be set per class (``{class: mm}``, classes
  the mapping does not name keep 1 mm). The background's surface is the foreground's, so its
  HD95 and NSD are not computed (NaN, JSON ``null``);
* the voxel counts (TP, FP, FN, reference and predicted voxels) and the volumes in mL.

Voxels whose reference holds ``ignore_label`` count for no class. The classes are the keys of
``labels`` when given, else every value found in the references (predicted values no reference
holds are not scored). The classes' names come from ``labels``; without it, from the
``dataset.json`` of the references' dataset (in the references' folder or the one above it, as for
an MSD or nnU-Net dataset's ``labelsTr/`` and ``labelsTs/``), else from the reports ``segpipe infer``
wrote beside the predictions (``<case>.json``). Names found so only name the classes; they never
change which classes are scored.

Written into ``out_dir`` (default: the prediction folder), each file atomically:

* ``evaluation.csv``: one row per case and class (``nan`` where a value is NaN);
* ``summary.json``: nnU-Net's layout, ``metric_per_case`` (per case its files and per class its
  values), ``mean`` (per class, the mean over cases skipping NaN) and ``foreground_mean`` (the mean of
  the per-class means over the classes but background 0, skipping a class NaN in every case), with
  ``null`` for NaN;
* ``dice_boxplot.png``: per foreground class, a box plot of the cases' Dice and, below, of HD95;
* ``report.html``: all of it on one page for people (:mod:`segpipe.workflows.report`); its path is
  the summary's ``report`` (null when it could not be written);
* on request (``qc_image_dir``, the cases' images), ``qc/<case>.png``: three slices along the
  slowest array axis (axis 0, z) through the reference's foreground (the prediction's when the
  reference is empty), each titled with its axis and index (from 0), the image in grey, and per
  class its own colour (the same class keeps its colour in every case): the reference's contour
  wide and translucent, the prediction's dashed. A legend names the classes; the title gives the case's
  Dice per class. Slices are shown in array order (rows y, columns x), with their physical aspect
  ratio, without reorientation.

An HD95 of a case where exactly one of reference and prediction is empty is the diagonal of the
image's extent, so a missed structure weighs on the HD95 mean instead of vanishing from it.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, UsageError
from ..evaluation.metrics import confusion_counts, dice_from_counts
from ..evaluation.surface import DEFAULT_TOLERANCE_MM, class_tolerances, surface_metrics_per_class, tolerance_overrides
from ..geometry import Geometry
from ..io.atomic import write_text
from ..io.formats import channel_suffix, image_extension
from ..io.image import read_image
from ..io.jsonio import write_json
from ..settings import configured
from .evaluation_plots import BACKGROUND, QC_FOLDER, CaseLabels, write_boxplot, write_qc
from .report import write_evaluation_report

__all__ = [
    "BOXPLOT_FILE",
    "CSV_FILE",
    "QC_FOLDER",
    "SUMMARY_FILE",
    "evaluate_folders",
]

log = logging.getLogger("segpipe")

CSV_FILE = "evaluation.csv"
SUMMARY_FILE = "summary.json"
BOXPLOT_FILE = "dice_boxplot.png"
METRICS = ("Dice", "HD95", "NSD")
COUNTS = ("TP", "FP", "FN", "n_ref", "n_pred")
VOLUMES = ("volume_ref_ml", "volume_pred_ml")
FIELDS = METRICS + COUNTS + VOLUMES
LISTED = 5  # case ids named in a message before "and N more"
IMAGE_CHANNEL_SUFFIX = channel_suffix(0)  # nnU-Net's name of a case's first image channel
DATASET_JSON = "dataset.json"

Record = dict[str, float]


@dataclass
class Evaluation:
    """What a folder evaluation scored: the cases and classes (with the classes' names), each case's
    files and its metrics per class, the NSD tolerances (``overrides`` per class, else
    ``default_tol``), the ignore label, and the references left without a prediction."""

    cases: list[str]
    classes: list[int]
    names: Mapping[int, str]
    results: dict[str, dict[int, Record]]
    refs: Mapping[str, Path]
    preds: Mapping[str, Path]
    overrides: Mapping[int, float]
    default_tol: float
    ignore_label: int | None
    missing: Sequence[str] = ()


# ============================================================================ files
def _folder(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        state = "does not exist" if not p.exists() else "is not a folder"
        raise DataError(f"{p}: the {what} folder {state}", hint=f"give the folder holding the {what} files")
    return p


def _case_files(folder: Path, what: str) -> dict[str, Path]:
    """``{case id: file}`` of the image files in ``folder`` (hidden files and subfolders skipped)."""
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        ext = image_extension(p)
        if ext is None:
            continue
        case = p.name[: len(p.name) - len(ext)]
        if case in files:
            raise DataError(
                f"{folder}: case {case!r} has two {what} files ({files[case].name} and {p.name})",
                hint="keep one file per case",
            )
        files[case] = p
    return files


def _listing(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:LISTED])
    return shown if len(ids) <= LISTED else f"{shown} and {len(ids) - LISTED} more"


def _image_files(folder: Path, cases: Sequence[str]) -> dict[str, Path]:
    """The image of each case in ``folder``: ``<case>.<ext>`` or nnU-Net's ``<case>_0000.<ext>``."""
    files = _case_files(folder, "image")
    found: dict[str, Path] = {}
    for case in cases:
        path = files.get(case) or files.get(case + IMAGE_CHANNEL_SUFFIX)
        if path is not None:
            found[case] = path
    missing = [c for c in cases if c not in found]
    if missing:
        raise DataError(
            f"{folder}: no image for {len(missing)} case(s) to draw the QC overlays: {_listing(missing)}",
            hint=f"give the folder of the cases' images (<case>.nii.gz or <case>{IMAGE_CHANNEL_SUFFIX}.nii.gz), "
            "or leave out qc_image_dir",
        )
    return found


def _read_labels(path: Path, case: str, what: str, ignore_label: int | None) -> tuple[np.ndarray, Geometry]:
    """A label map ([Z, Y, X], integer) and its geometry; refuses several channels, fractions and negatives."""
    array, geometry = read_image(path)
    if array.shape[0] != 1:
        raise DataError(
            f"case {case}: the {what} {path} has {array.shape[0]} channels, a label map has one",
            hint="give one label map (one integer class per voxel) per case",
        )
    arr = array[0]
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        finite = np.where(bad, 0.0, arr)
        bad |= finite != np.round(finite)
        if bad.any():
            example = float(arr[bad].flat[0])
            raise DataError(
                f"case {case}: the {what} {path} holds non-integer values (e.g. {example:g}), not labels",
                hint="write label maps with one integer class per voxel (the argmax of probabilities)",
            )
        arr = arr.astype(np.int32)
    elif arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind not in "iu":
        raise DataError(
            f"case {case}: the {what} {path} holds {arr.dtype} values, not integer labels",
            hint="write label maps with one integer class per voxel",
        )
    if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
        negative = arr[arr < 0]
        if what != "reference" or ignore_label is None or bool((negative != ignore_label).any()):
            raise DataError(
                f"case {case}: the {what} {path} holds negative labels ({int(negative.min())})",
                hint="labels are 0 (background) and positive classes; give a reference's unlabelled value "
                "as ignore_label",
            )
    return arr, geometry


def _values(arr: np.ndarray) -> set[int]:
    """The label values present in ``arr``."""
    if arr.size == 0:
        return set()
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi < 1 << 16:
        return {int(v) for v in np.flatnonzero(np.bincount(arr.ravel().astype(np.intp, copy=False)))}
    return {int(v) for v in np.unique(arr)}


def _label_names(labels: Mapping[Any, Any] | None) -> dict[int, str] | None:
    """``{class: name}`` from ``{class: name}`` (keys may be digit strings) or dataset.json's ``{name: class}``."""
    if labels is None:
        return None
    out: dict[int, str] = {}
    for key, value in labels.items():
        try:
            out[int(key)] = str(value)
            continue
        except (TypeError, ValueError):
            pass
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            out[int(value)] = str(key)
        else:
            raise UsageError(
                f"labels must map class values to names, got {key!r}: {value!r}",
                hint='give e.g. {0: "background", 1: "liver"}',
            )
    return out


def _names_beside(ref_folder: Path, pred_folder: Path, cases: Sequence[str]) -> dict[int, str]:
    """Class names when none were given: the ``dataset.json`` of the references' dataset (in their folder
    or the one above it), else a ``segpipe infer`` report beside a prediction; ``{}`` when neither names
    them. Only names: what is scored does not depend on them."""
    for folder in (ref_folder, ref_folder.parent):
        path = folder / DATASET_JSON
        names = _names_in(path, "labels")
        if names:
            log.debug("class names from %s", path)
            return names
    for case in cases[:LISTED]:
        names = _names_in(pred_folder / f"{case}.json", "labels")
        if names:
            return names
    return {}


def _regions_beside(ref_folder: Path, pred_folder: Path, cases: Sequence[str]) -> dict[str, Any] | None:
    """The regions to score by (nnU-Net's region-based evaluation): those of the references' region
    ``dataset.json`` (in their folder or the one above it), else of a region model's ``segpipe infer``
    report beside a prediction; None for class labels."""
    import json

    from ..io.datasets.layouts import region_labels

    for folder in (ref_folder, ref_folder.parent):
        try:
            desc = json.loads((folder / DATASET_JSON).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(desc, dict) and "regions_class_order" in desc:
            return region_labels(desc, folder / DATASET_JSON)[1]
    for case in cases[:LISTED]:
        try:
            report = json.loads((pred_folder / f"{case}.json").read_text(encoding="utf-8"))
            regions = report["identity"]["regions"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            continue
        if isinstance(regions, dict) and regions:
            return {
                "names": list(regions),
                "regions": [[int(v) for v in r["labels"]] for r in regions.values()],
                "class_order": [int(r["value"]) for r in regions.values()],
            }
    return None


def _score_regions(pred: np.ndarray, ref: np.ndarray, spacing: Any, regions: Mapping[str, Any], tol: float) -> dict:
    """Each region's metrics ("class" r + 1 = region r), from the masks of its label values."""
    out = {}
    for r, values in enumerate(regions["regions"], start=1):
        pm, rm = (np.isin(a, values).astype(np.uint8) for a in (pred, ref))
        out[r] = _score_case(pm, rm, spacing, classes=[1], tolerances={1: tol}, ignore_label=None)[1]
    return out


def _names_in(path: Path, key: str) -> dict[int, str]:
    """``{class: name}`` from the ``key`` mapping of a JSON file; ``{}`` when it has none or is unreadable."""
    import json

    try:
        content = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    labels = content.get(key) if isinstance(content, dict) else None
    if not isinstance(labels, dict):
        return {}
    try:
        return _label_names(labels) or {}
    except UsageError:  # not a plain {value: name} mapping (e.g. region labels): no names from it
        return {}


# ============================================================================ metrics
def _empty_record() -> Record:
    rec: Record = {k: math.nan for k in METRICS}
    rec.update({k: 0 for k in COUNTS})
    rec.update({k: 0.0 for k in VOLUMES})
    return rec


def _score_case(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    classes: Sequence[int],
    tolerances: Mapping[int, float],
    ignore_label: int | None,
) -> dict[int, Record]:
    """Every metric of each class of one case."""
    counts = confusion_counts(pred, ref, classes, ignore_index=ignore_label)
    dice = dice_from_counts(counts)
    foreground = [c for c in classes if c != BACKGROUND]
    surface = surface_metrics_per_class(
        pred, ref, spacing, foreground, {c: tolerances[c] for c in foreground}, ignore_label=ignore_label
    )
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out: dict[int, Record] = {}
    for i, c in enumerate(classes):
        tp, fp, fn = (int(v) for v in counts[i])
        s = surface.get(c, {"HD95": math.nan, "NSD": math.nan})
        out[c] = {
            "Dice": float(dice[i]),
            "HD95": float(s["HD95"]),
            "NSD": float(s["NSD"]),
            "TP": tp,
            "FP": fp,
            "FN": fn,
            "n_ref": tp + fn,
            "n_pred": tp + fp,
            "volume_ref_ml": (tp + fn) * voxel_ml,
            "volume_pred_ml": (tp + fp) * voxel_ml,
        }
    return out


def _nanmean(values: Sequence[float]) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _clean(value: float) -> float | int | None:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return None if math.isnan(value) else float(value)


def _pair(pred_folder: Path, ref_folder: Path, *, strict: bool) -> tuple[dict[str, Path], dict[str, Path], list[str]]:
    """The reference and prediction files by case id, and the references without a prediction
    (refused with ``strict``, or when none has one); a prediction without a reference is refused."""
    refs = _case_files(ref_folder, "reference")
    preds = _case_files(pred_folder, "prediction")
    if not refs:
        raise DataError(
            f"{ref_folder}: no reference label files (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd)",
            hint="give the folder of the reference label maps (e.g. the dataset's labelsTr)",
        )
    missing = [c for c in refs if c not in preds]
    if missing and (strict or len(missing) == len(refs)):
        raise DataError(
            f"{pred_folder}: no prediction for {len(missing)} of {len(refs)} reference case(s): {_listing(missing)}",
            hint=f"predict every case (a file named after the case id, e.g. {missing[0]}.nii.gz), or evaluate "
            "against a reference folder holding only the predicted cases"
            + ("" if len(missing) == len(refs) else " (or without strict=true, to score the cases predicted)"),
        )
    extra = [c for c in preds if c not in refs]
    if extra:
        raise DataError(
            f"{pred_folder}: {len(extra)} prediction(s) have no reference in {ref_folder}: {_listing(extra)}",
            hint="name predictions after their reference files' case ids, or remove the extra predictions",
        )
    if missing:
        log.warning(
            "%s: no prediction for %d of %d reference case(s): %s; scoring the %d predicted case(s) "
            "(strict=true refuses instead)",
            pred_folder,
            len(missing),
            len(refs),
            _listing(missing),
            len(refs) - len(missing),
        )
    return refs, preds, missing


def _tolerances(
    tolerance_mm: float | Mapping[int, float], names: Mapping[int, str] | None
) -> tuple[dict[int, float], float]:
    """The NSD tolerance per class named (``overrides``) and for the others (``default_tol``)."""
    if isinstance(tolerance_mm, Mapping):
        overrides, default_tol = tolerance_overrides(tolerance_mm), DEFAULT_TOLERANCE_MM
    else:
        overrides, default_tol = {}, class_tolerances([BACKGROUND], tolerance_mm)[BACKGROUND]
    if names is not None:
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise UsageError(
                f"tolerance_mm names class(es) {unknown} that labels does not list ({sorted(names)})",
                hint="give tolerances for the listed classes only",
            )
    return overrides, default_tol


# ============================================================================ the entry point
def evaluate_folders(
    pred_dir: str | os.PathLike[str],
    ref_dir: str | os.PathLike[str],
    *,
    labels: Mapping[int, str] | None = None,
    ignore_label: int | None = None,
    tolerance_mm: float | Mapping[int, float] = DEFAULT_TOLERANCE_MM,
    out_dir: str | os.PathLike[str] | None = None,
    qc_image_dir: str | os.PathLike[str] | None = None,
    strict: bool | None = None,
) -> dict[str, Any]:
    """Score every prediction in ``pred_dir`` against its reference in ``ref_dir``; returns the summary.

    ``labels``: ``{class: name}`` (or dataset.json's ``{name: class}``), the classes to score (default:
    every value found in the references, named after the references' ``dataset.json`` when one is found,
    see the module's docstring). ``ignore_label``: the reference value of unlabelled voxels.
    ``tolerance_mm``: the NSD tolerance, 1 mm by default, one number or ``{class: mm}`` (classes not
    named keep 1 mm). ``out_dir``: where ``evaluation.csv``, ``summary.json`` and ``dice_boxplot.png``
    go (default ``pred_dir``). ``qc_image_dir``: the cases' images, to draw ``qc/<case>.png`` overlays.

    Refused, naming the case and the files: a prediction without a reference, a prediction off its
    reference's voxel grid, a label map that is not integer-valued, and with ``strict`` a reference
    without a prediction. Without ``strict`` (``segpipe evaluate``'s default, nnU-Net's ``-chill``)
    the cases predicted are scored, with a warning naming how many references have no prediction;
    the summary lists them (``missing_predictions``). See the module's docstring for the files and
    the rules.
    """
    strict = configured(strict, "evaluate.strict")
    pred_folder = _folder(pred_dir, "prediction")
    ref_folder = _folder(ref_dir, "reference")
    refs, preds, missing = _pair(pred_folder, ref_folder, strict=strict)
    names = _label_names(labels)
    ignore = None if ignore_label is None else int(ignore_label)
    if names is not None and ignore is not None:
        names.pop(ignore, None)
    overrides, default_tol = _tolerances(tolerance_mm, names)
    cases = sorted(c for c in refs if c in preds)
    regions = None if names is not None else _regions_beside(ref_folder, pred_folder, cases)
    if regions:  # scored region by region, "classes" 1..R named after the regions
        names = {r: str(n) for r, n in enumerate(regions["names"], start=1)}
    shown_names = names if names is not None else _names_beside(ref_folder, pred_folder, cases)
    out = Path(out_dir) if out_dir is not None else pred_folder
    images = _image_files(_folder(qc_image_dir, "image"), cases) if qc_image_dir is not None else {}

    results: dict[str, dict[int, Record]] = {}
    found: set[int] = set()
    for case in cases:
        ref, ref_geo = _read_labels(refs[case], case, "reference", ignore)
        pred, pred_geo = _read_labels(preds[case], case, "prediction", ignore)
        diffs = ref_geo.differences(pred_geo, names=("reference", "prediction"))
        if diffs:
            raise DataError(
                f"case {case}: the prediction {preds[case]} is not on the voxel grid of its reference "
                f"{refs[case]} ({'; '.join(diffs)})",
                hint="write the prediction on the reference image's grid (the original geometry restored after "
                "prediction), or resample it there with nearest-neighbour interpolation",
            )
        if regions:
            results[case] = _score_regions(pred, ref, ref_geo.spacing, regions, overrides.get(1, default_tol))
            continue
        if names is not None:
            case_classes = sorted(names)
        else:
            ref_values = _values(ref) - ({ignore} if ignore is not None else set())
            found |= ref_values
            case_classes = sorted(ref_values | (_values(pred) - ({ignore} if ignore is not None else set())))
        tolerances = {c: overrides.get(c, default_tol) for c in case_classes}
        results[case] = _score_case(
            pred, ref, ref_geo.spacing, classes=case_classes, tolerances=tolerances, ignore_label=ignore
        )
        if case in images:
            qc = out / QC_FOLDER / f"{case}.png"
            case_labels = CaseLabels(case, ref, pred, ref_geo, results[case])
            write_qc(qc, case_labels, images[case], names=shown_names, ignore_label=ignore)
    classes = sorted(names) if names is not None else sorted(found)
    if names is None:
        unknown = sorted(set(overrides) - set(classes))
        if unknown:
            log.warning("tolerance_mm names class(es) %s that no reference holds (classes: %s)", unknown, classes)
    for case in cases:
        results[case] = {c: results[case].get(c) or _empty_record() for c in classes}

    ev = Evaluation(cases, classes, shown_names, results, refs, preds, overrides, default_tol, ignore, missing)
    summary = _summary(ev)
    _write_csv(out / CSV_FILE, ev)
    write_boxplot(out / BOXPLOT_FILE, ev)
    report = write_evaluation_report(out, summary, boxplot=BOXPLOT_FILE)
    summary["report"] = str(report) if report else None
    write_json(out / SUMMARY_FILE, summary)
    return summary


def _summary(ev: Evaluation) -> dict[str, Any]:
    """``summary.json`` in nnU-Net's layout (see the module's docstring)."""
    cases, classes, names, results, refs, preds = ev.cases, ev.classes, ev.names, ev.results, ev.refs, ev.preds
    overrides, default_tol, ignore_label, missing = ev.overrides, ev.default_tol, ev.ignore_label, ev.missing
    means = {c: {k: _nanmean([results[case][c][k] for case in cases]) for k in FIELDS} for c in classes}
    foreground = [c for c in classes if c != BACKGROUND]
    return {
        "metric_per_case": [
            {
                "case": case,
                "prediction_file": str(preds[case]),
                "reference_file": str(refs[case]),
                "metrics": {str(c): {k: _clean(v) for k, v in results[case][c].items()} for c in classes},
            }
            for case in cases
        ],
        "mean": {str(c): {k: _clean(v) for k, v in means[c].items()} for c in classes},
        "foreground_mean": {k: _clean(_nanmean([means[c][k] for c in foreground])) for k in METRICS},
        "labels": {str(c): names[c] for c in classes if c in names},
        "ignore_label": ignore_label,
        "tolerance_mm": {str(c): overrides.get(c, default_tol) for c in foreground},
        "n_cases": len(cases),
        "missing_predictions": [{"case": case, "reference_file": str(refs[case])} for case in missing],
    }


def _write_csv(path: Path, ev: Evaluation) -> Path:
    """``evaluation.csv``: one row per case and class."""
    cases, classes, names, results = ev.cases, ev.classes, ev.names, ev.results

    def fmt(value: float) -> str | int:
        if isinstance(value, (int, np.integer)):
            return int(value)
        return "nan" if math.isnan(value) else f"{value:.6f}"

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "class", "name", *FIELDS])
    for case in cases:
        for c in classes:
            writer.writerow([case, c, names.get(c, ""), *(fmt(results[case][c][k]) for k in FIELDS)])
    return write_text(path, buf.getvalue())
