"""Train one configuration and fold with Lightning, resumably: :func:`fit`.

The run lives in the workspace's ``runs/<configuration>/fold_<k>/``::

    settings.json   the resolved training settings and the library versions
    last.pt         the full training state after the last completed epoch (see checkpoint.py)
    last.prev.pt    the one before it: resumed from, with a warning, when last.pt is damaged
    best.pt         the network weights at the best EMA pseudo-Dice so far
    final.pt        the network weights once the run has finished
    metrics.csv     one row per epoch: losses, pseudo-Dice per class and its EMA, the full-case
                    validation Dice (epochs with one), learning rate, time
    progress.png    the same history drawn (see plots.py), redrawn as epochs end
    tensorboard/    TensorBoard event files (losses, pseudo-Dice, learning rate) when tensorboard is installed
    validation/     the full-case validation of the fold's validation cases (see validation.py):
                    summary.json, dice_per_case.csv and, after the final one, ``<case>.npy``
                    (float16 softmax on the cache's grid)

Full-case validation runs every ``val_every`` epochs and at the end of the run (never for
``fold=all``, which has no validation cases). With a wall-clock budget (``max_time``) the run keeps
the final validation's time in reserve (measured by an earlier validation, else estimated from the
training step's time and the number of sliding windows), so that it ends, validated, inside the
budget.

Calling :func:`fit` again on the same run folder resumes from ``last.pt`` (weights, optimizer,
schedule, epoch, case stream, every RNG state); a finished run returns at once and says so;
``overwrite=True`` starts again. With ``deterministic=True`` on the CPU a run interrupted between
epochs and resumed ends with the same weights, bit for bit, as one that was never interrupted.
Asked for another number of epochs, a run continues from where it is to that number, the poly
schedule re-spanned over it from there on; fewer epochs than it has trained are refused.

One process trains a run at a time (:func:`~segpipe.workspace.run_lock`). SIGTERM, Ctrl-C (SIGINT)
and SIGUSR1 stop it at the end of the iteration in progress (or of the epoch, when they come during
its validation) after saving it (:class:`StopSignals`): SIGUSR1 returns the run's summary with
``preempted`` (the CLI exits 75), SIGTERM and SIGINT raise :class:`TrainingInterrupted` (exit 143
and 130).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..errors import ConfigError, SegpipeError, StateError
from ..io.atomic import sweep_temporaries, write_text
from ..io.jsonio import read_json, write_json
from ..parallel import cap_num_workers, default_num_workers
from .checkpoint import (
    DamagedCheckpointError,
    capture_rng,
    load_checkpoint,
    previous_checkpoint,
    restore_rng,
    save_checkpoint,
    to_plain,
)
from .module import SegmentationModule
from .optim import fit_budget, parse_duration
from .plots import PROGRESS_FILE, write_progress_png
from .validation import format_validation, validate_cases

LAST, BEST, FINAL = "last.pt", "best.pt", "final.pt"
SETTINGS_FILE, METRICS_FILE = "settings.json", "metrics.csv"
VALIDATION_DIR = "validation"

#: progress.png (about a second to draw) is redrawn at an epoch's end once PROGRESS_COST_RATIO times
#: its last drawing time has passed since (so drawing costs at most 1/20 of the run), at least every
#: PROGRESS_INTERVAL seconds, and always at the end: every epoch when epochs are long, every few
#: epochs when they take a second
PROGRESS_COST_RATIO = 20.0
PROGRESS_INTERVAL = 30.0
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

#: ``val_batches`` left unset (null): one validation patch batch per ITERATIONS_PER_VAL_BATCH training
#: iterations, rounded up, at most MAX_VAL_BATCHES (nnU-Net validates on 50 batches after 250 iterations)
ITERATIONS_PER_VAL_BATCH, MAX_VAL_BATCHES = 5, 50

#: training settings beyond the ``train`` group (whose defaults are read from
#: ``conf/train/default.yaml``): the loss and optimizer options default to the ones the
#: configuration selects (``conf/config.yaml``), their parameters to that option's file
_RUN_ONLY_DEFAULTS: dict[str, Any] = {
    "loss_params": {},
    "optim_params": {},
    "lr": None,
    "num_workers": None,
}


def _default_settings() -> dict[str, Any]:
    """Every training setting's default, each read from where it is written once (``conf/``)."""
    from ..config import default_option, group_defaults

    out = {k: v for k, v in group_defaults("train").items() if k != "fold"}
    out.update(_RUN_ONLY_DEFAULTS)
    out["loss"] = default_option("loss")
    out["optim"] = default_option("optim")
    out["trainer"] = default_option("trainer")
    return out


#: settings that change what is trained; a resumed run must keep them
_RESUME_KEYS = (
    "iterations_per_epoch",
    "batch_size",
    "loss",
    "loss_params",
    "optim",
    "optim_params",
    "lr",
    "seed",
    "case_sampling",
    "hardness_beta",
)


