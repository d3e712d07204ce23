"""Full-case validation of a fold: every validation case predicted whole, scored, and its softmax kept.

:func:`validate_cases` runs what nnU-Net's final validation runs, on segpipe's preprocessing cache:

* each case is read from the cache (image [C, Z, Y, X], label [Z, Y, X]) and predicted in full by
  the Gaussian-weighted sliding window of its plan configuration
  (:func:`segpipe.inference.predict_case_logits`);
* the argmax is scored against the cached label per foreground class (:func:`segpipe.evaluation.evaluate_case`:
  Dice NaN when reference and prediction are both empty, voxels of the ignore label count nowhere);
* the fold's validation folder receives ``summary.json`` (nnU-Net's layout,
  :func:`~segpipe.evaluation.write_summary`) and ``dice_per_case.csv`` (one row per case, one column
  per class, :func:`~segpipe.evaluation.write_case_metrics`);
* with ``save_probabilities`` the softmax of each case is kept as ``<case>.npy``: float16
  [K, Z, Y, X] on the cache's grid (transposed, cropped and resampled as the cache holds the case;
  the cache's ``properties.json`` records how to restore it), for ensembling and for choosing the
  post-processing later. :func:`load_probabilities` reads one back.

Scoring on the cache's grid, not on the original image, is what nnU-Net's pseudo-Dice does too; its
final validation scores after restoring the original geometry, which differs only where resampling
moves the boundary by a voxel.

Memory: one case at a time. The logits are float32; the softmax is computed in place in float32 and
converted to float16 on the way to the file, so a case costs its logits once plus a float16 copy;
nothing is float64. Every file is written atomically.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arrays import regions_to_labels
from ..checkpoint import capture_rng, restore_rng
from ..errors import ConfigError, DataError, StateError
from ..evaluation import (
    CaseMetrics,
    class_mean_dice,
    evaluate_case,
    evaluate_regions,
    mean_foreground_dice,
    write_case_metrics,
    write_summary,
)
from ..inference import predict_case_logits
from ..io.atomic import save_npy
from ..networks import network_outputs
from ..planning import Plan, PlanConfig, load_plan
from ..preprocessing import Cache
from ..progress import Progress
from ..settings import configured
from ..workspace import VALIDATION_SUMMARY_FILE
from .budget import FORWARD_SHARE, WINDOW_OVERHEAD

__all__ = [
    "FoldValidation",
    "CASE_METRICS_FILE",
    "PROBABILITIES_DTYPE",
    "SUMMARY_FILE",
    "format_validation",
    "load_probabilities",
    "plan_classes",
    "probabilities_path",
    "softmax_float16",
    "validate_cases",
]

log = logging.getLogger("segpipe")

SUMMARY_FILE = VALIDATION_SUMMARY_FILE
CASE_METRICS_FILE = "dice_per_case.csv"
PROBABILITIES_SUFFIX = ".npy"
PROBABILITIES_DTYPE = np.float16
IGNORE_LABEL_NAME = "ignore"

CaseProgress = Callable[[int, int], None] | bool | None


# ---------------------------------------------------------------------------- helpers
def plan_classes(plan: Plan, *, ignore_index: int | None = None) -> tuple[dict[int, str], int | None]:
    """The foreground classes of ``plan`` as ``{label: name}`` and the ignore label.

    The ignore label is ``ignore_index`` when given, else the label named ``ignore`` in the plan
    (case-insensitive), else None; it is never a class. Background (0) is not a class either.
    """
    labels: dict[int, str] = {}
    for key, name in plan.labels.items():
        try:
            labels[int(key)] = str(name)
        except (TypeError, ValueError):
            raise StateError(
                f"plan label {key!r} is not an integer", hint="re-plan the dataset with `segpipe plan DATASET`"
            ) from None
    if ignore_index is None:
        named = [k for k, v in labels.items() if v.lower() == IGNORE_LABEL_NAME]
        ignore_index = named[0] if named else None
    classes = {k: v for k, v in sorted(labels.items()) if k != 0 and k != ignore_index}
    if not classes:
        raise StateError("the plan has no foreground class to validate", hint="check the dataset's labels and re-plan")
    return classes, ignore_index


def probabilities_path(out_dir: str | os.PathLike[str], case_id: str) -> Path:
    """Where :func:`validate_cases` keeps the softmax of ``case_id``: ``<out_dir>/<case>.npy``."""
    return Path(out_dir) / f"{case_id}{PROBABILITIES_SUFFIX}"


def load_probabilities(out_dir: str | os.PathLike[str], case_id: str, *, mmap: bool = True) -> np.ndarray:
    """The float16 softmax [K, Z, Y, X] of ``case_id`` kept by :func:`validate_cases` (memory-mapped by default)."""
    path = probabilities_path(out_dir, case_id)
    if not path.is_file():
        raise StateError(
            f"{path}: no saved probabilities for case {case_id}",
            hint="train the fold to its end (its final validation keeps them): segpipe train fold=K",
        )
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as exc:
        raise StateError(f"{path}: unreadable probabilities ({exc})", hint="run the fold's validation again") from None


def softmax_float16(logits: torch.Tensor) -> np.ndarray:
    """Softmax over axis 0 of float32 ``logits`` [K, ...], computed in place (``logits`` is overwritten),
    returned as a float16 numpy array on the CPU. Never float64; one extra array the size of a class."""
    with torch.inference_mode():  # the sliding window's logits are inference tensors: in place only in this mode
        if logits.dtype != torch.float32:
            logits = logits.float()
        peak = logits.amax(dim=0, keepdim=True)
        logits.sub_(peak).exp_()
        total = logits.sum(dim=0, keepdim=True)
        logits.div_(total)
        return logits.to(device="cpu", dtype=torch.float16).numpy()


def _resolve_plan(plan: Plan | str | os.PathLike[str]) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return load_plan(plan)
    raise ConfigError(f"plan must be a Plan or the path of a plans.json, got {type(plan).__name__}")


def _resolve_cache(cache: Cache | str | os.PathLike[str]) -> Cache:
    if isinstance(cache, Cache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return Cache(cache)
    raise ConfigError(f"cache must be a Cache or the path of a cache folder, got {type(cache).__name__}")


@dataclass(frozen=True)
class _CaseValidation:
    """What predicting and scoring one validation case needs: the network, the cache, the sliding
    window's settings, the classes to score and where the softmax goes (None: not kept)."""

    network: Any
    cache: Cache
    config: PlanConfig
    window_kwargs: dict[str, Any]
    class_list: list[int]
    ignore: int | None
    probabilities_dir: Path | None
    #: a region plan: each region's label values and the value it writes (scored by region), else None
    regions: dict[str, Any] | None = None
    #: the 3-D cascade: the cascade stage's files of this stage's predictions (written when they are
    #: kept), and this stage's inputs from the previous one (see :mod:`segpipe.training.cascade`)
    cascade: CascadeIO | None = None


