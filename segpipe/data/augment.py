"""Training-time augmentation: nnU-Net v2's default recipe, batched, in torch, on any device.

Kinds, ranges, probabilities and order follow nnU-Net v2's ``nnUNetTrainer.get_training_transforms``
(batchgeneratorsv2), per sample:

=====================  =====  =====================================================================
transform              p      parameters
=====================  =====  =====================================================================
rotation               0.2    3-D: each axis U(±30°); "dummy 2-D" patch (max/first > 3): in-plane
                              U(±180°) only; 2-D patch: U(±180°), U(±15°) when max/min > 1.5
scaling                0.2    one factor U(0.7, 1.4) for all axes (in-plane only for dummy 2-D);
                              > 1 zooms out (objects get smaller), as batchgeneratorsv2
Gaussian noise         0.1    std U(0, 0.1) — nnU-Net calls it "variance" but uses it as the std —
                              one field shared by the channels
Gaussian blur          0.2    per channel p 0.5, σ U(0.5, 1) per axis, reflect padding, 6σ kernel
brightness             0.15   ×m per channel, m ~ BGContrast(0.75, 1.25)
contrast               0.15   (x − mean)·f + mean per channel, clamped to the old range
low resolution         0.25   per channel p 0.5, scale U(0.5, 1) (same on all axes, axis 0 kept for
                              dummy 2-D): nearest-exact down, (tri)linear up
inverted gamma         0.1    per channel γ ~ BGContrast(0.7, 1.5) on −x; mean and std kept
gamma                  0.3    the same without inversion
mirroring              0.5    per axis, independently
=====================  =====  =====================================================================

BGContrast(lo, hi): with probability ½ U(lo, 1), else U(1, hi) (so shrinking and growing are equally
likely). No elastic deformation (nnU-Net's default has p = 0).

Why hand-written torch rather than MONAI's ``Rand*`` array transforms: MONAI's transforms work on
one sample at a time (a Python loop over the batch, MetaTensor bookkeeping, a transform object per
kind) and do not report whether they fired; here every kind is one vectorised operation on the whole
batch with per-sample parameters broadcast, which also runs unchanged on a GPU:

* rotation + scaling: ONE ``affine_grid`` for the batch of transformed samples, then two
  ``grid_sample`` calls on that grid — image bilinear/trilinear, label nearest (labels are never
  interpolated, so no invented classes). Samples without a spatial transform are plain crops (no
  resampling at all), like batchgeneratorsv2. nnU-Net samples the label as linear-on-one-hot per
  class with a 0.5 threshold; nearest is the same at voxel centres and several times cheaper.
* blur: separable Gaussian as a weighted sum of shifted views (≤ 7 taps at σ ≤ 1) with per
  sample-channel kernels broadcast, instead of one ``conv3d`` call per channel and axis.
* contrast / brightness / gamma: per-(sample, channel) statistics by ``amin``/``amax``/``mean``/``std``
  over the spatial axes, no loop.

Every transform records, per sample, whether it fired (``flags``) and the :class:`Augmenter` keeps a
running :attr:`Augmenter.stats` counter; tests check each probability from those.

Randomness: every parameter is drawn from a numpy ``Generator`` (so CPU and GPU runs with the same
seed draw the same parameters); noise fields come from a torch generator on the target device seeded
from it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# A different rule from the planner's ANISOTROPY_THRESHOLD (segpipe.planning), though nnU-Net uses the
# same 3.0 for both: this one compares the *patch's* edge lengths (max(patch) / patch[0] > 3 → "dummy
# 2-D" in-plane augmentation), that one compares voxel *spacings*. A plan with another
# anisotropy_threshold must not change how its patches are augmented, so the two stay separate.
DUMMY_2D_PATCH_RATIO = 3.0

#: flag names in the order the transforms run (mirror axes are appended per spatial axis)
TRANSFORMS = ("rotation", "scaling", "noise", "blur", "brightness", "contrast", "lowres", "gamma_inverted", "gamma")


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the augmentation (defaults: nnU-Net v2's default trainer)."""

    p_rotation: float = 0.2
    rotation_deg: tuple[float, float] | None = None  # None: nnU-Net's rule from the patch shape
    p_scaling: float = 0.2
    scaling: tuple[float, float] = (0.7, 1.4)
    p_noise: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    blur_p_per_channel: float = 0.5
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    lowres_scale: tuple[float, float] = (0.5, 1.0)
    lowres_p_per_channel: float = 0.5
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_mirror: float = 0.5
    mirror_axes: tuple[int, ...] | None = None  # spatial axes (0-based); None: all
    dummy_2d: bool | None = None  # None: decided from the patch (nnU-Net's rule)

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation at all (validation)."""
        return cls(
            p_rotation=0,
            p_scaling=0,
            p_noise=0,
            p_blur=0,
            p_brightness=0,
            p_contrast=0,
            p_lowres=0,
            p_gamma_inverted=0,
            p_gamma=0,
            p_mirror=0,
        )

    def with_(self, **changes: Any) -> AugmentConfig:
        return replace(self, **changes)


def is_dummy_2d(patch_size: Sequence[int]) -> bool:
    """nnU-Net's rule: a 3-D patch much thinner along axis 0 is augmented slice-wise in-plane."""
    return len(patch_size) == 3 and max(patch_size) / patch_size[0] > DUMMY_2D_PATCH_RATIO


