"""Choose what ``segpipe infer`` runs: the best configuration or ensemble, and the post-processing.

:func:`find_best` reads the cross-validation predictions the final validation of each fold saved
(``runs/<config>/fold_<k>/validation/<case>.npy``: float16 softmax on the cache's grid) and the
cached reference labels, and scores, with nnU-Net's Dice rules (per class, NaN when both are empty
and left out of means; the foreground mean of the class means):

1. each trained configuration alone (the argmax of its softmax);
2. each ensemble of two or more configurations on the same grid (the argmax of their mean softmax,
   as ``infer`` averages configurations' probabilities);

on the cases every candidate has a prediction for (all labelled cases once the 5 folds of each are
trained). The best candidate wins (the simpler one on a tie). Then, for the winner, each
foreground class in turn: keeping only its largest connected component is adopted when it raises
that class's mean Dice over the cases. The decision goes to ``best_configuration.json`` in the
dataset's workspace folder, where ``infer`` and ``export`` read it, and a page for people beside it,
``best_configuration.html`` (:mod:`segpipe.workflows.report`).

Scores are computed on the cache's grid (the network's), not resampled to each case's own grid as
nnU-Net's exported predictions are: the ranking is the same in practice, and nothing is resampled.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import regions_to_labels
from ..errors import StateError
from ..evaluation.metrics import confusion_counts, dice_from_counts, evaluate_regions
from ..io.jsonio import write_json
from ..splits import N_FOLDS
from ..workspace import RunFolder
from .report import write_find_best_report

__all__ = ["find_best"]

#: a post-processing step must raise a class's mean Dice by more than this to be adopted
MIN_GAIN = 1e-6


def _predictions(run_root: Path, configuration: str) -> dict[str, Path]:
    """case → saved softmax of every trained fold's validation of ``configuration``."""
    out: dict[str, Path] = {}
    for fold in range(N_FOLDS):
        for npy in sorted(RunFolder(run_root / configuration / f"fold_{fold}").validation_dir.glob("*.npy")):
            out.setdefault(npy.stem, npy)
    return out


def _mean_fg(per_case: list[np.ndarray]) -> tuple[float, list[float]]:
    """(foreground mean, per-class means) of per-case Dice rows, NaN skipped as nnU-Net does."""
    if not per_case:
        return math.nan, []
    table = np.vstack(per_case)
    means = []
    for c in range(table.shape[1]):
        col = table[:, c]
        col = col[~np.isnan(col)]
        means.append(float(col.mean()) if col.size else math.nan)
    valid = [m for m in means if not math.isnan(m)]
    return (float(np.mean(valid)) if valid else math.nan), means


def _score(
    labels_by_case: dict[str, np.ndarray],
    preds: dict[str, np.ndarray],
    classes: list[int],
    ignore: int | None,
    regions: Sequence[Sequence[int]] | None = None,
) -> tuple[float, list[float]]:
    """The foreground mean and per-class means of the Dice of ``preds`` (by region with ``regions``)."""
    rows = []
    for case, ref in labels_by_case.items():
        if regions:
            counts = evaluate_regions(preds[case], ref, regions, case=case).counts
        else:
            counts = confusion_counts(preds[case], ref, classes, ignore_index=ignore)
        rows.append(dice_from_counts(counts))
    return _mean_fg(rows)


def _candidates(available: dict[str, dict[str, Path]], grids: dict[str, str], ensembles: bool) -> list[tuple[str, ...]]:
    """Each configuration alone and, with ``ensembles``, each combination of two or more on the same grid."""
    candidates: list[tuple[str, ...]] = [(c,) for c in available]
    if ensembles:
        for r in range(2, len(available) + 1):
            for combo in itertools.combinations(available, r):
                if len({grids[c] for c in combo}) == 1:
                    candidates.append(combo)
    return candidates