@dataclass
class CascadeIO:
    """A validation's part in the 3-D cascade: ``plan``; ``next_stage`` (the stage that takes this
    one's predictions) and ``next_dir`` (where they go); ``previous`` (``{case: .npy}``, this stage's
    extra input) and the label values of each of its channels."""

    plan: Any
    next_stage: str | None = None
    next_dir: Path | None = None
    previous: Mapping[str, Path] | None = None
    previous_channels: list[list[int]] | None = None


def _validation_ids(case_ids: Sequence[str]) -> list[str]:
    """The validation cases as strings, refused when there are none or one is listed twice."""
    ids = [str(c) for c in case_ids]
    if not ids:
        raise ConfigError(
            "no validation cases to predict",
            hint="validate a cross-validation fold (0-4); fold=all trains on every case",
        )
    if len(set(ids)) != len(ids):
        dupes = sorted({c for c in ids if ids.count(c) > 1})
        raise ConfigError(f"validation cases listed twice: {', '.join(dupes)}")
    return ids


def _window_kwargs(
    overlap: float,
    num_classes: int,
    *,
    device: torch.device | str | None,
    batch_size: int | None,
    autocast_dtype: torch.dtype | None,
) -> dict[str, Any]:
    """The sliding window's keyword arguments: the overlap and class count, and whichever of the others are given."""
    window_kwargs: dict[str, Any] = {"overlap": overlap, "num_classes": num_classes}
    if device is not None:
        window_kwargs["device"] = device
    if batch_size is not None:
        window_kwargs["batch_size"] = int(batch_size)
    if autocast_dtype is not None:
        window_kwargs["autocast_dtype"] = autocast_dtype
    return window_kwargs


