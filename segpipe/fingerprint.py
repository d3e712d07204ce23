"""One pass over a dataset's labelled cases → ``fingerprint.json``. Measures; decides nothing.

Per case: spacing and shape, the crop-to-nonzero box (any channel ≠ 0; holes do not change a
bounding box, so none are filled), per-channel statistics of the foreground (label > 0)
intensities plus a bounded random sample of them, per-class voxel counts and connected-component
counts (full connectivity). Aggregated: per channel mean / std / median / 0.5 and 99.5
percentiles of the pooled foreground samples (min and max are exact, over every foreground
voxel) and a histogram between those percentiles, and per dataset the spacing and shape
distributions and the class frequencies.

Sampling (differs from nnU-Net on purpose): nnU-Net draws ``10**8 // n_cases`` foreground
voxels per case with replacement (seed 1234), i.e. up to 10⁸ samples held at once — the main
reason its fingerprint needs ~2 GB. We draw ``min(10**8 // n_cases, 10_000)`` per case
(:data:`MAX_SAMPLES_PER_CASE`), with replacement so every case weighs the same, from a generator
seeded with ``(1234, case index)`` so the result does not depend on which worker read the case.
10⁴ samples per case over tens of cases pin the 0.5/99.5 percentiles to well under 1% of the
intensity range; the pooled sample stays ≤ 40 kB per case and channel.

Memory: cases are read by :mod:`segpipe.parallel`'s worker pool (``num_workers``, default the
usable core count), one case per worker at a time, so at most ``num_workers`` cases are in RAM;
each worker returns only its small summary and its sample. A worker that dies (out of memory)
stops the stage with a one-line error instead of a hang. The result is cached in
``fingerprint.json`` keyed by the dataset's file list, sizes and modification times (and the
declared channels and labels).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import crop_box
from .parallel import default_num_workers  # noqa: F401  (re-exported from its old home)
from .settings import configured

FINGERPRINT_VERSION = 3  # 2: per-channel foreground intensity histogram; 3: whole-image percentiles, class volumes
#: voxels of a case's whole image that its image percentiles are computed on (an even stride over it)
IMAGE_SAMPLE_VOXELS = 1_000_000
SAMPLE_SEED = 1234
NNUNET_TOTAL_SAMPLES = 10**8
MAX_SAMPLES_PER_CASE = 10_000
FINGERPRINT_FILE = (
    "fingerprint.json"  # the name; the path comes from segpipe.workspace (DatasetWorkspace.fingerprint_path)
)
HISTOGRAM_BINS = 64

__all__ = [
    "FINGERPRINT_FILE",
    "FINGERPRINT_VERSION",
    "MAX_SAMPLES_PER_CASE",
    "compute_fingerprint",
    "data_profile",
    "image_percentiles",
    "dataset_signature",
    "source_change",
    "default_num_workers",
    "fingerprint_dataset",
    "load_fingerprint",
    "summarize_case",
]


def samples_per_case(n_cases: int) -> int:
    return int(max(1, min(NNUNET_TOTAL_SAMPLES // max(n_cases, 1), MAX_SAMPLES_PER_CASE)))


# ---------------------------------------------------------------------------- per case
def _intensity_stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"n": 0}
    v = values.astype(np.float64, copy=False)
    p005, p50, p995 = np.percentile(v, [0.5, 50.0, 99.5])
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "median": float(p50),
        "min": float(v.min()),
        "max": float(v.max()),
        "percentile_00_5": float(p005),
        "percentile_99_5": float(p995),
    }


def image_percentiles(channel: np.ndarray) -> dict[str, float]:
    """1st, 50th and 99th percentile of a whole channel (every voxel, background too), on an even
    stride of at most :data:`IMAGE_SAMPLE_VOXELS` voxels; NaNs left out."""
    flat = channel.reshape(-1)
    step = max(1, -(-flat.size // IMAGE_SAMPLE_VOXELS))
    v = flat[::step].astype(np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {}
    p01, p50, p99 = np.percentile(v, [1.0, 50.0, 99.0])
    return {"p01": float(p01), "p50": float(p50), "p99": float(p99)}


def _border_classes(label: np.ndarray) -> list[str]:
    """The label values (as strings) with a voxel on a face of the image (a structure maybe cut off)."""
    if label.ndim != 3 or min(label.shape) == 0:
        return []
    faces = [label[0], label[-1], label[:, 0], label[:, -1], label[:, :, 0], label[:, :, -1]]
    values: set[int] = set()
    for face in faces:
        values.update(int(v) for v in np.unique(face))
    return [str(v) for v in sorted(values) if v > 0]


def summarize_case(
    image: np.ndarray,
    label: np.ndarray | None,
    spacing: Any,
    *,
    case_id: str = "",
    case_index: int = 0,
    n_samples: int = MAX_SAMPLES_PER_CASE,
) -> tuple[dict[str, Any], np.ndarray]:
    """Summary dict and foreground sample (float32 ``[C, n_samples]``, or ``[C, 0]``) of one case.

    ``image`` is ``[C, Z, Y, X]``, ``label`` ``[Z, Y, X]`` (integers) or None.
    """
    from scipy import ndimage

    box = crop_box(image)
    shape = [int(s) for s in image.shape[1:]]
    cropped_shape = [hi - lo for lo, hi in box]
    summary: dict[str, Any] = {
        "id": case_id,
        "spacing": [float(s) for s in spacing],
        "shape": shape,
        "crop_bbox": box,
        "shape_after_crop": cropped_shape,
        "relative_size_after_crop": float(np.prod(cropped_shape, dtype=np.float64) / np.prod(shape, dtype=np.float64)),
    }
    channels = image.shape[0]
    summary["image_intensity"] = [image_percentiles(image[c]) for c in range(channels)]
    if label is None:
        summary.update(
            class_voxels={},
            class_border=[],
            class_components={},
            foreground_voxels=0,
            foreground_intensity=[{"n": 0} for _ in range(channels)],
        )
        return summary, np.zeros((channels, 0), np.float32)
    lab = np.asarray(label)
    if not np.issubdtype(lab.dtype, np.integer):
        lab = np.rint(lab).astype(np.int64)
    counts = np.bincount(lab.ravel().astype(np.intp, copy=False))
    summary["class_voxels"] = {str(v): int(n) for v, n in enumerate(counts) if n}
    components: dict[str, int] = {}
    structure = np.ones((3,) * lab.ndim, dtype=bool)
    for value, where in enumerate(ndimage.find_objects(lab.astype(np.int32, copy=False)), start=1):
        if where is not None:
            components[str(value)] = int(ndimage.label(lab[where] == value, structure=structure)[1])
    summary["class_components"] = components
    summary["class_border"] = _border_classes(lab)
    foreground = lab > 0
    n_fg = int(np.count_nonzero(foreground))
    summary["foreground_voxels"] = n_fg
    stats = []
    sample = np.zeros((channels, n_samples if n_fg else 0), np.float32)
    rng = np.random.default_rng([SAMPLE_SEED, case_index])
    pick = rng.integers(0, n_fg, size=n_samples) if n_fg else None
    for c in range(channels):
        values = image[c][foreground]
        stats.append(_intensity_stats(values))
        if pick is not None:
            sample[c] = values[pick]
    summary["foreground_intensity"] = stats
    return summary, sample


def _read(case: Any, dataset: Any) -> tuple[np.ndarray, np.ndarray | None, Any]:
    from .io.datasets import read_case

    data = read_case(case, dataset)
    return data.image, data.label, data.geometry.spacing


def _case_task(dataset: Any, args: tuple[int, Any, int]) -> tuple[dict[str, Any], np.ndarray]:
    index, case, n_samples = args
    image, label, spacing = _read(case, dataset)
    return summarize_case(image, label, spacing, case_id=case.id, case_index=index, n_samples=n_samples)


def _iter_cases(dataset: Any, num_workers: int) -> Iterator[tuple[int, dict[str, Any], np.ndarray]]:
    """``(index, summary, sample)`` per labelled case, in completion order (see :mod:`segpipe.parallel`)."""
    from .parallel import parallel_map

    cases = list(dataset.cases)
    n = samples_per_case(len(cases))
    tasks = [(i, c, n) for i, c in enumerate(cases)]
    # The first case runs here (first_in_parent): it imports the reader's modules (nibabel/SimpleITK,
    # scipy) once in the parent, so forked workers inherit them instead of each importing them again
    # (~1 s of CPU each). The dataset is bound to the task, so forked workers inherit it unpickled.
    results = parallel_map(
        partial(_case_task, dataset),
        tasks,
        num_workers=num_workers,
        desc="fingerprint",
        names=lambda i: f"case {cases[i].id}",
        context=str(dataset.root),
        first_in_parent=True,
    )
    with closing(results):
        for index, (summary, sample) in results:
            yield index, summary, sample


# ---------------------------------------------------------------------------- aggregate
def _axis_stats(rows: np.ndarray) -> dict[str, list[float]]:
    return {
        "median": [float(v) for v in np.median(rows, axis=0)],
        "mean": [float(v) for v in rows.mean(axis=0)],
        "min": [float(v) for v in rows.min(axis=0)],
        "max": [float(v) for v in rows.max(axis=0)],
        "percentile_10": [float(v) for v in np.percentile(rows, 10, axis=0)],
        "percentile_90": [float(v) for v in np.percentile(rows, 90, axis=0)],
    }


def _histogram(values: np.ndarray, lo: float, hi: float, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Histogram of the pooled foreground sample over [``lo``, ``hi``] (its 0.5/99.5 percentiles).

    Counts are of sampled voxels (every case weighs the same); ``below``/``above`` count the samples
    outside the range. Bin edges are ``linspace(lo, hi, bins + 1)``.
    """
    v = values.astype(np.float64, copy=False)
    if not hi > lo:  # a constant foreground: one bin around it
        lo, hi = lo - 0.5, lo + 0.5
    counts, _ = np.histogram(v, bins=bins, range=(lo, hi))
    return {
        "range": [float(lo), float(hi)],
        "bins": int(bins),
        "counts": [int(n) for n in counts],
        "below": int(np.count_nonzero(v < lo)),
        "above": int(np.count_nonzero(v > hi)),
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": float(min(values)), "median": float(np.median(values)), "max": float(max(values))}


def _class_volumes(summaries: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Class ``key``'s volume in mL over the cases that have it (min, median, max) and the fraction
    of those cases in which it touches the image's border."""
    present = [s for s in summaries if s.get("class_voxels", {}).get(key)]
    if not present:
        return {}
    volumes = [s["class_voxels"][key] * float(np.prod(s["spacing"])) / 1000.0 for s in present]
    border = sum(1 for s in present if key in s.get("class_border", []))
    return {"volume_ml": _spread(volumes), "border_case_fraction": border / len(present)}


def _image_intensity(summaries: list[dict[str, Any]], channels: int) -> dict[str, Any]:
    """Per channel, the spread over cases of each case's whole-image 1st/50th/99th percentiles."""
    out: dict[str, Any] = {}
    for c in range(channels):
        rows = [s["image_intensity"][c] for s in summaries if len(s.get("image_intensity", [])) > c]
        rows = [r for r in rows if r]
        if rows:
            out[str(c)] = {k: _spread([r[k] for r in rows]) for k in ("p01", "p50", "p99")}
    return out


def data_profile(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What a model keeps of its training data to tell when an input does not look like it
    (see :mod:`segpipe.inference.flags`): channel names, the foreground intensity percentiles and
    the spread of whole-image percentiles per channel, the spacing range (array order), and per
    class the volume range in mL and how often it touched the image border."""
    fg = fingerprint.get("foreground_intensity_per_channel") or {}
    image = fingerprint.get("image_intensity_per_channel") or {}
    channels = {}
    for c, name in (fingerprint.get("channel_names") or {}).items():
        f = fg.get(c) or {}
        channels[c] = {
            "name": name,
            **({"image": image[c]} if c in image else {}),
            **(
                {"foreground": {k: f[k] for k in ("percentile_00_5", "median", "percentile_99_5")}}
                if "median" in f
                else {}
            ),
        }
    spacing = fingerprint.get("spacing") or {}
    classes = {
        k: {
            "name": v.get("name", k),
            "case_fraction": v.get("case_fraction", 0.0),
            **{f: v[f] for f in ("volume_ml", "border_case_fraction") if f in v},
        }
        for k, v in (fingerprint.get("classes") or {}).items()
    }
    return {
        "fingerprint_version": fingerprint.get("fingerprint_version"),
        "num_cases": fingerprint.get("num_cases", 0),
        "channels": channels,
        **({"spacing": {k: spacing[k] for k in ("min", "median", "max")}} if "min" in spacing else {}),
        "classes": classes,
    }


def _aggregate(dataset: Any, summaries: list[dict[str, Any]], samples: list[np.ndarray]) -> dict[str, Any]:
    channels = {str(k): str(v) for k, v in sorted(dataset.channel_names.items())}
    n_ch = len(channels)
    intensity: dict[str, Any] = {}
    for c in range(n_ch):
        pooled = [s[c] for s in samples if s.shape[1]]
        values = np.concatenate(pooled) if pooled else np.zeros(0, np.float32)
        stats: dict[str, Any] = dict(_intensity_stats(values))
        per_case = [s["foreground_intensity"][c] for s in summaries if s["foreground_intensity"][c].get("n")]
        if per_case:  # exact extremes over every foreground voxel, not just the sample
            stats["min"] = float(min(p["min"] for p in per_case))
            stats["max"] = float(max(p["max"] for p in per_case))
        stats["n_samples"] = stats.pop("n")
        if values.size:
            stats["histogram"] = _histogram(values, stats["percentile_00_5"], stats["percentile_99_5"])
        intensity[str(c)] = stats
    spacings = np.array([s["spacing"] for s in summaries], dtype=np.float64)
    shapes = np.array([s["shape_after_crop"] for s in summaries], dtype=np.float64)
    total = sum(int(np.prod(s["shape_after_crop"], dtype=np.int64)) for s in summaries)
    fg_total = sum(s["foreground_voxels"] for s in summaries)
    classes: dict[str, Any] = {}
    for value in sorted(dataset.labels):
        if value == 0:
            continue
        key = str(value)
        voxels = [s["class_voxels"].get(key, 0) for s in summaries]
        comps = [s["class_components"].get(key, 0) for s in summaries if s["class_components"].get(key, 0)]
        classes[key] = {
            "name": str(dataset.labels[value]),
            "voxels": int(sum(voxels)),
            "voxel_fraction": float(sum(voxels) / total) if total else 0.0,
            "foreground_fraction": float(sum(voxels) / fg_total) if fg_total else 0.0,
            "case_fraction": float(sum(1 for v in voxels if v) / len(summaries)) if summaries else 0.0,
            "median_voxels_when_present": float(np.median([v for v in voxels if v])) if any(voxels) else 0.0,
            "median_components_when_present": float(np.median(comps)) if comps else 0.0,
            "max_components": int(max(comps)) if comps else 0,
            **_class_volumes(summaries, key),
        }
    return {
        "channel_names": channels,
        "labels": {str(k): str(v) for k, v in sorted(dataset.labels.items())},
        **({"regions": dataset.regions} if dataset.regions else {}),
        "num_cases": len(summaries),
        "foreground_intensity_per_channel": intensity,
        "image_intensity_per_channel": _image_intensity(summaries, n_ch),
        "spacing": _axis_stats(spacings) if len(summaries) else {},
        "shape_after_crop": _axis_stats(shapes) if len(summaries) else {},
        "median_relative_size_after_crop": float(np.median([s["relative_size_after_crop"] for s in summaries]))
        if summaries
        else 1.0,
        "total_voxels_after_crop": int(total),
        "classes": classes,
    }


def compute_fingerprint(dataset: Any, *, num_workers: int | None = None) -> dict[str, Any]:
    """Read every labelled case of ``dataset`` once and return the fingerprint dict (no caching).

    ``dataset`` is a :class:`segpipe.io.datasets.Dataset`. Deterministic: the same data gives the
    same dict whatever ``num_workers`` is.
    """
    from .errors import DatasetError
    from .parallel import resolve_num_workers
    from .splits import N_FOLDS

    if not dataset.cases:
        raise DatasetError(
            f"{dataset.root}: no labelled training cases to fingerprint",
            hint=f"add cases with labels to the dataset (training needs at least one; {N_FOLDS}-fold "
            f"cross-validation at least {N_FOLDS})",
        )
    workers = resolve_num_workers(num_workers)
    n_cases = len(dataset.cases)
    summaries: list[dict[str, Any]] = [{} for _ in range(n_cases)]
    samples: list[np.ndarray] = [np.zeros((0, 0), np.float32)] * n_cases
    for index, summary, sample in _iter_cases(dataset, workers):
        summaries[index], samples[index] = summary, sample
    fingerprint = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "dataset": str(dataset.name),
        "sampling": {
            "seed": SAMPLE_SEED,
            "samples_per_case": samples_per_case(n_cases),
            "with_replacement": True,
            "connectivity": "full",
        },
        **_aggregate(dataset, summaries, samples),
        "cases": summaries,
    }
    return fingerprint


# ---------------------------------------------------------------------------- cache
def dataset_signature(dataset: Any) -> dict[str, Any]:
    """Digest of what the fingerprint depends on: files (path, size, mtime), channels, labels.

    A DICOM series folder counts as every file below it (a slice replaced or truncated changes
    the digest; the folder's own times do not see that): ``scheme`` 2. Scheme 1 (no ``scheme``)
    counted the folder's own size and time."""
    from .io.datasets import source_files

    entries = []
    root = Path(dataset.root)
    for case in dataset.cases:
        for path in case.files():
            p = Path(path)
            for f in source_files(p):
                st = f.stat()
                try:
                    rel = str(f.relative_to(root))
                except ValueError:
                    rel = str(f)
                entries.append([case.id, rel, st.st_size, st.st_mtime_ns])
    payload = {
        "version": FINGERPRINT_VERSION,
        "samples_per_case": MAX_SAMPLES_PER_CASE,
        "channel_names": {str(k): str(v) for k, v in sorted(dataset.channel_names.items())},
        "labels": {str(k): str(v) for k, v in sorted(dataset.labels.items())},
        **({"regions": dataset.regions} if dataset.regions else {}),
        "files": entries,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return {"files": len(entries), "bytes": int(sum(e[2] for e in entries)), "sha256": digest, "scheme": 2}


def _cached(path: Path) -> dict[str, Any] | None:
    """The fingerprint stored at ``path``, or None when there is none or it cannot be read."""
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return cached if isinstance(cached, dict) else None


def source_change(path: str | os.PathLike[str], dataset: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(then, now)``: the dataset's file record in the fingerprint at ``path`` and its record
    today, when they differ (the dataset changed since it was fingerprinted); else None."""
    planned = (_cached(Path(path)) or {}).get("source") or {}
    if not planned:
        return None
    now = dataset_signature(dataset)
    return None if planned.get("sha256") == now["sha256"] else (planned, now)


def dumps(data: dict[str, Any]) -> str:
    """Alias of :func:`segpipe.io.jsonio.dumps` (canonical JSON text)."""
    from .io.jsonio import dumps as canonical

    return canonical(data)


def write_json_atomic(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Alias of :func:`segpipe.io.jsonio.write_json`."""
    from .io.jsonio import write_json

    return write_json(path, data)


def load_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``fingerprint.json``; missing or corrupt → StateError with the command that rebuilds it."""
    from .io.jsonio import read_json

    data: dict[str, Any] = read_json(path, what="fingerprint", hint="rerun `segpipe plan DATASET force=true`")
    return data


def fingerprint_dataset(
    dataset: Any, path: str | os.PathLike[str], *, force: bool | None = None, num_workers: int | None = None
) -> dict[str, Any]:
    """Fingerprint ``dataset`` into the JSON file ``path``, reusing it when the dataset is unchanged.

    ``path`` is the fingerprint file (``DatasetWorkspace.fingerprint_path``); a path without a
    ``.json`` suffix is taken as the folder to hold ``fingerprint.json``. The cache is valid while
    the signature (file list, sizes, modification times, channels, labels, fingerprint version)
    matches; ``force=True`` recomputes regardless. A corrupt cache file is recomputed.
    """
    force = configured(force, "force")
    from .io.atomic import write_text
    from .io.jsonio import dumps as canonical

    path = Path(path)
    if path.suffix != ".json":
        path = path / FINGERPRINT_FILE
    signature = dataset_signature(dataset)
    if not force:
        cached = _cached(path)
        if cached is not None and cached.get("source") == signature:
            return cached
    fingerprint = compute_fingerprint(dataset, num_workers=num_workers)
    fingerprint["source"] = signature
    # Round-trip through JSON so the returned dict is exactly what a later cache hit returns.
    text = canonical(fingerprint)
    write_text(path, text)
    result: dict[str, Any] = json.loads(text)
    return result
