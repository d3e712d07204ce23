"""Gaussian-weighted sliding-window prediction of a whole case (nnU-Net's ``predict_sliding_window``).

:func:`sliding_window_inference` is the core (MONAI's style: a function taking any callable
``predictor``); :class:`SlidingWindowPredictor` holds a network and its window settings; and
:func:`predict_case_logits` reads those settings from a plan configuration.

What it does, as nnU-Net v2 does it:

* **Windows** (:mod:`segpipe.inference.windows`). Per axis, the step is at most ``(1 - overlap) × patch`` and the positions are
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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..planning import PlanConfig
from ..progress import Progress
from ..settings import configured
from .windows import (
    FLOAT16_WEIGHT_FLOOR,
    GAUSSIAN_SIGMA_SCALE,
    GAUSSIAN_VALUE_SCALE,
    MAX_WINDOWS,
    RowSums,
    Sink,
    case_window,
    check_overlap,
    check_sum_settings,
    check_window_mode,
    gaussian_importance_map,
    network_divisor,
    padded_image,
    window_crops,
    window_layout,
    window_starts,
    window_weights,
)

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

WINDOW_PROGRESS_DELAY = 3.0  # seconds a case runs before its bar appears on a terminal (short cases stay quiet)
WINDOW_BAR_REFRESH = 1.0  # seconds between redraws of that bar

Predictor = Callable[[torch.Tensor], Any]
ProgressArg = Callable[[int, int], None] | bool | str | None


# ---------------------------------------------------------------------------- checks


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


def _window_bar(progress: ProgressArg, total: int) -> Progress | None:
    """segpipe's progress of the windows when ``progress`` is True or a case name, else None."""
    if progress is True or isinstance(progress, str):
        desc = progress if isinstance(progress, str) else "sliding window"
        return Progress(desc, total, unit="window", refresh=WINDOW_BAR_REFRESH, delay=WINDOW_PROGRESS_DELAY)
    return None


def _predict(predictor: Predictor, batch: torch.Tensor, amp: torch.autocast | None) -> torch.Tensor:
    """The predictor's full-resolution logits of a batch of windows, under autocast when given."""
    if amp is not None:
        with amp:
            return _output_tensor(predictor(batch))
    return _output_tensor(predictor(batch))


def _checked_classes(
    out: torch.Tensor, batch: torch.Tensor, windows: int, patch: tuple[int, ...], classes: int | None
) -> int:
    """The number of classes of a batch's logits, refused when their shape does not match the batch."""
    if out.ndim != batch.ndim or out.shape[0] != windows or tuple(out.shape[2:]) != patch:
        raise ConfigError(
            f"the predictor returned shape {tuple(out.shape)} for a batch of shape {tuple(batch.shape)}",
            hint="the network must keep the patch size (use a patch the planner chose)",
        )
    if classes is None:
        return int(out.shape[1])
    if out.shape[1] != classes:
        raise ConfigError(f"the predictor returned {out.shape[1]} classes, expected {classes}")
    return classes


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
    check_overlap(overlap)
    check_sum_settings(accumulate_dtype, batch_size)
    layout = window_layout(tuple(int(s) for s in image.shape[1:]), patch_size, overlap, context_slices)
    image = padded_image(image, layout, output_device)
    windows = layout.windows()
    gauss = window_weights(layout.patch, accumulate_dtype, weight_floor, output_device)
    gauss32 = gauss.float()
    sums = RowSums(layout, dtype=accumulate_dtype, device=output_device, sink=sink)
    total = layout.total
    bar = _window_bar(progress, total)
    report = progress if callable(progress) else None
    classes = None if num_classes is None else int(num_classes)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else None
    weight_block = gauss[None] if layout.slice_mode else gauss
    try:
        for first in range(0, total, int(batch_size)):
            chunk = list(itertools.islice(windows, int(batch_size)))
            crops = window_crops(image, chunk, layout)
            batch = torch.stack(crops).to(device, non_blocking=True)
            out = _predict(predictor, batch, amp)
            classes = _checked_classes(out, batch, len(chunk), layout.patch, classes)
            sums.allocate(classes)
            out = out.to(output_device).float() * gauss32
            if accumulate_dtype != torch.float32:
                out = out.to(accumulate_dtype)
            sums.add(chunk, out, weight_block)
            if bar is not None:
                bar.update(len(chunk))
            if report is not None:
                report(min(first + len(chunk), total), total)
        sums.flush(layout.out_shape[0])
    finally:
        if bar is not None:
            bar.close()
    return sums.result()


# ---------------------------------------------------------------------------- thin class and plan glue
class SlidingWindowPredictor:
    """A network with its window settings: ``SlidingWindowPredictor(net, patch_size)(image) -> logits``.

    The keyword arguments are those of :func:`sliding_window_inference`, and ``window`` (default the
    ``infer.window`` setting, ``pad``): ``"pad"`` slides the patch (an image axis smaller than it is padded with zeros, as nnU-Net does); ``"fit"``
    slides a window fitted to each image (:func:`~segpipe.inference.windows.fitted_window`: an axis
    smaller than the patch is covered by its extent rounded up to ``divisor``, one a little longer by
    one grown window), which needs the network's ``divisor`` per axis. With ``device`` the network
    is moved there once, at construction. :meth:`from_plan` reads the patch, the divisor and the
    slab from a plan configuration.
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
        window: str | None = None,
        divisor: Sequence[int] | None = None,
    ):
        overlap = configured(overlap, "infer.overlap")
        window = str(configured(window, "infer.window"))
        check_overlap(overlap)
        check_window_mode(window)
        if window == "fit" and divisor is None:
            raise ConfigError("window=fit needs the network's divisor (the product of its strides per axis)")
        self.window = window
        self.divisor = None if divisor is None else tuple(int(d) for d in divisor)
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
        """The predictor of a plan configuration: its ``patch_size``, ``context_slices``, its network's
        divisor and, unless given, its training ``batch_size`` as the window batch (inference stores no
        activations)."""
        cfg = plan_config if isinstance(plan_config, PlanConfig) else PlanConfig.from_dict(plan_config)
        kwargs.setdefault("batch_size", max(1, int(cfg.batch_size)))
        kwargs.setdefault("divisor", network_divisor(cfg.strides))
        context = int(cfg.context_slices) if cfg.dims == 2 else 0
        return cls(network, cfg.patch_size, context_slices=context, **kwargs)

    def __call__(self, image: torch.Tensor | np.ndarray, sink: Sink | None = None) -> torch.Tensor | None:
        """The logits [K, *spatial] of ``image`` (or None, the rows handed to ``sink``: see
        :func:`sliding_window_inference`)."""
        return sliding_window_inference(
            image,
            self.network,
            self.window_size(tuple(int(s) for s in image.shape[1:])),
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

    def window_size(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The window that slides over an image of ``spatial`` shape (the patch with ``window="pad"``)."""
        return case_window(spatial, self.patch_size, self.divisor, self.window)

    def __repr__(self) -> str:
        return (
            f"SlidingWindowPredictor(patch_size={self.patch_size}, window={self.window!r}, overlap={self.overlap}, "
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
