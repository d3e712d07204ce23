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

__all__ = ["NNUNET_RESAMPLING", "new_shape", "resample_like_nnunet", "resampling_settings", "separate_axis"]

#: the resampling function of nnU-Net's default planners, the one segpipe reproduces
NNUNET_RESAMPLING = "resample_data_or_seg_to_shape"
#: nnU-Net's anisotropy threshold for resampling an axis separately
ANISO_THRESHOLD = 3.0


def resampling_settings(name: Any, kwargs: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """``order``, ``order_z`` and ``force_separate_z`` of one plan entry; another function is refused."""
    if str(name) != NNUNET_RESAMPLING:
        raise ConfigError(
            f"{where}: resampling function {name!r} is not one segpipe reproduces",
            hint=f"re-plan with nnU-Net's default resampling ({NNUNET_RESAMPLING})",
        )
    kw = dict(kwargs or {})
    if kw.get("is_seg"):
        raise ConfigError(f"{where}: image or logit resampling with is_seg=true is not supported")
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


def resample_like_nnunet(
    data: np.ndarray,
    shape: Sequence[int],
    current: Sequence[float],
    target: Sequence[float],
    settings: Mapping[str, Any],
) -> np.ndarray:
    """``data`` [C, Z, Y, X] resampled to ``shape`` as nnU-Net does (see the module docstring), float32.

    ``current``/``target``: the spacings that decide the separate axis; ``settings`` from
    :func:`resampling_settings`. Channels are resampled one at a time (one float64 channel in memory).
    """
    shape = [int(s) for s in shape]
    if list(data.shape[1:]) == shape:
        return np.asarray(data, dtype=np.float32)
    order, order_z = int(settings["order"]), int(settings["order_z"])
    axis = separate_axis(current, target, settings.get("force_separate_z"))
    out = np.empty((data.shape[0], *shape), dtype=np.float32)
    for c in range(data.shape[0]):
        channel = np.asarray(data[c], dtype=np.float64)
        if axis is None:
            out[c] = _resize(channel, shape, order)
            continue
        plane = [s for a, s in enumerate(shape) if a != axis]
        slices = [_resize(np.take(channel, i, axis=axis), plane, order) for i in range(channel.shape[axis])]
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
