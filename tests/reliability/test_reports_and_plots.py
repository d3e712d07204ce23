"""Reliability: the pictures segpipe draws for people — ``progress.png`` of a training run, the QC
overlays and class names of ``segpipe evaluate``, and ``dataset_report.png`` of ``segpipe plan`` —
show what their data holds, readably, on real data.

Each test is one case of the reliability list; its docstring's first line says the behaviour. The
figures are checked through their data (lines, labels, limits, legend and artist positions), not
their pixels.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segpipe import cli
from segpipe.io.image import read_image, write_image

#: real hippocampus cases mixing the dataset's intensity ranges: uint8 images (foreground 11-111),
#: float32 images of a few hundred, and float32 images whose foreground reaches 400,000
MIXED_CASES = {
    "uint8": ("hippocampus_033", "hippocampus_034", "hippocampus_065", "hippocampus_319"),
    "float32": ("hippocampus_003", "hippocampus_006"),
    "float32 up to 1.7 M": ("hippocampus_205", "hippocampus_210"),
}
QC_CASES = ("hippocampus_003", "hippocampus_033", "hippocampus_210")


def linked_dataset(hippocampus: Path, folder: Path, cases: list[str]) -> Path:
    """An MSD dataset in ``folder`` of real hippocampus ``cases``, its files linked, not copied."""
    desc = json.loads((hippocampus / "dataset.json").read_text())
    desc.update(
        training=[{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
        test=[],
        numTraining=len(cases),
        numTest=0,
        external_links=True,
    )
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
        for c in cases:
            os.symlink(hippocampus / sub / f"{c}.nii.gz", folder / sub / f"{c}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps(desc))
    return folder


def drawn(fig: Any) -> Any:
    """``fig`` laid out by Agg, so that artists' window extents are final."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


# ============================================================================ progress.png
def training_history(n: int, validated: dict[int, tuple[float, float]]) -> dict[str, list[Any]]:
    """A run's history as :class:`segpipe.training.module.SegmentationModule` keeps it: ``epoch`` counts
    completed epochs from 0; ``validated`` gives the full-case Dice per class at some (0-based) epochs."""
    nan = math.nan
    h: dict[str, list[Any]] = {k: [] for k in ("epoch", "train_loss", "val_loss", "pseudo_dice", "mean_fg_dice")}
    h.update({k: [] for k in ("ema_fg_dice", "lr", "epoch_seconds", "val_dice", "val_class_dice")})
    ema = nan
    for e in range(n):
        dice = [0.4 + 0.08 * e, 0.35 + 0.09 * e]
        mean = sum(dice) / 2
        ema = mean if math.isnan(ema) else 0.9 * ema + 0.1 * mean
        full = validated.get(e)
        h["epoch"].append(e)
        h["train_loss"].append(-0.2 - 0.1 * e)
        h["val_loss"].append(-0.15 - 0.1 * e)
        h["pseudo_dice"].append(dice)
        h["mean_fg_dice"].append(mean)
        h["ema_fg_dice"].append(ema)
        h["lr"].append(0.01 * (1 - e / n) ** 0.9)
        h["epoch_seconds"].append(30.0 + e)
        h["val_dice"].append(sum(full) / 2 if full else nan)
        h["val_class_dice"].append(list(full) if full else [nan, nan])
    return h


