"""Resuming a training run: its saved state (``last.pt``, else ``last.prev.pt``), another number of
epochs than it was started with, and the summary a run returns."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..checkpoint import DamagedCheckpointError, load_checkpoint, previous_checkpoint
from ..errors import ConfigError, StateError
from ..io.jsonio import read_json
from ..workspace import FINAL, LAST, SETTINGS_FILE, VALIDATION_DIR


def inside_note(state: Mapping[str, Any]) -> str:
    """``", inside epoch 3 at iteration 12"`` for a state saved inside an epoch, else ``""``."""
    in_epoch = int(state.get("data", {}).get("in_epoch", 0))
    return f", inside epoch {int(state['epoch']) + 1} at iteration {in_epoch}" if in_epoch else ""


def saved_epochs(run_dir: Path, state: Mapping[str, Any]) -> int:
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


def other_epochs(
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
    saved, done = saved_epochs(run_dir, state), int(state["epoch"])
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
        f"{run_dir}: continuing after epoch {done} to {epochs} epochs (it was to train {saved}){inside_note(state)}; "
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


def load_resume_state(run_dir: Path, writer: bool) -> dict[str, Any]:
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


def run_result(
    run_dir: Path, state: Mapping[str, Any], *, already_finished: bool, resumed_from: int | None, seconds: float
) -> dict[str, Any]:
    """What :func:`~segpipe.training.fit.fit` returns for the run saved as ``state``."""
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