def default_rotation_deg(patch_size: Sequence[int], dummy_2d: bool) -> tuple[float, float]:
    """nnU-Net's rotation range for a patch (degrees)."""
    if len(patch_size) == 2:
        return (-15.0, 15.0) if max(patch_size) / min(patch_size) > 1.5 else (-180.0, 180.0)
    return (-180.0, 180.0) if dummy_2d else (-30.0, 30.0)


def bg_contrast(rng: np.random.Generator, lo: float, hi: float, size: Any = None) -> np.ndarray:
    """batchgeneratorsv2's BGContrast: half the time U(lo, 1), else U(max(lo, 1), hi)."""
    low = rng.random(size) < 0.5
    a = rng.uniform(lo, 1.0, size) if lo < 1 else np.full(size or (), 1.0)
    b = rng.uniform(max(lo, 1.0), hi, size)
    return np.where(low & (lo < 1), a, b)


def _rot(axis_a: int, axis_b: int, angle: float, nd: int) -> np.ndarray:
    m = np.eye(nd)
    c, s = math.cos(angle), math.sin(angle)
    m[axis_a, axis_a], m[axis_a, axis_b], m[axis_b, axis_a], m[axis_b, axis_b] = c, -s, s, c
    return m


@dataclass
class SpatialDraw:
    """Per-sample spatial parameters: ``matrix`` maps output voxel offsets (from the patch centre) to
    input voxel offsets, in array axis order; ``region`` is the input extent each sample needs."""

    matrix: np.ndarray  # [B, nd, nd]
    rotated: np.ndarray  # bool [B]
    scaled: np.ndarray  # bool [B]
    region: np.ndarray  # int [B, nd]

    @property
    def transformed(self) -> np.ndarray:
        return self.rotated | self.scaled


