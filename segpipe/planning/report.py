"""The plan's outputs for people: ``plan_summary.md`` and ``dataset_report.png``.

``plans.json`` is for segpipe; these two are for whoever reads the workspace. The summary holds
the dataset facts the planner used and the configuration table ``segpipe plan`` prints (the
same rows, :func:`segpipe.planning.plan_summary_rows`), plus what was not planned and why. The
report draws the fingerprint: spacing and size distributions, the class volume fractions and,
per channel, each case's foreground intensity range (0.5-99.5 percentiles, min-max and median),
the cases sorted by their median on a scale where every case shows: a logarithmic one when the
cases' ranges differ by orders of magnitude (images of 0-255 beside images of hundreds of
thousands, as in the MSD hippocampus data), where a pooled histogram would be a single bar. A
fingerprint without per-case intensities (older or hand-written) gets the pooled histogram.

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
from ..settings import configured
from .plan import Plan

__all__ = [
    "dataset_report_figure",
    "plan_summary_markdown",
    "png_text",
    "report_key",
    "write_dataset_report",
    "write_plan_summary",
]

AXIS_NAMES = ("z", "y", "x")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPORT_VERSION = 2  # bump when the picture changes, so existing reports are redrawn (2: per-case intensities)
REPORT_KEY_FIELD = "segpipe-report-key"
MAX_CHANNEL_PANELS = 9
REPORT_DPI = 100
#: inches: the dataset row's panels, the channel rows' panels, the gap after the dataset row and the gap
#: between channel rows (the names of the cases, the key to the marks and a two-line title)
DATASET_ROW_IN, CHANNEL_ROW_IN, FIRST_GAP_IN, ROW_GAP_IN = 3.0, 3.2, 1.3, 2.1
CASE_LABELS_UP_TO = 40  # intensity panels name the cases on the axis up to this many cases
LOG_SCALE_RATIO = 100.0  # cases' intensity ranges this many times apart are drawn on a log scale


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


def _case_intensities(fp: Mapping[str, Any], channel: str) -> list[tuple[str, Mapping[str, float]]]:
    """(case id, foreground intensity statistics) of every case with foreground in ``channel``."""
    out = []
    for i, case in enumerate(fp.get("cases") or []):
        if not isinstance(case, Mapping):
            continue
        per_channel = case.get("foreground_intensity") or []
        index = int(channel) if channel.isdigit() else -1
        stats = per_channel[index] if 0 <= index < len(per_channel) else None
        if isinstance(stats, Mapping) and stats.get("n") and "percentile_00_5" in stats and "median" in stats:
            out.append((str(case.get("id") or f"case {i}"), stats))
    return out


def _intensity_scale(ax: Any, lows: np.ndarray, highs: np.ndarray) -> str:
    """A y scale on which every case's range shows: linear, unless the ranges lie orders of magnitude
    apart (log; symlog when some are ≤ 0). Returns the scale's name."""
    widths = highs - lows
    span = float(highs.max() - lows.min())
    narrowest = float(widths[widths > 0].min()) if (widths > 0).any() else 0.0
    if span <= 0 or narrowest * LOG_SCALE_RATIO >= span:
        return "linear"
    if lows.min() > 0:
        ax.set_yscale("log")
        return "log"
    # zero or negative values too: linear within the smallest magnitude that matters, log beyond
    magnitudes = np.abs(np.concatenate([lows, highs]))
    threshold = max(float(magnitudes[magnitudes > 0].min()) if (magnitudes > 0).any() else 1.0, narrowest, 1e-6)
    ax.set_yscale("symlog", linthresh=threshold)
    return "symlog"


