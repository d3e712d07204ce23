"""The 3-D cascade's extra input: the low-resolution stage's prediction as one-hot channels.

A ``3d_cascade_fullres`` network sees the image and, as extra channels, the ``3d_lowres`` stage's
segmentation of the case resampled to the full-resolution grid: one binary channel per foreground
class (per region for a region dataset). In training that segmentation is the low-resolution
stage's cross-validation prediction (the fold that did not train on the case), cut and augmented
spatially with the label (it travels as a second label channel through the spatial transforms and
mirroring, nearest neighbour), then turned into channels and perturbed as nnU-Net does, so the
network learns not to copy it:

* with probability 0.4 per sample, every channel in random order gets a random binary
  dilation, erosion, closing or opening with a ball of radius 1–7 voxels (what it adds to one
  channel is taken from the others, so the channels stay one-hot);
* with probability 0.2 per sample, each channel loses one random connected component that
  covers at most 15 % of the patch.

In validation and inference the channels are the prediction as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["P_BINARY_OPERATOR", "P_REMOVE_COMPONENT", "attach_previous", "previous_channels", "perturb_channels"]

#: nnU-Net's cascade perturbations: per-sample probabilities, the structuring element's radius range
P_BINARY_OPERATOR = 0.4
P_REMOVE_COMPONENT = 0.2
STREL_RADIUS = (1, 8)  # [low, high)
MAX_COMPONENT_FRACTION = 0.15


def previous_channels(labels: np.ndarray | torch.Tensor, channels: Sequence[Sequence[int]]) -> np.ndarray:
    """Binary channels [B, K, *S] (float32) of previous-stage label maps [B, *S]: channel k is 1 where
    the label is one of ``channels[k]`` (a foreground class, or a region's label values)."""
    lab = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    out = np.zeros((lab.shape[0], len(channels), *lab.shape[1:]), dtype=np.float32)
    for k, values in enumerate(channels):
        out[:, k] = np.isin(lab, np.asarray(list(values), dtype=lab.dtype))
    return out


def _ball(radius: int, dims: int) -> np.ndarray:
    grid = np.ogrid[tuple(slice(-radius, radius + 1) for _ in range(dims))]
    return np.asarray(sum(g.astype(np.float32) ** 2 for g in grid) <= radius**2)


def perturb_channels(onehot: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """nnU-Net's perturbations of the previous-stage channels [B, K, *S] (in place; see the module docstring)."""
    from scipy import ndimage

    operators = (ndimage.binary_dilation, ndimage.binary_erosion, ndimage.binary_closing, ndimage.binary_opening)
    dims = onehot.ndim - 2
    for b in range(onehot.shape[0]):
        if rng.uniform() < P_BINARY_OPERATOR:
            for k in rng.permutation(onehot.shape[1]):
                mask = onehot[b, k] > 0
                op = operators[int(rng.integers(len(operators)))]
                result = op(mask, structure=_ball(int(rng.integers(*STREL_RADIUS)), dims))
                added = result & ~mask
                onehot[b, k] = result
                others = [o for o in range(onehot.shape[1]) if o != k]
                if others and added.any():
                    onehot[b, others] = np.where(added[None], 0.0, onehot[b, others])
        if rng.uniform() < P_REMOVE_COMPONENT:
            limit = MAX_COMPONENT_FRACTION * onehot[b, 0].size
            for k in range(onehot.shape[1]):
                components, count = ndimage.label(onehot[b, k] > 0)
                if count == 0:
                    continue
                sizes = np.bincount(components.ravel())[1:]
                small = np.flatnonzero(sizes <= limit) + 1
                if small.size:
                    onehot[b, k][components == int(small[int(rng.integers(small.size))])] = 0.0
    return onehot


def attach_previous(batch: dict[str, Any], *, perturb: bool) -> dict[str, Any]:
    """A cascade batch made ready for the network: its label's second channel (the previous stage's
    prediction) becomes binary image channels after the image's, perturbed when ``perturb``."""
    channels = batch.pop("previous_channels")
    label = batch["label"]
    previous = previous_channels(label[:, 1], channels)
    if perturb:
        rng = np.random.default_rng([int(batch.get("seed", 0)), 104729])
        previous = perturb_channels(previous, rng)
    image = batch["image"]
    extra = torch.from_numpy(previous).to(device=image.device, dtype=image.dtype)
    batch["image"] = torch.cat([image, extra], dim=1)
    batch["label"] = label[:, :1].contiguous()
    return batch
