"""Random patches from the preprocessing cache (:class:`PatchSampler`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import StateError, UsageError
from ..preprocessing.cache import Cache
from .augment import Augmenter

OVERSAMPLE_FOREGROUND = 0.33


def _crop(array: np.ndarray, lower: Sequence[int], size: Sequence[int], pad: float, out: np.ndarray) -> None:
    """Copy ``array[..., lower:lower+size]`` (last 3 axes) into ``out``, ``pad`` outside the array."""
    shape = array.shape[-3:]
    src, dst = [], []
    for lo, n, s in zip(lower, size, shape):
        a, b = max(lo, 0), min(lo + n, s)
        if b <= a:
            out[...] = pad
            return
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    lead = (slice(None),) * (array.ndim - 3)
    if any(d.start > 0 or d.stop < n for d, n in zip(dst, size)):
        out[...] = pad
    dst_index, src_index = (*lead, *dst), (*lead, *src)
    out[dst_index] = array[src_index]


class PatchSampler:
    """Random patches from cached cases, read through :class:`~segpipe.preprocessing.Cache` (memory-mapped).

    ``cache``: a :class:`~segpipe.preprocessing.Cache` or its folder. ``patch_size``: 3 entries
    (3-D) or 2 (2-D slices along axis 0). ``context_slices=k`` (2-D only; the plan configuration's
    ``context_slices``) adds the k slices on each side as channels: a 2.5-D slab of 2k+1 slices.
    Arrays are opened lazily in each process (memory maps are not pickled into workers).
    """

    def __init__(
        self,
        cache: Cache | str | os.PathLike[str],
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        *,
        oversample_foreground: float = OVERSAMPLE_FOREGROUND,
        context_slices: int = 0,
        image_pad: float = 0.0,
        label_pad: int = 0,
        mmap: bool = True,
        previous: Mapping[str, str | os.PathLike[str]] | None = None,
        previous_channels: Sequence[Sequence[int]] | None = None,
    ):
        self.cache = cache if isinstance(cache, Cache) else Cache(cache)
        #: a cascade stage: each case's previous-stage label map (``.npy`` on the cache's grid) and the
        #: label values of each channel it becomes (:mod:`segpipe.data.cascade`)
        self.previous = {str(k): str(v) for k, v in previous.items()} if previous else None
        self.previous_channels = [[int(v) for v in c] for c in previous_channels or []]
        self.cache_dir = self.cache.root
        self.case_ids = list(case_ids)
        if not self.case_ids:
            raise StateError("no cases to sample from", hint="check the fold's case list and the cache")
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) not in (2, 3) or min(self.patch_size) < 1:
            raise UsageError(f"patch_size must be 2 or 3 positive sizes, got {tuple(patch_size)}")
        self.is_2d = len(self.patch_size) == 2
        if context_slices and not self.is_2d:
            raise UsageError("context_slices needs a 2-D patch_size (2.5-D slabs are 2-D samples)")
        if context_slices < 0:
            raise UsageError(f"context_slices must be ≥ 0, got {context_slices}")
        self.context_slices = int(context_slices)
        if self.previous is not None:
            if self.is_2d:
                raise UsageError("a previous stage's prediction is an input of 3-D (cascade) patches only")
            missing = [c for c in case_ids if str(c) not in self.previous]
            if missing or not self.previous_channels:
                raise StateError(f"no previous-stage prediction for case(s) {', '.join(missing[:5])}")
        self.patch3 = (2 * self.context_slices + 1, *self.patch_size) if self.is_2d else self.patch_size
        self.oversample_foreground = float(oversample_foreground)
        self.image_pad, self.label_pad, self.mmap = float(image_pad), int(label_pad), mmap
        self.shapes: list[tuple[int, ...]] = []
        self.locations: list[dict[int, np.ndarray]] = []
        max_classes = 0
        for cid in self.case_ids:
            props = self.cache.properties(cid)
            if props is None:
                raise StateError(f"{self.cache_dir}: case {cid} is not in the cache", hint="run `segpipe preprocess`")
            self.shapes.append(tuple(int(s) for s in props["shape_after_resample"]))
            max_classes = max(max_classes, int(props.get("num_classes", 256)))
            locs = {
                int(k): np.asarray(v, dtype=np.int64).reshape(-1, 3)
                for k, v in (props.get("class_locations") or {}).items()
                if len(v)
            }
            self.locations.append(locs)
        # labels travel compact (uint8 unless classes or padding need int16): a batch crosses the
        # worker -> main process boundary through shared memory, and int64 labels were 2/3 of it
        fits = max_classes <= 256 and 0 <= self.label_pad <= 255
        self.label_dtype = np.uint8 if fits else np.int16
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = {}
        #: the probability of drawing each case (None: uniform), e.g. hardness-weighted sampling's
        self.case_probabilities: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    @property
    def channels(self) -> int:
        """Image channels of a sample (slab slices included)."""
        c = self._case(0)[0].shape[0]
        return c * (2 * self.context_slices + 1) if self.is_2d else c

    def _case(self, i: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        arr = self._arrays.get(i)
        if arr is None:
            image, label, _ = self.cache.load(self.case_ids[i], mmap=self.mmap)
            prev = None
            if self.previous is not None:
                path = self.previous[self.case_ids[i]]
                prev = np.load(path, mmap_mode="r" if self.mmap else None)
                if tuple(prev.shape) != tuple(image.shape[1:]):
                    raise StateError(
                        f"{path}: previous-stage prediction {tuple(prev.shape)} is not on the case's grid "
                        f"{tuple(image.shape[1:])}",
                        hint="train the previous stage's folds again (their final validation writes it)",
                    )
            arr = self._arrays[i] = (image, label, prev)
        return arr

    def forced(self, batch_size: int) -> np.ndarray:
        """Which samples of a batch are centred on foreground (nnU-Net: the last ones)."""
        n_free = round(batch_size * (1 - self.oversample_foreground))
        return np.arange(batch_size) >= n_free

    def draw(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(case indices [B], patch centres [B, 3]) for one batch: cases drawn uniformly, or with
        :attr:`case_probabilities` when set."""
        if self.case_probabilities is None:
            cases = rng.integers(len(self.case_ids), size=batch_size)
        else:
            cases = rng.choice(len(self.case_ids), size=batch_size, replace=True, p=self.case_probabilities)
        centres = np.zeros((batch_size, 3), dtype=np.int64)
        p = np.asarray(self.patch3)
        for b, (i, force) in enumerate(zip(cases, self.forced(batch_size))):
            shape = np.asarray(self.shapes[i])
            d = p - shape
            lo = np.minimum(0, -((d + 1) // 2))  # -ceil(d/2) when the image is smaller
            hi = np.maximum(shape - p, -(d // 2))
            voxel = None
            locs = self.locations[i]
            if force and locs:
                classes = sorted(locs)
                pts = locs[classes[rng.integers(len(classes))]]
                voxel = pts[rng.integers(len(pts))]
            if voxel is not None:
                lower = np.clip(voxel - p // 2, lo, hi)
            else:
                lower = np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi)])
            if self.is_2d:  # the slab is centred on the slice, whatever the borders
                lower[0] = (voxel[0] if voxel is not None else rng.integers(shape[0])) - self.context_slices
            centres[b] = lower + p // 2
        return cases, centres

    def crop(self, case: int, centre: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Image [C, *size] float32 and label [*size] (:attr:`label_dtype`) around ``centre`` (3-D sizes);
        for a cascade stage the label is [2, *size], the previous stage's prediction second."""
        image, label, prev = self._case(case)
        size = tuple(int(s) for s in size)
        lower = [int(c) - s // 2 for c, s in zip(centre, size)]
        img = np.empty((image.shape[0], *size), dtype=np.float32)
        _crop(image, lower, size, self.image_pad, img)
        lab = np.empty(size, dtype=self.label_dtype)
        if label is None:
            lab[...] = self.label_pad
        else:
            _crop(label, lower, size, self.label_pad, lab)
        if prev is not None:
            pre = np.empty(size, dtype=self.label_dtype)
            _crop(prev, lower, size, 0, pre)
            lab = np.stack([lab, pre])
        return img, lab

    def _to_sample(self, img: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """3-D crops [C, S, Y, X] → the sample layout (2-D: slices to channels, label's centre slice)."""
        if not self.is_2d:
            return img, (lab if lab.ndim == img.ndim else lab[None])
        c, s = img.shape[:2]
        return img.reshape(c * s, *img.shape[2:]), lab[self.context_slices][None]

    def sample(self, rng: np.random.Generator, batch_size: int, augmenter: Augmenter | None = None) -> dict[str, Any]:
        """One batch, not yet augmented, as a dict of tensors (see :meth:`Augmenter.__call__`).

        With an ``augmenter`` its spatial parameters are drawn first and the samples to rotate or
        scale are cut as larger regions (``region_image``/``region_label``, common size within the
        batch) for the augmenter to resample.
        """
        cases, centres = self.draw(rng, batch_size)
        draw = augmenter.draw_spatial(rng, batch_size) if augmenter is not None else None
        sidx = np.flatnonzero(draw.transformed) if draw is not None else np.zeros(0, dtype=int)
        c_img = self.channels
        nd = len(self.patch_size)
        image = np.zeros((batch_size, c_img, *self.patch_size), dtype=np.float32)
        n_lab = 1 if self.previous is None else 2  # a cascade's previous-stage prediction travels as a label
        label = np.zeros((batch_size, n_lab, *self.patch_size), dtype=self.label_dtype)
        region = (
            tuple(int(r) for r in draw.region[sidx].max(axis=0)) if draw is not None and sidx.size else self.patch_size
        )
        region3 = (self.patch3[0], *region) if self.is_2d else region
        r_img = np.zeros((sidx.size, c_img, *region), dtype=np.float32)
        r_lab = np.zeros((sidx.size, n_lab, *region), dtype=self.label_dtype)
        slot = {int(b): j for j, b in enumerate(sidx)}
        for b in range(batch_size):
            if b in slot:
                img, lab = self._to_sample(*self.crop(cases[b], centres[b], region3))
                r_img[slot[b]], r_lab[slot[b]] = img, lab
            else:
                img, lab = self._to_sample(*self.crop(cases[b], centres[b], self.patch3))
                image[b], label[b] = img, lab
        zeros = np.zeros(batch_size, dtype=bool)
        return {
            "image": torch.from_numpy(image),
            "label": torch.from_numpy(label),
            "region_image": torch.from_numpy(r_img),
            "region_label": torch.from_numpy(r_lab),
            "matrix": torch.from_numpy(draw.matrix[sidx] if draw is not None else np.zeros((0, nd, nd))),
            "spatial_index": torch.from_numpy(sidx.astype(np.int64)),
            "rotated": torch.from_numpy(draw.rotated if draw is not None else zeros),
            "scaled": torch.from_numpy(draw.scaled if draw is not None else zeros),
            "case": [self.case_ids[i] for i in cases],
            "centre": torch.from_numpy(centres),
            "seed": int(rng.integers(2**62)),
            **({"previous_channels": self.previous_channels} if self.previous is not None else {}),
        }


def finish_batch(batch: dict[str, Any], augmenter: Augmenter | None) -> dict[str, Any]:
    """Augment (when ``augmenter``) and drop the sampling internals: ``image`` (float32), ``label``
    (uint8, or int16 beyond 255 classes / with negative padding: call ``.long()`` on the device),
    ``case``, ``centre`` and, after augmentation, ``flags``."""
    if augmenter is not None:
        out = augmenter(batch)
    else:
        out = {
            k: v
            for k, v in batch.items()
            if k not in ("region_image", "region_label", "matrix", "spatial_index", "rotated", "scaled", "seed")
        }
    if "previous_channels" in out:  # a cascade stage: the previous stage's prediction joins the image
        from .cascade import attach_previous

        out = attach_previous(out, perturb=augmenter is not None)
    return out