def _intensity_panel(ax: Any, fp: Mapping[str, Any], channel: str, name: str) -> None:
    """Each case's foreground intensities, sorted by median: 0.5-99.5 % bar, min-max line, median dot."""
    cases = _case_intensities(fp, channel)
    if not cases:
        _pooled_intensity_panel(ax, fp, channel, name)
        return
    cases.sort(key=lambda item: (float(item[1]["median"]), item[0]))
    x = np.arange(1, len(cases) + 1)
    low = np.array([float(s["percentile_00_5"]) for _, s in cases])
    high = np.array([float(s["percentile_99_5"]) for _, s in cases])
    median = np.array([float(s["median"]) for _, s in cases])
    lo_all = np.array([float(s.get("min", s["percentile_00_5"])) for _, s in cases])
    hi_all = np.array([float(s.get("max", s["percentile_99_5"])) for _, s in cases])
    scale = _intensity_scale(ax, low, high)
    width = float(np.clip(200.0 / len(cases), 1.0, 8.0))  # points: bars thin out for many cases
    ax.vlines(x, lo_all, hi_all, color="0.55", linewidth=max(width / 4, 0.6))
    ax.vlines(x, low, high, color="tab:blue", linewidth=width)
    ax.scatter(x, median, s=max(width, 3.0) ** 2 / 2, color="tab:red", zorder=3)
    # the limits hold every case's 0.5-99.5 % bar; a far outlying voxel's min-max line may leave them
    if scale == "linear":
        margin = 0.05 * float(high.max() - low.min()) or 1.0
        ax.set_ylim(float(low.min()) - margin, float(high.max()) + margin)
    elif scale == "log":
        ax.set_ylim(float(low.min()) / 1.5, float(high.max()) * 1.5)
    limits = ax.get_ylim()
    stats = (fp.get("foreground_intensity_per_channel") or {}).get(channel) or {}
    pooled = False
    for key in ("percentile_00_5", "percentile_99_5"):
        if key in stats and (scale != "log" or float(stats[key]) > 0):
            ax.axhline(float(stats[key]), color="0.3", linestyle=":", linewidth=1)
            pooled = True
    ax.set_ylim(limits)  # the pooled percentiles never stretch the axis
    ax.set_xlim(0.4, len(cases) + 0.6)
    # what the marks mean, under the axis (a legend inside it would cover cases)
    key_text = "blue bar: 0.5-99.5 %, grey line: min-max, red dot: median"
    if pooled:
        key_text += "\ndotted: 0.5 / 99.5 % of all cases' voxels"
    if len(cases) <= CASE_LABELS_UP_TO:
        ax.set_xticks(x, [case for case, _ in cases], rotation=90, fontsize=7)
        ax.set_xlabel(f"case, sorted by median intensity\n{key_text}", fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(cases)} cases, sorted by median intensity\n{key_text}", fontsize=8)
    ax.set_ylabel("foreground intensity" + {"log": " (log scale)", "symlog": " (symmetric log scale)"}.get(scale, ""))
    ax.grid(axis="y", alpha=0.3)
    title = f"channel {channel} ({name}): foreground intensity per case"
    if median.min() > 0 and median.max() / median.min() >= 10:
        title += (
            f"\nmedians from {_intensity(median.min())} to {_intensity(median.max())}"
            f" (×{median.max() / median.min():,.0f})"
        )
    ax.set_title(title)


def _intensity(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _pooled_intensity_panel(ax: Any, fp: Mapping[str, Any], channel: str, name: str) -> None:
    """The pooled foreground histogram of a fingerprint without per-case intensities."""
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
    path: str | os.PathLike[str], fingerprint: Mapping[str, Any], plan: Plan | None = None, *, force: bool | None = None
) -> Path:
    """Draw ``dataset_report.png`` from a fingerprint (``plan`` adds its target spacing); atomic write.

    Panels: spacing per axis, size after cropping per axis, class volume fraction per case, and
    the foreground intensity histogram of each channel (up to :data:`MAX_CHANNEL_PANELS`). A
    panel whose data the fingerprint lacks says so instead of failing. The PNG records what it
    was drawn from (:func:`report_key`); an existing report drawn from the same data is kept
    (drawing takes a second or two) unless ``force``.
    """
    force = configured(force, "force")
    target = Path(path)
    key = report_key(fingerprint, plan)
    if not force and png_text(target).get(REPORT_KEY_FIELD) == key:
        return target
    from ..io.atomic import atomic_path

    fig = dataset_report_figure(fingerprint, plan)
    with atomic_path(target, ext=".png") as tmp:
        fig.savefig(
            tmp,
            format="png",
            metadata={
                "Software": None,
                "Title": f"segpipe dataset report: {fingerprint.get('dataset', '')}",
                REPORT_KEY_FIELD: key,
            },
        )
    return target


