"""Segmentation losses: a registry (``build_loss("dice_ce")``), deep supervision, the ignore label,
and Fidon et al.'s hardness-weighted case sampler.

Every loss takes logits ``[B, K, *spatial]`` (2-D or 3-D) and integer labels ``[B, 1, *spatial]``
(or ``[B, *spatial]``) and is the sum of a *region* term (soft Dice and its relatives, computed on
softmax probabilities from per-class statistics tp / Σp / Σg) and a *voxel* term (cross-entropy or
focal loss, averaged over the counted voxels)::

    loss = region_weight · region(softmax(logits), labels) + ce_weight · voxel(logits, labels)

Region terms follow nnU-Net v2's ``MemoryEfficientSoftDiceLoss``: per class
``dc = (2·tp + smooth) / clip(Σp + Σg + smooth, 1e-8)`` over the foreground classes, loss
``−mean(dc)`` (the same gradient as ``1 − dc``; nnU-Net reports these negative values too), and
with ``batch_dice`` the statistics are summed over the batch before dividing.

Voxels labelled ``ignore_index`` count in no term: not in the cross-entropy's mean, not in tp,
Σp or Σg. Each loss also gives one value per batch element (:meth:`SegLoss.per_sample`, or both at
once with :meth:`SegLoss.with_per_sample`) for :class:`HardnessWeightedSampler`.

Defaults live once, in ``conf/loss/<name>.yaml``; :func:`build_loss` reads them. Written here
rather than taken from MONAI: MONAI's losses have no ignore label, no per-sample values for the
sampler and no hardness-weighted Dice, and nnU-Net's exact Dice (smoothing, clipping, batch Dice)
is three lines.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError, StateError

__all__ = [
    "LOSSES",
    "CrossEntropy",
    "DeepSupervision",
    "Focal",
    "FocalTversky",
    "HardnessDice",
    "HardnessWeightedSampler",
    "RegionTerm",
    "SegLoss",
    "SoftDice",
    "Tversky",
    "build_loss",
    "deep_supervision_weights",
    "downsample_target",
    "loss_defaults",
    "register_loss",
]

CLIP = 1e-8  # nnU-Net's floor on the Dice denominator


# ---------------------------------------------------------------------------- region terms
class RegionTerm(nn.Module):
    """Soft-Dice-like term from per-class statistics. Subclasses define :meth:`class_loss`
    (and :class:`HardnessDice` its own :meth:`statistics`)."""

    def __init__(self, *, smooth: float, include_background: bool, batch_dice: bool):
        super().__init__()
        self.smooth, self.include_background, self.batch_dice = (
            float(smooth),
            bool(include_background),
            bool(batch_dice),
        )

    @property
    def first_class(self) -> int:
        return 0 if self.include_background else 1

    def statistics(
        self, probs: torch.Tensor, onehot: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tp, Σp, Σg)``, each ``[B, C]``, over the counted voxels. ``probs`` and ``onehot`` hold the
        scored classes only; ``valid`` is ``[B, 1, *spatial]`` (bool) or None."""
        axes = tuple(range(2, probs.ndim))
        g = onehot if valid is None else onehot & valid
        tp = (probs * g).sum(axes)
        sum_pred = probs.sum(axes) if valid is None else (probs * valid).sum(axes)
        return tp, sum_pred, g.sum(axes).to(probs.dtype)

    def class_loss(self, tp: torch.Tensor, sum_pred: torch.Tensor, sum_gt: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, probs: torch.Tensor, onehot: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The term (a scalar) and its per-sample values ``[B]`` (always per sample, also with batch Dice)."""
        tp, sp, sg = self.statistics(probs, onehot, valid)
        per_sample = self.class_loss(tp, sp, sg).mean(1)
        if self.batch_dice:
            return self.class_loss(tp.sum(0), sp.sum(0), sg.sum(0)).mean(), per_sample
        return per_sample.mean(), per_sample


def _dice(tp: torch.Tensor, sum_pred: torch.Tensor, sum_gt: torch.Tensor, smooth: float) -> torch.Tensor:
    return (2 * tp + smooth) / torch.clip(sum_pred + sum_gt + smooth, CLIP)


class SoftDice(RegionTerm):
    """nnU-Net's soft Dice: ``−dc`` per class."""

    def class_loss(self, tp: torch.Tensor, sum_pred: torch.Tensor, sum_gt: torch.Tensor) -> torch.Tensor:
        return -_dice(tp, sum_pred, sum_gt, self.smooth)


class Tversky(RegionTerm):
    """Tversky index ``TI = (2·tp + s) / (2·tp + 2α·fp + 2β·fn + s)``; loss ``−TI`` per class.

    ``alpha`` weights false positives, ``beta`` false negatives. Written with the factor 2 (the usual
    ``(tp + s′)/(tp + α·fp + β·fn + s′)`` with ``s′ = s/2``) so that α = β = ½ is :class:`SoftDice`
    exactly, smoothing included.
    """

    def __init__(self, *, alpha: float, beta: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.alpha, self.beta = float(alpha), float(beta)

    def index(self, tp: torch.Tensor, sum_pred: torch.Tensor, sum_gt: torch.Tensor) -> torch.Tensor:
        fp, fn = (sum_pred - tp).clamp_min(0), (sum_gt - tp).clamp_min(0)
        denom = 2 * tp + 2 * self.alpha * fp + 2 * self.beta * fn + self.smooth
        return (2 * tp + self.smooth) / torch.clip(denom, CLIP)

    def class_loss(self, tp: torch.Tensor, sum_pred: torch.Tensor, sum_gt: torch.Tensor) -> torch.Tensor:
        return -self.index(tp, sum_pred, sum_gt)


class FocalTversky(Tversky):
    """Focal Tversky (Abraham & Khan 2019): ``(1 − TI)^γ`` per class. The base is floored at 1e-7 so
    that γ < 1 keeps a finite gradient at a perfect prediction."""

    def __init__(self, *, gamma: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.gamma = float(gamma)

    def class_loss(self, tp: torch.Tensor, sum_pred: torch.Tensor, sum_gt: torch.Tensor) -> torch.Tensor:
        return (1 - self.index(tp, sum_pred, sum_gt)).clamp_min(1e-7) ** self.gamma


class HardnessDice(RegionTerm):
    """Voxel-level hardness-weighted Dice (Wang et al. 2019): each voxel's terms of class c are
    weighted by ``w = λ·|p − g| + (1 − λ)`` in numerator and denominator; ``−dc`` per class.
    λ = 0 is :class:`SoftDice`. ``detach_weight`` (default) treats w as a constant."""

    def __init__(self, *, lam: float, detach_weight: bool, **kwargs: Any):
        super().__init__(**kwargs)
        self.lam, self.detach_weight = float(lam), bool(detach_weight)

    def statistics(
        self, probs: torch.Tensor, onehot: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        axes = tuple(range(2, probs.ndim))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_weight):
            w = self.lam * (probs - onehot.to(probs.dtype)).abs() + (1 - self.lam)
            if valid is not None:
                w = w * valid
        wp = w * probs
        return (wp * onehot).sum(axes), wp.sum(axes), (w * onehot).sum(axes)

    def class_loss(self, tp: torch.Tensor, sum_pred: torch.Tensor, sum_gt: torch.Tensor) -> torch.Tensor:
        return -_dice(tp, sum_pred, sum_gt, self.smooth)


# ---------------------------------------------------------------------------- voxel terms
class CrossEntropy(nn.Module):
    """Per-voxel cross-entropy ``−log p_t`` ``[B, *spatial]``."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, reduction="none")


class Focal(nn.Module):
    """Per-voxel focal loss (Lin et al. 2017) ``−α_t (1 − p_t)^γ log p_t``. ``alpha``: one weight for
    every class, or one per class (α_t is the target class's); γ = 0, α = 1 is cross-entropy."""

    alpha: torch.Tensor

    def __init__(self, *, gamma: float, alpha: float | Sequence[float]):
        super().__init__()
        self.gamma = float(gamma)
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32).reshape(-1), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_pt = -F.cross_entropy(logits, target, reduction="none")
        loss = -((1 - log_pt.exp()).clamp_min(0) ** self.gamma) * log_pt
        alpha = self.alpha.to(loss.device)
        if alpha.numel() == 1:
            return loss * alpha
        if alpha.numel() != logits.shape[1]:
            raise ConfigError(
                f"focal loss: alpha has {alpha.numel()} weights for {logits.shape[1]} classes",
                hint="give one weight per class (background first) or a single number",
            )
        return loss * alpha[target]


# ---------------------------------------------------------------------------- the combined loss
def _labels(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``target`` as ``[B, *spatial]`` int64 on the logits' device."""
    if target.ndim == logits.ndim:
        if target.shape[1] != 1:
            raise ValueError(f"labels must have one channel, got shape {tuple(target.shape)}")
        target = target[:, 0]
    if target.shape[0] != logits.shape[0] or target.shape[1:] != logits.shape[2:]:
        raise ValueError(f"labels {tuple(target.shape)} do not match logits {tuple(logits.shape)}")
    return target.to(device=logits.device, dtype=torch.long)


class SegLoss(nn.Module):
    """``region_weight · region + ce_weight · voxel`` with an optional ignore label (see the module doc)."""

    def __init__(
        self,
        region: RegionTerm | None,
        voxel: nn.Module | None,
        *,
        region_weight: float,
        ce_weight: float,
        ignore_index: int | None = None,
    ):
        super().__init__()
        self.region = region if region is not None and region_weight != 0 else None
        self.voxel = voxel if voxel is not None and ce_weight != 0 else None
        if self.region is None and self.voxel is None:
            raise ConfigError("the loss has no term with a nonzero weight", hint="set ce_weight or region_weight > 0")
        self.region_weight, self.ce_weight = float(region_weight), float(ce_weight)
        self.ignore_index = None if ignore_index is None else int(ignore_index)

    def with_per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss (a scalar) and its per-sample values ``[B]`` (detached), from one computation."""
        if logits.dtype in (torch.float16, torch.bfloat16):  # statistics and log-probabilities in fp32
            logits = logits.float()
        labels = _labels(logits, target)
        valid = None
        if self.ignore_index is not None:
            valid = labels != self.ignore_index
            labels = labels.masked_fill(~valid, 0)
        loss = logits.new_zeros(())
        samples = logits.new_zeros(logits.shape[0])
        if self.region is not None:
            start = self.region.first_class
            if logits.shape[1] <= start:
                raise ValueError(f"{logits.shape[1]} class(es): no foreground class to score")
            probs = torch.softmax(logits, 1)[:, start:]
            classes = torch.arange(start, logits.shape[1], device=logits.device).view(1, -1, *[1] * (logits.ndim - 2))
            onehot = labels.unsqueeze(1) == classes
            term, per = self.region(probs, onehot, None if valid is None else valid.unsqueeze(1))
            loss = loss + self.region_weight * term
            samples = samples + self.region_weight * per.detach()
        if self.voxel is not None:
            vox = self.voxel(logits, labels)
            if valid is None:
                term = vox.mean()
                per = vox.detach().flatten(1).mean(1)
            else:
                vox = torch.where(valid, vox, 0.0)
                term = vox.sum() / valid.sum().clamp_min(1)
                per = vox.detach().flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)
            loss = loss + self.ce_weight * term
            samples = samples + self.ce_weight * per
        return loss, samples

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.with_per_sample(logits, target)[0]

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One loss value per batch element ``[B]`` (detached; region terms per sample even with batch Dice)."""
        return self.with_per_sample(logits, target)[1]


# ---------------------------------------------------------------------------- deep supervision
def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights for ``n`` outputs (highest resolution first): ``1/2^i``, the lowest 0,
    normalised to sum 1 (five outputs: .533/.267/.133/.067/0). One output: ``[1.0]``."""
    if n < 1:
        raise ValueError(f"deep supervision needs at least one output, got {n}")
    w = [0.5**i for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


def downsample_target(target: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Labels ``[B, 1, *S]`` (or ``[B, *S]``) at spatial ``shape``, by nearest neighbour on the labels'
    device. Integer factors take every f-th voxel from offset ⌊f/2⌋ (= ``F.interpolate``'s
    ``nearest-exact``, which nnU-Net uses, without the float copy); other sizes interpolate. Label
    values are copied, never blended, so an ignore label survives."""
    spatial = tuple(target.shape[-len(shape) :])
    shape = tuple(int(s) for s in shape)
    if spatial == shape:
        return target
    lead = target.shape[: target.ndim - len(shape)]
    if all(s % o == 0 for s, o in zip(spatial, shape)):
        index = tuple(slice(None) for _ in lead) + tuple(
            slice(s // o // 2, None, s // o) for s, o in zip(spatial, shape)
        )
        return target[index]
    flat = target.reshape(-1, 1, *spatial).float()
    return F.interpolate(flat, size=shape, mode="nearest-exact").to(target.dtype).reshape(*lead, *shape)


class DeepSupervision(nn.Module):
    """Apply ``loss`` to each decoder output (``[full_res, half_res, ...]``, as the networks return them
    in training mode) against the labels downsampled to its size, weighted by
    :func:`deep_supervision_weights`. A single tensor is passed straight to ``loss``.

    Zero-weighted outputs are skipped (as nnU-Net). ``keep_unused`` instead adds them as ``0 · output``
    so every head gets a (zero) gradient, which DDP needs when it checks for unused parameters.
    """

    def __init__(self, loss: SegLoss, weights: Sequence[float] | None = None, *, keep_unused: bool = False):
        super().__init__()
        self.loss, self.keep_unused = loss, bool(keep_unused)
        self.weights = None if weights is None else [float(w) for w in weights]

    def with_per_sample(
        self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(outputs, torch.Tensor):
            return self.loss.with_per_sample(outputs, target)
        weights = self.weights if self.weights is not None else deep_supervision_weights(len(outputs))
        if len(weights) != len(outputs):
            raise ValueError(f"{len(weights)} deep-supervision weights for {len(outputs)} outputs")
        total, samples = outputs[0].new_zeros((), dtype=torch.float32), None
        for w, out in zip(weights, outputs):
            if w == 0:
                if self.keep_unused:
                    total = total + out.flatten()[:1].float().sum() * 0.0
                continue
            loss, per = self.loss.with_per_sample(out, downsample_target(target, out.shape[2:]))
            total = total + w * loss
            samples = w * per if samples is None else samples + w * per
        assert samples is not None  # the first weight is never 0
        return total, samples

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return self.with_per_sample(outputs, target)[0]

    def per_sample(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return self.with_per_sample(outputs, target)[1]


# ---------------------------------------------------------------------------- the registry
def _region_kwargs(batch_dice: bool | None, smooth: float, include_background: bool) -> dict[str, Any]:
    return {"batch_dice": bool(batch_dice), "smooth": smooth, "include_background": include_background}


def dice_ce(
    *,
    batch_dice: bool | None,
    smooth: float,
    include_background: bool,
    ce_weight: float,
    region_weight: float,
    ignore_index: int | None,
) -> SegLoss:
    return SegLoss(
        SoftDice(**_region_kwargs(batch_dice, smooth, include_background)),
        CrossEntropy(),
        region_weight=region_weight,
        ce_weight=ce_weight,
        ignore_index=ignore_index,
    )


def tversky(
    *,
    alpha: float,
    beta: float,
    batch_dice: bool | None,
    smooth: float,
    include_background: bool,
    ce_weight: float,
    region_weight: float,
    ignore_index: int | None,
) -> SegLoss:
    region = Tversky(alpha=alpha, beta=beta, **_region_kwargs(batch_dice, smooth, include_background))
    return SegLoss(region, CrossEntropy(), region_weight=region_weight, ce_weight=ce_weight, ignore_index=ignore_index)


def focal_tversky(
    *,
    alpha: float,
    beta: float,
    gamma: float,
    batch_dice: bool | None,
    smooth: float,
    include_background: bool,
    ce_weight: float,
    region_weight: float,
    ignore_index: int | None,
) -> SegLoss:
    kwargs = _region_kwargs(batch_dice, smooth, include_background)
    region = FocalTversky(alpha=alpha, beta=beta, gamma=gamma, **kwargs)
    return SegLoss(region, CrossEntropy(), region_weight=region_weight, ce_weight=ce_weight, ignore_index=ignore_index)


def hardness_dice(
    *,
    lam: float,
    detach_weight: bool,
    batch_dice: bool | None,
    smooth: float,
    include_background: bool,
    ce_weight: float,
    region_weight: float,
    ignore_index: int | None,
) -> SegLoss:
    kwargs = _region_kwargs(batch_dice, smooth, include_background)
    region = HardnessDice(lam=lam, detach_weight=detach_weight, **kwargs)
    return SegLoss(region, CrossEntropy(), region_weight=region_weight, ce_weight=ce_weight, ignore_index=ignore_index)


def focal(
    *,
    gamma: float,
    alpha: float | Sequence[float] | None,
    focal_weight: float,
    region_weight: float,
    batch_dice: bool | None,
    smooth: float,
    include_background: bool,
    ignore_index: int | None,
) -> SegLoss:
    region = SoftDice(**_region_kwargs(batch_dice, smooth, include_background))
    voxel = Focal(gamma=gamma, alpha=1.0 if alpha is None else alpha)
    return SegLoss(region, voxel, region_weight=region_weight, ce_weight=focal_weight, ignore_index=ignore_index)


LossBuilder = Callable[..., SegLoss]

#: loss name (``loss=`` on the command line, ``conf/loss/<name>.yaml``) -> builder taking that file's keys
LOSSES: dict[str, LossBuilder] = {
    "dice_ce": dice_ce,
    "tversky": tversky,
    "focal_tversky": focal_tversky,
    "hardness_dice": hardness_dice,
    "focal": focal,
}


def register_loss(name: str, builder: LossBuilder) -> None:
    """Add (or replace) a loss; its defaults may live in ``conf/loss/<name>.yaml``."""
    LOSSES[str(name)] = builder


def loss_defaults(name: str) -> dict[str, Any]:
    """The parameters of ``conf/loss/<name>.yaml`` without ``name`` (empty when there is no such file)."""
    from .settings import option_defaults

    return {k: v for k, v in option_defaults("loss", str(name)).items() if k != "name"}


def build_loss(name: str, /, *, context: Mapping[str, Any] | None = None, **params: Any) -> SegLoss:
    """The loss ``name`` with ``params`` over the defaults of ``conf/loss/<name>.yaml``.

    ``context`` fills parameters left ``null`` (``{"batch_dice": plan_config.batch_dice,
    "ignore_index": the dataset's ignore label}``); keys a loss does not take are skipped there.
    Unknown names and parameters are a :class:`ConfigError` listing the valid ones.
    """
    builder = LOSSES.get(str(name))
    if builder is None:
        raise ConfigError(f"unknown loss {name!r}", hint=f"choose one of: {', '.join(sorted(LOSSES))}")
    accepted = [p.name for p in inspect.signature(builder).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"loss {name}: unknown parameter(s) {', '.join(unknown)}", hint=f"{name} takes: {', '.join(accepted)}"
        )
    merged = {**loss_defaults(str(name)), **{k: _plain(v) for k, v in params.items()}}
    for key, value in (context or {}).items():
        if key in accepted and merged.get(key) is None:
            merged[key] = value
    missing = [k for k in accepted if k not in merged]
    if missing:
        params_needed = ", ".join(missing)
        raise ConfigError(f"loss {name}: no value for {params_needed}", hint=f"give {params_needed}")
    for key in NON_NEGATIVE & set(merged):
        values = merged[key] if isinstance(merged[key], (list, tuple)) else [merged[key]]
        for v in values:
            if v is None and key == "alpha":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(
                    f"loss {name}: {key}={merged[key]!r} must be a finite number ≥ 0",
                    hint=f"`segpipe train --help` shows {key}'s default",
                )
    return builder(**merged)


#: loss parameters that are weights or exponents: a negative one turns the loss against its target
NON_NEGATIVE = frozenset({"alpha", "beta", "gamma", "lam", "smooth", "ce_weight", "region_weight", "focal_weight"})


def _plain(value: Any) -> Any:
    """OmegaConf containers (``alpha: [0.25, 0.75]`` from a composed config) as plain lists/dicts."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


# ---------------------------------------------------------------------------- hardness-weighted sampling
class HardnessWeightedSampler:
    """Fidon et al. (2021) hardness-weighted sampling: case i is drawn with probability
    ``softmax(β · L)_i``, ``L`` the latest per-sample loss of each case (``init_loss`` until it is
    first seen, so unseen cases come first when ``init_loss`` is high). β = 0 is uniform sampling.
    Lives in the main process; :meth:`state_dict` holds plain lists and numbers (checkpoint-safe)."""

    def __init__(self, num_cases: int, beta: float, *, init_loss: float = 1.0):
        if int(num_cases) < 1:
            raise ConfigError(f"hardness-weighted sampling needs at least one case, got {num_cases}")
        if not (math.isfinite(beta) and beta >= 0):
            raise ConfigError(f"hardness-weighted sampling: beta must be a number ≥ 0, got {beta}")
        if not math.isfinite(init_loss):
            raise ConfigError(f"hardness-weighted sampling: init_loss must be finite, got {init_loss}")
        self.num_cases, self.beta = int(num_cases), float(beta)
        self.losses = np.full(self.num_cases, float(init_loss))
        self.updates = np.zeros(self.num_cases, dtype=np.int64)

    def probabilities(self) -> np.ndarray:
        z = self.beta * (self.losses - self.losses.max())
        p = np.exp(z)
        return p / p.sum()

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` case indices drawn with replacement."""
        return rng.choice(self.num_cases, size=int(n), replace=True, p=self.probabilities())

    def update(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, losses: Sequence[float] | torch.Tensor
    ) -> None:
        """Record the per-sample losses of a batch (a case drawn twice keeps the mean; non-finite
        values are skipped)."""
        idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).reshape(-1)
        if isinstance(losses, torch.Tensor):
            losses = losses.detach().cpu().double().tolist()
        val = np.asarray(losses, dtype=np.float64).reshape(-1)
        if idx.shape != val.shape:
            raise ValueError(f"{idx.size} case indices for {val.size} losses")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_cases):
            raise ValueError(f"case index out of range 0..{self.num_cases - 1}: {idx.tolist()}")
        keep = np.isfinite(val)
        idx, val = idx[keep], val[keep]
        sums = np.bincount(idx, weights=val, minlength=self.num_cases)
        counts = np.bincount(idx, minlength=self.num_cases)
        seen = counts > 0
        self.losses[seen] = sums[seen] / counts[seen]
        self.updates[seen] += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_cases": self.num_cases,
            "beta": self.beta,
            "losses": [float(v) for v in self.losses],
            "updates": [int(v) for v in self.updates],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["num_cases"]) != self.num_cases:
            raise StateError(
                f"the checkpoint's case sampler holds {state['num_cases']} cases, this fold has {self.num_cases}",
                hint="resume with the same fold and dataset, or start again with --overwrite",
            )
        self.beta = float(state["beta"])
        self.losses = np.asarray(state["losses"], dtype=np.float64).copy()
        self.updates = np.asarray(state["updates"], dtype=np.int64).copy()
