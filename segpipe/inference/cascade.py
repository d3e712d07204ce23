"""The 3-D cascade in prediction: ``3d_cascade_fullres`` runs after ``3d_lowres``.

A cascade model holds the cascade stage's folds and, for its first stage, every trained fold of the
low-resolution configuration (:func:`with_previous_stages`). For each case the first stage segments
the case on its own (coarser) grid, as any configuration does (preprocessing, sliding window, TTA, its
folds' mean); its class probabilities (each region's sigmoid for a region dataset) are resampled
linearly to the cascade stage's grid of the same crop, turned into labels and then into one binary
channel per foreground class (per region), which join the image as the cascade network's extra
input (:func:`with_previous_stage`). Only the cascade stage's output is the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..arrays import regions_to_labels
from ..errors import StateError

__all__ = ["stage_only", "with_previous_stage", "with_previous_stages"]


def with_previous_stages(plan: Any, configs: Sequence[str], found: dict[str, list[Any]], origin: Any) -> list[Any]:
    """The members of the previous stages the cascade stages among ``configs`` need (every numbered
    fold trained, else ``fold_all``), from ``found`` (configuration -> members); refused when one has none."""
    extra: list[Any] = []
    for c in configs:
        previous = plan.previous_stage(c)
        if not previous or previous in configs:
            continue
        have = found.get(previous) or []
        if not have:
            raise StateError(
                f"{origin}: {c} runs after {previous}, which has no trained fold",
                hint=f"train {previous} (segpipe train config={previous} fold=0 … fold=4)",
            )
        numbered = [m for m in have if m.fold != "all"]
        extra.extend(numbered or have)
    return extra


def stage_only(plan: Any, configuration: str, configurations: Sequence[str]) -> bool:
    """Whether ``configuration`` is among ``configurations`` only as a cascade stage's first stage."""
    return any(plan.previous_stage(other) == configuration for other in configurations)


def with_previous_stage(
    predictor: Any,
    image: np.ndarray,
    geometry: Any,
    configuration: str,
    grid: np.ndarray,
    *,
    name: str,
    props: dict[str, Any] | None = None,
) -> np.ndarray:
    """``grid`` (the cascade stage's preprocessed image [C, *S]; ``props``: its properties) with the
    previous stage's prediction of the case appended as binary channels (see the module docstring)."""
    from ..data.cascade import previous_channels
    from ..preprocessing import preprocess_arrays, spec_from_plan
    from ..preprocessing.resampling import resample, separate_z_axis

    plan = predictor.plan
    previous = plan.previous_stage(configuration)
    first, _, first_props = preprocess_arrays(image, None, geometry, spec_from_plan(plan, previous), plan.num_classes)
    scores = predictor._probabilities(first, previous, f"{name} ({previous})")
    del first
    if predictor.nnunet is not None:  # nnU-Net's cascade: its first stage's label map, as its preprocessing sees it
        assert props is not None
        first_label = _nnunet_first_label(predictor, scores, first_props)
        # nnU-Net's z-score mask is "seg >= 0": the previous stage's foreground counts as inside the image
        grid, _, props = preprocess_arrays(
            image, None, geometry, spec_from_plan(plan, configuration), plan.num_classes, norm_also=first_label > 0
        )
        labels = _nnunet_previous(predictor, image, first_label, props=props, configuration=configuration)
        channels = previous_channels(labels[None], plan.previous_channels(configuration))[0]
        return np.concatenate([grid, channels.astype(grid.dtype, copy=False)])
    props = first_props
    regions = (plan.settings or {}).get("regions")
    if regions:  # the region model's logits: each region's sigmoid
        scores = torch.sigmoid(torch.from_numpy(scores)).numpy()
    probs = resample(
        scores, grid.shape[1:], kind="linear", separate_axis=separate_z_axis(props["spacing_before_resample"])
    )
    del scores
    labels = regions_to_labels(probs, regions["class_order"]) if regions else probs.argmax(0).astype(np.uint8)
    channels = previous_channels(labels[None], plan.previous_channels(configuration))[0]
    return np.concatenate([grid, channels.astype(grid.dtype, copy=False)])


def _nnunet_first_label(predictor: Any, scores: np.ndarray, first_props: dict[str, Any]) -> np.ndarray:
    """The first stage's label map on the image's grid, from its logits: what ``nnUNetv2_predict`` writes."""
    from ..preprocessing import restore_argmax

    regions = (predictor.plan.settings or {}).get("regions")
    if regions:
        first_props = {**first_props, "regions": [int(v) for v in regions["class_order"]]}
    return restore_argmax(scores, first_props).astype(np.int16)


def _nnunet_previous(
    predictor: Any, image: np.ndarray, label: np.ndarray, *, props: dict[str, Any], configuration: str
) -> np.ndarray:
    """An nnU-Net cascade's input labels on the cascade stage's grid: the first stage's label map taken
    through the cascade stage's preprocessing of label maps: transpose, crop, -1 outside the nonzero
    region (holes filled), nnU-Net's label resampling (:func:`~segpipe.preprocessing.nnunet_resampling.resize_labels`)."""
    from scipy.ndimage import binary_fill_holes

    from ..preprocessing.nnunet_resampling import resample_like_nnunet

    transpose = [int(a) for a in props["transpose"]]
    box = tuple(slice(lo, hi) for lo, hi in props["crop_box"])
    seg = np.transpose(label, transpose)[box].copy()
    nonzero = np.any(np.transpose(image, [0, *[a + 1 for a in transpose]]) != 0, axis=0)[box]
    seg[(seg == 0) & ~binary_fill_holes(nonzero)] = -1
    settings = predictor.nnunet["resampling"][configuration]["seg"]
    shape = props["shape_after_resample"]
    current, target = props["spacing_before_resample"], props["spacing"]
    return resample_like_nnunet(seg[None], shape, current, target, settings, seg=True)[0]
