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
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, StateError, UsageError
from ..geometry import Geometry
from ..io.atomic import atomic_path, write_text
from ..io.image import image_extension, read_image
from ..io.jsonio import write_json
from .metrics import confusion_counts, dice_from_counts
from .surface import DEFAULT_TOLERANCE_MM, class_tolerances, surface_metrics_per_class, tolerance_overrides

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
QC_FOLDER = "qc"
BACKGROUND = 0
METRICS = ("Dice", "HD95", "NSD")
COUNTS = ("TP", "FP", "FN", "n_ref", "n_pred")
VOLUMES = ("volume_ref_ml", "volume_pred_ml")
FIELDS = METRICS + COUNTS + VOLUMES
LISTED = 5  # case ids named in a message before "and N more"
IMAGE_CHANNEL_SUFFIX = "_0000"  # nnU-Net's name of a case's first image channel
#: QC contour colours, class 1 first (class c gets entry (c - 1) mod 10): bright on a grey image
CLASS_COLOURS = (
    "#ff3355",
    "#33dd55",
    "#3399ff",
    "#ffcc00",
    "#ff66ff",
    "#00e5e5",
    "#ff8800",
    "#aa77ff",
    "#aaff33",
    "#ffaaaa",
)
#: QC contours: the reference wide and translucent, the prediction thin and dashed on top of it
REF_WIDTH, REF_ALPHA, PRED_WIDTH = 3.4, 0.45, 1.4
PNG_DPI = 100
DATASET_JSON = "dataset.json"

Record = dict[str, float]


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
    strict: bool = False,
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
    pred_folder = _folder(pred_dir, "prediction")
    ref_folder = _folder(ref_dir, "reference")
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
    names = _label_names(labels)
    ignore = None if ignore_label is None else int(ignore_label)
    if names is not None and ignore is not None:
        names.pop(ignore, None)
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
    cases = sorted(c for c in refs if c in preds)
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
        if names is not None:
            case_classes = sorted(names)
        else:
            ref_values = _values(ref) - ({ignore} if ignore is not None else set())
            found |= ref_values
            case_classes = sorted(ref_values | (_values(pred) - ({ignore} if ignore is not None else set())))
        tolerances = {c: overrides.get(c, default_tol) for c in case_classes}
        results[case] = _score_case(pred, ref, ref_geo.spacing, case_classes, tolerances, ignore)
        if case in images:
            qc = out / QC_FOLDER / f"{case}.png"
            _write_qc(qc, case, images[case], ref, pred, ref_geo, results[case], shown_names, ignore)
    classes = sorted(names) if names is not None else sorted(found)
    if names is None:
        unknown = sorted(set(overrides) - set(classes))
        if unknown:
            log.warning("tolerance_mm names class(es) %s that no reference holds (classes: %s)", unknown, classes)
    for case in cases:
        results[case] = {c: results[case].get(c) or _empty_record() for c in classes}

    summary = _summary(cases, classes, shown_names, results, refs, preds, overrides, default_tol, ignore, missing)
    _write_csv(out / CSV_FILE, cases, classes, shown_names, results)
    write_json(out / SUMMARY_FILE, summary)
    _write_boxplot(out / BOXPLOT_FILE, cases, classes, shown_names, results)
    return summary


def _summary(
    cases: Sequence[str],
    classes: Sequence[int],
    names: Mapping[int, str],
    results: Mapping[str, Mapping[int, Record]],
    refs: Mapping[str, Path],
    preds: Mapping[str, Path],
    overrides: Mapping[int, float],
    default_tol: float,
    ignore_label: int | None,
    missing: Sequence[str] = (),
) -> dict[str, Any]:
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


def _write_csv(
    path: Path,
    cases: Sequence[str],
    classes: Sequence[int],
    names: Mapping[int, str],
    results: Mapping[str, Mapping[int, Record]],
) -> Path:
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


# ============================================================================ pictures
def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise StateError(
            "matplotlib is not installed, so the evaluation plots cannot be drawn",
            hint="install it (`pip install matplotlib`, a segpipe dependency)",
        ) from None
    return Figure(figsize=(width, height), dpi=PNG_DPI)


def _save(fig: Any, path: Path, title: str) -> Path:
    with atomic_path(path, ext=".png") as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None, "Title": title})
    return path


def _class_name(c: int, names: Mapping[int, str]) -> str:
    return f"{c} {names[c]}" if c in names else str(c)


def _write_boxplot(
    path: Path,
    cases: Sequence[str],
    classes: Sequence[int],
    names: Mapping[int, str],
    results: Mapping[str, Mapping[int, Record]],
) -> Path:
    """Per foreground class, a box plot (with the cases as points) of Dice and, below, of HD95."""
    foreground = [c for c in classes if c != BACKGROUND]
    fig = _figure(max(6.0, 1.5 + 0.9 * len(foreground)), 7.0)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.92, bottom=0.14, hspace=0.12)
    ax_dice, ax_hd = fig.subplots(2, 1, sharex=True)
    positions = list(range(1, len(foreground) + 1))
    for ax, key, ylabel in ((ax_dice, "Dice", "Dice"), (ax_hd, "HD95", "HD95 (mm)")):
        data = [[v for v in (results[case][c][key] for case in cases) if math.isfinite(v)] for c in foreground]
        drawn = [(x, d) for x, d in zip(positions, data) if d]
        if drawn:
            ax.boxplot([d for _, d in drawn], positions=[x for x, _ in drawn], widths=0.5, showfliers=False)
            for x, d in drawn:
                offsets = np.linspace(-0.12, 0.12, len(d)) if len(d) > 1 else np.zeros(1)
                ax.scatter(x + offsets, d, s=10, color="tab:blue", alpha=0.6, zorder=3)
        else:
            ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    ax_dice.set_ylim(-0.02, 1.02)
    ax_hd.set_xlim(0.4, len(foreground) + 0.6)
    ax_hd.set_xticks(positions, [_class_name(c, names) for c in foreground], rotation=20, ha="right")
    fig.suptitle(f"per-case Dice and HD95 of {len(cases)} case(s)")
    return _save(fig, path, "segpipe evaluation")


