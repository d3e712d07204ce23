"""Flip test-time augmentation: a network's logits averaged over every mirroring of the window.

:class:`FlipTTA` wraps a network as the sliding window's predictor: each batch of windows goes
through the network once per subset of the spatial axes (2^n passes: 8 for a 3-D patch, 4 for a
2-D one), flipped before and flipped back after, and the logits are averaged, as nnU-Net's
mirroring does inside each window. Each flip is its own inverse, so an untrained network that
commutes with flips gives back exactly its plain prediction.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FlipTTA", "flip_subsets"]


def flip_subsets(spatial_dims: int, axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Every subset of the flipped axes (as tensor dims of a [B, C, *spatial] batch), the empty one first.

    ``axes``: the spatial axes to mirror (0 = the first spatial axis); default all of them.
    """
    chosen = list(range(spatial_dims)) if axes is None else [int(a) for a in axes]
    for a in chosen:
        if not 0 <= a < spatial_dims:
            raise ValueError(f"flip axis {a} is not one of the {spatial_dims} spatial axes")
    dims = [a + 2 for a in sorted(set(chosen))]
    return [combo for r in range(len(dims) + 1) for combo in itertools.combinations(dims, r)]


class FlipTTA(nn.Module):
    """``FlipTTA(network)(batch)``: the mean of ``flip(network(flip(batch)))`` over every flip subset.

    ``axes``: the spatial axes to mirror (default all). A network returning a list (deep
    supervision) contributes its first, full-resolution output. The network's mode is left as it
    is; the sliding window puts the wrapper (and so the network) in eval mode for its call.
    """

    def __init__(self, network: nn.Module | Callable[[torch.Tensor], Any], axes: Sequence[int] | None = None):
        super().__init__()
        self.network = network
        self.axes = None if axes is None else tuple(int(a) for a in axes)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        subsets = flip_subsets(batch.ndim - 2, self.axes)
        total: torch.Tensor | None = None
        for dims in subsets:
            x = torch.flip(batch, dims) if dims else batch
            out = self.network(x)
            if isinstance(out, (list, tuple)):
                out = out[0]
            out = out.float()
            if dims:
                out = torch.flip(out, dims)
            total = out if total is None else total.add_(out)
        assert total is not None
        return total.div_(len(subsets))
