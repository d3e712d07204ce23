"""``report.html`` of a training run: the page a person opens to judge one configuration and fold.

It lies in the run folder (``runs/<configuration>/fold_<k>/report.html``) beside what it shows, and
holds, each part present once the run has written its files:

* the curves (``progress.png``, shown by relative path) and a table of the last epochs of
  ``metrics.csv``, with the best EMA pseudo-Dice;
* the full-case validation (``validation/summary.json``): a sortable table, one row per validation
  case, its Dice per class and its mean over the classes (both empty: no value, left out of the mean);
* the worst cases (the :data:`WORST_CASES` lowest mean Dice): three-plane overlays through each
  structure's centre (the reference's, else the prediction's) of the prediction and of the
  reference, over the preprocessed image. Validation scores the cases on the preprocessing cache's
  grid (cropped, resampled and normalised for the network), so they are drawn there too, from the
  cache's ``image.npy`` (channel 0, its grey window the case's 1st-99th percentiles) and ``label.npy``,
  with the saved softmax's argmax (``validation/<case>.npy``, kept by the final validation only);
  where the cache no longer holds the case, the page says what it shows instead;
* the settings of the run (``settings.json``: training settings, loss and optimiser with their
  parameters) and the library versions.

The images go to ``report_files/`` (``<i>.<case>.<k>.pred.png`` and ``<i>.<case>.<k>.ref.png``:
structure ``k`` of the ``i``-th worst case); images of cases no longer among the worst are removed. The page is written
atomically by :func:`write_run_report`, which the training calls when a run ends (after its final
full-case validation); it can be called again on any run folder. A missing part is named on the
page (and in a log line), never an error: a report that cannot be written never stops a training.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import numpy as np

from .._version import versions
from ..arrays import regions_to_labels
from ..io.atomic import write_bytes
from ..reports import Cell, canonical, centre_of, esc, finite, legend, page, section, table, three_planes, write_html
from ..workspace import FINAL, RunFolder, Workspace

__all__ = ["LAST_EPOCHS", "WORST_CASES", "ValidationTable", "load_validation", "worst_cases", "write_run_report"]

log = logging.getLogger("segpipe")

#: validation cases shown with overlays (the lowest mean Dice first)
WORST_CASES = 3
#: epochs of metrics.csv in the table under the curves
LAST_EPOCHS = 10
#: the columns of metrics.csv in that table: (column, header, digits); its epochs count from 0, the
#: table's from 1, as the curves and the training's log lines do
EPOCH_COLUMNS = (
    ("epoch", "epoch", 0),
    ("train_loss", "train loss", 4),
    ("val_loss", "validation loss", 4),
    ("mean_fg_dice", "pseudo-Dice", 4),
    ("ema_fg_dice", "EMA pseudo-Dice", 4),
    ("val_dice", "full-case Dice", 4),
    ("lr", "learning rate", 6),
    ("seconds", "seconds", 1),
)
SAMPLED_VOXELS = 1 << 20  # the grey window's percentiles are taken over about this many voxels
SLAB = 16  # slices of a saved prediction turned into labels at a time


# ---------------------------------------------------------------------------- reading the run
def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _metrics_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _csv_names(path: Path) -> dict[int, str]:
    """``{class: name}`` from the header of ``dice_per_case.csv`` (``dice_<class>_<name>``)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    names = {}
    for col in header:
        parts = col.split("_", 2)
        if len(parts) == 3 and parts[0] == "dice" and parts[1].isdigit():
            names[int(parts[1])] = parts[2]
    return names


@dataclass
class ValidationTable:
    """The full-case validation of a run: its classes and their names, and per case its Dice per
    class (NaN: reference and prediction both empty) and their mean over the classes with a value."""

    classes: list[int]
    names: dict[int, str]
    rows: list[tuple[str, dict[int, float], float]] = field(default_factory=list)
    foreground_mean: float | None = None

    def name(self, c: int) -> str:
        return self.names.get(c, str(c))


