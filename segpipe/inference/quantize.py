"""int8 networks for OpenVINO on a CPU: post-training quantisation with NNCF, checked on held-out cases.

``segpipe export -o model/ runtime=openvino quantize=int8`` stores, beside each network's fp32
OpenVINO model, an int8 one that ``segpipe infer -m model/ precision=int8`` runs. Per network
(a configuration's fold):

1. **Calibration**: NNCF's post-training quantisation (``nncf.quantize``: activation ranges from
   the network's own activations, asymmetric activations, fast bias correction; the first and the
   last convolution stay fp32) on patches of the plan's size drawn from
   the fold's training cases in the preprocessing cache, as training draws them (a third centred
   on foreground), with a fixed seed: the same export gives the same network.
2. **Check**: the fold's validation cases (never seen in training) segmented from the cache with
   the fp32 and the int8 network (sliding window, overlap 0.5, no flips: the flips average both
   alike), mean foreground Dice of each against the cached labels. When the int8 Dice is lower
   than fp32's by more than ``quantize_tolerance`` (0.005 by default) the export is refused
   and nothing is written; both figures go to ``model.json`` and the model card otherwise.

NNCF is an optional dependency (``pip install 'segpipe[cpu]'`` installs it with OpenVINO).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, StateError
from .runtimes import (
    NETWORK_BIN,
    NETWORK_XML,
    OPENVINO_DIR,
    compile_model,
    convert_openvino,
    int8_network_key,
    network_key,
    openvino_version,
    read_openvino,
    telemetry_declined,
)

__all__ = ["QUANTIZE_MODES", "Calibration", "check_quantize", "quantize_members"]

log = logging.getLogger("segpipe")

QUANTIZE_MODES = ("int8",)
CALIBRATION_PATCHES = 64  # patches of the plan's size: NNCF's ranges settle well before its default of 300
CALIBRATION_SEED = 20240607
NNCF_HINT = "pip install 'segpipe[cpu]' (or pip install nncf)"


@dataclass(frozen=True)
class Calibration:
    """Where a network's calibration patches and validation cases come from: the preprocessing cache
    of each configuration, and the folds' training and validation cases (``splits_final.json``)."""

    caches: Mapping[str, Any]  # configuration -> segpipe.preprocessing.Cache
    splits: Sequence[dict[str, list[str]]]
    tolerance: float = 0.005
    patches: int = CALIBRATION_PATCHES


def check_quantize(mode: Any, tolerance: Any) -> str | None:
    """``quantize`` checked (None: no quantisation, or ``int8``) with its tolerance, else a
    :class:`~segpipe.errors.ConfigError` with the fix; NNCF must be installed for ``int8``."""
    if mode is None or str(mode).strip().lower() in ("", "none", "null", "false"):
        return None
    name = str(mode).strip().lower()
    if name not in QUANTIZE_MODES:
        raise ConfigError(f"quantize={mode} is not a quantisation", hint="quantize=int8, or leave it out")
    try:
        ok = 0.0 <= float(tolerance) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            f"quantize_tolerance={tolerance} must be a Dice difference in [0, 1]", hint="quantize_tolerance=0.005"
        )
    if importlib.util.find_spec("nncf") is None:
        raise ConfigError("quantize=int8: the nncf package is not installed", hint=NNCF_HINT)
    return name


def _fold_cases(splits: Sequence[dict[str, list[str]]], fold: str) -> tuple[list[str], list[str]]:
    from ..splits import fold_cases

    return fold_cases(splits, fold)


def _calibration_patches(cache: Any, cases: Sequence[str], cfg: Any, count: int) -> list[np.ndarray]:
    """``count`` training patches [1, C, *patch] drawn from ``cases`` as training draws them."""
    from ..data import PatchSampler

    sampler = PatchSampler(cache, cases, cfg.patch_size, context_slices=int(cfg.context_slices) if cfg.dims == 2 else 0)
    rng = np.random.default_rng(CALIBRATION_SEED)
    patches: list[np.ndarray] = []
    while len(patches) < count:
        batch = sampler.sample(rng, min(count - len(patches), 8))["image"]
        patches.extend(np.ascontiguousarray(x[None].numpy(), dtype=np.float32) for x in batch)
    return patches


def _validation_dice(network: Any, cache: Any, cases: Sequence[str], cfg: Any, plan: Any) -> float:
    """Mean foreground Dice of ``network`` over the cached ``cases`` (sliding window, no flips; the
    plan's ignore label counts nowhere)."""
    from ..evaluation.metrics import evaluate_case, mean_foreground_dice
    from .sliding_window import predict_case_logits

    results = []
    for case in cases:
        image, label, _ = cache.load(case, mmap=False)
        if label is None:
            raise StateError(f"{cache.root}: validation case {case} has no label in the cache")
        logits = predict_case_logits(network, np.asarray(image), cfg, num_classes=plan.num_classes, overlap=0.5)
        assert logits is not None
        pred = logits.argmax(0).numpy()
        classes = range(plan.num_classes)
        results.append(evaluate_case(pred, np.asarray(label), classes, case=case, ignore_index=plan.ignore_label))
    return mean_foreground_dice(results)


