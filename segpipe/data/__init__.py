"""Training data: fold splits, patch sampling, the batch stream and the ``LightningDataModule``.

* :func:`make_splits` — nnU-Net v2's five folds, bit for bit (``KFold(shuffle=True,
  random_state=12345)`` over the sorted case ids, re-implemented without scikit-learn);
  :func:`load_or_create_splits` honours an existing ``splits_final.json`` and refuses one that
  names a case no longer in the dataset (see there).
* :class:`PatchSampler` — random patches from the memory-mapped preprocessing cache with nnU-Net's
  foreground oversampling (the last ``bs − round(0.67·bs)`` samples of every batch are centred on a
  voxel of a random present class). 3-D patches, 2-D slices along axis 0 (returned as
  [C, Y, X]) and 2.5-D slabs (``context_slices=k``: the 2k+1 neighbouring slices become channels,
  [C·(2k+1), Y, X]; the label is the centre slice).
* :class:`TrainStream` / :class:`ValidationPatches` — an endless, per-worker-seeded stream of
  augmented batches and a fixed (seeded) set of validation batches; :class:`SegDataModule` serves
  both to Lightning; :meth:`SegDataModule.from_plan` builds it from a plan configuration, the
  one place patch size, batch size and slab width (``context_slices``) come from.

Larger-patch-first, like nnU-Net: a sample that will be rotated or scaled is cut as the box that
holds its transformed patch (computed from the drawn matrix, +1 voxel margin) around the same
centre, then resampled down to the patch — so rotated patches never show artificial zero corners
inside the image. nnU-Net cuts one fixed enlarged patch (sized for scale 0.85) for every sample;
cutting exactly what each sample needs reads less for the 64% of samples that are not transformed
and enough for the zoomed-out ones.

Patch placement (per axis, in the cache's voxel grid, with ``d = patch − shape``): uniform samples
have their lower corner in ``[min(0, −⌈d/2⌉), max(shape − patch, −⌊d/2⌋)]`` (nnU-Net's rule: inside
the image when it is large enough, centred ± 1 when it is smaller); foreground samples are centred
on the chosen voxel, clipped to the same range (nnU-Net clips only the lower side, which wastes
patch area on padding near the upper border; the voxel stays inside the patch either way). The
2-D slice / slab centre is the chosen voxel's slice, or a uniform slice. Outside the image: image
``image_pad`` (0), label ``label_pad`` (0).

The package: :mod:`.splits`, :mod:`.sampler`, :mod:`.augment`, :mod:`.datamodule`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..splits import SPLIT_SEED, SPLITS_FILE, fold_cases, load_or_create_splits, make_splits, validate_splits
    from .augment import AugmentConfig, Augmenter
    from .datamodule import SegDataModule, TrainStream, ValidationPatches, worker_init
    from .sampler import OVERSAMPLE_FOREGROUND, PatchSampler, finish_batch

# each name's module, imported on first use: `segpipe.splits` stays light for `check` and
# `plan` (the data module pulls in Lightning, which takes seconds to import)
_HOME = {
    **dict.fromkeys(("AugmentConfig", "Augmenter"), ".augment"),
    **dict.fromkeys(("SegDataModule", "TrainStream", "ValidationPatches", "worker_init"), ".datamodule"),
    **dict.fromkeys(("OVERSAMPLE_FOREGROUND", "PatchSampler", "finish_batch"), ".sampler"),
    **dict.fromkeys(
        ("SPLIT_SEED", "SPLITS_FILE", "fold_cases", "load_or_create_splits", "make_splits", "validate_splits"),
        "..splits",
    ),
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "OVERSAMPLE_FOREGROUND",
    "SPLITS_FILE",
    "SPLIT_SEED",
    "AugmentConfig",
    "Augmenter",
    "PatchSampler",
    "SegDataModule",
    "TrainStream",
    "ValidationPatches",
    "finish_batch",
    "fold_cases",
    "load_or_create_splits",
    "make_splits",
    "validate_splits",
    "worker_init",
]