def train_settings(settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The resolved training settings: the defaults from ``conf/`` (:func:`_default_settings`) with
    ``settings`` applied; unknown keys are a :class:`ConfigError` listing the valid ones."""
    out = _default_settings()
    given = {k: v for k, v in dict(settings or {}).items() if k != "fold"}
    unknown = sorted(set(given) - set(out))
    if unknown:
        raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}", hint=f"valid: {', '.join(sorted(out))}")
    out.update(to_plain(given))
    for key in ("epochs", "iterations_per_epoch", "val_every", "val_batches"):
        if key == "val_batches" and out[key] is None:
            continue  # scaled with the epoch's length below
        try:
            value = int(out[key])
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={out[key]!r} is not a whole number") from None
        if value < 1:
            raise ConfigError(f"{key}={out[key]!r} must be at least 1")
        out[key] = value
    if out["val_batches"] is None:
        out["val_batches"] = scaled_val_batches(out["iterations_per_epoch"])
    if out["batch_size"] is not None and int(out["batch_size"]) < 1:
        raise ConfigError(f"batch_size={out['batch_size']!r} must be at least 1 (or null for the plan's)")
    if out["device"] not in ("auto", "cpu", "cuda", "gpu"):
        raise ConfigError(f"device={out['device']!r} is not valid", hint="valid: cpu, cuda, auto")
    if str(out["precision"]) not in PRECISIONS:
        raise ConfigError(f"precision={out['precision']!r} is not valid", hint=f"valid: {', '.join(PRECISIONS)}")
    for key in ("max_time", "checkpoint_every"):
        if out[key] is not None:
            parse_duration(out[key])  # a bad duration is refused before any work
    for key in ("progress", "tensorboard"):
        out[key] = _tristate(key, out[key])
    out["trainer"] = _trainer_settings(out["trainer"])
    if out["case_sampling"] not in ("uniform", "hardness"):
        raise ConfigError(
            f"case_sampling={out['case_sampling']!r} is not valid", hint="case_sampling=uniform or hardness"
        )
    beta = out["hardness_beta"]
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ConfigError(f"hardness_beta={beta!r} must be a number ≥ 0")
    if out["tensorboard"] is True and not _tensorboard_installed():
        raise ConfigError(
            "tensorboard=true needs the tensorboard package", hint="pip install tensorboard, or tensorboard=auto"
        )
    return out


def scaled_val_batches(iterations_per_epoch: int) -> int:
    """Validation patch batches per epoch when ``val_batches`` is not set: one per
    :data:`ITERATIONS_PER_VAL_BATCH` training iterations, rounded up, at most :data:`MAX_VAL_BATCHES`
    (nnU-Net's 50 for its 250 iterations), so that a short epoch is not mostly validation."""
    return max(1, min(MAX_VAL_BATCHES, -(-int(iterations_per_epoch) // ITERATIONS_PER_VAL_BATCH)))


def _trainer_settings(value: Any) -> dict[str, Any]:
    """``{"name": "single"|"ddp", "devices": N, "num_nodes": M}`` from a name or a composed option."""
    from ..config import process_settings

    return process_settings(value, single="trains in one process", several="trains in several")


def _tristate(key: str, value: Any) -> bool | str:
    """``auto``, or a boolean from true/false/yes/no/1/0 (as typed on the command line)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"{key}={value!r} is not valid", hint=f"{key}=auto, true or false")


def _tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def _progress_bar(setting: bool | str) -> bool:
    """The per-iteration bar: on a terminal for ``auto`` (and only at the segpipe logger's INFO level)."""
    if setting == "auto":
        from ..progress import progress_mode

        return progress_mode() == "bar"
    return bool(setting)


def _accelerator(device: str) -> str:
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is visible", hint="use device=cpu or device=auto")
        return "gpu"
    return "cpu"


#: the precisions ``train`` takes: ``auto`` and the names Lightning knows for full and mixed precision
PRECISIONS = ("auto", "32", "32-true", "16", "16-mixed", "bf16", "bf16-mixed")
#: the sliding window's autocast for Lightning's mixed precisions
_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _precision(precision: Any, accelerator: str) -> str:
    text = str(precision)
    if text == "auto":
        return "bf16-mixed" if accelerator == "gpu" else "32-true"
    return {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}.get(text, text)


def _versions() -> dict[str, str]:
    import lightning

    from .. import __version__

    return {"segpipe": __version__, "torch": torch.__version__, "lightning": lightning.__version__}


def _metrics_csv(history: Mapping[str, list[Any]], class_names: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    dice_cols = [f"dice_{name}" for name in class_names]
    val_cols = [f"val_dice_{name}" for name in class_names]
    writer.writerow(
        [
            "epoch",
            "train_loss",
            "val_loss",
            *dice_cols,
            "mean_fg_dice",
            "ema_fg_dice",
            "val_dice",
            *val_cols,
            "lr",
            "seconds",
        ]
    )
    nan = [math.nan] * len(class_names)

    def at(key: str, i: int, default: Any) -> Any:
        values = history.get(key) or []
        return values[i] if i < len(values) else default

    for i, epoch in enumerate(history["epoch"]):
        row = [
            epoch,
            history["train_loss"][i],
            history["val_loss"][i],
            *list(at("pseudo_dice", i, nan)),
            history["mean_fg_dice"][i],
            history["ema_fg_dice"][i],
            at("val_dice", i, math.nan),
            *list(at("val_class_dice", i, nan)),
            history["lr"][i],
            history["epoch_seconds"][i],
        ]
        writer.writerow(
            ["" if isinstance(v, float) and math.isnan(v) else (f"{v:.6g}" if isinstance(v, float) else v) for v in row]
        )
    return buf.getvalue()


class FoldValidation:
    """Full-case validation of one fold: its validation cases predicted whole by the sliding window,
    scored, and written to ``out_dir`` (:func:`~segpipe.training.validation.validate_cases`).

    Runs without touching the training's random streams: every RNG state is put back afterwards,
    and deterministic algorithms only warn during it (the prediction never feeds the training).
    """

    def __init__(
        self,
        plan: Any,
        configuration: str,
        cache: Any,
        case_ids: list[str],
        out_dir: Path,
        *,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.plan, self.configuration, self.cache = plan, configuration, cache
        self.case_ids, self.out_dir, self.autocast_dtype = list(case_ids), Path(out_dir), autocast_dtype
        self.config = plan.config(configuration)

    def __call__(self, network: Any, *, device: torch.device | str | None, final: bool) -> dict[str, Any]:
        rng = capture_rng()
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return validate_cases(
                network,
                self.cache,
                self.case_ids,
                self.plan,
                self.configuration,
                self.out_dir,
                device=device,
                save_probabilities=final,
                autocast_dtype=self.autocast_dtype,
            )
        finally:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
            restore_rng(rng)

    def windows(self) -> int:
        """Sliding windows over every validation case (its cached size, padded up to the patch)."""
        from ..inference import window_starts

        patch = [int(p) for p in self.config.patch_size]
        total = 0
        for case_id in self.case_ids:
            image, _label, _props = self.cache.load(case_id, mmap=True)
            spatial = [int(n) for n in image.shape[1:]]
            slices = 1
            if len(patch) == 2:  # a 2-D (or 2.5-D) network slides over each slice
                slices, spatial = spatial[0], spatial[1:]
            starts = window_starts([max(n, p) for n, p in zip(spatial, patch)], patch)
            total += slices * math.prod(len(s) for s in starts)
        return total

    def estimate_seconds(
        self, seconds_per_iteration: float, batch_size: int, *, window_seconds: float | None = None
    ) -> float:
        """The validation's time: ``window_seconds`` (a timed forward pass per window, see
        :meth:`time_window`) times :data:`WINDOW_OVERHEAD` per window; without it, each window's
        forward pass at :data:`FORWARD_SHARE` of a sample's step in a training iteration of
        ``batch_size`` samples."""
        if window_seconds is not None:
            return self.windows() * WINDOW_OVERHEAD * float(window_seconds)
        return self.windows() * FORWARD_SHARE * float(seconds_per_iteration) / max(1, int(batch_size))

    def time_window(self, network: torch.nn.Module, device: torch.device, in_channels: int) -> float:
        """Seconds per window of the sliding window's forward pass: one batch of the plan's size
        (the sliding window's), timed after a first warm-up pass, in eval mode without gradients.
        Touches neither the weights nor any random stream (the input is zeros)."""
        batch = max(1, int(self.config.batch_size))
        x = torch.zeros((batch, int(in_channels), *[int(p) for p in self.config.patch_size]), device=device)
        was_training = network.training
        network.eval()
        try:
            amp = torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
            with torch.inference_mode(), amp:
                network(x)
                start = time.perf_counter()
                network(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return (time.perf_counter() - start) / batch
        finally:
            network.train(was_training)


class TrainingPreempted(Exception):
    """SIGUSR1 stopped the run inside an epoch after saving it (``last.pt``); the same command resumes it."""


class TrainingInterrupted(SegpipeError):
    """SIGTERM or Ctrl-C (SIGINT) stopped the run, after saving it unless it was a second such signal;
    the same command resumes it. The exit code is the shell's for the signal: 128 + its number (143
    for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, *, signum: int = signal.SIGTERM, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum

    def __reduce__(self) -> Any:
        return (_interrupted, (self.message, self.signum, self.hint))


def _interrupted(message: str, signum: int, hint: str | None) -> TrainingInterrupted:
    return TrainingInterrupted(message, signum=signum, hint=hint)


def _signal_name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


class StopSignals:
    """SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 while a run trains.

    :func:`fit` installs it for its whole call (in the main thread) and puts the previous handlers
    back at its end. The first signal asks the run to stop: :class:`RunCheckpoint` saves the state
    at the end of the iteration in progress, or of the epoch when the signal came during the epoch's
    validation, and stops (a run that has just finished ends as usual). A second SIGTERM or SIGINT
    stops it at once, without saving: the same command then resumes from the last save. Lightning,
    whose own SIGTERM handler would end the run at once with exit code 0, gets SIGTERM taken back
    when training starts (:meth:`reclaim`).
    """

    NAMES = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self) -> None:
        self.signum = 0  #: the signal that asked the run to stop (0: none)
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                if hasattr(signal, name):
                    number = int(getattr(signal, name))
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def reclaim(self) -> None:
        """Handle SIGTERM here again (after Lightning put its own handler in front of this one)."""
        if int(signal.SIGTERM) in self._previous and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == getattr(signal, "SIGUSR1", None):
            self.signum = self.signum or signum  # a scheduler's warning: the stop it asks for is pending
            return
        if self.signum in (0, getattr(signal, "SIGUSR1", None)):
            self.signum = signum  # acted on at the next iteration's (or epoch's) end
            return
        raise TrainingInterrupted(
            f"stopped at once by a second {_signal_name(signum)}, without saving; "
            "the same command resumes the run from its last save",
            signum=signum,
        )


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

    Also, at each epoch's end: with a wall-clock budget, the schedule re-spanned over the epochs that
    fit (the run stops when no further epoch fits, keeping the final validation's time in reserve);
    the full-case validation (``validation``) every ``val_every`` epochs and at the end;
    ``best.pt`` (weights) when the EMA pseudo-Dice improves; ``metrics.csv`` and ``progress.png``
    from the history.
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
        val_every: int = 50,
        batch_size: int = 1,
        val_batches: int = 0,
        title: str | None = None,
        started: float | None = None,
        checkpoint_every: float | None = None,
        stop: StopSignals | None = None,
    ):
        self.run_dir, self.resume, self.datamodule = Path(run_dir), resume, datamodule
        self.stop = stop if stop is not None else StopSignals()
        self.max_time, self.say, self.extra = max_time, log, dict(extra or {})
        self.validation, self.val_every, self.batch_size = validation, max(1, int(val_every)), max(1, int(batch_size))
        self.title = title
        self.elapsed_before = float(resume.get("elapsed_seconds", 0.0)) if resume else 0.0
        self.best = float(resume.get("best_ema", -math.inf)) if resume else -math.inf
        #: the last full-case validation: epoch, Dice, seconds, ... (plain values, saved in last.pt)
        self.last_validation: dict[str, Any] | None = (
            dict(resume["validation"]) if resume and resume.get("validation") else None
        )
        self._session_start = time.perf_counter() if started is None else float(started)
        self._drawn_at: float | None = None
        self._draw_seconds = 1.0  # the last drawing's time (a first guess before one)
        self._hook_start: float | None = None
        self._validation_spent = 0.0
        self.val_batches = max(0, int(val_batches))
        # per-iteration wall times (batch end to batch end, inside an epoch) and their epoch's count
        self._iteration_times: list[float] = []
        self._batch_mark: float | None = None
        self._epoch_iterations = 0
        # per epoch: its wall time end to end (checkpoints and drawing included, validation
        # excluded) and its iterations
        self._epoch_records: list[tuple[float, int]] = []
        self.checkpoint_every = checkpoint_every
        self._saved_at = time.perf_counter()
        self._window_seconds: float | None = None  # a sliding window's forward pass, timed at the start

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._session_start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, SegmentationModule)
        self.stop.reclaim()
        if self.max_time is not None and self.validation is not None and self.last_validation is None:
            # the final validation's reserve, before any validation ran: a timed forward pass
            self._window_seconds = self.validation.time_window(
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
        stream = getattr(self.datamodule, "_train", None)
        if pl_module.case_sampler is not None and stream is not None:
            # the epoch's (fresh) workers draw cases with the probabilities of the losses seen so far
            stream.sampler.case_probabilities = pl_module.case_sampler.probabilities()
            stream._starts = pl_module.completed_epochs
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
            self._iteration_times = [*self._iteration_times[-(BUDGET_WINDOW - 1) :], now - self._batch_mark]
        self._batch_mark = now
        self._epoch_iterations += 1
        n = self._epoch_iterations
        self._save_inside_epoch(trainer, pl_module, n, now)
        if self.max_time is None or len(self._iteration_times) < BUDGET_WARMUP or n >= pl_module.iterations_per_epoch:
            return  # an epoch's end plans at its own hook
        if (n - BUDGET_WARMUP - 1) % BUDGET_CHECK_EVERY == 0:
            self._apply_budget(trainer, pl_module, done_in_epoch=n)

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
            requeued = _slurm_requeue() if trainer.is_global_zero else None
            raise TrainingPreempted(
                f"stopped by SIGUSR1 {where}; {saved}"
                + (f"; SLURM job {requeued} requeued" if requeued else "; the same command resumes the run")
            )
        raise TrainingInterrupted(
            f"stopped by {_signal_name(signum)} {where}; {saved}; the same command resumes the run", signum=signum
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
            wall = now - self._hook_start - self._validation_spent
            self._epoch_records.append((wall, self._epoch_iterations))
        self._hook_start, self._validation_spent = now, 0.0
        self._apply_budget(trainer, pl_module)
        done = pl_module.completed_epochs
        finished = done >= pl_module.planned_epochs
        if self.say is not None:
            self.say(_epoch_line(pl_module))
        if self.validation is not None and (finished or done % self.val_every == 0):
            self._validate(trainer, pl_module, final=finished)
        ema = pl_module.ema_fg_dice
        improved = not math.isnan(ema) and ema > self.best
        if improved:
            self.best = ema
        if trainer.is_global_zero:
            state = self._state(pl_module, finished=finished)
            save_checkpoint(self.run_dir / LAST, state, keep_previous=True)
            self._saved_at = time.perf_counter()
            if improved:
                save_checkpoint(
                    self.run_dir / BEST, {"model": state["model"], "epoch": done, "ema_fg_dice": ema, **self.extra}
                )
            if finished:
                save_checkpoint(self.run_dir / FINAL, {"model": state["model"], "epoch": done, **self.extra})
            write_text(self.run_dir / METRICS_FILE, _metrics_csv(pl_module.history, pl_module.class_names))
        signum = 0 if finished else self._stop_requested(trainer)
        if signum:  # came during the epoch's validation: the epoch is saved
            self._stop_run(trainer, signum, f"after epoch {done}")
        if trainer.is_global_zero:
            self._draw(pl_module, force=finished)
        if finished:
            trainer.should_stop = True
        elif pl_module.stopped_for_epoch_end:  # a resumed epoch ended: training goes on
            trainer.should_stop = False
        pl_module.stopped_for_epoch_end = False

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

    def final_validation_seconds(self, module: SegmentationModule, seconds_per_iteration: float) -> float:
        """What the final validation will take: a measured one scaled by :data:`FINAL_VALIDATION_FACTOR`
        (it writes the softmax too), else the estimate from the training step (0 without validation)."""
        if self.validation is None:
            return 0.0
        if self.last_validation is not None:
            seconds = float(self.last_validation["seconds"])
            return seconds if self.last_validation.get("final") else seconds * FINAL_VALIDATION_FACTOR
        estimate = self.validation.estimate_seconds(
            seconds_per_iteration, self.batch_size, window_seconds=self._window_seconds
        )
        return estimate * FINAL_VALIDATION_FACTOR

    def _seconds_per_iteration(self, module: SegmentationModule) -> float | None:
        """A training iteration's wall time: the median of the last ones timed, else from epoch walls."""
        if self._iteration_times:
            times = sorted(self._iteration_times)
            return max(times[len(times) // 2], 1e-6)
        recent = ([wall for wall, _ in self._epoch_records] or module.history["epoch_seconds"])[-3:]
        if not recent:
            return None
        return max(sum(recent) / len(recent), 1e-6) / module.iterations_per_epoch

    def _seconds_per_epoch_end(self, spi: float) -> float:
        """What an epoch costs beyond its iterations (validation patches, checkpoint, picture):
        measured from the last whole epoch seen, else estimated from the validation batches."""
        for wall, iterations in reversed(self._epoch_records):
            if iterations > 0:
                return max(0.0, wall - iterations * spi)
        return self.val_batches * FORWARD_SHARE * spi

    def _apply_budget(self, trainer: L.Trainer, module: SegmentationModule, *, done_in_epoch: int = 0) -> None:
        """Plan the rest of the run inside ``max_time``: how many more epochs, whether the last is
        shortened, and the schedule spanning them; at an epoch's end or ``done_in_epoch`` iterations
        into one."""
        if self.max_time is None:
            return
        shortened = module.final_epoch_iterations is not None
        if done_in_epoch == 0 and shortened and module.completed_epochs >= module.planned_epochs:
            return  # the shortened last epoch has ended: the run is over
        spi = self._seconds_per_iteration(module)
        if spi is None:
            return
        final_s = self.final_validation_seconds(module, spi)
        done = module.completed_epochs
        fit = fit_budget(
            self.max_time,
            self.elapsed,
            seconds_per_iteration=spi,
            iterations_per_epoch=module.iterations_per_epoch,
            seconds_per_validation=self._seconds_per_epoch_end(spi),
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

    # ------------------------------------------------------------------ progress.png
    def _draw(self, module: SegmentationModule, *, force: bool) -> None:
        now = time.perf_counter()
        wait = min(PROGRESS_INTERVAL, PROGRESS_COST_RATIO * self._draw_seconds)
        if force or self._drawn_at is None or now - self._drawn_at >= wait:
            write_reports(self.run_dir, module.history, module.class_names, title=self.title, metrics=False)
            self._drawn_at = time.perf_counter()
            self._draw_seconds = self._drawn_at - now


def write_reports(
    run_dir: Path,
    history: Mapping[str, list[Any]],
    class_names: list[str],
    *,
    title: str | None = None,
    metrics: bool = True,
) -> None:
    """Write a run's ``metrics.csv`` (unless ``metrics=False``) and ``progress.png`` from its history."""
    if metrics:
        write_text(run_dir / METRICS_FILE, _metrics_csv(history, class_names))
    try:
        write_progress_png(run_dir / PROGRESS_FILE, history, class_names=class_names, title=title)
    except StateError as exc:  # matplotlib missing: the run goes on without its picture
        logging.getLogger("segpipe").warning("%s", exc)


def _epoch_line(m: SegmentationModule) -> str:
    h = m.history
    dice = " ".join(f"{v:.3f}" for v in h["pseudo_dice"][-1]) if h["pseudo_dice"] else ""
    return (
        f"epoch {m.completed_epochs}/{m.planned_epochs}  train_loss {h['train_loss'][-1]:.4f}  "
        f"val_loss {h['val_loss'][-1]:.4f}  pseudo-Dice {dice} (EMA {h['ema_fg_dice'][-1]:.3f})  "
        f"lr {h['lr'][-1]:.2e}  {h['epoch_seconds'][-1]:.1f} s"
    )


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's own start-up notes (accelerators found, tips, "max_epochs reached") stay out of
    the output; segpipe prints one line per epoch instead. Warnings and errors still show."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _load_plan(plan: Any) -> Any:
    from ..planning import Plan, load_plan

    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return load_plan(plan)
    raise ConfigError(f"expected a Plan or the path of a plans.json, got {type(plan).__name__}")


def fit(
    plan: Any,
    configuration: str,
    fold: int | str,
    *,
    work_dir: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    settings: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """Train ``configuration`` of ``plan`` (a :class:`~segpipe.planning.Plan` or its ``plans.json``)
    on ``fold`` into the workspace's run folder; resume it when it holds ``last.pt``.

    ``settings``: see :func:`train_settings` (``epochs``, ``iterations_per_epoch``, ``val_every``,
    ``val_batches``, ``loss``, ``optim``, ``lr``, ``device``, ``precision``, ``max_time``, ``seed``,
    ``deterministic``, ``num_workers``, …). ``log``: called with one line per epoch, one per full-case
    validation and for resume/finish notes. ``overwrite``: start again (the run folder's checkpoints,
    metrics, picture and validation are removed first). ``started``: the ``time.perf_counter()`` value
    ``max_time`` counts from (default: this call). Another ``epochs`` than the saved run's continues
    it to that count (see :func:`_other_epochs`). A second process training the same run meanwhile
    is refused (:class:`~segpipe.errors.StateError`); SIGTERM and Ctrl-C save the run and raise
    :class:`TrainingInterrupted`, SIGUSR1 saves it and returns with ``preempted`` (:class:`StopSignals`).
    Returns ``{"run_dir", "checkpoint", "epochs", "planned_epochs", "finished", "already_finished",
    "resumed_from", "ema_fg_dice", "pseudo_dice", "val_dice", "val_class_dice", "validation",
    "validation_dir", "seconds"}``: ``val_dice`` is the last full-case validation's mean foreground
    Dice (NaN before any), ``val_class_dice`` its ``{class name: Dice}``, ``validation`` its one-line
    summary (None before any) and ``validation_dir`` where its files are (None without validation cases).
    """
    from ..workspace import Workspace, run_lock

    the_plan = _load_plan(plan)
    the_plan.config(configuration)  # an unknown configuration is refused before any work
    s = train_settings(settings)
    ds = Workspace.at(work_dir).dataset(dataset or the_plan.dataset)
    run_dir = ds.run_dir(configuration, fold)
    t0 = time.perf_counter() if started is None else float(started)
    accelerator = _accelerator(str(s["device"]))
    precision = _precision(s["precision"], accelerator)
    stop = StopSignals().install()  # for the whole call: a signal while the run is prepared counts too
    placeholder = RunCheckpoint(run_dir, started=t0, stop=stop)  # replaced below, once the run is known
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        # the trainer first: with trainer=ddp it knows this process's rank, and only rank 0 writes files
        with _quiet_lightning():
            trainer = L.Trainer(
                accelerator=accelerator,
                strategy="ddp" if s["trainer"]["name"] == "ddp" else "auto",
                devices=s["trainer"]["devices"],
                num_nodes=s["trainer"]["num_nodes"],
                precision=precision,  # type: ignore[arg-type]
                max_epochs=1,  # set below from the plan of the run
                limit_train_batches=int(s["iterations_per_epoch"]),
                num_sanity_val_steps=0,
                logger=_loggers(run_dir, s["tensorboard"]),
                callbacks=[placeholder],
                enable_checkpointing=True,
                enable_progress_bar=_progress_bar(s["progress"]),
                enable_model_summary=False,
                deterministic=bool(s["deterministic"]),
                benchmark=False,
                gradient_clip_val=float(s["grad_clip"]) if s["grad_clip"] else None,
                gradient_clip_algorithm="norm",
                default_root_dir=str(run_dir),
                use_distributed_sampler=False,
                plugins=_slurm_plugins(),
            )
        # one training of a run at a time: its writing process holds the run
        with run_lock(run_dir) if trainer.global_rank == 0 else nullcontext():
            return _fit(
                trainer,
                placeholder,
                the_plan,
                configuration,
                fold,
                run_dir,
                ds,
                s,
                t0,
                overwrite,
                log,
                work_dir,
                dataset,
            )
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        stop.restore()


def _check_optim_and_loss(s: Mapping[str, Any], cfg: Any, ignore: Any) -> None:
    """Build the optimizer settings and the loss once, as the run will, so that a value neither takes
    (``momentum=2``, ``alpha=-1``) is refused before anything of the run is written."""
    from ..losses import build_loss
    from .optim import optim_settings

    optim = _named(s["optim"], s["optim_params"])
    if s["lr"] is not None:
        optim["lr"] = s["lr"]
    optim_settings(str(optim.pop("name", "sgd")), **optim)
    loss = _named(s["loss"], s["loss_params"])
    build_loss(str(loss.pop("name")), context={"batch_dice": cfg.batch_dice, "ignore_index": ignore}, **loss)


def _fit(
    trainer: L.Trainer,
    placeholder: RunCheckpoint,
    the_plan: Any,
    configuration: str,
    fold: int | str,
    run_dir: Path,
    ds: Any,
    s: dict[str, Any],
    t0: float,
    overwrite: bool,
    log: Callable[[str], None] | None,
    work_dir: str | os.PathLike[str] | None,
    dataset: str | None,
) -> dict[str, Any]:
    from ..data.datamodule import SegDataModule
    from ..preprocessing.cache import Cache

    cfg = the_plan.config(configuration)
    accelerator = _accelerator(str(s["device"]))
    precision = _precision(s["precision"], accelerator)
    rank, world = int(trainer.global_rank), int(trainer.world_size)
    writer = rank == 0
    if not writer:
        log = None  # one voice: rank 0 reports
    say = log or (lambda _line: None)

    resume: dict[str, Any] | None = None
    last = run_dir / LAST
    labels = sorted(the_plan.labels.items(), key=lambda kv: int(kv[0]))
    ignore = the_plan.ignore_label
    class_names = [name for value, name in labels[1:] if int(value) != ignore]
    title = f"{ds.name} {configuration} fold {fold}"
    if overwrite:
        if writer:  # the other ranks start afresh too, whatever they find
            for name in (LAST, previous_checkpoint(LAST).name, BEST, FINAL, METRICS_FILE, SETTINGS_FILE, PROGRESS_FILE):
                (run_dir / name).unlink(missing_ok=True)
            shutil.rmtree(run_dir / VALIDATION_DIR, ignore_errors=True)
    elif last.is_file() or previous_checkpoint(last).is_file():
        resume = _load_resume_state(run_dir, writer)
        _check_same_settings(run_dir, s)
        resume = _other_epochs(run_dir, resume, int(s["epochs"]), say, writer)
        if resume.get("finished"):
            if writer:
                _repair_reports(run_dir, resume, class_names, title)
            say(f"{run_dir}: this run has finished ({resume['epoch']} epochs); --overwrite trains it again")
            return _result(run_dir, resume, already_finished=True, resumed_from=None, seconds=time.perf_counter() - t0)
        if not resume.get("epochs_changed"):
            say(f"{run_dir}: resuming after epoch {resume['epoch']}{_inside(resume)}")
    # the loader's workers as they will run (at most the usable cores): settings.json records them
    workers = default_num_workers() if s["num_workers"] is None else cap_num_workers(max(0, int(s["num_workers"])))
    s = {**s, "num_workers": workers}
    early = placeholder.stop.signum
    if world == 1 and early and early != getattr(signal, "SIGUSR1", None):
        # came while the run was being prepared: nothing new to save (SIGUSR1 saves inside the first epoch)
        raise TrainingInterrupted(
            f"stopped by {_signal_name(early)} before training started"
            + ("; the same command resumes the run" if resume else ""),
            signum=early,
        )
    _check_optim_and_loss(s, cfg, ignore)  # a value no optimizer or loss takes fails before settings.json
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(run_dir)  # checkpoints a killed run left half-written
        write_json(
            run_dir / SETTINGS_FILE,
            {"configuration": configuration, "fold": str(fold), "settings": s, "versions": _versions()},
        )
    L.seed_everything(int(s["seed"]), workers=True, verbose=False)
    optim = _named(s["optim"], s["optim_params"])
    if s["lr"] is not None:
        optim["lr"] = s["lr"]
    loss = _named(s["loss"], s["loss_params"])
    cache = Cache.for_configuration(work_dir, the_plan, configuration, dataset=dataset)
    hardness = s["case_sampling"] == "hardness"
    dm = SegDataModule.for_fold(
        cache,
        ds.splits_path,
        fold,
        patch_size=cfg.patch_size,
        batch_size=int(s["batch_size"] or cfg.batch_size),
        context_slices=cfg.context_slices,
        num_workers=int(s["num_workers"]),
        seed=int(s["seed"]),
        num_val_batches=int(s["val_batches"]),
        augment_on_device=accelerator == "gpu",
        rank=rank,
        world_size=world,
        fresh_workers=hardness,  # each epoch's workers get the current case probabilities
    )
    module = SegmentationModule(
        cfg,
        the_plan.in_channels,
        the_plan.num_classes,
        loss=str(loss.pop("name")),
        loss_params=loss,
        optim=optim,
        epochs=s["epochs"],
        iterations_per_epoch=s["iterations_per_epoch"],
        class_names=class_names,
        keep_unused=world > 1,  # DDP needs a gradient for every head, the zero-weighted one too
        ignore_index=ignore,
        case_ids=list(dm.train_cases),
        hardness_beta=float(s["hardness_beta"]) if hardness else None,
    )
    module.planned_epochs = int(s["epochs"])
    dm.setup("fit")
    done = int(resume["epoch"]) if resume else 0
    if dm._train is not None:  # the case stream continues where the saved run left it, inside an epoch too
        saved = resume["data"] if resume else {}
        dm._train.resume_at(
            int(saved.get("train_stream_starts", 0)), int(saved.get("in_epoch", 0)), int(s["iterations_per_epoch"])
        )
    extra = {"configuration": configuration, "fold": str(fold), "plan_config": cfg.to_dict()}
    validation = None
    every_case = str(fold).strip().lower() == "all"  # its "validation" cases are the training cases
    if dm.val_cases and not every_case:
        validation = FoldValidation(
            the_plan,
            configuration,
            cache,
            list(dm.val_cases),
            run_dir / VALIDATION_DIR,
            autocast_dtype=_AUTOCAST.get(precision),
        )
    elif resume is None:
        say(f"fold {fold} trains on every case: no full-case validation (folds 0-4 keep validation cases)")
    callback = RunCheckpoint(
        run_dir,
        resume=resume,
        datamodule=dm,
        max_time=parse_duration(s["max_time"]) if s["max_time"] is not None else None,
        log=log,
        extra=extra,
        validation=validation,
        val_every=int(s["val_every"]),
        batch_size=dm.batch_size,
        val_batches=int(s["val_batches"]) if dm.val_cases else 0,
        title=title,
        started=t0,
        checkpoint_every=parse_duration(s["checkpoint_every"]) if s["checkpoint_every"] is not None else None,
        stop=placeholder.stop,
    )
    planned = int(resume.get("planned_epochs", s["epochs"])) if resume else int(s["epochs"])
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    callbacks[callbacks.index(placeholder)] = callback
    trainer.fit_loop.max_epochs = max(1, planned - done)
    trainer.limit_val_batches = int(s["val_batches"]) if dm.val_cases else 0
    try:
        with _quiet_lightning():
            trainer.fit(module, datamodule=dm)
    except SIGTERMException:  # Lightning's own SIGTERM handler, before training started
        raise TrainingInterrupted(
            f"stopped by SIGTERM before training started{'; the same command resumes the run' if resume else ''}",
            signum=signal.SIGTERM,
        ) from None
    except TrainingPreempted as stop:
        say(str(stop))
        if not writer:
            return {"run_dir": str(run_dir), "rank": rank, "world_size": world, "preempted": str(stop)}
        state = load_checkpoint(last)
        out = _result(run_dir, state, already_finished=False, resumed_from=done if resume else None, seconds=0.0)
        return {**out, "preempted": str(stop), "seconds": time.perf_counter() - t0}
    if not writer:  # rank 0 holds the run's record
        return {"run_dir": str(run_dir), "rank": rank, "world_size": world}
    state = load_checkpoint(last)
    if state.get("finished"):
        say(f"{run_dir}: finished after {state['epoch']} epochs (EMA pseudo-Dice {float(state['best_ema']):.4f} best)")
    return _result(
        run_dir, state, already_finished=False, resumed_from=done if resume else None, seconds=time.perf_counter() - t0
    )


def _inside(state: Mapping[str, Any]) -> str:
    """``", inside epoch 3 at iteration 12"`` for a state saved inside an epoch, else ``""``."""
    in_epoch = int(state.get("data", {}).get("in_epoch", 0))
    return f", inside epoch {int(state['epoch']) + 1} at iteration {in_epoch}" if in_epoch else ""


def _saved_epochs(run_dir: Path, state: Mapping[str, Any]) -> int:
    """The ``epochs`` a saved run was training for (its checkpoint's record; for checkpoints older
    than that record, its settings.json's, else the epochs it planned)."""
    if state.get("epochs") is not None:
        return int(state["epochs"])
    path = run_dir / SETTINGS_FILE
    if path.is_file():
        saved = read_json(path, what="run settings", hint="start again with --overwrite").get("settings", {})
        if isinstance(saved.get("epochs"), int):
            return int(saved["epochs"])
    return int(state.get("planned_epochs", state["epoch"]))


def _other_epochs(
    run_dir: Path, state: dict[str, Any], epochs: int, say: Callable[[str], None], writer: bool
) -> dict[str, Any]:
    """The saved run ``state`` to resume when ``epochs`` are asked for.

    The epochs it was training for: ``state`` as it is (an exact resume, or a finished run). More
    (or fewer, but more than it has completed): the run continues from where it is to ``epochs``,
    the poly schedule re-spanned over ``epochs`` from the current epoch on (the learning rate of
    epoch ``e`` is then ``lr0 · (1 − e/epochs)^0.9``), as nnU-Net does when its epochs are raised
    and training continues; a finished run loses its ``final.pt`` until it finishes again. No more
    than it has completed: refused (exit 2), with ``--overwrite`` to train it again from scratch.
    """
    saved, done = _saved_epochs(run_dir, state), int(state["epoch"])
    if epochs == saved or (state.get("finished") and epochs == done):
        return state
    if epochs <= done:
        raise ConfigError(
            f"epochs={epochs}, but the run in {run_dir} has already trained {done} epochs",
            hint=f"ask for more epochs (epochs={done + 1} or more) to continue it, "
            "or train it again from scratch with --overwrite",
        )
    if writer and state.get("finished"):
        (run_dir / FINAL).unlink(missing_ok=True)  # the weights of the shorter run, which goes on
    say(
        f"{run_dir}: continuing after epoch {done} to {epochs} epochs (it was to train {saved}){_inside(state)}; "
        f"the poly schedule now spans {epochs} epochs from here"
    )
    return {
        **state,
        "epochs": epochs,
        "planned_epochs": epochs,
        "final_epoch_iterations": None,
        "finished": False,
        "epochs_changed": True,
    }


def _load_resume_state(run_dir: Path, writer: bool) -> dict[str, Any]:
    """The run's ``last.pt``; when it is damaged (or was lost between two renames), the one before
    it (``last.prev.pt``), with a warning: the epochs after that are trained again, as they were.

    A damaged ``last.pt`` is removed (by the writing process), so it is never loaded and the next
    save does not keep it as the previous one. A checkpoint refused for holding objects is not
    replaced silently: that error stands.
    """
    last, prev = run_dir / LAST, previous_checkpoint(run_dir / LAST)
    problem = f"{last} is missing (the run was stopped while replacing it)"
    if last.is_file():
        try:
            return load_checkpoint(last)
        except StateError as exc:
            # damaged, or removed meanwhile by the writing process of a distributed run (which fell back)
            if not prev.is_file() or not (isinstance(exc, DamagedCheckpointError) or not last.is_file()):
                raise
            if isinstance(exc, DamagedCheckpointError):
                problem = exc.message
    state = load_checkpoint(prev)
    if writer:
        last.unlink(missing_ok=True)
        logging.getLogger("segpipe").warning(
            f"{problem}; resuming from {prev.name} (epoch {state.get('epoch')}) instead: "
            "the epoch after it is trained again"
        )
    return state


def _slurm_requeue() -> str | None:
    """Requeue this SLURM job (``scontrol requeue JOBID``); its id, or None outside SLURM or on failure."""
    import subprocess

    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
    if not job or not job.replace("_", "").isdigit():  # only a job id ever reaches the command line
        return None
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        logging.getLogger("segpipe").warning("could not requeue SLURM job %s: %s", job, exc)
        return None
    if done.returncode != 0:
        logging.getLogger("segpipe").warning("scontrol requeue %s failed: %s", job, done.stderr.strip())
        return None
    return job


def _slurm_plugins() -> list[Any]:
    """Under SLURM, Lightning's cluster environment without its own SIGUSR1 requeue (segpipe's saves
    segpipe's state, see :class:`RunCheckpoint`)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def _loggers(run_dir: Path, setting: bool | str) -> Any:
    """TensorBoard event files in ``run_dir/tensorboard/`` when asked (``auto``: when installed), else none."""
    if setting is False or (setting == "auto" and not _tensorboard_installed()):
        return False
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)


def _repair_reports(run_dir: Path, state: Mapping[str, Any], class_names: list[str], title: str) -> None:
    """Redraw metrics.csv and progress.png of a finished run when a kill left them missing or older
    than its last checkpoint (they are written right after it)."""
    stamp = (run_dir / LAST).stat().st_mtime
    stale = [
        n for n in (METRICS_FILE, PROGRESS_FILE) if not (run_dir / n).is_file() or (run_dir / n).stat().st_mtime < stamp
    ]
    if stale and state.get("history"):
        write_reports(run_dir, state["history"], class_names, title=title)


def _named(choice: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """``{"name": ..., **params}`` from a name (``"sgd"``) or a composed group (``{"name": "sgd", "lr": 0.01}``)."""
    if isinstance(choice, Mapping):
        out = dict(choice)
        if "name" not in out:
            raise ConfigError(f"{out}: the option has no name", hint="give e.g. optim=sgd or loss=dice_ce")
        return {**out, **dict(params)}
    return {"name": str(choice), **dict(params)}


def _check_same_settings(run_dir: Path, s: Mapping[str, Any]) -> None:
    path = run_dir / SETTINGS_FILE
    if not path.is_file():
        return
    saved = read_json(path, what="run settings", hint="start again with overwrite=true").get("settings", {})
    changed = [f"{k} {saved.get(k)!r} → {s[k]!r}" for k in _RESUME_KEYS if k in saved and saved.get(k) != s[k]]
    if changed:
        raise StateError(
            f"the run in {run_dir} was started with other settings ({'; '.join(changed)})",
            hint="resume with the same settings, or start again with overwrite=true",
        )


def _result(
    run_dir: Path, state: Mapping[str, Any], *, already_finished: bool, resumed_from: int | None, seconds: float
) -> dict[str, Any]:
    history = state.get("history", {})
    # the last epoch with validation patches (a shortened last epoch has none)
    dice = [d for d in history.get("pseudo_dice") or [] if any(not math.isnan(float(v)) for v in d)] or [[]]
    ema = history.get("ema_fg_dice") or [math.nan]
    validation = state.get("validation") or {}
    return {
        "run_dir": str(run_dir),
        "checkpoint": str(run_dir / LAST),
        "epochs": int(state["epoch"]),
        "planned_epochs": int(state.get("planned_epochs", state["epoch"])),
        "finished": bool(state.get("finished")),
        "already_finished": already_finished,
        "resumed_from": resumed_from,
        "ema_fg_dice": float(ema[-1]),
        "pseudo_dice": [float(v) for v in dice[-1]],
        "val_dice": float(validation.get("mean_fg_dice", math.nan)),
        "val_class_dice": {str(k): float(v) for k, v in (validation.get("class_dice") or {}).items()},
        "validation": validation.get("line"),
        "validation_dir": str(run_dir / VALIDATION_DIR) if (run_dir / VALIDATION_DIR).is_dir() else None,
        "seconds": seconds,
        "preempted": None,
    }


__all__ = [
    "BEST",
    "FINAL",
    "LAST",
    "METRICS_FILE",
    "SETTINGS_FILE",
    "VALIDATION_DIR",
    "FoldValidation",
    "RunCheckpoint",
    "StopSignals",
    "TrainingInterrupted",
    "fit",
    "scaled_val_batches",
    "train_settings",
    "write_reports",
]
