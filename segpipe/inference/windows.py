"""Where the windows of one case lie and how their weighted logits add up (the geometry and the sums of
:func:`segpipe.inference.sliding_window.sliding_window_inference`).

Window starts spread evenly per axis (:func:`window_starts`), the Gaussian importance map
(:func:`gaussian_importance_map`), the padding and window layout of a case (:class:`WindowLayout`), and
:class:`RowSums`, the rolling buffer that divides finished rows by their weights and hands them on.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..errors import ConfigError
from ..settings import configured

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


Sink = Callable[[int, torch.Tensor], None]

# window=fit: how far an image axis may exceed the patch and still be covered by one grown window
# (instead of two overlapping ones), and the most voxels such a window may have, as multiples of the
# patch's. A window in prediction stores no activations for a backward pass, so 1.5 patches of voxels
# stay well inside the memory that training the patch took.
FIT_GROW_FRACTION = 0.25
FIT_MAX_VOXELS = 1.5

WINDOW_MODES = ("fit", "pad")


Window = tuple[int, tuple[int, ...]]  # (slice, start per axis) of one window


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
    check_overlap(overlap)
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


def network_divisor(strides: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """What every input size of a network must be a multiple of, per axis: the product of its stages'
    strides along that axis (a 5-stage U-Net pooling every axis 4 times: 16)."""
    if not strides:
        raise ConfigError("a network needs at least one stage to know its divisor")
    return tuple(math.prod(int(s[axis]) for s in strides) for axis in range(len(strides[0])))


def fitted_window(
    size: Sequence[int],
    patch: Sequence[int],
    divisor: Sequence[int],
    *,
    grow_fraction: float = FIT_GROW_FRACTION,
    max_voxels: float = FIT_MAX_VOXELS,
) -> tuple[int, ...]:
    """The window of ``window=fit`` on an image of ``size`` (the windowed axes), per axis.

    An axis smaller than the patch gets the image's extent rounded up to the network's ``divisor``
    (less zero padding, fewer voxels to compute). An axis longer than the patch by at most
    ``grow_fraction`` of it is covered by one window of its extent rounded up, instead of two
    overlapping patches, while the window stays within ``max_voxels`` patches of voxels (the axes that
    grow least come first). Other axes keep the patch and slide as usual. E.g. patch 40 × 56 × 40,
    divisor 8: an image of 35 × 51 × 34 gets 40 × 56 × 40, one of 30 × 44 × 28 gets 32 × 48 × 32, and
    one of 44 × 58 × 33 gets 48 × 64 × 40 (one window where the patch needs four).
    """
    if not len(size) == len(patch) == len(divisor):
        raise ConfigError(
            f"image size {tuple(size)}, patch {tuple(patch)} and divisor {tuple(divisor)} differ in length"
        )
    window: list[int] = []
    growable: list[tuple[float, int, int]] = []
    for axis, (s, p, d) in enumerate(zip(size, patch, divisor)):
        s, p, d = int(s), int(p), max(1, int(d))
        extent = -(-s // d) * d
        if extent <= p:
            window.append(extent)
        else:
            window.append(p)
            if p % d == 0 and extent <= p * (1.0 + grow_fraction):
                growable.append((extent / p, axis, extent))
    budget = float(max_voxels) * math.prod(int(p) for p in patch)
    for _ratio, axis, extent in sorted(growable):
        trial = window.copy()
        trial[axis] = extent
        if math.prod(trial) <= budget:
            window = trial
    return tuple(window)


def case_window(
    spatial: Sequence[int], patch: Sequence[int], divisor: Sequence[int] | None, mode: str
) -> tuple[int, ...]:
    """The window that slides over an image of ``spatial`` shape: the patch (``mode="pad"``, nnU-Net's
    way) or :func:`fitted_window` (``"fit"``, which needs the network's ``divisor``). A 2-D patch on a
    3-D image fits the in-plane axes."""
    check_window_mode(mode)
    patch = tuple(int(p) for p in patch)
    if mode == "pad":
        return patch
    if divisor is None:
        raise ConfigError("window=fit needs the network's divisor (the product of its strides per axis)")
    axes = tuple(int(s) for s in spatial)
    if len(patch) == 2 and len(axes) == 3:
        axes = axes[1:]
    if len(axes) != len(patch):
        return patch  # window_layout refuses the mismatch with the full message
    return fitted_window(axes, patch, divisor)


def check_window_mode(mode: str) -> str:
    """``mode`` when it is a window mode (:data:`WINDOW_MODES`), else a :class:`~segpipe.errors.ConfigError`."""
    if mode not in WINDOW_MODES:
        raise ConfigError(f"window={mode} is not a window mode", hint="window=fit or window=pad")
    return mode


def check_overlap(overlap: float) -> None:
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


def window_box(lower: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(int(lo), int(lo) + int(n)) for lo, n in zip(lower, size))


@dataclass(frozen=True)
class WindowLayout:
    """Where the windows of one case lie: the padding, the window starts and the rows of the sums."""

    patch: tuple[int, ...]
    spatial: tuple[int, ...]
    slice_mode: bool  # a 2-D network slid over the slices of a volume
    context: int  # slices on each side of a 2.5-D slab
    lower: tuple[int, ...]  # zeros added before each spatial axis
    upper: tuple[int, ...]  # zeros added after each spatial axis
    out_shape: tuple[int, ...]  # the padded grid of the sums (slab padding is input only)
    starts: tuple[tuple[int, ...], ...]
    total: int
    depth: int  # rows of the first output axis that one window covers
    first_kept: int  # the image's own rows of the output are [first_kept, first_kept + spatial[0])
    rest_crop: tuple[slice, ...]  # the unpadded part of the axes after the first

    def windows(self) -> Iterator[Window]:
        """(slice, start) of every window, in order of their first row, generated as they are needed."""
        return itertools.product(range(self.spatial[0]) if self.slice_mode else (0,), itertools.product(*self.starts))


def check_sum_settings(accumulate_dtype: torch.dtype, batch_size: int) -> None:
    """Refuse a dtype of the sums other than float32, float16 or bfloat16, and an empty batch."""
    if accumulate_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"accumulate_dtype must be float32, float16 or bfloat16, got {accumulate_dtype}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}")


def window_layout(
    spatial: tuple[int, ...], patch_size: Sequence[int], overlap: float, context_slices: int
) -> WindowLayout:
    """The windows of an image of ``spatial`` shape: padded with zeros where it is smaller than the patch
    (half on each side; in slab mode also ``context_slices`` slices above and below), refused when too many."""
    patch = tuple(int(p) for p in patch_size)
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
    window_axes = spatial[1:] if slice_mode else spatial
    lower = [max(p - s, 0) // 2 for p, s in zip(patch, window_axes)]
    upper = [max(p - s, 0) - lo for p, s, lo in zip(patch, window_axes, lower)]
    if slice_mode:
        lower, upper = [k, *lower], [k, *upper]
    padded = tuple(s + lo + up for s, lo, up in zip(spatial, lower, upper))
    plane = padded[1:] if slice_mode else padded
    starts = window_starts(plane, patch, overlap)
    total = _check_window_count(plane, patch, overlap, starts, spatial[0] if slice_mode else 1)
    return WindowLayout(
        patch=patch,
        spatial=spatial,
        slice_mode=slice_mode,
        context=k,
        lower=tuple(lower),
        upper=tuple(upper),
        out_shape=(spatial[0], *padded[1:]) if slice_mode else padded,
        starts=tuple(tuple(axis) for axis in starts),
        total=total,
        depth=1 if slice_mode else patch[0],
        first_kept=0 if slice_mode else lower[0],
        rest_crop=window_box(lower[1:], spatial[1:]),
    )


def padded_image(image: torch.Tensor, layout: WindowLayout, output_device: torch.device) -> torch.Tensor:
    """The image on ``output_device``, padded with zeros as ``layout`` says."""
    pad: list[int] = []
    for lo, up in zip(reversed(layout.lower), reversed(layout.upper)):
        pad.extend((lo, up))
    image = image.to(output_device)
    if any(pad):
        image = F.pad(image, pad, mode="constant", value=0.0)
    return image


def window_weights(
    patch: tuple[int, ...], accumulate_dtype: torch.dtype, weight_floor: float | None, device: torch.device
) -> torch.Tensor:
    """The Gaussian importance map of a window in the accumulation dtype, floored for float16 sums."""
    if weight_floor is None:
        floor = FLOAT16_WEIGHT_FLOOR if accumulate_dtype == torch.float16 else 0.0
    else:
        floor = float(weight_floor)
    return gaussian_importance_map(patch, dtype=accumulate_dtype, device=device, floor=floor)


def window_crops(image: torch.Tensor, chunk: list[Window], layout: WindowLayout) -> list[torch.Tensor]:
    """The network's input of each window of ``chunk``: the patch, or in slab mode the slab around its slice."""
    slab = 2 * layout.context + 1
    channels = image.shape[0]
    crops = []
    for z, pos in chunk:
        box = window_box(pos, layout.patch)
        if layout.slice_mode:  # padded slices z .. z + 2k are the slab around slice z
            crops.append(image[(slice(None), slice(z, z + slab)) + box].reshape((channels * slab,) + layout.patch))
        else:
            crops.append(image[(slice(None),) + box])
    return crops


class RowSums:
    """The weighted class sums and the sum of weights, in a rolling buffer of ``depth`` rows along the
    first output axis.

    Windows come in order of their first row, so when a window starting at row r arrives no later window
    reaches the rows before r; those are divided by their weights, handed to the sink (or written into
    the whole case's logits) and dropped.
    """

    def __init__(self, layout: WindowLayout, *, dtype: torch.dtype, device: torch.device, sink: Sink | None) -> None:
        self.layout = layout
        self.dtype = dtype
        self.device = device
        self.sink = sink
        self.base = 0
        self.buf: torch.Tensor | None = None
        self.out_full: list[torch.Tensor] = []

    def allocate(self, classes: int) -> None:
        """Create the buffer, K class sums and, last, the sum of weights, unless it exists."""
        if self.buf is None:
            self.buf = torch.zeros(
                (classes + 1, self.layout.depth, *self.layout.out_shape[1:]), dtype=self.dtype, device=self.device
            )

    def add(self, chunk: list[Window], weighted: torch.Tensor, weight_block: torch.Tensor) -> None:
        """Add each window's weighted logits and its weights, finishing the rows before it first."""
        layout, buf = self.layout, self.buf
        assert buf is not None
        for (z, pos), pred in zip(chunk, weighted):
            row = z if layout.slice_mode else pos[0]
            self.flush(row)
            rows = slice(row - self.base, row - self.base + layout.depth)
            rest = window_box(pos, layout.patch) if layout.slice_mode else window_box(pos[1:], layout.patch[1:])
            if layout.slice_mode:
                buf[(slice(None, -1), rows) + rest] += pred[:, None]
            else:
                buf[(slice(None, -1), rows) + rest] += pred
            buf[(slice(-1, None), rows) + rest] += weight_block

    def flush(self, upto: int) -> None:
        """Finalise rows [base, upto) of the buffer and shift it so that it starts at ``upto``."""
        buf, base, layout = self.buf, self.base, self.layout
        upto = min(upto, layout.out_shape[0])
        if buf is None or upto <= base:
            return
        first_kept = layout.first_kept
        lo, hi = max(base, first_kept), min(upto, first_kept + layout.spatial[0])
        if hi > lo:
            rows = slice(lo - base, hi - base)
            rest_crop = layout.rest_crop
            block = buf[(slice(None, -1), rows) + rest_crop].float()
            block /= buf[(slice(-1, None), rows) + rest_crop].float()
            self._deliver(lo - first_kept, block)
        shift = upto - base
        keep = layout.depth - shift
        for i in range(max(keep, 0)):  # rows move down in order: a source row is read before it is overwritten
            buf[:, i].copy_(buf[:, i + shift])
        buf[:, max(keep, 0) :].zero_()
        self.base = upto

    def _deliver(self, row0: int, block: torch.Tensor) -> None:
        """Hand finished rows to the sink, or write them into the whole case's logits."""
        if self.sink is not None:
            self.sink(row0, block)
            return
        if not self.out_full:
            self.out_full.append(
                torch.empty((block.shape[0], *self.layout.spatial), dtype=torch.float32, device=self.device)
            )
        self.out_full[0][:, row0 : row0 + block.shape[1]] = block

    def result(self) -> torch.Tensor | None:
        """The whole case's logits, or None when the rows went to the sink."""
        return self.out_full[0] if self.sink is None else None
