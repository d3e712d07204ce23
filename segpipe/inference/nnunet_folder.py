"""nnU-Net v2 trained model folders, read as segpipe models.

nnU-Net v2 writes each trained configuration to ``<results>/Dataset…/<Trainer>__<Plans>__<configuration>/``:
``dataset.json`` (channels, labels or regions), ``plans.json`` (preprocessing and network of every
configuration) and ``fold_<k>/checkpoint_final.pth`` (and ``checkpoint_best.pth``).
:func:`load_nnunet_folder` turns such a folder into a :class:`~segpipe.inference.model.Model`: a
:class:`~segpipe.planning.Plan` whose ``settings["nnunet"]`` carries what segpipe's own plans do not
(the network's architecture entry, nnU-Net's resampling settings, the trained mirroring axes,
regions), and one member per fold with the network weights already read.

Everything is checked before a case is read, each problem a one-line error naming the file:
a missing ``plans.json`` or fold, a network class or operator segpipe does not build
(:mod:`segpipe.networks.nnunet`), a normalisation or resampling function it does not reproduce, a
checkpoint that holds more than weights and plain values (loaded with ``weights_only=True``; numpy
scalars and arrays, which nnU-Net's training log holds, are the only other types allowed), a
cascade stage (it needs the low-resolution stage's predictions).

nnU-Net's ``postprocessing.pkl`` is never unpickled. ``postprocessing.json`` (beside the folds, or
in a ``crossval_results_folds_*`` folder) is read when it only keeps the largest component of
single labels; otherwise the model runs without post-processing, and its reports say so.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, StateError
from ..io.jsonio import read_json
from ..planning import ChannelNormalization, Plan, PlanConfig
from ..preprocessing.nnunet_resampling import resampling_settings
from ..settings import configured
from .model import Member, Model, file_sha256

__all__ = ["NNUNET_CHECKPOINTS", "NORMALIZATIONS", "is_nnunet_folder", "load_nnunet_folder"]

log = logging.getLogger("segpipe")

#: nnU-Net's normalisation classes and segpipe's scheme of the same arithmetic
NORMALIZATIONS = {
    "ZScoreNormalization": "zscore",
    "CTNormalization": "ct",
    "NoNormalization": "none",
    "RescaleTo01Normalization": "rescale_to_0_1",
    "RGBTo0_1Normalization": "rgb_to_0_1",
}
#: segpipe's ``checkpoint=`` setting -> nnU-Net's checkpoint file of a fold
NNUNET_CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
#: the globals (besides torch's own) a checkpoint may name: numpy scalars, dtypes and arrays (plain data)
_NUMPY_GLOBALS = ("scalar", "dtype", "_reconstruct", "ndarray")


def is_nnunet_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like an nnU-Net v2 trained model folder (not a segpipe model folder)."""
    p = Path(path)
    if not p.is_dir() or (p / "model.json").exists():
        return False
    has_json = (p / "dataset.json").is_file() or (p / "plans.json").is_file()
    return has_json and any(c.is_dir() and c.name.startswith("fold_") for c in p.iterdir())


