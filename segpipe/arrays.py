"""Array helpers below every stage: the nonzero bounding box that the fingerprint measures and
preprocessing crops to."""

from __future__ import annotations

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