def _validate_case(setup: _CaseValidation, cid: str) -> tuple[CaseMetrics, str | None]:
    """Predict case ``cid`` whole, score its argmax against the cached label and keep its softmax
    when asked: its metrics and the softmax's path (None when not kept)."""
    image, label, props = setup.cache.load(cid, mmap=False)
    io = setup.cascade
    if io is not None and io.previous is not None:  # a cascade stage: the previous stage's prediction joins
        from ..data.cascade import previous_channels

        prev = np.load(io.previous[cid])
        image = np.concatenate([image, previous_channels(prev[None], io.previous_channels or [])[0]])
    if label is None:
        raise DataError(
            f"{setup.cache.case_dir(cid)}: case {cid} is cached without a label, so it cannot be validated",
            hint="validate labelled cases only (the fold's validation cases are labelled)",
        )
    if tuple(image.shape[1:]) != tuple(label.shape):
        raise StateError(
            f"{setup.cache.case_dir(cid)}: cached image {tuple(image.shape)} and label {tuple(label.shape)} "
            "differ in size",
            hint="run `segpipe preprocess force=true`",
        )
    logits = predict_case_logits(setup.network, image, setup.config, **setup.window_kwargs)
    assert logits is not None  # no sink: the whole case's logits
    del image
    reference = torch.from_numpy(np.asarray(label))
    if setup.regions:  # each region's sigmoid above 0.5 writes its value; scored region by region
        probs = torch.sigmoid(logits.float())
        pred_map = regions_to_labels(probs.cpu().numpy(), setup.regions["class_order"])
        metrics = evaluate_regions(pred_map, np.asarray(label), setup.regions["regions"], case=cid)
    else:
        pred = logits.argmax(dim=0)
        metrics = evaluate_case(pred, reference.to(pred.device), setup.class_list, case=cid, ignore_index=setup.ignore)
        del pred
    del reference
    saved = None
    if setup.probabilities_dir is not None and io is not None and io.next_stage and io.next_dir is not None:
        from .cascade import save_next_stage

        save_next_stage(io.plan, io.next_stage, logits, props, io.next_dir / f"{cid}.npy")
    if setup.probabilities_dir is not None:
        path = probabilities_path(setup.probabilities_dir, cid)
        save_npy(path, probs.half().cpu().numpy() if setup.regions else softmax_float16(logits))
        saved = str(path)
    return metrics, saved


def _cascade_io(plan: Any, configuration: str, out: Path, previous: Mapping[str, Path] | None) -> CascadeIO | None:
    """The validation's part in the 3-D cascade (None outside it)."""
    from .cascade import NEXT_STAGE_DIR, next_stage_of

    nxt = next_stage_of(plan, configuration)
    if nxt is None and not plan.previous_stage(configuration):
        return None
    if plan.previous_stage(configuration) and previous is None:
        raise StateError(f"{configuration}: a cascade stage is validated with the previous stage's predictions")
    return CascadeIO(
        plan,
        next_stage=nxt,
        next_dir=out.parent / NEXT_STAGE_DIR if nxt else None,
        previous=previous,
        previous_channels=plan.previous_channels(configuration),
    )


def _validation_summary(
    results: list[CaseMetrics],
    classes: dict[int, str],
    *,
    out: Path,
    configuration: str,
    started: float,
    saved: dict[str, str],
) -> dict[str, Any]:
    """Write ``summary.json`` and ``dice_per_case.csv`` of the scored cases and return the validation's figures."""
    class_list = list(classes)
    summary_path = write_summary(out / SUMMARY_FILE, results)
    csv_path = write_case_metrics(out / CASE_METRICS_FILE, results, labels=classes)
    means = class_mean_dice(results)
    mean_fg = mean_foreground_dice(results)
    seconds = time.perf_counter() - started
    log.debug(
        "validation %s: %d cases, mean foreground Dice %s (%s)",
        configuration,
        len(results),
        "nan" if math.isnan(mean_fg) else f"{mean_fg:.4f}",
        ", ".join(f"{classes[c]} {means.get(c, math.nan):.4f}" for c in class_list),
    )
    return {
        "mean_fg_dice": float(mean_fg),
        "class_dice": {c: float(means.get(c, math.nan)) for c in class_list},
        "class_names": dict(classes),
        "case_dice": {r.case: dict(r.dice) for r in results},
        "num_cases": len(results),
        "seconds": seconds,
        "summary_path": str(summary_path),
        "case_metrics_path": str(csv_path),
        "probabilities": saved,
    }


