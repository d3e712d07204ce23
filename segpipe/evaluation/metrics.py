"""Dice per class and per case, and the summaries nnU-Net writes (``summary.json``), plus a CSV.

Rules, as nnU-Net v2's ``compute_metrics`` / ``compute_metrics_on_folder``:

* Per case and class: true positives, false positives and false negatives of the class's masks;
  ``Dice = 2·TP / (2·TP + FP + FN)``, and **NaN when reference and prediction are both empty**
  (TP + FP + FN = 0): such a case says nothing about the class and is left out of its mean.
* Voxels whose *reference* label is the ignore label count for no class.
* Summary: per class, the mean over cases skipping NaN; the foreground mean is the mean of those
  per-class means over the foreground classes (background 0 excluded). nnU-Net takes a plain mean
  there, so one class that is NaN in every case makes its foreground mean NaN; segpipe skips such a
  class instead (the only case where the two differ).

JSON cannot hold NaN: the summary writes ``null`` where nnU-Net's file has ``NaN``; the CSV writes ``nan``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..io.atomic import write_text
from ..io.jsonio import write_json

__all__ = [
    "CaseMetrics",
    "class_mean_dice",
    "confusion_counts",
    "dice_from_counts",
    "dice_per_class",
    "evaluate_case",
    "evaluate_regions",
    "mean_foreground_dice",
    "summarize",
    "write_case_metrics",
    "write_summary",
]

LabelArray = np.ndarray | torch.Tensor


def _as_labels(array: LabelArray, what: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
    if not isinstance(t, torch.Tensor):
        raise DataError(f"the {what} must be a numpy array or a torch tensor, got {type(array).__name__}")
    if t.is_floating_point() or t.is_complex():
        raise DataError(f"the {what} must hold integer labels, got {t.dtype}", hint="argmax the logits first")
    return t.reshape(-1).long()


def confusion_counts(
    pred_labels: LabelArray, ref_labels: LabelArray, classes: Sequence[int], *, ignore_index: int | None = None
) -> np.ndarray:
    """TP, FP and FN of each class: an int64 array [len(classes), 3].

    One ``bincount`` over the joint (reference, prediction) index of every voxel, after labels outside
    ``classes`` are mapped to one "other" bin; voxels whose reference is ``ignore_index`` are dropped.
    Works on numpy arrays and on torch tensors (on their device).
    """
    pred, ref = _as_labels(pred_labels, "prediction"), _as_labels(ref_labels, "reference")
    if pred.shape != ref.shape:
        raise DataError(
            f"prediction and reference differ in size ({tuple(pred_labels.shape)} vs {tuple(ref_labels.shape)})",
            hint="compare them on the same grid",
        )
    pred = pred.to(ref.device)
    if ignore_index is not None:
        keep = ref != int(ignore_index)
        pred, ref = pred[keep], ref[keep]
    cls = [int(c) for c in classes]
    n = len(cls)
    if len(set(cls)) != n or min(cls, default=0) < 0:
        raise DataError(f"classes must be distinct non-negative labels, got {cls}")
    if n == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if ref.numel() and (int(ref.min()) < 0 or int(pred.min()) < 0):
        raise DataError("labels must be non-negative", hint="give the negative value as ignore_index")
    top = max(max(cls), int(ref.max()) if ref.numel() else 0, int(pred.max()) if pred.numel() else 0)
    lut = torch.full((top + 1,), n, dtype=torch.long, device=ref.device)  # label -> class index; n = other
    lut[torch.tensor(cls, dtype=torch.long, device=ref.device)] = torch.arange(n, device=ref.device)
    joint = lut[ref] * (n + 1) + lut[pred]
    cm = torch.bincount(joint, minlength=(n + 1) ** 2).reshape(n + 1, n + 1).cpu().numpy()  # rows: reference
    tp = np.diag(cm)[:n]
    fp = cm[:, :n].sum(axis=0) - tp
    fn = cm[:n, :].sum(axis=1) - tp
    return np.stack([tp, fp, fn], axis=1).astype(np.int64)


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dice ``2·TP / (2·TP + FP + FN)`` of each row (TP, FP, FN) of ``counts``; NaN where TP + FP + FN = 0."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1, 3)
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    denom = 2 * tp + fp + fn
    out = np.full(len(counts), np.nan)
    nz = denom > 0
    out[nz] = 2 * tp[nz] / denom[nz]
    return out


def dice_per_class(
    pred_labels: LabelArray, ref_labels: LabelArray, classes: Sequence[int], *, ignore_index: int | None = None
) -> dict[int, float]:
    """Dice of each class in ``classes``: ``{class: dice}``, NaN where reference and prediction are both empty."""
    counts = confusion_counts(pred_labels, ref_labels, classes, ignore_index=ignore_index)
    return {int(c): float(d) for c, d in zip(classes, dice_from_counts(counts))}


@dataclass(frozen=True)
class CaseMetrics:
    """One case's counts: ``counts[i] = (TP, FP, FN)`` of ``classes[i]``."""

    case: str
    classes: tuple[int, ...]
    counts: np.ndarray

    @property
    def dice(self) -> dict[int, float]:
        return {c: float(d) for c, d in zip(self.classes, dice_from_counts(self.counts))}

    def to_dict(self) -> dict[str, Any]:
        """nnU-Net's per-case entry: ``{"case", "metrics": {class: {Dice, TP, FP, FN, n_ref, n_pred}}}``
        (Dice ``None`` where NaN)."""
        metrics = {}
        for c, (tp, fp, fn), d in zip(self.classes, self.counts.tolist(), dice_from_counts(self.counts)):
            metrics[str(c)] = {
                "Dice": None if math.isnan(d) else float(d),
                "TP": tp,
                "FP": fp,
                "FN": fn,
                "n_ref": tp + fn,
                "n_pred": tp + fp,
            }
        return {"case": self.case, "metrics": metrics}


