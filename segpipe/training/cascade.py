"""The 3-D cascade in training: what ``3d_lowres`` leaves for ``3d_cascade_fullres``, and what that reads.

* :func:`save_next_stage`: the final validation of each ``3d_lowres`` fold also writes each of its
  validation cases' segmentation on the full-resolution grid, ``runs/3d_lowres/fold_<k>/next_stage/<case>.npy``
  (uint8): its softmax (sigmoid for regions) resampled linearly from the low-resolution grid to the
  full-resolution one, then the argmax. Over the five folds every case is predicted once, by the fold
  that did not train on it (nnU-Net's ``predicted_next_stage``).
* :func:`previous_predictions`: the file of each case a cascade fold needs (its training and its
  validation cases), refused in one line naming the low-resolution folds to train when any is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arrays import regions_to_labels
from ..errors import StateError
from ..io.atomic import save_npy
from ..splits import N_FOLDS

__all__ = ["NEXT_STAGE_DIR", "next_stage_of", "previous_predictions", "save_next_stage"]

NEXT_STAGE_DIR = "next_stage"


def next_stage_of(plan: Any, configuration: str) -> str | None:
    """The cascade stage that takes ``configuration``'s predictions as input, else None."""
    return next((name for name in plan.configurations if plan.previous_stage(name) == configuration), None)


def save_next_stage(plan: Any, next_stage: str, logits: torch.Tensor, props: dict[str, Any], path: Path) -> Path:
    """The label map of one case's low-resolution ``logits`` [K, *grid] on the ``next_stage``'s grid, saved
    to ``path`` (see the module docstring); ``props``: the case's cache properties."""
    from ..preprocessing import resampled_shape, spec_from_plan
    from ..preprocessing.resampling import resample, separate_z_axis

    spec = spec_from_plan(plan, next_stage)
    spacing = props["spacing_before_resample"]
    shape = resampled_shape(props["shape_after_crop"], spacing, spec)
    regions = (plan.settings or {}).get("regions")
    scores = torch.sigmoid(logits.float()) if regions else torch.softmax(logits.float(), dim=0)
    probs = resample(scores.cpu().numpy(), shape, kind="linear", separate_axis=separate_z_axis(spacing))
    label = regions_to_labels(probs, regions["class_order"]) if regions else probs.argmax(0).astype(np.uint8)
    return save_npy(path, label)


def previous_predictions(run_root: Path, plan: Any, configuration: str, case_ids: Sequence[str]) -> dict[str, Path]:
    """``{case: next_stage/<case>.npy}`` of the previous stage's folds for every case of ``case_ids``
    (``run_root``: the workspace entry's ``runs/``); missing ones are refused, naming the folds to train."""
    previous = plan.previous_stage(configuration)
    found: dict[str, Path] = {}
    for fold in range(N_FOLDS):
        folder = run_root / previous / f"fold_{fold}" / NEXT_STAGE_DIR
        if folder.is_dir():
            for f in folder.glob("*.npy"):
                found.setdefault(f.stem, f)
    missing = [c for c in case_ids if c not in found]
    if missing:
        have = sorted({p.parent.parent.name for p in found.values()})
        raise StateError(
            f"{configuration} needs the {previous} predictions of every case; {len(missing)} case(s) have none "
            f"(e.g. {', '.join(missing[:3])}; {previous} folds with predictions: {', '.join(have) or 'none'})",
            hint=f"train {previous} on every fold first (segpipe train config={previous} fold=0 … fold={N_FOLDS - 1})",
        )
    return {c: found[c] for c in case_ids}