def _allowed_globals(names: Sequence[str]) -> list[Any]:
    """The objects of the numpy globals a checkpoint names, or a refusal naming the first other one."""
    allowed: list[Any] = []
    for name in names:
        module, _, attr = name.rpartition(".")
        if not module.startswith("numpy") or (attr not in _NUMPY_GLOBALS and not attr.endswith("DType")):
            raise ValueError(name)
        try:
            obj: Any = __import__(module, fromlist=[attr])
        except ImportError:  # written under numpy 2 (numpy._core), read under numpy 1 (numpy.core)
            obj = __import__(module.replace("numpy._core", "numpy.core"), fromlist=[attr])
        allowed.append((getattr(obj, attr), name))  # under the name the file uses (numpy moved them)
    # the dtypes of numpy scalars are found only while loading
    allowed += [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
    return allowed


def load_nnunet_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint read with ``torch.load(weights_only=True)`` (numpy plain types allowed)."""
    fix = "re-save it from a trusted copy with only tensors and plain values, or train the fold again"
    if not path.is_file():
        raise StateError(f"no checkpoint at {path}", hint="pick trained folds with folds=..., or checkpoint=best")
    try:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            extra = _allowed_globals(needed)
        except ValueError as exc:
            raise ConfigError(
                f"{path}: the checkpoint needs Python code to load ({exc}); segpipe loads weights and plain "
                "values only (torch.load weights_only=True)",
                hint=fix,
            ) from None
        with torch.serialization.safe_globals(extra):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(
            f"{path}: the checkpoint needs Python code to load ({str(exc).strip().splitlines()[0][:120]})", hint=fix
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise StateError(f"{path}: truncated or damaged checkpoint ({str(exc).splitlines()[0][:120]})") from None
    weights = data.get("network_weights") if isinstance(data, dict) else None
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise StateError(f"{path}: not an nnU-Net checkpoint (no network_weights)", hint=fix)
    return data


def _read(root: Path, name: str) -> dict[str, Any]:
    path = root / name
    if not path.is_file():
        raise StateError(
            f"{path}: missing; an nnU-Net trained model folder holds dataset.json, plans.json and fold_<k>/",
            hint=f"copy {name} that nnU-Net wrote for this model into {root}",
        )
    data = read_json(path, what=f"nnU-Net {name}", hint=f"restore {name} from the nnU-Net results folder")
    if not isinstance(data, dict):
        raise StateError(f"{path}: expected a JSON object")
    return data


def _configuration(plans: Mapping[str, Any], name: str, where: Path) -> dict[str, Any]:
    """One configuration of nnU-Net's plans with its ``inherits_from`` chain resolved."""
    configs = plans.get("configurations") or {}
    if name not in configs:
        raise ConfigError(f"{where}: no configuration {name!r}", hint=f"planned: {', '.join(configs) or 'none'}")
    entry = dict(configs[name])
    seen = {name}
    while "inherits_from" in entry:
        parent = entry.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise ConfigError(f"{where}: configuration {name!r} inherits from unknown or circular {parent!r}")
        seen.add(parent)
        entry = {**configs[parent], **entry}
    return entry


def _labels(dataset: Mapping[str, Any], where: Path) -> tuple[dict[str, str], dict[str, Any] | None]:
    """segpipe's labels ``{value: name}`` of the label map, and the regions (None without)."""
    raw = dataset.get("labels")
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{where}: no labels")
    region = {k: v for k, v in raw.items() if isinstance(v, (list, tuple))}
    if not region:
        try:
            return {str(int(v)): str(k) for k, v in raw.items()}, None
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: label values must be integers") from None
    order = dataset.get("regions_class_order")
    foreground = [(k, [int(x) for x in v]) for k, v in raw.items() if isinstance(v, (list, tuple)) or int(v) != 0]
    if not isinstance(order, list) or len(order) != len(foreground):
        raise ConfigError(
            f"{where}: a region model needs regions_class_order with one value per region ({len(foreground)})"
        )
    labels = {"0": "background", **{str(int(c)): str(name) for c, (name, _) in zip(order, foreground)}}
    regions = {
        "regions": [vals if isinstance(vals, list) else [vals] for _, vals in foreground],
        "class_order": [int(c) for c in order],
        "names": [name for name, _ in foreground],
    }
    return labels, regions


def _normalization(plans: Mapping[str, Any], cfg: Mapping[str, Any], channels: Mapping[str, str], where: Path) -> list:
    schemes = list(cfg.get("normalization_schemes") or [])
    masks = list(cfg.get("use_mask_for_norm") or [False] * len(schemes))
    if len(schemes) != len(channels):
        raise ConfigError(f"{where}: {len(schemes)} normalisation schemes for {len(channels)} channels")
    props = plans.get("foreground_intensity_properties_per_channel") or {}
    out = []
    for c, (scheme, name) in enumerate(zip(schemes, channels.values())):
        if scheme not in NORMALIZATIONS:
            raise ConfigError(
                f"{where}: normalisation {scheme!r} of channel {c} is not one segpipe reproduces",
                hint=f"supported: {', '.join(NORMALIZATIONS)}",
            )
        norm = ChannelNormalization(channel=c, name=str(name), scheme=NORMALIZATIONS[scheme], use_mask=bool(masks[c]))
        if scheme == "CTNormalization":
            p = props.get(str(c)) or {}
            try:
                norm.clip = [float(p["percentile_00_5"]), float(p["percentile_99_5"])]
                norm.mean, norm.std = float(p["mean"]), float(p["std"])
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"{where}: CTNormalization of channel {c} needs its intensity properties") from None
        out.append(norm)
    return out


