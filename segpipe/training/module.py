"""The ``LightningModule`` of one plan configuration: :class:`SegmentationModule`.

* The network comes from the plan (:func:`segpipe.networks.build_network`, deep supervision on).
* The loss from the registry (:func:`segpipe.losses.build_loss`; the plan's ``batch_dice`` and the
  dataset's ignore label fill what the settings leave open), wrapped in
  :class:`segpipe.losses.DeepSupervision` (nnU-Net's weights over the decoder outputs).
* The optimizer from :func:`segpipe.training.optim.build_optimizer` with the poly schedule. The
  module steps the schedule itself (after each epoch, or after each iteration with
  ``schedule_interval: step``) so that the state a checkpoint saves at an epoch's end is the state
  the next epoch starts from.
* Validation is nnU-Net's pseudo-Dice: true positives, false positives and false negatives of the
  argmax prediction, per foreground class, summed over every validation batch of the epoch (and
  over the devices), then ``Dice = 2·TP / (2·TP + FP + FN)`` per class (NaN for a class absent from
  both), their mean over the classes present, and an exponential moving average over the epochs
  (``ema = 0.9 · ema + 0.1 · mean``), which picks the best checkpoint.

Everything the module records per epoch (losses, pseudo-Dice, learning rate, epoch time) lives in
:attr:`SegmentationModule.history`, plain lists that a checkpoint saves and ``metrics.csv`` mirrors.
The full-case validation's Dice (``val_dice``, the foreground mean, and ``val_class_dice``, per
class) is NaN for the epochs without one; the run fills it in (:meth:`record_validation`) for those
with one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from ..losses import HardnessWeightedSampler
from ..planning import PlanConfig
from ..settings import configured, default_option
from .optim import PolyLR, build_optimizer, build_scheduler, optim_settings

EMA_MOMENTUM = 0.9  # nnU-Net: ema = 0.9 · ema + 0.1 · mean pseudo-Dice

HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "mean_fg_dice", "ema_fg_dice", "lr", "epoch_seconds", "val_dice")
#: per-epoch lists of per-class values
CLASS_HISTORY_KEYS = ("pseudo_dice", "val_class_dice")


def confusion_counts(
    logits: torch.Tensor, target: torch.Tensor, num_classes: int, *, ignore_index: int | None = None
) -> torch.Tensor:
    """``[3, K-1]`` counts of true positives, false positives and false negatives of the argmax of
    ``logits`` ``[B, K, *S]`` against integer labels ``[B, 1, *S]`` (or ``[B, *S]``), per foreground
    class 1..K-1, summed over the batch (as float64 on ``logits``' device, ready for a cross-device
    sum). Voxels labelled ``ignore_index`` count nowhere. The counting is
    :func:`segpipe.evaluation.confusion_counts` (one bincount)."""
    from ..evaluation.metrics import confusion_counts as count_classes

    labels = target[:, 0] if target.ndim == logits.ndim else target
    counts = count_classes(logits.argmax(1), labels.to(logits.device), range(1, num_classes), ignore_index=ignore_index)
    return torch.as_tensor(counts.T, dtype=torch.float64, device=logits.device)


def dice_from_counts(counts: torch.Tensor) -> list[float]:
    """Dice per class from :func:`confusion_counts` sums (NaN where the class is absent in both)."""
    from ..evaluation.metrics import dice_from_counts as dice_of_rows

    return [float(d) for d in dice_of_rows(counts.detach().cpu().numpy().T.round().astype(np.int64))]


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


class SegmentationModule(L.LightningModule):
    """Network, loss, optimizer and schedule of one plan configuration (see the module doc).

    ``plan_config``: a :class:`~segpipe.planning.PlanConfig` (or its dict). ``in_channels``: the
    dataset's channels; ``num_classes``: output classes with the background. ``loss`` and
    ``loss_params``: a name of :data:`segpipe.losses.LOSSES` and its parameters. ``optim``: settings
    for :func:`~segpipe.training.optim.optim_settings` (``{"name": "sgd", "lr": 0.01, ...}``).
    ``epochs`` and ``iterations_per_epoch`` size the poly schedule. ``ignore_index``: the
    dataset's ignore label, counted in no loss and no metric. ``class_names``: names of the
    foreground classes for the logged metrics (default ``"1"``, ``"2"``, …). ``keep_unused``: give the
    zero-weighted deep-supervision head a zero gradient (distributed training needs one for every
    parameter). ``hardness_beta`` (with the fold's training ``case_ids``): keep each case's latest
    per-sample loss for hardness-weighted case sampling, ``p ∝ softmax(β · loss)`` (Fidon et al.).
    """

    def __init__(
        self,
        plan_config: PlanConfig | Mapping[str, Any],
        in_channels: int,
        num_classes: int,
        *,
        loss: str | None = None,
        loss_params: Mapping[str, Any] | None = None,
        optim: Mapping[str, Any] | None = None,
        epochs: int | None = None,
        iterations_per_epoch: int | None = None,
        ignore_index: int | None = None,
        class_names: list[str] | None = None,
        keep_unused: bool = False,
        case_ids: list[str] | None = None,
        hardness_beta: float | None = None,
        regions: Sequence[Sequence[int]] | None = None,
    ):
        iterations_per_epoch = configured(iterations_per_epoch, "train.iterations_per_epoch")
        epochs = configured(epochs, "train.epochs")
        super().__init__()
        from ..losses import DeepSupervision, build_loss
        from ..networks import build_network

        cfg = plan_config if isinstance(plan_config, PlanConfig) else PlanConfig.from_dict(plan_config)
        self.plan_config = cfg
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)
        #: a region dataset: the label values of each region (one sigmoid output each), else None
        self.regions = [[int(v) for v in r] for r in regions] if regions else None
        #: the scored outputs: the foreground classes, or the regions
        self.scored = len(self.regions) if self.regions else self.num_classes - 1
        outputs = len(self.regions) if self.regions else self.num_classes
        self.network = build_network(cfg, self.in_channels, outputs, deep_supervision=True)
        context = {"batch_dice": cfg.batch_dice, "ignore_index": ignore_index}
        self.loss_name, self.loss_params = (
            str(default_option("loss") if loss is None else loss),
            dict(loss_params or {}),
        )
        base: Any = build_loss(self.loss_name, context=context, **self.loss_params)
        if self.regions:
            from .regions import RegionLoss

            base = RegionLoss(base, self.regions)
        self.loss = DeepSupervision(base, keep_unused=keep_unused)
        optim = dict(optim or {})
        self.optim = optim_settings(optim.pop("name", None), **optim)
        self.epochs, self.iterations_per_epoch = int(epochs), int(iterations_per_epoch)
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names else [str(c) for c in range(1, self.scored + 1)]
        self.scheduler: PolyLR | None = None
        self.completed_epochs = 0  # epochs finished over the whole run (resumes included)
        self.planned_epochs = self.epochs  # fewer when a wall-clock budget shortens the run
        #: iterations of the last planned epoch when a budget shortens it (None: a whole epoch)
        self.final_epoch_iterations: int | None = None
        self.history: dict[str, list[Any]] = {k: [] for k in (*HISTORY_KEYS, *CLASS_HISTORY_KEYS)}
        self._counts: torch.Tensor | None = None
        self._train_losses: list[float] = []
        #: a run resumed inside an epoch: the batches that epoch had done and their losses
        self.batch_offset = 0
        self.resumed_losses: list[float] | None = None
        self.stopped_for_epoch_end = False
        #: Fidon et al.'s hardness-weighted case sampling: each training case's latest loss
        self.case_sampler: HardnessWeightedSampler | None = None
        self.case_index: dict[str, int] = {}
        if hardness_beta is not None:
            ids = list(case_ids or [])
            self.case_sampler = HardnessWeightedSampler(len(ids), float(hardness_beta))
            self.case_index = {c: i for i, c in enumerate(ids)}
        self._val_losses: list[float] = []
        self._epoch_start = 0.0

    # ------------------------------------------------------------------ schedule
    @property
    def schedule_interval(self) -> str:
        return str(self.optim["schedule_interval"])

    def schedule_steps(self, epochs: int | None = None) -> int:
        """Steps of the poly schedule over ``epochs`` (default the run's): epochs, or iterations."""
        e = self.epochs if epochs is None else int(epochs)
        return e if self.schedule_interval == "epoch" else e * self.iterations_per_epoch

    def set_schedule(self, planned_epochs: int, final_epoch_iterations: int | None = None) -> None:
        """Plan the run to end after ``planned_epochs`` epochs, the last one shortened to
        ``final_epoch_iterations`` iterations (None: whole), and re-span the poly schedule over it."""
        self.planned_epochs = int(planned_epochs)
        last = None if not final_epoch_iterations else int(final_epoch_iterations)
        self.final_epoch_iterations = last if last is not None and last < self.iterations_per_epoch else None
        if self.scheduler is None:
            return
        if self.schedule_interval == "epoch":
            steps = self.planned_epochs
        else:
            whole = max(0, self.planned_epochs - 1) * self.iterations_per_epoch
            steps = whole + (self.final_epoch_iterations or self.iterations_per_epoch)
        self.scheduler.set_total_steps(max(1, steps))

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.network.parameters(), self.optim)
        self.scheduler = build_scheduler(optimizer, self.schedule_steps(), exponent=float(self.optim["poly_exponent"]))
        return optimizer

    @property
    def ema_fg_dice(self) -> float:
        values = self.history["ema_fg_dice"]
        return float(values[-1]) if values else math.nan

    # ------------------------------------------------------------------ forward / train
    def forward(self, x: torch.Tensor) -> Any:
        return self.network(x)

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        self._train_losses = list(self.resumed_losses or [])
        self.resumed_losses = None

    @property
    def epoch_losses(self) -> list[float]:
        """The training losses of the epoch in progress so far."""
        return list(self._train_losses)

    def epoch_iteration(self, batch_idx: int) -> int:
        """The iteration's index in its epoch (0-based), counting what a resumed epoch had done."""
        return int(batch_idx) + self.batch_offset

    def _in_last_epoch(self) -> bool:
        return self.final_epoch_iterations is not None and self.completed_epochs >= self.planned_epochs - 1

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        """Skip the rest of a shortened last epoch (see :meth:`set_schedule`) past its iterations."""
        last = self.final_epoch_iterations
        if last is not None and self._in_last_epoch() and self.epoch_iteration(batch_idx) >= last:
            return -1
        return None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        outputs = self.network(batch["image"])
        if self.case_sampler is not None and "case" in batch:
            loss, per_sample = self.loss.with_per_sample(outputs, batch["label"])
            self.case_sampler.update([self.case_index[c] for c in batch["case"]], per_sample)
        else:
            loss = self.loss(outputs, batch["label"])
        self._train_losses.append(float(loss.detach()))
        if self._trainer is not None:
            self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, batch_size=batch["image"].shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.scheduler is not None and self.schedule_interval == "step":
            self.scheduler.step()
        done = self.epoch_iteration(batch_idx) + 1
        last = self.final_epoch_iterations
        if last is not None and self._in_last_epoch() and done >= last:
            if self._trainer is not None:  # the shortened last epoch is done: validate it and stop
                self._trainer.should_stop = True
        elif self.batch_offset and done >= self.iterations_per_epoch and self._trainer is not None:
            # a resumed epoch has its batches: end it here, validated like any other (the epoch's
            # end lifts the stop again, see RunCheckpoint)
            self._trainer.should_stop = True
            self.stopped_for_epoch_end = True

    # ------------------------------------------------------------------ validation (pseudo-Dice)
    def on_validation_epoch_start(self) -> None:
        self._counts = None
        self._val_losses = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.network(batch["image"])
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        self._val_losses.append(float(self.loss(logits, batch["label"]).detach()))
        if self.regions:
            from .regions import region_counts

            counts = region_counts(logits, batch["label"], self.regions)
        else:
            counts = confusion_counts(logits, batch["label"], self.num_classes, ignore_index=self.ignore_index)
        self._counts = counts if self._counts is None else self._counts + counts

    def _reduce_counts(self) -> torch.Tensor | None:
        counts = self._counts
        if counts is None:
            return None
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return counts

    # ------------------------------------------------------------------ epoch end
    def on_train_epoch_end(self) -> None:
        """Record the epoch (losses, pseudo-Dice and its EMA, learning rate, time) and step the
        schedule; runs after this epoch's validation, before the checkpoint callback."""
        counts = self._reduce_counts()
        lr = float(self.scheduler.optimizer.param_groups[0]["lr"]) if self.scheduler is not None else math.nan
        h = self.history
        h["epoch"].append(self.completed_epochs)
        h["train_loss"].append(_mean(self._train_losses))
        h["val_loss"].append(_mean(self._val_losses))
        h["lr"].append(lr)
        h["epoch_seconds"].append(time.perf_counter() - self._epoch_start)
        h["val_dice"].append(math.nan)  # filled in by record_validation when the epoch ends with one
        h["val_class_dice"].append([math.nan] * self.scored)
        if counts is not None:
            dice = dice_from_counts(counts)
            mean = _nanmean(dice)
            prev = self.ema_fg_dice
            ema = mean if math.isnan(prev) else EMA_MOMENTUM * prev + (1 - EMA_MOMENTUM) * mean
            h["pseudo_dice"].append(dice)
            h["mean_fg_dice"].append(mean)
            h["ema_fg_dice"].append(ema)
            if self._trainer is not None:
                self.log("mean_fg_dice", mean)
                self.log("ema_fg_dice", ema)
                self.log("lr", lr)
        else:  # no validation patches this epoch (a shortened last epoch): the EMA carries over
            h["pseudo_dice"].append([math.nan] * self.scored)
            h["mean_fg_dice"].append(math.nan)
            h["ema_fg_dice"].append(self.ema_fg_dice)
        self._counts = None
        if self.scheduler is not None and self.schedule_interval == "epoch":
            self.scheduler.step()
        self.completed_epochs += 1
        self.batch_offset = 0

    def record_validation(self, mean_fg_dice: float, class_dice: list[float]) -> None:
        """Record the full-case validation of the epoch just completed (one value per foreground class)."""
        if not self.history["epoch"]:
            raise RuntimeError("record_validation needs a completed epoch")
        self.history["val_dice"][-1] = float(mean_fg_dice)
        self.history["val_class_dice"][-1] = [float(v) for v in class_dice]

    # ------------------------------------------------------------------ state
    def training_state(self) -> dict[str, Any]:
        """What resuming needs besides the RNG: weights, optimizer, schedule, counters, history."""
        optimizer = self.optimizers().optimizer if self._trainer is not None else None  # type: ignore[union-attr]
        return {
            "epoch": self.completed_epochs,
            "model": self.network.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "history": self.history,
            "case_sampler": self.case_sampler.state_dict() if self.case_sampler is not None else None,
        }

    def load_training_state(self, state: Mapping[str, Any], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Put back a :meth:`training_state` (the optimizer and schedule once they exist)."""
        self.network.load_state_dict(state["model"])
        self.completed_epochs = int(state["epoch"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        n = len(self.history.get("epoch", []))
        for key in HISTORY_KEYS:  # a history saved before a key existed: NaN for its epochs
            self.history.setdefault(key, [math.nan] * n)
        for key in CLASS_HISTORY_KEYS:
            self.history.setdefault(key, [[math.nan] * self.scored for _ in range(n)])
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.case_sampler is not None and state.get("case_sampler") is not None:
            self.case_sampler.load_state_dict(state["case_sampler"])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


__all__ = [
    "CLASS_HISTORY_KEYS",
    "EMA_MOMENTUM",
    "HISTORY_KEYS",
    "SegmentationModule",
    "confusion_counts",
    "dice_from_counts",
]