def dataset_report_figure(fingerprint: Mapping[str, Any], plan: Plan | None = None) -> Any:
    """The :class:`matplotlib.figure.Figure` of ``dataset_report.png`` (see :func:`write_dataset_report`)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise StateError(
            "matplotlib is not installed, so dataset_report.png cannot be drawn",
            hint="install it (`pip install matplotlib`, a segpipe dependency) and rerun `segpipe plan`",
        ) from None

    fp = fingerprint
    channels = [
        (str(k), str(v))
        for k, v in sorted(
            (fp.get("channel_names") or {}).items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0
        )
    ]
    shown = channels[:MAX_CHANNEL_PANELS]
    ncols = 3
    channel_rows = max(1, -(-len(shown) // ncols))
    # inches: margins 0.85 (top) and 1.6 (bottom); the dataset row's panels 3.0 high, then a gap of
    # FIRST_GAP_IN; the channel rows' panels 3.2 high with ROW_GAP_IN between them (room for the names
    # of the cases and the key to the marks)
    channel_block = CHANNEL_ROW_IN * channel_rows + ROW_GAP_IN * (channel_rows - 1)
    width, height = 5.2 * ncols, 0.85 + DATASET_ROW_IN + FIRST_GAP_IN + channel_block + 1.6
    fig = Figure(figsize=(width, height), dpi=REPORT_DPI)
    # fixed margins in inches (a layout engine costs more than the drawing itself); gaps are given as
    # fractions of the mean panel height, as matplotlib takes them
    outer = fig.add_gridspec(
        2,
        1,
        height_ratios=[DATASET_ROW_IN, channel_block],
        left=1.0 / width,
        right=1 - 0.2 / width,
        bottom=1.6 / height,
        top=1 - 0.85 / height,
        hspace=FIRST_GAP_IN / ((DATASET_ROW_IN + channel_block) / 2),
    )
    # six columns: the dataset row holds 3 panels; a row of k channel panels gives each 6 / k of them
    wspace = 0.9  # of a column's width: about 1.3 inches between panels
    first = outer[0].subgridspec(1, 2 * ncols, wspace=wspace)
    grid = outer[1].subgridspec(channel_rows, 2 * ncols, wspace=wspace, hspace=ROW_GAP_IN / CHANNEL_ROW_IN)
    top = [fig.add_subplot(first[0, 2 * i : 2 * i + 2]) for i in range(ncols)]
    rng = np.random.default_rng(0)  # fixed jitter: the same fingerprint draws the same picture
    _spacing_panel(top[0], fp, plan, rng)
    _size_panel(top[1], fp, rng)
    _class_panel(top[2], fp, rng)
    panels = [(channel, name) for channel, name in shown] or [("", "")]
    for r in range(channel_rows):
        row = panels[r * ncols : (r + 1) * ncols]
        span = 2 * ncols // len(row)
        for i, (channel, name) in enumerate(row):
            ax = fig.add_subplot(grid[r, i * span : (i + 1) * span])
            if shown:
                _intensity_panel(ax, fp, channel, name)
                ax.title.set_fontsize(10 if span < 3 else 12)  # three to a row: long titles fit
            else:
                _empty(ax, "foreground intensity", "no channels in the fingerprint")
    n = fp.get("num_cases", len(fp.get("cases") or []))
    more = f" (first {len(shown)} of {len(channels)} channels shown)" if len(channels) > len(shown) else ""
    fig.suptitle(f"{fp.get('dataset', 'dataset')}: {n} labelled cases{more}", fontsize=13, y=1 - 0.15 / height)
    return fig
