"""Region-based training (nnU-Net's ``regions_class_order``, BraTS' nested tumour regions).

A region dataset declares overlapping regions, each the union of some label values (BraTS: whole
tumour = 1, 2, 3 ⊃ tumour core = 2, 3 ⊃ enhancing tumour = 3). The network then has one output per
region, read through a sigmoid, and the label maps are turned into one binary mask per region
(:func:`segpipe.arrays.labels_to_regions`) for the loss and the metrics:

* :class:`RegionLoss`: the chosen loss's region term (soft Dice, Tversky, …) on every region's
  sigmoid — no background channel to leave out, so every region is scored, as nnU-Net's
  ``DC_and_BCE_loss`` does — plus binary cross-entropy on the logits in place of the softmax
  cross-entropy, with the loss's own weights. Deep supervision downsamples the label map and this
  converts each level (the same masks as converting first: nearest neighbour commutes with it).
* :func:`region_counts`: true/false positives and false negatives per region of ``logit > 0``
  (sigmoid above 0.5) against the masks, for the pseudo-Dice of each validation epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError

__all__ = ["RegionLoss", "region_counts", "region_masks"]


def region_masks(labels: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Masks ``[B, R, *S]`` (bool) of integer labels ``[B, *S]``: region r is where the label is one of its values."""
    masks = []
    for values in regions:
        wanted = torch.as_tensor(list(values), dtype=labels.dtype, device=labels.device)
        masks.append(torch.isin(labels, wanted))
    return torch.stack(masks, dim=1)


def _plain_labels(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    labels = target[:, 0] if target.ndim == logits.ndim else target
    if labels.shape[0] != logits.shape[0] or tuple(labels.shape[1:]) != tuple(logits.shape[2:]):
        raise ValueError(f"labels {tuple(target.shape)} do not match logits {tuple(logits.shape)}")
    return labels.to(device=logits.device, dtype=torch.long)


class RegionLoss(nn.Module):
    """A :class:`~segpipe.losses.SegLoss`'s terms on regions (see the module docstring)."""

    def __init__(self, loss: nn.Module, regions: Sequence[Sequence[int]]):
        super().__init__()
        from ..losses import CrossEntropy

        if getattr(loss, "ignore_index", None) is not None:
            raise ConfigError("a region dataset cannot have an ignore label", hint="remove the ignore label")
        voxel = getattr(loss, "voxel", None)
        if voxel is not None and not isinstance(voxel, CrossEntropy):
            raise ConfigError(
                f"the loss's voxel term ({type(voxel).__name__}) has no region form",
                hint="train a region dataset with loss=dice_ce, tversky, focal_tversky or hardness_dice",
            )
        self.region = getattr(loss, "region", None)
        self.bce = voxel is not None
        self.region_weight = float(getattr(loss, "region_weight", 1.0))
        self.ce_weight = float(getattr(loss, "ce_weight", 1.0))
        self.regions = [[int(v) for v in r] for r in regions]
        if not self.regions:
            raise ConfigError("a region loss needs at least one region")

    def with_per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss (a scalar) and its per-sample values ``[B]`` (detached)."""
        logits = logits.float()
        if logits.shape[1] != len(self.regions):
            raise ValueError(f"{logits.shape[1]} outputs for {len(self.regions)} regions")
        masks = region_masks(_plain_labels(logits, target), self.regions)
        loss = logits.new_zeros(())
        samples = logits.new_zeros(logits.shape[0])
        if self.region is not None:
            term, per = self.region(torch.sigmoid(logits), masks, None)
            loss = loss + self.region_weight * term
            samples = samples + self.region_weight * per.detach()
        if self.bce:
            bce = F.binary_cross_entropy_with_logits(logits, masks.to(logits.dtype), reduction="none")
            loss = loss + self.ce_weight * bce.mean()
            samples = samples + self.ce_weight * bce.detach().flatten(1).mean(1)
        return loss, samples

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.with_per_sample(logits, target)[0]

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.with_per_sample(logits, target)[1]


def region_counts(logits: torch.Tensor, target: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[3, R]`` float64 counts of true positives, false positives and false negatives of each region
    (predicted where its logit is above 0, i.e. its sigmoid above 0.5), summed over the batch."""
    pred = logits > 0
    ref = region_masks(_plain_labels(logits, target), regions)
    axes = [0, *range(2, pred.ndim)]
    tp = (pred & ref).sum(axes)
    fp = (pred & ~ref).sum(axes)
    fn = (~pred & ref).sum(axes)
    return torch.stack([tp, fp, fn]).to(torch.float64)
