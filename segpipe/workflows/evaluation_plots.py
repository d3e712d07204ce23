"""The pictures of a folder evaluation (:mod:`segpipe.workflows.evaluate`): ``dice_boxplot.png`` and
the QC overlays ``qc/<case>.png`` (see that module's docstring for what they show)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, StateError
from ..geometry import Geometry
from ..io.atomic import atomic_path
from ..io.image import read_image

BACKGROUND = 0
QC_FOLDER = "qc"
#: QC contour colours, class 1 first (class c gets entry (c - 1) mod 10): bright on a grey image
CLASS_COLOURS = (
    "#ff3355",
    "#33dd55",
    "#3399ff",
    "#ffcc00",
    "#ff66ff",
    "#00e5e5",
    "#ff8800",
    "#aa77ff",
    "#aaff33",
    "#ffaaaa",
)
#: QC contours: the reference wide and translucent, the prediction thin and dashed on top of it
REF_WIDTH, REF_ALPHA, PRED_WIDTH = 3.4, 0.45, 1.4
PNG_DPI = 100

Record = dict[str, float]


@dataclass
class CaseLabels:
    """One case's reference and predicted label maps on the reference's grid, with its scores per class."""

    case: str
    ref: np.ndarray
    pred: np.ndarray
    geometry: Geometry
    records: Mapping[int, Record]


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise StateError(
            "matplotlib is not installed, so the evaluation plots cannot be drawn",
            hint="install it (`pip install matplotlib`, a segpipe dependency)",
        ) from None
    return Figure(figsize=(width, height), dpi=PNG_DPI)


def _save(fig: Any, path: Path, title: str) -> Path:
    with atomic_path(path, ext=".png") as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None, "Title": title})
    return path


def _class_name(c: int, names: Mapping[int, str]) -> str:
    return f"{c} {names[c]}" if c in names else str(c)


def write_boxplot(path: Path, ev: Any) -> Path:
    """``dice_boxplot.png`` of an :class:`~segpipe.workflows.evaluate.Evaluation`: per foreground class,
    a box plot (with the cases as points) of Dice and, below, of HD95."""
    cases, classes, names, results = ev.cases, ev.classes, ev.names, ev.results
    foreground = [c for c in classes if c != BACKGROUND]
    fig = _figure(max(6.0, 1.5 + 0.9 * len(foreground)), 7.0)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.92, bottom=0.14, hspace=0.12)
    ax_dice, ax_hd = fig.subplots(2, 1, sharex=True)
    positions = list(range(1, len(foreground) + 1))
    for ax, key, ylabel in ((ax_dice, "Dice", "Dice"), (ax_hd, "HD95", "HD95 (mm)")):
        data = [[v for v in (results[case][c][key] for case in cases) if math.isfinite(v)] for c in foreground]
        drawn = [(x, d) for x, d in zip(positions, data) if d]
        if drawn:
            ax.boxplot([d for _, d in drawn], positions=[x for x, _ in drawn], widths=0.5, showfliers=False)
            for x, d in drawn:
                offsets = np.linspace(-0.12, 0.12, len(d)) if len(d) > 1 else np.zeros(1)
                ax.scatter(x + offsets, d, s=10, color="tab:blue", alpha=0.6, zorder=3)
        else:
            ax.text(0.5, 0.5, "no values", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    ax_dice.set_ylim(-0.02, 1.02)
    ax_hd.set_xlim(0.4, len(foreground) + 0.6)
    ax_hd.set_xticks(positions, [_class_name(c, names) for c in foreground], rotation=20, ha="right")
    fig.suptitle(f"per-case Dice and HD95 of {len(cases)} case(s)")
    return _save(fig, path, "segpipe evaluation")


def qc_slices(mask: np.ndarray) -> list[int]:
    """Three indices along axis 0: the foreground's centre and halfway from it to its first and last slice."""
    per_slice = mask.reshape(mask.shape[0], -1).sum(axis=1)
    n = mask.shape[0]
    if not per_slice.any():
        return [n // 4, n // 2, (3 * n) // 4]
    hit = np.flatnonzero(per_slice)
    lo, hi = int(hit[0]), int(hit[-1])
    centre = int(round(float(np.dot(np.arange(n), per_slice)) / float(per_slice.sum())))
    return [(lo + centre) // 2, centre, (centre + hi + 1) // 2]


def _class_colour(c: int) -> str:
    return CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]


def _dice_text(c: int, record: Record | None, names: Mapping[int, str]) -> str:
    dice = math.nan if record is None else record["Dice"]
    return f"{_class_name(c, names)} {'n/a' if math.isnan(dice) else f'{dice:.3f}'}"


def write_qc(
    path: Path, labels: CaseLabels, image_path: Path, *, names: Mapping[int, str], ignore_label: int | None
) -> Path:
    """``qc/<case>.png``: three slices of the image with each class's reference and prediction contours."""
    case = labels.case
    image, geo = read_image(image_path)
    diffs = geo.differences(labels.geometry, names=("image", "reference"))
    if diffs:
        raise DataError(
            f"case {case}: the image {image_path} is not on the voxel grid of its reference ({'; '.join(diffs)})",
            hint="give the images the references were drawn on (qc_image_dir)",
        )
    fig = _qc_figure(labels, image[0], names=names, ignore_label=ignore_label)
    return _save(fig, path, f"segpipe QC {case}")


def _qc_figure(labels: CaseLabels, volume: np.ndarray, *, names: Mapping[int, str], ignore_label: int | None) -> Any:
    """The QC figure of one case (see :mod:`segpipe.workflows.evaluate`) over its image ``volume``."""
    case, ref, pred, spacing, records = labels.case, labels.ref, labels.pred, labels.geometry.spacing, labels.records
    from matplotlib.lines import Line2D

    foreground = [c for c in sorted(records) if c not in (BACKGROUND, ignore_label)]
    ref_fg = np.isin(ref, foreground)
    slices = qc_slices(ref_fg if ref_fg.any() else np.isin(pred, foreground))
    shown = volume[slices].astype(np.float32)
    lo, hi = (float(v) for v in np.percentile(shown, [0.5, 99.5]))
    fig = _figure(12.0, 4.9)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.84, bottom=0.15, wspace=0.04)
    aspect = spacing[1] / spacing[2]
    ny, nx = volume.shape[1:]
    ys, xs = np.arange(-1, ny + 1), np.arange(-1, nx + 1)
    for ax, z, plane in zip(fig.subplots(1, 3), slices, shown):
        ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="nearest")
        # each class in its colour: the reference wide and translucent, so it shows beside the dashed
        # prediction where the two coincide; masks padded with background so a structure touching the
        # image's edge gets a closed contour
        for label_map, style in (
            (ref, {"linewidths": REF_WIDTH, "alpha": REF_ALPHA}),
            (pred, {"linewidths": PRED_WIDTH, "linestyles": "--"}),
        ):
            for c in foreground:
                mask = np.pad(label_map[z] == c, 1).astype(np.float32)
                if mask.any():
                    ax.contour(xs, ys, mask, levels=[0.5], colors=[_class_colour(c)], **style)
        ax.set_xlim(-0.5, nx - 0.5)
        ax.set_ylim(ny - 0.5, -0.5)
        ax.set_title(f"axis 0 (z), slice {z} of {volume.shape[0]}", fontsize=9)
        ax.set_axis_off()
    handles = [
        Line2D([], [], color=_class_colour(c), linewidth=REF_WIDTH, label=_class_name(c, names)) for c in foreground
    ]
    handles += [
        Line2D([], [], color="0.55", linewidth=REF_WIDTH, alpha=REF_ALPHA, label="reference"),
        Line2D([], [], color="0.55", linewidth=PRED_WIDTH, linestyle="--", label="prediction"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False, fontsize=9)
    fig.text(
        0.99,
        0.005,
        "slices of array axis 0 (z), indices from 0; rows y, columns x",
        ha="right",
        va="bottom",
        fontsize=7,
        color="0.4",
    )
    dice = ", ".join(_dice_text(c, records.get(c), names) for c in foreground)
    foreground_dice = [records[c]["Dice"] for c in foreground if not math.isnan(records[c]["Dice"])]
    mean = f" (mean {sum(foreground_dice) / len(foreground_dice):.3f})" if len(foreground_dice) > 1 else ""
    fig.suptitle(f"{case}\nDice {dice}{mean}" if foreground else case, fontsize=11)
    return fig
