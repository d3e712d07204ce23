"""Train one configuration and fold with Lightning, resumably: :func:`fit`.

The run lives in the workspace's ``runs/<configuration>/fold_<k>/``::

    settings.json   the resolved training settings and the library versions
    last.pt         the full training state after the last completed epoch (see segpipe/checkpoint.py)
    last.prev.pt    the one before it: resumed from, with a warning, when last.pt is damaged
    best.pt         the network weights at the best EMA pseudo-Dice so far
    final.pt        the network weights once the run has finished
    metrics.csv     one row per epoch: losses, pseudo-Dice per class and its EMA, the full-case
                    validation Dice (epochs with one), learning rate, time
    progress.png    the same history drawn (see plots.py), redrawn as epochs end
    report.html     the run for people (run_report.py), written as a call of fit ends; images in report_files/
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

import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .. import runtime
from .._version import versions
from ..checkpoint import load_checkpoint, previous_checkpoint
from ..errors import ConfigError
from ..io.atomic import sweep_temporaries
from ..io.jsonio import write_json
from ..parallel import cap_num_workers, default_num_workers
from ..workspace import (
    BEST,
    FINAL,
    LAST,
    METRICS_FILE,
    PROGRESS_FILE,
    REPORT_FILE,
    REPORT_FILES_DIR,
    SETTINGS_FILE,
    VALIDATION_DIR,
)
from . import run_settings
from .callbacks import RunCheckpoint
from .module import SegmentationModule
from .optim import parse_duration
from .reports import repair_reports
from .resume import inside_note, load_resume_state, other_epochs, run_result
from .run_settings import check_optim_and_loss, check_same_settings, named_option, train_settings
from .signals import StopSignals, TrainingInterrupted, TrainingPreempted, signal_name
from .validation import FoldValidation


@dataclass
class RunContext:
    """One call of :func:`fit` as decided before training: the trainer (which knows this process's
    rank), the plan and configuration, the run's folder and workspace entry, the resolved settings,
    when the budget started counting, and where progress lines go."""

    trainer: Any
    placeholder: RunCheckpoint
    plan: Any
    configuration: str
    fold: int | str
    run_dir: Path
    dataset: Any
    settings: dict[str, Any]
    started: float
    overwrite: bool
    log: Callable[[str], None] | None
    work_dir: str | os.PathLike[str] | None
    dataset_name: str | None

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return int(self.trainer.global_rank) == 0

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    @property
    def class_names(self) -> list[str]:
        regions = (self.plan.settings or {}).get("regions")
        if regions:  # a region dataset scores its regions
            return [str(n) for n in regions["names"]]
        labels = sorted(self.plan.labels.items(), key=lambda kv: int(kv[0]))
        return [name for value, name in labels[1:] if int(value) != self.plan.ignore_label]

    @property
    def title(self) -> str:
        return f"{self.dataset.name} {self.configuration} fold {self.fold}"


def load_plan_of(plan: Any) -> Any:
    """A :class:`~segpipe.planning.Plan` given as one or as the path of its ``plans.json``."""
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
    it to that count (see :func:`~segpipe.training.resume.other_epochs`). A second process training the same run meanwhile
    is refused (:class:`~segpipe.errors.StateError`); SIGTERM and Ctrl-C save the run and raise
    :class:`TrainingInterrupted`, SIGUSR1 saves it and returns with ``preempted`` (:class:`StopSignals`).
    Returns ``{"run_dir", "checkpoint", "epochs", "planned_epochs", "finished", "already_finished",
    "resumed_from", "ema_fg_dice", "pseudo_dice", "val_dice", "val_class_dice", "validation",
    "validation_dir", "seconds", "report"}``: ``val_dice`` is the last full-case validation's mean foreground
    Dice (NaN before any), ``val_class_dice`` its ``{class name: Dice}``, ``validation`` its one-line
    summary (None before any), ``validation_dir`` where its files are (None without validation cases) and
    ``report`` the run's ``report.html`` (:mod:`~segpipe.training.run_report`), rewritten as the call ends.
    """
    from ..workspace import Workspace, run_lock

    the_plan = load_plan_of(plan)
    the_plan.config(configuration)  # an unknown configuration is refused before any work
    s = train_settings(settings)
    ds = Workspace.at(work_dir).dataset(dataset or the_plan.dataset)
    run_dir = ds.run_dir(configuration, fold)
    t0 = time.perf_counter() if started is None else float(started)
    accelerator = runtime.accelerator(str(s["device"]))
    precision = runtime.precision(s["precision"], accelerator)
    stop = StopSignals().install()  # for the whole call: a signal while the run is prepared counts too
    placeholder = RunCheckpoint(run_dir, started=t0, stop=stop)  # replaced below, once the run is known
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        # the trainer first: with trainer=ddp it knows this process's rank, and only rank 0 writes files
        with runtime.quiet_lightning():
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
                plugins=runtime.slurm_plugins(),
            )
        # one training of a run at a time: its writing process holds the run
        with run_lock(run_dir) if trainer.global_rank == 0 else nullcontext():
            run = RunContext(
                trainer=trainer,
                placeholder=placeholder,
                plan=the_plan,
                configuration=configuration,
                fold=fold,
                run_dir=run_dir,
                dataset=ds,
                settings=s,
                started=t0,
                overwrite=overwrite,
                log=log,
                work_dir=work_dir,
                dataset_name=dataset,
            )
            return _fit(run)
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        stop.restore()


