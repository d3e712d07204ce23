"""The plan's outputs for people: ``plan_summary.md`` and ``dataset_report.png``.

``plans.json`` is for segpipe; these two are for whoever reads the workspace. The summary holds
the dataset facts the planner used and the configuration table ``segpipe plan`` prints (the
same rows, :func:`segpipe.planning.plan_summary_rows`), plus what was not planned and why. The
report draws the fingerprint: spacing and size distributions, the foreground intensity
histogram of each channel and the class volume fractions.

Both are written atomically. matplotlib is imported only when a report is drawn, and only its
object-oriented API is used (a :class:`matplotlib.figure.Figure` rendered by Agg), so planning
never changes the pyplot backend of a notebook or script that calls it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StateError
from .plan import Plan

__all__ = ["plan_summary_markdown", "png_text", "report_key", "write_dataset_report", "write_plan_summary"]

AXIS_NAMES = ("z", "y", "x")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPORT_VERSION = 1  # bump when the picture changes, so existing reports are redrawn
REPORT_KEY_FIELD = "segpipe-report-key"
MAX_CHANNEL_PANELS = 9
REPORT_DPI = 100


# ============================================================================ text
def _num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cell(v: Any) -> str:
    """Like the CLI's table: numbers as ``a×b×c``, other lists comma-separated; no ``|`` in a cell."""
    if isinstance(v, (list, tuple)):
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            text = "×".join(_num(x) for x in v)
        else:
            text = ", ".join(_cell(x) for x in v)
    else:
        text = _num(v)
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> list[str]:
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(key)) for key, _ in columns) + " |" for r in rows]
    return [header, rule, *body]


_SUMMARY_COLUMNS = (
    ("configuration", "configuration"),
    ("network", "network"),
    ("spacing", "spacing (mm)"),
    ("patch", "patch"),
    ("batch", "batch"),
    ("stages", "stages"),
    ("features", "features"),
    ("gpu_gb", "est. GPU GB"),
)


def plan_summary_markdown(
    plan: Plan, fingerprint: Mapping[str, Any] | None = None, *, dataset_path: str | os.PathLike[str] | None = None
) -> str:
    """``plan_summary.md``: the dataset facts, the configuration table, what was not planned and why."""
    from .planner import plan_summary_rows

    fp = fingerprint or {}
    n_cases = fp.get("num_cases", len(fp.get("cases") or []))
    identity = list(plan.transpose_forward) == [0, 1, 2]
    lines = [f"# Plan for {plan.dataset or 'dataset'}", ""]
    facts = [("dataset", plan.dataset)]
    if dataset_path is not None:
        facts.append(("source folder", str(dataset_path)))
    facts += [
        ("cases", f"{n_cases} labelled" if n_cases else "unknown"),
        ("channels", ", ".join(f"{k} {v}" for k, v in plan.channel_names.items())),
        ("labels", ", ".join(f"{k} {v}" for k, v in plan.labels.items())),
        ("median spacing (z×y×x, mm)", _cell(plan.median_spacing)),
        ("median shape after crop (z×y×x)", _cell(plan.median_shape)),
        ("target spacing (z×y×x, mm)", _cell(plan.target_spacing)),
        (
            "anisotropic",
            f"yes, axis {plan.anisotropic_axis} ({AXIS_NAMES[plan.anisotropic_axis]})"
            if plan.anisotropic and plan.anisotropic_axis is not None
            else "no",
        ),
        (
            "normalization",
            "; ".join(
                f"{n.channel} {n.name}: {n.scheme}"
                + (" inside the nonzero mask" if n.use_mask else "")
                + (f", clip {_cell(n.clip)}" if n.clip else "")
                for n in plan.normalization
            ),
        ),
        (
            "GPU memory budget",
            f"{_num(plan.memory_model.get('gpu_memory_gb', plan.settings.get('gpu_memory_gb')))} GB"
            + (" (mixed precision)" if plan.memory_model.get("amp", True) else " (fp32)"),
        ),
    ]
    lines += [f"- **{k}**: {v}" for k, v in facts]
    lines += ["", "## Configurations", ""]
    rows = plan_summary_rows(plan)
    if rows:
        lines += _markdown_table(rows, _SUMMARY_COLUMNS)
        lines.append("")
        lines.append(
            "Spacing, patch and strides are in network axis order"
            + ("." if identity else f" (array axes {plan.transpose_forward}, the coarsest first).")
            + " 2-D configurations list the in-plane spacing only; est. GPU GB is the memory model's "
            "prediction for one training step at that batch."
        )
        notes = [(name, note) for name, cfg in plan.configurations.items() for note in cfg.notes]
        if notes:
            lines += ["", *(f"- {name}: {note}" for name, note in notes)]
    else:
        lines.append("No configuration was planned.")
    if plan.skipped:
        lines += ["", "## Not planned", ""]
        lines += [f"- **{name}**: {why}" for name, why in plan.skipped.items()]
    if plan.fingerprint_sha256:
        lines += ["", f"Fingerprint sha256: `{plan.fingerprint_sha256}`"]
    return "\n".join(lines) + "\n"


