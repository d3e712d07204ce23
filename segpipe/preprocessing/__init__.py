"""Preprocessing: transpose, crop to nonzero, normalise, resample — and ``restore()``, its inverse.

Forward steps (nnU-Net's order), each recorded in a properties dict so that :func:`restore`
undoes them mechanically, in reverse:

1. **transpose** the array axes so the plan's coarsest axis comes first (``plan.transpose``);
2. **crop** to the bounding box of voxels where any channel is nonzero;
3. **normalise** each channel by the plan's scheme: ``ct`` (clip to the dataset's foreground
   0.5/99.5 percentiles, then the dataset-global foreground z-score) or ``zscore``
   (per image; inside the nonzero mask, zero outside, when the plan asks for the mask);
4. **resample** to the configuration's spacing. Images: separable cubic convolution
   (Catmull-Rom, float32, one axis at a time); when the spacing ratio between the coarsest and finest axes
   exceeds :data:`SEPARATE_Z_RATIO` the coarse axis is handled separately with nearest
   neighbour (nnU-Net's "separate z"). Labels: never cubic — linear interpolation of each
   class's one-hot mask, then the most probable class (the same per-axis scheme).

Why hand-written torch instead of scikit-image (nnU-Net) or SimpleITK: skimage resizes in
float64 through ``map_coordinates`` (slow, 2× the RAM); separable 4-tap gathers in torch are
vectorised, multi-threaded, float32, and the same code runs on a GPU at inference. torch's own
``bicubic`` uses a = -0.75, which overshoots and does not reproduce linear ramps.

The cache (:func:`preprocess_dataset`) holds, per configuration, ``<case>.npy`` (image, float32
[C, Z, Y, X]), ``<case>_seg.npy`` (label, uint8/int16 [Z, Y, X]) — both memory-mappable — and
``<case>.json`` (the properties: every geometric step, the sources, sampled foreground
locations per class, and the cache key). An entry is redone when its key (plan configuration +
normalisation + source files' sizes and modification times) changed, and kept otherwise.

The package: :mod:`.spec` (settings), :mod:`.crop`, :mod:`.normalization`, :mod:`.resampling`,
:mod:`.steps` (one case, and :func:`restore`), :mod:`.cache` (the cache format) and
:mod:`.dataset` (a whole dataset, in worker processes).
"""

from .cache import cache_key, cached_properties, load_cached_case, source_stats
from .crop import crop_box
from .dataset import PreprocessResult, preprocess_dataset
from .normalization import normalize
from .resampling import resample, resample_label, separate_z_axis
from .spec import (
    LOCATIONS_SEED,
    MAX_LOCATIONS_PER_CLASS,
    PREPROCESS_VERSION,
    SEPARATE_Z_RATIO,
    ChannelNorm,
    PreprocessSpec,
    cache_dir_for,
    spec_from_plan,
)
from .steps import preprocess_arrays, restore, sample_locations

__all__ = [
    "LOCATIONS_SEED", "MAX_LOCATIONS_PER_CLASS", "PREPROCESS_VERSION", "SEPARATE_Z_RATIO", "ChannelNorm",
    "PreprocessResult", "PreprocessSpec", "cache_dir_for", "cache_key", "cached_properties", "crop_box",
    "load_cached_case", "normalize", "preprocess_arrays", "preprocess_dataset", "resample", "resample_label",
    "restore", "sample_locations", "separate_z_axis", "source_stats", "spec_from_plan",
]
