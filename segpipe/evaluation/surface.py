"""Surface-distance metrics of binary masks on anisotropic voxel grids: HD95 and the normalized surface Dice.

Definitions:

* A mask's **border** is its voxels with at least one face neighbour (6-connectivity in 3-D) outside
  the mask; the image's outside counts as background, so a mask touching the image's edge has a
  border there. Axes one voxel long (a 2-D image stored as a one-slice volume) are dropped first, so
  a 2-D mask's border is its in-plane contour, not all of it.
* The **surface distances** are, for each border voxel of one mask, the Euclidean distance in mm
  (``spacing`` per array axis) from its centre to the nearest border voxel centre of the other mask,
  in both directions (:func:`surface_distances`).
* **HD95** (:func:`hd95`): the 95th percentile (numpy's ``percentile``, linear interpolation) of the
  pooled symmetric surface distances, both directions concatenated.
* **NSD** (:func:`normalized_surface_dice`, Nikolov et al. 2021, counted on border voxels instead of
  surface elements): ``(#pred border within τ of ref border + #ref border within τ of pred border) /
  (#pred border + #ref border)`` for a tolerance τ in mm ("within": ``≤``).

Edge cases:

* Both masks empty: HD95 and NSD are **NaN**; such a case says nothing about the class and is left
  out of means, as Dice is (:mod:`segpipe.evaluation.metrics`).
* Exactly one mask empty: HD95 is the **diagonal of the image's extent** ``sqrt(Σ (n_i·s_i)²)``, longer
  than any distance on the grid, so a missed or hallucinated structure is penalised while means stay
  finite; NSD is **0**. :func:`surface_distances` gives ``inf`` for each border voxel of the
  non-empty mask then.

Both masks are cropped to their joint bounding box plus a one-voxel margin before the distance
transforms (SciPy's exact Euclidean ``distance_transform_edt`` with ``sampling=spacing``), so a
small structure in a large volume costs what its box costs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import DataError, UsageError

__all__ = [
    "DEFAULT_TOLERANCE_MM",
    "class_tolerances",
    "hd95",
    "normalized_surface_dice",
    "surface_distances",
    "surface_metrics_per_class",
    "tolerance_overrides",
]

DEFAULT_TOLERANCE_MM = 1.0
PERCENTILE = 95.0
# Relative slack on the NSD tolerance: a distance equal to the tolerance up to float rounding of
# sqrt(Σ (k_i·s_i)²) counts as within it.
TOLERANCE_RTOL = 1e-9


def _spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise UsageError(f"spacing must be {ndim} numbers (mm per array axis), got {spacing!r}") from None
    if len(sp) != ndim:
        raise UsageError(f"spacing must give one value (mm) per array axis: {ndim} values, got {len(sp)}: {sp}")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise UsageError(f"spacing must be positive finite numbers (mm), got {sp}")
    return sp


def _tolerance(value: Any, what: str) -> float:
    try:
        tol = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number of mm, got {value!r}") from None
    if not (math.isfinite(tol) and tol >= 0):
        raise UsageError(f"{what} must be a finite number of mm ≥ 0, got {value!r}")
    return tol


def _masks(pred: Any, ref: Any, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], float]:
    """Both masks as bool arrays without one-voxel axes, their spacing, and the image's diagonal in mm."""
    p = np.asarray(pred).astype(bool, copy=False)
    r = np.asarray(ref).astype(bool, copy=False)
    if p.shape != r.shape:
        raise DataError(
            f"prediction and reference masks differ in size ({p.shape} vs {r.shape})",
            hint="compare them on the same grid",
        )
    sp = _spacing(spacing, p.ndim)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(p.shape, sp)))
    keep = [i for i, n in enumerate(p.shape) if n > 1] or [0]
    if len(keep) < p.ndim:
        shape = tuple(p.shape[i] for i in keep)
        p, r, sp = p.reshape(shape), r.reshape(shape), tuple(sp[i] for i in keep)
    return p, r, sp, diagonal


def _border(mask: np.ndarray) -> np.ndarray:
    """The mask's voxels with a face neighbour outside it (the outside of the array is background)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop(p: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their joint bounding box plus one voxel on each side (within the array)."""
    union = p | r
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, union.shape[axis])))
    sl = tuple(box)
    return p[sl], r[sl]


