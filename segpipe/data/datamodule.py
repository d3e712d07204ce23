"""The batch stream, validation patches and the ``LightningDataModule``."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from itertools import count
from typing import Any

import numpy as np
import torch

from ..errors import StateError, UsageError
from ..parallel import cap_num_workers, default_num_workers, worker_signals
from ..preprocessing.cache import Cache
from ..settings import configured
from ..splits import fold_cases, load_or_create_splits
from .augment import AugmentConfig, Augmenter
from .sampler import OVERSAMPLE_FOREGROUND, PatchSampler, finish_batch


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def worker_init(_: int) -> None:
    """One intra-op thread per loader worker (the workers are the parallelism), as nnU-Net. Signals
    are the training process's to handle (:func:`~segpipe.parallel.worker_signals`): Ctrl-C or
    SIGTERM sent to the whole process group lets it save and stop its workers itself, and a worker
    dies with it."""
    worker_signals(os.getppid())
    torch.set_num_threads(1)


class TrainStream(torch.utils.data.IterableDataset):
    """An endless stream of (augmented) training batches.

    Batch ``j`` of the ``e``-th iterator started (an epoch) is drawn from ``default_rng([seed, e, j])``
    (``[seed, e, j, rank]`` in process ``rank > 0`` of a distributed run, so that each process draws
    its own batches); of ``W`` loader workers, worker ``w`` makes batches ``w, w + W, …``, which the
    loader hands out in that order. The stream is therefore the same for any number of workers, and
    an epoch interrupted after ``k`` batches continues exactly: :meth:`resume_at` makes the next
    iterator start at epoch ``e`` with batch ``k`` and end that epoch after batch ``length − 1``.
    With ``augment_on_device`` the batches leave the worker un-augmented (regions included) and
    :class:`SegDataModule` augments them after the transfer.
    """

    def __init__(
        self,
        sampler: PatchSampler,
        batch_size: int,
        augmenter: Augmenter | None,
        *,
        seed: int = 0,
        augment_in_worker: bool = True,
        rank: int = 0,
    ):
        super().__init__()
        self.sampler, self.batch_size, self.augmenter = sampler, int(batch_size), augmenter
        self.seed, self.augment_in_worker, self.rank = int(seed), augment_in_worker, int(rank)
        self._starts = 0
        self._resume: tuple[int, int, int] | None = None  # (epoch, first batch, epoch length)

    def resume_at(self, epoch: int, batch: int = 0, length: int | None = None) -> None:
        """Make the next iterator epoch ``epoch`` (0-based) from batch ``batch`` on; with ``batch > 0``
        it ends after batch ``length − 1`` (the epoch's length), the later ones run endlessly."""
        self._starts = int(epoch)
        self._resume = (int(epoch), int(batch), int(length)) if batch and length is not None else None

    def set_epoch(self, epoch: int) -> None:
        """Make the next iterator epoch ``epoch`` (0-based), keeping a pending :meth:`resume_at`."""
        self._starts = int(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, workers = _worker()
        start = self._starts
        self._starts += 1
        first, end = 0, None
        if self._resume is not None and self._resume[0] == start:
            first, end = self._resume[1], self._resume[2]
        for j in count(first + wid, workers):
            if end is not None and j >= end:
                return
            key = [self.seed, start, j] if self.rank == 0 else [self.seed, start, j, self.rank]
            batch = self.sampler.sample(np.random.default_rng(key), self.batch_size, self.augmenter)
            if self.augment_in_worker:
                batch = finish_batch(batch, self.augmenter)
                batch.pop("flags", None)
            yield batch


class ValidationPatches(torch.utils.data.Dataset):
    """``num_batches`` fixed batches (same every epoch, seeded, no augmentation), with the same
    foreground oversampling as training — the patches nnU-Net's pseudo-Dice is computed on.

    In a distributed run process ``rank`` of ``world_size`` takes batches ``rank``,
    ``rank + world_size``, …: together they score the same batches as one process.
    """

    def __init__(
        self,
        sampler: PatchSampler,
        batch_size: int,
        num_batches: int = 50,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.sampler, self.batch_size, self.num_batches, self.seed = sampler, int(batch_size), int(num_batches), seed
        self.rank, self.world_size = int(rank), max(1, int(world_size))

    def __len__(self) -> int:
        return max(0, -(-(self.num_batches - self.rank) // self.world_size))

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, 7919, self.rank + i * self.world_size])
        return finish_batch(self.sampler.sample(rng, self.batch_size, None), None)


try:
    import lightning as L

    _LightningDataModule: Any = L.LightningDataModule
except ImportError:  # pragma: no cover - lightning is a dependency
    _LightningDataModule = object


class SegDataModule(_LightningDataModule):
    """Training and validation batches for one configuration and fold.

    Training: :class:`TrainStream` through a ``DataLoader`` with ``num_workers`` persistent workers
    (default and most: the usable cores, see :func:`~segpipe.parallel.cap_num_workers`; 0 loads in
    this process), ``pin_memory`` on CUDA; one batch per loader step
    (``batch_size=None``). With ``augment_on_device=True`` the workers only cut patches and the
    augmentation runs on the training device after the transfer (``on_after_batch_transfer``).
    Validation: :class:`ValidationPatches`. ``rank`` / ``world_size``: this process's place in a
    distributed run (each process draws its own training batches and scores its share of the
    validation patches). ``fresh_workers``: start the loader workers anew each epoch, so that
    what the main process changed in the stream (hardness-weighted case probabilities) reaches them.
    """

    def __init__(
        self,
        cache: Cache | str | os.PathLike[str],
        train_cases: Sequence[str],
        val_cases: Sequence[str],
        *,
        patch_size: Sequence[int],
        batch_size: int,
        context_slices: int = 0,
        oversample_foreground: float = OVERSAMPLE_FOREGROUND,
        augment: AugmentConfig | None = None,
        num_workers: int | None = None,
        seed: int | None = None,
        num_val_batches: int = 50,
        augment_on_device: bool = False,
        image_pad: float = 0.0,
        label_pad: int = 0,
        rank: int = 0,
        world_size: int = 1,
        fresh_workers: bool = False,
        previous: Mapping[str, str | os.PathLike[str]] | None = None,
        previous_channels: Sequence[Sequence[int]] | None = None,
    ):
        seed = configured(seed, "train.seed")
        super().__init__()
        self.cache = cache if isinstance(cache, Cache) else Cache(cache)
        self.cache_dir = self.cache.root
        self.train_cases, self.val_cases = list(train_cases), list(val_cases)
        self.patch_size, self.batch_size = tuple(int(p) for p in patch_size), int(batch_size)
        self.context_slices, self.oversample_foreground = int(context_slices), float(oversample_foreground)
        self.augment_config = augment if augment is not None else AugmentConfig()
        self.num_workers = default_num_workers() if num_workers is None else cap_num_workers(max(0, int(num_workers)))
        self.seed, self.num_val_batches = int(seed), int(num_val_batches)
        self.augment_on_device, self.image_pad, self.label_pad = augment_on_device, image_pad, label_pad
        self.rank, self.world_size = int(rank), max(1, int(world_size))
        self.fresh_workers = bool(fresh_workers)
        #: a cascade stage: the previous stage's prediction of each case and its channels (see PatchSampler)
        self.previous, self.previous_channels = previous, previous_channels
        self.augmenter = Augmenter(self.patch_size, self.augment_config)
        self._train: TrainStream | None = None
        self._val: ValidationPatches | None = None

    @classmethod
    def from_plan(
        cls,
        plan: Any,
        configuration: str,
        fold: int | str,
        *,
        work_dir: str | os.PathLike[str] | None = None,
        dataset: str | None = None,
        **kwargs: Any,
    ) -> SegDataModule:
        """The data module of one plan configuration and fold.

        Patch size, batch size and the 2.5-D slab (``context_slices``) come from the plan
        configuration, the cache from the workspace (``work_dir``; entry ``dataset``, default
        ``plan.dataset``) and the folds from its ``splits_final.json`` (created over the cached
        cases when missing; one naming a case that is no longer cached is refused, see
        :func:`~segpipe.data.load_or_create_splits`). Further keyword arguments (``augment``,
        ``num_workers``, ``seed``, …) go to the constructor; the plan's values cannot be overridden here.
        """
        from ..workspace import Workspace

        cfg = plan.config(configuration)  # unknown name: ConfigError listing the planned ones
        clash = sorted({"patch_size", "batch_size", "context_slices"} & set(kwargs))
        if clash:
            raise UsageError(
                f"{', '.join(clash)} come(s) from the plan configuration {configuration}",
                hint="change the plan (segpipe plan ...) or build SegDataModule(...) directly",
            )
        cache = Cache.for_configuration(work_dir, plan, configuration, dataset=dataset)
        splits_path = Workspace.at(work_dir).dataset(dataset or plan.dataset).splits_path
        return cls.for_fold(
            cache,
            splits_path,
            fold,
            patch_size=cfg.patch_size,
            batch_size=cfg.batch_size,
            context_slices=cfg.context_slices,
            **kwargs,
        )

    @classmethod
    def for_fold(
        cls, cache: Cache | str | os.PathLike[str], splits_path: str | os.PathLike[str], fold: int | str, **kwargs: Any
    ) -> SegDataModule:
        """Cases of ``fold`` from ``splits_path`` (created over the cached cases when missing);
        ``fold="all"`` trains and validates on every cached case and needs no folds (so works with
        fewer than 5 cases)."""
        cache = cache if isinstance(cache, Cache) else Cache(cache)
        ids = cache.cases()
        if not ids:
            raise StateError(f"{cache.root}: no preprocessed cases", hint="run `segpipe preprocess` first")
        if isinstance(fold, str) and fold.strip().lower() == "all":
            every = sorted(ids)
            return cls(cache, every, list(every), **kwargs)
        train, val = fold_cases(load_or_create_splits(splits_path, ids), fold)
        return cls(cache, train, val, **kwargs)

    def _sampler(self, cases: Sequence[str]) -> PatchSampler:
        return PatchSampler(
            self.cache,
            cases,
            self.patch_size,
            oversample_foreground=self.oversample_foreground,
            context_slices=self.context_slices,
            image_pad=self.image_pad,
            label_pad=self.label_pad,
            previous=self.previous,
            previous_channels=self.previous_channels,
        )

    @property
    def train_stream(self) -> TrainStream | None:
        """The training batches' stream once :meth:`setup` made it (a resumed run continues it with
        :meth:`TrainStream.resume_at`)."""
        return self._train

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._train = TrainStream(
                self._sampler(self.train_cases),
                self.batch_size,
                self.augmenter,
                seed=self.seed,
                augment_in_worker=not self.augment_on_device,
                rank=self.rank,
            )
        if self._val is None and self.val_cases:
            self._val = ValidationPatches(
                self._sampler(self.val_cases),
                self.batch_size,
                self.num_val_batches,
                seed=self.seed,
                rank=self.rank,
                world_size=self.world_size,
            )

    def _loader(self, dataset: Any, workers: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0 and not self.fresh_workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=worker_init if workers > 0 else None,
            prefetch_factor=2 if workers > 0 else None,
        )

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
