"""Network topology rules and the per-architecture memory model of a training step."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError
from ..settings import configured
from .plan import PlanConfig
from .settings import (
    AMP_ACTIVATION_FACTOR,
    ARCHITECTURES,
    FEATURE_MAP_MIN_EDGE,
    FLOAT_BYTES,
    GPU_FIXED_BYTES,
    GPU_SLACK,
)


# ============================================================================ topology
def _pad_shape(shape: Sequence[float] | np.ndarray, divisor: Sequence[int]) -> list[int]:
    return [int(math.ceil(s / d) * d) for s, d in zip(shape, divisor)]


def topology(
    spacing: Sequence[float] | np.ndarray,
    patch: Sequence[float] | np.ndarray,
    *,
    min_edge: int = FEATURE_MAP_MIN_EDGE,
    ratio: float = 2.0,
) -> tuple[list[list[int]], list[list[int]], list[int], list[int]]:
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
                params += cin * c if cin != c else 0  # 1×1 residual projection (output not saved)
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
    return {
        "parameters": int(params),
        "weight_state": int(weight_state),
        "activations": int(activations),
        "total": int(weight_state + activations),
    }


def attention_hidden(channels: int) -> int:
    """Hidden width of the 2.5d spatial-attention block."""
    return max(channels // 2, 1)


def estimate_training_bytes(plan_config: PlanConfig, in_channels: int, num_classes: int, batch_size: int) -> int:
    """Bytes held by the tensors of one fp32 training step (see :func:`memory_breakdown`)."""
    return memory_breakdown(plan_config, in_channels, num_classes, batch_size)["total"]


def estimate_gpu_bytes(
    plan_config: PlanConfig, in_channels: int, num_classes: int, batch_size: int, *, amp: bool | None = None
) -> int:
    """Predicted peak GPU memory (as nvidia-smi shows it) of a training step; see :data:`GPU_SLACK`."""
    amp = configured(amp, "planner.amp")
    b = memory_breakdown(plan_config, in_channels, num_classes, batch_size)
    factor = AMP_ACTIVATION_FACTOR if amp else 1.0
    return int(GPU_FIXED_BYTES + b["weight_state"] + GPU_SLACK * factor * b["activations"])
