"""A training run's wall-clock budget (``max_time``): how many more epochs fit, whether the last is
shortened, and the poly schedule spanning exactly them, with the final full-case validation's time
kept in reserve (measured by an earlier validation, else estimated from the training step and the
number of sliding windows), so that a run ends, validated, inside its budget."""

from __future__ import annotations

from typing import Any

from ..settings import configured
from .optim import fit_budget

#: estimate of the final validation before one was measured, when no forward pass was timed
#: either: a window's forward pass costs at most this share of a training sample's step (forward +
#: backward + optimizer + data: forward alone is about a third; the sliding window's blending and
#: the softmax written to disk take the rest)
FORWARD_SHARE = 0.5
#: a sliding window's cost against its bare forward pass (Gaussian weighting, blending, the case's
#: loading and scoring): 47 windows of the hippocampus fold 0 here took 1.8x their forward passes
#: in the final validation, i.e. this factor times FINAL_VALIDATION_FACTOR
WINDOW_OVERHEAD = 1.5
#: the final validation writes each case's softmax as well: its time against a measured one without
FINAL_VALIDATION_FACTOR = 1.25
#: with a budget, the plan is redone inside an epoch once BUDGET_WARMUP iterations were timed, then
#: every BUDGET_CHECK_EVERY iterations (the same iterations in every process of a distributed run,
#: which follow rank 0's plan), from the median of the last BUDGET_WINDOW iterations' times
BUDGET_WARMUP, BUDGET_CHECK_EVERY, BUDGET_WINDOW = 3, 10, 25
#: budget kept free after the final validation for the last files and the exit: this share of
#: max_time, at most BUDGET_MARGIN_MAX seconds
BUDGET_MARGIN_SHARE, BUDGET_MARGIN_MAX = 0.02, 10.0


class TimeBudget:
    """Plans the rest of a run inside ``max_time`` seconds from what it has timed: the wall time of
    each iteration inside an epoch (:meth:`record_iteration`) and of each whole epoch
    (:meth:`record_epoch`), and a sliding window's forward pass (``window_seconds``, timed at the
    start when no validation was measured yet). ``validation`` (a
    :class:`~segpipe.training.validation.FoldValidation`, or None) estimates the final validation
    before one ran; it runs every ``val_every`` epochs; ``val_batches`` validation patch batches end
    each epoch of ``batch_size`` samples per iteration."""

    def __init__(
        self,
        max_time: float | None,
        *,
        validation: Any = None,
        val_every: int | None = None,
        batch_size: int = 1,
        val_batches: int = 0,
    ):
        val_every = configured(val_every, "train.val_every")
        self.max_time, self.validation = max_time, validation
        self.val_every, self.batch_size = max(1, int(val_every)), max(1, int(batch_size))
        self.val_batches = max(0, int(val_batches))
        #: the last iterations' wall times (batch end to batch end, inside an epoch)
        self.iteration_times: list[float] = []
        #: per epoch: its wall time end to end (checkpoints and drawing included, validation
        #: excluded) and its iterations
        self.epoch_records: list[tuple[float, int]] = []
        self.window_seconds: float | None = None

    def record_iteration(self, seconds: float) -> None:
        self.iteration_times = [*self.iteration_times[-(BUDGET_WINDOW - 1) :], float(seconds)]

    def record_epoch(self, wall: float, iterations: int) -> None:
        self.epoch_records.append((float(wall), int(iterations)))

    def due_inside_epoch(self, done_in_epoch: int, iterations_per_epoch: int) -> bool:
        """Whether the plan is redone ``done_in_epoch`` iterations into an epoch (an epoch's end plans
        at its own hook)."""
        if self.max_time is None or len(self.iteration_times) < BUDGET_WARMUP or done_in_epoch >= iterations_per_epoch:
            return False
        return (done_in_epoch - BUDGET_WARMUP - 1) % BUDGET_CHECK_EVERY == 0

    def final_validation_seconds(self, last_validation: dict[str, Any] | None, seconds_per_iteration: float) -> float:
        """What the final validation will take: a measured one (``last_validation``) scaled by
        :data:`FINAL_VALIDATION_FACTOR` (it writes the softmax too), else the estimate from the
        training step (0 without validation)."""
        if self.validation is None:
            return 0.0
        if last_validation is not None:
            seconds = float(last_validation["seconds"])
            return seconds if last_validation.get("final") else seconds * FINAL_VALIDATION_FACTOR
        estimate = self.validation.estimate_seconds(
            seconds_per_iteration, self.batch_size, window_seconds=self.window_seconds
        )
        return estimate * FINAL_VALIDATION_FACTOR

    def seconds_per_iteration(self, module: Any) -> float | None:
        """A training iteration's wall time: the median of the last ones timed, else from epoch walls."""
        if self.iteration_times:
            times = sorted(self.iteration_times)
            return max(times[len(times) // 2], 1e-6)
        recent = ([wall for wall, _ in self.epoch_records] or module.history["epoch_seconds"])[-3:]
        if not recent:
            return None
        return max(sum(recent) / len(recent), 1e-6) / module.iterations_per_epoch

    def seconds_per_epoch_end(self, spi: float) -> float:
        """What an epoch costs beyond its iterations (validation patches, checkpoint, picture):
        measured from the last whole epoch seen, else estimated from the validation batches."""
        for wall, iterations in reversed(self.epoch_records):
            if iterations > 0:
                return max(0.0, wall - iterations * spi)
        return self.val_batches * FORWARD_SHARE * spi

    def apply(
        self,
        trainer: Any,
        module: Any,
        *,
        elapsed: float,
        last_validation: dict[str, Any] | None,
        done_in_epoch: int = 0,
    ) -> None:
        """Plan the rest of the run, ``elapsed`` seconds into it: set ``module``'s schedule to the
        epochs that fit (at an epoch's end, or ``done_in_epoch`` iterations into one). In a
        distributed run every process follows rank 0's plan."""
        if self.max_time is None:
            return
        shortened = module.final_epoch_iterations is not None
        if done_in_epoch == 0 and shortened and module.completed_epochs >= module.planned_epochs:
            return  # the shortened last epoch has ended: the run is over
        spi = self.seconds_per_iteration(module)
        if spi is None:
            return
        final_s = self.final_validation_seconds(last_validation, spi)
        done = module.completed_epochs
        fit = fit_budget(
            self.max_time,
            elapsed,
            seconds_per_iteration=spi,
            iterations_per_epoch=module.iterations_per_epoch,
            seconds_per_validation=self.seconds_per_epoch_end(spi),
            final_validation_seconds=final_s,
            margin=min(BUDGET_MARGIN_MAX, BUDGET_MARGIN_SHARE * self.max_time),
            max_epochs=module.epochs - done,
            done_in_epoch=done_in_epoch,
            completed_epochs=done,
            val_every=self.val_every if self.validation is not None else 0,
            seconds_per_full_validation=final_s / FINAL_VALIDATION_FACTOR,
        )
        planned = done + fit.epochs + (1 if fit.last_epoch_iterations else 0)
        last = fit.last_epoch_iterations or None
        if trainer is not None and trainer.world_size > 1:  # every process follows rank 0's clock
            planned, last = trainer.strategy.broadcast((planned, last), src=0)
        if (planned, last) != (module.planned_epochs, module.final_epoch_iterations):
            module.set_schedule(planned, last)