def test_progress_png_shows_the_full_case_validation_dice_numbers_epochs_from_1_and_keeps_its_legend_clear(
    tmp_path: Path,
) -> None:
    """`progress.png` shows the full-case validation Dice at the epochs that computed it, numbers epochs from 1 as the log does, keeps its legend clear of the curves and gives a 1-epoch run an axis around epoch 1.

    Drawn from the training module's history and again from the run's `metrics.csv` alone.
    """
    from segpipe.training.plots import progress_figure, read_metrics_csv
    from segpipe.training.reports import write_reports
    from segpipe.workspace import METRICS_FILE

    # validated after the 2nd, 4th and 6th epoch (the log's "epoch 2/6", "epoch 4/6", "epoch 6/6")
    history = training_history(6, {1: (0.6, 0.62), 3: (0.7, 0.72), 5: (0.8, 0.84)})
    write_reports(tmp_path, history, ["Anterior", "Posterior"])
    from_csv = read_metrics_csv(tmp_path / METRICS_FILE)
    for source in (history, from_csv):
        fig = progress_figure(source, class_names=["Anterior", "Posterior"])
        lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
        full = [label for label in lines if "full-case" in label]
        assert full, f"no full-case validation Dice among the curves {sorted(lines)}"
        mean = lines[next(label for label in full if "Anterior" not in label and "Posterior" not in label)]
        assert list(mean.get_xdata()) == [2, 4, 6]  # the epochs that ended with a full-case validation
        assert np.allclose(mean.get_ydata(), [0.61, 0.71, 0.82])
        anterior = lines[next(label for label in full if "Anterior" in label)]
        assert np.allclose(anterior.get_ydata(), [0.6, 0.7, 0.8])
        assert list(lines["train loss"].get_xdata()) == [1, 2, 3, 4, 5, 6]  # as the log counts them

        renderer = drawn(fig)
        legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert legends
        for legend in legends:
            box = legend.get_window_extent(renderer)
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), "the legend covers a panel's curves"

    one = progress_figure(training_history(1, {0: (0.5, 0.55)}))
    drawn(one)
    for ax in one.axes:
        lo, hi = ax.get_xlim()
        assert 0 <= lo < 1 < hi <= 2, f"a 1-epoch run's axis is {lo}..{hi}"
        if ax.get_xticklabels() and any(t.get_text() for t in ax.get_xticklabels()):
            assert [t for t in ax.get_xticks() if lo <= t <= hi] == [1]
    lines = {line.get_label(): line for ax in one.axes for line in ax.get_lines()}
    assert list(lines["train loss"].get_xdata()) == [1]
    assert any("full-case" in label and list(line.get_xdata()) == [1] for label, line in lines.items())