def _quantized(model: Any, patches: list[np.ndarray]) -> Any:
    """``model`` (an OpenVINO model) quantised to int8 by NNCF on ``patches``, its progress bars kept quiet.

    Activations are quantised asymmetrically (NNCF's ``MIXED`` preset: LeakyReLU and instance norm
    give activations of both signs), and the first and the last convolution (the image in, the class
    logits out) stay in fp32: on a hippocampus model this kept the validation Dice within 1e-4 of
    fp32's, where quantising every convolution symmetrically lost 0.005 (README, Benchmarks).
    """
    with telemetry_declined():
        import nncf

    convolutions = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    ignored = nncf.IgnoredScope(names=[convolutions[0], convolutions[-1]]) if len(convolutions) > 2 else None
    logging.getLogger("nncf").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), telemetry_declined():
        return nncf.quantize(
            model,
            nncf.Dataset(patches),
            preset=nncf.QuantizationPreset.MIXED,
            subset_size=len(patches),
            fast_bias_correction=True,
            **({"ignored_scope": ignored} if ignored is not None else {}),
        )


def quantize_members(
    plan: Any, members: Sequence[Mapping[str, Any]], folder: Path, calibration: Calibration
) -> dict[str, Any]:
    """The int8 network of each member of a model folder being written (``folder``), stored in
    ``folder/openvino/<key>/`` after the check against the fold's validation cases; returns per
    weight file its files (relative to ``folder``) and the check's figures. A network whose int8
    Dice falls more than the tolerance below fp32's is a :class:`~segpipe.errors.ConfigError`."""
    with telemetry_declined():
        import openvino as ov

    from ..checkpoint import load_checkpoint
    from ..networks import plan_network

    version = openvino_version() or "unknown"
    out: dict[str, Any] = {}
    for member in members:
        configuration, fold = str(member["configuration"]), str(member["fold"])
        cfg = plan.config(configuration)
        cache = calibration.caches[configuration]
        train, val = _fold_cases(calibration.splits, fold)
        what = f"{configuration} fold {fold}"
        missing = [c for c in (*train, *val) if c not in cache]
        if missing:
            raise StateError(
                f"{what}: {len(missing)} of its cases are not in the preprocessing cache ({missing[0]}, ...), "
                "so its int8 network cannot be calibrated and checked",
                hint="run `segpipe preprocess` for this configuration, then export again",
            )
        if str(fold).lower() == "all":
            log.warning(f"{what}: trained on every case, so its int8 check reads cases it was trained on")
        start = time.perf_counter()
        if plan.previous_stage(configuration):
            raise ConfigError(
                f"{configuration}: int8 networks of a cascade stage are not made",
                hint="export the cascade without quantize",
            )
        channels = plan.in_channels * max(1, cfg.input_slices)
        # the fp32 network the export has just converted and stored, else converted here
        key = network_key(member["sha256"], in_channels=channels, patch=cfg.patch_size, version=version)
        fp32_model = read_openvino(folder / OPENVINO_DIR / key)
        if fp32_model is None:
            net = plan_network(plan, member["configuration"])
            net.load_state_dict(load_checkpoint(folder / member["file"], map_location="cpu")["model"])
            fp32_model = convert_openvino(net.eval(), in_channels=channels, patch=cfg.patch_size)
        patches = _calibration_patches(cache, train, cfg, calibration.patches)
        int8_model = _quantized(fp32_model, patches)
        dice = {}
        for name, model in (("fp32", fp32_model), ("int8", int8_model)):
            dice[name] = _validation_dice(compile_model(model, "fp32"), cache, val, cfg, plan)
        drop = dice["fp32"] - dice["int8"]
        if math.isnan(drop) or drop > calibration.tolerance:
            raise ConfigError(
                f"{what}: the int8 network's validation Dice {dice['int8']:.4f} is {drop:.4f} below the fp32 "
                f"network's {dice['fp32']:.4f} over {len(val)} validation cases (tolerance "
                f"{calibration.tolerance:g}); nothing was written",
                hint="export without quantize=int8 (fp32 or precision=bf16 keep the accuracy), "
                "or allow more with quantize_tolerance=",
            )
        key = int8_network_key(member["sha256"], in_channels=channels, patch=cfg.patch_size, version=version)
        entry = folder / OPENVINO_DIR / key
        entry.mkdir(parents=True, exist_ok=True)
        ov.save_model(int8_model, str(entry / NETWORK_XML), compress_to_fp16=False)
        seconds = time.perf_counter() - start
        log.info(
            f"{what}: int8 network validated on {len(val)} cases: Dice {dice['int8']:.4f} "
            f"(fp32 {dice['fp32']:.4f}), {seconds:.0f} s"
        )
        out[member["file"]] = {
            "files": [f"{OPENVINO_DIR}/{key}/{name}" for name in (NETWORK_XML, NETWORK_BIN)],
            "validation": {
                "cases": len(val),
                "dice_fp32": dice["fp32"],
                "dice_int8": dice["int8"],
                "tolerance": calibration.tolerance,
                "calibration_patches": len(patches),
                "flips": False,
                "overlap": 0.5,
            },
        }
    return out
