"""One configuration's shape under the memory budget (nnU-Net's loop): the initial patch from the
spacing and median image, the pooling topology, the network's layers, shrinking the patch until a
batch of the minimum size fits the GPU memory, then the batch size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .memory import estimate_gpu_bytes, estimate_training_bytes, topology
from .plan import PlanConfig
from .settings import (
    FEATURE_MAP_MIN_EDGE,
    INITIAL_PATCH_VOLUME_2D,
    INITIAL_PATCH_VOLUME_3D,
    MIN_STAGES,
    PlanSettings,
)


def median_int(values: Sequence[float] | np.ndarray) -> list[int]:
    return [int(round(float(v))) for v in values]


@dataclass
class PlanContext:
    """What every configuration of one plan is shaped for: the data's channels and classes, its size, the settings."""

    in_channels: int
    num_classes: int
    n_voxels_dataset: float  # approximate voxels of the dataset at fullres spacing
    settings: PlanSettings

    @property
    def budget(self) -> float:
        return self.settings.gpu_memory_gb * 2**30


def _features(n: int, base: int, cap: int) -> list[int]:
    return [min(cap, base * 2**i) for i in range(n)]


@dataclass(frozen=True)
class _ConfigSpec:
    """What one configuration is before its patch is chosen: network, grid and pooling ratio."""

    name: str
    architecture: str
    dims: int
    spacing: np.ndarray  # all three axes, network order
    median_shape: Sequence[float] | np.ndarray  # all three axes, network order
    resample_slices: bool
    context_slices: int
    attention: bool
    ratio: float

    @property
    def net_spacing(self) -> np.ndarray:
        """Spacing of the axes the network convolves (the last ``dims``)."""
        return self.spacing[-self.dims :]

    @property
    def net_median(self) -> np.ndarray:
        """Median image shape along the axes the network convolves."""
        return np.asarray(self.median_shape, dtype=np.float64)[-self.dims :]


def _initial_patch(spec: _ConfigSpec) -> list[float]:
    """nnU-Net's starting patch: a fixed volume shaped by the spacing, clipped to the median shape."""
    net_sp, med, dims = spec.net_spacing, spec.net_median, spec.dims
    aspect = 1.0 / net_sp
    volume = INITIAL_PATCH_VOLUME_3D if dims == 3 else INITIAL_PATCH_VOLUME_2D
    initial = [round(float(v)) for v in aspect * (volume / np.prod(aspect)) ** (1.0 / dims)]
    return [max(1.0, float(min(i, m))) for i, m in zip(initial, med)]  # floats, as nnU-Net (padded up later)


def _staged_topology(
    net_sp: np.ndarray, patch: Sequence[float], ratio: float
) -> tuple[list[list[int]], list[list[int]], list[int], list[int]]:
    """Pooling topology of a patch; tiny patches are padded so the network has ≥ ``MIN_STAGES`` stages."""
    p = list(patch)
    strides, kernels, padded, divisor = topology(net_sp, p, ratio=ratio)
    grow = 2 * 2 * FEATURE_MAP_MIN_EDGE  # 16: room for two poolings
    while len(strides) < MIN_STAGES:  # tiny images: pad the patch so the network has ≥ 3 stages
        finest = min(net_sp)
        p = [max(v, grow) if net_sp[i] / finest < ratio else v for i, v in enumerate(p)]
        strides, kernels, padded, divisor = topology(net_sp, p, ratio=ratio)
        grow += 8
    return strides, kernels, padded, divisor


def _network_layers(
    spec: _ConfigSpec, s: PlanSettings, kernels: list[list[int]], n: int
) -> tuple[list[int], list[list[int]], list[int], list[int]]:
    """Features, kernel sizes and convolutions per stage of the U-Net or V-Net: ``(features, kernels, enc, dec)``."""
    if spec.architecture == "vnet":
        feats = _features(n, s.vnet_base_features, s.vnet_max_features)
        kernels = [[5 if k == 3 else 1 for k in ks] for ks in kernels]
        enc = [min(i + 1, 3) for i in range(n)]
        dec = [min(i + 1, 3) for i in range(n - 1)]
    else:
        feats = _features(n, s.base_features, s.max_features_3d if spec.dims == 3 else s.max_features_2d)
        enc, dec = [2] * n, [2] * (n - 1)
    return feats, kernels, enc, dec


def _build_config(spec: _ConfigSpec, s: PlanSettings, patch: Sequence[float]) -> tuple[PlanConfig, list[int]]:
    """The configuration for a patch at the minimum batch size, and the patch's pooling divisor per axis."""
    strides, kernels, padded, divisor = _staged_topology(spec.net_spacing, patch, spec.ratio)
    feats, kernels, enc, dec = _network_layers(spec, s, kernels, len(strides))
    cfg = PlanConfig(
        name=spec.name,
        architecture=spec.architecture,
        dims=spec.dims,
        spacing=[float(v) for v in spec.spacing],
        median_shape=median_int(spec.median_shape),
        patch_size=[int(v) for v in padded],
        batch_size=s.min_batch_size,
        strides=strides,
        kernel_sizes=kernels,
        features=feats,
        n_conv_encoder=enc,
        n_conv_decoder=dec,
        resample_slices=spec.resample_slices,
        context_slices=spec.context_slices,
        attention=spec.attention,
    )
    return cfg, divisor


