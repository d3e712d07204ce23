"""The forward steps of one case (:func:`preprocess_arrays`) and their inverse (:func:`restore`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..arrays import crop_box
from ..geometry import Geometry
from .nnunet_resampling import new_shape as nnunet_shape
from .nnunet_resampling import resample_like_nnunet, separate_axis
from .normalization import normalize
from .resampling import resample, resample_label, separate_z_axis
from .spec import LOCATIONS_SEED, MAX_LOCATIONS_PER_CLASS, PREPROCESS_VERSION, PreprocessSpec


def sample_locations(
    label: np.ndarray, num_classes: int, seed: int = LOCATIONS_SEED, max_per_class: int = MAX_LOCATIONS_PER_CLASS
) -> dict[str, list[list[int]]]:
    """Up to ``max_per_class`` random voxel coordinates (z, y, x) of each foreground class present."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[list[int]]] = {}
    for c in range(1, num_classes):
        idx = np.flatnonzero(label.ravel() == c)
        if idx.size == 0:
            continue
        if idx.size > max_per_class:
            idx = np.sort(rng.choice(idx, size=max_per_class, replace=False))
        out[str(c)] = np.stack(np.unravel_index(idx, label.shape), axis=1).astype(int).tolist()
    return out


def resampled_shape(cropped_shape: Any, spacing: Any, spec: PreprocessSpec) -> list[int]:
    """The grid size a cropped image of ``spacing`` (transposed) gets at the spec's spacing (segpipe's
    rule; the first axis keeps its spacing when the spec does not resample slices)."""
    target = [float(s) for s in spec.spacing]
    if not spec.resample_slices:
        target[0] = float(spacing[0])
    return [max(1, int(round(int(n) * float(s) / t))) for n, s, t in zip(cropped_shape, spacing, target)]


