"""Experiment planning: ``make_plan(fingerprint, settings) -> Plan``, pure and data-only.

The rules are nnU-Net v2's default ``ExperimentPlanner`` (see ``REFERENCE.md``) unless noted:

* target spacing = per-axis median; anisotropy rule (coarsest axis > 3× the others and its
  voxel count × 3 < the smallest other) → that axis's 10th-percentile spacing, never below the
  largest other spacing. The coarsest axis is transposed first (``transpose_forward``); every
  per-axis list inside a configuration is in that *network* axis order.
* initial patch ∝ 1/spacing with the volume of 256³ (3D) / 2048² (2D), clipped to the median
  shape; topology (:func:`topology`) pools an axis while it is ≥ 8 (≥ 12 alone) and its spacing
  is within 2× of the finest, kernel 3 once within 2×; patch padded to a multiple of 2^pools.
* features 32 doubling, capped at 320 (3D) / 512 (2D).
* patch shrinking (axis with the largest patch / median-shape ratio first) and batch size come
  from a **memory model** instead of nnU-Net's calibrated feature-map count:
  :func:`estimate_training_bytes` predicts the bytes the tensors of one fp32 training step hold
  (weights, gradients, SGD momentum, activations saved for backward), per architecture, layer
  by layer; ``tests/test_networks.py`` checks it against a measurement on CPU. GPU-only costs
  are a documented constant and factors: :data:`GPU_FIXED_BYTES` + state + :data:`GPU_SLACK` ×
  :data:`AMP_ACTIVATION_FACTOR` × activations (calibrated on an H200, see below).
* batch = the largest that fits, capped so one batch covers ≤ 5% of the dataset's voxels, ≥ 2.
  On hippocampus the cap decides: 3d_fullres 7 and 2d 292, as nnU-Net (the memory model would allow
  61 and ~1800 in 8 GiB). Where memory, not the cap, decides (large images), our patch and batch can
  differ from nnU-Net's: they come from predicted bytes, not from nnU-Net's feature-map count
  compared with a reference calibrated on one GPU.

Deliberate differences from nnU-Net: the memory model above; a patch that would give fewer than 3
stages (images under ~16 voxels per axis) is padded up to allow 3 (MONAI's DynUNet needs them);
``3d_lowres`` has no cascade yet; ``2.5d`` and ``vnet`` are extra; the 2D configuration keeps each
case's own slice spacing (``resample_slices=False``), as nnU-Net's 2D preprocessing does.

Configurations: ``2d``, ``3d_fullres``, ``3d_lowres`` (standalone, no cascade yet), ``2.5d``
(anisotropic data only; Wang et al. 2019) and ``vnet`` (Milletari et al. 2016). The plan holds
numbers only — never class paths; :mod:`segpipe.networks` turns a :class:`PlanConfig` into a module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, StateError

SCHEMA_VERSION = 1
PLANS_FILE = "plans.json"
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "2.5d", "vnet")
ARCHITECTURES = ("unet", "unet25d", "vnet")
NORMALIZATION_SCHEMES = ("ct", "zscore", "none", "rescale_to_0_1", "rgb_to_0_1")

# nnU-Net constants
ANISOTROPY_THRESHOLD = 3.0
FEATURE_MAP_MIN_EDGE = 4
INITIAL_PATCH_VOLUME_3D = 256**3
INITIAL_PATCH_VOLUME_2D = 2048**2
LOWRES_THRESHOLD = 0.25
LOWRES_SPACING_STEP = 1.03
LOWRES_MIN_VOXEL_RATIO = 2.0
MASK_NORM_THRESHOLD = 0.75
MIN_STAGES = 3  # MONAI DynUNet needs ≥ 3 stages; tiny images get a (padded) patch that allows them
NEAR_ISOTROPIC_25D = 1.25  # 2.5d goes 3D once the spacing ratio is ≤ this (Wang et al.; nnU-Net uses 2)

# GPU memory model: bytes on the card ≈ FIXED + weight state + SLACK × AMP factor × activations.
# Calibrated once on an NVIDIA H200 (torch 2.11, cuDNN benchmark mode, fp16 autocast) with
# `segpipe.networks.measure_training_bytes` over 16 planned configurations (hippocampus-, 0.7×0.7×5 mm-
# and 200×400×400 CT-like fingerprints; 2d/3d_fullres/3d_lowres/2.5d/vnet): fp32 saved tensors matched
# the model exactly; autocast kept 52-57% of them; CUDA context + peak *reserved* memory was at most
# 1.0× the prediction for the configurations that fill 8 GiB (0.99-1.01× for CT-like 3D) and 0.5-0.9×
# for small ones (the fixed part dominates there).
GPU_FIXED_BYTES = int(1.0 * 2**30)  # CUDA context (0.6 GiB measured), cuDNN/cuBLAS workspace, the batch
GPU_SLACK = 1.55  # transient activation gradients during backward, allocator rounding and caching
AMP_ACTIVATION_FACTOR = 0.55  # fp16 autocast stores conv/norm/activation outputs in half precision
FLOAT_BYTES = 4


# ============================================================================ settings
@dataclass
class PlanSettings:
    """Planner knobs (``conf/planner/*.yaml``). Build from a plain dict with :meth:`from_mapping`."""

    gpu_memory_gb: float = 8.0
    configurations: list[str] | None = None  # None: every applicable configuration
    target_spacing: list[float] | None = None  # (z, y, x) mm in the images' array order; None: from data
    base_features: int = 32
    max_features_3d: int = 320
    max_features_2d: int = 512
    vnet_base_features: int = 16
    vnet_max_features: int = 256
    min_batch_size: int = 2
    max_dataset_fraction: float = 0.05
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD
    lowres_threshold: float = LOWRES_THRESHOLD
    amp: bool = True
    attention_25d: bool = True
    context_slices_25d: int = 0  # 0: Wang's 2D/3D hybrid; k > 0: 2D net over 2k+1 neighbouring slices
    normalization: dict[str, str] | None = None  # channel index or name -> scheme

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> PlanSettings:
        """Validate a plain mapping (e.g. Hydra's ``planner`` group); unknown keys/values → ConfigError.

        ``force`` and ``num_workers`` (run options, not plan settings) are ignored here.
        """
        data = dict(data or {})
        for ignored in ("force", "num_workers", "work_dir"):
            data.pop(ignored, None)
        unknown = sorted(set(data) - set(cls.fields()))
        if unknown:
            raise ConfigError(f"unknown planner setting(s) {', '.join(unknown)}",
                              hint=f"valid settings: {', '.join(cls.fields())}")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data or data[f.name] is None:
                continue
            values[f.name] = _convert(f.name, data[f.name], f.default)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"planner setting {name}={getattr(self, name)!r}: {why}")

        if not (self.gpu_memory_gb > 0 and math.isfinite(self.gpu_memory_gb)):
            raise bad("gpu_memory_gb", "must be a positive number of GB")
        if self.configurations is not None:
            if not self.configurations:
                raise bad("configurations", f"empty; choose from {', '.join(CONFIGURATIONS)} or null for all")
            for c in self.configurations:
                if c not in CONFIGURATIONS:
                    raise ConfigError(f"unknown configuration {c!r}", hint=f"valid: {', '.join(CONFIGURATIONS)}")
        if self.target_spacing is not None and (len(self.target_spacing) != 3 or min(self.target_spacing) <= 0):
            raise bad("target_spacing", "needs 3 positive values (z, y, x) in mm")
        for name in ("base_features", "max_features_3d", "max_features_2d", "vnet_base_features",
                     "vnet_max_features", "min_batch_size"):
            if getattr(self, name) < 1:
                raise bad(name, "must be ≥ 1")
        if not 0 < self.max_dataset_fraction <= 1:
            raise bad("max_dataset_fraction", "must be in (0, 1]")
        if self.anisotropy_threshold <= 1:
            raise bad("anisotropy_threshold", "must be > 1")
        if not 0 < self.lowres_threshold < 1:
            raise bad("lowres_threshold", "must be in (0, 1)")
        if self.context_slices_25d < 0:
            raise bad("context_slices_25d", "must be ≥ 0")
        for key, scheme in (self.normalization or {}).items():
            if scheme not in NORMALIZATION_SCHEMES:
                raise ConfigError(f"normalization for channel {key!r}: unknown scheme {scheme!r}",
                                  hint=f"valid: {', '.join(NORMALIZATION_SCHEMES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _convert(name: str, value: Any, default: Any) -> Any:
    """Coerce one setting (Hydra gives ListConfig/DictConfig, CLI strings) or raise ConfigError."""
    try:
        if name == "configurations":
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(v).strip() for v in items if str(v).strip()]
        if name == "target_spacing":
            items = value.split(",") if isinstance(value, str) else list(value)
            return [float(v) for v in items]
        if name == "normalization":
            return {str(k): str(v).lower() for k, v in dict(value).items()}
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise TypeError
        if isinstance(default, int):
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
    except (TypeError, ValueError):
        kind = {"configurations": "a list of configuration names", "target_spacing": "a list of 3 numbers",
                "normalization": "a mapping channel -> scheme"}.get(
            name, {"bool": "true or false", "int": "a whole number", "float": "a number"}.get(type(default).__name__))
        raise ConfigError(f"planner setting {name}={value!r} is not {kind}") from None
    return value


# ============================================================================ plan data
@dataclass
class ChannelNormalization:
    channel: int
    name: str
    scheme: str  # one of NORMALIZATION_SCHEMES
    use_mask: bool = False  # zscore inside the nonzero mask (cropping removed much of the image)
    clip: list[float] | None = None  # ct: [p0.5, p99.5] of the foreground
    mean: float | None = None  # ct: dataset-global foreground mean
    std: float | None = None  # ct: dataset-global foreground std

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChannelNormalization:
        return cls(**{k: d[k] for k in (f.name for f in dataclasses.fields(cls)) if k in d})


@dataclass
class PlanConfig:
    """One configuration: what data it runs on and the network that fits the memory budget.

    Per-axis lists are in network axis order (array axes permuted by ``Plan.transpose_forward``).
    ``spacing`` always has 3 values; ``patch_size``, ``strides``, ``kernel_sizes`` have ``dims``.
    For 2D configurations (``resample_slices=False``) axis 0 keeps each case's own spacing and
    ``spacing[0]`` is only the dataset median.
    """

    name: str
    architecture: str  # unet | unet25d | vnet
    dims: int
    spacing: list[float]
    median_shape: list[int]  # median image shape at `spacing` (3 values)
    patch_size: list[int]
    batch_size: int
    strides: list[list[int]]  # per stage; stage 0 is all 1
    kernel_sizes: list[list[int]]
    features: list[int]
    n_conv_encoder: list[int]
    n_conv_decoder: list[int]
    resample_slices: bool = True
    input_slices: int = 1  # 2.5d slab mode: 2k+1 neighbouring slices stacked as channels
    attention: bool = False
    batch_dice: bool = False
    estimated_training_bytes: int = 0  # fp32 tensors of one training step at `batch_size`
    estimated_gpu_bytes: int = 0
    data_identifier: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    @property
    def deep_supervision_outputs(self) -> int:
        """Outputs in training: full resolution plus every decoder level but the lowest (nnU-Net)."""
        return max(1, self.num_stages - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["num_stages"] = self.num_stages
        d["deep_supervision_outputs"] = self.deep_supervision_outputs
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Plan:
    dataset: str
    channel_names: dict[str, str]
    labels: dict[str, str]
    transpose_forward: list[int]
    transpose_backward: list[int]
    median_spacing: list[float]  # array order, before transposition
    median_shape: list[int]  # after crop, array order
    target_spacing: list[float]  # 3d_fullres spacing, array order
    anisotropic: bool
    anisotropic_axis: int | None  # array order
    normalization: list[ChannelNormalization]
    configurations: dict[str, PlanConfig]
    settings: dict[str, Any]
    memory_model: dict[str, Any]
    fingerprint_sha256: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # configuration -> why it does not apply
    schema_version: int = SCHEMA_VERSION

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Output channels, background included."""
        return len(self.labels)

    def config(self, name: str) -> PlanConfig:
        if name not in self.configurations:
            raise ConfigError(f"configuration {name!r} is not in the plan",
                              hint=f"planned: {', '.join(self.configurations)}")
        return self.configurations[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "dataset": self.dataset,
            "channel_names": dict(self.channel_names),
            "labels": dict(self.labels),
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "transpose_forward": list(self.transpose_forward),
            "transpose_backward": list(self.transpose_backward),
            "median_spacing": list(self.median_spacing),
            "median_shape": list(self.median_shape),
            "target_spacing": list(self.target_spacing),
            "anisotropic": self.anisotropic,
            "anisotropic_axis": self.anisotropic_axis,
            "normalization": [n.to_dict() for n in self.normalization],
            "configurations": {k: v.to_dict() for k, v in self.configurations.items()},
            "settings": dict(self.settings),
            "memory_model": dict(self.memory_model),
            "fingerprint_sha256": self.fingerprint_sha256,
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StateError(f"plans schema version {version!r} is not supported (this segpipe reads {SCHEMA_VERSION})",
                             hint="re-plan the dataset with `segpipe plan DATASET`")
        return cls(
            dataset=d["dataset"],
            channel_names=dict(d["channel_names"]),
            labels=dict(d["labels"]),
            transpose_forward=list(d["transpose_forward"]),
            transpose_backward=list(d["transpose_backward"]),
            median_spacing=list(d["median_spacing"]),
            median_shape=list(d["median_shape"]),
            target_spacing=list(d["target_spacing"]),
            anisotropic=bool(d["anisotropic"]),
            anisotropic_axis=d.get("anisotropic_axis"),
            normalization=[ChannelNormalization.from_dict(n) for n in d["normalization"]],
            configurations={k: PlanConfig.from_dict(v) for k, v in d["configurations"].items()},
            settings=dict(d.get("settings", {})),
            memory_model=dict(d.get("memory_model", {})),
            fingerprint_sha256=d.get("fingerprint_sha256", ""),
            skipped=dict(d.get("skipped", {})),
            schema_version=version,
        )


def plans_json(plan: Plan) -> str:
    """Canonical text of a plan (sorted keys): the same plan always gives the same bytes."""
    return json.dumps(plan.to_dict(), sort_keys=True, indent=1, allow_nan=False) + "\n"


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Write ``plans.json`` atomically (temp file in the same folder, then ``os.replace``)."""
    from .io.atomic import write_text

    return write_text(path, plans_json(plan))


def load_plan(path: str | os.PathLike[str]) -> Plan:
    p = Path(path)
    if p.is_dir():
        p = p / PLANS_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateError(f"{p}: no plan", hint="run `segpipe plan DATASET` first") from None
    except json.JSONDecodeError as exc:
        raise StateError(f"{p}: unreadable plan ({exc.msg})", hint="re-plan with `segpipe plan DATASET`") from None
    try:
        return Plan.from_dict(data)
    except (KeyError, TypeError) as exc:
        raise StateError(f"{p}: incomplete plan (missing {exc})", hint="re-plan with `segpipe plan DATASET`") from None


# ============================================================================ topology
def _pad_shape(shape: Sequence[float], divisor: Sequence[int]) -> list[int]:
    return [int(math.ceil(s / d) * d) for s, d in zip(shape, divisor)]


def topology(spacing: Sequence[float], patch: Sequence[float], *, min_edge: int = FEATURE_MAP_MIN_EDGE,
             ratio: float = 2.0) -> tuple[list[list[int]], list[list[int]], list[int], list[int]]:
    """nnU-Net's ``get_pool_and_conv_props``: ``(strides, kernels, padded_patch, divisor)``.

    An axis is pooled while its feature map is ≥ 2·``min_edge`` (≥ 3·``min_edge`` when it is the
    only one) and its spacing is within ``ratio`` of the finest poolable axis; its kernel becomes 3
    once its spacing is within ``ratio`` of the finest (1 before). The bottleneck kernel is 3.
    ``ratio`` is 2 for nnU-Net; the 2.5d configuration uses :data:`NEAR_ISOTROPIC_25D`.
    """
    dim = len(spacing)
    cur_spacing = [float(s) for s in spacing]
    cur_size = [float(s) for s in patch]
    strides = [[1] * dim]
    kernels: list[list[int]] = []
    pools = [0] * dim
    kernel = [1] * dim
    while True:
        valid = [i for i in range(dim) if cur_size[i] >= 2 * min_edge]
        if not valid:
            break
        finest = min(cur_spacing[i] for i in valid)
        valid = [i for i in valid if cur_spacing[i] / finest < ratio]
        if len(valid) == 1 and cur_size[valid[0]] < 3 * min_edge:
            break
        if not valid:
            break
        for d in range(dim):
            if kernel[d] != 3 and cur_spacing[d] / min(cur_spacing) < ratio:
                kernel[d] = 3
        stride = [1] * dim
        for v in valid:
            stride[v] = 2
            pools[v] += 1
            cur_spacing[v] *= 2
            cur_size[v] = float(math.ceil(cur_size[v] / 2))
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)
    divisor = [2**p for p in pools]
    return strides, kernels, _pad_shape(patch, divisor), divisor


# ============================================================================ memory model
def _stage_sizes(patch: Sequence[int], strides: Sequence[Sequence[int]]) -> list[int]:
    """Voxels per sample at each stage."""
    size = [int(p) for p in patch]
    out = []
    for s in strides:
        size = [int(math.ceil(n / k)) for n, k in zip(size, s)]
        out.append(int(np.prod(size, dtype=np.int64)))
    return out


def _prod(values: Sequence[int]) -> int:
    return int(np.prod(values, dtype=np.int64))


def memory_breakdown(cfg: PlanConfig, in_channels: int, num_classes: int, batch_size: int = 1) -> dict[str, int]:
    """Bytes of one fp32 training step's tensors: ``parameters``, ``weight_state`` (params + grads +
    SGD momentum) and ``activations`` (tensors autograd saves for backward, incl. the loss).

    Counted layer by layer for the networks :mod:`segpipe.networks` builds (same structure, so a
    change there must be mirrored here; ``tests/test_planning.py`` measures both).
    """
    cin = in_channels * max(1, cfg.input_slices)
    k_out = num_classes
    feats = list(cfg.features)
    n = len(feats)
    vox = _stage_sizes(cfg.patch_size, cfg.strides)
    params = 0
    act = 0  # saved elements per sample (float32 each)
    norm_extra = 0  # per-channel saved tensors of InstanceNorm (repeated weight, mean, invstd), per sample
    act += cin * vox[0]  # the input batch, saved by the first conv

    def norm(c: int) -> int:
        nonlocal norm_extra
        norm_extra += 3 * c
        return 2 * c

    if cfg.architecture in ("unet", "unet25d"):
        # MONAI DynUNet: conv(no bias) → InstanceNorm(affine) → LeakyReLU(inplace), twice per stage.
        # Saved per conv: its output (by the norm) and the activated norm output (by the relu, then
        # the next conv — one storage, the relu is in place).
        prev = cin
        for s in range(n):
            k = _prod(cfg.kernel_sizes[s])
            params += prev * feats[s] * k + norm(feats[s]) + feats[s] * feats[s] * k + norm(feats[s])
            act += 4 * feats[s] * vox[s]
            prev = feats[s]
        for s in range(n - 2, -1, -1):
            k = _prod(cfg.kernel_sizes[s])
            params += feats[s + 1] * feats[s] * _prod(cfg.strides[s + 1])  # transposed conv (not saved)
            params += 2 * feats[s] * feats[s] * k + norm(feats[s]) + feats[s] * feats[s] * k + norm(feats[s])
            act += 2 * feats[s] * vox[s]  # the concatenation, saved by conv1
            act += 4 * feats[s] * vox[s]
            if cfg.attention:
                hidden = attention_hidden(feats[s])
                params += feats[s] * hidden + hidden + hidden + 1
                act += (hidden + 2 + feats[s]) * vox[s]  # relu out, sigmoid out, 1+a, gated output
        heads = [0] + list(range(1, max(1, n - 1)))  # output block + deep-supervision heads
        head_channels = [feats[s] for s in heads]
    elif cfg.architecture == "vnet":
        # segpipe V-Net: residual stages of conv(no bias) → InstanceNorm → PReLU; saved per conv:
        # conv out (norm), norm out (PReLU), PReLU out (next conv) = 3 maps.
        enc, dec = cfg.n_conv_encoder, cfg.n_conv_decoder
        for s in range(n):
            k = _prod(cfg.kernel_sizes[s])
            c = feats[s]
            if s == 0:
                params += (cin * c if cin != c else 0)  # 1×1 residual projection (output not saved)
                prev = cin
            else:
                params += feats[s - 1] * c * _prod(cfg.strides[s]) + norm(c) + c  # down conv, norm, PReLU
                act += 3 * c * vox[s]
                prev = c
            for i in range(enc[s]):
                params += (prev if i == 0 else c) * c * k + norm(c) + c
                act += 3 * c * vox[s]
        for s in range(n - 2, -1, -1):
            k = _prod(cfg.kernel_sizes[s])
            c = feats[s]
            params += feats[s + 1] * c * _prod(cfg.strides[s + 1]) + norm(c) + c  # up conv, norm, PReLU
            act += 2 * c * vox[s]  # up-conv out (norm), norm out (PReLU)
            act += 2 * c * vox[s]  # concatenation (first conv)
            for i in range(dec[s]):
                params += (2 * c if i == 0 else c) * c * k + norm(c) + c
                act += 3 * c * vox[s]
        heads = [0] + list(range(1, max(1, n - 1)))
        head_channels = [feats[s] for s in heads]
    else:
        raise ConfigError(f"unknown architecture {cfg.architecture!r}", hint=f"valid: {', '.join(ARCHITECTURES)}")
    for s, c in zip(heads, head_channels):
        params += c * k_out + k_out
        # loss (Dice + CE) per head: softmax and log-softmax outputs and the one-hot target (K maps
        # each), the int64 target (2 float32 maps)
        act += (3 * k_out + 2) * vox[s]
    activations = FLOAT_BYTES * batch_size * (act + norm_extra)
    weight_state = 3 * FLOAT_BYTES * params  # weights, gradients, SGD momentum
    return {"parameters": int(params), "weight_state": int(weight_state), "activations": int(activations),
            "total": int(weight_state + activations)}


def attention_hidden(channels: int) -> int:
    """Hidden width of the 2.5d spatial-attention block."""
    return max(channels // 2, 1)


def estimate_training_bytes(plan_config: PlanConfig, in_channels: int, num_classes: int, batch_size: int) -> int:
    """Bytes held by the tensors of one fp32 training step (see :func:`memory_breakdown`)."""
    return memory_breakdown(plan_config, in_channels, num_classes, batch_size)["total"]


def estimate_gpu_bytes(plan_config: PlanConfig, in_channels: int, num_classes: int, batch_size: int,
                       *, amp: bool = True) -> int:
    """Predicted peak GPU memory (as nvidia-smi shows it) of a training step; see :data:`GPU_SLACK`."""
    b = memory_breakdown(plan_config, in_channels, num_classes, batch_size)
    factor = AMP_ACTIVATION_FACTOR if amp else 1.0
    return int(GPU_FIXED_BYTES + b["weight_state"] + GPU_SLACK * factor * b["activations"])


# ============================================================================ planning
def _median_int(values: Sequence[float]) -> list[int]:
    return [int(round(float(v))) for v in values]


def _case_arrays(fp: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    cases = fp.get("cases") or []
    if not cases:
        raise ConfigError("the fingerprint has no cases; cannot plan", hint="fingerprint a dataset with labelled cases")
    spacings = np.array([c["spacing"] for c in cases], dtype=np.float64)
    shapes = np.array([c["shape_after_crop"] for c in cases], dtype=np.float64)
    return spacings, shapes


def target_spacing(spacings: np.ndarray, shapes: np.ndarray, threshold: float = ANISOTROPY_THRESHOLD
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


@dataclass
class _Context:
    in_channels: int
    num_classes: int
    n_voxels_dataset: float  # approximate voxels of the dataset at fullres spacing
    settings: PlanSettings

    @property
    def budget(self) -> float:
        return self.settings.gpu_memory_gb * 2**30


def _features(n: int, base: int, cap: int) -> list[int]:
    return [min(cap, base * 2**i) for i in range(n)]


def _shape_config(ctx: _Context, *, name: str, architecture: str, spacing: Sequence[float],
                  median_shape: Sequence[float], dims: int, resample_slices: bool = True, input_slices: int = 1,
                  attention: bool = False, ratio: float = 2.0) -> PlanConfig:
    """Patch, topology and batch for one configuration under the memory budget (nnU-Net's loop)."""
    s = ctx.settings
    sp = np.asarray(spacing, dtype=np.float64)
    net_sp = sp[-dims:]
    med = np.asarray(median_shape, dtype=np.float64)[-dims:]
    aspect = 1.0 / net_sp
    volume = INITIAL_PATCH_VOLUME_3D if dims == 3 else INITIAL_PATCH_VOLUME_2D
    initial = [round(float(v)) for v in aspect * (volume / np.prod(aspect)) ** (1.0 / dims)]
    patch = [max(1.0, float(min(i, m))) for i, m in zip(initial, med)]  # floats, as nnU-Net (padded up later)
    notes: list[str] = []

    def build(p: Sequence[int]) -> tuple[PlanConfig, list[int]]:
        p = list(p)
        strides, kernels, padded, divisor = topology(net_sp, p, ratio=ratio)
        grow = 2 * 2 * FEATURE_MAP_MIN_EDGE  # 16: room for two poolings
        while len(strides) < MIN_STAGES:  # tiny images: pad the patch so the network has ≥ 3 stages
            finest = min(net_sp)
            p = [max(v, grow) if net_sp[i] / finest < ratio else v for i, v in enumerate(p)]
            strides, kernels, padded, divisor = topology(net_sp, p, ratio=ratio)
            grow += 8
        n = len(strides)
        if architecture == "vnet":
            feats = _features(n, s.vnet_base_features, s.vnet_max_features)
            kernels = [[5 if k == 3 else 1 for k in ks] for ks in kernels]
            enc = [min(i + 1, 3) for i in range(n)]
            dec = [min(i + 1, 3) for i in range(n - 1)]
        else:
            feats = _features(n, s.base_features, s.max_features_3d if dims == 3 else s.max_features_2d)
            enc, dec = [2] * n, [2] * (n - 1)
        cfg = PlanConfig(name=name, architecture=architecture, dims=dims, spacing=[float(v) for v in sp],
                         median_shape=_median_int(median_shape), patch_size=[int(v) for v in padded],
                         batch_size=s.min_batch_size, strides=strides, kernel_sizes=kernels, features=feats,
                         n_conv_encoder=enc, n_conv_decoder=dec, resample_slices=resample_slices,
                         input_slices=input_slices, attention=attention)
        return cfg, divisor

    def gpu(cfg: PlanConfig, b: int) -> int:
        return estimate_gpu_bytes(cfg, ctx.in_channels, ctx.num_classes, b, amp=s.amp)

    cfg, divisor = build(patch)
    shrunk = False
    seen = {tuple(cfg.patch_size)}
    while gpu(cfg, s.min_batch_size) > ctx.budget:
        shrunk = True
        cur = list(cfg.patch_size)
        # the axis largest relative to the median shape first; ties → the last axis, as nnU-Net's argsort()[-1]
        order = np.argsort([p / m for p, m in zip(cur, med)], kind="stable")[::-1]
        for axis in order:
            tmp = list(cur)
            tmp[axis] -= divisor[axis]
            if tmp[axis] < 1:
                continue
            _, _, _, div2 = topology(net_sp, tmp, ratio=ratio)
            new = list(cur)
            new[axis] -= div2[axis]
            if new[axis] >= FEATURE_MAP_MIN_EDGE:
                break
        else:
            raise ConfigError(
                f"{name}: gpu_memory_gb={s.gpu_memory_gb:g} is too small for even the smallest patch "
                f"({'×'.join(map(str, cur))} needs ~{gpu(cfg, s.min_batch_size) / 2**30:.2f} GB at batch "
                f"{s.min_batch_size})", hint="raise gpu_memory_gb or leave this configuration out")
        before = cfg.patch_size
        cfg, divisor = build(new)
        if tuple(cfg.patch_size) in seen:  # the ≥ 3-stage padding undid the shrink: nothing smaller exists
            raise ConfigError(f"{name}: gpu_memory_gb={s.gpu_memory_gb:g} is too small for the smallest patch "
                              f"{'×'.join(map(str, before))}", hint="raise gpu_memory_gb")
        seen.add(tuple(cfg.patch_size))
    if shrunk:
        notes.append(f"patch shrunk to fit {s.gpu_memory_gb:g} GB at batch {s.min_batch_size}")

    per_sample = gpu(cfg, 1) - gpu(cfg, 0)
    fits = int((ctx.budget - gpu(cfg, 0)) // max(per_sample, 1))
    cap = round(ctx.n_voxels_dataset * s.max_dataset_fraction / np.prod(cfg.patch_size, dtype=np.float64))
    batch = max(min(fits, cap), s.min_batch_size)
    if batch < fits:
        notes.append(f"batch {batch}: capped so one batch covers ≤ {s.max_dataset_fraction:.0%} of the dataset's "
                     f"voxels (memory would allow {fits})")
    else:
        notes.append(f"batch {batch}: largest that fits {s.gpu_memory_gb:g} GB")
    cfg.batch_size = int(batch)
    cfg.estimated_training_bytes = estimate_training_bytes(cfg, ctx.in_channels, ctx.num_classes, batch)
    cfg.estimated_gpu_bytes = gpu(cfg, batch)
    cfg.notes = notes
    return cfg


def _data_identifier(spacing: Sequence[float], resample_slices: bool) -> str:
    sp = "x".join(f"{v:.4g}" for v in (spacing if resample_slices else spacing[1:]))
    return f"{'3d' if resample_slices else '2d'}_{sp}"


def _normalization(fp: Mapping[str, Any], settings: PlanSettings) -> list[ChannelNormalization]:
    channel_names = {int(k): str(v) for k, v in fp["channel_names"].items()}
    overrides = settings.normalization or {}
    by_name = {"ct": "ct", "nonorm": "none", "none": "none", "rescale_to_0_1": "rescale_to_0_1",
               "rgb_to_0_1": "rgb_to_0_1", "zscore": "zscore"}
    use_mask = float(fp.get("median_relative_size_after_crop", 1.0)) < MASK_NORM_THRESHOLD
    out = []
    unknown = set(overrides) - {str(c) for c in channel_names} - set(channel_names.values())
    if unknown:
        raise ConfigError(f"normalization override for unknown channel(s) {sorted(unknown)}",
                          hint=f"channels: {', '.join(f'{k} ({v})' for k, v in sorted(channel_names.items()))}")
    for c, name in sorted(channel_names.items()):
        scheme = overrides.get(str(c)) or overrides.get(name) or by_name.get(name.lower(), "zscore")
        entry = ChannelNormalization(channel=c, name=name, scheme=scheme)
        if scheme == "ct":
            stats = fp.get("foreground_intensity_per_channel", {}).get(str(c), {})
            if not stats or "mean" not in stats:
                raise ConfigError(f"channel {c} ({name}): CT normalization needs foreground intensities, "
                                  "and the fingerprint has none", hint="check that the labels contain foreground")
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


def make_plan(fingerprint: Mapping[str, Any], settings: PlanSettings | None = None) -> Plan:
    """Plan every requested (or applicable) configuration for a fingerprint. Pure: no I/O."""
    settings = settings or PlanSettings()
    settings.validate()
    spacings, shapes = _case_arrays(fingerprint)
    labels = {str(k): str(v) for k, v in sorted(fingerprint["labels"].items(), key=lambda kv: int(kv[0]))}
    channel_names = {str(k): str(v) for k, v in sorted(fingerprint["channel_names"].items(), key=lambda kv: int(kv[0]))}
    num_classes = len(labels)
    in_channels = len(channel_names)
    n_cases = len(spacings)

    auto_target, aniso_axis = target_spacing(spacings, shapes, settings.anisotropy_threshold)
    if settings.target_spacing is not None:
        fullres = np.asarray(settings.target_spacing, dtype=np.float64)
    else:
        fullres = auto_target
    median_spacing = np.median(spacings, axis=0)
    coarse = int(np.argmax(fullres))
    transpose = [coarse] + [i for i in range(3) if i != coarse]
    backward = [transpose.index(i) for i in range(3)]
    t = np.asarray(transpose)

    fullres_shape = _resampled_median_shape(spacings, shapes, fullres)
    fr_sp, fr_shape = fullres[t], fullres_shape[t]
    n_vox = float(np.prod(fr_shape, dtype=np.float64) * n_cases)
    ctx = _Context(in_channels, num_classes, n_vox, settings)
    is_2d_data = fr_shape[0] <= 1

    others = [median_spacing[i] for i in range(3) if i != int(np.argmax(median_spacing))]
    spacing_ratio = float(np.max(median_spacing) / max(others))
    wanted = list(settings.configurations) if settings.configurations is not None else list(CONFIGURATIONS)
    # why each configuration does not apply (cheap checks for all, so errors can list the applicable ones)
    why_not: dict[str, str] = {}
    fullres_cfg = None
    if is_2d_data:
        why_not.update({c: "the images are 2-D" for c in CONFIGURATIONS if c != "2d"})
    else:
        fullres_cfg = _shape_config(ctx, name="3d_fullres", architecture="unet", spacing=fr_sp,
                                    median_shape=fr_shape, dims=3)
        coverage = float(np.prod(fullres_cfg.patch_size, dtype=np.float64) / np.prod(fr_shape, dtype=np.float64))
        if coverage >= settings.lowres_threshold:
            why_not["3d_lowres"] = (f"the 3d_fullres patch already covers {coverage:.0%} of the median image "
                                    f"(3d_lowres needs < {settings.lowres_threshold:.0%})")
        if spacing_ratio <= settings.anisotropy_threshold:
            why_not["2.5d"] = (f"it is for anisotropic data; the coarsest median spacing is only "
                               f"{spacing_ratio:.2f}× the others (needs > {settings.anisotropy_threshold:g}×)")

    configs: dict[str, PlanConfig] = {}
    if "2d" in wanted:
        configs["2d"] = _shape_config(ctx, name="2d", architecture="unet", spacing=fr_sp, median_shape=fr_shape,
                                      dims=2, resample_slices=False)
        configs["2d"].batch_dice = True
    if "3d_fullres" in wanted and fullres_cfg is not None:
        configs["3d_fullres"] = fullres_cfg
    if "3d_lowres" in wanted and "3d_lowres" not in why_not and fullres_cfg is not None:
        lowres, why = _lowres(ctx, fullres_cfg, fr_sp, fr_shape, n_cases)
        if lowres is None:
            why_not["3d_lowres"] = why
        else:
            configs["3d_lowres"] = lowres
    if "2.5d" in wanted and "2.5d" not in why_not:
        configs["2.5d"] = _plan_25d(ctx, spacings, shapes, median_spacing, t)
    if "vnet" in wanted and "vnet" not in why_not:
        configs["vnet"] = _shape_config(ctx, name="vnet", architecture="vnet", spacing=fr_sp,
                                        median_shape=fr_shape, dims=3)
    refused = [c for c in wanted if c in why_not]
    if settings.configurations is not None and refused:
        raise ConfigError(f"configuration {refused[0]} does not apply to this dataset: {why_not[refused[0]]}",
                          hint=f"applicable: {', '.join(c for c in CONFIGURATIONS if c not in why_not)}")
    for cfg in configs.values():
        cfg.data_identifier = _data_identifier(cfg.spacing, cfg.resample_slices)
    if "3d_fullres" in configs:
        configs["3d_fullres"].batch_dice = False  # no cascade: nnU-Net uses sample Dice for 3d_fullres then

    ordered = {name: configs[name] for name in CONFIGURATIONS if name in configs}
    memory_model = {"gpu_memory_gb": settings.gpu_memory_gb, "fixed_bytes": GPU_FIXED_BYTES, "slack": GPU_SLACK,
                    "amp": settings.amp, "amp_activation_factor": AMP_ACTIVATION_FACTOR,
                    "formula": "fixed_bytes + weight_state + slack * amp_activation_factor * activations"}
    return Plan(
        dataset=str(fingerprint.get("dataset", "")),
        channel_names=channel_names,
        labels=labels,
        transpose_forward=[int(v) for v in transpose],
        transpose_backward=[int(v) for v in backward],
        median_spacing=[float(v) for v in median_spacing],
        median_shape=_median_int(np.median(shapes, axis=0)),
        target_spacing=[float(v) for v in fullres],
        anisotropic=aniso_axis is not None and settings.target_spacing is None,
        anisotropic_axis=aniso_axis if settings.target_spacing is None else None,
        normalization=_normalization(fingerprint, settings),
        configurations=ordered,
        settings=settings.to_dict(),
        memory_model=memory_model,
        fingerprint_sha256=fingerprint_digest(fingerprint),
        skipped={name: why_not[name] for name in CONFIGURATIONS if name in why_not},
    )


def _lowres(ctx: _Context, fullres: PlanConfig, fr_sp: np.ndarray, fr_shape: np.ndarray, n_cases: int
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
        sub = _Context(ctx.in_channels, ctx.num_classes, median_vox * n_cases, ctx.settings)
        cfg = _shape_config(sub, name="3d_lowres", architecture="unet", spacing=sp,
                            median_shape=[round(float(v)) for v in shape], dims=3)
        patch_vox = float(np.prod(cfg.patch_size, dtype=np.float64))
    if cfg is None or float(np.prod(fr_shape, dtype=np.float64)) / median_vox < LOWRES_MIN_VOXEL_RATIO:
        return None, "the low-resolution images would be less than 2× smaller than the full-resolution ones"
    return cfg, ""


def _plan_25d(ctx: _Context, spacings: np.ndarray, shapes: np.ndarray, median_spacing: np.ndarray,
              t: np.ndarray) -> PlanConfig:
    """Wang et al. 2019 2.5D U-Net at the native (median) slice spacing.

    In-plane-only 1×3×3 convolutions and 1×2×2 pooling while the in-plane spacing is finer than
    the slice spacing by more than :data:`NEAR_ISOTROPIC_25D`, 3D convolutions after that; spatial
    attention in the decoder. With ``context_slices_25d=k`` it is instead a 2D U-Net whose input is
    the slice and its k neighbours on each side, stacked as channels.
    """
    s = ctx.settings
    sp = median_spacing.copy()
    shape = _resampled_median_shape(spacings, shapes, sp)
    sp_t, shape_t = sp[t], shape[t]
    if s.context_slices_25d > 0:
        cfg = _shape_config(ctx, name="2.5d", architecture="unet25d", spacing=sp_t, median_shape=shape_t, dims=2,
                            resample_slices=False, input_slices=2 * s.context_slices_25d + 1,
                            attention=s.attention_25d)
        cfg.batch_dice = True
        return cfg
    return _shape_config(ctx, name="2.5d", architecture="unet25d", spacing=sp_t, median_shape=shape_t, dims=3,
                         attention=s.attention_25d, ratio=NEAR_ISOTROPIC_25D)


# ============================================================================ outputs
def plan_summary_rows(plan: Plan) -> list[dict[str, Any]]:
    """One row per configuration for the CLI's table."""
    rows = []
    for name, cfg in plan.configurations.items():
        rows.append({
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
        })
    return rows


def run_planning(dataset: Any, work_dir: str | os.PathLike[str], settings: PlanSettings | None = None, *,
                 force: bool = False, num_workers: int | None = None) -> tuple[Plan, Path]:
    """Fingerprint (cached) into ``<work_dir>/<dataset.name>/fingerprint.json``, plan, write ``plans.json``."""
    from .fingerprint import fingerprint_dataset

    out_dir = Path(work_dir) / str(dataset.name)
    fp = fingerprint_dataset(dataset, out_dir, force=force, num_workers=num_workers)
    plan = make_plan(fp, settings or PlanSettings())
    return plan, save_plan(plan, out_dir / PLANS_FILE)


__all__ = [
    "CONFIGURATIONS",
    "ChannelNormalization",
    "Plan",
    "PlanConfig",
    "PlanSettings",
    "SCHEMA_VERSION",
    "estimate_gpu_bytes",
    "estimate_training_bytes",
    "load_plan",
    "make_plan",
    "memory_breakdown",
    "plan_summary_rows",
    "run_planning",
    "save_plan",
    "target_spacing",
    "topology",
]
