"""``progress.png`` of a training run: losses and pseudo-Dice, epoch time and learning rate over the epochs.

The picture nnU-Net draws after each epoch, three panels sharing the epoch axis:

1. train and validation loss (left axis) with the pseudo-Dice (right axis): the mean over the
   foreground classes, its exponential moving average (what picks the best checkpoint) and, thin,
   each class; and the full-case validation Dice (the sliding-window prediction of whole
   validation cases) as points at the epochs that ran one: the foreground mean (black diamonds)
   and each class (hollow, in its pseudo-Dice colour);
2. the wall time of each epoch;
3. the learning rate.

Epochs are numbered from 1, as the training log numbers them (``epoch 1/12`` is the first): the
history's ``epoch`` counts the epochs completed before it, from 0, as the training module records it
and ``metrics.csv`` writes it, and is drawn at ``epoch + 1``. The legend sits to the right of the
panels, clear of the curves.

:func:`write_progress_png` takes the history as the training module keeps it (a mapping of per-epoch
lists: ``epoch``, ``train_loss``, ``val_loss``, ``pseudo_dice``, ``mean_fg_dice``, ``ema_fg_dice``,
``val_dice``, ``val_class_dice``, ``lr``, ``epoch_seconds``) or as a list of per-epoch dicts with those
keys; every key but ``epoch`` may be missing (its curve is left out) and values may be NaN (a gap;
``val_dice`` is NaN at the epochs without a full-case validation). :func:`read_metrics_csv` reads a
run's ``metrics.csv`` into that list, so a picture can be redrawn from the CSV alone;
:func:`progress_figure` returns the figure without writing it.

Only matplotlib's object-oriented API is used (a :class:`matplotlib.figure.Figure` rendered by
Agg), so drawing never changes the pyplot backend of a notebook or script; matplotlib is imported
when a picture is drawn. The PNG is written atomically and holds no timestamp.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, StateError
from ..workspace import PROGRESS_FILE

__all__ = ["PROGRESS_FILE", "history_rows", "progress_figure", "read_metrics_csv", "write_progress_png"]

PROGRESS_DPI = 100
FIG_WIDTH, FIG_HEIGHT = 12.0, 11.0  # inches
#: margins in inches: the right one holds the Dice axis's labels and, beside them, the legend
LEFT_IN, RIGHT_IN, LEGEND_GAP_IN = 0.9, 3.1, 0.8
LEGEND_LABEL_CHARS = 30  # longer legend labels (long class names) are shortened with "…"
MARKERS_UP_TO = 40  # epochs drawn with point markers (a single epoch is a point, not a line)
SERIES = ("train_loss", "val_loss", "mean_fg_dice", "ema_fg_dice", "val_dice", "lr", "epoch_seconds")
CLASS_SERIES = ("pseudo_dice", "val_class_dice")
ALIASES = {"seconds": "epoch_seconds"}  # metrics.csv's column name
DICE_PREFIX = "dice_"  # metrics.csv: pseudo-Dice per class
VAL_DICE_PREFIX = "val_dice_"  # metrics.csv: full-case validation Dice per class

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
    """The history as a list of per-epoch dicts with every key present: ``epoch`` (int, counting completed
    epochs from 0), the series of :data:`SERIES` (floats, NaN where missing) and ``pseudo_dice`` and
    ``val_class_dice`` (each a list of per-class values, or a ``{class name: value}`` dict). Accepts the
    module's mapping of per-epoch lists or a list of dicts."""
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
        for classes, mean in (("pseudo_dice", "mean_fg_dice"), ("val_class_dice", "val_dice")):
            row[classes] = _dice_values(rec.get(classes))
            if math.isnan(row[mean]):  # per-class values only: their mean over the classes present
                values = [v for v in _class_values(row[classes]) if not math.isnan(v)]
                row[mean] = sum(values) / len(values) if values else math.nan
        rows.append(row)
    return rows