@dataclass
class Augmenter:
    """Applies :class:`AugmentConfig` to batches ``image`` [B, C, *P] / ``label`` [B, 1, *P].

    ``patch_size`` has 3 entries (3-D) or 2 (2-D, including 2.5-D slabs whose slices are channels).
    """

    patch_size: tuple[int, ...]
    config: AugmentConfig = field(default_factory=AugmentConfig)
    stats: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) not in (2, 3):
            raise ValueError(f"patch_size must have 2 or 3 entries, got {self.patch_size}")
        self.nd = len(self.patch_size)
        cfg = self.config
        self.dummy_2d = is_dummy_2d(self.patch_size) if cfg.dummy_2d is None else bool(cfg.dummy_2d and self.nd == 3)
        deg = cfg.rotation_deg if cfg.rotation_deg is not None else default_rotation_deg(self.patch_size, self.dummy_2d)
        self.rotation = (math.radians(deg[0]), math.radians(deg[1]))
        self.mirror_axes = tuple(range(self.nd)) if cfg.mirror_axes is None else tuple(cfg.mirror_axes)

    # ------------------------------------------------------------------ spatial
    def draw_spatial(self, rng: np.random.Generator, n: int) -> SpatialDraw:
        cfg, nd = self.config, self.nd
        rotated = rng.random(n) < cfg.p_rotation
        scaled = rng.random(n) < cfg.p_scaling
        mats = np.repeat(np.eye(nd)[None], n, axis=0)
        patch = np.asarray(self.patch_size, dtype=float)
        region = np.repeat(np.asarray(self.patch_size)[None], n, axis=0)
        for i in range(n):
            if not (rotated[i] or scaled[i]):
                continue
            m = np.eye(nd)
            if rotated[i]:
                if nd == 2 or self.dummy_2d:
                    m = _rot(nd - 2, nd - 1, rng.uniform(*self.rotation), nd)
                else:
                    a = rng.uniform(*self.rotation, size=3)
                    m = _rot(1, 2, a[0], 3) @ _rot(0, 2, a[1], 3) @ _rot(0, 1, a[2], 3)
            if scaled[i]:
                s = np.full(nd, rng.uniform(*cfg.scaling))
                if self.dummy_2d:
                    s[0] = 1.0
                m = m @ np.diag(s)
            mats[i] = m
            # the input box that holds the transformed patch, +1 voxel each side for interpolation,
            # with the patch's parity so that both centres coincide on the voxel grid
            need = np.ceil(np.abs(m) @ patch - 1e-6).astype(int) + 2
            need[np.all(np.isclose(m, np.eye(nd)), axis=1)] = region[i][np.all(np.isclose(m, np.eye(nd)), axis=1)]
            need += (need - region[i]) % 2
            region[i] = np.maximum(need, region[i])
        return SpatialDraw(matrix=mats, rotated=rotated, scaled=scaled, region=region)

    def spatial(
        self, region_image: torch.Tensor, region_label: torch.Tensor, matrix: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Resample regions [n, C, *R] (centred on the patch centre) to [n, C, *P] through ``matrix``.

        One ``affine_grid`` for all samples; image linear, label nearest.
        """
        n, c = region_image.shape[:2]
        if n == 0:
            return (
                region_image.new_zeros((0, c, *self.patch_size)),
                region_label.new_zeros((0, region_label.shape[1], *self.patch_size)),
            )
        matrix = matrix.to(torch.float64).cpu()
        patch, region = self.patch_size, tuple(region_image.shape[2:])
        if self.dummy_2d:
            # in-plane only (axis 0 untouched, region[0] == patch[0]): fold the slices into channels and
            # resample in 2-D — one bilinear grid per sample shared by all slices, ~4× cheaper than
            # trilinear 3-D (this is what nnU-Net's Convert3DTo2DTransform does too)
            z = patch[0]
            img, lab = self._resample(
                region_image.reshape(n, c * z, *region[1:]),
                region_label.reshape(n, -1, *region[1:]),
                matrix[:, 1:, 1:],
                patch[1:],
            )
            return img.reshape(n, c, *patch), lab.reshape(n, -1, *patch)
        return self._resample(region_image, region_label, matrix, patch)

    @staticmethod
    def _resample(
        image: torch.Tensor, label: torch.Tensor, matrix: torch.Tensor, patch: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, nd = image.shape[0], len(patch)
        r = torch.tensor(image.shape[2:], dtype=torch.float64)
        p = torch.tensor(patch, dtype=torch.float64)
        # normalised output coord x -> voxel offset x·P/2 -> input offset M·(x·P/2) -> normalised /(R/2)
        a = (1.0 / r)[None, :, None] * matrix * p[None, None, :]
        theta = torch.zeros((n, nd, nd + 1), dtype=torch.float32)
        theta[:, :, :nd] = a.flip(1).flip(2).to(torch.float32)  # affine_grid wants (x, y, z) order
        grid = _affine_grid(theta.to(image.device), patch)
        img = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        lab = F.grid_sample(label.to(image.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return img, lab.round().to(label.dtype)

    # ------------------------------------------------------------------ intensity
    @staticmethod
    def _gate(rng: np.random.Generator, p: float, n: int) -> np.ndarray:
        return rng.random(n) < p

    def noise(self, img: torch.Tensor, rng: np.random.Generator, gen: torch.Generator) -> np.ndarray:
        fired = self._gate(rng, self.config.p_noise, img.shape[0])
        idx = np.flatnonzero(fired)
        if idx.size:
            std = torch.as_tensor(
                rng.uniform(*self.config.noise_std, size=idx.size), dtype=img.dtype, device=img.device
            )
            field_ = torch.randn((idx.size, 1, *img.shape[2:]), generator=gen, device=img.device, dtype=img.dtype)
            ti = torch.as_tensor(idx, device=img.device)
            img[ti] += field_ * std.view(-1, *[1] * (img.ndim - 1))
        return fired

    def blur(self, img: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        cfg = self.config
        b, c = img.shape[:2]
        fired = self._gate(rng, cfg.p_blur, b)
        chan = (rng.random((b, c)) < cfg.blur_p_per_channel) & fired[:, None]
        bi, ci = np.nonzero(chan)
        if bi.size:
            sigmas = rng.uniform(*cfg.blur_sigma, size=(bi.size, img.ndim - 2))
            tb, tc = torch.as_tensor(bi, device=img.device), torch.as_tensor(ci, device=img.device)
            x = img[tb, tc]  # [N, *S]
            for axis in range(img.ndim - 2):
                x = gaussian_1d(x, sigmas[:, axis], axis + 1)
            img[tb, tc] = x
        return fired

    def brightness(self, img: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        b, c = img.shape[:2]
        fired = self._gate(rng, self.config.p_brightness, b)
        idx = np.flatnonzero(fired)
        if idx.size:
            m = torch.as_tensor(
                bg_contrast(rng, *self.config.brightness, size=(idx.size, c)), dtype=img.dtype, device=img.device
            )
            ti = torch.as_tensor(idx, device=img.device)
            img[ti] *= m.view(idx.size, c, *[1] * (img.ndim - 2))
        return fired

    def contrast(self, img: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        b, c = img.shape[:2]
        fired = self._gate(rng, self.config.p_contrast, b)
        idx = np.flatnonzero(fired)
        if idx.size:
            f = torch.as_tensor(
                bg_contrast(rng, *self.config.contrast, size=(idx.size, c)), dtype=img.dtype, device=img.device
            )
            ti = torch.as_tensor(idx, device=img.device)
            x = img[ti]
            dims = tuple(range(2, x.ndim))
            shape = (idx.size, c, *[1] * (x.ndim - 2))
            mean, lo, hi = x.mean(dims, keepdim=True), x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
            x = ((x - mean) * f.view(shape) + mean).clamp_(lo, hi)
            img[ti] = x
        return fired

    def lowres(self, img: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        cfg = self.config
        b, c = img.shape[:2]
        fired = self._gate(rng, cfg.p_lowres, b)
        chan = (rng.random((b, c)) < cfg.lowres_p_per_channel) & fired[:, None]
        bi, ci = np.nonzero(chan)
        if bi.size:
            scales = rng.uniform(*cfg.lowres_scale, size=bi.size)
            spatial = img.shape[2:]
            mode = "trilinear" if len(spatial) == 3 else "bilinear"
            # different sizes per channel: cannot be batched (as in batchgeneratorsv2)
            for i, j, s in zip(bi, ci, scales):
                new = [max(1, round(n * s)) for n in spatial]
                if self.dummy_2d:
                    new[0] = spatial[0]
                down = F.interpolate(img[i, j][None, None], size=new, mode="nearest-exact")
                img[i, j] = F.interpolate(down, size=list(spatial), mode=mode, align_corners=False)[0, 0]
        return fired

    def gamma(self, img: torch.Tensor, rng: np.random.Generator, *, invert: bool) -> np.ndarray:
        b, c = img.shape[:2]
        p = self.config.p_gamma_inverted if invert else self.config.p_gamma
        fired = self._gate(rng, p, b)
        idx = np.flatnonzero(fired)
        if idx.size:
            g = torch.as_tensor(
                bg_contrast(rng, *self.config.gamma, size=(idx.size, c)), dtype=img.dtype, device=img.device
            )
            ti = torch.as_tensor(idx, device=img.device)
            x = img[ti]
            if invert:
                x = -x
            dims = tuple(range(2, x.ndim))
            mean, std = _mean_std(x, dims)
            lo = x.amin(dims, keepdim=True)
            rng_ = x.amax(dims, keepdim=True) - lo
            # x ** g as exp(g · log x): ~2× faster than pow on CPU; log 0 = -inf gives 0 as pow does
            x = x.sub(lo).div_(rng_.clamp(min=1e-7)).log_().mul_(g.view(idx.size, c, *[1] * len(dims))).exp_()
            x = x.mul_(rng_).add_(lo)
            mean2, std2 = _mean_std(x, dims)
            x = x.sub_(mean2).mul_(std / std2.clamp(min=1e-7)).add_(mean)
            img[ti] = -x if invert else x
        return fired

    def mirror(self, img: torch.Tensor, lab: torch.Tensor, rng: np.random.Generator) -> dict[str, np.ndarray]:
        b = img.shape[0]
        flags = {f"mirror_{axis}": self._gate(rng, self.config.p_mirror, b) for axis in self.mirror_axes}
        for i in range(b):  # one flip per sample over all its axes (cheaper than one gather per axis)
            dims = [a + 1 for a in self.mirror_axes if flags[f"mirror_{a}"][i]]
            if dims:
                img[i] = img[i].flip(dims)
                lab[i] = lab[i].flip(dims)
        return flags

    # ------------------------------------------------------------------ all of it
    def __call__(self, batch: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Augment a sampled batch in place of its tensors; returns ``image`` [B, C, *P] float32,
        ``label`` [B, 1, *P] (the sampler's compact integer type) and ``flags`` (name -> bool [B]).

        ``batch`` as made by :meth:`segpipe.data.PatchSampler.sample`: ``image``/``label`` hold the
        plain crops; the samples in ``spatial_index`` come as larger ``region_image``/``region_label``
        with their ``matrix``. ``rng`` defaults to one seeded from ``batch["seed"]``.
        """
        if rng is None:
            rng = np.random.default_rng(int(batch["seed"]))
        img, lab = batch["image"], batch["label"]
        flags: dict[str, np.ndarray] = {
            "rotation": _numpy(batch["rotated"]).astype(bool),
            "scaling": _numpy(batch["scaled"]).astype(bool),
        }
        sidx = batch["spatial_index"]
        if len(sidx):
            si, sl = self.spatial(batch["region_image"], batch["region_label"], batch["matrix"])
            sidx = torch.as_tensor(sidx, device=img.device)
            img[sidx] = si.to(img.dtype)
            lab[sidx] = sl.to(lab.dtype)
        gen = torch.Generator(device=img.device)
        gen.manual_seed(int(rng.integers(2**62)))
        with torch.no_grad():
            flags["noise"] = self.noise(img, rng, gen)
            flags["blur"] = self.blur(img, rng)
            flags["brightness"] = self.brightness(img, rng)
            flags["contrast"] = self.contrast(img, rng)
            flags["lowres"] = self.lowres(img, rng)
            flags["gamma_inverted"] = self.gamma(img, rng, invert=True)
            flags["gamma"] = self.gamma(img, rng, invert=False)
            flags.update(self.mirror(img, lab, rng))
        self.stats["samples"] += img.shape[0]
        for k, v in flags.items():
            self.stats[k] += int(np.count_nonzero(v))
        out = {k: v for k, v in batch.items() if k not in ("region_image", "region_label", "matrix", "spatial_index")}
        out.update(image=img, label=lab, flags=flags)
        return out

    def expected_rates(self) -> dict[str, float]:
        """The probability with which each flag should fire."""
        cfg = self.config
        rates = {
            "rotation": cfg.p_rotation,
            "scaling": cfg.p_scaling,
            "noise": cfg.p_noise,
            "blur": cfg.p_blur,
            "brightness": cfg.p_brightness,
            "contrast": cfg.p_contrast,
            "lowres": cfg.p_lowres,
            "gamma_inverted": cfg.p_gamma_inverted,
            "gamma": cfg.p_gamma,
        }
        rates.update({f"mirror_{a}": cfg.p_mirror for a in self.mirror_axes})
        return rates


def gaussian_1d(x: torch.Tensor, sigma: np.ndarray, dim: int) -> torch.Tensor:
    """Blur ``x`` [N, *S] along ``dim`` with one Gaussian per row (σ ``sigma[N]``), reflect padding.

    Kernel size as batchgeneratorsv2 (odd, ≈ 6σ); all rows share the longest kernel, shorter ones
    zero-padded. A weighted sum of shifted views: at ≤ 7 taps this beats a grouped ``conv3d``
    (which has no fast depthwise CPU path) and runs unchanged on the GPU.
    """
    sizes = [kernel_size(s) for s in sigma]
    k = max(sizes)
    half = k // 2
    if x.shape[dim] <= half:  # too thin to reflect: leave that axis alone
        return x
    taps = np.arange(k) - half
    w = np.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    w[np.abs(taps)[None, :] > (np.asarray(sizes)[:, None] // 2)] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    wt = torch.as_tensor(w, dtype=x.dtype, device=x.device)
    # reflect-pad along dim: F.pad's reflect needs a batch+channel layout; move dim last
    xt = x.movedim(dim, -1)
    shp = xt.shape
    xp = F.pad(xt.reshape(-1, 1, shp[-1]), (half, half), mode="reflect").reshape(*shp[:-1], shp[-1] + 2 * half)
    view = (-1, *[1] * (xt.ndim - 1))
    out = xp[..., 0 : shp[-1]] * wt[:, 0].view(view)
    for t in range(1, k):
        out += xp[..., t : t + shp[-1]] * wt[:, t].view(view)
    return out.movedim(-1, dim)


def _mean_std(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) std over the trailing ``dims``, two-pass over a flattened view: torch's
    CPU ``std`` over several dims is ~20× slower, and a multi-dim two-pass ~3× slower, than this."""
    lead = x.shape[: x.ndim - len(dims)]
    flat = x.reshape(*lead, -1)
    mean = flat.mean(-1, keepdim=True)
    var = (flat - mean).square_().sum(-1, keepdim=True) / max(1, flat.shape[-1] - 1)
    view = (*lead, *[1] * len(dims))
    return mean.view(view), var.sqrt_().view(view)


def _affine_grid(theta: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.affine_grid(theta, [n, 1, *size], align_corners=False)`` by broadcasting one axis at a
    time: 5× faster on CPU for 3-D (torch builds a homogeneous base grid and runs a bmm)."""
    nd = len(size)
    n = theta.shape[0]
    lin = [(torch.arange(s, dtype=theta.dtype, device=theta.device) * 2 + 1) / s - 1 for s in size]
    # grid[..., j] is the coordinate along spatial axis nd-1-j (x first); lin[k] runs along axis k
    coords = [lin[k].view(1, *[s if a == k else 1 for a, s in enumerate(size)]) for k in range(nd)]
    grid = torch.empty((n, *size, nd), dtype=theta.dtype, device=theta.device)
    for j in range(nd):
        th = theta[:, j].reshape(n, nd + 1, *[1] * nd)
        acc = th[:, nd] + th[:, 0] * coords[nd - 1]
        for c in range(1, nd):
            acc = acc + th[:, c] * coords[nd - 1 - c]
        grid[..., j] = acc
    return grid


def kernel_size(sigma: float, truncate: float = 6.0) -> int:
    n = sigma * truncate + 0.5
    r = round(n)
    if r % 2 == 1:
        return int(r)
    return int(r + 1 if n - r >= 0 else r - 1)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def mirror(x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """Flip spatial ``axes`` (0-based, after [B, C]) of ``x``; its own inverse."""
    return x.flip([a + 2 for a in axes]) if axes else x
