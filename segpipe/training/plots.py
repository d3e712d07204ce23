"""``progress.png`` of a training run: losses and pseudo-Dice, epoch time and learning rate over the epochs.

The picture nnU-Net draws after each epoch, three panels sharing the epoch axis:

1. train and validation loss (left axis) with the pseudo-Dice (right axis): the mean over the
   foreground classes, its exponential moving average (what picks the best checkpoint) and, thin,
   each class;
2. the wall time of each epoch;
3. the learning rate.

:func:`write_progress_png` takes the history as the training module keeps it (a mapping of per-epoch
lists: ``epoch``, ``train_loss``, ``val_loss``, ``pseudo_dice``, ``mean_fg_dice``, ``ema_fg_dice``,
``lr``, ``epoch_seconds``) or as a list of per-epoch dicts with those keys; every key but ``epoch``
may be missing (its curve is left out) and values may be NaN (a gap). :func:`read_metrics_csv`
reads a run's ``metrics.csv`` into that list, so a picture can be redrawn from the CSV alone.

Only matplotlib's object-oriented API is used (a :class:`matplotlib.figure.Figure` rendered by
Agg), so drawing never changes the pyplot backend of a notebook or script; matplotlib is imported
when a picture is drawn. The PNG is written atomically and holds no timestamp.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError, StateError

__all__ = ["PROGRESS_FILE", "history_rows", "read_metrics_csv", "write_progress_png"]

PROGRESS_FILE = "progress.png"
PROGRESS_DPI = 100
FIG_WIDTH, FIG_HEIGHT = 10.0, 11.0  # inches
MARKERS_UP_TO = 40  # epochs drawn with point markers (a single epoch is a point, not a line)
SERIES = ("train_loss", "val_loss", "mean_fg_dice", "ema_fg_dice", "lr", "epoch_seconds")
ALIASES = {"seconds": "epoch_seconds"}  # metrics.csv's column name
DICE_PREFIX = "dice_"

Row = dict[str, Any]
History = Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]


# ============================================================================ history
def _number(value: Any) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _dice_values(value: Any) -> dict[str, float] | list[float]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, Mapping):
        return {str(k): _number(v) for k, v in value.items()}
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [_number(value)]
    return [_number(v) for v in value]


def history_rows(history: History) -> list[Row]:
    """The history as a list of per-epoch dicts with every key present: ``epoch`` (int), the series of
    :data:`SERIES` (floats, NaN where missing) and ``pseudo_dice`` (a list of per-class values, or a
    ``{class name: value}`` dict). Accepts the module's mapping of per-epoch lists or a list of dicts."""
    if isinstance(history, Mapping):
        n = max((len(v) for v in history.values() if isinstance(v, Sequence)), default=0)
        records: list[Mapping[str, Any]] = [
            {k: v[i] for k, v in history.items() if isinstance(v, Sequence) and i < len(v)} for i in range(n)
        ]
    elif isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        records = list(history)
    else:
        raise DataError(f"a training history is a mapping of lists or a list of dicts, got {type(history).__name__}")
    rows: list[Row] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise DataError(f"epoch record {i} of the training history is a {type(rec).__name__}, not a dict")
        rec = {ALIASES.get(k, k): v for k, v in rec.items()}
        epoch = _number(rec.get("epoch", i))
        row: Row = {"epoch": int(epoch) if math.isfinite(epoch) else i}
        for key in SERIES:
            row[key] = _number(rec.get(key))
        row["pseudo_dice"] = _dice_values(rec.get("pseudo_dice"))
        if math.isnan(row["mean_fg_dice"]):  # per-class values only: their mean over the classes present
            values = [v for v in _class_values(row["pseudo_dice"]) if not math.isnan(v)]
            row["mean_fg_dice"] = sum(values) / len(values) if values else math.nan
        rows.append(row)
    return rows


def _class_values(dice: dict[str, float] | list[float]) -> list[float]:
    return list(dice.values()) if isinstance(dice, dict) else list(dice)


