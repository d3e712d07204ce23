"""``report.html`` of an ``infer`` batch: what a person opens first.

The report lies in the output folder beside the results: a sortable table of every case of the
batch (status, volume and mean intensity per class, flags, seconds; failed cases with their error
and fix; cases not yet done as ``pending``), then per case its flags and its three-plane overlays
(one per predicted structure, through the structure's centre; ``report_files/<case>.<k>.png``,
written with the case, see :func:`case_figures`), a colour legend with the dataset's label names,
the model and versions. It is rewritten atomically after every case, so a batch stopped half way
has a report of the cases it finished, and the re-run completes it. ``report=false`` turns the
report and its images off.

The grey window of the overlays: the training data's foreground 0.5-99.5 percentiles for a CT
model (Hounsfield units mean the same in every scan), else each image's own 1st-99th percentiles.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .._version import versions
from ..io.atomic import write_bytes
from ..reports import Cell, canonical, centre_of, esc, flag_list, legend, page, section, table, three_planes, write_html

__all__ = ["FIGURE_DIR", "REPORT_FILE", "BatchReport", "case_figures"]

REPORT_FILE = "report.html"
MEAN_NOTE = '<p class="muted">mL: the class\'s volume; mean: the mean input intensity inside it (first channel).</p>'
FIGURE_DIR = "report_files"


def _window(plan: Any, check: Any) -> tuple[float, float]:
    norm = plan.normalization[0] if plan.normalization else None
    if norm is not None and norm.scheme == "ct" and norm.clip:
        return float(norm.clip[0]), float(norm.clip[1])
    p = check.percentiles[0] if check is not None and check.percentiles else {}
    return float(p.get("p01", 0.0)), float(p.get("p99", 1.0))


def case_figures(out: Path, case_id: str, pred: Any, plan: Any) -> list[dict[str, Any]]:
    """Write the overlays of one case (``report_files/<case>.<k>.png``: one per predicted class,
    through its centre; one through the middle of the image when nothing was predicted) and return
    ``[{"file", "class", "value"}]`` for its report."""
    check = pred.check
    if check is None or check.preview is None:
        return []
    s = check.stride
    spacing = tuple(float(v) * s for v in pred.geometry.spacing)
    geo = SimpleNamespace(direction=pred.geometry.direction, spacing=spacing)
    image, sp = canonical(check.preview[0], geo)
    label, _ = canonical(pred.label[::s, ::s, ::s], geo)
    window = _window(plan, check)
    values = sorted(v for v in pred.labels if v > 0)
    targets: list[tuple[int | None, tuple[int, int, int]]] = []
    for v in values:
        centre = centre_of(label, v)
        if centre is not None:
            targets.append((v, centre))
    if not targets:
        targets.append((None, (image.shape[0] // 2, image.shape[1] // 2, image.shape[2] // 2)))
    figures = []
    for k, (value, centre) in enumerate(targets):
        png = three_planes(image, label, sp, centre, window=window, values=values)
        rel = f"{FIGURE_DIR}/{case_id}.{k}.png"
        write_bytes(out / rel, png)
        figures.append({"file": rel, "class": pred.labels.get(value) if value else None, "value": value})
    return figures


def remove_figures(out: Path, case_id: str) -> None:
    """Delete a case's overlays (a failed or redone case keeps none of its old ones)."""
    folder = out / FIGURE_DIR
    if folder.is_dir():
        for f in folder.glob(f"{case_id}.*.png"):
            if f.name[len(case_id) + 1 : -4].isdigit():
                f.unlink(missing_ok=True)