# ============================================================================ segpipe evaluate
@pytest.fixture(scope="module")
def evaluated(hippocampus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`segpipe evaluate` of predictions against a real dataset's labelsTr, with QC overlays: the CLI's
    output, the summary and the QC figures as drawn (captured before they are written)."""
    from segpipe.workflows import evaluation_plots as folder

    tmp = tmp_path_factory.mktemp("evaluate_names")
    data = linked_dataset(hippocampus, tmp / "Hippocampus", list(QC_CASES))
    preds = tmp / "predictions"
    for i, case in enumerate(QC_CASES):
        label, geometry = read_image(data / "labelsTr" / f"{case}.nii.gz")
        pred = np.asarray(label[0]).astype(np.uint8)
        if i == 0:
            pred[pred == 1] = 0  # the first case misses its anterior part
        pred = np.roll(pred, i, axis=1 + i % 2)  # and the others are a voxel or two off
        write_image(preds / f"{case}.nii.gz", pred, geometry)
    figures: dict[str, Any] = {}
    save = folder._save

    def capture(fig: Any, path: Path, title: str) -> Path:
        if path.parent.name == folder.QC_FOLDER:
            figures[path.stem] = fig
        return save(fig, path, title)

    out = tmp / "evaluation"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(folder, "_save", capture)
        code = cli.main(["evaluate", str(preds), str(data / "labelsTr"), "-o", str(out), f"images={data / 'imagesTr'}"])
    assert code == 0
    return {
        "stdout": stdout.getvalue(),
        "summary": json.loads((out / "summary.json").read_text()),
        "csv": (out / "evaluation.csv").read_text(),
        "figures": figures,
        "out": out,
    }


def test_evaluate_against_a_datasets_labels_names_the_classes_from_its_dataset_json(evaluated: dict[str, Any]) -> None:
    """`segpipe evaluate` against a dataset's `labelsTr/` names the classes as its `dataset.json` does, in the printed table, `summary.json` and `evaluation.csv`."""
    assert evaluated["summary"]["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert re.search(r"^\s*1 Anterior\b", evaluated["stdout"], re.M), evaluated["stdout"]
    assert re.search(r"^\s*2 Posterior\b", evaluated["stdout"], re.M), evaluated["stdout"]
    assert ",1,Anterior," in evaluated["csv"] and ",2,Posterior," in evaluated["csv"]
    # the classes scored are still those the label maps hold
    assert set(evaluated["summary"]["mean"]) == {"0", "1", "2"}


def test_qc_overlays_colour_and_name_each_class_and_state_the_case_dice_and_the_slice_axis(
    evaluated: dict[str, Any],
) -> None:
    """QC overlays draw each class in its own colour with a legend naming it (from `dataset.json`), the case's Dice in the title and the axis and index of each slice."""
    from matplotlib.colors import to_hex
    from matplotlib.lines import Line2D

    figures = evaluated["figures"]
    assert sorted(figures) == sorted(QC_CASES)
    per_case = {e["case"]: e["metrics"] for e in evaluated["summary"]["metric_per_case"]}
    for case, fig in figures.items():
        assert (evaluated["out"] / "qc" / f"{case}.png").is_file()
        drawn(fig)
        legend = fig.legends[0] if fig.legends else None
        assert legend is not None
        entries = {t.get_text(): h for t, h in zip(legend.get_texts(), legend.legend_handles)}
        named = {text: h for text, h in entries.items() if "Anterior" in text or "Posterior" in text}
        assert len(named) == 2, f"{case}: the legend names {sorted(entries)}"

        def colour(handle: Any) -> str:
            return to_hex(handle.get_color() if isinstance(handle, Line2D) else handle.get_facecolor())

        class_colours = {colour(h) for h in named.values()}
        assert len(class_colours) == 2, f"{case}: one colour for both classes"
        contours = {to_hex(c) for ax in fig.axes for coll in ax.collections for c in coll.get_edgecolor()}
        assert contours and contours <= class_colours, f"{case}: contours in {contours}, classes {class_colours}"

        title = fig.get_suptitle()
        assert "Dice" in title and case in title
        for c, name in (("1", "Anterior"), ("2", "Posterior")):
            dice = per_case[case][c]["Dice"]
            assert dice is not None and f"{dice:.3f}" in title, f"{case}: {name} Dice {dice} not in {title!r}"
        shape = read_image(evaluated["out"].parent / "Hippocampus" / "labelsTr" / f"{case}.nii.gz")[1].shape
        panels = [ax for ax in fig.axes if ax.get_images()]
        assert len(panels) == 3
        for ax in panels:
            match = re.search(r"axis 0 \(z\), slice (\d+) of (\d+)", ax.get_title())
            assert match, f"{case}: the panel title {ax.get_title()!r} does not say which slice along which axis"
            assert int(match.group(2)) == shape[0] and 0 <= int(match.group(1)) < shape[0]


# ============================================================================ dataset_report.png
def test_dataset_report_shows_every_cases_intensity_range_when_ranges_differ_by_10000_times(
    hippocampus: Path, tmp_path: Path
) -> None:
    """`dataset_report.png` draws each case's foreground intensity range, sorted, on a scale where every case shows: real hippocampus cases of 20-110 (uint8) beside float32 ones of 200-1000 and up to 430,000.

    The cases are sorted by their median intensity; a pooled histogram of such data is one bar.
    """
    from segpipe.fingerprint import compute_fingerprint
    from segpipe.io.datasets import load_dataset
    from segpipe.planning.report import dataset_report_figure, write_dataset_report

    cases = sorted(c for group in MIXED_CASES.values() for c in group)
    data = linked_dataset(hippocampus, tmp_path / "HippocampusMixed", cases)
    fp = compute_fingerprint(load_dataset(data), num_workers=1)
    per_case = {c["id"]: c["foreground_intensity"][0] for c in fp["cases"]}
    assert max(s["max"] for s in per_case.values()) > 1e5 > 200 > min(s["max"] for s in per_case.values())

    fig = dataset_report_figure(fp)
    renderer = drawn(fig)
    panels = [ax for ax in fig.axes if ax.get_title().startswith("channel 0")]
    assert len(panels) == 1
    ax = panels[0]
    box = ax.get_window_extent(renderer)
    ranges = []
    for coll in ax.collections:
        for seg in getattr(coll, "get_segments", lambda: [])():
            seg = np.asarray(seg)
            if len(seg) == 2 and seg[0, 0] == seg[1, 0]:
                ranges.append((float(seg[0, 0]), *sorted((float(seg[0, 1]), float(seg[1, 1])))))
    where = {}
    for case, stats in per_case.items():
        lo, hi = stats["percentile_00_5"], stats["percentile_99_5"]
        found = [r for r in ranges if np.isclose(r[1], lo, rtol=1e-6) and np.isclose(r[2], hi, rtol=1e-6)]
        assert found, f"{case}: its 0.5-99.5 % range {lo:g}..{hi:g} is not drawn"
        where[case] = x = found[0][0]
        (_, y0), (_, y1) = ax.transData.transform([(x, lo), (x, hi)])
        assert box.y0 - 1 <= min(y0, y1) and max(y0, y1) <= box.y1 + 1, f"{case}: its range lies outside the panel"
        assert abs(y1 - y0) >= 3, f"{case}: its range {lo:g}..{hi:g} is {abs(y1 - y0):.1f} px tall, not visible"
    left_to_right = sorted(per_case, key=lambda c: where[c])
    medians = [per_case[c]["median"] for c in left_to_right]
    assert medians == sorted(medians), "the cases are not sorted by their median intensity"
    path = write_dataset_report(tmp_path / "dataset_report.png", fp)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