def _class_values(dice: dict[str, float] | list[float]) -> list[float]:
    return list(dice.values()) if isinstance(dice, dict) else list(dice)


def read_metrics_csv(path: str | os.PathLike[str]) -> list[Row]:
    """A run's ``metrics.csv`` as :func:`history_rows` gives it: per epoch ``epoch``, the losses, ``pseudo_dice``
    (``{class name: value}`` from the ``dice_<name>`` columns), ``mean_fg_dice``, ``ema_fg_dice``, the
    full-case validation's ``val_dice`` and ``val_class_dice`` (from the ``val_dice_<name>`` columns),
    ``lr``, ``epoch_seconds`` (the ``seconds`` column). Empty cells are NaN; unknown columns are skipped."""
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
    per_class = {"pseudo_dice": DICE_PREFIX, "val_class_dice": VAL_DICE_PREFIX}
    columns = {key: [c for c in reader.fieldnames if c.startswith(prefix)] for key, prefix in per_class.items()}
    records = []
    for line in reader:
        rec: dict[str, Any] = {
            k: v for k, v in line.items() if k is not None and not k.startswith((DICE_PREFIX, VAL_DICE_PREFIX))
        }
        for key, prefix in per_class.items():
            rec[key] = {c[len(prefix) :]: line.get(c) for c in columns[key]}
        records.append(rec)
    return history_rows(records)


# ============================================================================ drawing
def _plot(ax: Any, x: list[int], y: list[float], **style: Any) -> Any:
    """Draw ``y`` over ``x`` unless it is all NaN (then None); point markers for short runs. The line."""
    if not any(math.isfinite(v) for v in y):
        return None
    if len(x) <= MARKERS_UP_TO:
        style.setdefault("marker", "o")
        style.setdefault("markersize", 3)
    return ax.plot(x, y, **style)[0]


def _points(ax: Any, x: list[int], y: list[float], **style: Any) -> Any:
    """Draw the finite values of ``y`` only, as points joined in order (a value every few epochs): the line,
    or None when there is none."""
    kept = [(a, b) for a, b in zip(x, y) if math.isfinite(b)]
    if not kept:
        return None
    return ax.plot([a for a, _ in kept], [b for _, b in kept], **style)[0]


def _short(label: str) -> str:
    return label if len(label) <= LEGEND_LABEL_CHARS else label[: LEGEND_LABEL_CHARS - 1] + "…"


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def _class_series(
    rows: list[Row], class_names: Sequence[str] | None, field: str = "pseudo_dice"
) -> list[tuple[str, list[float]]]:
    """(label, values over the epochs) per class of ``field``: a dict-valued one is keyed by name, a list's
    entry j is ``class_names[j]`` (else ``class j+1``, the foreground label)."""
    keys: list[str | int] = []
    for row in rows:
        dice = row[field]
        for k in list(dice) if isinstance(dice, dict) else range(len(dice)):
            if k not in keys:
                keys.append(k)
    series = []
    for key in keys:
        values = []
        for row in rows:
            dice = row[field]
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
    from ..io.atomic import atomic_path

    fig = progress_figure(history, class_names=class_names, title=title)
    target = Path(path)
    with atomic_path(target, ext=".png") as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None, "Title": "segpipe training progress"})
    return target


@dataclass(frozen=True)
class _Epochs:
    """The history's rows with the epoch axis they are drawn on (numbered from 1, as the training log numbers them)."""

    rows: list[Row]
    x: list[int]

    def column(self, key: str) -> list[float]:
        """The values of ``key`` over the epochs."""
        return [row[key] for row in self.rows]


def _keep(legend: list[Any], line: Any) -> bool:
    """Add a drawn line to the legend's handles; False when nothing was drawn."""
    if line is None:
        return False
    legend.append(line)
    return True