def _fit(run: RunContext) -> dict[str, Any]:
    """Train the run of ``run`` to its end (or until stopped), resuming it when it was saved."""
    if not run.writer:
        run.log = None  # one voice: rank 0 reports
    resume = _start_or_resume(run)
    if resume is not None and resume.get("finished"):
        if run.writer:
            repair_reports(run.run_dir, resume, run.class_names, run.title)
        run.say(f"{run.run_dir}: this run has finished ({resume['epoch']} epochs); --overwrite trains it again")
        out = run_result(
            run.run_dir, resume, already_finished=True, resumed_from=None, seconds=time.perf_counter() - run.started
        )
        return {**out, "report": _write_report(run) if run.writer else None}
    s = run.settings
    # the loader's workers as they will run (at most the usable cores): settings.json records them
    workers = default_num_workers() if s["num_workers"] is None else cap_num_workers(max(0, int(s["num_workers"])))
    s = run.settings = {**s, "num_workers": workers}
    early = run.placeholder.stop.signum
    if int(run.trainer.world_size) == 1 and early and early != getattr(signal, "SIGUSR1", None):
        # came while the run was being prepared: nothing new to save (SIGUSR1 saves inside the first epoch)
        raise TrainingInterrupted(
            f"stopped by {signal_name(early)} before training started"
            + ("; the same command resumes the run" if resume else ""),
            signum=early,
        )
    cfg = run.plan.config(run.configuration)
    check_optim_and_loss(s, cfg, run.plan.ignore_label)  # a value no optimizer or loss takes fails before settings.json
    if run.writer:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(run.run_dir)  # checkpoints a killed run left half-written
        write_json(
            run.run_dir / SETTINGS_FILE,
            {
                "configuration": run.configuration,
                "fold": str(run.fold),
                "settings": s,
                "versions": versions(lightning=True),
            },
        )
    L.seed_everything(int(s["seed"]), workers=True, verbose=False)
    return _train(run, resume)


def _start_or_resume(run: RunContext) -> dict[str, Any] | None:
    """The saved state to resume (None: start afresh). ``overwrite`` removes the run's files first
    (in the writing process; the others start afresh too, whatever they find)."""
    last = run.run_dir / LAST
    if run.overwrite:
        if run.writer:
            for name in (LAST, previous_checkpoint(LAST).name, BEST, FINAL, METRICS_FILE, SETTINGS_FILE, PROGRESS_FILE):
                (run.run_dir / name).unlink(missing_ok=True)
            (run.run_dir / REPORT_FILE).unlink(missing_ok=True)
            for folder in (VALIDATION_DIR, REPORT_FILES_DIR):
                shutil.rmtree(run.run_dir / folder, ignore_errors=True)
        return None
    if not (last.is_file() or previous_checkpoint(last).is_file()):
        return None
    resume = load_resume_state(run.run_dir, run.writer)
    check_same_settings(run.run_dir, run.settings)
    resume = other_epochs(run.run_dir, resume, int(run.settings["epochs"]), run.say, run.writer)
    if not resume.get("finished") and not resume.get("epochs_changed"):
        run.say(f"{run.run_dir}: resuming after epoch {resume['epoch']}{inside_note(resume)}")
    return resume


