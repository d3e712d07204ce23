"""Intensity normalisation of each channel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import StateError
from .spec import ChannelNorm


def normalize(image: np.ndarray, norms: Sequence[ChannelNorm]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Normalise each channel of ``image`` [C, Z, Y, X] (float32, in place where possible)."""
    out = image.astype(np.float32, copy=True)
    used = []
    mask = np.any(image != 0, axis=0) if any(n.use_mask for n in norms) else None
    for c, n in enumerate(norms):
        ch = out[c]
        if n.scheme == "ct":
            if n.clip is None or n.mean is None or n.std is None:
                raise StateError("CT normalisation needs clip, mean and std from the fingerprint",
                                 hint="re-run `segpipe plan` to refresh plans.json")
            np.clip(ch, n.clip[0], n.clip[1], out=ch)
            ch -= n.mean
            ch /= max(float(n.std), 1e-8)
            used.append({"scheme": "ct", "mean": n.mean, "std": n.std, "clip": list(n.clip)})
        elif n.scheme == "zscore":
            values = ch[mask] if n.use_mask and mask is not None and mask.any() else ch
            mean, std = float(values.mean()), float(values.std())
            ch -= mean
            ch /= max(std, 1e-8)
            if n.use_mask and mask is not None:
                ch[~mask] = 0
            used.append({"scheme": "zscore", "mean": mean, "std": std, "use_mask": n.use_mask})
        elif n.scheme == "rescale_to_0_1":  # per image, as nnU-Net's RescaleTo01Normalization
            lo, hi = float(ch.min()), float(ch.max())
            ch -= lo
            ch /= max(hi - lo, 1e-8)
            used.append({"scheme": "rescale_to_0_1", "min": lo, "max": hi})
        elif n.scheme == "rgb_to_0_1":  # 8-bit colour channels
            np.clip(ch, 0, 255, out=ch)
            ch /= 255.0
            used.append({"scheme": "rgb_to_0_1"})
        elif n.scheme == "none":
            used.append({"scheme": "none"})
        else:
            raise StateError(f"unknown normalisation scheme {n.scheme!r}",
                             hint="use ct, zscore, rescale_to_0_1, rgb_to_0_1 or none")
    return out, used