# ---------------------------------------------------------------------------- validation
def validate_cases(
    network: Any,
    cache: Cache | str | os.PathLike[str],
    case_ids: Sequence[str],
    plan: Plan | str | os.PathLike[str],
    configuration: str,
    *,
    out_dir: str | os.PathLike[str],
    device: torch.device | str | None = None,
    save_probabilities: bool = True,
    ignore_index: int | None = None,
    progress: CaseProgress = None,
    overlap: float | None = None,
    batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    previous: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """Predict every case of ``case_ids`` in full, score it, write the fold's validation folder.

    The 3-D cascade: a cascade stage takes ``previous`` (``{case: .npy}``, the previous stage's
    predictions on the cache's grid) as extra channels; a stage that a cascade stage follows also
    writes, with ``save_probabilities``, each case's prediction on that stage's grid to
    ``<out_dir>/../next_stage/<case>.npy`` (:mod:`segpipe.training.cascade`).

    ``network``: the configuration's network (a ``torch.nn.Module`` or any callable mapping a batch
    [B, C, *patch] to logits [B, K, *patch]; put in eval mode for the call). ``cache``: the
    preprocessing cache of ``configuration`` (a :class:`~segpipe.preprocessing.Cache` or its folder);
    every case must be cached with its label. ``plan``: a :class:`~segpipe.planning.Plan` or its
    ``plans.json``. ``out_dir``: the fold's ``validation/`` folder (created). ``device`` runs the
    network (default: the network's). ``ignore_index``: the label whose voxels count nowhere
    (default: the plan's label named ``ignore``, if any). ``progress``: True for a progress bar over
    the cases, or a callable ``(cases_done, cases_total)``. ``overlap``, ``batch_size`` (windows per
    forward pass; default the plan's batch) and ``autocast_dtype`` go to the sliding window.

    Writes ``summary.json``, ``dice_per_case.csv`` and, with ``save_probabilities``, ``<case>.npy``
    per case (float16 softmax [K, Z, Y, X] on the cache's grid). Returns::

        {"mean_fg_dice": float,            # nnU-Net's foreground mean (NaN when no class has a value)
         "class_dice": {label: float},     # per foreground class, mean over cases skipping NaN
         "class_names": {label: name},
         "case_dice": {case: {label: float}},
         "num_cases": int, "seconds": float,
         "summary_path": str, "case_metrics_path": str,
         "probabilities": {case: str}}     # empty without save_probabilities
    """
    overlap = configured(overlap, "infer.overlap")
    t0 = time.perf_counter()
    the_plan = _resolve_plan(plan)
    cfg: PlanConfig = the_plan.config(configuration)
    the_cache = _resolve_cache(cache)
    ids = _validation_ids(case_ids)
    regions = (the_plan.settings or {}).get("regions")
    if regions:  # a region plan scores its regions, numbered from 1
        classes, ignore = {i + 1: str(n) for i, n in enumerate(regions["names"])}, None
    else:
        classes, ignore = plan_classes(the_plan, ignore_index=ignore_index)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup = _CaseValidation(
        network=network,
        cache=the_cache,
        config=cfg,
        window_kwargs=_window_kwargs(
            overlap, network_outputs(the_plan), device=device, batch_size=batch_size, autocast_dtype=autocast_dtype
        ),
        class_list=list(classes),
        ignore=ignore,
        probabilities_dir=out if save_probabilities else None,
        regions=regions or None,
        cascade=_cascade_io(the_plan, configuration, out, previous),
    )

    bar = Progress(f"validation {configuration}", len(ids), unit="case") if progress is True else None
    report = progress if callable(progress) else None
    results: list[CaseMetrics] = []
    saved: dict[str, str] = {}
    try:
        for i, cid in enumerate(ids):
            metrics, path = _validate_case(setup, cid)
            results.append(metrics)
            if path is not None:
                saved[cid] = path
            if bar is not None:
                bar.update(1)
            if report is not None:
                report(i + 1, len(ids))
    finally:
        if bar is not None:
            bar.close()
    return _validation_summary(results, classes, out=out, configuration=configuration, started=t0, saved=saved)


def format_validation(result: Mapping[str, Any]) -> str:
    """One line for people: ``mean foreground Dice 0.8123 (anterior 0.8011, posterior 0.8235), 42 cases``."""

    def fmt(v: float) -> str:
        return "nan" if math.isnan(v) else f"{v:.4f}"

    names = result.get("class_names", {})
    per_class = ", ".join(f"{names.get(c, c)} {fmt(float(v))}" for c, v in result.get("class_dice", {}).items())
    return f"mean foreground Dice {fmt(float(result['mean_fg_dice']))} ({per_class}), {result['num_cases']} cases"


class FoldValidation:
    """Full-case validation of one fold: its validation cases predicted whole by the sliding window,
    scored, and written to ``out_dir`` (:func:`~segpipe.training.validation.validate_cases`).

    Runs without touching the training's random streams: every RNG state is put back afterwards,
    and deterministic algorithms only warn during it (the prediction never feeds the training).
    """

    def __init__(
        self,
        plan: Any,
        configuration: str,
        cache: Any,
        case_ids: list[str],
        out_dir: Path,
        *,
        autocast_dtype: torch.dtype | None = None,
        previous: Mapping[str, Path] | None = None,
    ):
        self.plan, self.configuration, self.cache = plan, configuration, cache
        self.previous = previous
        self.case_ids, self.out_dir, self.autocast_dtype = list(case_ids), Path(out_dir), autocast_dtype
        self.config = plan.config(configuration)

    def __call__(self, network: Any, *, device: torch.device | str | None, final: bool) -> dict[str, Any]:
        rng = capture_rng()
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return validate_cases(
                network,
                self.cache,
                self.case_ids,
                self.plan,
                self.configuration,
                out_dir=self.out_dir,
                device=device,
                save_probabilities=final,
                autocast_dtype=self.autocast_dtype,
                previous=self.previous,
            )
        finally:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
            restore_rng(rng)

    def windows(self) -> int:
        """Sliding windows over every validation case (its cached size, padded up to the patch)."""
        from ..inference import window_starts

        patch = [int(p) for p in self.config.patch_size]
        total = 0
        for case_id in self.case_ids:
            image, _label, _props = self.cache.load(case_id, mmap=True)
            spatial = [int(n) for n in image.shape[1:]]
            slices = 1
            if len(patch) == 2:  # a 2-D (or 2.5-D) network slides over each slice
                slices, spatial = spatial[0], spatial[1:]
            starts = window_starts([max(n, p) for n, p in zip(spatial, patch)], patch)
            total += slices * math.prod(len(s) for s in starts)
        return total

    def estimate_seconds(
        self, seconds_per_iteration: float, batch_size: int, *, window_seconds: float | None = None
    ) -> float:
        """The validation's time: ``window_seconds`` (a timed forward pass per window, see
        :meth:`time_window`) times :data:`WINDOW_OVERHEAD` per window; without it, each window's
        forward pass at :data:`FORWARD_SHARE` of a sample's step in a training iteration of
        ``batch_size`` samples."""
        if window_seconds is not None:
            return self.windows() * WINDOW_OVERHEAD * float(window_seconds)
        return self.windows() * FORWARD_SHARE * float(seconds_per_iteration) / max(1, int(batch_size))

    def time_window(self, network: torch.nn.Module, device: torch.device, in_channels: int) -> float:
        """Seconds per window of the sliding window's forward pass: one batch of the plan's size
        (the sliding window's), timed after a first warm-up pass, in eval mode without gradients.
        Touches neither the weights nor any random stream (the input is zeros)."""
        batch = max(1, int(self.config.batch_size))
        x = torch.zeros((batch, int(in_channels), *[int(p) for p in self.config.patch_size]), device=device)
        was_training = network.training
        network.eval()
        try:
            amp = torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
            with torch.inference_mode(), amp:
                network(x)
                start = time.perf_counter()
                network(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return (time.perf_counter() - start) / batch
        finally:
            network.train(was_training)
