"""The public Python API: one function per command, plain arguments in, plain results out.

Each CLI command is a thin wrapper over a function here; pipelines call these directly::

    import segpipe
    report = segpipe.check("data/Task04_Hippocampus")
    if report.ok:
        result = segpipe.plan("data/Task04_Hippocampus", work_dir="work", gpu_memory_gb=24)

Errors are raised as :class:`segpipe.SegpipeError` subclasses (see :mod:`segpipe.errors`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .check import CheckReport, check_dataset
from .config import resolve_work_dir
from .errors import NotAvailableError
from .io.image import image_extension, is_dicom_source, read_header, read_image

PathLike = str | os.PathLike[str]


def info(path: PathLike, **dicom_options: Any) -> dict[str, Any]:
    """What a reader sees in ``path``: format, shape, spacing, origin, direction, dtype, value range.

    For a DICOM folder or file the result also lists every series found (``series``) and, when
    one image series can be chosen (``dicom_options`` may select it), the volume it reads to.
    """
    p = Path(path).expanduser()
    out: dict[str, Any] = {"path": str(p)}
    if p.exists() and is_dicom_source(p):
        from .io.dicom import describe_dicom

        out.update(describe_dicom(p, **{k: v for k, v in dicom_options.items() if k in ("series", "modality")}))
        out["format"] = "DICOM"
        try:
            array, geometry = read_image(p, **dicom_options)
        except Exception as exc:  # the listing is still useful when no single series can be read
            from .errors import SegpipeError

            if not isinstance(exc, SegpipeError):
                raise
            out["volume_error"] = str(exc)
            return out
        out.update(_volume_info(array, geometry))
        return out
    header = read_header(p)
    array, geometry = read_image(p)
    out.update({"format": header.format, "dimension": header.dimension, "stored_dtype": header.dtype})
    out.update(_volume_info(array, geometry))
    return out


def _volume_info(array: np.ndarray, geometry: Any) -> dict[str, Any]:
    finite = np.isfinite(array) if np.issubdtype(array.dtype, np.floating) else None
    vals = array[finite] if finite is not None else array
    return {
        "channels": int(array.shape[0]),
        "shape": list(geometry.shape),
        "spacing": list(geometry.spacing),
        "origin": list(geometry.origin),
        "direction": list(geometry.direction),
        "orientation": geometry.orientation_code(),
        "dtype": str(array.dtype),
        "min": float(vals.min()) if vals.size else None,
        "max": float(vals.max()) if vals.size else None,
        "nonfinite_voxels": int(array.size - np.count_nonzero(finite)) if finite is not None else 0,
    }


def check(dataset: PathLike, *, num_workers: int | None = None) -> CheckReport:
    """Read every case of ``dataset`` once and report each problem (see :mod:`segpipe.check`)."""
    return check_dataset(dataset, num_workers=num_workers)


def plan(dataset: PathLike, *, work_dir: PathLike | None = None, gpu_memory_gb: float = 8,
         configurations: Sequence[str] | None = None, target_spacing: Sequence[float] | None = None,
         force: bool = False, num_workers: int | None = None, **settings_: Any) -> dict[str, Any]:
    """Fingerprint ``dataset`` (cached; ``force`` recomputes) and plan its configurations.

    Further keyword arguments are planner settings (:class:`segpipe.planning.PlanSettings`:
    ``base_features``, ``max_dataset_fraction``, ``context_slices_25d``, …). Writes
    ``<work_dir>/<dataset>/fingerprint.json`` and ``plans.json``; returns
    ``{"plans_path", "fingerprint_path", "configurations": [summary rows], "plan": plan dict}``.
    """
    from .io.datasets import load_dataset
    from .planning import PlanSettings, plan_summary_rows, run_planning

    ds = load_dataset(dataset)
    settings = PlanSettings.from_mapping({
        **settings_,
        "gpu_memory_gb": gpu_memory_gb,
        "configurations": list(configurations) if configurations is not None else None,
        "target_spacing": list(target_spacing) if target_spacing is not None else None,
    })
    wd = resolve_work_dir(work_dir)
    the_plan, plans_path = run_planning(ds, wd, settings, force=force, num_workers=num_workers)
    return {
        "dataset": ds.name,
        "plans_path": str(plans_path),
        "fingerprint_path": str(plans_path.parent / "fingerprint.json"),
        "configurations": plan_summary_rows(the_plan),
        "plan": the_plan.to_dict(),
    }


def preprocess(dataset: PathLike, *, work_dir: PathLike | None = None, configuration: str | Sequence[str] | None = None,
               num_workers: int | None = None, force: bool = False, log: Any = None) -> dict[str, Any]:
    """Preprocess the labelled cases of ``dataset`` into the cache of each planned configuration.

    Needs ``<work_dir>/<dataset>/plans.json`` (``segpipe plan``). ``configuration``: one name, a
    list, or None for every planned configuration; configurations on the same data (same
    spacing) share one cache folder. Unchanged entries are reused unless ``force``. Returns
    ``{"configurations": {name: {"cache_dir", "processed", "reused", "seconds"}}}``.
    """
    from .io.datasets import load_dataset
    from .planning import load_plan
    from .preprocess import cache_dir_for, preprocess_dataset, spec_from_plan

    ds = load_dataset(dataset)
    wd = resolve_work_dir(work_dir)
    plans_path = wd / ds.name / "plans.json"
    if not plans_path.is_file():
        from .errors import StateError

        raise StateError(f"{plans_path}: no plan for dataset {ds.name}", hint=f"run `segpipe plan {dataset} work_dir={wd}` first")
    the_plan = load_plan(plans_path)
    names = list(the_plan.configurations) if configuration is None else (
        [configuration] if isinstance(configuration, str) else list(configuration))
    out: dict[str, Any] = {}
    done: dict[Path, dict[str, Any]] = {}
    for name in names:
        cache = cache_dir_for(wd, the_plan, name)  # raises a clear error for an unknown name
        if cache in done:
            out[name] = {**done[cache], "shared_with": done[cache]["configuration"]}
            continue
        if log:
            log(f"preprocessing {ds.name} for {name} into {cache}")
        res = preprocess_dataset(ds, spec_from_plan(the_plan, name), cache, num_workers=num_workers, force=force)
        done[cache] = {"configuration": name, **res.to_dict()}
        out[name] = res.to_dict()
    return {"dataset": ds.name, "plans_path": str(plans_path), "configurations": out}


def generate_demo_data(out: PathLike, *, force: bool = False, seed: int = 0, dicom: bool = False) -> Path:
    """Write the embedded synthetic demo dataset to ``out``.

    ``dicom=False``: 12 labelled + 2 test NIfTI cases in MSD layout; ``dicom=True``: 3 labelled
    + 1 test case as DICOM series in the case-folder layout.
    """
    from .demo_data import generate_demo_dataset, generate_dicom_demo_dataset

    if dicom:
        return generate_dicom_demo_dataset(out, overwrite=force, seed=seed + 1)
    return generate_demo_dataset(out, overwrite=force, seed=seed)


def demo(*, work_dir: PathLike | None = None, force: bool = False, log: Any = None) -> dict[str, Any]:
    """Run the main job on the embedded dataset: generate → check → plan (→ later stages as they land).

    The datasets are written to ``<work_dir>/raw/SegpipeDemo`` (NIfTI, MSD layout) and
    ``<work_dir>/raw/SegpipeDemoDICOM`` (DICOM series, case-folder layout) once (``force``
    regenerates them); the artefacts go to ``<work_dir>/<dataset>/``. Returns one entry per step.
    """
    from .errors import DataError

    say = log or (lambda msg: None)
    wd = resolve_work_dir(work_dir)
    data = wd / "raw" / "SegpipeDemo"
    dicom_data = wd / "raw" / "SegpipeDemoDICOM"
    steps: dict[str, Any] = {}
    for folder, is_dicom in ((data, False), (dicom_data, True)):
        if force or not (folder / "dataset.json").is_file():
            say(f"generating the demo dataset in {folder}")
            generate_demo_data(folder, force=True, dicom=is_dicom)
    steps["data"] = str(data)
    steps["dicom_data"] = str(dicom_data)
    for key, folder in (("check", data), ("check_dicom", dicom_data)):
        say(f"checking {folder.name}")
        report = check(folder)
        steps[key] = {"ok": report.ok, "cases_checked": report.cases_checked, "findings": len(report.findings)}
        if not report.ok:
            raise DataError(f"{folder}: the demo dataset failed its check", hint="rerun with --force to regenerate it")
    say("planning")
    planned = plan(data, work_dir=wd, force=force)
    steps["plan"] = {"plans_path": planned["plans_path"], "configurations": planned["configurations"]}
    say("preprocessing")
    pre = preprocess(data, work_dir=wd, force=force, log=say)
    steps["preprocess"] = {name: {"cache_dir": r["cache_dir"], "cases": len(r["processed"]) + len(r["reused"])}
                           for name, r in pre["configurations"].items()}
    steps["not_yet_available"] = ["train", "infer", "evaluate"]
    return steps


def not_available(command: str, issue: str) -> None:
    """Raise the one-line 'not available yet' error of a command whose issue has not landed."""
    raise NotAvailableError(f"`segpipe {command}` is not available yet ({issue} has not landed)",
                            hint="see README, 'Status'")


__all__ = ["check", "demo", "generate_demo_data", "image_extension", "info", "plan", "preprocess"]