def _gpu_bytes(ctx: PlanContext, cfg: PlanConfig, batch: int) -> int:
    """Predicted GPU memory of training ``cfg`` at this batch size."""
    return estimate_gpu_bytes(cfg, ctx.in_channels, ctx.num_classes, batch, amp=ctx.settings.amp)


def _smaller_patch(ctx: PlanContext, spec: _ConfigSpec, cfg: PlanConfig, divisor: Sequence[int]) -> list[int]:
    """One shrink step of the patch: the axis largest relative to the median shape loses one pooling divisor."""
    s = ctx.settings
    net_sp = spec.net_spacing
    cur = list(cfg.patch_size)
    # the axis largest relative to the median shape first; ties → the last axis, as nnU-Net's argsort()[-1]
    order = np.argsort([p / m for p, m in zip(cur, spec.net_median)], kind="stable")[::-1]
    for axis in order:
        tmp = list(cur)
        tmp[axis] -= divisor[axis]
        if tmp[axis] < 1:
            continue
        _, _, _, div2 = topology(net_sp, tmp, ratio=spec.ratio)
        new = list(cur)
        new[axis] -= div2[axis]
        if new[axis] >= FEATURE_MAP_MIN_EDGE:
            return new
    raise ConfigError(
        f"{spec.name}: gpu_memory_gb={s.gpu_memory_gb:g} is too small for even the smallest patch "
        f"({'×'.join(map(str, cur))} needs ~{_gpu_bytes(ctx, cfg, s.min_batch_size) / 2**30:.2f} GB at batch "
        f"{s.min_batch_size})",
        hint="raise gpu_memory_gb or leave this configuration out",
    )


def _fit_patch(ctx: PlanContext, spec: _ConfigSpec, patch: Sequence[float]) -> tuple[PlanConfig, bool]:
    """Shrink the patch until the minimum batch fits the GPU memory budget; also says whether it shrank."""
    s = ctx.settings
    cfg, divisor = _build_config(spec, s, patch)
    shrunk = False
    seen = {tuple(cfg.patch_size)}
    while _gpu_bytes(ctx, cfg, s.min_batch_size) > ctx.budget:
        shrunk = True
        new = _smaller_patch(ctx, spec, cfg, divisor)
        before = cfg.patch_size
        cfg, divisor = _build_config(spec, s, new)
        if tuple(cfg.patch_size) in seen:  # the ≥ 3-stage padding undid the shrink: nothing smaller exists
            raise ConfigError(
                f"{spec.name}: gpu_memory_gb={s.gpu_memory_gb:g} is too small for the smallest patch "
                f"{'×'.join(map(str, before))}",
                hint="raise gpu_memory_gb",
            )
        seen.add(tuple(cfg.patch_size))
    return cfg, shrunk


def _batch_size(ctx: PlanContext, cfg: PlanConfig) -> tuple[int, str]:
    """The batch size (largest that fits memory, capped by the dataset fraction) and the note saying why."""
    s = ctx.settings
    per_sample = _gpu_bytes(ctx, cfg, 1) - _gpu_bytes(ctx, cfg, 0)
    fits = int((ctx.budget - _gpu_bytes(ctx, cfg, 0)) // max(per_sample, 1))
    cap = round(ctx.n_voxels_dataset * s.max_dataset_fraction / np.prod(cfg.patch_size, dtype=np.float64))
    batch = max(min(fits, cap), s.min_batch_size)
    if batch < fits:
        note = (
            f"batch {batch}: capped so one batch covers ≤ {s.max_dataset_fraction:.0%} of the dataset's "
            f"voxels (memory would allow {fits})"
        )
    else:
        note = f"batch {batch}: largest that fits {s.gpu_memory_gb:g} GB"
    return batch, note


def shape_config(
    ctx: PlanContext,
    *,
    name: str,
    architecture: str,
    spacing: Sequence[float] | np.ndarray,
    median_shape: Sequence[float] | np.ndarray,
    dims: int,
    resample_slices: bool = True,
    context_slices: int = 0,
    attention: bool = False,
    ratio: float = 2.0,
) -> PlanConfig:
    """Patch, topology and batch for one configuration under the memory budget (nnU-Net's loop)."""
    s = ctx.settings
    spec = _ConfigSpec(
        name=name,
        architecture=architecture,
        dims=dims,
        spacing=np.asarray(spacing, dtype=np.float64),
        median_shape=median_shape,
        resample_slices=resample_slices,
        context_slices=context_slices,
        attention=attention,
        ratio=ratio,
    )
    notes: list[str] = []
    cfg, shrunk = _fit_patch(ctx, spec, _initial_patch(spec))
    if shrunk:
        notes.append(f"patch shrunk to fit {s.gpu_memory_gb:g} GB at batch {s.min_batch_size}")
    batch, batch_note = _batch_size(ctx, cfg)
    notes.append(batch_note)
    cfg.batch_size = int(batch)
    cfg.estimated_training_bytes = estimate_training_bytes(cfg, ctx.in_channels, ctx.num_classes, batch)
    cfg.estimated_gpu_bytes = _gpu_bytes(ctx, cfg, batch)
    cfg.notes = notes
    return cfg
