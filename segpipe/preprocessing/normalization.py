"""Intensity normalisation of each channel: a registry of schemes (name -> function).

A scheme is a function ``(channel, norm, mask) -> record`` that normalises ``channel`` (a float32
[Z, Y, X] view, in place) as ``norm`` (:class:`ChannelNorm`) asks and returns the record of what
it did (kept in the case's properties). ``mask`` is the nonzero mask of the image (any channel)
when some channel asks for it, else None. Add a scheme with :func:`register_normalization`; the
planner's list of names (:data:`segpipe.planning.NORMALIZATION_SCHEMES`) must name the same set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, StateError
from .spec import ChannelNorm

Normalizer = Callable[[np.ndarray, ChannelNorm, "np.ndarray | None"], dict[str, Any]]


def _ct(ch: np.ndarray, n: ChannelNorm, mask: np.ndarray | None) -> dict[str, Any]:
    """Clip to the dataset's foreground 0.5/99.5 percentiles, then the dataset-global foreground z-score."""
    if n.clip is None or n.mean is None or n.std is None:
        raise StateError(
            "CT normalisation needs clip, mean and std from the fingerprint",
            hint="re-run `segpipe plan` to refresh plans.json",
        )
    np.clip(ch, n.clip[0], n.clip[1], out=ch)
    ch -= n.mean
    ch /= max(float(n.std), 1e-8)
    return {"scheme": "ct", "mean": n.mean, "std": n.std, "clip": list(n.clip)}


#: beyond this magnitude the squares of a float32 variance overflow (float32 ends at 3.4e38)
_SQUARE_SAFE = 1e18


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of float32 ``values``, finite whatever their magnitude.

    Values beyond 1e18 have squares that overflow float32 to inf (and a z-score by inf would turn
    the image into zeros): those are scaled by their peak magnitude first.
    """
    if values.size == 0:
        return 0.0, 0.0
    peak = max(abs(float(values.max())), abs(float(values.min())))
    if peak <= _SQUARE_SAFE:
        return float(values.mean()), float(values.std())
    scaled = values / np.float32(peak)
    return float(scaled.mean()) * peak, float(scaled.std()) * peak


def _zscore(ch: np.ndarray, n: ChannelNorm, mask: np.ndarray | None) -> dict[str, Any]:
    """Per image; with ``use_mask`` the statistics come from the nonzero mask and outside is zero."""
    values = ch[mask] if n.use_mask and mask is not None and mask.any() else ch
    mean, std = mean_std(values)
    ch -= mean
    ch /= max(std, 1e-8)
    if n.use_mask and mask is not None:
        ch[~mask] = 0
    return {"scheme": "zscore", "mean": mean, "std": std, "use_mask": n.use_mask}


def _rescale_to_0_1(ch: np.ndarray, n: ChannelNorm, mask: np.ndarray | None) -> dict[str, Any]:
    """Per image, min..max to 0..1 (nnU-Net's RescaleTo01Normalization)."""
    lo, hi = float(ch.min()), float(ch.max())
    ch -= lo
    ch /= max(hi - lo, 1e-8)
    return {"scheme": "rescale_to_0_1", "min": lo, "max": hi}


def _rgb_to_0_1(ch: np.ndarray, n: ChannelNorm, mask: np.ndarray | None) -> dict[str, Any]:
    """8-bit colour channels: clip to 0..255, divide by 255."""
    np.clip(ch, 0, 255, out=ch)
    ch /= 255.0
    return {"scheme": "rgb_to_0_1"}


def _none(ch: np.ndarray, n: ChannelNorm, mask: np.ndarray | None) -> dict[str, Any]:
    return {"scheme": "none"}


#: scheme name -> function; the one place a scheme is looked up
NORMALIZERS: dict[str, Normalizer] = {
    "ct": _ct,
    "zscore": _zscore,
    "rescale_to_0_1": _rescale_to_0_1,
    "rgb_to_0_1": _rgb_to_0_1,
    "none": _none,
}


def register_normalization(name: str, fn: Normalizer) -> None:
    """Add (or replace) a normalisation scheme."""
    NORMALIZERS[str(name).lower()] = fn


def get_normalizer(name: str) -> Normalizer:
    """The function of scheme ``name``; an unknown name is a :class:`ConfigError` listing the valid ones."""
    fn = NORMALIZERS.get(str(name).lower())
    if fn is None:
        raise ConfigError(f"unknown normalisation scheme {name!r}", hint=f"valid: {', '.join(sorted(NORMALIZERS))}")
    return fn


def normalize(
    image: np.ndarray, norms: Sequence[ChannelNorm], *, fill_holes: bool = False, also: np.ndarray | None = None
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Normalise each channel of ``image`` [C, Z, Y, X] (float32, in place where possible).

    ``fill_holes``: the nonzero mask with its enclosed holes filled, as nnU-Net's (its z-score then
    counts and normalises the zero voxels inside the object too). ``also``: voxels added to the mask
    (an nnU-Net cascade's previous-stage foreground, which its z-score counts too)."""
    fns = [get_normalizer(n.scheme) for n in norms]  # refuse an unknown scheme before any work
    out = image.astype(np.float32, copy=True)
    mask = np.any(image != 0, axis=0) if any(n.use_mask for n in norms) else None
    if mask is not None and fill_holes:
        from scipy.ndimage import binary_fill_holes

        mask = binary_fill_holes(mask)
    if mask is not None and also is not None:
        mask = mask | also
    return out, [fn(out[c], n, mask) for c, (fn, n) in enumerate(zip(fns, norms))]