def load_validation(folder: RunFolder, names: Mapping[int, str] | None = None) -> ValidationTable | None:
    """The run's ``validation/summary.json`` as a :class:`ValidationTable` (None when there is none);
    class names from ``names``, else from ``dice_per_case.csv``'s header."""
    summary = _json(folder.validation_summary)
    if summary is None or not isinstance(summary.get("metric_per_case"), list):
        return None
    known = dict(names or {}) or _csv_names(folder.validation_dir / "dice_per_case.csv")
    classes: set[int] = set()
    rows = []
    for entry in summary["metric_per_case"]:
        metrics = entry.get("metrics") or {}
        dice = {int(c): finite(m.get("Dice")) for c, m in metrics.items()}
        classes |= set(dice)
        values = [d for d in dice.values() if d is not None]
        mean = sum(values) / len(values) if values else math.nan
        rows.append((str(entry.get("case")), {c: math.nan if d is None else d for c, d in dice.items()}, mean))
    fg = finite((summary.get("foreground_mean") or {}).get("Dice"))
    return ValidationTable(sorted(classes), known, rows, fg)


def worst_cases(validation: ValidationTable, count: int = WORST_CASES) -> list[str]:
    """The ``count`` cases of the lowest mean Dice (cases without one left out; ties in table order)."""
    scored = [(mean, i, case) for i, (case, _dice, mean) in enumerate(validation.rows) if not math.isnan(mean)]
    return [case for _mean, _i, case in sorted(scored)[:count]]


# ---------------------------------------------------------------------------- the worst cases' images
@dataclass
class _Source:
    """Where a validation case's pictures come from: the plan (label names, regions, ignore label),
    the preprocessing cache (image and reference on the network's grid), the run's folder."""

    folder: RunFolder
    plan: Any
    cache: Any

    #: names of the label values when there is no plan (those of the validation's classes)
    fallback: dict[int, str] = field(default_factory=dict)

    @property
    def labels(self) -> dict[int, str]:
        if self.plan is None:
            return dict(self.fallback)
        return {int(v): str(n) for v, n in self.plan.labels.items() if int(v) > 0 and int(v) != self.ignore}

    @property
    def ignore(self) -> int | None:
        return getattr(self.plan, "ignore_label", None) if self.plan is not None else None

    @property
    def class_order(self) -> list[int] | None:
        regions = (getattr(self.plan, "settings", None) or {}).get("regions") if self.plan is not None else None
        return list(regions["class_order"]) if regions else None


def _prediction(path: Path, class_order: Sequence[int] | None) -> np.ndarray:
    """The label map of a saved validation prediction (softmax argmax; region probabilities above 0.5),
    computed a slab of slices at a time (the file stays memory-mapped)."""
    probs = np.load(path, mmap_mode="r")
    out = np.zeros(probs.shape[1:], dtype=np.int16)
    for z in range(0, out.shape[0], SLAB):
        slab = np.asarray(probs[:, z : z + SLAB], dtype=np.float32)
        out[z : z + SLAB] = regions_to_labels(slab, class_order) if class_order else slab.argmax(axis=0)
    return out


def _values(label: np.ndarray) -> set[int]:
    """The values a label map holds."""
    if label.size and int(label.min()) >= 0:
        return {int(v) for v in np.flatnonzero(np.bincount(np.ravel(label).astype(np.intp)))}
    return {int(v) for v in np.unique(label)}


def _grid(props: Mapping[str, Any]) -> SimpleNamespace:
    """The cache grid's direction and spacing: the original direction's axes in the cache's axis order."""
    direction = np.asarray(props["original_geometry"]["direction"], dtype=np.float64).reshape(3, 3)
    transpose = [int(a) for a in props["transpose"]]
    turned = np.empty_like(direction)
    for a in range(3):  # array axis a (ITK index 2 - a) of the cache is array axis transpose[a] of the original
        turned[:, 2 - a] = direction[:, 2 - transpose[a]]
    return SimpleNamespace(direction=turned.ravel().tolist(), spacing=[float(s) for s in props["spacing"]])