def write_plan_summary(
    path: str | os.PathLike[str],
    plan: Plan,
    fingerprint: Mapping[str, Any] | None = None,
    *,
    dataset_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Write :func:`plan_summary_markdown` to ``path`` atomically."""
    from ..io.atomic import write_text

    return write_text(path, plan_summary_markdown(plan, fingerprint, dataset_path=dataset_path))


# ============================================================================ figure
def _case_rows(fp: Mapping[str, Any], key: str) -> np.ndarray:
    rows = [c[key] for c in fp.get("cases") or [] if isinstance(c, Mapping) and c.get(key) is not None]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3) if rows else np.zeros((0, 3))


def _empty(ax: Any, title: str, why: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _strip(ax: Any, columns: Sequence[np.ndarray], labels: Sequence[str], rng: np.random.Generator) -> None:
    """Box plot with every case as a (jittered) point: readable for 5 cases and for 1000."""
    ax.boxplot(
        list(columns),
        positions=range(1, len(columns) + 1),
        widths=0.5,
        showfliers=False,
        medianprops={"color": "tab:red"},
    )
    for i, col in enumerate(columns, start=1):
        ax.scatter(i + rng.uniform(-0.18, 0.18, size=len(col)), col, s=9, alpha=0.5, color="tab:blue", zorder=3)
    ax.set_xticks(range(1, len(columns) + 1), labels)
    ax.grid(axis="y", alpha=0.3)


def _spacing_panel(ax: Any, fp: Mapping[str, Any], plan: Plan | None, rng: np.random.Generator) -> None:
    sp = _case_rows(fp, "spacing")
    if not len(sp):
        _empty(ax, "spacing", "no per-case spacing in the fingerprint")
        return
    _strip(ax, [sp[:, i] for i in range(3)], [f"axis {i} ({a})" for i, a in enumerate(AXIS_NAMES)], rng)
    if plan is not None:
        ax.scatter(
            range(1, 4),
            plan.target_spacing,
            marker="D",
            s=36,
            color="tab:green",
            edgecolors="black",
            zorder=5,
            label="target spacing",
        )
        ax.legend(loc="best", fontsize=8)
    ax.set_ylabel("mm")
    ax.set_title(f"voxel spacing ({len(sp)} cases)")


def _size_panel(ax: Any, fp: Mapping[str, Any], rng: np.random.Generator) -> None:
    shapes = _case_rows(fp, "shape_after_crop")
    if not len(shapes):
        _empty(ax, "size", "no per-case shapes in the fingerprint")
        return
    _strip(ax, [shapes[:, i] for i in range(3)], [f"axis {i} ({a})" for i, a in enumerate(AXIS_NAMES)], rng)
    ax.set_ylabel("voxels")
    sp = _case_rows(fp, "spacing")
    if len(sp) == len(shapes):
        extent = np.median(sp * shapes, axis=0)
        ax.set_xlabel("median extent " + " × ".join(f"{v:.0f}" for v in extent) + " mm")
    ax.set_title("image size after cropping to nonzero")


def _class_panel(ax: Any, fp: Mapping[str, Any], rng: np.random.Generator) -> None:
    labels = {str(k): str(v) for k, v in (fp.get("labels") or {}).items() if str(k) != "0"}
    cases = [c for c in fp.get("cases") or [] if isinstance(c, Mapping) and "class_voxels" in c]
    if not labels or not cases:
        _empty(ax, "class volume fraction", "no per-case class volumes in the fingerprint")
        return
    keys = sorted(labels, key=lambda k: int(k) if k.lstrip("-").isdigit() else k)
    columns, names = [], []
    for key in keys:
        fractions = []
        for c in cases:
            total = float(np.prod(c.get("shape_after_crop") or c.get("shape") or [0], dtype=np.float64))
            voxels = float((c.get("class_voxels") or {}).get(key, 0))
            if total > 0 and voxels > 0:
                fractions.append(voxels / total)
        columns.append(np.asarray(fractions))
        present = len(fractions)
        names.append(f"{key} {labels[key]}\n({present}/{len(cases)} cases)")
    if not any(len(col) for col in columns):
        _empty(ax, "class volume fraction", "no labelled foreground in any case")
        return
    _strip(ax, columns, names, rng)
    values = np.concatenate([col for col in columns if len(col)])
    if values.max() / max(values.min(), 1e-12) > 50:
        ax.set_yscale("log")
    ax.set_ylabel("class voxels / image voxels (cropped)")
    ax.set_title("class volume fraction per case (where present)")
    if len(keys) > 4:
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)


def _intensity_panel(ax: Any, fp: Mapping[str, Any], channel: str, name: str) -> None:
    stats = (fp.get("foreground_intensity_per_channel") or {}).get(channel) or {}
    title = f"channel {channel} ({name}): foreground intensity"
    hist = stats.get("histogram")
    if hist and hist.get("counts"):
        counts = np.asarray(hist["counts"], dtype=np.float64)
        lo, hi = (float(v) for v in hist["range"])
        edges = np.linspace(lo, hi, len(counts) + 1)
        total = counts.sum() + hist.get("below", 0) + hist.get("above", 0)
        ax.stairs(counts / max(total, 1), edges, fill=True, alpha=0.6, color="tab:blue")
        ax.set_ylabel("fraction of sampled foreground voxels")
        outside = (hist.get("below", 0) + hist.get("above", 0)) / max(total, 1)
        ax.set_xlabel(f"intensity (0.5-99.5 percentile range; {outside:.1%} of samples outside)")
    elif "percentile_00_5" in stats:
        ax.set_yticks([])
        ax.set_xlabel("intensity (no histogram in this fingerprint: percentiles only)")
    else:
        _empty(ax, title, "no foreground intensities in the fingerprint")
        return
    for key, style, label in (
        ("mean", "-", "mean"),
        ("percentile_00_5", ":", "0.5 / 99.5 %"),
        ("percentile_99_5", ":", None),
    ):
        if key in stats:
            ax.axvline(float(stats[key]), color="tab:red", linestyle=style, linewidth=1, label=label)
    if "mean" in stats:
        ax.legend(loc="best", fontsize=8)
    ax.set_title(title)


def report_key(fingerprint: Mapping[str, Any], plan: Plan | None = None) -> str:
    """What the report is drawn from (fingerprint content, target spacing, this module's version)."""
    from .planner import fingerprint_digest

    payload = {
        "v": REPORT_VERSION,
        "fp": fingerprint_digest(fingerprint),
        "target": list(plan.target_spacing) if plan is not None else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def png_text(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``tEXt`` chunks of a PNG file (``{}`` if it is missing or not a PNG); reads no pixels."""
    out: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                return {}
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return out
                length, kind = struct.unpack(">I4s", head)
                if kind == b"IDAT" or kind == b"IEND":
                    return out  # matplotlib writes its text chunks before the pixels
                body = f.read(length)
                f.seek(4, os.SEEK_CUR)  # CRC
                if kind == b"tEXt" and b"\0" in body:
                    key, _, value = body.partition(b"\0")
                    out[key.decode("latin-1")] = value.decode("latin-1")
    except OSError:
        return {}


def write_dataset_report(
    path: str | os.PathLike[str], fingerprint: Mapping[str, Any], plan: Plan | None = None, *, force: bool = False
) -> Path:
    """Draw ``dataset_report.png`` from a fingerprint (``plan`` adds its target spacing); atomic write.

    Panels: spacing per axis, size after cropping per axis, class volume fraction per case, and
    the foreground intensity histogram of each channel (up to :data:`MAX_CHANNEL_PANELS`). A
    panel whose data the fingerprint lacks says so instead of failing. The PNG records what it
    was drawn from (:func:`report_key`); an existing report drawn from the same data is kept
    (drawing takes a second or two) unless ``force``.
    """
    target = Path(path)
    key = report_key(fingerprint, plan)
    if not force and png_text(target).get(REPORT_KEY_FIELD) == key:
        return target
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise StateError(
            "matplotlib is not installed, so dataset_report.png cannot be drawn",
            hint="install it (`pip install matplotlib`, a segpipe dependency) and rerun `segpipe plan`",
        ) from None
    from ..io.atomic import atomic_path

    fp = fingerprint
    channels = [
        (str(k), str(v))
        for k, v in sorted(
            (fp.get("channel_names") or {}).items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0
        )
    ]
    shown = channels[:MAX_CHANNEL_PANELS]
    ncols = 3
    rows = 1 + max(1, -(-len(shown) // ncols))
    width, height = 5.2 * ncols, 4.3 * rows
    fig = Figure(figsize=(width, height), dpi=REPORT_DPI)
    # fixed margins in inches (a layout engine costs more than the drawing itself)
    fig.subplots_adjust(
        left=0.8 / width,
        right=1 - 0.2 / width,
        bottom=0.75 / height,
        top=1 - 0.85 / height,
        wspace=0.3,
        hspace=0.75 / 4.3 * 2,
    )
    axes = fig.subplots(rows, ncols, squeeze=False)
    rng = np.random.default_rng(0)  # fixed jitter: the same fingerprint draws the same picture
    _spacing_panel(axes[0][0], fp, plan, rng)
    _size_panel(axes[0][1], fp, rng)
    _class_panel(axes[0][2], fp, rng)
    flat = [ax for row in axes[1:] for ax in row]
    for ax, (channel, name) in zip(flat, shown):
        _intensity_panel(ax, fp, channel, name)
    if not shown:
        _empty(flat[0], "foreground intensity", "no channels in the fingerprint")
        shown = [("", "")]
    for ax in flat[len(shown) :]:
        ax.set_axis_off()
    n = fp.get("num_cases", len(fp.get("cases") or []))
    more = f" (first {len(shown)} of {len(channels)} channels shown)" if len(channels) > len(shown) else ""
    fig.suptitle(f"{fp.get('dataset', 'dataset')}: {n} labelled cases{more}", fontsize=13, y=1 - 0.15 / height)
    with atomic_path(target, ext=".png") as tmp:
        fig.savefig(
            tmp,
            format="png",
            metadata={
                "Software": None,
                "Title": f"segpipe dataset report: {fp.get('dataset', '')}",
                REPORT_KEY_FIELD: key,
            },
        )
    return target
