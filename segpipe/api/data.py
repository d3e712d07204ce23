"""The API's dataset commands: ``info``, ``check``, ``plan`` and ``preprocess``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import CheckReport, check_dataset
from ..config import to_container
from ..errors import SegpipeError, UsageError
from ..io.formats import image_extension
from ..io.image import is_dicom_source, read_header, read_image
from ..io.nifti import no_orientation_warning
from .common import (
    PathLike,
    changed_since_planning,
    composed,
    configurations,
    dataset_once,
    named,
    paths_checked,
    planned_dataset,
)


@paths_checked
def info(path: PathLike, **settings: Any) -> dict[str, Any]:
    """What a reader sees in ``path``: format, shape, spacing, origin, direction, dtype, value range.

    For a DICOM folder or file the result also lists every series found (``series``) and, when
    one image series can be chosen (``series=``, ``modality=`` and the other DICOM read options
    select and admit it), the volume it reads to; otherwise ``volume_error`` says why none was read.
    """
    cfg = composed("info", settings)
    dicom_options = {k: v for k, v in to_container(cfg.dicom).items()}
    p = Path(path).expanduser()
    out: dict[str, Any] = {"path": str(p)}
    if p.is_dir() and (p / "dataset.json").is_file():
        raise UsageError(
            f"{p} is a dataset folder (it holds dataset.json); `segpipe info` describes one image "
            "file or one DICOM folder",
            hint=f"run `segpipe check {p}` for the whole dataset, or `segpipe info` on one of its images",
        )
    if p.exists() and is_dicom_source(p):
        from ..io.dicom import describe_dicom

        out.update(describe_dicom(p, series=dicom_options["series"], modality=dicom_options["modality"]))
        out["format"] = "DICOM"
        try:
            array, geometry = read_image(p, **dicom_options)
        except SegpipeError as exc:  # the listing is still useful when no single series can be read
            out["volume_error"] = str(exc)
            return out
        out.update(_volume_info(array, geometry))
        return out
    changed = sorted(k for k in settings if k not in ("spacing_tolerance", "dicom.spacing_tolerance"))
    if changed:
        raise UsageError(
            f"{p}: DICOM read options ({', '.join(changed)}) apply to DICOM input only", hint=f"segpipe info {p}"
        )
    if p.is_dir():
        images = sorted(q.name for q in p.iterdir() if q.is_file() and image_extension(q))
        raise UsageError(
            f"{p} is a folder without DICOM files" + (f"; it holds {len(images)} image file(s)" if images else ""),
            hint=(
                f"pass one image file, e.g. segpipe info {p / images[0]}"
                if images
                else "pass an image file (.nii.gz, .nrrd, .mha) or a folder of DICOM files"
            ),
        )
    header = read_header(p)
    array, geometry = read_image(p)
    out.update({"format": header.format, "dimension": header.dimension, "stored_dtype": header.dtype})
    out.update(_volume_info(array, geometry))
    unoriented = no_orientation_warning(p)
    if unoriented:
        out["warnings"] = [unoriented]
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


@paths_checked
def check(dataset: PathLike, **settings: Any) -> CheckReport:
    """Read every case of ``dataset`` once and report each problem (see :mod:`segpipe.checks`).

    Settings: ``num_workers``.
    """
    cfg = composed("check", settings)
    return check_dataset(dataset, num_workers=cfg.num_workers)


@paths_checked
def plan(dataset: PathLike, *, log: Any = None, **settings: Any) -> dict[str, Any]:
    """Fingerprint ``dataset`` (cached; ``force=True`` recomputes) and plan its configurations.

    Settings are those of ``segpipe plan`` (``segpipe plan --help``): ``work_dir``,
    ``dataset_name`` (the dataset's folder in the workspace; default: the dataset folder's name,
    in ASCII letters, digits, '.', '_' and '-'),
    ``num_workers``, ``force`` and every planner setting (``gpu_memory_gb``, ``configurations``,
    ``target_spacing``, …; :class:`segpipe.planning.PlanSettings`). Writes ``fingerprint.json``,
    ``plans.json``, ``plan_summary.md`` and ``dataset_report.png`` into the dataset's workspace
    folder; returns ``{"dataset", "plans_path", "fingerprint_path", "configurations": [summary
    rows], "plan": plan dict, ...}``. A different dataset already planned under the same name
    is refused (pass ``dataset_name=``).
    """

    from ..io.datasets import load_dataset
    from ..planning import PlanSettings, plan_summary_rows, run_planning
    from ..workspace import Workspace, default_dataset_name

    cfg = composed("plan", settings)
    planner_settings = PlanSettings.from_mapping(to_container(cfg.planner))
    ds = load_dataset(dataset)
    dws = Workspace.at(cfg.work_dir).dataset(cfg.dataset_name or default_dataset_name(ds.name))
    ds = named(ds, dws.name)  # the fingerprint and plan carry the workspace name
    # run_planning checks the workspace (writable, not another dataset's) before reading anything
    result = run_planning(ds, dws, planner_settings, force=cfg.force, num_workers=cfg.num_workers)
    return {
        "dataset": dws.name,
        "dataset_path": str(ds.root),
        "plans_path": str(result.plans_path),
        "fingerprint_path": str(result.fingerprint_path),
        "plan_summary_path": str(result.plan_summary_path),
        "dataset_report_path": str(result.dataset_report_path),
        "configurations": plan_summary_rows(result.plan),
        "plan": result.plan.to_dict(),
    }


@paths_checked
def preprocess(dataset: PathLike | None = None, *, log: Any = None, **settings: Any) -> dict[str, Any]:
    """Preprocess the labelled cases of a planned dataset into the cache of each planned configuration.

    ``dataset``: the dataset folder that was planned, its workspace name, or None when the
    workspace holds one planned dataset (``dataset=NAME`` as a setting works too). Settings:
    ``work_dir``, ``dataset``, ``config`` (one configuration name or a list; default every
    planned one; ``configuration`` is an alias), ``num_workers``, ``force``. Configurations on
    the same grid share one cache folder. Unchanged, valid entries are reused unless ``force``.
    Returns ``{"dataset", "plans_path", "configurations": {name: {"cache_dir", "processed",
    "reused", "seconds"}}}``.
    """
    from ..preprocessing import cache_dir_for, preprocess_dataset, spec_from_plan
    from ..workspace import dataset_lock

    dataset = dataset_once(dataset, settings)
    config_value = settings.pop("config", settings.pop("configuration", None))
    cfg = composed("preprocess", settings)
    ws, dws, the_plan, ds = planned_dataset("preprocess", cfg.work_dir, dataset)
    names = configurations(config_value, the_plan)
    changed = changed_since_planning(dws, ds)
    if changed:
        logging.getLogger("segpipe").warning(changed)
    out: dict[str, Any] = {}
    done: dict[Path, dict[str, Any]] = {}
    with dataset_lock(dws, "preprocess"):
        for name in names:
            cache = cache_dir_for(ws.root, the_plan, name, dataset=dws.name)  # a clear error for an unknown name
            if cache in done:
                out[name] = {**done[cache], "shared_with": done[cache]["configuration"]}
                continue
            if log:
                log(f"preprocessing {dws.name} for {name} into {cache}")
            res = preprocess_dataset(
                ds,
                spec_from_plan(the_plan, name),
                cache,
                num_workers=cfg.num_workers,
                force=cfg.force,
                desc=f"preprocess {name}",
            )
            done[cache] = {"configuration": name, **res.to_dict()}
            out[name] = res.to_dict()
    result = {"dataset": dws.name, "plans_path": str(dws.plans_path), "configurations": out}
    return {**result, "dataset_changed_since_plan": changed} if changed else result
