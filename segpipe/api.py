"""The public Python API: one function per command, plain arguments in, plain results out.

Each CLI command is a thin wrapper over a function here; pipelines call these directly::

    import segpipe
    report = segpipe.check("data/Task04_Hippocampus")
    if report.ok:
        result = segpipe.plan("data/Task04_Hippocampus", work_dir="work", gpu_memory_gb=24)

Errors are raised as :class:`segpipe.SegpipeError` subclasses (see :mod:`segpipe.errors`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .checks import CheckReport, check_dataset
from .config import DEMO_SCHEDULE, to_container
from .errors import SegpipeError, UsageError
from .io.formats import image_extension
from .io.image import is_dicom_source, read_header, read_image
from .io.nifti import no_orientation_warning
from .settings import configured
from .splits import N_FOLDS

PathLike = str | os.PathLike[str]
_F = TypeVar("_F", bound=Callable[..., Any])


def _paths_checked(fn: _F) -> _F:
    """Refuse a path argument no file system takes (a NUL byte, a name too long) as a
    :class:`~segpipe.errors.UsageError` naming the argument, instead of the OS's raw ValueError."""
    from .config import check_path_text

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs)
        for name, value in bound.arguments.items():
            values = value.values() if isinstance(value, dict) else [value]
            for v in values:
                if isinstance(v, (str, os.PathLike)) and not isinstance(v, bool):
                    text = os.fspath(v)
                    if isinstance(text, str):
                        check_path_text(text, f"{name} ")
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _settings(command: str, settings: dict[str, Any]) -> Any:
    """The composed configuration of ``command`` with ``settings`` merged in (each default lives in conf/)."""
    from .config import settings_config

    return settings_config(command, settings)


@_paths_checked
def info(path: PathLike, **settings: Any) -> dict[str, Any]:
    """What a reader sees in ``path``: format, shape, spacing, origin, direction, dtype, value range.

    For a DICOM folder or file the result also lists every series found (``series``) and, when
    one image series can be chosen (``series=``, ``modality=`` and the other DICOM read options
    select and admit it), the volume it reads to; otherwise ``volume_error`` says why none was read.
    """
    cfg = _settings("info", settings)
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
        from .io.dicom import describe_dicom

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


@_paths_checked
def check(dataset: PathLike, **settings: Any) -> CheckReport:
    """Read every case of ``dataset`` once and report each problem (see :mod:`segpipe.checks`).

    Settings: ``num_workers``.
    """
    cfg = _settings("check", settings)
    return check_dataset(dataset, num_workers=cfg.num_workers)


@_paths_checked
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

    from .io.datasets import load_dataset
    from .planning import PlanSettings, plan_summary_rows, run_planning
    from .workspace import Workspace, default_dataset_name

    cfg = _settings("plan", settings)
    planner_settings = PlanSettings.from_mapping(to_container(cfg.planner))
    ds = load_dataset(dataset)
    dws = Workspace.at(cfg.work_dir).dataset(cfg.dataset_name or default_dataset_name(ds.name))
    ds = _named(ds, dws.name)  # the fingerprint and plan carry the workspace name
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


def _named(ds: Any, name: str) -> Any:
    """``ds`` under its workspace name (``dataset_name=`` may differ from the folder's name)."""
    import dataclasses

    return ds if ds.name == name else dataclasses.replace(ds, name=name)


def _planned_dataset(command: str, work_dir: Any, dataset: PathLike | None) -> tuple[Any, Any, Any, Any]:
    """(workspace, its dataset entry, the plan, the dataset as planned) for a command after ``plan``.

    The dataset is loaded from the folder that was planned (its source record), never a namesake.
    """
    from .io.datasets import load_dataset
    from .planning import load_plan
    from .workspace import find_dataset

    ws, dws = find_dataset(work_dir, dataset, command)
    ws.ensure_writable()
    return ws, dws, load_plan(dws.plans_path), _named(load_dataset(dws.source_dataset_path()), dws.name)


