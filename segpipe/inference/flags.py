"""What a reviewer should look at first: the flags of each segmented case.

**Input flags** (:func:`inspect_input`, before the networks run) say that an input does not look
like the data the model was trained on, with the numbers:

* ``channels``: an input dataset (a folder with ``dataset.json``) naming its channels otherwise
  than the model's (another name, or another modality: ``CT`` for ``MRI``);
* ``modality``: a DICOM series whose Modality (CT, MR, PT, …) differs from what the model's
  channel names say (``CT``; ``MRI``, ``T1``, ``FLAIR``, …);
* ``intensity``: a channel whose whole-image 1st, 50th or 99th percentile lies outside the spread
  of the training cases' own percentiles, widened by a quarter of the training intensity span on
  each side; or with negative intensities where no training image had any (CT Hounsfield units
  given to an MR model), none where every training image had some (an MR image given to a CT
  model), or a 99th percentile over 4× under or over the training images' (an image rescaled to 0-1).
  Scanners scale MR intensities very differently (a public hippocampus dataset spans 89 to 500,000
  in its cases' 99th percentiles), which is why the sign and scale rules stand beside the range;
* ``spacing``: a voxel spacing under half or over twice the training cases' range on an axis.

They are warnings: the case is still segmented. With ``strict=true`` a flagged input fails its
case instead (for pipelines that must not segment what the model was not made for). The ranges
come from the model's training profile (``plans.json`` ``profile``, made by ``segpipe plan`` from
the fingerprint); a model without one (an nnU-Net folder, a plan made by an older segpipe) is not
compared, and its reports say so.

**Output flags** (:func:`output_flags`, after segmentation):

* ``empty``: a class predicted nowhere although at least half of the training cases have it;
* ``border``: a class whose largest connected piece touches a face of the image (maybe cut off by
  the field of view; a stray voxel on the border does not count), unless the class touched the
  border in at least 10 % of the training cases that have it;
* ``volume``: a class volume under two thirds of the smallest or over 1.5 × the largest volume
  seen in training.

Every flag is a dict ``{"kind", "message", ...numbers}``; the case report (``<case>.json``),
the batch's ``report.html`` and the terminal summary show them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..fingerprint import image_percentiles  # inputs are measured as the training images were

__all__ = [
    "PREVIEW_VOXELS",
    "InputCheck",
    "channel_flags",
    "channel_modality",
    "class_intensities",
    "inspect_input",
    "output_flags",
    "source_modality",
]

#: most voxels (all channels together) of the strided copy of an input kept for the report
PREVIEW_VOXELS = 16_000_000
INTENSITY_MARGIN = 0.25  # of the training intensity span, on each side
NEGATIVE_TOLERANCE = 0.05  # of the training images' median 99th percentile: noise around 0 is not "negative"
SCALE_FACTOR = 4.0  # a 99th percentile this many times under the smallest or over the largest in training
SPACING_FACTOR = 2.0
VOLUME_LOW, VOLUME_HIGH = 2 / 3, 1.5
BORDER_USUAL = 0.1  # a class touching the border in this fraction of training cases is not flagged for it
EMPTY_USUAL = 0.5  # a class in at least this fraction of training cases is flagged when predicted empty

_MODALITY_WORDS = {
    "CT": ("ct", "cta", "cect", "ncct", "hu"),
    "MR": ("mr", "mri", "t1", "t1w", "t1c", "t1ce", "t1gd", "t2", "t2w", "flair", "adc", "dwi", "pd", "swi", "dce"),
    "PT": ("pet", "pt", "suv"),
    "US": ("us", "ultrasound"),
}


def channel_modality(name: str) -> str | None:
    """The DICOM modality a channel name stands for (``"T2"`` → ``MR``), or None when it says none."""
    words = set(re.split(r"[^a-z0-9]+", str(name).lower()))
    found = {mod for mod, keys in _MODALITY_WORDS.items() if words & set(keys)}
    return found.pop() if len(found) == 1 else None


def source_modality(source: Any) -> str | None:
    """The Modality of a DICOM source (a series folder or a file), else None (NIfTI, NRRD, arrays)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source)
    from ..io.formats import image_extension

    if image_extension(path) is not None:
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())[:20]
    import pydicom

    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["Modality"])
        except Exception:  # noqa: BLE001 - not a DICOM file: try the next
            continue
        if ds.get("Modality"):
            return str(ds.Modality).upper()
    return None


