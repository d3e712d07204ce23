"""Train one configuration and fold with Lightning, resumably: :func:`fit`.

The run lives in the workspace's ``runs/<configuration>/fold_<k>/``::

    settings.json   the resolved training settings and the library versions
    last.pt         the full training state after the last completed epoch (see checkpoint.py)
    best.pt         the network weights at the best EMA pseudo-Dice so far
    final.pt        the network weights once the run has finished
    metrics.csv     one row per epoch: losses, pseudo-Dice per class and its EMA, learning rate, time

Calling :func:`fit` again on the same run folder resumes from ``last.pt`` (weights, optimizer,
schedule, epoch, case stream, every RNG state); a finished run returns at once and says so;
``overwrite=True`` starts again. With ``deterministic=True`` on the CPU a run interrupted between
epochs and resumed ends with the same weights, bit for bit, as one that was never interrupted.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from ..errors import ConfigError, StateError
from ..io.atomic import write_text
from ..io.jsonio import read_json, write_json
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint, to_plain
from .module import SegmentationModule
from .optim import fit_budget, parse_duration

LAST, BEST, FINAL = "last.pt", "best.pt", "final.pt"
SETTINGS_FILE, METRICS_FILE = "settings.json", "metrics.csv"

#: training settings and their defaults; those also in ``conf/train/default.yaml`` take its values
_BUILTIN_DEFAULTS: dict[str, Any] = {
    "epochs": 1000,
    "iterations_per_epoch": 250,
    "val_every": 50,
    "batch_size": None,
    "loss": "dice_ce",
    "loss_params": {},
    "optim": "sgd",
    "optim_params": {},
    "lr": None,
    "device": "auto",
    "precision": "auto",
    "max_time": None,
    "seed": 12345,
    "deterministic": False,
    "num_workers": None,
    "num_val_batches": 50,
    "grad_clip": 12.0,
    "progress": False,
}
#: settings that change what is trained; a resumed run must keep them
_RESUME_KEYS = ("iterations_per_epoch", "batch_size", "loss", "loss_params", "optim", "optim_params", "lr", "seed")


def train_settings(settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The resolved training settings: defaults (``conf/train/default.yaml`` where it has the key)
    with ``settings`` applied; unknown keys are a :class:`ConfigError` listing the valid ones."""
    from ..config import group_defaults

    out = dict(_BUILTIN_DEFAULTS)
    out.update({k: v for k, v in group_defaults("train").items() if k in out})
    given = {k: v for k, v in dict(settings or {}).items() if k != "fold"}
    unknown = sorted(set(given) - set(out))
    if unknown:
        raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}", hint=f"valid: {', '.join(sorted(out))}")
    out.update(to_plain(given))
    for key in ("epochs", "iterations_per_epoch", "val_every", "num_val_batches"):
        try:
            value = int(out[key])
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={out[key]!r} is not a whole number") from None
        if value < 1:
            raise ConfigError(f"{key}={out[key]!r} must be at least 1")
        out[key] = value
    if out["batch_size"] is not None and int(out["batch_size"]) < 1:
        raise ConfigError(f"batch_size={out['batch_size']!r} must be at least 1 (or null for the plan's)")
    if out["device"] not in ("auto", "cpu", "cuda", "gpu"):
        raise ConfigError(f"device={out['device']!r} is not valid", hint="valid: cpu, cuda, auto")
    if out["max_time"] is not None:
        parse_duration(out["max_time"])  # a bad duration is refused before any work
    return out


def _accelerator(device: str) -> str:
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is visible", hint="use device=cpu or device=auto")
        return "gpu"
    return "cpu"


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
    writer.writerow(["epoch", "train_loss", "val_loss", *dice_cols, "mean_fg_dice", "ema_fg_dice", "lr", "seconds"])
    for i, epoch in enumerate(history["epoch"]):
        dice = list(history["pseudo_dice"][i]) if i < len(history["pseudo_dice"]) else []
        row = [
            epoch,
            history["train_loss"][i],
            history["val_loss"][i],
            *dice,
            history["mean_fg_dice"][i],
            history["ema_fg_dice"][i],
            history["lr"][i],
            history["epoch_seconds"][i],
        ]
        writer.writerow(
            ["" if isinstance(v, float) and math.isnan(v) else (f"{v:.6g}" if isinstance(v, float) else v) for v in row]
        )
    return buf.getvalue()