def _changed_since_planning(dws: Any, ds: Any) -> str | None:
    """A warning when the dataset's files are not those the plan was made from, else None."""
    from .fingerprint import source_change

    change = source_change(dws.fingerprint_path, ds)
    if change is None:
        return None
    planned, now = change
    if planned.get("scheme", 1) != now["scheme"]:
        return (
            f"{ds.root}: {dws.name} was planned by an earlier segpipe, which recorded the dataset's files "
            f"differently, so changes since then cannot be told — run `segpipe plan {ds.root}` again to record them"
        )
    return (
        f"{ds.root}: the dataset changed since {dws.name} was planned ({planned.get('files')} files of "
        f"{planned.get('bytes')} bytes then, {now['files']} of {now['bytes']} now, or their modification "
        f"times); its plan's spacing and intensity statistics come from the earlier files — run "
        f"`segpipe plan {ds.root}` again to refresh them"
    )


@_paths_checked
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
    from .preprocessing import cache_dir_for, preprocess_dataset, spec_from_plan
    from .workspace import dataset_lock

    dataset = _dataset_once(dataset, settings)
    config_value = settings.pop("config", settings.pop("configuration", None))
    cfg = _settings("preprocess", settings)
    ws, dws, the_plan, ds = _planned_dataset("preprocess", cfg.work_dir, dataset)
    names = _configurations(config_value, the_plan)
    changed = _changed_since_planning(dws, ds)
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


@_paths_checked
def train(*, log: Any = None, overwrite: bool = False, started: float | None = None, **settings: Any) -> dict[str, Any]:
    """Train one cross-validation fold of a planned dataset (``segpipe train fold=0``).

    Settings are those of ``segpipe train`` (``segpipe train --help``): ``work_dir``, ``dataset``
    (default: the workspace's only planned dataset), ``config`` (default ``3d_fullres``),
    ``num_workers``, the ``train`` group (``fold``, ``epochs``, ``iterations_per_epoch``,
    ``batch_size``, ``device``, ``precision``, ``max_time``, ``seed``, ``deterministic``, …),
    ``optim=`` / ``loss=`` with their options' keys (``lr``, ``alpha``, …). Preprocesses first
    when the configuration's cache lacks cases. Trains into ``runs/<config>/fold_<k>/`` of the
    dataset's workspace folder and resumes a run that was interrupted; a finished run returns at
    once (``overwrite=True`` trains it again). ``max_time`` counts from ``started`` (a
    ``time.perf_counter()`` value; default: this call; the CLI passes its own launch). Returns the
    run's summary (``run_dir``, ``epochs``, ``finished``, ``ema_fg_dice``, ``pseudo_dice``, …).
    """
    import time

    from .config import given_settings
    from .preprocessing import Cache
    from .training.optim import budget_defaults
    from .workspace import dataset_lock

    started = time.perf_counter() if started is None else float(started)
    from .training.fit import fit

    dataset = settings.pop("dataset", None)
    config_value = settings.pop("config", settings.pop("configuration", None))
    cfg = _settings("train", settings)
    ws, dws, the_plan, ds = _planned_dataset("train", cfg.work_dir, dataset)
    if config_value is None:
        config_value = "3d_fullres" if "3d_fullres" in the_plan.configurations else next(iter(the_plan.configurations))
    names = _configurations(config_value, the_plan)
    if len(names) != 1:
        raise UsageError(f"`segpipe train` trains one configuration, got {', '.join(names)}", hint="config=NAME")
    name = names[0]
    fold_text = str(cfg.train.fold)
    if fold_text != "all" and not (fold_text.isdigit() and 0 <= int(fold_text) < N_FOLDS):
        raise UsageError(
            f"fold={fold_text} is not a fold", hint=f"fold=0..{N_FOLDS - 1}, or fold=all to train on every case"
        )
    fold: int | str = int(fold_text) if fold_text.isdigit() else fold_text
    cache = Cache.for_configuration(ws.root, the_plan, name, dataset=dws.name)
    labelled = [c.id for c in ds.cases]
    if any(case_id not in cache for case_id in labelled):
        if log:
            log(f"the {name} cache of {dws.name} is incomplete: preprocessing first")
        prep = preprocess(dws.name, work_dir=str(ws.root), config=name, num_workers=cfg.num_workers, log=log)
        changed = prep.get("dataset_changed_since_plan")  # said by preprocess
    else:
        changed = _changed_since_planning(dws, ds)
        if changed:  # the cache holds what was preprocessed; the warning says the sources moved on
            logging.getLogger("segpipe").warning(changed)
    train_group = {k: v for k, v in to_container(cfg.train).items() if k != "fold"}
    optim = to_container(cfg.optim)
    changes, line = budget_defaults(
        max_time=cfg.train.max_time,
        device=str(cfg.train.device),
        given=given_settings("train", settings),
        plan_batch=the_plan.config(name).batch_size,
    )
    if line:
        train_group["batch_size"] = changes.get("batch_size", train_group["batch_size"])
        optim["schedule_interval"] = changes.get("schedule_interval", optim["schedule_interval"])
        if log:
            log(line)
    fit_settings = {
        **train_group,
        "optim": optim,
        "loss": to_container(cfg.loss),
        "trainer": to_container(cfg.trainer),
        "num_workers": cfg.num_workers,
    }
    with dataset_lock(dws, "train", shared=True):
        result = fit(
            the_plan,
            name,
            fold,
            work_dir=ws.root,
            dataset=dws.name,
            settings=fit_settings,
            overwrite=overwrite,
            log=log,
            started=started,
        )
    out = {"dataset": dws.name, "configuration": name, "fold": str(fold), **result}
    return {**out, "dataset_changed_since_plan": changed} if changed else out


