"""Training data: fold splits, patch sampling, the batch stream and the ``LightningDataModule``.

* :func:`make_splits` — nnU-Net v2's five folds, bit for bit (``KFold(shuffle=True,
  random_state=12345)`` over the sorted case ids, re-implemented without scikit-learn);
  :func:`load_or_create_splits` honours an existing ``splits_final.json``.
* :class:`PatchSampler` — random patches from the memory-mapped preprocessing cache with nnU-Net's
  foreground oversampling (the last ``bs − round(0.67·bs)`` samples of every batch are centred on a
  voxel of a random present class). 3-D patches, 2-D slices along axis 0 (returned as
  [C, Y, X]) and 2.5-D slabs (``slab_neighbors=k``: the 2k+1 neighbouring slices become channels,
  [C·(2k+1), Y, X]; the label is the centre slice).
* :class:`TrainStream` / :class:`ValidationPatches` — an endless, per-worker-seeded stream of
  augmented batches and a fixed (seeded) set of validation batches; :class:`SegDataModule` serves
  both to Lightning.

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
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .augment import AugmentConfig, Augmenter
from .errors import DataError, StateError, UsageError
from .io.atomic import write_text

SPLITS_FILE = "splits_final.json"
SPLIT_SEED = 12345
OVERSAMPLE_FOREGROUND = 0.33


# ============================================================================ splits
def make_splits(case_ids: Sequence[str], n_folds: int = 5, seed: int = SPLIT_SEED) -> list[dict[str, list[str]]]:
    """nnU-Net's cross-validation folds: ``KFold(n_folds, shuffle=True, random_state=seed)`` over the
    sorted ids. sklearn shuffles ``arange(n)`` with ``RandomState(seed)``; fold k's validation set is
    the k-th consecutive chunk, the first ``n % n_folds`` chunks one longer; both lists sorted."""
    ids = sorted(str(c) for c in case_ids)
    n = len(ids)
    if len(set(ids)) != n:
        raise DataError("duplicate case ids in the split input")
    if n_folds < 2 or n < n_folds:
        raise DataError(f"cannot make {n_folds} folds from {n} case(s)",
                        hint="use fold=all, or add cases (each fold needs at least one validation case)")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_folds, n // n_folds, dtype=int)
    sizes[: n % n_folds] += 1
    splits, start = [], 0
    for size in sizes:
        val = np.zeros(n, dtype=bool)
        val[order[start : start + size]] = True
        start += size
        splits.append({"train": [ids[i] for i in np.flatnonzero(~val)], "val": [ids[i] for i in np.flatnonzero(val)]})
    return splits


def validate_splits(splits: Any, case_ids: Sequence[str] | None = None, *, where: str = SPLITS_FILE) -> None:
    """Raise :class:`StateError` unless ``splits`` is a non-empty list of {"train": [...], "val": [...]}
    whose ids are all in ``case_ids`` (when given)."""
    fix = f"fix or delete {where} (it is regenerated with nnU-Net's folds)"
    if not isinstance(splits, list) or not splits:
        raise StateError(f"{where}: expected a non-empty list of {{'train': [...], 'val': [...]}}", hint=fix)
    known = set(case_ids) if case_ids is not None else None
    for k, fold in enumerate(splits):
        if not isinstance(fold, dict) or set(fold) != {"train", "val"}:
            keys = sorted(fold) if isinstance(fold, dict) else type(fold).__name__
            raise StateError(f"{where}: fold {k} must have exactly the keys 'train' and 'val' (got {keys})", hint=fix)
        for part in ("train", "val"):
            ids = fold[part]
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise StateError(f"{where}: fold {k} '{part}' must be a list of case ids (strings)", hint=fix)
        if not fold["train"]:
            raise StateError(f"{where}: fold {k} has no training cases", hint=fix)
        if known is not None:
            unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
            if unknown:
                more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
                raise StateError(f"{where}: fold {k} names case(s) not in the dataset: {', '.join(unknown[:5])}{more}",
                                 hint=fix)


def load_or_create_splits(path: str | os.PathLike[str], case_ids: Sequence[str], *, n_folds: int = 5,
                          seed: int = SPLIT_SEED) -> list[dict[str, list[str]]]:
    """The splits in ``path`` (``splits_final.json``) when it exists — validated against
    ``case_ids`` — else nnU-Net's folds, written there atomically."""
    p = Path(path)
    if p.is_file():
        try:
            splits = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StateError(f"{p}: unreadable splits file ({e})", hint=f"fix or delete {p}") from e
        validate_splits(splits, case_ids, where=str(p))
        return splits
    splits = make_splits(case_ids, n_folds, seed)
    write_text(p, json.dumps(splits, indent=1))
    return splits


