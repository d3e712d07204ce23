"""The planning rules: ``make_plan(fingerprint, settings) -> Plan`` and the plan's summary rows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..fingerprint import data_profile
from .plan import ChannelNormalization, Plan, PlanConfig
from .settings import (
    AMP_ACTIVATION_FACTOR,
    ANISOTROPY_THRESHOLD,
    CONFIGURATIONS,
    GPU_FIXED_BYTES,
    GPU_SLACK,
    LOWRES_MIN_VOXEL_RATIO,
    LOWRES_SPACING_STEP,
    MASK_NORM_THRESHOLD,
    NEAR_ISOTROPIC_25D,
    PlanSettings,
)
from .shape import PlanContext, median_int, shape_config


# ============================================================================ planning
def _case_arrays(fp: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    cases = fp.get("cases") or []
    if not cases:
        raise ConfigError("the fingerprint has no cases; cannot plan", hint="fingerprint a dataset with labelled cases")
    spacings = np.array([c["spacing"] for c in cases], dtype=np.float64)
    shapes = np.array([c["shape_after_crop"] for c in cases], dtype=np.float64)
    return spacings, shapes


def target_spacing(
    spacings: np.ndarray, shapes: np.ndarray, threshold: float = ANISOTROPY_THRESHOLD
) -> tuple[np.ndarray, int | None]:
    """nnU-Net's fullres target spacing and the anisotropic axis (None when the rule does not apply)."""
    target = np.percentile(spacings, 50, axis=0)
    sizes = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = target[worst] > threshold * max(target[i] for i in others)
    aniso_voxels = sizes[worst] * threshold < min(sizes[i] for i in others)
    if aniso_spacing and aniso_voxels:
        p10 = float(np.percentile(spacings[:, worst], 10))
        largest_other = float(max(target[i] for i in others))
        if p10 < largest_other:
            p10 = largest_other + 1e-5
        target = target.copy()
        target[worst] = p10
        return target, worst
    return target, None