class RunCheckpoint(Checkpoint):
    """Saves the full training state (``last.pt``) atomically at every epoch's end, after the
    module recorded the epoch and stepped its schedule, and puts a saved state back at the start.

    Also: ``best.pt`` (weights) when the EMA pseudo-Dice improves, ``metrics.csv`` from the
    history, and, with a wall-clock budget, the schedule re-spanned over the epochs that fit (the
    run stops when no further epoch fits).
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
    ):
        self.run_dir, self.resume, self.datamodule = Path(run_dir), resume, datamodule
        self.max_time, self.say, self.extra = max_time, log, dict(extra or {})
        self.elapsed_before = float(resume.get("elapsed_seconds", 0.0)) if resume else 0.0
        self.best = float(resume.get("best_ema", -math.inf)) if resume else -math.inf
        self._session_start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._session_start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, SegmentationModule)
        if self.resume is None:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        pl_module.load_training_state(self.resume, optimizer)
        pl_module.planned_epochs = int(self.resume.get("planned_epochs", pl_module.epochs))
        restore_rng(self.resume["rng"])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, SegmentationModule)
        if trainer.sanity_checking:
            return
        self._apply_budget(trainer, pl_module)
        done = pl_module.completed_epochs
        finished = done >= pl_module.planned_epochs
        ema = pl_module.ema_fg_dice
        improved = not math.isnan(ema) and ema > self.best
        if improved:
            self.best = ema
        if trainer.is_global_zero:
            state = {
                **pl_module.training_state(),
                "planned_epochs": pl_module.planned_epochs,
                "finished": finished,
                "elapsed_seconds": self.elapsed,
                "best_ema": self.best,
                "data": {"train_stream_starts": done},
                "rng": capture_rng(),
                **self.extra,
            }
            save_checkpoint(self.run_dir / LAST, state)
            if improved:
                save_checkpoint(
                    self.run_dir / BEST, {"model": state["model"], "epoch": done, "ema_fg_dice": ema, **self.extra}
                )
            if finished:
                save_checkpoint(self.run_dir / FINAL, {"model": state["model"], "epoch": done, **self.extra})
            write_text(self.run_dir / METRICS_FILE, _metrics_csv(pl_module.history, pl_module.class_names))
        if self.say is not None:
            self.say(_epoch_line(pl_module))
        if finished:
            trainer.should_stop = True

    def _apply_budget(self, trainer: L.Trainer, module: SegmentationModule) -> None:
        if self.max_time is None or not module.history["epoch_seconds"]:
            return
        recent = module.history["epoch_seconds"][-3:]
        per_epoch = sum(recent) / len(recent)
        fit = fit_budget(
            self.max_time,
            self.elapsed,
            seconds_per_iteration=per_epoch / module.iterations_per_epoch,
            iterations_per_epoch=module.iterations_per_epoch,
            max_epochs=module.epochs - module.completed_epochs,
        )
        planned = min(module.epochs, module.completed_epochs + fit.epochs)
        if planned != module.planned_epochs and planned >= module.completed_epochs:
            module.planned_epochs = planned
            if module.scheduler is not None:
                module.scheduler.set_total_steps(max(1, module.schedule_steps(planned)))


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
) -> dict[str, Any]:
    """Train ``configuration`` of ``plan`` (a :class:`~segpipe.planning.Plan` or its ``plans.json``)
    on ``fold`` into the workspace's run folder; resume it when it holds ``last.pt``.

    ``settings``: see :func:`train_settings` (``epochs``, ``iterations_per_epoch``, ``loss``,
    ``optim``, ``lr``, ``device``, ``precision``, ``max_time``, ``seed``, ``deterministic``,
    ``num_workers``, …). ``log``: called with one line per epoch and for resume/finish notes.
    Returns ``{"run_dir", "checkpoint", "epochs", "planned_epochs", "finished", "already_finished",
    "resumed_from", "ema_fg_dice", "pseudo_dice", "seconds"}``.
    """
    from ..data.datamodule import SegDataModule
    from ..preprocessing.cache import Cache
    from ..workspace import Workspace

    the_plan = _load_plan(plan)
    cfg = the_plan.config(configuration)
    s = train_settings(settings)
    ds = Workspace.at(work_dir).dataset(dataset or the_plan.dataset)
    run_dir = ds.run_dir(configuration, fold)
    say = log or (lambda _line: None)
    t0 = time.perf_counter()

    resume: dict[str, Any] | None = None
    last = run_dir / LAST
    if overwrite:
        for name in (LAST, BEST, FINAL, METRICS_FILE, SETTINGS_FILE):
            (run_dir / name).unlink(missing_ok=True)
    elif last.is_file():
        resume = load_checkpoint(last)
        _check_same_settings(run_dir, s)
        if resume.get("finished"):
            say(f"{run_dir}: this run has finished ({resume['epoch']} epochs); overwrite=true trains it again")
            return _result(run_dir, resume, already_finished=True, resumed_from=None, seconds=time.perf_counter() - t0)
        say(f"{run_dir}: resuming after epoch {resume['epoch']}")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        run_dir / SETTINGS_FILE,
        {"configuration": configuration, "fold": str(fold), "settings": s, "versions": _versions()},
    )

    accelerator = _accelerator(str(s["device"]))
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    L.seed_everything(int(s["seed"]), workers=True, verbose=False)
    labels = sorted(the_plan.labels.items(), key=lambda kv: int(kv[0]))
    optim = _named(s["optim"], s["optim_params"])
    if s["lr"] is not None:
        optim["lr"] = s["lr"]
    loss = _named(s["loss"], s["loss_params"])
    module = SegmentationModule(
        cfg,
        the_plan.in_channels,
        the_plan.num_classes,
        loss=str(loss.pop("name")),
        loss_params=loss,
        optim=optim,
        epochs=s["epochs"],
        iterations_per_epoch=s["iterations_per_epoch"],
        class_names=[name for _, name in labels[1:]],
    )
    module.planned_epochs = int(s["epochs"])
    cache = Cache.for_configuration(work_dir, the_plan, configuration, dataset=dataset)
    dm = SegDataModule.for_fold(
        cache,
        ds.splits_path,
        fold,
        patch_size=cfg.patch_size,
        batch_size=int(s["batch_size"] or cfg.batch_size),
        context_slices=cfg.context_slices,
        num_workers=s["num_workers"],
        seed=int(s["seed"]),
        num_val_batches=int(s["num_val_batches"]),
        augment_on_device=accelerator == "gpu",
    )
    dm.setup("fit")
    done = int(resume["epoch"]) if resume else 0
    if dm._train is not None:  # the case stream continues where the saved run left it
        dm._train._starts = int(resume["data"]["train_stream_starts"]) if resume else 0
    extra = {"configuration": configuration, "fold": str(fold), "plan_config": cfg.to_dict()}
    callback = RunCheckpoint(
        run_dir,
        resume=resume,
        datamodule=dm,
        max_time=parse_duration(s["max_time"]) if s["max_time"] is not None else None,
        log=log,
        extra=extra,
    )
    planned = int(resume.get("planned_epochs", s["epochs"])) if resume else int(s["epochs"])
    with _quiet_lightning():
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            precision=_precision(s["precision"], accelerator),  # type: ignore[arg-type]
            max_epochs=max(1, planned - done),
            limit_train_batches=int(s["iterations_per_epoch"]),
            limit_val_batches=int(s["num_val_batches"]) if dm.val_cases else 0,
            num_sanity_val_steps=0,
            logger=False,
            callbacks=[callback],
            enable_checkpointing=True,
            enable_progress_bar=bool(s["progress"]),
            enable_model_summary=False,
            deterministic=bool(s["deterministic"]),
            benchmark=False,
            gradient_clip_val=float(s["grad_clip"]) if s["grad_clip"] else None,
            gradient_clip_algorithm="norm",
            default_root_dir=str(run_dir),
            use_distributed_sampler=False,
        )
    try:
        with _quiet_lightning():
            trainer.fit(module, datamodule=dm)
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
    state = load_checkpoint(last)
    if state.get("finished"):
        say(f"{run_dir}: finished after {state['epoch']} epochs (EMA pseudo-Dice {float(state['best_ema']):.4f} best)")
    return _result(
        run_dir, state, already_finished=False, resumed_from=done if resume else None, seconds=time.perf_counter() - t0
    )


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
    dice = history.get("pseudo_dice") or [[]]
    ema = history.get("ema_fg_dice") or [math.nan]
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
        "seconds": seconds,
    }


__all__ = ["BEST", "FINAL", "LAST", "METRICS_FILE", "SETTINGS_FILE", "RunCheckpoint", "fit", "train_settings"]