def _qc_slices(mask: np.ndarray) -> list[int]:
    """Three indices along axis 0: the foreground's centre and halfway from it to its first and last slice."""
    per_slice = mask.reshape(mask.shape[0], -1).sum(axis=1)
    n = mask.shape[0]
    if not per_slice.any():
        return [n // 4, n // 2, (3 * n) // 4]
    hit = np.flatnonzero(per_slice)
    lo, hi = int(hit[0]), int(hit[-1])
    centre = int(round(float(np.dot(np.arange(n), per_slice)) / float(per_slice.sum())))
    return [(lo + centre) // 2, centre, (centre + hi + 1) // 2]


def _class_colour(c: int) -> str:
    return CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]


def _dice_text(c: int, record: Record | None, names: Mapping[int, str]) -> str:
    dice = math.nan if record is None else record["Dice"]
    return f"{_class_name(c, names)} {'n/a' if math.isnan(dice) else f'{dice:.3f}'}"


def _write_qc(
    path: Path,
    case: str,
    image_path: Path,
    ref: np.ndarray,
    pred: np.ndarray,
    ref_geo: Geometry,
    records: Mapping[int, Record],
    names: Mapping[int, str],
    ignore_label: int | None,
) -> Path:
    """``qc/<case>.png``: three slices of the image with each class's reference and prediction contours."""
    image, geo = read_image(image_path)
    diffs = geo.differences(ref_geo, names=("image", "reference"))
    if diffs:
        raise DataError(
            f"case {case}: the image {image_path} is not on the voxel grid of its reference ({'; '.join(diffs)})",
            hint="give the images the references were drawn on (qc_image_dir)",
        )
    fig = _qc_figure(case, image[0], ref, pred, ref_geo.spacing, records, names, ignore_label)
    return _save(fig, path, f"segpipe QC {case}")


def _qc_figure(
    case: str,
    volume: np.ndarray,
    ref: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    records: Mapping[int, Record],
    names: Mapping[int, str],
    ignore_label: int | None,
) -> Any:
    """The QC figure of one case (see the module's docstring); ``records`` are its scores per class."""
    from matplotlib.lines import Line2D

    foreground = [c for c in sorted(records) if c not in (BACKGROUND, ignore_label)]
    ref_fg = np.isin(ref, foreground)
    slices = _qc_slices(ref_fg if ref_fg.any() else np.isin(pred, foreground))
    shown = volume[slices].astype(np.float32)
    lo, hi = (float(v) for v in np.percentile(shown, [0.5, 99.5]))
    fig = _figure(12.0, 4.9)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.84, bottom=0.15, wspace=0.04)
    aspect = spacing[1] / spacing[2]
    ny, nx = volume.shape[1:]
    ys, xs = np.arange(-1, ny + 1), np.arange(-1, nx + 1)
    for ax, z, plane in zip(fig.subplots(1, 3), slices, shown):
        ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="nearest")
        # each class in its colour: the reference wide and translucent, so it shows beside the dashed
        # prediction where the two coincide; masks padded with background so a structure touching the
        # image's edge gets a closed contour
        for labels, style in (
            (ref, {"linewidths": REF_WIDTH, "alpha": REF_ALPHA}),
            (pred, {"linewidths": PRED_WIDTH, "linestyles": "--"}),
        ):
            for c in foreground:
                mask = np.pad(labels[z] == c, 1).astype(np.float32)
                if mask.any():
                    ax.contour(xs, ys, mask, levels=[0.5], colors=[_class_colour(c)], **style)
        ax.set_xlim(-0.5, nx - 0.5)
        ax.set_ylim(ny - 0.5, -0.5)
        ax.set_title(f"axis 0 (z), slice {z} of {volume.shape[0]}", fontsize=9)
        ax.set_axis_off()
    handles = [
        Line2D([], [], color=_class_colour(c), linewidth=REF_WIDTH, label=_class_name(c, names)) for c in foreground
    ]
    handles += [
        Line2D([], [], color="0.55", linewidth=REF_WIDTH, alpha=REF_ALPHA, label="reference"),
        Line2D([], [], color="0.55", linewidth=PRED_WIDTH, linestyle="--", label="prediction"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False, fontsize=9)
    fig.text(
        0.99,
        0.005,
        "slices of array axis 0 (z), indices from 0; rows y, columns x",
        ha="right",
        va="bottom",
        fontsize=7,
        color="0.4",
    )
    dice = ", ".join(_dice_text(c, records.get(c), names) for c in foreground)
    foreground_dice = [records[c]["Dice"] for c in foreground if not math.isnan(records[c]["Dice"])]
    mean = f" (mean {sum(foreground_dice) / len(foreground_dice):.3f})" if len(foreground_dice) > 1 else ""
    fig.suptitle(f"{case}\nDice {dice}{mean}" if foreground else case, fontsize=11)
    return fig
