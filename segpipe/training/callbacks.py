"""The Lightning callback of a training run: :class:`RunCheckpoint` saves and restores the run,
stops it when a signal asks, runs the full-case validation, keeps the run inside its time budget
(:class:`~segpipe.training.budget.TimeBudget`) and writes its reports
(:mod:`segpipe.training.reports`)."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from ..checkpoint import capture_rng, restore_rng, save_checkpoint
from ..io.atomic import write_text
from ..settings import configured
from ..workspace import BEST, FINAL, LAST, METRICS_FILE
from .budget import TimeBudget
from .module import SegmentationModule
from .reports import ProgressDrawer, epoch_line, metrics_csv
from .signals import StopSignals, TrainingInterrupted, TrainingPreempted, signal_name, slurm_requeue
from .validation import FoldValidation, format_validation


class RunCheckpoint(Checkpoint):
    """Saves the full training state (``last.pt``) atomically at every epoch's end, after the
    module recorded the epoch and stepped its schedule, and puts a saved state back at the start.

    Inside an epoch it saves too (the batches done, their losses), every ``checkpoint_every``
    seconds and when a signal asks the run to stop (``stop``, see :class:`StopSignals`): SIGUSR1,
    what a scheduler sends before it ends a job, then stops the run (:class:`TrainingPreempted`) and,
    under SLURM, requeues the job (``scontrol requeue``); SIGTERM and Ctrl-C stop it with
    :class:`TrainingInterrupted`. A signal that comes during an epoch's validation stops the run
    once that epoch is saved. A run resumed from a state saved inside an epoch continues the epoch
    with the very batches it would have drawn.

    Also, at each epoch's end: with a wall-clock budget (``max_time``), the schedule re-spanned over
    the epochs that fit (:attr:`budget`); the full-case validation (``validation``) every
    ``val_every`` epochs and at the end; ``best.pt`` (weights) when the EMA pseudo-Dice improves;
    ``metrics.csv`` and ``progress.png`` from the history (:attr:`drawer`).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        resume: Mapping[str, Any] | None = None,
        datamodule: Any = None,
        max_time: float | None = None,
        log: Callable[[str], None] | None = None,
        extra: Mapping[str, Any] | None = None,
        validation: FoldValidation | None = None,
        val_every: int | None = None,
        batch_size: int = 1,
        val_batches: int = 0,
        title: str | None = None,
        started: float | None = None,
        checkpoint_every: float | None = None,
        stop: StopSignals | None = None,
    ):
        val_every = configured(val_every, "train.val_every")
        self.run_dir, self.resume, self.datamodule = Path(run_dir), resume, datamodule
        self.stop = stop if stop is not None else StopSignals()
        self.max_time, self.say, self.extra = max_time, log, dict(extra or {})
        self.validation, self.val_every = validation, max(1, int(val_every))
        self.budget = TimeBudget(
            max_time, validation=validation, val_every=val_every, batch_size=batch_size, val_batches=val_batches
        )
        self.drawer = ProgressDrawer(self.run_dir, title)
        self.elapsed_before = float(resume.get("elapsed_seconds", 0.0)) if resume else 0.0
        self.best = float(resume.get("best_ema", -math.inf)) if resume else -math.inf
        #: the last full-case validation: epoch, Dice, seconds, ... (plain values, saved in last.pt)
        self.last_validation: dict[str, Any] | None = (
            dict(resume["validation"]) if resume and resume.get("validation") else None
        )
        self._session_start = time.perf_counter() if started is None else float(started)
        self._hook_start: float | None = None
        self._validation_spent = 0.0
        self._batch_mark: float | None = None
        self._epoch_iterations = 0
        self.checkpoint_every = checkpoint_every
        self._saved_at = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._session_start

    def apply_budget(self, trainer: Any, module: SegmentationModule, *, done_in_epoch: int = 0) -> None:
        """Plan the rest of the run inside ``max_time`` (:meth:`TimeBudget.apply`), now."""
        self.budget.apply(
            trainer, module, elapsed=self.elapsed, last_validation=self.last_validation, done_in_epoch=done_in_epoch
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, SegmentationModule)
        self.stop.reclaim()
        if self.max_time is not None and self.validation is not None and self.last_validation is None:
            # the final validation's reserve, before any validation ran: a timed forward pass
            self.budget.window_seconds = self.validation.time_window(
                pl_module.network, pl_module.device, pl_module.in_channels
            )
        if self.resume is None:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        pl_module.load_training_state(self.resume, optimizer)
        pl_module.set_schedule(
            int(self.resume.get("planned_epochs", pl_module.epochs)), self.resume.get("final_epoch_iterations")
        )
        in_epoch = int(self.resume.get("data", {}).get("in_epoch", 0))
        if in_epoch:  # resumed inside an epoch: its batches done and their losses
            pl_module.batch_offset = in_epoch
            pl_module.resumed_losses = [float(v) for v in self.resume.get("epoch_train_losses", [])]
            self._epoch_iterations = in_epoch
        restore_rng(self.resume["rng"])

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, SegmentationModule)
        stream = getattr(self.datamodule, "train_stream", None)
        if pl_module.case_sampler is not None and stream is not None:
            # the epoch's (fresh) workers draw cases with the probabilities of the losses seen so far
            stream.sampler.case_probabilities = pl_module.case_sampler.probabilities()
            stream.set_epoch(pl_module.completed_epochs)
        self._batch_mark = time.perf_counter()
        self._epoch_iterations = pl_module.batch_offset
        if self._hook_start is None:
            self._hook_start = self._batch_mark

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert isinstance(pl_module, SegmentationModule)
        now = time.perf_counter()
        if self._batch_mark is not None and self._epoch_iterations > 0:  # the first fetch of an epoch waits on workers
            self.budget.record_iteration(now - self._batch_mark)
        self._batch_mark = now
        self._epoch_iterations += 1
        n = self._epoch_iterations
        self._save_inside_epoch(trainer, pl_module, n, now)
        if self.budget.due_inside_epoch(n, pl_module.iterations_per_epoch):
            self.apply_budget(trainer, pl_module, done_in_epoch=n)

    def _save_inside_epoch(self, trainer: L.Trainer, module: SegmentationModule, n: int, now: float) -> None:
        """Save the state ``n`` batches into the epoch when ``checkpoint_every`` has passed or a signal
        asked the run to stop (then stop; SIGUSR1 requeues a SLURM job)."""
        signum = self._stop_requested(trainer)
        due = self.checkpoint_every is not None and now - self._saved_at >= self.checkpoint_every
        if not (signum or due) or n >= module.iterations_per_epoch:
            return  # the epoch's end saves anyway
        if trainer.is_global_zero:
            save_checkpoint(self.run_dir / LAST, self._state(module, finished=False, in_epoch=n), keep_previous=True)
        self._saved_at = time.perf_counter()
        if signum:
            self._stop_run(trainer, signum, f"in epoch {module.completed_epochs + 1}, iteration {n}")

    def _stop_requested(self, trainer: L.Trainer) -> int:
        """The signal that asked the run to stop (0: none); in a distributed run the one of any process
        (all of them stop at the same point)."""
        signum = int(self.stop.signum)
        if trainer.world_size > 1:
            flag = torch.tensor([float(signum)])
            signum = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        return signum

    def _stop_run(self, trainer: L.Trainer, signum: int, where: str) -> None:
        """Stop the run, saved ``where``: SIGUSR1 requeues a SLURM job (:class:`TrainingPreempted`),
        SIGTERM and SIGINT end with :class:`TrainingInterrupted`."""
        saved = f"saved to {self.run_dir / LAST}"
        if signum == getattr(signal, "SIGUSR1", None):
            requeued = slurm_requeue() if trainer.is_global_zero else None
            raise TrainingPreempted(
                f"stopped by SIGUSR1 {where}; {saved}"
                + (f"; SLURM job {requeued} requeued" if requeued else "; the same command resumes the run")
            )
        raise TrainingInterrupted(
            f"stopped by {signal_name(signum)} {where}; {saved}; the same command resumes the run", signum=signum
        )

    def _state(self, module: SegmentationModule, *, finished: bool, in_epoch: int = 0) -> dict[str, Any]:
        """The whole training state (plain types and tensors) after ``in_epoch`` batches of the epoch
        in progress (0: at an epoch's end)."""
        state = {
            **module.training_state(),
            "epochs": module.epochs,
            "planned_epochs": module.planned_epochs,
            "final_epoch_iterations": module.final_epoch_iterations,
            "finished": finished,
            "elapsed_seconds": self.elapsed,
            "best_ema": self.best,
            "validation": self.last_validation,
            "data": {"train_stream_starts": module.completed_epochs, "in_epoch": int(in_epoch)},
            "rng": capture_rng(),
            **self.extra,
        }
        if in_epoch:
            state["epoch_train_losses"] = [float(v) for v in module.epoch_losses]
        return state

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, SegmentationModule)
        if trainer.sanity_checking:
            return
        now = time.perf_counter()
        if self._hook_start is not None:
            self.budget.record_epoch(now - self._hook_start - self._validation_spent, self._epoch_iterations)
        self._hook_start, self._validation_spent = now, 0.0
        self.apply_budget(trainer, pl_module)
        done = pl_module.completed_epochs
        finished = done >= pl_module.planned_epochs
        if self.say is not None:
            self.say(epoch_line(pl_module))
        if self.validation is not None and (finished or done % self.val_every == 0):
            self._validate(trainer, pl_module, final=finished)
        ema = pl_module.ema_fg_dice
        improved = not math.isnan(ema) and ema > self.best
        if improved:
            self.best = ema
        if trainer.is_global_zero:
            self._save_epoch(pl_module, finished=finished, improved=improved)
        signum = 0 if finished else self._stop_requested(trainer)
        if signum:  # came during the epoch's validation: the epoch is saved
            self._stop_run(trainer, signum, f"after epoch {done}")
        if trainer.is_global_zero:
            self.drawer.draw(pl_module, force=finished)
        if finished:
            trainer.should_stop = True
        elif pl_module.stopped_for_epoch_end:  # a resumed epoch ended: training goes on
            trainer.should_stop = False
        pl_module.stopped_for_epoch_end = False

    def _save_epoch(self, module: SegmentationModule, *, finished: bool, improved: bool) -> None:
        """At an epoch's end: ``last.pt``, ``best.pt`` when the EMA pseudo-Dice improved, ``final.pt``
        when the run has finished, and ``metrics.csv``."""
        done = module.completed_epochs
        state = self._state(module, finished=finished)
        save_checkpoint(self.run_dir / LAST, state, keep_previous=True)
        self._saved_at = time.perf_counter()
        if improved:
            save_checkpoint(
                self.run_dir / BEST,
                {"model": state["model"], "epoch": done, "ema_fg_dice": module.ema_fg_dice, **self.extra},
            )
        if finished:
            save_checkpoint(self.run_dir / FINAL, {"model": state["model"], "epoch": done, **self.extra})
        write_text(self.run_dir / METRICS_FILE, metrics_csv(module.history, module.class_names))

    # ------------------------------------------------------------------ full-case validation
    def _validate(self, trainer: L.Trainer, module: SegmentationModule, *, final: bool) -> None:
        assert self.validation is not None
        if trainer.is_global_zero:
            result = self.validation(module.network, device=module.device, final=final)
            self._validation_spent += float(result["seconds"])
            classes = sorted(result["class_dice"])
            module.record_validation(result["mean_fg_dice"], [result["class_dice"][c] for c in classes])
            names = result["class_names"]
            self.last_validation = {
                "epoch": module.completed_epochs,
                "final": final,
                "mean_fg_dice": float(result["mean_fg_dice"]),
                "class_dice": {str(names[c]): float(result["class_dice"][c]) for c in classes},
                "num_cases": int(result["num_cases"]),
                "seconds": float(result["seconds"]),
                "line": format_validation(result),
            }
            if self.say is not None:
                kind = "final validation" if final else "validation"
                self.say(
                    f"{kind} after epoch {module.completed_epochs}: {self.last_validation['line']} "
                    f"({result['seconds']:.1f} s)"
                )
        if trainer.world_size > 1:
            trainer.strategy.barrier("segpipe-validation")