def fold_cases(splits: Sequence[dict[str, list[str]]], fold: int | str) -> tuple[list[str], list[str]]:
    """(train, val) case ids of ``fold`` (an int, or ``"all"``: train = val = every case)."""
    if isinstance(fold, str) and fold.strip().lower() == "all":
        every = sorted({c for f in splits for part in ("train", "val") for c in f[part]})
        return every, list(every)
    try:
        k = int(fold)
    except (TypeError, ValueError):
        k = -1
    if not 0 <= k < len(splits) or (isinstance(fold, float) and fold != k):
        raise UsageError(f"unknown fold {fold!r}", hint=f"choose one of {', '.join(map(str, range(len(splits))))}, all")
    return list(splits[k]["train"]), list(splits[k]["val"])


# ============================================================================ sampling
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
    out[(*lead, *dst)] = array[(*lead, *src)]


class PatchSampler:
    """Random patches from cached cases (``segpipe.preprocess`` cache, memory-mapped).

    ``patch_size``: 3 entries (3-D) or 2 (2-D slices along axis 0). ``slab_neighbors=k`` (2-D
    only) adds the k slices on each side as channels. Arrays are opened lazily in each process
    (memory maps are not pickled into workers).
    """

    def __init__(self, cache_dir: str | os.PathLike[str], case_ids: Sequence[str], patch_size: Sequence[int], *,
                 oversample_foreground: float = OVERSAMPLE_FOREGROUND, slab_neighbors: int = 0,
                 image_pad: float = 0.0, label_pad: int = 0, mmap: bool = True):
        from .preprocess import cached_properties

        self.cache_dir = Path(cache_dir)
        self.case_ids = list(case_ids)
        if not self.case_ids:
            raise StateError("no cases to sample from", hint="check the fold's case list and the cache")
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) not in (2, 3) or min(self.patch_size) < 1:
            raise UsageError(f"patch_size must be 2 or 3 positive sizes, got {tuple(patch_size)}")
        self.is_2d = len(self.patch_size) == 2
        if slab_neighbors and not self.is_2d:
            raise UsageError("slab_neighbors needs a 2-D patch_size (2.5-D slabs are 2-D samples)")
        self.slab_neighbors = int(slab_neighbors)
        self.patch3 = (2 * self.slab_neighbors + 1, *self.patch_size) if self.is_2d else self.patch_size
        self.oversample_foreground = float(oversample_foreground)
        self.image_pad, self.label_pad, self.mmap = float(image_pad), int(label_pad), mmap
        self.shapes: list[tuple[int, int, int]] = []
        self.locations: list[dict[int, np.ndarray]] = []
        max_classes = 0
        for cid in self.case_ids:
            props = cached_properties(self.cache_dir, cid)
            if props is None:
                raise StateError(f"{self.cache_dir}: case {cid} is not in the cache", hint="run `segpipe preprocess`")
            self.shapes.append(tuple(int(s) for s in props["shape_after_resample"]))
            max_classes = max(max_classes, int(props.get("num_classes", 256)))
            locs = {int(k): np.asarray(v, dtype=np.int64).reshape(-1, 3)
                    for k, v in (props.get("class_locations") or {}).items() if len(v)}
            self.locations.append(locs)
        # labels travel compact (uint8 unless classes or padding need int16): a batch crosses the
        # worker -> main process boundary through shared memory, and int64 labels were 2/3 of it
        fits = max_classes <= 256 and 0 <= self.label_pad <= 255
        self.label_dtype = np.uint8 if fits else np.int16
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    @property
    def channels(self) -> int:
        """Image channels of a sample (slab slices included)."""
        c = self._case(0)[0].shape[0]
        return c * (2 * self.slab_neighbors + 1) if self.is_2d else c

    def _case(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        arr = self._arrays.get(i)
        if arr is None:
            from .preprocess import load_cached_case

            image, label, _ = load_cached_case(self.cache_dir, self.case_ids[i], mmap=self.mmap)
            arr = self._arrays[i] = (image, label)
        return arr

    def forced(self, batch_size: int) -> np.ndarray:
        """Which samples of a batch are centred on foreground (nnU-Net: the last ones)."""
        n_free = round(batch_size * (1 - self.oversample_foreground))
        return np.arange(batch_size) >= n_free

    def draw(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(case indices [B], patch centres [B, 3]) for one batch."""
        cases = rng.integers(len(self.case_ids), size=batch_size)
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
                lower[0] = (voxel[0] if voxel is not None else rng.integers(shape[0])) - self.slab_neighbors
            centres[b] = lower + p // 2
        return cases, centres

    def crop(self, case: int, centre: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Image [C, *size] float32 and label [*size] (:attr:`label_dtype`) around ``centre`` (3-D sizes)."""
        image, label = self._case(case)
        size = tuple(int(s) for s in size)
        lower = [int(c) - s // 2 for c, s in zip(centre, size)]
        img = np.empty((image.shape[0], *size), dtype=np.float32)
        _crop(image, lower, size, self.image_pad, img)
        lab = np.empty(size, dtype=self.label_dtype)
        if label is None:
            lab[...] = self.label_pad
        else:
            _crop(label, lower, size, self.label_pad, lab)
        return img, lab

    def _to_sample(self, img: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """3-D crops [C, S, Y, X] → the sample layout (2-D: slices to channels, label's centre slice)."""
        if not self.is_2d:
            return img, lab[None]
        c, s = img.shape[:2]
        return img.reshape(c * s, *img.shape[2:]), lab[self.slab_neighbors][None]

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
        label = np.zeros((batch_size, 1, *self.patch_size), dtype=self.label_dtype)
        region = tuple(int(r) for r in draw.region[sidx].max(axis=0)) if sidx.size else self.patch_size
        region3 = (self.patch3[0], *region) if self.is_2d else region
        r_img = np.zeros((sidx.size, c_img, *region), dtype=np.float32)
        r_lab = np.zeros((sidx.size, 1, *region), dtype=self.label_dtype)
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
        }


def finish_batch(batch: dict[str, Any], augmenter: Augmenter | None) -> dict[str, Any]:
    """Augment (when ``augmenter``) and drop the sampling internals: ``image`` (float32), ``label``
    (uint8, or int16 beyond 255 classes / with negative padding: call ``.long()`` on the device),
    ``case``, ``centre`` and, after augmentation, ``flags``."""
    if augmenter is not None:
        return augmenter(batch)
    out = {k: v for k, v in batch.items()
           if k not in ("region_image", "region_label", "matrix", "spatial_index", "rotated", "scaled", "seed")}
    return out


# ============================================================================ datasets
def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def worker_init(_: int) -> None:
    """One intra-op thread per loader worker (the workers are the parallelism), as nnU-Net."""
    torch.set_num_threads(1)


class TrainStream(torch.utils.data.IterableDataset):
    """An endless stream of (augmented) training batches.

    Worker ``w`` of an iterator started for the ``e``-th time draws batch ``k`` from
    ``default_rng([seed, w, e, k])``: deterministic given the seed and the number of workers (the
    loader interleaves workers in order). With ``augment_on_device`` the batches leave the worker
    un-augmented (regions included) and :class:`SegDataModule` augments them after the transfer.
    """

    def __init__(self, sampler: PatchSampler, batch_size: int, augmenter: Augmenter | None, *, seed: int = 0,
                 augment_in_worker: bool = True):
        super().__init__()
        self.sampler, self.batch_size, self.augmenter = sampler, int(batch_size), augmenter
        self.seed, self.augment_in_worker = int(seed), augment_in_worker
        self._starts = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, _ = _worker()
        start = self._starts
        self._starts += 1
        for k in count():
            rng = np.random.default_rng([self.seed, wid, start, k])
            batch = self.sampler.sample(rng, self.batch_size, self.augmenter)
            if self.augment_in_worker:
                batch = finish_batch(batch, self.augmenter)
                batch.pop("flags", None)
            yield batch


class ValidationPatches(torch.utils.data.Dataset):
    """``num_batches`` fixed batches (same every epoch, seeded, no augmentation), with the same
    foreground oversampling as training — the patches nnU-Net's pseudo-Dice is computed on."""

    def __init__(self, sampler: PatchSampler, batch_size: int, num_batches: int = 50, *, seed: int = 0):
        self.sampler, self.batch_size, self.num_batches, self.seed = sampler, int(batch_size), int(num_batches), seed

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.num_batches:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, 7919, i])
        return finish_batch(self.sampler.sample(rng, self.batch_size, None), None)


def default_num_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


try:
    import lightning as L

    _LightningDataModule: Any = L.LightningDataModule
except ImportError:  # pragma: no cover - lightning is a dependency
    _LightningDataModule = object


class SegDataModule(_LightningDataModule):
    """Training and validation batches for one configuration and fold.

    Training: :class:`TrainStream` through a ``DataLoader`` with ``num_workers`` persistent workers
    (default: the usable cores), ``pin_memory`` on CUDA; one batch per loader step
    (``batch_size=None``). With ``augment_on_device=True`` the workers only cut patches and the
    augmentation runs on the training device after the transfer (``on_after_batch_transfer``).
    Validation: :class:`ValidationPatches`.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], train_cases: Sequence[str], val_cases: Sequence[str], *,
                 patch_size: Sequence[int], batch_size: int, slab_neighbors: int = 0,
                 oversample_foreground: float = OVERSAMPLE_FOREGROUND, augment: AugmentConfig | None = None,
                 num_workers: int | None = None, seed: int = 12345, num_val_batches: int = 50,
                 augment_on_device: bool = False, image_pad: float = 0.0, label_pad: int = 0):
        super().__init__()
        self.cache_dir = Path(cache_dir)
        self.train_cases, self.val_cases = list(train_cases), list(val_cases)
        self.patch_size, self.batch_size = tuple(int(p) for p in patch_size), int(batch_size)
        self.slab_neighbors, self.oversample_foreground = int(slab_neighbors), float(oversample_foreground)
        self.augment_config = augment if augment is not None else AugmentConfig()
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.seed, self.num_val_batches = int(seed), int(num_val_batches)
        self.augment_on_device, self.image_pad, self.label_pad = augment_on_device, image_pad, label_pad
        self.augmenter = Augmenter(self.patch_size, self.augment_config)
        self._train: TrainStream | None = None
        self._val: ValidationPatches | None = None

    @classmethod
    def for_fold(cls, cache_dir: str | os.PathLike[str], splits_path: str | os.PathLike[str], fold: int | str,
                 **kwargs: Any) -> SegDataModule:
        """Cases of ``fold`` from ``splits_path`` (created over the cached cases when missing)."""
        cdir = Path(cache_dir)
        ids = sorted(p.stem for p in cdir.glob("*.json") if not p.name.startswith("."))
        train, val = fold_cases(load_or_create_splits(splits_path, ids), fold)
        return cls(cdir, train, val, **kwargs)

    def _sampler(self, cases: Sequence[str]) -> PatchSampler:
        return PatchSampler(self.cache_dir, cases, self.patch_size, oversample_foreground=self.oversample_foreground,
                            slab_neighbors=self.slab_neighbors, image_pad=self.image_pad, label_pad=self.label_pad)

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._train = TrainStream(self._sampler(self.train_cases), self.batch_size, self.augmenter,
                                      seed=self.seed, augment_in_worker=not self.augment_on_device)
        if self._val is None and self.val_cases:
            self._val = ValidationPatches(self._sampler(self.val_cases), self.batch_size, self.num_val_batches,
                                          seed=self.seed)

    def _loader(self, dataset: Any, workers: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(), worker_init_fn=worker_init if workers > 0 else None,
            prefetch_factor=2 if workers > 0 else None)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        self.setup("fit")
        return self._loader(self._train, self.num_workers)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        self.setup("fit")
        if self._val is None:
            raise StateError("this fold has no validation cases", hint="use a numbered fold, or skip validation")
        return self._loader(self._val, min(self.num_workers, 1))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.augment_on_device and isinstance(batch, dict) and "region_image" in batch:
            batch = finish_batch(batch, self.augmenter)
            batch.pop("flags", None)
        return batch
