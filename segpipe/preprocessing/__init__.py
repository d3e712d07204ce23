"""Preprocessing: transpose, crop to nonzero, normalise, resample — and ``restore()``, its inverse.

Forward steps (nnU-Net's order), each recorded in a properties dict so that :func:`restore`
undoes them mechanically, in reverse:

1. **transpose** the array axes so the plan's coarsest axis comes first (``plan.transpose``);
2. **crop** to the bounding box of voxels where any channel is nonzero;
3. **normalise** each channel by the plan's scheme (a registry, :data:`NORMALIZERS`): ``ct`` (clip
   to the dataset's foreground 0.5/99.5 percentiles, then the dataset-global foreground z-score),
   ``zscore`` (per image; inside the nonzero mask, zero outside, when the plan asks for the mask),
   ``rescale_to_0_1``, ``rgb_to_0_1`` or ``none``;
4. **resample** to the configuration's spacing. Images: separable cubic convolution
   (Catmull-Rom, float32, one axis at a time); when the spacing ratio between the coarsest and finest axes
   exceeds :data:`~segpipe.planning.ANISOTROPY_THRESHOLD` the coarse axis is handled separately with nearest
   neighbour (nnU-Net's "separate z"). Labels: never cubic — linear interpolation of each
   class's one-hot mask, then the most probable class (the same per-axis scheme).

Why hand-written torch instead of scikit-image (nnU-Net) or SimpleITK: skimage resizes in
float64 through ``map_coordinates`` (slow, 2× the RAM); separable 4-tap gathers in torch are
vectorised, multi-threaded, float32, and the same code runs on a GPU at inference. torch's own
``bicubic`` uses a = -0.75, which overshoots and does not reproduce linear ramps.

The cache (:class:`Cache`, filled by :func:`preprocess_dataset`) holds one folder per grid and
one folder per case in it: ``image.npy`` (float32 [C, Z, Y, X]), ``label.npy`` (uint8/int16
[Z, Y, X]) — both memory-mappable — and ``properties.json`` (every geometric step, the sources,
sampled foreground locations per class, the cache key, and each array's shape, dtype, size and
checksum). An entry is redone when its key (plan configuration + normalisation + source files'
sizes and modification times) changed or when it fails validation, and kept otherwise; entries
of cases no longer in the dataset are removed.

The package: :mod:`.spec` (settings), :mod:`.crop`, :mod:`.normalization`, :mod:`.resampling`,
:mod:`.steps` (one case, and :func:`restore`), :mod:`.cache` (the cache format) and
:mod:`.dataset` (a whole dataset, in worker processes).
"""

from ..arrays import crop_box
from .cache import Cache, array_record, cache_key, cached_properties, load_cached_case, sampled_crc32, source_stats
from .dataset import PreprocessResult, preprocess_dataset
from .normalization import NORMALIZERS, get_normalizer, normalize, register_normalization
from .resampling import resample, resample_label, separate_z_axis
from .spec import (
    LOCATIONS_SEED,
    MAX_LOCATIONS_PER_CLASS,
    PREPROCESS_VERSION,
    ChannelNorm,
    PreprocessSpec,
    cache_dir_for,
    shared_configuration,
    spec_from_plan,
)
from .steps import preprocess_arrays, resampled_shape, restore, restore_argmax, sample_locations

__all__ = [
    "LOCATIONS_SEED",
    "MAX_LOCATIONS_PER_CLASS",
    "NORMALIZERS",
    "PREPROCESS_VERSION",
    "Cache",
    "ChannelNorm",
    "PreprocessResult",
    "PreprocessSpec",
    "array_record",
    "cache_dir_for",
    "cache_key",
    "cached_properties",
    "crop_box",
    "get_normalizer",
    "load_cached_case",
    "normalize",
    "preprocess_arrays",
    "preprocess_dataset",
    "resample",
    "register_normalization",
    "resample_label",
    "restore",
    "resampled_shape",
    "restore_argmax",
    "sample_locations",
    "sampled_crc32",
    "separate_z_axis",
    "shared_configuration",
    "source_stats",
    "spec_from_plan",
]