def read_metrics_csv(path: str | os.PathLike[str]) -> list[Row]:
    """A run's ``metrics.csv`` as :func:`history_rows` gives it: per epoch ``epoch``, the losses, ``pseudo_dice``
    (``{class name: value}`` from the ``dice_<name>`` columns), ``mean_fg_dice``, ``ema_fg_dice``, ``lr``,
    ``epoch_seconds`` (the ``seconds`` column). Empty cells are NaN; unknown columns are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise StateError(
            f"{p}: cannot read the training metrics ({exc.strerror or exc})",
            hint="train the fold first (`segpipe train fold=0`); metrics.csv is written after each epoch",
        ) from None
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "epoch" not in reader.fieldnames:
        raise DataError(f"{p}: not a training metrics file (no 'epoch' column)", hint="give the run's metrics.csv")
    dice_columns = [c for c in reader.fieldnames if c.startswith(DICE_PREFIX)]
    records = []
    for line in reader:
        rec: dict[str, Any] = {k: v for k, v in line.items() if k is not None and not k.startswith(DICE_PREFIX)}
        rec["pseudo_dice"] = {c[len(DICE_PREFIX) :]: line.get(c) for c in dice_columns}
        records.append(rec)
    return history_rows(records)


# ============================================================================ drawing
def _plot(ax: Any, x: list[int], y: list[float], **style: Any) -> bool:
    """Draw ``y`` over ``x`` unless it is all NaN; point markers for short runs."""
    if not any(math.isfinite(v) for v in y):
        return False
    if len(x) <= MARKERS_UP_TO:
        style.setdefault("marker", "o")
        style.setdefault("markersize", 3)
    ax.plot(x, y, **style)
    return True


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def _class_series(rows: list[Row], class_names: Sequence[str] | None) -> list[tuple[str, list[float]]]:
    """(label, values over the epochs) per class: dict-valued ``pseudo_dice`` is keyed by name, a list's
    entry j is ``class_names[j]`` (else ``class j+1``, the foreground label)."""
    keys: list[str | int] = []
    for row in rows:
        dice = row["pseudo_dice"]
        for k in list(dice) if isinstance(dice, dict) else range(len(dice)):
            if k not in keys:
                keys.append(k)
    series = []
    for key in keys:
        values = []
        for row in rows:
            dice = row["pseudo_dice"]
            if isinstance(dice, dict):
                values.append(dice.get(str(key), math.nan))
            else:
                values.append(dice[key] if isinstance(key, int) and key < len(dice) else math.nan)
        if isinstance(key, str):
            label = key
        elif class_names is not None and key < len(class_names):
            label = str(class_names[key])
        else:
            label = f"class {key + 1}"
        series.append((label, values))
    return series


def write_progress_png(
    path: str | os.PathLike[str],
    history: History,
    *,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Draw the run's ``progress.png`` from ``history`` (see the module's docstring) and write it atomically.

    ``class_names``: names of the foreground classes, in the order of a list-valued ``pseudo_dice`` (a
    dict-valued one names its classes itself). ``title``: the figure's heading (e.g. the run folder).
    An empty history draws empty panels. Returns ``path``.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise StateError(
            "matplotlib is not installed, so progress.png cannot be drawn",
            hint="install it (`pip install matplotlib`, a segpipe dependency)",
        ) from None
    from ..io.atomic import atomic_path

    rows = history_rows(history)
    x = [row["epoch"] for row in rows]

    def col(key: str) -> list[float]:
        return [row[key] for row in rows]

    fig = Figure(figsize=(FIG_WIDTH, FIG_HEIGHT), dpi=PROGRESS_DPI)
    # fixed margins in inches: a layout engine costs more than the drawing
    fig.subplots_adjust(
        left=0.9 / FIG_WIDTH,
        right=1 - 0.9 / FIG_WIDTH,
        bottom=0.6 / FIG_HEIGHT,
        top=1 - 0.7 / FIG_HEIGHT,
        hspace=0.28,
    )
    ax_loss, ax_time, ax_lr = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1, 1]})
    ax_dice = ax_loss.twinx()

    drawn_loss = _plot(ax_loss, x, col("train_loss"), color="tab:blue", linewidth=2, label="train loss")
    drawn_loss |= _plot(ax_loss, x, col("val_loss"), color="tab:red", linewidth=2, label="validation loss")
    ax_loss.set_ylabel("loss")
    drawn_dice = False
    for label, values in _class_series(rows, class_names):
        drawn_dice |= _plot(ax_dice, x, values, linewidth=0.8, alpha=0.6, label=f"pseudo-Dice {label}")
    drawn_dice |= _plot(
        ax_dice, x, col("mean_fg_dice"), color="tab:green", linestyle=":", linewidth=2, label="pseudo-Dice"
    )
    drawn_dice |= _plot(ax_dice, x, col("ema_fg_dice"), color="tab:green", linewidth=2.5, label="pseudo-Dice (EMA)")
    ax_dice.set_ylabel("pseudo-Dice")
    ax_dice.set_ylim(0.0, 1.0)
    handles = ax_loss.get_legend_handles_labels()
    dice_handles = ax_dice.get_legend_handles_labels()
    if drawn_loss or drawn_dice:
        ax_loss.legend(
            handles[0] + dice_handles[0], handles[1] + dice_handles[1], loc="best", fontsize=8, framealpha=0.8
        )
    else:
        _empty(ax_loss, "no loss or pseudo-Dice recorded")
    ax_loss.set_title("losses and pseudo-Dice")
    ax_loss.grid(alpha=0.3)

    if not _plot(ax_time, x, col("epoch_seconds"), color="tab:purple", linewidth=2):
        _empty(ax_time, "no epoch time recorded")
    ax_time.set_ylabel("seconds")
    ax_time.set_title("epoch duration")
    ax_time.set_ylim(bottom=0.0)
    ax_time.grid(alpha=0.3)

    if not _plot(ax_lr, x, col("lr"), color="tab:orange", linewidth=2):
        _empty(ax_lr, "no learning rate recorded")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("learning rate")
    ax_lr.set_xlabel("epoch")
    ax_lr.grid(alpha=0.3)
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    if x:
        ax_lr.set_xlim(min(x) - 0.5, max(x) + 0.5)

    heading = f"{title}: " if title else ""
    last = rows[-1] if rows else None
    if last is None:
        heading += "no epoch yet"
    else:
        heading += f"{len(rows)} epoch{'s' if len(rows) != 1 else ''}"
        ema = last["ema_fg_dice"]
        if math.isfinite(ema):
            heading += f", pseudo-Dice EMA {ema:.4f}"
    fig.suptitle(heading, fontsize=12, y=1 - 0.2 / FIG_HEIGHT)

    target = Path(path)
    with atomic_path(target, ext=".png") as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None, "Title": "segpipe training progress"})
    return target