def _resampled_median_shape(spacings: np.ndarray, shapes: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    new = np.round(spacings / spacing * shapes)
    return np.median(new, axis=0)


def _data_identifier(spacing: Sequence[float], resample_slices: bool) -> str:
    sp = "x".join(f"{v:.4g}" for v in (spacing if resample_slices else spacing[1:]))
    return f"{'3d' if resample_slices else '2d'}_{sp}"


def _normalization(fp: Mapping[str, Any], settings: PlanSettings) -> list[ChannelNormalization]:
    channel_names = {int(k): str(v) for k, v in fp["channel_names"].items()}
    overrides = settings.normalization or {}
    by_name = {
        "ct": "ct",
        "nonorm": "none",
        "none": "none",
        "rescale_to_0_1": "rescale_to_0_1",
        "rgb_to_0_1": "rgb_to_0_1",
        "zscore": "zscore",
    }
    use_mask = float(fp.get("median_relative_size_after_crop", 1.0)) < MASK_NORM_THRESHOLD
    out = []
    unknown = set(overrides) - {str(c) for c in channel_names} - set(channel_names.values())
    if unknown:
        raise ConfigError(
            f"normalization override for unknown channel(s) {sorted(unknown)}",
            hint=f"channels: {', '.join(f'{k} ({v})' for k, v in sorted(channel_names.items()))}",
        )
    for c, name in sorted(channel_names.items()):
        scheme = overrides.get(str(c)) or overrides.get(name) or by_name.get(name.lower(), "zscore")
        entry = ChannelNormalization(channel=c, name=name, scheme=scheme)
        if scheme == "ct":
            stats = fp.get("foreground_intensity_per_channel", {}).get(str(c), {})
            if not stats or "mean" not in stats:
                raise ConfigError(
                    f"channel {c} ({name}): CT normalization needs foreground intensities, "
                    "and the fingerprint has none",
                    hint="check that the labels contain foreground",
                )
            entry.clip = [float(stats["percentile_00_5"]), float(stats["percentile_99_5"])]
            entry.mean = float(stats["mean"])
            entry.std = float(max(stats["std"], 1e-8))
        elif scheme == "zscore":
            entry.use_mask = use_mask
        out.append(entry)
    return out


def fingerprint_digest(fp: Mapping[str, Any]) -> str:
    """sha256 of the fingerprint's content (its cache key ``source`` excluded)."""
    body = {k: v for k, v in fp.items() if k != "source"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class _Grid:
    """The dataset's spacings and shapes, its fullres target spacing and the network axis order."""

    spacings: np.ndarray  # per case, array order
    shapes: np.ndarray  # per case after cropping, array order
    median_spacing: np.ndarray
    fullres: np.ndarray  # target spacing, array order
    aniso_axis: int | None  # the anisotropy rule's axis (None when it did not apply)
    transpose: list[int]  # coarsest axis first
    fr_sp: np.ndarray  # fullres spacing, network order
    fr_shape: np.ndarray  # median shape at fullres spacing, network order

    @property
    def coarse(self) -> int:
        """The array axis with the coarsest target spacing."""
        return self.transpose[0]

    @property
    def backward(self) -> list[int]:
        """The axis order that undoes ``transpose``."""
        return [self.transpose.index(i) for i in range(3)]

    @property
    def n_cases(self) -> int:
        return len(self.spacings)


def _by_index(names: Mapping[Any, Any]) -> dict[str, str]:
    """Labels or channel names keyed by their index as text, in index order."""
    return {str(k): str(v) for k, v in sorted(names.items(), key=lambda kv: int(kv[0]))}


def _fullres_grid(spacings: np.ndarray, shapes: np.ndarray, settings: PlanSettings) -> _Grid:
    """Fullres target spacing (from the data unless set) and the axis order that puts its coarsest axis first."""
    auto_target, aniso_axis = target_spacing(spacings, shapes, settings.anisotropy_threshold)
    if settings.target_spacing is not None:
        fullres = np.asarray(settings.target_spacing, dtype=np.float64)
    else:
        fullres = auto_target
    median_spacing = np.median(spacings, axis=0)
    coarse = int(np.argmax(fullres))
    transpose = [coarse] + [i for i in range(3) if i != coarse]
    t = np.asarray(transpose)
    fullres_shape = _resampled_median_shape(spacings, shapes, fullres)
    return _Grid(
        spacings=spacings,
        shapes=shapes,
        median_spacing=median_spacing,
        fullres=fullres,
        aniso_axis=aniso_axis,
        transpose=transpose,
        fr_sp=fullres[t],
        fr_shape=fullres_shape[t],
    )


def _fullres_and_skips(ctx: PlanContext, grid: _Grid) -> tuple[PlanConfig | None, dict[str, str]]:
    """3d_fullres (None for 2-D images) and why each configuration does not apply, from cheap checks."""
    settings = ctx.settings
    median_spacing = grid.median_spacing
    others = [median_spacing[i] for i in range(3) if i != int(np.argmax(median_spacing))]
    spacing_ratio = float(np.max(median_spacing) / max(others))
    # why each configuration does not apply (cheap checks for all, so errors can list the applicable ones)
    why_not: dict[str, str] = {}
    fullres_cfg = None
    if grid.fr_shape[0] <= 1:
        why_not.update({c: "the images are 2-D" for c in CONFIGURATIONS if c != "2d"})
    else:
        fullres_cfg = shape_config(
            ctx, name="3d_fullres", architecture="unet", spacing=grid.fr_sp, median_shape=grid.fr_shape, dims=3
        )
        coverage = float(np.prod(fullres_cfg.patch_size, dtype=np.float64) / np.prod(grid.fr_shape, dtype=np.float64))
        if coverage >= settings.lowres_threshold:
            why_not["3d_lowres"] = (
                f"the 3d_fullres patch already covers {coverage:.0%} of the median image "
                f"(3d_lowres needs < {settings.lowres_threshold:.0%})"
            )
            why_not["3d_cascade_fullres"] = "it follows 3d_lowres, which does not apply"
        if spacing_ratio <= settings.anisotropy_threshold:
            why_not["2.5d"] = (
                f"it is for anisotropic data; the coarsest median spacing is only "
                f"{spacing_ratio:.2f}× the others (needs > {settings.anisotropy_threshold:g}×)"
            )
    return fullres_cfg, why_not


def _plan_configurations(
    ctx: PlanContext, grid: _Grid, wanted: Sequence[str], *, fullres: PlanConfig | None, why_not: dict[str, str]
) -> dict[str, PlanConfig]:
    """Plan each wanted configuration that applies; a 3d_lowres found not to is added to ``why_not``."""
    fr_sp, fr_shape = grid.fr_sp, grid.fr_shape
    configs: dict[str, PlanConfig] = {}
    if "2d" in wanted:
        configs["2d"] = shape_config(
            ctx, name="2d", architecture="unet", spacing=fr_sp, median_shape=fr_shape, dims=2, resample_slices=False
        )
        configs["2d"].batch_dice = True
    if "3d_fullres" in wanted and fullres is not None:
        configs["3d_fullres"] = fullres
    if "3d_lowres" in wanted and "3d_lowres" not in why_not and fullres is not None:
        lowres, why = _lowres(ctx, fullres, fr_sp, fr_shape, grid.n_cases)
        if lowres is None:
            why_not["3d_lowres"] = why
            why_not["3d_cascade_fullres"] = "it follows 3d_lowres, which does not apply"
        else:
            configs["3d_lowres"] = lowres
    if "3d_cascade_fullres" in wanted and "3d_lowres" in configs and fullres is not None:
        # nnU-Net's cascade: 3d_fullres's data and network, with 3d_lowres's prediction as extra input
        configs["3d_cascade_fullres"] = dataclasses.replace(
            fullres, name="3d_cascade_fullres", notes=[*fullres.notes, "runs after 3d_lowres (the 3-D cascade)"]
        )
    elif "3d_cascade_fullres" in wanted and "3d_cascade_fullres" not in why_not:
        why_not["3d_cascade_fullres"] = "it follows 3d_lowres, which is not planned"
    if "2.5d" in wanted and "2.5d" not in why_not:
        configs["2.5d"] = _plan_25d(ctx, grid.spacings, grid.shapes, grid.median_spacing, np.asarray(grid.transpose))
    if "vnet" in wanted and "vnet" not in why_not:
        configs["vnet"] = shape_config(
            ctx, name="vnet", architecture="vnet", spacing=fr_sp, median_shape=fr_shape, dims=3
        )
    return configs


def _refuse_inapplicable(settings: PlanSettings, wanted: Sequence[str], why_not: Mapping[str, str]) -> None:
    """An explicitly requested configuration that does not apply is an error naming the applicable ones."""
    refused = [c for c in wanted if c in why_not]
    if settings.configurations is not None and refused:
        raise ConfigError(
            f"configuration {refused[0]} does not apply to this dataset: {why_not[refused[0]]}",
            hint=f"applicable: {', '.join(c for c in CONFIGURATIONS if c not in why_not)}",
        )


def _set_data_identifiers(configs: Mapping[str, PlanConfig], grid: _Grid) -> None:
    """Name each configuration's preprocessed data; 2d shares 3d_fullres's when resampling changes no case."""
    for cfg in configs.values():
        cfg.data_identifier = _data_identifier(cfg.spacing, cfg.resample_slices)
    if "3d_cascade_fullres" in configs and "3d_fullres" in configs:  # one grid, one cache
        configs["3d_cascade_fullres"].data_identifier = configs["3d_fullres"].data_identifier
    coarse, spacings, shapes = grid.coarse, grid.spacings, grid.shapes
    if (
        "2d" in configs
        and "3d_fullres" in configs
        and np.all(  # resampling slices changes no case: one grid, one cache
            np.maximum(1, np.rint(shapes[:, coarse] * spacings[:, coarse] / grid.fr_sp[0])) == shapes[:, coarse]
        )
    ):
        configs["2d"].data_identifier = configs["3d_fullres"].data_identifier


def _memory_model(settings: PlanSettings) -> dict[str, Any]:
    """The GPU memory model the batch sizes were planned with, recorded in the plan."""
    return {
        "gpu_memory_gb": settings.gpu_memory_gb,
        "fixed_bytes": GPU_FIXED_BYTES,
        "slack": GPU_SLACK,
        "amp": settings.amp,
        "amp_activation_factor": AMP_ACTIVATION_FACTOR,
        "formula": "fixed_bytes + weight_state + slack * amp_activation_factor * activations",
    }


def make_plan(fingerprint: Mapping[str, Any], settings: PlanSettings | None = None) -> Plan:
    """Plan every requested (or applicable) configuration for a fingerprint. Pure: no I/O."""
    settings = settings or PlanSettings()
    settings.validate()
    spacings, shapes = _case_arrays(fingerprint)
    labels = _by_index(fingerprint["labels"])
    channel_names = _by_index(fingerprint["channel_names"])
    num_classes = len(labels) - any(v.lower() == "ignore" for v in labels.values())  # outputs
    regions = fingerprint.get("regions")
    if regions:  # a region model's outputs: one sigmoid per region
        num_classes = len(regions["regions"])
    in_channels = len(channel_names)

    grid = _fullres_grid(spacings, shapes, settings)
    n_vox = float(np.prod(grid.fr_shape, dtype=np.float64) * grid.n_cases)
    ctx = PlanContext(in_channels, num_classes, n_vox, settings)
    wanted = list(settings.configurations) if settings.configurations is not None else list(CONFIGURATIONS)
    fullres_cfg, why_not = _fullres_and_skips(ctx, grid)
    configs = _plan_configurations(ctx, grid, wanted, fullres=fullres_cfg, why_not=why_not)
    _refuse_inapplicable(settings, wanted, why_not)
    _set_data_identifiers(configs, grid)
    # nnU-Net's rule: with a 3d_lowres stage, batch Dice for the full-resolution networks (3d_fullres and the
    # cascade) and sample Dice for 3d_lowres; without one, sample Dice for 3d_fullres
    for name, cfg in configs.items():
        if name in ("3d_fullres", "3d_cascade_fullres"):
            cfg.batch_dice = "3d_lowres" in configs
        elif name == "3d_lowres":
            cfg.batch_dice = False

    ordered = {name: configs[name] for name in CONFIGURATIONS if name in configs}
    return Plan(
        dataset=str(fingerprint.get("dataset", "")),
        channel_names=channel_names,
        labels=labels,
        transpose_forward=[int(v) for v in grid.transpose],
        transpose_backward=[int(v) for v in grid.backward],
        median_spacing=[float(v) for v in grid.median_spacing],
        median_shape=median_int(np.median(shapes, axis=0)),
        target_spacing=[float(v) for v in grid.fullres],
        anisotropic=grid.aniso_axis is not None and settings.target_spacing is None,
        anisotropic_axis=grid.aniso_axis if settings.target_spacing is None else None,
        normalization=_normalization(fingerprint, settings),
        configurations=ordered,
        settings={
            **settings.to_dict(),
            **({"regions": dict(regions)} if regions else {}),
            **({"cascade": {"3d_cascade_fullres": "3d_lowres"}} if "3d_cascade_fullres" in ordered else {}),
        },
        memory_model=_memory_model(settings),
        fingerprint_sha256=fingerprint_digest(fingerprint),
        skipped={name: why_not[name] for name in CONFIGURATIONS if name in why_not},
        profile=data_profile(dict(fingerprint)),
    )


def _lowres(
    ctx: PlanContext, fullres: PlanConfig, fr_sp: np.ndarray, fr_shape: np.ndarray, n_cases: int
) -> tuple[PlanConfig | None, str]:
    """nnU-Net's 3d_lowres search: grow the spacing ×1.03 until the patch covers ≥ 25% of the image."""
    median_vox = float(np.prod(fr_shape, dtype=np.float64))
    patch_vox = float(np.prod(fullres.patch_size, dtype=np.float64))
    sp = fr_sp.astype(np.float64).copy()
    cfg = None
    for _ in range(2000):
        if patch_vox / median_vox >= ctx.settings.lowres_threshold:
            break
        mx = sp.max()
        coarse = mx / sp > 2
        if coarse.any():
            sp[coarse] *= LOWRES_SPACING_STEP
        else:
            sp *= LOWRES_SPACING_STEP
        shape = fr_sp / sp * fr_shape
        median_vox = float(np.prod(shape, dtype=np.float64))
        sub = PlanContext(ctx.in_channels, ctx.num_classes, median_vox * n_cases, ctx.settings)
        cfg = shape_config(
            sub,
            name="3d_lowres",
            architecture="unet",
            spacing=sp,
            median_shape=[round(float(v)) for v in shape],
            dims=3,
        )
        patch_vox = float(np.prod(cfg.patch_size, dtype=np.float64))
    if cfg is None or float(np.prod(fr_shape, dtype=np.float64)) / median_vox < LOWRES_MIN_VOXEL_RATIO:
        return None, "the low-resolution images would be less than 2× smaller than the full-resolution ones"
    return cfg, ""


def _plan_25d(
    ctx: PlanContext, spacings: np.ndarray, shapes: np.ndarray, median_spacing: np.ndarray, t: np.ndarray
) -> PlanConfig:
    """Wang et al. 2019 2.5D U-Net at the native (median) slice spacing.

    In-plane-only 1×3×3 convolutions and 1×2×2 pooling while the in-plane spacing is finer than
    the slice spacing by more than :data:`NEAR_ISOTROPIC_25D`, 3D convolutions after that; spatial
    attention in the decoder. With ``context_slices=k`` it is instead a 2D U-Net whose input is
    the slice and its k neighbours on each side, stacked as channels.
    """
    s = ctx.settings
    sp = median_spacing.copy()
    shape = _resampled_median_shape(spacings, shapes, sp)
    sp_t, shape_t = sp[t], shape[t]
    if s.context_slices > 0:
        cfg = shape_config(
            ctx,
            name="2.5d",
            architecture="unet25d",
            spacing=sp_t,
            median_shape=shape_t,
            dims=2,
            resample_slices=False,
            context_slices=s.context_slices,
            attention=s.attention_25d,
        )
        cfg.batch_dice = True
        return cfg
    return shape_config(
        ctx,
        name="2.5d",
        architecture="unet25d",
        spacing=sp_t,
        median_shape=shape_t,
        dims=3,
        attention=s.attention_25d,
        ratio=NEAR_ISOTROPIC_25D,
    )


# ============================================================================ outputs
def plan_summary_rows(plan: Plan) -> list[dict[str, Any]]:
    """One row per configuration for the CLI's table."""
    rows = []
    for name, cfg in plan.configurations.items():
        rows.append(
            {
                "configuration": name,
                "network": cfg.architecture + (f" ({cfg.input_slices} slices)" if cfg.input_slices > 1 else ""),
                "spacing": [round(v, 3) for v in (cfg.spacing if cfg.resample_slices else cfg.spacing[1:])],
                "patch": list(cfg.patch_size),
                "batch": cfg.batch_size,
                "stages": cfg.num_stages,
                "strides": [list(s) for s in cfg.strides],
                "kernels": [list(k) for k in cfg.kernel_sizes],
                "features": f"{cfg.features[0]}-{cfg.features[-1]}",
                "gpu_gb": round(cfg.estimated_gpu_bytes / 2**30, 2),
            }
        )
    return rows