def _window(image: np.ndarray) -> tuple[float, float]:
    step = max(1, round((image.size / SAMPLED_VOXELS) ** (1 / 3)))
    sample = np.asarray(image[::step, ::step, ::step], dtype=np.float32)
    lo, hi = (float(v) for v in np.percentile(sample, [1, 99]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _case_arrays(source: _Source, case: str, pred: np.ndarray) -> tuple[Any, Any, Any, str]:
    """(image or None, reference or None, grid, what the pictures show) of a validation case."""
    identity = SimpleNamespace(direction=[1, 0, 0, 0, 1, 0, 0, 0, 1], spacing=[1.0, 1.0, 1.0])
    entry = None
    if source.cache is not None:
        try:
            entry = source.cache.load(case, mmap=True)
        except Exception:  # noqa: BLE001 - a case gone from the cache is drawn without it
            entry = None
    if entry is None or entry[1] is None or tuple(entry[1].shape) != pred.shape:
        return (
            None,
            None,
            identity,
            (
                "The preprocessed case is no longer in the cache (or no longer on the prediction's grid): "
                "the prediction is shown alone, on the network's grid in array order with unit spacing."
            ),
        )
    image, label, props = entry
    grid = _grid(props)
    if image.ndim != 4 or tuple(image.shape[1:]) != pred.shape:
        return (
            None,
            label,
            grid,
            ("The cached image is not on the prediction's grid: prediction and reference are shown on their own."),
        )
    return (
        image[0],
        label,
        grid,
        (
            "Over the preprocessed image (channel 0, normalised, grey window its 1st-99th percentiles) on the "
            "network's grid, where validation scored the case: the prediction and, beside it, the reference."
        ),
    )


def _figures(source: _Source, case: str, prefix: str) -> tuple[list[dict[str, str]], str]:
    """Write the overlays of validation case ``case`` (``report_files/<prefix>.<k>.{pred,ref}.png``) and
    return ``[{"file", "caption"}]`` and a note on what they show."""
    npy = source.folder.validation_dir / f"{case}.npy"
    if not npy.is_file():
        return [], (
            "No saved prediction of this case: the final validation of a finished run keeps them "
            f"(validation/{case}.npy)."
        )
    pred = _prediction(npy, source.class_order)
    image, ref, grid, note = _case_arrays(source, case, pred)
    pred_c, spacing = canonical(pred, grid)
    ref_c = canonical(np.asarray(ref), grid)[0] if ref is not None else None
    if image is not None:
        image_c, window = canonical(np.asarray(image), grid)[0], _window(image)
    else:
        image_c, window = np.zeros(pred_c.shape, dtype=np.float32), (0.0, 1.0)
    drop = {0, source.ignore}
    present = _values(pred_c) | (_values(ref_c) if ref_c is not None else set())
    values = sorted(int(v) for v in present if v not in drop)
    labels = source.labels
    figures = []
    for k, value in enumerate(values):
        centre = (centre_of(ref_c, value) if ref_c is not None else None) or centre_of(pred_c, value)
        assert centre is not None  # the value is in one of the two
        name = labels.get(value, f"label {value}")
        shown = [("pred", "prediction", pred_c)] + ([("ref", "reference", ref_c)] if ref_c is not None else [])
        for kind, what, lab in shown:
            rel = f"{source.folder.report_files.name}/{prefix}.{k}.{kind}.png"
            if source.ignore is not None:
                lab = np.where(lab == source.ignore, 0, lab)
            png = three_planes(image_c, lab, spacing, centre, window=window, values=values)
            write_bytes(source.folder.root / rel, png)
            figures.append({"file": rel, "caption": f"{what}, through the centre of {name}"})
    if not values:
        note += " Neither the prediction nor the reference holds a structure."
    return figures, note


# ---------------------------------------------------------------------------- the page's sections
def _img(rel: str, alt: str, *, lazy: bool = True) -> str:
    loading = ' loading="lazy"' if lazy else ""
    return f'<img src="{esc(quote(rel))}" alt="{esc(alt)}"{loading}>'


def _curves(folder: RunFolder, settings: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The curves section, and what it lacks."""
    missing, parts = [], []
    rows = _metrics_rows(folder.metrics)
    if rows:
        planned = (settings.get("settings") or {}).get("epochs")
        emas = [(v, i) for i, r in enumerate(rows) if (v := finite(r.get("ema_fg_dice"))) is not None]
        line = f"{len(rows)} epoch(s) trained" + (f" of {planned}" if planned else "")
        if emas:
            best, at = max(emas)
            line += f"; best EMA pseudo-Dice {best:.4f} after epoch {_epoch(rows[at])}"
        vals = [(_epoch(r), v) for r in rows if (v := finite(r.get("val_dice"))) is not None]
        if vals:
            line += f"; last full-case validation Dice {vals[-1][1]:.4f} after epoch {vals[-1][0]}"
        parts.append(f"<p>{esc(line)}.</p>")
    if folder.progress.is_file():
        parts.append(f"<figure>{_img(folder.progress.name, 'training curves', lazy=False)}</figure>")
    else:
        missing.append("progress.png")
        parts.append('<p class="muted">No curves yet (progress.png is drawn as epochs end).</p>')
    if rows:
        last = rows[-LAST_EPOCHS:]
        cells = [
            [Cell.number(_epoch(r) if col == "epoch" else finite(r.get(col)), d) for col, _h, d in EPOCH_COLUMNS]
            for r in last
        ]
        parts.append(f"<h3>The last {len(last)} epoch(s) (metrics.csv)</h3>")
        parts.append(table([h for _c, h, _d in EPOCH_COLUMNS], cells, table_id="epochs"))
        parts.append(f'<p class="muted"><a href="{esc(folder.metrics.name)}">metrics.csv</a>: every epoch.</p>')
    else:
        missing.append("metrics.csv")
        parts.append('<p class="muted">No metrics.csv yet (one row is written per epoch).</p>')
    return section("Training curves", *parts, anchor="curves"), missing


def _epoch(row: Mapping[str, Any]) -> int | None:
    """The epoch of a metrics.csv row counted from 1 (the file counts from 0)."""
    number = finite(row.get("epoch"))
    return None if number is None else int(number) + 1


def _validation_section(validation: ValidationTable | None, worst: Sequence[str]) -> str:
    if validation is None:
        return section(
            "Validation",
            '<p class="flag">This run folder holds no full-case validation (validation/summary.json). '
            "A cross-validation fold validates every val_every epochs and at the end of the run; fold=all "
            "trains on every case and has no validation cases.</p>",
            anchor="validation",
        )
    classes = validation.classes
    headers = ["case"] + [f"{validation.name(c)} Dice" for c in classes] + ["mean Dice"]
    rows = []
    for case, dice, mean in validation.rows:
        link = f'<a href="#case-{esc(case)}">{esc(case)}</a>' if case in worst else esc(case)
        cells = [Cell(link, case)] + [Cell.number(dice.get(c), 4) for c in classes] + [Cell.number(mean, 4)]
        rows.append(cells)
    fg = validation.foreground_mean
    intro = (
        f"<p>{len(validation.rows)} validation case(s), scored on the network's grid; mean foreground Dice "
        f"{'n/a' if fg is None else f'{fg:.4f}'} (per class, the mean over the cases; then over the classes). "
        "A case's mean is over its classes with a value (a class empty in both reference and prediction has "
        'none). <a href="validation/dice_per_case.csv">dice_per_case.csv</a> holds the same table.</p>'
    )
    return section("Validation", intro, table(headers, rows, table_id="validation"), anchor="validation")


def _worst_section(source: _Source, validation: ValidationTable | None, worst: Sequence[str]) -> tuple[str, set[str]]:
    """The worst cases' section and the image files it names."""
    if validation is None:
        return "", set()
    if not worst:
        return section("Worst cases", '<p class="muted">No validation case has a Dice.</p>'), set()
    means = {case: (dice, mean) for case, dice, mean in validation.rows}
    parts, files = [legend(source.labels)] if source.labels else [], set()
    for i, case in enumerate(worst):
        dice, mean = means[case]
        scores = ", ".join(f"{validation.name(c)} {d:.4f}" for c, d in sorted(dice.items()) if not math.isnan(d))
        try:
            figures, note = _figures(source, case, f"{i}.{case}")
        except Exception as exc:  # noqa: BLE001 - one case's pictures never cost the page
            log.warning("%s: the overlays of validation case %s cannot be drawn (%s)", source.folder.root, case, exc)
            figures, note = [], f"The overlays of this case cannot be drawn ({type(exc).__name__}: {exc})."
        files |= {Path(f["file"]).name for f in figures}
        figs = "".join(
            f"<figure>{_img(f['file'], case + ': ' + f['caption'])}<figcaption>{esc(f['caption'])}: axial, coronal, "
            "sagittal</figcaption></figure>"
            for f in figures
        )
        parts.append(
            f'<div class="case" id="case-{esc(case)}"><h3>{esc(case)}</h3><p>mean Dice {mean:.4f} ({esc(scores)})</p>'
            f'<p class="muted">{esc(note)}</p>{figs}</div>'
        )
    head = f"<p>The {len(worst)} validation case(s) of the lowest mean Dice.</p>"
    return section("Worst cases", head, *parts, anchor="worst"), files


def _option(group: str, choice: Any, params: Mapping[str, Any] | None, lr: Any = None) -> str:
    """A loss or optimiser as ``name (key value, ...)``: conf/'s settings of the option, then the run's own."""
    from ..settings.conf import option_defaults
    from .run_settings import named_option

    given = named_option(choice, params or {})
    merged = {**option_defaults(group, str(given["name"])), **given}
    if lr is not None:
        merged["lr"] = lr
    name = merged.pop("name")
    return f"{name} ({', '.join(f'{k} {v}' for k, v in merged.items())})" if merged else str(name)


def _settings_section(settings: Mapping[str, Any] | None) -> str:
    if settings is None:
        return section("Settings", '<p class="flag">No settings.json in this run folder.</p>', anchor="settings")
    s = dict(settings.get("settings") or {})
    items = [("configuration", settings.get("configuration")), ("fold", settings.get("fold"))]
    try:
        items.append(("loss", _option("loss", s.get("loss"), s.get("loss_params"))))
        items.append(("optimiser", _option("optim", s.get("optim"), s.get("optim_params"), s.get("lr"))))
    except Exception:  # noqa: BLE001 - an option conf/ no longer knows is shown as recorded
        items += [("loss", f"{s.get('loss')} {s.get('loss_params') or ''}"), ("optimiser", s.get("optim"))]
    for key in ("loss", "loss_params", "optim", "optim_params", "lr"):
        s.pop(key, None)
    notes = {"batch_size": "the plan's", "num_workers": "as many as the cores allow", "max_time": "no limit"}
    for key, value in s.items():
        shown = (
            (notes.get(key, "null") if value is None else json.dumps(value)) if not isinstance(value, str) else value
        )
        items.append((key, shown))
    kv = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items)
    return section(
        "Settings",
        f'<dl class="kv">{kv}</dl><p class="muted">As the run recorded them in '
        '<a href="settings.json">settings.json</a>; loss and optimiser with the settings conf/ gives them.</p>',
        anchor="settings",
    )


def _versions_section(settings: Mapping[str, Any] | None) -> str:
    trained = (settings or {}).get("versions") or {}
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in trained.items())
    now = ", ".join(f"{k} {v}" for k, v in versions().items())
    body = f'<dl class="kv">{rows}</dl>' if rows else '<p class="muted">settings.json records no versions.</p>'
    return section(
        "Versions",
        body,
        f'<p class="muted">Trained with the versions above; this page written {esc(time.strftime("%Y-%m-%d %H:%M"))} '
        f"by {esc(now)}.</p>",
        anchor="versions",
    )


# ---------------------------------------------------------------------------- the page
def _plan_and_cache(folder: RunFolder, plan: Any, cache: Any, configuration: str) -> tuple[Any, Any]:
    """The run's plan and preprocessing cache: as given, else from the workspace the run folder is in."""
    root = folder.root.resolve()
    if len(root.parents) < 4:
        return plan, cache
    work_dir, dataset = root.parents[3], root.parents[2].name
    try:
        if plan is None:
            from ..planning import load_plan

            entry = Workspace(work_dir).dataset(dataset)
            plan = load_plan(entry.plans_path) if entry.plans_path.is_file() else None
        if cache is None and plan is not None:
            from ..preprocessing import Cache

            cache = Cache.for_configuration(work_dir, plan, configuration, dataset=dataset)
    except Exception as exc:  # noqa: BLE001 - without them the page shows less, and says so
        log.info("%s: the run's plan or cache cannot be read (%s); the report shows less", folder.root, exc)
    return plan, cache


def _class_names(plan: Any) -> dict[int, str]:
    """The validation's classes' names: a region plan's regions (1..R), else its labels."""
    if plan is None:
        return {}
    regions = (getattr(plan, "settings", None) or {}).get("regions")
    if regions:
        return {i + 1: str(n) for i, n in enumerate(regions["names"])}
    return {int(v): str(n) for v, n in plan.labels.items() if int(v) > 0}


def _render(folder: RunFolder, source: _Source, title: str | None) -> tuple[str, set[str], list[str]]:
    """The page, the image files it names and what the run folder lacks."""
    settings = _json(folder.settings)
    configuration = str((settings or {}).get("configuration") or folder.root.parent.name)
    fold = str((settings or {}).get("fold") or folder.root.name.removeprefix("fold_"))
    validation = load_validation(folder, _class_names(source.plan))
    if validation is not None and source.plan is None:
        source.fallback = dict(validation.names)
    worst = worst_cases(validation) if validation is not None else []
    curves, missing = _curves(folder, settings or {})
    worst_part, files = _worst_section(source, validation, worst)
    if validation is None:
        missing.append("validation/summary.json")
    if settings is None:
        missing.append("settings.json")
    state = "finished" if (folder.root / FINAL).is_file() else "not finished"
    dataset = folder.root.resolve().parents[2].name if len(folder.root.resolve().parents) > 2 else ""
    html = page(
        f"segpipe: {title or f'{dataset} {configuration} fold {fold}'.strip()}",
        [
            curves,
            _validation_section(validation, worst),
            worst_part,
            _settings_section(settings),
            _versions_section(settings),
        ],
        subtitle=f"training run {folder.root} ({state})",
    )
    return html, files, missing


def write_run_report(
    run_dir: str | os.PathLike[str],
    *,
    plan: Any = None,
    cache: Any = None,
    title: str | None = None,
    say: Callable[[str], None] | None = None,
) -> Path | None:
    """Write ``report.html`` of the training run in ``run_dir`` (atomically) and return its path; None
    when the folder holds no run or the page could not be written (a warning says why).

    ``plan`` (a :class:`~segpipe.planning.Plan`) and ``cache`` (the configuration's
    :class:`~segpipe.preprocessing.Cache`): default, those of the workspace the run folder lies in.
    ``title``: the page's heading (default ``<dataset> <configuration> fold <k>``). ``say`` gets one
    line naming the report and what the run folder lacks for it."""
    folder = RunFolder(Path(run_dir))
    if not folder.root.is_dir():
        log.info("%s: no training run there, so no report", folder.root)
        return None
    try:
        plan, cache = _plan_and_cache(folder, plan, cache, folder.root.parent.name)
        html, files, missing = _render(folder, _Source(folder, plan, cache), title)
        path = write_html(folder.report, html)
        if folder.report_files.is_dir():
            for old in folder.report_files.glob("*.png"):
                if old.name not in files:
                    old.unlink(missing_ok=True)
    except Exception as exc:  # noqa: BLE001 - a report never stops a training
        log.warning("%s: the run's report could not be written (%s: %s)", folder.root, type(exc).__name__, exc)
        return None
    lacking = f" (without {', '.join(missing)}: not in the run folder)" if missing else ""
    (say or log.info)(f"report: {path}{lacking}")
    return path