def _dataset_once(dataset: PathLike | None, settings: dict[str, Any]) -> PathLike | None:
    """The dataset named as a path or as ``dataset=NAME`` (popped from ``settings``), never both."""
    if dataset is not None and settings.get("dataset") is not None:
        raise UsageError("give the dataset once: as a path or as dataset=NAME, not both")
    named = settings.pop("dataset", None)
    return dataset if dataset is not None else named


def _configurations(value: Any, the_plan: Any) -> list[str]:
    """The configuration names a ``config=`` value selects: None = every planned one."""
    from .inference.model import parse_configs

    names = parse_configs(value)
    if names is None:
        return list(the_plan.configurations)
    unknown = [n for n in names if n not in the_plan.configurations]
    if unknown or not names:
        raise UsageError(
            f"configuration {', '.join(unknown) or '(none)'} is not in the plan of {the_plan.dataset}",
            hint=f"planned: {', '.join(the_plan.configurations)} (config=NAME)",
        )
    return names


@_paths_checked
def generate_demo_data(out: PathLike, *, force: bool | None = None, seed: int = 0, dicom: bool = False) -> Path:
    """Write the embedded synthetic demo dataset to ``out``.

    ``dicom=False``: 12 labelled + 2 test NIfTI cases in MSD layout; ``dicom=True``: 3 labelled
    + 1 test case as DICOM series in the case-folder layout.
    """
    force = configured(force, "force")
    from .demo_data import generate_demo_dataset, generate_dicom_demo_dataset

    if dicom:
        return generate_dicom_demo_dataset(out, overwrite=force, seed=seed + 1)
    return generate_demo_dataset(out, overwrite=force, seed=seed)


def _predictor(model: PathLike | None, cfg: Any, config_value: Any, dataset: PathLike | None) -> Any:
    """The predictor of a model folder (``model``) or of the workspace's trained runs."""
    from .inference import Predictor
    from .inference.model import CHECKPOINTS

    options = {
        "tta": bool(cfg.infer.tta),
        "overlap": float(cfg.infer.overlap),
        "batch_size": cfg.infer.batch_size,
        "device": str(cfg.infer.device),
        "dicom": to_container(cfg.dicom),
    }
    folds = to_container(cfg.infer)["folds"]
    if str(cfg.infer.checkpoint) not in CHECKPOINTS:  # checked with -m too, where the folder fixed it at export
        raise UsageError(
            f"checkpoint={cfg.infer.checkpoint} is not one of {', '.join(CHECKPOINTS)}", hint="checkpoint=final"
        )
    if model is not None:
        if dataset is not None:
            raise UsageError("give either a model folder (-m) or dataset=NAME of the workspace, not both")
        return Predictor.from_model(model, configs=config_value, folds=folds, **options)
    return Predictor.from_workspace(
        cfg.work_dir, dataset, configs=config_value, folds=folds, checkpoint=str(cfg.infer.checkpoint), **options
    )