def _data_and_module(run: RunContext, resume: dict[str, Any] | None, cache: Any) -> tuple[Any, SegmentationModule]:
    """The fold's data module (its case stream continued where a saved run left it, inside an
    epoch too) and the Lightning module with the run's loss, optimizer and schedule."""
    from ..data.datamodule import SegDataModule

    s, cfg = run.settings, run.plan.config(run.configuration)
    accelerator = runtime.accelerator(str(s["device"]))
    world = int(run.trainer.world_size)
    hardness = s["case_sampling"] == "hardness"
    cascade: dict[str, Any] = {}
    if run.plan.previous_stage(run.configuration):  # the 3-D cascade: the low-resolution stage's predictions
        from .cascade import previous_predictions

        previous = previous_predictions(run.run_dir.parent.parent, run.plan, run.configuration, cache.cases())
        cascade = {"previous": previous, "previous_channels": run.plan.previous_channels(run.configuration)}
    dm = SegDataModule.for_fold(
        cache,
        run.dataset.splits_path,
        run.fold,
        patch_size=cfg.patch_size,
        batch_size=int(s["batch_size"] or cfg.batch_size),
        context_slices=cfg.context_slices,
        num_workers=int(s["num_workers"]),
        seed=int(s["seed"]),
        num_val_batches=int(s["val_batches"]),
        augment_on_device=accelerator == "gpu",
        rank=int(run.trainer.global_rank),
        world_size=world,
        **cascade,
        fresh_workers=hardness,  # each epoch's workers get the current case probabilities
    )
    optim = named_option(s["optim"], s["optim_params"])
    if s["lr"] is not None:
        optim["lr"] = s["lr"]
    loss = named_option(s["loss"], s["loss_params"])
    module = SegmentationModule(
        cfg,
        run.plan.network_channels(run.configuration),
        run.plan.num_classes,
        loss=str(loss.pop("name")),
        loss_params=loss,
        optim=optim,
        epochs=s["epochs"],
        iterations_per_epoch=s["iterations_per_epoch"],
        class_names=run.class_names,
        keep_unused=world > 1,  # DDP needs a gradient for every head, the zero-weighted one too
        ignore_index=run.plan.ignore_label,
        case_ids=list(dm.train_cases),
        hardness_beta=float(s["hardness_beta"]) if hardness else None,
        regions=((run.plan.settings or {}).get("regions") or {}).get("regions"),
    )
    module.planned_epochs = int(s["epochs"])
    dm.setup("fit")
    if dm.train_stream is not None:
        saved = resume["data"] if resume else {}
        dm.train_stream.resume_at(
            int(saved.get("train_stream_starts", 0)), int(saved.get("in_epoch", 0)), int(s["iterations_per_epoch"])
        )
    return dm, module


def _callback(run: RunContext, resume: dict[str, Any] | None, dm: Any, cache: Any) -> RunCheckpoint:
    """The run's :class:`RunCheckpoint`, with the fold's full-case validation unless ``fold=all``."""
    s = run.settings
    precision = runtime.precision(s["precision"], runtime.accelerator(str(s["device"])))
    validation = None
    every_case = str(run.fold).strip().lower() == "all"  # its "validation" cases are the training cases
    if dm.val_cases and not every_case:
        validation = FoldValidation(
            run.plan,
            run.configuration,
            cache,
            list(dm.val_cases),
            run.run_dir / VALIDATION_DIR,
            autocast_dtype=runtime.autocast_dtype(precision),
            previous=getattr(dm, "previous", None),
        )
    elif resume is None:
        run.say(f"fold {run.fold} trains on every case: no full-case validation (folds 0-4 keep validation cases)")
    cfg = run.plan.config(run.configuration)
    return RunCheckpoint(
        run.run_dir,
        resume=resume,
        datamodule=dm,
        max_time=parse_duration(s["max_time"]) if s["max_time"] is not None else None,
        log=run.log,
        extra={"configuration": run.configuration, "fold": str(run.fold), "plan_config": cfg.to_dict()},
        validation=validation,
        val_every=int(s["val_every"]),
        batch_size=dm.batch_size,
        val_batches=int(s["val_batches"]) if dm.val_cases else 0,
        title=run.title,
        started=run.started,
        checkpoint_every=parse_duration(s["checkpoint_every"]) if s["checkpoint_every"] is not None else None,
        stop=run.placeholder.stop,
    )