@dataclass
class InputCheck:
    """An input as the report sees it: its flags, its whole-image percentiles per channel, and a
    strided copy of it (``preview``, every ``stride``-th voxel per axis) for overlays and mean
    intensities."""

    flags: list[dict[str, Any]] = field(default_factory=list)
    percentiles: list[dict[str, float]] = field(default_factory=list)
    preview: np.ndarray | None = None
    stride: int = 1
    notes: list[str] = field(default_factory=list)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _intensity_reasons(mine: Mapping[str, float], train: Mapping[str, Any]) -> list[str]:
    """Why percentiles ``mine`` do not look like the training images' (``train``: per percentile the
    spread over the training cases), or nothing: see the module docstring."""
    reasons = []
    span = float(train["p99"]["max"]) - float(train["p01"]["min"])
    margin = INTENSITY_MARGIN * max(span, 1e-6)
    outside = [k for k in ("p01", "p50", "p99") if not train[k]["min"] - margin <= mine[k] <= train[k]["max"] + margin]
    if outside:
        reasons.append(f"{'/'.join(outside)} outside the training range")
    scale = max(abs(float(train["p99"]["median"])), 1e-6)
    if train["p01"]["min"] >= 0 and mine["p01"] < -NEGATIVE_TOLERANCE * scale:
        reasons.append("negative intensities, which no training image had")
    if train["p01"]["max"] < 0 and mine["p01"] >= 0:
        reasons.append("no negative intensities, which every training image had")
    lo, hi = float(train["p99"]["min"]), float(train["p99"]["max"])
    if lo > 0 and mine["p99"] > 0 and not lo / SCALE_FACTOR <= mine["p99"] <= hi * SCALE_FACTOR:
        reasons.append(f"a 99th percentile over {SCALE_FACTOR:g}× away from the training images'")
    return reasons


def _intensity_flag(c: int, name: str, mine: Mapping[str, float], train: Mapping[str, Any]) -> dict[str, Any] | None:
    reasons = _intensity_reasons(mine, train)
    if not reasons:
        return None
    have = "/".join(_fmt(mine[k]) for k in ("p01", "p50", "p99"))
    seen = ", ".join(f"{_fmt(train[k]['min'])} to {_fmt(train[k]['max'])}" for k in ("p01", "p50", "p99"))
    return {
        "kind": "intensity",
        "channel": c,
        "message": f"channel {c} ({name}): intensity 1st/50th/99th percentiles {have} ({'; '.join(reasons)}); "
        f"the training images had {seen}",
        "reasons": reasons,
        "percentiles": dict(mine),
        "training": {k: dict(train[k]) for k in ("p01", "p50", "p99")},
    }


def _spacing_flag(
    spacing: tuple[float, ...], shape: tuple[int, ...], train: Mapping[str, Any]
) -> dict[str, Any] | None:
    axes = "zyx"
    odd = [
        a
        for a in range(3)
        if shape[a] > 1 and not train["min"][a] / SPACING_FACTOR <= spacing[a] <= train["max"][a] * SPACING_FACTOR
    ]
    if not odd:
        return None
    mine = " × ".join(f"{s:.3g}" for s in spacing)
    seen = " × ".join(f"{lo:.3g}" if lo == hi else f"{lo:.3g}-{hi:.3g}" for lo, hi in zip(train["min"], train["max"]))
    return {
        "kind": "spacing",
        "axes": [axes[a] for a in odd],
        "message": f"voxel spacing {mine} mm (z × y × x); the training images had {seen} mm",
        "spacing": [float(s) for s in spacing],
        "training": {"min": list(train["min"]), "max": list(train["max"])},
    }


def channel_flags(names: Sequence[str] | None, plan: Any) -> list[dict[str, Any]]:
    """A ``channels`` flag when the channel names an input's own ``dataset.json`` gives (``names``,
    in channel order) differ from the model's, by name or by the modality they stand for."""
    if not names:
        return []
    model = [str(v) for _, v in sorted((int(k), v) for k, v in plan.channel_names.items())]
    differ = [
        c
        for c, (mine, theirs) in enumerate(zip(names, model))
        if mine.strip().lower() != theirs.strip().lower() or channel_modality(mine) != channel_modality(theirs)
    ]
    if not differ:
        return []
    said = ", ".join(f"channel {c} is {names[c]!r}, the model's {model[c]!r}" for c in differ)
    return [
        {
            "kind": "channels",
            "message": f"the input's dataset.json names other channels: {said}",
            "channels": list(names),
            "expected": model,
        }
    ]


