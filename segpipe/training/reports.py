"""A training run's reports: ``metrics.csv`` (one row per epoch) and ``progress.png`` (the same
history drawn, see plots.py), the one line per epoch, and the throttle that keeps drawing cheap."""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import StateError
from ..io.atomic import write_text
from ..workspace import LAST, METRICS_FILE, PROGRESS_FILE
from .plots import write_progress_png

#: progress.png (about a second to draw) is redrawn at an epoch's end once PROGRESS_COST_RATIO times
#: its last drawing time has passed since (so drawing costs at most 1/20 of the run), at least every
#: PROGRESS_INTERVAL seconds, and always at the end: every epoch when epochs are long, every few
#: epochs when they take a second
PROGRESS_COST_RATIO = 20.0
PROGRESS_INTERVAL = 30.0


def metrics_csv(history: Mapping[str, list[Any]], class_names: list[str]) -> str:
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
        write_text(run_dir / METRICS_FILE, metrics_csv(history, class_names))
    try:
        write_progress_png(run_dir / PROGRESS_FILE, history, class_names=class_names, title=title)
    except StateError as exc:  # matplotlib missing: the run goes on without its picture
        logging.getLogger("segpipe").warning("%s", exc)


def epoch_line(m: Any) -> str:
    h = m.history
    dice = " ".join(f"{v:.3f}" for v in h["pseudo_dice"][-1]) if h["pseudo_dice"] else ""
    return (
        f"epoch {m.completed_epochs}/{m.planned_epochs}  train_loss {h['train_loss'][-1]:.4f}  "
        f"val_loss {h['val_loss'][-1]:.4f}  pseudo-Dice {dice} (EMA {h['ema_fg_dice'][-1]:.3f})  "
        f"lr {h['lr'][-1]:.2e}  {h['epoch_seconds'][-1]:.1f} s"
    )


def repair_reports(run_dir: Path, state: Mapping[str, Any], class_names: list[str], title: str) -> None:
    """Redraw metrics.csv and progress.png of a finished run when a kill left them missing or older
    than its last checkpoint (they are written right after it)."""
    stamp = (run_dir / LAST).stat().st_mtime
    stale = [
        n for n in (METRICS_FILE, PROGRESS_FILE) if not (run_dir / n).is_file() or (run_dir / n).stat().st_mtime < stamp
    ]
    if stale and state.get("history"):
        write_reports(run_dir, state["history"], class_names, title=title)


class ProgressDrawer:
    """Redraws ``progress.png`` at an epoch's end when it is due: once :data:`PROGRESS_COST_RATIO`
    times the last drawing's time has passed since it (at most :data:`PROGRESS_INTERVAL` seconds),
    and always when ``force`` (the run's last epoch)."""

    def __init__(self, run_dir: Path, title: str | None = None):
        self.run_dir, self.title = Path(run_dir), title
        self.drawn_at: float | None = None
        self.draw_seconds = 1.0  # the last drawing's time (a first guess before one)

    def draw(self, module: Any, *, force: bool) -> None:
        now = time.perf_counter()
        wait = min(PROGRESS_INTERVAL, PROGRESS_COST_RATIO * self.draw_seconds)
        if force or self.drawn_at is None or now - self.drawn_at >= wait:
            write_reports(self.run_dir, module.history, module.class_names, title=self.title, metrics=False)
            self.drawn_at = time.perf_counter()
            self.draw_seconds = self.drawn_at - now