class BatchReport:
    """The report of one batch: every case's row, kept up to date and written after each case."""

    def __init__(self, out: Path, case_ids: Sequence[str], model: Mapping[str, Any], plan: Any) -> None:
        self.out, self.model, self.plan = out, dict(model), plan
        self.rows: dict[str, dict[str, Any]] = {c: {"case": c, "status": "pending"} for c in case_ids}
        self.labels = {int(k): str(v) for k, v in plan.labels.items()}
        self.started = time.strftime("%Y-%m-%d %H:%M")
        self.failed = False  # a write failed (said once)

    def include_folder(self) -> None:
        """Add the cases other batches segmented into the same folder (as ``done earlier``): the
        report covers the folder, not only this batch."""
        for path in sorted(self.out.glob("*.json")):
            case = path.name[: -len(".json")]
            if case not in self.rows:
                rep = load_case_report(self.out, case)
                if rep is not None and rep.get("format") == "segpipe.prediction":
                    self.rows[case] = {"case": case, "status": "skipped", "report": rep}

    def add(
        self, case_id: str, status: str, report: Mapping[str, Any] | None, failure: Mapping[str, Any] | None
    ) -> None:
        """Record a case's outcome: ``written``/``skipped`` with its report dict, or ``failed``."""
        self.rows[case_id] = {"case": case_id, "status": status, "report": dict(report or {}), **dict(failure or {})}

    def flagged(self) -> list[dict[str, Any]]:
        """``[{"case", "flags"}]`` of the cases whose report has flags."""
        return [
            {"case": c, "flags": r["report"]["flags"]} for c, r in self.rows.items() if r.get("report", {}).get("flags")
        ]

    def write(self) -> Path:
        """Write ``report.html`` atomically; returns its path."""
        return write_html(self.out / REPORT_FILE, self.render())

    def _classes(self) -> list[str]:
        return [n for v, n in sorted(self.labels.items()) if v > 0 and n.lower() != "ignore"]

    def _row(self, row: Mapping[str, Any]) -> list[Cell]:
        rep = row.get("report") or {}
        vol, mean = rep.get("volume_ml") or {}, rep.get("mean_intensity") or {}
        flags = rep.get("flags") or []
        status = {"written": "done", "skipped": "done earlier"}.get(row["status"], row["status"])
        case = esc(row["case"])
        link = f'<a href="#case-{case}">{case}</a>' if row["status"] != "pending" else case
        cells = [Cell(link, row["case"]), Cell.text(status)]
        for name in self._classes():
            cells.append(Cell.number(vol.get(name), 2) if rep else Cell.number(None))
        for name in self._classes():
            cells.append(Cell.number((mean.get(name) or [None])[0], 1) if rep else Cell.number(None))
        kinds = ", ".join(sorted({f["kind"] for f in flags}))
        error = row.get("error")
        cells.append(
            Cell(
                f'<span class="{"bad wrap" if error else "flag"}">{esc(error or kinds)}</span>',
                len(flags) or (99 if error else 0),
            )
        )
        cells.append(Cell.number(rep.get("seconds"), 1))
        return cells

    def _case_section(self, row: Mapping[str, Any]) -> str:
        rep, case = row.get("report") or {}, esc(row["case"])
        parts = [f'<div class="case" id="case-{case}"><h3>{case}</h3>']
        if row.get("error"):
            hint = f" <b>Fix:</b> {esc(row['hint'])}" if row.get("hint") else ""
            parts.append(f'<p class="bad">{esc(row["error"])}</p><p>{hint}</p>')
        parts.append(flag_list(rep.get("flags") or []))
        for fig in rep.get("figures") or []:
            what = fig.get("class") or "no structure found: the middle of the image"
            parts.append(
                f'<figure><img src="{esc(fig["file"])}" alt="{case}: {esc(what)}" loading="lazy">'
                f"<figcaption>{esc(what)}: axial, coronal, sagittal</figcaption></figure>"
            )
        files = [rep.get(k) for k in ("label_map", "labels_file", "dicom_seg")] + [f"{row['case']}.json"]
        links = " · ".join(f'<a href="{esc(f)}">{esc(f)}</a>' for f in files if f and (self.out / f).is_file())
        if links:
            parts.append(f'<p class="muted">{links}</p>')
        parts.append("</div>")
        return "".join(parts)

    def render(self) -> str:
        rows = list(self.rows.values())
        counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("written", "skipped", "failed", "pending")}
        flagged = self.flagged()
        headers = ["case", "status"] + [f"{n} mL" for n in self._classes()]
        headers += [f"{n} mean" for n in self._classes()] + ["flags", "seconds"]
        status_table = table(
            headers,
            [self._row(r) for r in rows],
            table_id="cases",
            row_class=lambda i: "failed" if rows[i]["status"] == "failed" else None,
        )
        summary = (
            f"<p>{len(rows)} case(s): {counts['written']} segmented, {counts['skipped']} done earlier, "
            f'<span class="{"bad" if counts["failed"] else ""}">{counts["failed"]} failed</span>, '
            f"{counts['pending']} not yet segmented; "
            f'<span class="{"flag" if flagged else "ok"}">{len(flagged)} flagged</span>.</p>'
        )
        notes = sorted({n for r in rows for n in (r.get("report") or {}).get("input_notes", [])})
        model = self.model
        members = ", ".join(f"{m['configuration']} fold {m['fold']}" for m in model.get("members", []))
        about = (
            f'<dl class="kv"><dt>model</dt><dd>{esc(model.get("origin") or model.get("dataset"))}</dd>'
            f"<dt>networks</dt><dd>{esc(members)}</dd><dt>test-time flips</dt><dd>{'on' if model.get('tta') else 'off'}</dd>"
            f"<dt>written</dt><dd>{esc(time.strftime('%Y-%m-%d %H:%M'))} (batch started {esc(self.started)})</dd>"
            f"<dt>versions</dt><dd>{esc(', '.join(f'{k} {v}' for k, v in versions().items()))}</dd></dl>"
        )
        done = [r for r in rows if r["status"] != "pending"]
        return page(
            f"segpipe: {model.get('dataset', '')} segmentations",
            [
                section(
                    "Cases",
                    summary,
                    legend(self.labels),
                    status_table,
                    MEAN_NOTE,
                    *(f'<p class="muted">{esc(n)}</p>' for n in notes),
                ),
                section("Each case", *(self._case_section(r) for r in done)),
                section("Model", about),
            ],
            subtitle=str(self.out),
        )


def load_case_report(out: Path, case_id: str) -> dict[str, Any] | None:
    """A finished case's report dict from ``<case>.json``, or None."""
    from ..io.jsonio import read_json

    path = out / f"{case_id}.json"
    if not path.is_file():
        return None
    try:
        data = read_json(path, what="prediction report", hint="segment the case again", expect=None)
    except Exception:  # noqa: BLE001 - an unreadable report is a case to redo, not a broken report
        return None
    return data if isinstance(data, dict) else None


def report_from_folder(out: Path, case_ids: Sequence[str], model: Mapping[str, Any], plan: Any) -> BatchReport:
    """A batch report filled from the case reports already in ``out`` (a distributed batch's end)."""
    report = BatchReport(out, case_ids, model, plan)
    for c in case_ids:
        rep = load_case_report(out, c)
        if rep is not None:
            report.add(c, "written", rep, None)
    return report


def is_report_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a batch report, its image folder or one of its images (not a case output)."""
    p = Path(path)
    return p.name in (REPORT_FILE, FIGURE_DIR) or p.parent.name == FIGURE_DIR