def _progress_axes(fig: Any) -> tuple[Any, Any, Any, Any]:
    """The loss, epoch-time and learning-rate panels, sharing the epoch axis, and the Dice axis over the loss panel."""
    # fixed margins in inches: a layout engine costs more than the drawing
    fig.subplots_adjust(
        left=LEFT_IN / FIG_WIDTH,
        right=1 - RIGHT_IN / FIG_WIDTH,
        bottom=0.6 / FIG_HEIGHT,
        top=1 - 0.7 / FIG_HEIGHT,
        hspace=0.28,
    )
    ax_loss, ax_time, ax_lr = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1, 1]})
    return ax_loss, ax_time, ax_lr, ax_loss.twinx()


def _draw_losses(ax_loss: Any, epochs: _Epochs, legend: list[Any]) -> bool:
    """The train and validation loss; whether either was drawn."""
    x = epochs.x
    drawn = _keep(
        legend, _plot(ax_loss, x, epochs.column("train_loss"), color="tab:blue", linewidth=2, label="train loss")
    )
    drawn |= _keep(
        legend, _plot(ax_loss, x, epochs.column("val_loss"), color="tab:red", linewidth=2, label="validation loss")
    )
    ax_loss.set_ylabel("loss")
    return drawn


def _draw_pseudo_dice(
    ax_dice: Any, epochs: _Epochs, class_names: Sequence[str] | None, legend: list[Any]
) -> tuple[bool, dict[str, Any]]:
    """The pseudo-Dice of each class (thin), their mean and its EMA; whether any was drawn, and each class's colour."""
    x = epochs.x
    drawn = False
    colours: dict[str, Any] = {}
    for label, values in _class_series(epochs.rows, class_names):
        line = _plot(ax_dice, x, values, linewidth=0.8, alpha=0.6, label=f"pseudo-Dice {label}")
        if _keep(legend, line):
            drawn, colours[label] = True, line.get_color()
    drawn |= _keep(
        legend,
        _plot(
            ax_dice,
            x,
            epochs.column("mean_fg_dice"),
            color="tab:green",
            linestyle=":",
            linewidth=2,
            label="pseudo-Dice",
        ),
    )
    drawn |= _keep(
        legend,
        _plot(ax_dice, x, epochs.column("ema_fg_dice"), color="tab:green", linewidth=2.5, label="pseudo-Dice (EMA)"),
    )
    return drawn, colours


def _draw_full_case_dice(
    ax_dice: Any, epochs: _Epochs, class_names: Sequence[str] | None, colours: dict[str, Any], legend: list[Any]
) -> bool:
    """The full-case validation: points at the epochs that ran one; each class in its pseudo-Dice colour
    (one legend entry says so), the foreground mean as black diamonds. Whether any was drawn."""
    x = epochs.x
    drawn = False
    per_class = []
    for label, values in _class_series(epochs.rows, class_names, "val_class_dice"):
        colour = colours.get(label)
        style = {"color": colour} if colour is not None else {}
        line = _points(
            ax_dice,
            x,
            values,
            linestyle="none",
            marker="o",
            markersize=6,
            markerfacecolor="none",
            markeredgewidth=1.5,
            label=f"full-case Dice {label}",
            **style,
        )
        if line is not None:
            per_class.append(line)
    if per_class:
        from matplotlib.lines import Line2D

        drawn = True
        legend.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker="o",
                markersize=6,
                markerfacecolor="none",
                markeredgewidth=1.5,
                color="0.35",
                label="full-case Dice per class",
            )
        )
    drawn |= _keep(
        legend,
        _points(
            ax_dice,
            x,
            epochs.column("val_dice"),
            color="black",
            linewidth=1,
            marker="D",
            markersize=6,
            label="full-case validation Dice",
            zorder=5,
        ),
    )
    return drawn