@_paths_checked
def infer(
    input: PathLike,  # noqa: A002 - the command's own word for what it segments
    *,
    output: PathLike | None = None,
    model: PathLike | None = None,
    overwrite: bool = False,
    log: Any = None,
    **settings: Any,
) -> dict[str, Any]:
    """Segment the case(s) of ``input`` (``segpipe infer INPUT``): an image file, a DICOM series
    folder, a folder of images or case folders, or a dataset folder (its test cases).

    ``output``: the folder for the results (default ``<INPUT>_segpipe`` beside the input).
    ``model``: a model folder from :func:`export` (default: the workspace's trained runs, chosen
    with ``work_dir``/``dataset``/``config``). Settings: the ``infer`` group (``folds``,
    ``checkpoint``, ``tta``, ``overlap``, ``batch_size``, ``device``, ``format``,
    ``probabilities``), the ``dicom`` reading options and ``trainer`` (``trainer="ddp"``,
    ``devices``, ``num_nodes``: the cases shared out among one process per device, see
    :mod:`segpipe.inference.distributed`; a script using it is run again in each process, so its
    top level belongs under ``if __name__ == "__main__":``). Finished cases are skipped unless
    ``overwrite``; a case that fails is reported in ``failed`` and the others go on. Returns
    ``{"output", "written", "skipped", "failed", "cases", "model", "seconds"}`` (the same in every
    process of a distributed batch, with its ``rank`` and the number of ``processes``).
    """
    from .inference import OUTPUT_FORMATS, default_output_dir, discover_inputs, infer_cases
    from .inference.distributed import infer_cases_ddp, predict_trainer, process_settings, rank_device
    from .inference.outputs import check_output_apart

    dataset = settings.pop("dataset", None)
    config_value = settings.pop("config", settings.pop("configuration", None))
    cfg = _settings("infer", settings)
    processes = process_settings(to_container(cfg.trainer))
    out = Path(output) if output is not None else default_output_dir(input)
    trainer = None
    if processes["name"] == "ddp":  # the trainer first: it knows this process's rank and device
        trainer = predict_trainer(
            device=str(cfg.infer.device),
            devices=processes["devices"],
            num_nodes=processes["num_nodes"],
            root=out,
        )
        cfg.infer.device = rank_device(trainer)
    predictor = _predictor(model, cfg, config_value, dataset)
    cases = discover_inputs(input, in_channels=predictor.plan.in_channels)
    check_output_apart(out, input, cases, OUTPUT_FORMATS.get(str(cfg.infer.format), ".nii.gz"))
    first = trainer is None or trainer.global_rank == 0
    say = (log if first else None) or (lambda msg: None)
    where = "" if trainer is None else f" on {trainer.world_size} processes"
    say(f"segmenting {len(cases)} case(s) into {out} with {len(predictor.model.members)} network(s){where}")

    def progress(done: int, total: int, what: str) -> None:
        say(
            f"[{done}/{total}] {what}"
            if trainer is None
            else f"[{done}/{total}, process 0 of {trainer.world_size}] {what}"
        )

    fmt, probabilities = str(cfg.infer.format), bool(cfg.infer.probabilities)
    if trainer is None:
        result = infer_cases(
            predictor, cases, out, fmt=fmt, probabilities=probabilities, overwrite=overwrite, progress=progress
        )
    else:
        result = infer_cases_ddp(
            trainer, predictor, cases, out, fmt=fmt, probabilities=probabilities, overwrite=overwrite, progress=progress
        )
    return {**result, "cases": [c.id for c in cases]}


