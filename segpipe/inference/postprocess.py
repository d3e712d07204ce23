"""Post-processing of label maps: keep the largest connected component of chosen classes.

The decision is data: ``{"largest_component": [1, 3]}`` lists the classes whose label map keeps
only its largest connected component (26-connectivity in 3-D, 8 in 2-D; the removed voxels
become background). It is chosen on cross-validation predictions (a class is listed only when
doing so raised its mean validation Dice), stored in ``postprocessing.json`` of a model folder, and
applied by the predictor after the argmax, on the case's own grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["apply_postprocessing", "check_postprocessing", "keep_largest_component"]


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (full connectivity); empty stays empty."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    components, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def check_postprocessing(decision: Mapping[str, Any] | None, num_classes: int | None = None) -> dict[str, Any]:
    """The decision as a plain dict (``{"largest_component": [int, ...]}``), validated."""
    if decision is None:
        return {"largest_component": []}
    if not isinstance(decision, Mapping):
        raise ConfigError(f"a post-processing decision must be a mapping, got {type(decision).__name__}")
    unknown = sorted(set(decision) - {"largest_component"})
    if unknown:
        raise ConfigError(
            f"unknown post-processing keys {unknown}", hint='the decision holds "largest_component": [class, ...]'
        )
    raw = decision.get("largest_component", []) or []
    if not isinstance(raw, Iterable) or isinstance(raw, (str, bytes)):
        raise ConfigError(f"largest_component must list class values, got {raw!r}")
    classes = []
    for value in raw:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
            raise ConfigError(f"largest_component lists {value!r}: expected foreground class values (1, 2, ...)")
        if num_classes is not None and int(value) >= num_classes:
            raise ConfigError(f"largest_component lists class {value}, but the model has {num_classes} classes")
        classes.append(int(value))
    return {"largest_component": sorted(set(classes))}


def apply_postprocessing(label: np.ndarray, decision: Mapping[str, Any] | None) -> np.ndarray:
    """``label`` with each listed class reduced to its largest connected component (a new array
    when anything changes; the input is not modified)."""
    classes = check_postprocessing(decision)["largest_component"]
    out = label
    for c in classes:
        mask = out == c
        keep = keep_largest_component(mask)
        drop = mask & ~keep
        if drop.any():
            if out is label:
                out = label.copy()
            out[drop] = 0
    return out