def _train(run: RunContext, resume: dict[str, Any] | None) -> dict[str, Any]:
    """Build the data, the module and the callback, train, and return the run's summary."""
    from ..preprocessing.cache import Cache

    s, trainer = run.settings, run.trainer
    cache = Cache.for_configuration(run.work_dir, run.plan, run.configuration, dataset=run.dataset_name)
    dm, module = _data_and_module(run, resume, cache)
    callback = _callback(run, resume, dm, cache)
    done = int(resume["epoch"]) if resume else 0
    planned = int(resume.get("planned_epochs", s["epochs"])) if resume else int(s["epochs"])
    callbacks = trainer.callbacks
    callbacks[callbacks.index(run.placeholder)] = callback
    trainer.fit_loop.max_epochs = max(1, planned - done)
    trainer.limit_val_batches = int(s["val_batches"]) if dm.val_cases else 0
    resumed_from = done if resume else None
    rank, world = int(trainer.global_rank), int(trainer.world_size)
    try:
        with runtime.quiet_lightning():
            trainer.fit(module, datamodule=dm)
    except SIGTERMException:  # Lightning's own SIGTERM handler, before training started
        raise TrainingInterrupted(
            f"stopped by SIGTERM before training started{'; the same command resumes the run' if resume else ''}",
            signum=signal.SIGTERM,
        ) from None
    except TrainingInterrupted:  # stopped by SIGTERM or Ctrl-C, saved: the report shows it as it stands
        if run.writer:
            _write_report(run, cache)
        raise
    except TrainingPreempted as stop:
        run.say(str(stop))
        if not run.writer:
            return {"run_dir": str(run.run_dir), "rank": rank, "world_size": world, "preempted": str(stop)}
        state = load_checkpoint(run.run_dir / LAST)
        out = run_result(run.run_dir, state, already_finished=False, resumed_from=resumed_from, seconds=0.0)
        report = _write_report(run, cache)
        return {**out, "preempted": str(stop), "seconds": time.perf_counter() - run.started, "report": report}
    if not run.writer:  # rank 0 holds the run's record
        return {"run_dir": str(run.run_dir), "rank": rank, "world_size": world}
    state = load_checkpoint(run.run_dir / LAST)
    if state.get("finished"):
        run.say(
            f"{run.run_dir}: finished after {state['epoch']} epochs (EMA pseudo-Dice {float(state['best_ema']):.4f} best)"
        )
    report = _write_report(run, cache)  # after the final full-case validation, which ends the last epoch
    out = run_result(
        run.run_dir,
        state,
        already_finished=False,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - run.started,
    )
    return {**out, "report": report}


def _write_report(run: RunContext, cache: Any = None) -> str | None:
    """(Re)write the run's ``report.html`` (:mod:`.run_report`); its path, None when it was not written
    (a report never stops a training)."""
    from .run_report import write_run_report

    path = write_run_report(run.run_dir, plan=run.plan, cache=cache, title=run.title, say=run.say)
    return str(path) if path is not None else None


def _loggers(run_dir: Path, setting: bool | str) -> Any:
    """TensorBoard event files in ``run_dir/tensorboard/`` when asked (``auto``: when installed), else none."""
    if setting is False or (setting == "auto" and not run_settings.tensorboard_installed()):
        return False
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)


def _progress_bar(setting: bool | str) -> bool:
    """The per-iteration bar: on a terminal for ``auto`` (and only at the segpipe logger's INFO level)."""
    if setting == "auto":
        from ..progress import progress_mode

        return progress_mode() == "bar"
    return bool(setting)


__all__ = ["RunContext", "fit", "load_plan_of", "train_settings"]