def preprocess_arrays(
    image: np.ndarray,
    label: np.ndarray | None,
    geometry: Geometry,
    spec: PreprocessSpec,
    num_classes: int,
    *,
    norm_also: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Apply the forward steps to one case; returns (image, label, properties). ``norm_also`` (a mask
    on the image's grid): voxels the normalisation's nonzero mask also counts (see :func:`normalize`)."""
    tr = list(spec.transpose)
    img = np.transpose(image, [0] + [a + 1 for a in tr])
    lab = np.transpose(label, tr) if label is not None else None
    spacing = [geometry.spacing[a] for a in tr]
    box = crop_box(img)
    sl = tuple(slice(lo, hi) for lo, hi in box)
    shape_before_crop = list(img.shape[1:])
    index = (slice(None), *sl)
    img = img[index]
    lab = lab[sl] if lab is not None else None
    also = np.transpose(norm_also, tr)[sl] if norm_also is not None else None
    img, used = normalize(img, spec.normalization, fill_holes=spec.nnunet is not None, also=also)
    cropped_shape = list(img.shape[1:])
    target = [float(s) for s in spec.spacing]
    if not spec.resample_slices:
        target[0] = float(spacing[0])
    if spec.nnunet is not None:  # a model nnU-Net trained sees its resampling (images only: it predicts)
        new_shape = nnunet_shape(cropped_shape, spacing, target)
        sep = separate_axis(spacing, target, spec.nnunet["data"].get("force_separate_z"))
        img = resample_like_nnunet(img, new_shape, spacing, target, spec.nnunet["data"])
    else:
        new_shape = resampled_shape(cropped_shape, spacing, spec)
        sep = separate_z_axis(spacing, spec.separate_z_ratio) if new_shape != cropped_shape else None
        img = resample(img, new_shape, kind="cubic", separate_axis=sep)
    if lab is not None:
        lab = resample_label(lab, new_shape, num_classes, separate_axis=sep)
    props = {
        "version": PREPROCESS_VERSION,
        "original_geometry": geometry.to_dict(),
        "transpose": tr,
        "shape_before_crop": shape_before_crop,
        "crop_box": box,
        "shape_after_crop": cropped_shape,
        "spacing_before_resample": spacing,
        "spacing": target,
        "shape_after_resample": new_shape,
        "separate_axis": sep,
        "normalization": used,
        "num_classes": num_classes,
        "class_locations": sample_locations(lab, num_classes) if lab is not None else {},
    }
    if spec.nnunet is not None:
        props["nnunet"] = dict(spec.nnunet["probabilities"])
    return img, lab, props


def restore(prediction: np.ndarray, properties: dict[str, Any], *, is_label: bool | None = None) -> np.ndarray:
    """The exact inverse of the forward steps: back to the original grid and axis order.

    ``prediction`` is either class probabilities/logits [K, Z', Y', X'] (resampled linearly, then
    returned as [K, Z, Y, X] with background = 1 outside the crop box) or a label map
    [Z', Y', X'] (resampled linear-on-one-hot, returned as [Z, Y, X], 0 outside the box).
    The result lies on ``Geometry.from_dict(properties["original_geometry"])``.
    """
    if is_label is None:
        is_label = prediction.ndim == 3
    crop_shape = properties["shape_after_crop"]
    sep = properties.get("separate_axis")
    full = properties["shape_before_crop"]
    inverse = np.argsort(properties["transpose"]).tolist()
    box = properties["crop_box"]
    sl = tuple(slice(lo, hi) for lo, hi in box)
    if is_label:
        lab = resample_label(prediction, crop_shape, int(properties["num_classes"]), separate_axis=sep)
        out = np.zeros(full, dtype=lab.dtype)
        out[sl] = lab
        return np.ascontiguousarray(np.transpose(out, inverse))
    regions = properties.get("regions")
    if "nnunet" in properties:  # logits, resampled nnU-Net's way, then its softmax (or sigmoid for regions)
        probs = _nnunet_logits(prediction, properties)
        probs = _nonlinearity(probs, regions is not None)
    else:
        probs = resample(prediction, crop_shape, kind="linear", separate_axis=sep)
        if regions is not None:  # a region model's logits: each region's sigmoid
            probs = _nonlinearity(probs, True)
    out = np.zeros((probs.shape[0], *full), dtype=np.float32)
    if regions is None:
        out[0] = 1.0  # outside the crop box: background
    index = (slice(None), *sl)
    out[index] = probs
    return np.ascontiguousarray(np.transpose(out, [0] + [a + 1 for a in inverse]))


def restore_argmax(probabilities: Any, properties: dict[str, Any]) -> np.ndarray:
    """The label map of class scores [K, Z', Y', X'] on the original grid: the same result as
    ``restore(probabilities, properties).argmax(0)``, without ever holding K full-size maps.

    Each class's map is resampled (linearly, as :func:`restore` does) on its own and compared with
    the running maximum, so the memory is two float32 maps of the crop box and the label map, not
    K of them. Outside the crop box the label is 0 (background), as in :func:`restore`. Ties go to
    the lower class, as with ``argmax``. Returns uint8 labels (int16 beyond 255 classes).

    Properties of a model nnU-Net trained (``"nnunet"``: its resampling settings) take logits,
    resampled its way; with ``"regions"`` (their label values in order) each region's sigmoid
    above 0.5 writes its value, later regions over earlier ones.
    """
    scores = probabilities
    crop_shape = [int(n) for n in properties["shape_after_crop"]]
    sep = properties.get("separate_axis")
    num = int(scores.shape[0])
    regions = properties.get("regions")
    dtype = np.uint8 if num <= 256 and max(regions or [0]) < 256 else np.int16
    best = None
    labels = np.zeros(crop_shape, dtype=dtype)
    for c in range(num):
        channel = np.asarray(scores[c : c + 1], dtype=np.float32)
        if "nnunet" in properties:
            score = _nnunet_logits(channel, properties)[0]
        else:
            score = resample(channel, crop_shape, kind="linear", separate_axis=sep)[0]
        del channel
        if regions is not None:  # region c's value where its sigmoid passes 0.5, later regions on top
            labels[_nonlinearity(score[None], True)[0] > 0.5] = regions[c]
            continue
        if best is None:
            best = np.array(score, dtype=np.float32, copy=True)  # never a view of the input
            continue
        better = score > best
        labels[better] = c
        np.maximum(best, score, out=best)
        del score, better
    out = np.zeros(properties["shape_before_crop"], dtype=dtype)
    box = properties["crop_box"]
    out[tuple(slice(lo, hi) for lo, hi in box)] = labels
    del labels, best
    inverse = np.argsort(properties["transpose"]).tolist()
    return np.ascontiguousarray(np.transpose(out, inverse))


def _nnunet_logits(logits: np.ndarray, properties: dict[str, Any]) -> np.ndarray:
    """Logits [K, Z', Y', X'] back on the crop box's grid with nnU-Net's resampling of its model."""
    return resample_like_nnunet(
        logits,
        properties["shape_after_crop"],
        properties["spacing"],
        properties["spacing_before_resample"],
        properties["nnunet"],
    )


def _nonlinearity(logits: np.ndarray, sigmoid: bool) -> np.ndarray:
    """Softmax over the classes, or each region's sigmoid, in float32 (torch's, as nnU-Net computes them)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    return (torch.sigmoid(t) if sigmoid else torch.softmax(t, dim=0)).numpy()
