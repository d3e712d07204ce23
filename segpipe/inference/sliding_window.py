"""Gaussian-weighted sliding-window prediction of a whole case (nnU-Net's ``predict_sliding_window``).

:func:`sliding_window_inference` is the core (MONAI's style: a function taking any callable
``predictor``); :class:`SlidingWindowPredictor` holds a network and its window settings; and
:func:`predict_case_logits` reads those settings from a plan configuration.

What it does, as nnU-Net v2 does it:

* **Windows.** Per axis, the step is at most ``(1 - overlap) × patch`` and the positions are
  spread evenly so that the first window starts at 0 and the last ends at the image's edge
  (:func:`window_starts`). A step under one voxel (``overlap`` near 1) gives every start once:
  rounded starts that coincide are one window. An image smaller than the patch along an axis
  (a volume of one or two slices, say) is padded with zeros, half on each side, and the result
  cropped back. A case is refused (:class:`~segpipe.errors.ConfigError`, naming the count and a
  lower ``overlap``) before any window runs when it needs more than :data:`MAX_WINDOWS` windows.
* **Weights.** Each window's logits are multiplied by a Gaussian importance map (σ = patch/8 per
  axis, truncated at 4σ like ``scipy.ndimage.gaussian_filter``, scaled to a maximum of 10, zeros
  raised to the smallest non-zero value in the accumulation dtype so no voxel ends with weight 0);
  logits × weight and the weights are summed, and divided at the end.
* **2-D networks on 3-D volumes.** A ``patch_size`` of 2 on a [C, Z, Y, X] image runs the network
  slice by slice along axis 0 (segpipe's ``2d`` configurations train on such slices). With
  ``context_slices = k`` (2.5-D slab mode) each slice's input is the 2k+1 slices around it, zeros
  beyond the volume, stacked channel-major (channel ``c * (2k+1) + j`` is channel c of slice
  ``z - k + j``): exactly what :class:`~segpipe.data.PatchSampler` gives the network in training.

Networks in training mode return a list (deep supervision); a ``torch.nn.Module`` predictor is put in
eval mode for the call (segpipe's networks then return one tensor) and restored afterwards, and a
list or tuple output is reduced to its first (full-resolution) entry either way. Everything runs
under ``torch.inference_mode()`` in float32 (or the ``accumulate_dtype``), never float64.

Progress (``progress=True`` or a case name): the windows done out of the case's total, through
:class:`segpipe.progress.Progress` — a bar redrawn at most once a second on a terminal, shown once
the case has run :data:`WINDOW_PROGRESS_DELAY` seconds; otherwise a log line every ~10 % (at most
one per 5 s) or every 30 s; nothing when the ``segpipe`` logger is quieter than INFO (``-q``).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError, DataError
from ..planning import PlanConfig
from ..progress import Progress
from ..settings import configured

__all__ = [
    "GAUSSIAN_SIGMA_SCALE",
    "GAUSSIAN_VALUE_SCALE",
    "FLOAT16_WEIGHT_FLOOR",
    "MAX_WINDOWS",
    "SlidingWindowPredictor",
    "gaussian_importance_map",
    "predict_case_logits",
    "sliding_window_inference",
    "window_starts",
]

log = logging.getLogger("segpipe")

GAUSSIAN_SIGMA_SCALE = 1.0 / 8  # σ = patch / 8 per axis (nnU-Net)
GAUSSIAN_VALUE_SCALE = 10.0  # the map's maximum (nnU-Net): keeps its tails representable in float16
GAUSSIAN_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default: zero beyond 4σ
# Float16 sums: nnU-Net's map reaches ~4e-10 in a 3-D window's corners, below float16's smallest
# subnormal (6e-8), and logits × weight there keep almost no bits, so whatever only corners cover (the
# image's own corners) came out wrong by up to tens of percent. Flooring the map at 2^-10 (1e-4 of its
# maximum) keeps those products normal; where windows overlap, the blend is unchanged in practice.
FLOAT16_WEIGHT_FLOOR = 2.0**-10
# The most windows one case may take. A 512 × 512 × 1000-voxel CT with a 128³ patch needs 31 × 31 × 70 ≈ 67 000
# at overlap 0.9 (735 at the default 0.5), so this is far beyond any useful overlap; a million windows of that
# patch take hours even on a GPU. Above it the case is refused before any window runs, with the count and a
# lower overlap=, instead of running for days. Windows are generated as they run, so none of this costs memory.
MAX_WINDOWS = 1_000_000
WINDOW_PROGRESS_DELAY = 3.0  # seconds a case runs before its bar appears on a terminal (short cases stay quiet)
WINDOW_BAR_REFRESH = 1.0  # seconds between redraws of that bar

Predictor = Callable[[torch.Tensor], Any]
Sink = Callable[[int, torch.Tensor], None]
ProgressArg = Callable[[int, int], None] | bool | str | None


# ---------------------------------------------------------------------------- window geometry
def window_starts(
    image_size: Sequence[int], patch_size: Sequence[int], overlap: float | None = None
) -> list[list[int]]:
    """Start index of every window, per axis (nnU-Net's ``compute_steps_for_sliding_window``).

    ``overlap`` is the fraction of the patch shared by neighbouring windows at most (0.5: step
    half a patch). Windows are spread evenly: the first starts at 0, the last ends at the edge.
    E.g. image 110, patch 64, overlap 0.5 → ``[0, 23, 46]``. Each image size must be ≥ the patch.
    Each start is listed once: where the step falls under one voxel (overlap 0.99 on a 64-voxel
    patch, say), the starts are every voxel, ``range(size - patch + 1)`` — the distinct values of
    nnU-Net's rounded positions, computed without listing their duplicates.
    """
    overlap = configured(overlap, "infer.overlap")
    _check_overlap(overlap)
    if len(image_size) != len(patch_size):
        raise ConfigError(f"image size {tuple(image_size)} and patch size {tuple(patch_size)} differ in length")
    starts: list[list[int]] = []
    for size, patch in zip(image_size, patch_size):
        size, patch = int(size), int(patch)
        if size < patch:
            raise ConfigError(f"image size {size} is smaller than the patch {patch}", hint="pad the image first")
        step = patch * (1.0 - overlap)
        # at most one window per voxel: n - 1 = size - patch steps of exactly one voxel are every distinct start
        n = min(int(math.ceil((size - patch) / step)), size - patch) + 1
        actual = (size - patch) / (n - 1) if n > 1 else 0.0
        starts.append([int(round(actual * i)) for i in range(n)])  # banker's rounding, as np.round
    return starts


def gaussian_importance_map(
    patch_size: Sequence[int],
    *,
    sigma_scale: float = GAUSSIAN_SIGMA_SCALE,
    value_scale: float = GAUSSIAN_VALUE_SCALE,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    floor: float = 0.0,
) -> torch.Tensor:
    """nnU-Net's Gaussian importance map of one window, shape ``patch_size``.

    The map is ``scipy.ndimage.gaussian_filter`` of a unit impulse at ``patch // 2`` (σ =
    ``sigma_scale × patch`` per axis, truncated at 4σ), scaled to a maximum of ``value_scale``,
    converted to ``dtype``, and its zeros raised to its smallest non-zero value (a voxel of weight 0
    would divide by 0). ``floor`` raises every value below it to it (see :data:`FLOAT16_WEIGHT_FLOOR`).
    Computed in float32 by separable products, without scipy.
    """
    axes = []
    for p in patch_size:
        p = int(p)
        if p < 1:
            raise ConfigError(f"patch sizes must be positive, got {tuple(patch_size)}")
        sigma = p * sigma_scale
        radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
        x = torch.arange(p, dtype=torch.float32) - (p // 2)
        g = torch.exp(-0.5 * (x / sigma) ** 2)
        g[x.abs() > radius] = 0.0
        axes.append(g)
    weights = axes[0]
    for g in axes[1:]:
        weights = weights[..., None] * g
    weights = weights * (value_scale / float(weights.max()))
    if floor > 0:
        weights = weights.clamp_min(float(floor))
    weights = weights.to(device=device, dtype=dtype)
    zero = weights == 0
    if bool(zero.any()):
        weights[zero] = weights[~zero].min()
    return weights


# ---------------------------------------------------------------------------- checks
def _check_overlap(overlap: float) -> None:
    try:
        ok = 0.0 <= float(overlap) < 1.0  # False for NaN too
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap}", hint="0.5 (nnU-Net's default) is a good value")


def _check_window_count(
    plane: Sequence[int], patch: Sequence[int], overlap: float, starts: Sequence[Sequence[int]], slices: int
) -> int:
    """The number of windows of a case (``slices`` × those of one plane), refused above :data:`MAX_WINDOWS`."""
    total = slices * math.prod(len(axis) for axis in starts)
    if total > MAX_WINDOWS:
        usual = slices * math.prod(len(axis) for axis in window_starts(plane, patch, 0.5))
        grid = " × ".join(str(s) for s in ((slices,) if slices > 1 else ()) + tuple(plane))
        if usual <= MAX_WINDOWS:
            hint = f"a lower overlap=, e.g. the default overlap=0.5: {usual:,} windows here"
        else:
            hint = f"crop the image to the region to segment (even overlap=0.5 needs {usual:,} windows)"
        raise ConfigError(
            f"overlap={overlap} needs {total:,} windows of {' × '.join(map(str, patch))} voxels to cover this case "
            f"({grid} voxels on the network's grid); segpipe slides at most {MAX_WINDOWS:,} per case",
            hint=hint,
        )
    return total


def _as_image(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise DataError(f"the image must be a numpy array or a torch tensor, got {type(image).__name__}")
    if image.ndim not in (3, 4):
        raise DataError(
            f"the image must be [C, Y, X] or [C, Z, Y, X], got shape {tuple(image.shape)}",
            hint="add the channel axis (image[None]) for a single-channel volume",
        )
    if not image.is_floating_point() or image.dtype != torch.float32:
        image = image.to(torch.float32)
    return image


def _output_tensor(out: Any) -> torch.Tensor:
    """The full-resolution tensor of a network output (deep supervision gives a list)."""
    if isinstance(out, (list, tuple)):
        if not out:
            raise ConfigError("the predictor returned an empty list")
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"the predictor must return a tensor (or a list of them), got {type(out).__name__}")
    return out


def _box(lower: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(int(lo), int(lo) + int(n)) for lo, n in zip(lower, size))


def _default_device(predictor: Predictor, image: torch.Tensor) -> torch.device:
    if isinstance(predictor, nn.Module):
        for p in predictor.parameters():
            return p.device
    return image.device


# ---------------------------------------------------------------------------- core
def sliding_window_inference(
    image: torch.Tensor | np.ndarray,
    predictor: Predictor,
    patch_size: Sequence[int],
    *,
    overlap: float | None = None,
    batch_size: int = 4,
    num_classes: int | None = None,
    context_slices: int = 0,
    device: torch.device | str | None = None,
    output_device: torch.device | str | None = None,
    accumulate_dtype: torch.dtype = torch.float32,
    autocast_dtype: torch.dtype | None = None,
    weight_floor: float | None = None,
    progress: ProgressArg = None,
    sink: Sink | None = None,
) -> torch.Tensor | None:
    """Logits [K, *spatial] (float32) of ``predictor`` slid over ``image`` [C, *spatial].

    ``image``: [C, Y, X] or [C, Z, Y, X], numpy or torch. ``patch_size``: one entry per spatial axis,
    or 2 entries on a 3-D image to run a 2-D network slice by slice along axis 0, with
    ``context_slices`` k slices on each side as extra channels (2.5-D slabs; 2-D patches only).
    ``predictor`` maps a batch [B, C', *patch] to [B, K, *patch] (or a list whose first entry is
    that); ``batch_size`` windows go through it at once. ``num_classes`` (K) is read from the first
    output when not given.

    ``device`` runs the predictor (default: the network's device, else the image's);
    ``output_device`` holds the image and the sums (default ``device``; when a CUDA sum runs out of
    memory the call is retried with the sums on the CPU, as nnU-Net does). ``accumulate_dtype``:
    float32 (default) or float16 (half the memory on a GPU; nnU-Net's choice; its Gaussian is floored at
    :data:`FLOAT16_WEIGHT_FLOOR`; ``weight_floor`` sets another floor, 0 for nnU-Net's exact map). ``autocast_dtype``
    (e.g. ``torch.bfloat16``) runs the predictor under autocast. ``progress``: ``True`` shows
    segpipe's progress of the windows (see the module docstring), a string the same under that name
    (a case's, say), or a callable ``(windows_done, windows_total)``. A case needing more than
    :data:`MAX_WINDOWS` windows is refused (:class:`~segpipe.errors.ConfigError`) before any runs.

    ``sink``: instead of returning the logits, hand them over block by block as they become final,
    ``sink(row, block)`` with ``block`` [K, n, *rest] float32 = rows ``row .. row + n`` of the first
    spatial axis (the image's own rows, padding removed); the call then returns None. The sums
    are then held for one patch depth of rows only (one slice for 2-D networks on a volume), so
    the memory does not grow with the image. After a CUDA retry a sink sees rows again: write
    blocks by position.
    """
    overlap = configured(overlap, "infer.overlap")
    dev = torch.device(device) if device is not None else None
    out_dev = torch.device(output_device) if output_device is not None else None
    kwargs: dict[str, Any] = dict(
        overlap=overlap,
        batch_size=batch_size,
        num_classes=num_classes,
        context_slices=context_slices,
        accumulate_dtype=accumulate_dtype,
        autocast_dtype=autocast_dtype,
        weight_floor=weight_floor,
        progress=progress,
        sink=sink,
    )
    module = predictor if isinstance(predictor, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        img = _as_image(image)
        dev = dev if dev is not None else _default_device(predictor, img)
        out_dev = out_dev if out_dev is not None else dev
        try:
            return _slide(img, predictor, patch_size, device=dev, output_device=out_dev, **kwargs)
        except torch.cuda.OutOfMemoryError:
            if out_dev.type != "cuda":
                raise
            log.warning("sliding window: out of GPU memory for the whole-image sums; summing on the CPU instead")
            torch.cuda.empty_cache()
            return _slide(img, predictor, patch_size, device=dev, output_device=torch.device("cpu"), **kwargs)
    finally:
        if module is not None:
            module.train(was_training)


@torch.inference_mode()
def _slide(
    image: torch.Tensor,
    predictor: Predictor,
    patch_size: Sequence[int],
    *,
    overlap: float,
    batch_size: int,
    num_classes: int | None,
    context_slices: int,
    device: torch.device,
    output_device: torch.device,
    accumulate_dtype: torch.dtype,
    autocast_dtype: torch.dtype | None,
    weight_floor: float | None,
    progress: ProgressArg,
    sink: Sink | None,
) -> torch.Tensor | None:
    _check_overlap(overlap)
    if accumulate_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"accumulate_dtype must be float32, float16 or bfloat16, got {accumulate_dtype}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}")
    patch = tuple(int(p) for p in patch_size)
    spatial = tuple(int(s) for s in image.shape[1:])
    slice_mode = len(patch) == 2 and len(spatial) == 3
    if len(patch) != len(spatial) and not slice_mode:
        raise ConfigError(
            f"patch size {patch} does not fit an image of spatial shape {spatial}",
            hint="give one patch size per spatial axis (or 2 on a 3-D image for slice-by-slice prediction)",
        )
    if min(patch) < 1:
        raise ConfigError(f"patch sizes must be positive, got {patch}")
    k = int(context_slices)
    if k < 0:
        raise ConfigError(f"context_slices must be ≥ 0, got {context_slices}")
    if k and not slice_mode:
        raise ConfigError("context_slices needs a 2-D patch on a 3-D image (2.5-D slabs are 2-D windows)")

    # pad what is smaller than the patch (half on each side, zeros); in slab mode also k slices above and below
    window_axes = spatial[1:] if slice_mode else spatial
    lower = [max(p - s, 0) // 2 for p, s in zip(patch, window_axes)]
    upper = [max(p - s, 0) - lo for p, s, lo in zip(patch, window_axes, lower)]
    if slice_mode:
        lower, upper = [k, *lower], [k, *upper]
    padded = tuple(s + lo + up for s, lo, up in zip(spatial, lower, upper))
    out_shape = (spatial[0], *padded[1:]) if slice_mode else padded  # slab padding is input only
    plane = padded[1:] if slice_mode else padded
    starts = window_starts(plane, patch, overlap)
    total = _check_window_count(plane, patch, overlap, starts, spatial[0] if slice_mode else 1)
    pad: list[int] = []
    for lo, up in zip(reversed(lower), reversed(upper)):
        pad.extend((lo, up))
    image = image.to(output_device)
    if any(pad):
        image = F.pad(image, pad, mode="constant", value=0.0)
    # (slice, start) of every window, in order of their first row, generated as they are needed
    windows = itertools.product(range(spatial[0]) if slice_mode else (0,), itertools.product(*starts))

    if weight_floor is None:
        floor = FLOAT16_WEIGHT_FLOOR if accumulate_dtype == torch.float16 else 0.0
    else:
        floor = float(weight_floor)
    gauss = gaussian_importance_map(patch, dtype=accumulate_dtype, device=output_device, floor=floor)
    gauss32 = gauss.float()

    # The sums live in a rolling buffer of `depth` rows along the first output axis: windows come in
    # order of their first row, so when a window starting at row r arrives no later window reaches
    # the rows before r; those are divided by their weights, handed to the sink and dropped.
    depth = 1 if slice_mode else patch[0]
    rows_total = out_shape[0]
    first_kept = 0 if slice_mode else lower[0]  # the unpadded rows [first_kept, first_kept + spatial[0])
    rest_crop = _box(lower[1:], spatial[1:])
    rest_shape = tuple(out_shape[1:])
    state: dict[str, Any] = {"base": 0, "buf": None}
    out_full: list[torch.Tensor] = []

    def deliver(row0: int, block: torch.Tensor) -> None:
        if sink is not None:
            sink(row0, block)
            return
        if not out_full:
            out_full.append(torch.empty((block.shape[0], *spatial), dtype=torch.float32, device=output_device))
        out_full[0][:, row0 : row0 + block.shape[1]] = block

    def flush(upto: int) -> None:
        """Finalise rows [base, upto) of the buffer and shift it so that it starts at ``upto``."""
        buf, base = state["buf"], state["base"]
        upto = min(upto, rows_total)
        if buf is None or upto <= base:
            return
        lo, hi = max(base, first_kept), min(upto, first_kept + spatial[0])
        if hi > lo:
            rows = slice(lo - base, hi - base)
            block = buf[(slice(None, -1), rows) + rest_crop].float()
            block /= buf[(slice(-1, None), rows) + rest_crop].float()
            deliver(lo - first_kept, block)
        shift = upto - base
        keep = depth - shift
        for i in range(max(keep, 0)):  # rows move down in order: a source row is read before it is overwritten
            buf[:, i].copy_(buf[:, i + shift])
        buf[:, max(keep, 0) :].zero_()
        state["base"] = upto

    bar = None
    if progress is True or isinstance(progress, str):
        desc = progress if isinstance(progress, str) else "sliding window"
        bar = Progress(desc, total, unit="window", refresh=WINDOW_BAR_REFRESH, delay=WINDOW_PROGRESS_DELAY)
    report = progress if callable(progress) else None
    classes = None if num_classes is None else int(num_classes)
    slab = 2 * k + 1
    channels = image.shape[0]
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else None
    weight_block = gauss[None] if slice_mode else gauss
    try:
        for first in range(0, total, int(batch_size)):
            chunk = list(itertools.islice(windows, int(batch_size)))
            crops = []
            for z, pos in chunk:
                box = _box(pos, patch)
                if slice_mode:  # padded slices z .. z + 2k are the slab around slice z
                    crops.append(image[(slice(None), slice(z, z + slab)) + box].reshape((channels * slab,) + patch))
                else:
                    crops.append(image[(slice(None),) + box])
            batch = torch.stack(crops).to(device, non_blocking=True)
            if amp is not None:
                with amp:
                    out = _output_tensor(predictor(batch))
            else:
                out = _output_tensor(predictor(batch))
            if out.ndim != batch.ndim or out.shape[0] != len(chunk) or tuple(out.shape[2:]) != patch:
                raise ConfigError(
                    f"the predictor returned shape {tuple(out.shape)} for a batch of shape {tuple(batch.shape)}",
                    hint="the network must keep the patch size (use a patch the planner chose)",
                )
            if classes is None:
                classes = int(out.shape[1])
            elif out.shape[1] != classes:
                raise ConfigError(f"the predictor returned {out.shape[1]} classes, expected {classes}")
            if state["buf"] is None:  # K class sums and, last, the sum of weights
                state["buf"] = torch.zeros(
                    (classes + 1, depth, *rest_shape), dtype=accumulate_dtype, device=output_device
                )
            buf = state["buf"]
            out = out.to(output_device).float() * gauss32
            if accumulate_dtype != torch.float32:
                out = out.to(accumulate_dtype)
            for (z, pos), pred in zip(chunk, out):
                row = z if slice_mode else pos[0]
                flush(row)
                rows = slice(row - state["base"], row - state["base"] + depth)
                rest = _box(pos, patch) if slice_mode else _box(pos[1:], patch[1:])
                if slice_mode:
                    buf[(slice(None, -1), rows) + rest] += pred[:, None]
                else:
                    buf[(slice(None, -1), rows) + rest] += pred
                buf[(slice(-1, None), rows) + rest] += weight_block
            if bar is not None:
                bar.update(len(chunk))
            if report is not None:
                report(min(first + len(chunk), total), total)
        flush(rows_total)
    finally:
        if bar is not None:
            bar.close()
    return out_full[0] if sink is None else None


# ---------------------------------------------------------------------------- thin class and plan glue
class SlidingWindowPredictor:
    """A network with its window settings: ``SlidingWindowPredictor(net, patch_size)(image) -> logits``.

    The keyword arguments are those of :func:`sliding_window_inference`. With ``device`` the network
    is moved there once, at construction. :meth:`from_plan` reads the patch and the slab from a plan
    configuration.
    """

    def __init__(
        self,
        network: Predictor,
        patch_size: Sequence[int],
        *,
        overlap: float | None = None,
        batch_size: int = 4,
        num_classes: int | None = None,
        context_slices: int = 0,
        device: torch.device | str | None = None,
        output_device: torch.device | str | None = None,
        accumulate_dtype: torch.dtype = torch.float32,
        autocast_dtype: torch.dtype | None = None,
        progress: ProgressArg = None,
    ):
        overlap = configured(overlap, "infer.overlap")
        _check_overlap(overlap)
        self.network = network
        self.patch_size = tuple(int(p) for p in patch_size)
        self.overlap = float(overlap)
        self.batch_size = int(batch_size)
        self.num_classes = num_classes
        self.context_slices = int(context_slices)
        self.device = torch.device(device) if device is not None else None
        self.output_device = torch.device(output_device) if output_device is not None else None
        self.accumulate_dtype = accumulate_dtype
        self.autocast_dtype = autocast_dtype
        self.progress = progress
        if self.device is not None and isinstance(network, nn.Module):
            network.to(self.device)

    @classmethod
    def from_plan(
        cls, network: Predictor, plan_config: PlanConfig | Mapping[str, Any], **kwargs: Any
    ) -> SlidingWindowPredictor:
        """The predictor of a plan configuration: its ``patch_size``, ``context_slices`` and, unless
        given, its training ``batch_size`` as the window batch (inference stores no activations)."""
        cfg = plan_config if isinstance(plan_config, PlanConfig) else PlanConfig.from_dict(plan_config)
        kwargs.setdefault("batch_size", max(1, int(cfg.batch_size)))
        context = int(cfg.context_slices) if cfg.dims == 2 else 0
        return cls(network, cfg.patch_size, context_slices=context, **kwargs)

    def __call__(self, image: torch.Tensor | np.ndarray, sink: Sink | None = None) -> torch.Tensor | None:
        """The logits [K, *spatial] of ``image`` (or None, the rows handed to ``sink``: see
        :func:`sliding_window_inference`)."""
        return sliding_window_inference(
            image,
            self.network,
            self.patch_size,
            overlap=self.overlap,
            batch_size=self.batch_size,
            num_classes=self.num_classes,
            context_slices=self.context_slices,
            device=self.device,
            output_device=self.output_device,
            accumulate_dtype=self.accumulate_dtype,
            autocast_dtype=self.autocast_dtype,
            progress=self.progress,
            sink=sink,
        )

    def __repr__(self) -> str:
        return (
            f"SlidingWindowPredictor(patch_size={self.patch_size}, overlap={self.overlap}, "
            f"batch_size={self.batch_size}, context_slices={self.context_slices})"
        )


def predict_case_logits(
    network: Predictor,
    image: torch.Tensor | np.ndarray,
    plan_config: PlanConfig | Mapping[str, Any],
    *,
    sink: Sink | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Logits [K, Z, Y, X] (float32) of one preprocessed case [C, Z, Y, X] (as the cache holds it), on the
    cache's grid: a 3-D configuration slides its 3-D patch, a 2-D one its slices (2.5-D: its slabs).

    ``kwargs`` go to :func:`sliding_window_inference` (``overlap``, ``batch_size``, ``device``, ...);
    with ``sink`` the rows of logits go there as they are finished and None is returned.
    """
    img = _as_image(image)
    if img.ndim != 4:
        raise DataError(
            f"a preprocessed case is [C, Z, Y, X], got shape {tuple(img.shape)}",
            hint="load it with Cache.load (2-D cases keep a slice axis of 1)",
        )
    return SlidingWindowPredictor.from_plan(network, plan_config, **kwargs)(img, sink=sink)