def _finish_loss_panel(ax_loss: Any, ax_dice: Any, legend: list[Any], drawn: bool) -> None:
    """The Dice axis's range, the legend to the right of the panels (or a note that nothing was recorded),
    the panel's title and grid."""
    ax_dice.set_ylabel("Dice")
    ax_dice.set_ylim(0.0, 1.0)
    if drawn:
        # to the right of the panels, beyond the Dice axis's labels: never over a curve
        ax_loss.legend(
            legend,
            [_short(h.get_label()) for h in legend],
            loc="upper left",
            bbox_to_anchor=(1 + LEGEND_GAP_IN / (FIG_WIDTH - LEFT_IN - RIGHT_IN), 1.0),
            borderaxespad=0.0,
            fontsize=8,
        )
    else:
        _empty(ax_loss, "no loss or pseudo-Dice recorded")
    ax_loss.set_title("losses and Dice")
    ax_loss.grid(alpha=0.3)


def _draw_epoch_time(ax_time: Any, epochs: _Epochs) -> None:
    """The wall time of each epoch."""
    if not _plot(ax_time, epochs.x, epochs.column("epoch_seconds"), color="tab:purple", linewidth=2):
        _empty(ax_time, "no epoch time recorded")
    ax_time.set_ylabel("seconds")
    ax_time.set_title("epoch duration")
    ax_time.set_ylim(bottom=0.0)
    ax_time.grid(alpha=0.3)


def _draw_learning_rate(ax_lr: Any, epochs: _Epochs) -> None:
    """The learning rate, with the epoch axis all panels share: whole epochs only."""
    from matplotlib.ticker import MaxNLocator

    x = epochs.x
    if not _plot(ax_lr, x, epochs.column("lr"), color="tab:orange", linewidth=2):
        _empty(ax_lr, "no learning rate recorded")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("learning rate")
    ax_lr.set_xlabel("epoch")
    ax_lr.grid(alpha=0.3)
    # whole epochs only, one tick where a run has one epoch
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax_lr.set_xlim(min(x, default=1) - 0.5, max(x, default=1) + 0.5)


def _heading(epochs: _Epochs, title: str | None) -> str:
    """The figure's heading: the title, the epochs run, the last pseudo-Dice EMA and full-case validation Dice."""
    rows = epochs.rows
    heading = f"{title}: " if title else ""
    last = rows[-1] if rows else None
    if last is None:
        heading += "no epoch yet"
    else:
        heading += f"{len(rows)} epoch{'s' if len(rows) != 1 else ''}"
        ema = last["ema_fg_dice"]
        if math.isfinite(ema):
            heading += f", pseudo-Dice EMA {ema:.4f}"
        validated = [(e, v) for e, v in zip(epochs.x, epochs.column("val_dice")) if math.isfinite(v)]
        if validated:
            heading += f", full-case validation Dice {validated[-1][1]:.4f} (epoch {validated[-1][0]})"
    return heading


def progress_figure(history: History, *, class_names: Sequence[str] | None = None, title: str | None = None) -> Any:
    """The :class:`matplotlib.figure.Figure` that :func:`write_progress_png` writes (same arguments)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise StateError(
            "matplotlib is not installed, so progress.png cannot be drawn",
            hint="install it (`pip install matplotlib`, a segpipe dependency)",
        ) from None

    rows = history_rows(history)
    epochs = _Epochs(rows, [row["epoch"] + 1 for row in rows])
    fig = Figure(figsize=(FIG_WIDTH, FIG_HEIGHT), dpi=PROGRESS_DPI)
    ax_loss, ax_time, ax_lr, ax_dice = _progress_axes(fig)
    legend: list[Any] = []  # the handles the legend lists, in its order
    drawn_loss = _draw_losses(ax_loss, epochs, legend)
    drawn_dice, colours = _draw_pseudo_dice(ax_dice, epochs, class_names, legend)
    drawn_dice |= _draw_full_case_dice(ax_dice, epochs, class_names, colours, legend)
    _finish_loss_panel(ax_loss, ax_dice, legend, drawn_loss or drawn_dice)
    _draw_epoch_time(ax_time, epochs)
    _draw_learning_rate(ax_lr, epochs)
    fig.suptitle(_heading(epochs, title), fontsize=12, y=1 - 0.2 / FIG_HEIGHT)
    return fig