def inspect_input(image: np.ndarray, geometry: Any, plan: Any, *, source: Any = None, strict: bool) -> InputCheck:
    """The input flags of ``image`` ([C, Z, Y, X] on ``geometry``) against ``plan.profile`` (see the
    module docstring); with ``strict`` a flag is raised as a :class:`~segpipe.errors.DataError`."""
    check = InputCheck(percentiles=[image_percentiles(ch) for ch in image])
    stride = max(1, math.ceil((image.size / PREVIEW_VOXELS) ** (1 / 3)))
    check.stride = stride
    check.preview = image if stride == 1 else np.ascontiguousarray(image[:, ::stride, ::stride, ::stride])
    profile = getattr(plan, "profile", None) or {}
    names = {int(k): str(v) for k, v in plan.channel_names.items()}
    modality = source_modality(source)
    wanted = {channel_modality(n) for n in names.values()} - {None}
    if modality and len(wanted) == 1 and modality not in wanted:
        want = wanted.pop()
        check.flags.append(
            {
                "kind": "modality",
                "message": f"a {modality} series, the model was trained on {want} ({', '.join(names.values())})",
                "modality": modality,
                "expected": want,
            }
        )
    if not profile:
        check.notes.append("the model has no profile of its training data: the input was not compared with it")
    for c, channel in (profile.get("channels") or {}).items():
        if "image" in channel and int(c) < len(check.percentiles):
            flag = _intensity_flag(int(c), names.get(int(c), c), check.percentiles[int(c)], channel["image"])
            if flag:
                check.flags.append(flag)
    if "spacing" in profile:
        flag = _spacing_flag(tuple(geometry.spacing), tuple(geometry.shape), profile["spacing"])
        if flag:
            check.flags.append(flag)
    if strict and check.flags:
        raise DataError(
            "the input does not look like the model's training data: " + "; ".join(f["message"] for f in check.flags),
            hint="check that this is the right model for this image, or run with strict=false to segment it anyway",
        )
    return check


def class_intensities(check: InputCheck, label: np.ndarray, labels: Mapping[int, str]) -> dict[str, list[float]]:
    """Mean input intensity per channel inside each predicted class (on the input check's strided
    copy: every voxel for inputs up to :data:`PREVIEW_VOXELS`)."""
    if check.preview is None:
        return {}
    s = check.stride
    lab = label[::s, ::s, ::s].reshape(-1).astype(np.intp, copy=False)
    n = max(int(lab.max(initial=0)), max(labels, default=0)) + 1
    counts = np.bincount(lab, minlength=n)
    means = [np.bincount(lab, weights=ch.reshape(-1), minlength=n) for ch in check.preview]
    return {
        name: [float(m[v] / counts[v]) for m in means] for v, name in labels.items() if v > 0 and v < n and counts[v]
    }


def _touches_border(label: np.ndarray, value: int) -> bool:
    """Whether the largest connected piece of class ``value`` reaches a face of the image (a stray
    voxel or two on the border is the network's noise, not a structure cut off). Large images are
    looked at on a grid of at most :data:`PREVIEW_VOXELS` voxels that keeps the faces."""
    faces = (label[0], label[-1], label[:, 0], label[:, -1], label[:, :, 0], label[:, :, -1])
    if not any(bool((face == value).any()) for face in faces):
        return False
    from scipy import ndimage

    stride = max(1, math.ceil((label.size / PREVIEW_VOXELS) ** (1 / 3)))
    axes = [np.unique(np.r_[0:n:stride, n - 1]) for n in label.shape]
    mask = label[np.ix_(*axes)] == value
    pieces, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return False
    largest = int(np.argmax(np.bincount(pieces.ravel())[1:])) + 1
    big = pieces == largest
    return any(bool(f.any()) for f in (big[0], big[-1], big[:, 0], big[:, -1], big[:, :, 0], big[:, :, -1]))


def output_flags(
    label: np.ndarray, volumes_ml: Mapping[str, float], labels: Mapping[int, str], profile: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The output flags of a predicted ``label`` map (see the module docstring); ``volumes_ml`` by
    class name, ``labels`` value → name, ``profile`` the plan's training profile (may be empty)."""
    classes = profile.get("classes") or {}
    flags: list[dict[str, Any]] = []
    for value, name in sorted(labels.items()):
        if value <= 0 or str(name).lower() == "ignore":
            continue
        seen = classes.get(str(value), {})
        volume = float(volumes_ml.get(name, 0.0))
        if volume == 0.0:
            if not classes or seen.get("case_fraction", 0.0) >= EMPTY_USUAL:
                flags.append({"kind": "empty", "class": name, "message": f"{name}: predicted nowhere"})
            continue
        if label.ndim == 3 and seen.get("border_case_fraction", 0.0) < BORDER_USUAL and _touches_border(label, value):
            flags.append(
                {"kind": "border", "class": name, "message": f"{name}: touches the image border (maybe cut off)"}
            )
        rng = seen.get("volume_ml")
        if rng and not rng["min"] * VOLUME_LOW <= volume <= rng["max"] * VOLUME_HIGH:
            flags.append(
                {
                    "kind": "volume",
                    "class": name,
                    "message": f"{name}: {volume:.3g} mL, the training cases had {rng['min']:.3g}-{rng['max']:.3g} mL",
                    "volume_ml": volume,
                    "training": dict(rng),
                }
            )
    return flags
