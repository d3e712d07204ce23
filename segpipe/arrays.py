"""Array helpers below every stage: the nonzero bounding box that the fingerprint measures and
preprocessing crops to, and the conversion between label maps and nested regions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def crop_box(image: np.ndarray) -> list[list[int]]:
    """[[lo, hi), …] per spatial axis around voxels where any channel is nonzero (whole image if none)."""
    nonzero = np.any(image != 0, axis=0)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(np.any(nonzero, axis=other))
        box.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, int(nonzero.shape[axis])])
    return box


def labels_to_regions(label: np.ndarray, regions: Sequence[Sequence[int]]) -> np.ndarray:
    """Region masks [R, *shape] (bool) of a label map: region r is the union of its label values
    (nnU-Net's region-based training: BraTS' whole tumour = labels 1, 2, 3 ⊃ core = 2, 3 ⊃ enhancing = 3)."""
    out = np.zeros((len(regions), *label.shape), dtype=bool)
    for r, values in enumerate(regions):
        out[r] = np.isin(label, np.asarray(list(values), dtype=label.dtype))
    return out


def regions_to_labels(
    scores: np.ndarray, class_order: Sequence[int], *, threshold: float = 0.5, dtype: Any = np.uint8
) -> np.ndarray:
    """The label map of region probabilities (or masks) [R, *shape]: each region above ``threshold``
    writes its value of ``class_order``, later regions over earlier ones (nnU-Net's rule)."""
    if len(class_order) != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} regions but {len(class_order)} values in the class order")
    out = np.zeros(scores.shape[1:], dtype=dtype)
    for r, value in enumerate(class_order):
        out[scores[r] > threshold] = value
    return out
