"""nnU-Net v2's resampling (``resample_data_or_seg_to_shape``), for the models nnU-Net trained.

A network trained by nnU-Net saw images resampled its way, and its logits are brought back its
way; segpipe runs such a model with this resampling so the network sees what it was trained on.
It differs from segpipe's own (:mod:`segpipe.preprocessing.resampling`, Catmull-Rom cubic in
float32 on torch) in three ways, each matched here:

* **Interpolation:** scipy's spline interpolation (order 3 for images, order 1 for logits) on
  float64, on a grid aligned at voxel edges (``grid_mode``), the border value repeated,
  and clipped to the input's range (a cubic spline overshoots at edges).
* **Anisotropic axes ("separate z"):** when the larger spacing exceeds 3× the smaller (of the
  current spacing, else of the target), the one axis with the largest spacing is resampled on its
  own with ``order_z`` (0: nearest), after every 2-D slice across it has been resampled with
  ``order`` (and clipped to that slice's range). Two or three axes tied for the largest spacing
  mean no separate axis.
* **Shapes:** ``round(old_spacing / new_spacing * old_shape)`` per axis.

The plan's ``resampling_fn_*_kwargs`` (``order``, ``order_z``, ``force_separate_z``) choose among
these; :func:`resampling_settings` refuses any other resampling function by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from ..errors import ConfigError

__all__ = [
    "NNUNET_RESAMPLING",
    "new_shape",
    "resample_like_nnunet",
    "resampling_settings",
    "resize_labels",
    "separate_axis",
]

#: the resampling function of nnU-Net's default planners, the one segpipe reproduces
NNUNET_RESAMPLING = "resample_data_or_seg_to_shape"
#: nnU-Net's anisotropy threshold for resampling an axis separately
ANISO_THRESHOLD = 3.0


def resampling_settings(
    name: Any, kwargs: Mapping[str, Any] | None, where: str, *, seg: bool = False
) -> dict[str, Any]:
    """``order``, ``order_z`` and ``force_separate_z`` of one plan entry (``seg``: the label maps' entry,
    which a cascade stage uses for the previous stage's prediction); another function is refused."""
    if str(name) != NNUNET_RESAMPLING:
        raise ConfigError(
            f"{where}: resampling function {name!r} is not one segpipe reproduces",
            hint=f"re-plan with nnU-Net's default resampling ({NNUNET_RESAMPLING})",
        )
    kw = dict(kwargs or {})
    if bool(kw.get("is_seg")) != seg:
        raise ConfigError(f"{where}: resampling with is_seg={kw.get('is_seg')} is not supported there")
    if seg and int(kw.get("order_z", 0)) != 0:
        raise ConfigError(f"{where}: label maps resampled with order_z={kw.get('order_z')} are not supported (0 is)")
    force = kw.get("force_separate_z")
    return {
        "order": int(kw.get("order", 3)),
        "order_z": int(kw.get("order_z", 0)),
        "force_separate_z": None if force is None else bool(force),
    }


def new_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """nnU-Net's ``compute_new_shape``: ``round(old_spacing / new_spacing * old_shape)`` per axis."""
    return [int(round(float(s) / float(t) * int(n))) for n, s, t in zip(shape, spacing, target, strict=True)]


def _lowres_axes(spacing: Sequence[float]) -> list[int]:
    sp = np.asarray(spacing, dtype=float)
    return [int(a) for a in np.where(max(spacing) / sp == 1)[0]]


def _anisotropic(spacing: Sequence[float]) -> bool:
    return bool(np.max(spacing) / np.min(spacing) > ANISO_THRESHOLD)


def separate_axis(current: Sequence[float], target: Sequence[float], force: bool | None) -> int | None:
    """The axis resampled on its own (nnU-Net's "separate z"), or None."""
    if force is not None:
        axes = _lowres_axes(current) if force else []
    elif _anisotropic(current):
        axes = _lowres_axes(current)
    elif _anisotropic(target):
        axes = _lowres_axes(target)
    else:
        axes = []
    return axes[0] if len(axes) == 1 else None


def _resize(image: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """A float64 array resized to ``shape``: spline of ``order`` on edge-aligned grids, border repeated,
    clipped to the input's range (what nnU-Net's ``skimage.transform.resize(mode='edge')`` does)."""
    zoom = [int(o) / int(i) for o, i in zip(shape, image.shape, strict=True)]
    out = ndimage.zoom(image, zoom, order=order, mode="nearest", grid_mode=True)
    if order > 0:
        np.clip(out, image.min(), image.max(), out=out)
    return out


def resize_labels(seg: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """A label map resized as nnU-Net's ``resize_segmentation`` (batchgenerators 0.25): each label's
    indicator resized with ``order`` (clipped), the label with the highest score wins; an exact tie goes
    to the nearest-neighbour label when it is one of the tied ones, else to the smallest tied label."""
    labels = np.unique(seg)
    shape = [int(s) for s in shape]
    if labels.size <= 1:
        return np.full(shape, labels[0] if labels.size else 0, dtype=seg.dtype)
    nearest = _resize(seg.astype(np.float64), shape, 0)
    best = _resize((seg == labels[0]).astype(np.float64), shape, order)
    win = np.zeros(shape, dtype=np.int32)
    nn_top = (nearest == labels[0]) & (best > 0)
    for i, value in enumerate(labels[1:], start=1):
        score = _resize((seg == value).astype(np.float64), shape, order)
        is_nn = nearest == value
        better = score > best
        level = (score == best) & (score > 0)
        win[better] = i
        nn_top = np.where(better, is_nn, nn_top | (level & is_nn))
        np.maximum(best, score, out=best)
    out = labels[win].astype(seg.dtype)
    out[nn_top] = nearest[nn_top].astype(seg.dtype)
    return out


def resample_like_nnunet(
    data: np.ndarray,
    shape: Sequence[int],
    current: Sequence[float],
    target: Sequence[float],
    settings: Mapping[str, Any],
    *,
    seg: bool = False,
) -> np.ndarray:
    """``data`` [C, Z, Y, X] resampled to ``shape`` as nnU-Net does (see the module docstring), float32
    (``seg``: label maps, each label resized by :func:`resize_labels`, nearest along a separate axis;
    the result keeps the labels' dtype).

    ``current``/``target``: the spacings that decide the separate axis; ``settings`` from
    :func:`resampling_settings`. Channels are resampled one at a time (one float64 channel in memory).
    """
    shape = [int(s) for s in shape]
    if list(data.shape[1:]) == shape:
        return np.asarray(data, dtype=data.dtype if seg else np.float32)
    order, order_z = int(settings["order"]), int(settings["order_z"])
    axis = separate_axis(current, target, settings.get("force_separate_z"))
    out = np.empty((data.shape[0], *shape), dtype=data.dtype if seg else np.float32)

    def resize(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
        return resize_labels(array, size, order) if seg else _resize(array, size, order)

    for c in range(data.shape[0]):
        channel = np.asarray(data[c]) if seg else np.asarray(data[c], dtype=np.float64)
        if axis is None:
            out[c] = resize(channel, shape)
            continue
        plane = [s for a, s in enumerate(shape) if a != axis]
        slices = [resize(np.take(channel, i, axis=axis), plane) for i in range(channel.shape[axis])]
        stacked = np.stack(slices, axis=axis)
        del slices, channel
        if stacked.shape[axis] != shape[axis]:
            n_in = stacked.shape[axis]
            coords = n_in / shape[axis] * (np.arange(shape[axis]) + 0.5) - 0.5
            if order_z == 0:
                index = ndimage.map_coordinates(np.arange(n_in, dtype=np.float64), [coords], order=0, mode="nearest")
                stacked = np.take(stacked, index.astype(np.int64), axis=axis)
            else:
                stacked = _along_axis(stacked, coords, axis, order_z)
        out[c] = stacked
    return out


def _along_axis(array: np.ndarray, coords: np.ndarray, axis: int, order: int) -> np.ndarray:
    """``array`` interpolated along ``axis`` at ``coords`` (spline of ``order``, border repeated)."""
    grids = np.meshgrid(
        *[np.arange(n, dtype=np.float64) if a != axis else coords for a, n in enumerate(array.shape)], indexing="ij"
    )
    return ndimage.map_coordinates(array, grids, order=order, mode="nearest")
