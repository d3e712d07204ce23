"""The pages for people of ``segpipe evaluate`` and ``segpipe find-best``.

* :func:`write_evaluation_report`: ``report.html`` in the evaluation's output folder, beside
  ``summary.json``: the mean metrics per class, the box plots (``dice_boxplot.png``), a sortable
  table of every case (Dice, HD95 and NSD per class, as ``evaluation.csv`` has them, and the case's
  mean Dice), and the QC overlays ``qc/<case>.png`` where the evaluation drew them.
* :func:`write_find_best_report`: ``best_configuration.html`` in the dataset's workspace folder,
  beside ``best_configuration.json``: every configuration and ensemble compared with its scores,
  the one chosen, and the post-processing decision class by class, with links to the runs' reports.

Both are single self-contained pages (:mod:`segpipe.reports`), written atomically; every image is
named by a relative path and nothing is fetched from elsewhere.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .._version import versions
from ..reports import Cell, esc, finite, page, section, table, write_html
from ..splits import N_FOLDS
from .evaluation_plots import BACKGROUND, QC_FOLDER

__all__ = ["EVALUATION_REPORT_FILE", "write_evaluation_report", "write_find_best_report"]

log = logging.getLogger("segpipe")

EVALUATION_REPORT_FILE = "report.html"
METRICS = (("Dice", 4), ("HD95", 2), ("NSD", 4))
UNITS = {"HD95": " (mm)"}


def _fmt(value: Any, digits: int = 4) -> str:
    number = finite(value)
    return "n/a" if number is None else f"{number:.{digits}f}"


def _href(rel: str) -> str:
    return esc(quote(rel))


def _versions() -> str:
    return section(
        "Versions",
        f'<p class="muted">Written {esc(time.strftime("%Y-%m-%d %H:%M"))} by '
        f"{esc(', '.join(f'{k} {v}' for k, v in versions().items()))}.</p>",
    )


# ---------------------------------------------------------------------------- evaluate
def _class_label(c: str, names: Mapping[str, Any]) -> str:
    return f"{c} {names[c]}" if names.get(c) else c


def _means_section(summary: Mapping[str, Any], classes: Sequence[str], names: Mapping[str, Any]) -> str:
    headers = ["class", "Dice", "HD95 (mm)", "NSD", "reference mL", "predicted mL"]
    rows = []
    for c in classes:
        m = summary["mean"].get(c) or {}
        rows.append(
            [Cell(esc(_class_label(c, names)), int(c))]
            + [Cell.number(finite(m.get(k)), d) for k, d in METRICS]
            + [Cell.number(finite(m.get("volume_ref_ml")), 2), Cell.number(finite(m.get("volume_pred_ml")), 2)]
        )
    fg = summary.get("foreground_mean") or {}
    missing = summary.get("missing_predictions") or []
    tolerances = summary.get("tolerance_mm") or {}
    text = (
        f"<p>{summary.get('n_cases', len(summary.get('metric_per_case') or []))} case(s) scored; foreground mean: "
        f"Dice {_fmt(fg.get('Dice'))}, HD95 {_fmt(fg.get('HD95'), 2)} mm, NSD {_fmt(fg.get('NSD'))}. Per class, "
        "the mean over the cases with a value (Dice has none where reference and prediction are both empty).</p>"
    )
    if tolerances:
        tol = ", ".join(f"{_class_label(c, names)}: {v} mm" for c, v in tolerances.items())
        text += f'<p class="muted">NSD tolerance: {esc(tol)}.</p>'
    if summary.get("ignore_label") is not None:
        text += f'<p class="muted">Reference voxels labelled {esc(summary["ignore_label"])} count for no class.</p>'
    if missing:
        listed = ", ".join(str(m.get("case")) for m in missing)
        text += f'<p class="flag">{len(missing)} reference case(s) without a prediction, left out: {esc(listed)}.</p>'
    return section("Mean per class", text, table(headers, rows, table_id="means"), anchor="means")


def _case_rows(
    summary: Mapping[str, Any], classes: Sequence[str], qc: Mapping[str, str]
) -> tuple[list[str], list[list[Cell]]]:
    """The per-case table: headers and rows (the case links to its QC overlay when there is one)."""
    names = summary.get("labels") or {}
    headers = ["case"]
    for c in classes:
        headers += [f"{_class_label(c, names)} {k}{UNITS.get(k, '')}" for k, _d in METRICS]
    headers += ["mean Dice", "QC"]
    rows = []
    for entry in summary.get("metric_per_case") or []:
        case, metrics = str(entry.get("case")), entry.get("metrics") or {}
        cells = [Cell.text(case)]
        dices = []
        for c in classes:
            m = metrics.get(c) or {}
            cells += [Cell.number(finite(m.get(k)), d) for k, d in METRICS]
            if finite(m.get("Dice")) is not None:
                dices.append(float(m["Dice"]))
        cells.append(Cell.number(sum(dices) / len(dices) if dices else None, 4))
        link = qc.get(case)
        cells.append(Cell(f'<a href="#qc-{esc(case)}">overlay</a>', 1) if link else Cell("", None))
        rows.append(cells)
    return headers, rows


def write_evaluation_report(
    out_dir: str | os.PathLike[str],
    summary: Mapping[str, Any],
    *,
    boxplot: str = "dice_boxplot.png",
) -> Path | None:
    """Write ``report.html`` of an evaluation into ``out_dir`` (its ``summary.json`` content as
    ``summary``, see :mod:`segpipe.workflows.evaluate`; ``boxplot``: the box plots' file there) and
    return its path; None (with a warning) when it cannot be written: the evaluation stands without it."""
    out = Path(out_dir)
    try:
        names = summary.get("labels") or {}
        classes = sorted((c for c in summary.get("mean") or {} if int(c) != BACKGROUND), key=int)
        cases = [str(e.get("case")) for e in summary.get("metric_per_case") or []]
        qc = {c: f"{QC_FOLDER}/{c}.png" for c in cases if (out / QC_FOLDER / f"{c}.png").is_file()}
        headers, rows = _case_rows(summary, classes, qc)
        plots = (
            f'<figure><img src="{_href(boxplot)}" alt="Dice and HD95 per class"></figure>'
            if (out / boxplot).is_file()
            else '<p class="muted">No box plots in this folder.</p>'
        )
        intro = (
            '<p>One row per case; the columns as <a href="evaluation.csv">evaluation.csv</a> has them (background '
            "left out), and the case's mean Dice over its classes with a value.</p>"
        )
        overlays = "".join(
            f'<figure class="case" id="qc-{esc(c)}"><a href="{_href(rel)}"><img src="{_href(rel)}" '
            f'alt="{esc(c)}: reference and prediction" loading="lazy"></a><figcaption>{esc(c)}</figcaption></figure>'
            for c, rel in qc.items()
        )
        qc_part = (
            section(
                "QC overlays",
                "<p>Reference contours wide, prediction dashed, over the image.</p>",
                overlays,
                anchor="qc",
            )
            if qc
            else ""
        )
        html = page(
            "segpipe: evaluation",
            [
                _means_section(summary, classes, names),
                section("Box plots", plots, anchor="boxplots"),
                section("Cases", intro, table(headers, rows, table_id="cases"), anchor="cases"),
                qc_part,
                _versions(),
            ],
            subtitle=f"{out} · {len(cases)} case(s) · details in summary.json",
        )
        return write_html(out / EVALUATION_REPORT_FILE, html)
    except Exception as exc:  # noqa: BLE001 - the evaluation's files are written; the page is extra
        log.warning("%s: the evaluation's report could not be written (%s: %s)", out, type(exc).__name__, exc)
        return None


# ---------------------------------------------------------------------------- find-best
def _run_links(dws: Any, configurations: Sequence[str]) -> str:
    """Links to the run reports of ``configurations`` that exist, relative to the dataset's folder."""
    root = Path(dws.root)
    items = []
    for config in configurations:
        links = []
        for fold in range(N_FOLDS):
            report = dws.run_folder(config, fold).report
            if report.is_file():
                links.append(f'<a href="{_href(report.relative_to(root).as_posix())}">fold {fold}</a>')
        if links:
            items.append(f"<li>{esc(config)}: {' · '.join(links)}</li>")
    return f"<ul>{''.join(items)}</ul>" if items else ""


def _postprocessing_section(decision: Mapping[str, Any], labels: Mapping[int, str]) -> str:
    chosen = [int(c) for c in (decision.get("postprocessing") or {}).get("largest_component") or []]
    adopted_names = [str(labels.get(c, c)) for c in chosen]
    scores = decision.get("postprocessing_scores") or {}
    rows = [
        [
            Cell.text(name),
            Cell.number(finite(s.get("before")), 4),
            Cell.number(finite(s.get("after")), 4),
            Cell.text("adopted" if name in adopted_names else "not adopted"),
        ]
        for name, s in scores.items()
    ]
    if chosen:
        text = (
            f"<p>Keep only the largest connected component of: <b>{esc(', '.join(adopted_names))}</b>; "
            f"mean foreground Dice then {_fmt(decision.get('mean_fg_dice_postprocessed'))}.</p>"
        )
    else:
        text = "<p>None: no class gained from keeping only its largest connected component.</p>"
    note = (
        '<p class="muted">Each class in turn: its largest connected component is kept when that raises the '
        "class's mean Dice over the cases (then the next class is tried on the result).</p>"
    )
    if not scores:  # a region plan: its label values are nested regions, not classes of their own
        text = "<p>None: keeping a class's largest component is not tried for regions.</p>"
        return section("Post-processing", text, anchor="postprocessing")
    headers = ["class", "Dice before", "Dice, largest component only", "decision"]
    return section(
        "Post-processing", text, table(headers, rows, table_id="postprocessing"), note, anchor="postprocessing"
    )


def write_find_best_report(dws: Any, decision: Mapping[str, Any], *, labels: Mapping[int, str]) -> Path | None:
    """Write ``best_configuration.html`` of ``find-best``'s ``decision`` (as it writes it to
    ``best_configuration.json``) into the dataset workspace ``dws``; ``labels``: ``{class: name}``
    of the scored classes. Returns its path, or None (with a warning) when it cannot be written."""
    path = Path(dws.best_configuration_report_path)
    try:
        candidates = list(decision.get("candidates") or [])
        best = list(decision.get("configurations") or [])
        names = [str(n) for n in labels.values()]
        headers = ["candidate", "configurations", "mean foreground Dice"] + [f"{n} Dice" for n in names]
        rows = []
        for c in candidates:
            combo = list(c.get("configurations") or [])
            text = " + ".join(combo)
            shown = Cell(f"<b>{esc(text)}</b> (chosen)", text) if combo == best else Cell.text(text)
            rows.append(
                [shown, Cell.number(len(combo), 0)]
                + [Cell.number(finite(c.get("mean_fg_dice")), 4)]
                + [Cell.number(finite((c.get("class_dice") or {}).get(n)), 4) for n in names]
            )
        chosen = (
            f"<p>Chosen: <b>{esc(' + '.join(best))}</b>, mean foreground Dice {_fmt(decision.get('mean_fg_dice'))} "
            f"on {esc(decision.get('cases'))} of {esc(decision.get('cases_total'))} cross-validation case(s) "
            "(the cases every candidate has a prediction for; scored on the network's grid). A tie goes to the "
            'simpler candidate. <a href="best_configuration.json">best_configuration.json</a> holds the decision '
            "that segpipe infer and segpipe export use.</p>"
        )
        links = _run_links(dws, sorted({n for c in candidates for n in c.get("configurations") or []}))
        html = page(
            f"segpipe: best configuration of {getattr(dws, 'name', '')}".rstrip(),
            [
                section(
                    "Candidates",
                    chosen,
                    table(headers, rows, table_id="candidates"),
                    anchor="candidates",
                ),
                _postprocessing_section(decision, labels),
                section("Training runs", links, anchor="runs") if links else "",
                _versions(),
            ],
            subtitle=str(Path(dws.root)),
        )
        return write_html(path, html)
    except Exception as exc:  # noqa: BLE001 - the decision is written; the page is extra
        log.warning("%s: the find-best report could not be written (%s: %s)", path, type(exc).__name__, exc)
        return None