def evaluate_case(
    pred_labels: LabelArray,
    ref_labels: LabelArray,
    classes: Sequence[int],
    *,
    case: str,
    ignore_index: int | None = None,
) -> CaseMetrics:
    """The :class:`CaseMetrics` of one case (its counts per class)."""
    counts = confusion_counts(pred_labels, ref_labels, classes, ignore_index=ignore_index)
    return CaseMetrics(str(case), tuple(int(c) for c in classes), counts)


def evaluate_regions(
    pred_labels: LabelArray, ref_labels: LabelArray, regions: Sequence[Sequence[int]], *, case: str
) -> CaseMetrics:
    """The :class:`CaseMetrics` of one case scored by regions (nnU-Net's region-based evaluation):
    "class" ``r + 1`` is region r, the union of its label values in prediction and reference alike."""
    pred = _as_labels(pred_labels, "prediction")
    ref = _as_labels(ref_labels, "reference").to(pred.device)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and reference {tuple(ref.shape)} differ in shape")
    rows = []
    for values in regions:
        wanted = torch.as_tensor([int(v) for v in values], dtype=torch.long, device=pred.device)
        p, r = torch.isin(pred, wanted), torch.isin(ref, wanted)
        rows.append([int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())])
    return CaseMetrics(str(case), tuple(range(1, len(rows) + 1)), np.asarray(rows, dtype=np.int64).reshape(-1, 3))


CaseResult = CaseMetrics | Mapping[int, float]


def _dice_of(result: CaseResult) -> Mapping[int, float]:
    return result.dice if isinstance(result, CaseMetrics) else result


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    if arr.size == 0 or np.isnan(arr).all():
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(arr))


def class_mean_dice(results: Sequence[CaseResult]) -> dict[int, float]:
    """Per class, the mean Dice over the cases where it is not NaN (NaN when it is NaN in every case)."""
    dices = [_dice_of(r) for r in results]
    classes = sorted({int(c) for d in dices for c in d})
    return {c: _nanmean([d.get(c, math.nan) for d in dices]) for c in classes}


def mean_foreground_dice(results: Sequence[CaseResult], *, background: int = 0) -> float:
    """nnU-Net's ``foreground_mean`` Dice: per class the mean over cases skipping NaN, then the mean of those
    over the classes but ``background`` (a class NaN in every case is skipped). ``results``: per case a
    :class:`CaseMetrics` or a ``{class: dice}`` mapping. NaN when nothing is left."""
    means = class_mean_dice(results)
    return _nanmean([v for c, v in means.items() if c != background])


def summarize(results: Sequence[CaseMetrics], *, background: int = 0) -> dict[str, Any]:
    """nnU-Net's ``summary.json`` content: ``metric_per_case``, ``mean`` (per class) and ``foreground_mean``
    (``{"Dice": value}``); NaN is written as ``None``."""

    def clean(v: float) -> float | None:
        return None if math.isnan(v) else float(v)

    means = class_mean_dice(results)
    return {
        "metric_per_case": [r.to_dict() for r in results],
        "mean": {str(c): {"Dice": clean(v)} for c, v in means.items()},
        "foreground_mean": {"Dice": clean(mean_foreground_dice(results, background=background))},
    }


def write_summary(path: str | os.PathLike[str], results: Sequence[CaseMetrics], *, background: int = 0) -> Path:
    """Write :func:`summarize` of ``results`` as canonical JSON (atomically)."""
    return write_json(path, summarize(results, background=background))


def write_case_metrics(
    path: str | os.PathLike[str],
    results: Sequence[CaseResult],
    *,
    case_ids: Sequence[str] | None = None,
    labels: Mapping[int, str] | None = None,
    background: int = 0,
) -> Path:
    """A CSV of Dice per case (rows) and class (columns ``dice_<class>`` or ``dice_<class>_<name>`` with
    ``labels``), plus ``foreground_mean`` per case (mean over its non-NaN foreground classes); NaN as ``nan``.

    ``results``: :class:`CaseMetrics` (their ``case`` names the row) or ``{class: dice}`` mappings with
    ``case_ids``. Written atomically.
    """
    if case_ids is not None and len(case_ids) != len(results):
        raise DataError(f"{len(case_ids)} case ids for {len(results)} results")
    dices = [_dice_of(r) for r in results]
    classes = sorted({int(c) for d in dices for c in d})
    names = dict(labels or {})
    header = ["case"] + [f"dice_{c}_{names[c]}" if c in names else f"dice_{c}" for c in classes]
    header.append("foreground_mean")

    def fmt(v: float) -> str:
        return "nan" if math.isnan(v) else f"{v:.6f}"

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for i, (r, d) in enumerate(zip(results, dices)):
        case = case_ids[i] if case_ids is not None else r.case if isinstance(r, CaseMetrics) else str(i)
        values = [float(d.get(c, math.nan)) for c in classes]
        fg = _nanmean([v for c, v in zip(classes, values) if c != background])
        writer.writerow([case, *(fmt(v) for v in values), fmt(fg)])
    return write_text(path, buf.getvalue())