@_paths_checked
def export(
    dataset: PathLike | None = None,
    *,
    output: PathLike,
    overwrite: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Write the trained runs of a planned dataset as a self-contained model folder (``segpipe export``).

    ``dataset``: the planned dataset (folder or workspace name; default the workspace's only one).
    Settings: ``work_dir``, ``config`` (default ``find-best``'s choice, else ``3d_fullres``),
    ``folds`` (default every trained fold) and ``checkpoint`` (``final`` or ``best``). Returns
    ``{"model", "members", "postprocessing"}``.
    """
    from .inference import export_model, workspace_model
    from .inference.model import export_warnings, parse_configs, parse_folds
    from .planning import load_plan
    from .workspace import find_dataset

    dataset = _dataset_once(dataset, settings)
    config_value = settings.pop("config", settings.pop("configuration", None))
    cfg = _settings("export", settings)
    _ws, dws = find_dataset(cfg.work_dir, dataset, "export")
    the_plan = load_plan(dws.plans_path)
    model = workspace_model(
        dws,
        the_plan,
        configs=parse_configs(config_value),
        folds=parse_folds(to_container(cfg.infer)["folds"]),
        checkpoint=str(cfg.infer.checkpoint),
    )
    out = export_model(model, output, overwrite=overwrite)
    warnings = export_warnings(model)
    for warning in warnings:  # also in the model card, under "Before use"
        logging.getLogger("segpipe").warning(f"{out}: {warning}")
    return {
        "warnings": warnings,
        "model": str(out),
        "dataset": dws.name,
        "members": [
            {"configuration": m.configuration, "fold": m.fold, "validation_dice": m.validation_dice}
            for m in model.members
        ],
        "postprocessing": model.postprocessing,
    }


def _tolerance_setting(value: Any) -> float | dict[Any, Any]:
    """``tolerance_mm`` as composed: one number, or ``{class: mm}`` (``tolerance_mm={1:2,2:0.5}``)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(value, DictConfig):
        return dict(OmegaConf.to_container(value))  # type: ignore[arg-type]
    if isinstance(value, dict):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(
            f"tolerance_mm={value!r} is neither a number of mm nor a {{class: mm}} mapping",
            hint="tolerance_mm=1.0, or tolerance_mm={1:2.0,2:0.5}",
        ) from None


@_paths_checked
def evaluate(
    predictions: PathLike,
    references: PathLike,
    *,
    output: PathLike | None = None,
    labels: dict[Any, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Score a folder of predicted label maps against the reference ones (``segpipe evaluate PRED GT``):
    per case and class Dice (nnU-Net's rules), HD95 and normalised surface Dice (mm), volumes.

    Files pair by case id; each prediction must lie on its reference's grid. Settings:
    ``tolerance_mm``, ``images`` (the cases' images, for QC overlays), ``ignore_label`` and
    ``strict`` (refuse references without a prediction; by default the predicted cases are scored,
    with a warning, and ``missing_predictions`` lists the others).
    ``evaluation.csv``, ``summary.json``, ``dice_boxplot.png`` (and ``qc/``) go to ``output``
    (default: the predictions' folder). ``labels`` (``{value: name}``): the classes to score and
    their names (default: every value the references hold). Returns the summary (``mean``,
    ``foreground_mean``, ``metric_per_case``, …) with ``output``.
    """
    from .workflows.evaluate import evaluate_folders

    cfg = _settings("evaluate", settings)
    ev = cfg.evaluate
    out = Path(output) if output is not None else Path(predictions)
    summary = evaluate_folders(
        predictions,
        references,
        labels=labels,
        tolerance_mm=_tolerance_setting(ev.tolerance_mm),
        ignore_label=ev.ignore_label,
        out_dir=out,
        qc_image_dir=ev.images,
        strict=ev.strict,
    )
    return {**summary, "output": str(out)}


@_paths_checked
def find_best(dataset: PathLike | None = None, *, log: Any = None, **settings: Any) -> dict[str, Any]:
    """Choose the best configuration or ensemble and its post-processing from the cross-validation
    predictions (``segpipe find-best``); writes ``best_configuration.json``, which ``infer`` and
    ``export`` then use. Settings: ``work_dir``, ``dataset``. Returns the decision with every
    candidate's score (``configurations``, ``mean_fg_dice``, ``postprocessing``, ``candidates``, …).
    """
    from .planning import load_plan
    from .workflows.find_best import find_best as _find_best
    from .workspace import find_dataset

    dataset = _dataset_once(dataset, settings)
    cfg = _settings("find-best", settings)
    _ws, dws = find_dataset(cfg.work_dir, dataset, "find-best")
    result = _find_best(dws, load_plan(dws.plans_path), log=log)
    return {"dataset": dws.name, **result}


#: The demo's plan: a U-Net of half the default width (16 features at full resolution, at most
#: 128), which trains ~3× faster on a CPU and is ample for the demo's three structures.
DEMO_PLAN = {"base_features": 16, "max_features_3d": 128}


@_paths_checked
def demo(*, force: bool | None = None, log: Any = None, **settings: Any) -> dict[str, Any]:
    """Run the main job on the embedded datasets: generate → check → plan → preprocess → train →
    infer (the held-out NIfTI and DICOM cases) → evaluate.

    The datasets are written to ``<work_dir>/raw/SegpipeDemo`` (NIfTI, MSD layout) and
    ``<work_dir>/raw/SegpipeDemoDICOM`` (DICOM series, case-folder layout) once (``force``
    regenerates them); the artefacts go to ``<work_dir>/<dataset>/``, the predictions of the
    held-out cases (with a DICOM-SEG for the DICOM one) to ``<work_dir>/<dataset>/demo/predictions``
    and their evaluation to ``…/demo/evaluation``. Settings: ``work_dir``, and ``epochs`` /
    ``iterations_per_epoch`` for another schedule than :data:`DEMO_SCHEDULE`. Returns one entry per step.
    """
    force = configured(force, "force")
    import shutil

    from .errors import DataError
    from .io.datasets import load_dataset
    from .workspace import Workspace

    schedule = dict(DEMO_SCHEDULE)
    for key in ("epochs", "iterations_per_epoch", "train.epochs", "train.iterations_per_epoch"):
        if key in settings:
            schedule[key.rsplit(".", 1)[-1]] = int(settings.pop(key))
    cfg = _settings("demo", settings)
    say = log or (lambda msg: None)
    ws = Workspace.at(cfg.work_dir).ensure_writable()
    data = ws.raw_dir / "SegpipeDemo"
    dicom_data = ws.raw_dir / "SegpipeDemoDICOM"
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
    planned = plan(data, work_dir=str(ws.root), force=force, **DEMO_PLAN)
    steps["plan"] = {
        "plans_path": planned["plans_path"],
        "configurations": planned["configurations"],
        "plan_summary_path": planned.get("plan_summary_path"),
    }
    say("preprocessing")
    pre = preprocess(data, work_dir=str(ws.root), force=force, log=say)
    steps["preprocess"] = {
        name: {"cache_dir": r["cache_dir"], "cases": len(r["processed"]) + len(r["reused"])}
        for name, r in pre["configurations"].items()
    }
    say(f"training 3d_fullres on fold 0: {schedule['epochs']} epochs of {schedule['iterations_per_epoch']} iterations")
    trained = train(
        work_dir=str(ws.root),
        dataset=planned["dataset"],
        config="3d_fullres",
        fold=0,
        **schedule,
        overwrite=force,
        log=say,
    )
    steps["train"] = {
        key: trained.get(key)
        for key in ("run_dir", "epochs", "finished", "already_finished", "val_dice", "validation", "validation_dir")
    }
    demo_dir = ws.dataset(planned["dataset"]).root / "demo"
    predictions, references = demo_dir / "predictions", demo_dir / "references"
    say("segmenting the held-out cases: 2 NIfTI volumes and 1 DICOM series (flip TTA)")
    common = {"work_dir": str(ws.root), "dataset": planned["dataset"], "output": predictions, "overwrite": force}
    inferred = [infer(data, log=say, **common), infer(dicom_data, log=say, **common)]
    failed = [f for r in inferred for f in r["failed"]]
    if failed:
        raise DataError(f"demo: segmenting {failed[0]['case']} failed: {failed[0]['error']}", hint="rerun with --force")
    steps["infer"] = {
        "output": str(predictions),
        "cases": [c for r in inferred for c in r["cases"]],
        "dicom_seg": sorted(p.name for p in predictions.glob("*_seg.dcm")),
    }
    # the held-out cases' reference labels side by side, named by case id
    if references.exists():
        shutil.rmtree(references)
    references.mkdir(parents=True)
    for ref in sorted((data / "labelsTs").glob("*.nii.gz")):
        shutil.copy(ref, references / ref.name)
    for case_dir in sorted(p for p in dicom_data.iterdir() if (p / "reference.nii.gz").is_file()):
        shutil.copy(case_dir / "reference.nii.gz", references / f"{case_dir.name}.nii.gz")
    say("evaluating the held-out cases against their reference labels")
    labels = {int(k): str(v) for k, v in load_dataset(data).labels.items()}
    evaluated = evaluate(predictions, references, output=demo_dir / "evaluation", labels=labels)
    steps["evaluate"] = {
        "output": evaluated["output"],
        "foreground_dice": evaluated["foreground_mean"].get("Dice"),
        "class_dice": {
            evaluated.get("labels", {}).get(c, c): m.get("Dice") for c, m in evaluated["mean"].items() if c != "0"
        },
        "cases": evaluated["n_cases"],
    }
    return steps


__all__ = [
    "check",
    "demo",
    "evaluate",
    "export",
    "find_best",
    "generate_demo_data",
    "image_extension",
    "infer",
    "info",
    "plan",
    "preprocess",
]