def _plan_config(name: str, cfg: Mapping[str, Any], plans: Mapping[str, Any], where: Path) -> PlanConfig:
    arch = cfg.get("architecture") or {}
    kw = arch.get("arch_kwargs") or {}
    patch = [int(p) for p in cfg["patch_size"]]
    spacing = [float(s) for s in cfg["spacing"]]
    if len(spacing) == 2:  # 2d: the first axis keeps each case's own spacing
        spacing = [float(plans.get("original_median_spacing_after_transp", [1.0])[0]), *spacing]
    median = [int(v) for v in cfg.get("median_image_size_in_voxels") or [0, 0, 0]]
    try:
        return PlanConfig(
            name=name,
            architecture="nnunet",
            dims=len(patch),
            spacing=spacing,
            median_shape=([0] * (3 - len(median)) + median)[:3],
            patch_size=patch,
            batch_size=int(cfg.get("batch_size", 2)),
            strides=[[int(s) for s in (v if isinstance(v, list) else [v] * len(patch))] for v in kw["strides"]],
            kernel_sizes=[[int(k) for k in v] for v in kw["kernel_sizes"]],
            features=[int(f) for f in kw["features_per_stage"]],
            n_conv_encoder=[int(n) for n in kw.get("n_conv_per_stage") or kw.get("n_blocks_per_stage") or []],
            n_conv_decoder=[int(n) for n in kw["n_conv_per_stage_decoder"]],
            resample_slices=len(cfg["spacing"]) == 3,
            batch_dice=bool(cfg.get("batch_dice", False)),
            data_identifier=str(cfg.get("data_identifier", "")),
            notes=[f"nnU-Net {arch.get('network_class_name', '?').rsplit('.', 1)[-1]}"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: incomplete configuration {name} ({exc})") from None


def _postprocessing(root: Path, labels: Mapping[str, str], regions: Any) -> tuple[dict[str, Any], str]:
    """segpipe's decision from nnU-Net's ``postprocessing.json``, and where it came from (or why none)."""
    found = [root / "postprocessing.json", *sorted(root.glob("crossval_results_folds_*/postprocessing.json"))]
    path = next((p for p in found if p.is_file()), None)
    if path is None:
        why = "none: no postprocessing.json" + (" (postprocessing.pkl is not read)" if any(root.rglob("*.pkl")) else "")
        return {"largest_component": []}, why
    data = read_json(path, what="nnU-Net postprocessing", hint="remove it to run without post-processing")
    classes: list[int] = []
    for fn, kw in zip(data.get("postprocessing_fns") or [], data.get("postprocessing_kwargs") or []):
        target = (kw or {}).get("labels_or_regions")
        if fn != "remove_all_but_largest_component_from_segmentation" or regions or not isinstance(target, int):
            return {
                "largest_component": []
            }, f"none: {path.name} holds {fn} of {target!r}, which segpipe does not apply"
        if str(target) in labels:
            classes.append(int(target))
    return {"largest_component": sorted(set(classes))}, str(path)


def _fold_checkpoints(root: Path, folds: Sequence[str] | None, file: str) -> tuple[list[Path], list[dict[str, Any]]]:
    """The checkpoint files of a model folder's folds (every ``fold_<k>`` holding one by default), read."""
    fold_dirs = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("fold_"))
    chosen = [f"fold_{f}" for f in folds] if folds is not None else [d.name for d in fold_dirs]
    paths = [root / d / file for d in chosen]
    if folds is None:
        paths = [p for p in paths if p.is_file()]
    if not paths:
        raise StateError(f"{root}: no fold_<k>/{file}", hint="train a fold with nnU-Net first, or pass checkpoint=best")
    return paths, [load_nnunet_checkpoint(p) for p in paths]


def _resampling(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The resampling settings of one configuration: images, logits, and label maps (a cascade's input)."""
    out = {
        "data": resampling_settings(cfg.get("resampling_fn_data"), cfg.get("resampling_fn_data_kwargs"), where),
        "probabilities": resampling_settings(
            cfg.get("resampling_fn_probabilities"), cfg.get("resampling_fn_probabilities_kwargs"), where
        ),
    }
    if cfg.get("previous_stage"):
        out["seg"] = resampling_settings(
            cfg.get("resampling_fn_seg"), cfg.get("resampling_fn_seg_kwargs"), where, seg=True
        )
    return out


def _stages(root: Path, plans: Mapping[str, Any], name: str, cfg: Mapping[str, Any], file: str) -> dict[str, Any]:
    """A cascade stage's first stage: the sibling folder ``<Trainer>__<Plans>__<previous stage>`` nnU-Net
    trained, its configuration and every fold's checkpoint (empty for other configurations)."""
    previous = cfg.get("previous_stage")
    if not previous:
        return {}
    sibling = root.parent / root.name.replace(f"__{name}", f"__{previous}")
    if sibling == root or not sibling.is_dir():
        raise StateError(
            f"{root}: the cascade stage {name} runs after {previous}, but {sibling} is missing",
            hint=f"put the {previous} model folder nnU-Net trained beside it",
        )
    paths, states = _fold_checkpoints(sibling, None, file)
    return {
        "name": str(previous),
        "cfg": _configuration(plans, previous, root / "plans.json"),
        "paths": paths,
        "states": states,
    }


def load_nnunet_folder(
    path: str | os.PathLike[str], *, folds: Sequence[str] | None = None, checkpoint: str | None = None
) -> Model:
    """The :class:`Model` of an nnU-Net v2 trained model folder (see the module docstring).

    ``folds``: the folds to use (default every ``fold_<k>`` with the checkpoint); ``checkpoint``:
    ``final`` (``checkpoint_final.pth``, nnU-Net's default) or ``best``. A cascade stage
    (``3d_cascade_fullres``) also reads every fold of its first stage from the sibling folder.
    """
    checkpoint = str(configured(checkpoint, "infer.checkpoint"))
    if checkpoint not in NNUNET_CHECKPOINTS:
        raise ConfigError(f"checkpoint={checkpoint} is not one of {', '.join(NNUNET_CHECKPOINTS)}")
    root = Path(path).expanduser().resolve()
    dataset, plans = _read(root, "dataset.json"), _read(root, "plans.json")
    parts = root.name.split("__")
    paths, states = _fold_checkpoints(root, folds, NNUNET_CHECKPOINTS[checkpoint])
    name = parts[2] if len(parts) == 3 else str((states[0].get("init_args") or {}).get("configuration", ""))
    plans_path = root / "plans.json"
    cfg = _configuration(plans, name, plans_path)
    first = _stages(root, plans, name, cfg, NNUNET_CHECKPOINTS[checkpoint])
    stages = {name: cfg, **({first["name"]: first["cfg"]} if first else {})}
    channels = {str(k): str(v) for k, v in (dataset.get("channel_names") or dataset.get("modality") or {}).items()}
    labels, regions = _labels(dataset, root / "dataset.json")
    mirror = states[0].get("inference_allowed_mirroring_axes")
    nnunet = {
        "architectures": {c: entry.get("architecture") or {} for c, entry in stages.items()},
        "resampling": {c: _resampling(entry, str(plans_path)) for c, entry in stages.items()},
        "mirror_axes": None if mirror is None else [int(a) for a in mirror],
        "trainer": str(states[0].get("trainer_name", "")),
        "plans_name": str(plans.get("plans_name", "")),
    }
    post, nnunet["postprocessing_source"] = _postprocessing(root, labels, regions)
    transpose = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    plan = Plan(
        dataset=str(plans.get("dataset_name") or dataset.get("name") or root.parent.name),
        channel_names=channels,
        labels=labels,
        transpose_forward=transpose,
        transpose_backward=[int(a) for a in plans.get("transpose_backward", np.argsort(transpose).tolist())],
        median_spacing=[float(s) for s in plans.get("original_median_spacing_after_transp", [1.0, 1.0, 1.0])],
        median_shape=[int(s) for s in plans.get("original_median_shape_after_transp", [0, 0, 0])],
        target_spacing=[float(s) for s in cfg["spacing"]][-3:],
        anisotropic=False,
        anisotropic_axis=None,
        normalization=_normalization(plans, cfg, channels, plans_path),
        configurations={c: _plan_config(c, entry, plans, plans_path) for c, entry in stages.items()},
        settings={
            "preprocessing": "nnunet",
            "nnunet": nnunet,
            **({"regions": regions} if regions else {}),
            **({"cascade": {name: first["name"]}} if first else {}),
        },
        memory_model={},
    )
    from ..networks import plan_network

    members = []
    for c, c_paths, c_states in [
        (name, paths, states),
        *([(first["name"], first["paths"], first["states"])] if first else []),
    ]:
        for p, state in zip(c_paths, c_states):
            _check_weights(plan_network(plan, c), state["network_weights"], p)
            fold = p.parent.name.removeprefix("fold_")
            members.append(Member(c, fold, p, sha256=file_sha256(p), weights=dict(state["network_weights"])))
    info = {"format": "nnunet", "trainer": nnunet["trainer"], "postprocessing_source": nnunet["postprocessing_source"]}
    return Model(plan=plan, members=members, postprocessing=post, origin=str(root), info=info)


def _check_weights(network: torch.nn.Module, weights: Mapping[str, torch.Tensor], path: Path) -> None:
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ConfigError(
            f"{path}: the weights do not fit the network of plans.json ({str(exc).splitlines()[0][:160]})",
            hint="use the plans.json and dataset.json nnU-Net wrote for this checkpoint",
        ) from None
