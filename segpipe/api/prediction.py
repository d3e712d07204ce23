"""The API's commands on trained models and their predictions: ``infer``, ``export``, ``evaluate``
and ``find_best``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import to_container
from ..errors import UsageError
from .common import PathLike, composed, dataset_once, paths_checked


def _predictor(model: PathLike | None, cfg: Any, config_value: Any, dataset: PathLike | None) -> Any:
    """The predictor of a model folder (``model``) or of the workspace's trained runs."""
    from ..inference import Predictor
    from ..inference.model import CHECKPOINTS

    options = {
        "tta": bool(cfg.infer.tta),
        "overlap": float(cfg.infer.overlap),
        "window": str(cfg.infer.window),
        "batch_size": cfg.infer.batch_size,
        "device": str(cfg.infer.device),
        "runtime": str(cfg.infer.runtime),
        "precision": str(cfg.infer.precision),
        "strict": bool(cfg.infer.strict),
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
        return Predictor.from_model(
            model, configs=config_value, folds=folds, checkpoint=str(cfg.infer.checkpoint), **options
        )
    return Predictor.from_workspace(
        cfg.work_dir, dataset, configs=config_value, folds=folds, checkpoint=str(cfg.infer.checkpoint), **options
    )


def _checked_quantize(cfg: Any, runtime: str) -> str | None:
    """The export's ``quantize`` setting, checked with its tolerance and the runtime."""
    from ..inference.quantize import check_quantize

    quantize = check_quantize(cfg.infer.quantize, cfg.infer.quantize_tolerance)
    if quantize and runtime == "torch":
        raise UsageError(
            "quantize=int8 stores networks for OpenVINO, and runtime=torch asks for none",
            hint="runtime=openvino quantize=int8 (or leave runtime out)",
        )
    return quantize


def _calibration(cfg: Any, dws: Any, plan: Any, model: Any) -> Any:
    """Where the int8 networks' calibration patches and validation cases come from: the workspace's
    preprocessing caches and its folds."""
    import json

    from ..errors import StateError
    from ..inference.quantize import Calibration
    from ..preprocessing import Cache

    try:
        splits = json.loads(dws.splits_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise StateError(
            f"{dws.splits_path}: the folds cannot be read, so int8 networks cannot be checked on validation cases",
            hint="train a fold first (it writes the folds), then export again",
        ) from None
    caches = {
        c: Cache.for_configuration(cfg.work_dir, plan, c, dataset=dws.name)
        for c in {m.configuration for m in model.members}
    }
    return Calibration(caches=caches, splits=splits, tolerance=float(cfg.infer.quantize_tolerance))


def _export_nnunet(folder: PathLike, output: PathLike, cfg: Any, *, runtime: str, overwrite: bool) -> dict[str, Any]:
    """``segpipe export <nnU-Net trained model folder> -o OUT``: the same networks as a segpipe model folder."""
    from ..inference import export_model
    from ..inference.model import parse_folds
    from ..inference.nnunet_folder import load_nnunet_folder

    if str(cfg.infer.quantize or "").lower() not in ("", "none", "false"):
        raise UsageError(
            f"{folder}: quantize=int8 needs the folds' training and validation cases of a segpipe workspace",
            hint="export the nnU-Net model without quantize",
        )
    model = load_nnunet_folder(
        folder, folds=parse_folds(to_container(cfg.infer)["folds"]), checkpoint=str(cfg.infer.checkpoint)
    )
    out = export_model(model, output, overwrite=overwrite, openvino=runtime == "openvino")
    return {
        "warnings": [],
        "model": str(out),
        "dataset": model.plan.dataset,
        "members": [{"configuration": m.configuration, "fold": m.fold, "validation_dice": None} for m in model.members],
        "postprocessing": model.postprocessing,
    }


@paths_checked
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
    ``probabilities``, ``report``, ``strict``), the ``dicom`` reading options and ``trainer`` (``trainer="ddp"``,
    ``devices``, ``num_nodes``: the cases shared out among one process per device, see
    :mod:`segpipe.inference.distributed`; a script using it is run again in each process, so its
    top level belongs under ``if __name__ == "__main__":``). Finished cases are skipped unless
    ``overwrite``; a case that fails is reported in ``failed`` and the others go on. Returns
    ``{"output", "written", "skipped", "failed", "cases", "model", "seconds"}`` (the same in every
    process of a distributed batch, with its ``rank`` and the number of ``processes``).
    """
    from ..inference import OUTPUT_FORMATS, default_output_dir, discover_inputs, infer_cases
    from ..inference.distributed import infer_cases_ddp, predict_trainer, process_settings, rank_device
    from ..inference.outputs import check_output_apart

    dataset = settings.pop("dataset", None)
    config_value = settings.pop("config", settings.pop("configuration", None))
    cfg = composed("infer", settings)
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

    fmt, probabilities, report = str(cfg.infer.format), bool(cfg.infer.probabilities), bool(cfg.infer.report)
    options: dict[str, Any] = {
        "fmt": fmt,
        "probabilities": probabilities,
        "overwrite": overwrite,
        "progress": progress,
        "report": report,
    }
    if trainer is None:
        result = infer_cases(predictor, cases, out, **options)
    else:
        result = infer_cases_ddp(trainer, predictor, cases, out, **options)
    return {**result, "cases": [c.id for c in cases]}


@paths_checked
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
    ``folds`` (default every trained fold), ``checkpoint`` (``final`` or ``best``), ``runtime``
    (``openvino`` also stores the networks converted for OpenVINO, so that a CPU predicting with the
    same OpenVINO version loads them without converting) and ``quantize`` (``int8`` also stores
    each network quantised to int8, calibrated on its fold's training patches and refused when its
    fold's validation Dice falls more than ``quantize_tolerance`` below fp32's: see
    :mod:`segpipe.inference.quantize`). Returns ``{"model", "members",
    "postprocessing"}``.
    """
    from ..inference import export_model, workspace_model
    from ..inference.model import export_warnings, parse_configs, parse_folds
    from ..inference.nnunet_folder import is_nnunet_folder
    from ..planning import load_plan
    from ..workspace import find_dataset

    dataset = dataset_once(dataset, settings)
    config_value = settings.pop("config", settings.pop("configuration", None))
    cfg = composed("export", settings)
    runtime = str(cfg.infer.runtime).strip().lower()
    quantize = _checked_quantize(cfg, runtime)
    if quantize:
        runtime = "openvino"  # an int8 network is an OpenVINO one, stored beside its fp32 model
    if runtime != "auto":  # a setting is checked before the workspace: unknown, or OpenVINO not installed
        import torch

        from ..inference.runtimes import choose_runtime

        choose_runtime(runtime, torch.device("cpu"))
    if dataset is not None and is_nnunet_folder(dataset):
        return _export_nnunet(dataset, output, cfg, runtime=runtime, overwrite=overwrite)
    _ws, dws = find_dataset(cfg.work_dir, dataset, "export")
    the_plan = load_plan(dws.plans_path)
    model = workspace_model(
        dws,
        the_plan,
        configs=parse_configs(config_value),
        folds=parse_folds(to_container(cfg.infer)["folds"]),
        checkpoint=str(cfg.infer.checkpoint),
    )
    calibration = _calibration(cfg, dws, the_plan, model) if quantize else None
    out = export_model(model, output, overwrite=overwrite, openvino=runtime == "openvino", quantize=calibration)
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


@paths_checked
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
    from ..workflows.evaluate import evaluate_folders

    cfg = composed("evaluate", settings)
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


@paths_checked
def find_best(dataset: PathLike | None = None, *, log: Any = None, **settings: Any) -> dict[str, Any]:
    """Choose the best configuration or ensemble and its post-processing from the cross-validation
    predictions (``segpipe find-best``); writes ``best_configuration.json``, which ``infer`` and
    ``export`` then use. Settings: ``work_dir``, ``dataset``. Returns the decision with every
    candidate's score (``configurations``, ``mean_fg_dice``, ``postprocessing``, ``candidates``, …).
    """
    from ..planning import load_plan
    from ..workflows.find_best import find_best as _find_best
    from ..workspace import find_dataset

    dataset = dataset_once(dataset, settings)
    cfg = composed("find-best", settings)
    _ws, dws = find_dataset(cfg.work_dir, dataset, "find-best")
    result = _find_best(dws, load_plan(dws.plans_path), log=log)
    return {"dataset": dws.name, **result}