def _ensemble_prediction(
    cache: Any,
    case: str,
    combo: tuple[str, ...],
    available: dict[str, dict[str, Path]],
    class_order: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(argmax of the summed softmax of ``combo``'s configurations, a copy of the cached label) of ``case``;
    for a region plan (``class_order``) the label map of their mean region probabilities."""
    _image, label, _props = cache.load(case, mmap=True)
    if label is None:
        raise StateError(f"{cache.case_dir(case)}: no cached label", hint="run `segpipe preprocess` again")
    total_probs: np.ndarray | None = None
    for c in combo:
        probs = np.load(available[c][case], mmap_mode="r")
        if tuple(probs.shape[1:]) != tuple(label.shape):
            raise StateError(
                f"{available[c][case]}: prediction grid {probs.shape[1:]} differs from the cached label {label.shape}",
                hint=f"the cache changed after training: train {c} again (--overwrite)",
            )
        total_probs = probs.astype(np.float32) if total_probs is None else total_probs + probs
    assert total_probs is not None
    if class_order:
        pred = regions_to_labels(total_probs / len(combo), class_order)
    else:
        pred = total_probs.argmax(0).astype(np.uint8)
    return pred, np.array(label)  # a copy: the cache is memory-mapped read-only


def _score_candidates(
    candidates: list[tuple[str, ...]],
    cases: list[str],
    available: dict[str, dict[str, Path]],
    *,
    root: Path,
    plan: Any,
    classes_map: dict[int, str],
    ignore: int | None,
    say: Callable[[str], Any],
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Score each candidate on ``cases``: every candidate's entry, the best one (the first of a tie), and its
    predictions and the reference labels per case."""
    from ..preprocessing import Cache

    classes = list(classes_map)
    regions = (plan.settings or {}).get("regions") or {}
    results = []
    best: dict[str, Any] | None = None
    best_preds: dict[str, np.ndarray] = {}
    best_labels: dict[str, np.ndarray] = {}
    for combo in candidates:
        cache = Cache.for_configuration(root.parent, plan, combo[0], dataset=root.name)
        labels: dict[str, np.ndarray] = {}
        preds: dict[str, np.ndarray] = {}
        for case in cases:
            preds[case], labels[case] = _ensemble_prediction(cache, case, combo, available, regions.get("class_order"))
        dice, per_class = _score(labels, preds, classes, ignore, regions.get("regions"))
        entry = {
            "configurations": list(combo),
            "mean_fg_dice": dice,
            "class_dice": {str(classes_map[c]): d for c, d in zip(classes, per_class)},
        }
        results.append(entry)
        say(f"  {' + '.join(combo)}: mean foreground Dice {dice:.4f}")
        if best is None or (not math.isnan(dice) and (math.isnan(best["mean_fg_dice"]) or dice > best["mean_fg_dice"])):
            best, best_preds, best_labels = entry, preds, labels
    assert best is not None
    return results, best, best_preds, best_labels


def find_best(
    dws: Any,
    plan: Any,
    *,
    configs: Sequence[str] | None = None,
    ensembles: bool = True,
    log: Any = None,
) -> dict[str, Any]:
    """Score every trained configuration and same-grid ensemble of a dataset's workspace entry,
    choose the best and its post-processing, and write ``best_configuration.json`` (see the module
    docstring). Returns the decision with every candidate's score."""
    from ..inference.postprocess import keep_largest_component
    from ..preprocessing import Cache
    from ..training.validation import plan_classes

    say = log or (lambda msg: None)
    root = Path(dws.root)
    runs = root / "runs"
    names = list(configs) if configs is not None else list(plan.configurations)
    available = {c: _predictions(runs, c) for c in names}
    available = {c: p for c, p in available.items() if p}
    if not available:
        raise StateError(
            f"{root}: no cross-validation predictions (runs/<config>/fold_<k>/validation/*.npy)",
            hint="train the folds first (segpipe train fold=0 … fold=4); each saves its validation predictions",
        )
    regions = (plan.settings or {}).get("regions")
    if regions:  # a region plan: scored by region ("classes" 1..R)
        classes_map, ignore = {i + 1: str(n) for i, n in enumerate(regions["names"])}, None
    else:
        classes_map, ignore = plan_classes(plan)
    classes = list(classes_map)
    grids = {c: plan.config(c).data_identifier for c in available}
    candidates = _candidates(available, grids, ensembles)
    common = set.intersection(*(set(p) for p in available.values()))
    cases = sorted(common)
    if not cases:
        raise StateError(f"{root}: the configurations' validation predictions share no case", hint="train every fold")
    total = len(Cache.for_configuration(root.parent, plan, next(iter(available)), dataset=root.name).cases())
    say(f"scoring {len(candidates)} candidate(s) on {len(cases)} cross-validation case(s)")
    results, best, best_preds, best_labels = _score_candidates(
        candidates, cases, available, root=root, plan=plan, classes_map=classes_map, ignore=ignore, say=say
    )

    # post-processing: per class, the largest connected component where it helps (not for regions: their
    # label values are nested regions, not classes of their own)
    chosen: list[int] = []
    post_scores = {}
    region_values = regions["regions"] if regions else None
    _base, base_per_class = _score(best_labels, best_preds, classes, ignore, region_values)
    for i, cls in enumerate([] if regions else classes):
        trial = {}
        for case, pred in best_preds.items():
            mask = pred == cls
            keep = keep_largest_component(mask)
            if np.array_equal(keep, mask):
                trial[case] = pred
            else:
                out = pred.copy()
                out[mask & ~keep] = 0
                trial[case] = out
        _t, per_class = _score(best_labels, trial, classes, ignore)
        before, after = base_per_class[i], per_class[i]
        post_scores[str(classes_map[cls])] = {"before": before, "after": after}
        if not math.isnan(after) and not math.isnan(before) and after > before + MIN_GAIN:
            chosen.append(cls)
            best_preds = trial
            _base, base_per_class = _score(best_labels, best_preds, classes, ignore)
    final_dice, final_per_class = _score(best_labels, best_preds, classes, ignore, region_values)
    decision = {
        "configurations": best["configurations"],
        "mean_fg_dice": best["mean_fg_dice"],
        "mean_fg_dice_postprocessed": final_dice,
        "class_dice_postprocessed": {str(classes_map[c]): d for c, d in zip(classes, final_per_class)},
        "postprocessing": {"largest_component": chosen},
        "postprocessing_scores": post_scores,
        "cases": len(cases),
        "cases_total": total,
        "candidates": results,
    }
    write_json(dws.best_configuration_path, _json_safe(decision))
    report = write_find_best_report(dws, decision, labels=classes_map)
    return {**decision, "path": str(dws.best_configuration_path), "report": str(report) if report else None}


def _json_safe(value: Any) -> Any:
    """NaN as null, for JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