def _distances(p: np.ndarray, r: np.ndarray, sp: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Surface distances of two bool masks without one-voxel axes (see :func:`surface_distances`)."""
    p_any, r_any = bool(p.any()), bool(r.any())
    if not p_any and not r_any:
        return np.zeros(0), np.zeros(0)
    if not p_any or not r_any:
        n = int(np.count_nonzero(_border(_crop(p, r)[0 if p_any else 1])))
        inf = np.full(n, np.inf)
        return (inf, np.zeros(0)) if p_any else (np.zeros(0), inf)
    from scipy import ndimage

    p, r = _crop(p, r)
    p_border, r_border = _border(p), _border(r)
    # distance of every voxel to the nearest border voxel of the other mask (EDT of its complement)
    to_ref = ndimage.distance_transform_edt(~r_border, sampling=sp)
    to_pred = ndimage.distance_transform_edt(~p_border, sampling=sp)
    return np.asarray(to_ref[p_border], dtype=float), np.asarray(to_pred[r_border], dtype=float)


def surface_distances(pred: Any, ref: Any, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each border voxel of ``pred`` to the border of ``ref``, and from each border
    voxel of ``ref`` to the border of ``pred`` (two 1-D float arrays, voxels in C order).

    ``pred``, ``ref``: masks of the same shape (anything nonzero is inside); ``spacing``: mm per array
    axis, e.g. ``(sz, sy, sx)`` for ``[Z, Y, X]`` arrays. Both masks empty: two empty arrays; one empty:
    ``inf`` for each border voxel of the other (see the module's docstring).
    """
    p, r, sp, _ = _masks(pred, ref, spacing)
    return _distances(p, r, sp)


def _hd95(d_pred: np.ndarray, d_ref: np.ndarray, diagonal: float) -> float:
    if d_pred.size == 0 and d_ref.size == 0:
        return math.nan
    pooled = np.concatenate([d_pred, d_ref])
    if np.isinf(pooled).any():
        return diagonal
    return float(np.percentile(pooled, PERCENTILE))


def _nsd(d_pred: np.ndarray, d_ref: np.ndarray, tolerance: float) -> float:
    total = d_pred.size + d_ref.size
    if total == 0:
        return math.nan
    limit = tolerance * (1.0 + TOLERANCE_RTOL)
    return float((np.count_nonzero(d_pred <= limit) + np.count_nonzero(d_ref <= limit)) / total)


def hd95(pred: Any, ref: Any, spacing: Sequence[float]) -> float:
    """The 95th percentile (mm) of the pooled symmetric surface distances of two masks.

    NaN when both are empty; the diagonal of the image's extent (mm) when exactly one is.
    """
    p, r, sp, diagonal = _masks(pred, ref, spacing)
    return _hd95(*_distances(p, r, sp), diagonal)


def normalized_surface_dice(pred: Any, ref: Any, spacing: Sequence[float], tolerance_mm: float) -> float:
    """The normalized surface Dice of two masks at ``tolerance_mm``: the share of both borders' voxels
    lying within the tolerance of the other border. NaN when both are empty, 0 when exactly one is."""
    tol = _tolerance(tolerance_mm, "tolerance_mm")
    p, r, sp, _ = _masks(pred, ref, spacing)
    return _nsd(*_distances(p, r, sp), tol)


def _labels(array: Any, what: str) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype.kind not in "biu":
        raise DataError(f"the {what} must hold integer labels, got {arr.dtype}", hint="argmax the logits first")
    return arr


def tolerance_overrides(tolerance_mm: Mapping[Any, Any]) -> dict[int, float]:
    """A ``{class: mm}`` mapping of NSD tolerances checked and normalised (integer classes, finite mm ≥ 0)."""
    given: dict[int, float] = {}
    for key, value in tolerance_mm.items():
        try:
            c = int(key)
        except (TypeError, ValueError):
            raise UsageError(
                f"tolerance_mm keys must be class labels (integers), got {key!r}", hint="give e.g. {1: 1.0, 2: 2.0}"
            ) from None
        given[c] = _tolerance(value, f"tolerance_mm of class {c}")
    return given


def class_tolerances(classes: Sequence[int], tolerance_mm: float | Mapping[int, float]) -> dict[int, float]:
    """The NSD tolerance (mm) of each class: one number for all, or a ``{class: mm}`` mapping whose
    classes override :data:`DEFAULT_TOLERANCE_MM` (a class the mapping does not name gets the default;
    a named class that is not evaluated is refused, as a likely typo)."""
    cls = [int(c) for c in classes]
    if not isinstance(tolerance_mm, Mapping):
        tol = _tolerance(tolerance_mm, "tolerance_mm")
        return {c: tol for c in cls}
    given = tolerance_overrides(tolerance_mm)
    unknown = sorted(set(given) - set(cls))
    if unknown:
        raise UsageError(
            f"tolerance_mm names class(es) {unknown} that are not evaluated (classes: {cls})",
            hint="give tolerances for the evaluated classes only",
        )
    return {c: given.get(c, DEFAULT_TOLERANCE_MM) for c in cls}


def surface_metrics_per_class(
    pred_labels: Any,
    ref_labels: Any,
    spacing: Sequence[float],
    classes: Sequence[int],
    tolerance_mm: float | Mapping[int, float] = DEFAULT_TOLERANCE_MM,
    *,
    ignore_label: int | None = None,
) -> dict[int, dict[str, float]]:
    """``{class: {"HD95": mm, "NSD": share}}`` of two label maps (integer arrays of the same shape).

    ``tolerance_mm``: the NSD tolerance, one number or per class (see :func:`class_tolerances`).
    ``ignore_label``: voxels whose *reference* holds it are removed from both masks of every class.
    """
    pred = _labels(pred_labels, "prediction")
    ref = _labels(ref_labels, "reference")
    if pred.shape != ref.shape:
        raise DataError(
            f"prediction and reference differ in size ({pred.shape} vs {ref.shape})",
            hint="compare them on the same grid",
        )
    sp_full = _spacing(spacing, ref.ndim)
    cls = [int(c) for c in classes]
    if len(set(cls)) != len(cls):
        raise UsageError(f"classes must be distinct labels, got {cls}")
    tolerances = class_tolerances(cls, tolerance_mm)
    keep = None if ignore_label is None else ref != int(ignore_label)
    out: dict[int, dict[str, float]] = {}
    for c in cls:
        p_mask, r_mask = pred == c, ref == c
        if keep is not None:
            p_mask &= keep
            r_mask &= keep
        p, r, sp, diagonal = _masks(p_mask, r_mask, sp_full)
        d_pred, d_ref = _distances(p, r, sp)
        out[c] = {"HD95": _hd95(d_pred, d_ref, diagonal), "NSD": _nsd(d_pred, d_ref, tolerances[c])}
    return out
