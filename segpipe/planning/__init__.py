"""Experiment planning: ``make_plan(fingerprint, settings) -> Plan``, pure and data-only.

The rules are nnU-Net v2's default ``ExperimentPlanner`` (see ``REFERENCE.md``) unless noted:

* target spacing = per-axis median; anisotropy rule (coarsest axis > 3× the others and its
  voxel count × 3 < the smallest other) → that axis's 10th-percentile spacing, never below the
  largest other spacing. The coarsest axis is transposed first (``transpose_forward``); every
  per-axis list inside a configuration is in that *network* axis order.
* initial patch ∝ 1/spacing with the volume of 256³ (3D) / 2048² (2D), clipped to the median
  shape; topology (:func:`topology`) pools an axis while it is ≥ 8 (≥ 12 alone) and its spacing
  is within 2× of the finest, kernel 3 once within 2×; patch padded to a multiple of 2^pools.
* features 32 doubling, capped at 320 (3D) / 512 (2D).
* patch shrinking (axis with the largest patch / median-shape ratio first) and batch size come
  from a **memory model** instead of nnU-Net's calibrated feature-map count:
  :func:`estimate_training_bytes` predicts the bytes the tensors of one fp32 training step hold
  (weights, gradients, SGD momentum, activations saved for backward), per architecture, layer
  by layer; ``tests/test_networks.py`` checks it against a measurement on CPU. GPU-only costs
  are a documented constant and factors: :data:`GPU_FIXED_BYTES` + state + :data:`GPU_SLACK` ×
  :data:`AMP_ACTIVATION_FACTOR` × activations (calibrated on an H200, see below).
* batch = the largest that fits, capped so one batch covers ≤ 5% of the dataset's voxels, ≥ 2.
  On hippocampus the cap decides: 3d_fullres 7 and 2d 292, as nnU-Net (the memory model would allow
  61 and ~1800 in 8 GiB). Where memory, not the cap, decides (large images), our patch and batch can
  differ from nnU-Net's: they come from predicted bytes, not from nnU-Net's feature-map count
  compared with a reference calibrated on one GPU.

Deliberate differences from nnU-Net: the memory model above; a patch that would give fewer than 3
stages (images under ~16 voxels per axis) is padded up to allow 3 (MONAI's DynUNet needs them);
``3d_lowres`` has no cascade yet; ``2.5d`` and ``vnet`` are extra; the 2D configuration keeps each
case's own slice spacing (``resample_slices=False``), as nnU-Net's 2D preprocessing does.

Configurations: ``2d``, ``3d_fullres``, ``3d_lowres`` (standalone, no cascade yet), ``2.5d``
(anisotropic data only; Wang et al. 2019) and ``vnet`` (Milletari et al. 2016). The plan holds
numbers only — never class paths; :mod:`segpipe.networks` turns a :class:`PlanConfig` into a module.

The package: :mod:`.settings` (constants, :class:`PlanSettings`), :mod:`.plan` (the data model
and ``plans.json`` IO), :mod:`.memory` (topology rules and the memory model), :mod:`.planner`
(the rules that turn a fingerprint into a plan; ``run_planning`` writes a dataset's workspace
entry), :mod:`.report` (``plan_summary.md`` and ``dataset_report.png``, for people).
"""

from .memory import attention_hidden, estimate_gpu_bytes, estimate_training_bytes, memory_breakdown, topology
from .plan import ChannelNormalization, Plan, PlanConfig, load_plan, plans_json, save_plan
from .planner import fingerprint_digest, make_plan, plan_summary_rows, target_spacing
from .report import plan_summary_markdown, write_dataset_report, write_plan_summary
from .run import PlanningResult, run_planning
from .settings import (
    AMP_ACTIVATION_FACTOR,
    ANISOTROPY_THRESHOLD,
    ARCHITECTURES,
    CONFIGURATIONS,
    GPU_FIXED_BYTES,
    GPU_SLACK,
    NORMALIZATION_SCHEMES,
    PLANS_FILE,
    SCHEMA_VERSION,
    PlanSettings,
    did_you_mean,
)

__all__ = [
    "AMP_ACTIVATION_FACTOR",
    "ANISOTROPY_THRESHOLD",
    "ARCHITECTURES",
    "CONFIGURATIONS",
    "ChannelNormalization",
    "GPU_FIXED_BYTES",
    "GPU_SLACK",
    "NORMALIZATION_SCHEMES",
    "PLANS_FILE",
    "Plan",
    "PlanConfig",
    "PlanSettings",
    "PlanningResult",
    "SCHEMA_VERSION",
    "attention_hidden",
    "did_you_mean",
    "estimate_gpu_bytes",
    "estimate_training_bytes",
    "fingerprint_digest",
    "load_plan",
    "make_plan",
    "memory_breakdown",
    "plan_summary_markdown",
    "plan_summary_rows",
    "plans_json",
    "run_planning",
    "save_plan",
    "target_spacing",
    "topology",
    "write_dataset_report",
    "write_plan_summary",
]
