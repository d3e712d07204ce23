"""Networks for every planned configuration: output shapes, deep supervision, and the memory model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segpipe.networks import (
    SpatialAttention,
    VNet,
    build_network,
    estimate_training_bytes,
    measure_training_bytes,
    memory_breakdown,
)
from segpipe.planning import PlanConfig, PlanSettings, make_plan, topology


def fingerprint(spacings, shapes, channels=None):
    """A hand-written fingerprint with what the planner reads (as in test_planning.py)."""
    return {
        "dataset": "hand",
        "channel_names": channels or {"0": "MRI"},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "median_relative_size_after_crop": 1.0,
        "foreground_intensity_per_channel": {},
        "cases": [
            {"spacing": list(map(float, s)), "shape_after_crop": list(map(int, sh))} for s, sh in zip(spacings, shapes)
        ],
    }


torch.set_num_threads(min(2, torch.get_num_threads()))

FINGERPRINTS = {
    "iso": fingerprint([(1.0, 1.0, 1.0)] * 20, [(36, 50, 35)] * 20),
    "aniso": fingerprint([(5.0, 0.7, 0.7)] * 10, [(16, 96, 96)] * 10),
    "tiny": fingerprint([(1.0, 1.0, 1.0)] * 5, [(6, 10, 12)] * 5),
    "big": fingerprint([(1.0, 1.0, 1.0)] * 10, [(300, 300, 300)] * 10),
}


def _plans():
    plans = {k: make_plan(v) for k, v in FINGERPRINTS.items()}
    plans["slab"] = make_plan(FINGERPRINTS["aniso"], PlanSettings(configurations=["2.5d"], context_slices=1))
    return plans


PLANS = _plans()
# 3d_cascade_fullres is 3d_fullres's network with more input channels (checked below), not a case of its own
CASES = [(p, c) for p, plan in PLANS.items() for c in plan.configurations if c != "3d_cascade_fullres"]


def divisor(cfg: PlanConfig) -> list[int]:
    return [int(v) for v in np.prod(np.asarray(cfg.strides), axis=0)]


def small_patch(cfg: PlanConfig) -> list[int]:
    """The smallest patch the planner could choose for this topology (2 voxels at the bottleneck)."""
    patch = divisor(cfg)
    patch[-1] *= 2
    return patch


def with_patch(cfg: PlanConfig, patch, *, narrow: bool = False) -> PlanConfig:
    """``cfg`` with another patch; ``narrow`` also cuts the widths to 4..16 features (same topology,
    same shapes, a fraction of the CPU time)."""
    changes: dict = {"patch_size": list(patch)}
    if narrow:
        changes["features"] = [min(4 * 2**i, 16) for i in range(len(cfg.features))]
    return PlanConfig.from_dict({**cfg.to_dict(), **changes})


def test_every_applicable_configuration_is_covered():
    planned = {c for _, c in CASES}
    assert planned == {"2d", "3d_fullres", "3d_lowres", "2.5d", "vnet"}
    for plan in PLANS.values():
        if "3d_cascade_fullres" in plan.configurations:
            cascade, fullres = plan.config("3d_cascade_fullres").to_dict(), plan.config("3d_fullres").to_dict()
            assert {k: v for k, v in cascade.items() if k not in ("name", "notes")} == {
                k: v for k, v in fullres.items() if k not in ("name", "notes")
            }
            assert plan.network_channels("3d_cascade_fullres") == plan.in_channels + plan.num_classes - 1


@pytest.mark.parametrize(("plan", "name"), CASES, ids=[f"{p}-{c}" for p, c in CASES])
def test_output_shapes_and_deep_supervision(plan, name):
    cfg = PLANS[plan].configurations[name]
    cfg = with_patch(cfg, small_patch(cfg), narrow=True)
    cin = 2
    net = build_network(cfg, cin, 3)
    x = torch.randn(2, cin * cfg.input_slices, *cfg.patch_size)
    net.train()
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == cfg.num_stages - 1 == cfg.deep_supervision_outputs
    size = np.asarray(cfg.patch_size)
    for i, out in enumerate(outs):
        size = size // np.asarray(cfg.strides[i])
        assert tuple(out.shape) == (2, 3, *size.tolist()), f"head {i}"
    sum(o.float().mean() for o in outs).backward()
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 3, *cfg.patch_size)


def test_without_deep_supervision_training_returns_a_tensor():
    cfg = PLANS["iso"].configurations["3d_fullres"]
    cfg = with_patch(cfg, small_patch(cfg), narrow=True)
    net = build_network(cfg, 1, 2, deep_supervision=False).train()
    out = net(torch.randn(1, 1, *cfg.patch_size))
    assert isinstance(out, torch.Tensor) and out.shape[2:] == torch.Size(cfg.patch_size)


def test_unet_layers_follow_nnunet():
    net = build_network(PLANS["aniso"].configurations["3d_fullres"], 1, 3)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs[0].kernel_size == (1, 3, 3)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(n.affine and n.eps == 1e-5 for n in norms)
    acts = [m for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert acts and all(a.negative_slope == 0.01 for a in acts)


def test_25d_has_attention_and_planar_convolutions():
    cfg = PLANS["aniso"].configurations["2.5d"]
    net = build_network(cfg, 1, 3)
    att = [m for m in net.modules() if isinstance(m, SpatialAttention)]
    assert len(att) == cfg.num_stages - 1
    planar = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (1, 3, 3)]
    planar_full = [
        m
        for m in build_network(PLANS["aniso"].configurations["3d_fullres"], 1, 3).modules()
        if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (1, 3, 3)
    ]
    assert len(planar) > len(planar_full)
    slab = PLANS["slab"].configurations["2.5d"]
    first = next(m for m in build_network(slab, 2, 3).modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 2 * 3  # 2 channels × (slice ± 1)


def test_vnet_is_residual_5x5x5_with_prelu():
    cfg = PLANS["aniso"].configurations["vnet"]
    net = build_network(cfg, 1, 3)
    assert isinstance(net, VNet)
    kernels = {m.kernel_size for m in net.modules() if isinstance(m, torch.nn.Conv3d)}
    assert (1, 5, 5) in kernels and (5, 5, 5) in kernels
    assert any(isinstance(m, torch.nn.PReLU) for m in net.modules())
    downs = [m[0] for m in net.downs]
    assert [list(d.stride) for d in downs] == cfg.strides[1:]


def test_patch_sizes_the_planner_can_choose_keep_output_size():
    """Planner invariant (patch divisible by 2^pools, ≥ 2·4 voxels at the bottleneck) on random
    fingerprints; networks are built for a sample of them."""
    rng = np.random.default_rng(7)
    built = 0
    for trial in range(40):
        sp = rng.choice([0.5, 0.7, 1.0, 1.5, 3.0, 5.0], size=3)
        sh = rng.integers(8, 400, size=3)
        plan = make_plan(fingerprint([tuple(sp)] * 5, [tuple(sh)] * 5), PlanSettings(configurations=["3d_fullres"]))
        cfg = plan.configurations["3d_fullres"]
        strides, _, padded, div = topology(cfg.spacing, cfg.patch_size)
        assert padded == cfg.patch_size and divisor(cfg) == div
        assert all(p % d == 0 for p, d in zip(cfg.patch_size, div))
        if trial % 10 == 0:
            small = with_patch(cfg, small_patch(cfg), narrow=True)
            with torch.no_grad():
                out = build_network(small, 1, 2).eval()(torch.randn(1, 1, *small.patch_size))
            assert tuple(out.shape[2:]) == tuple(small.patch_size)
            built += 1
    assert built == 4


# ---------------------------------------------------------------------------- memory model
MEMORY_CASES = [
    ("iso", "3d_fullres", [16, 24, 16]),
    ("iso", "2d", [32, 32]),
    ("iso", "vnet", [16, 16, 16]),
    ("aniso", "2.5d", [2, 32, 32]),
    ("slab", "2.5d", [32, 32]),
]


@pytest.mark.parametrize(("plan", "name", "patch"), MEMORY_CASES, ids=[f"{p}-{c}" for p, c, _ in MEMORY_CASES])
def test_memory_model_matches_measurement(plan, name, patch):
    """Predicted bytes of a training step within ±25 % of the bytes measured on CPU (saved tensors,
    deduplicated by storage, plus parameters, gradients and SGD momentum)."""
    cfg = with_patch(PLANS[plan].configurations[name], patch)
    if plan == "aniso":  # fewer stages keep the test small: the 2.5d topology of a 2 × 32 × 32 patch
        strides, kernels, _, _ = topology(cfg.spacing, [16, 32, 32], ratio=1.25)
        n = len(strides)
        cfg = PlanConfig.from_dict(
            {
                **cfg.to_dict(),
                "strides": strides,
                "kernel_sizes": kernels,
                "features": cfg.features[:n],
                "n_conv_encoder": [2] * n,
                "n_conv_decoder": [2] * (n - 1),
                "patch_size": [4, 32, 32],
            }
        )
    batch = 2
    measured = measure_training_bytes(cfg, 2, 3, batch)
    predicted = estimate_training_bytes(cfg, 2, 3, batch)
    error = predicted / measured["total"] - 1
    assert abs(error) <= 0.25, f"{plan}/{name}: predicted {predicted}, measured {measured}"
    # the activation part alone too (tiny patches make the weights dominate the total)
    activations = memory_breakdown(cfg, 2, 3, batch)["activations"]
    assert abs(activations / measured["saved"] - 1) <= 0.25, f"{plan}/{name}: {activations} vs {measured}"
    assert measured["saved"] > 0 and measured["optimizer_state"] == measured["parameters"]


def test_memory_model_scales_with_batch_and_patch():
    cfg = PLANS["iso"].configurations["3d_fullres"]
    a = estimate_training_bytes(cfg, 1, 3, 2)
    b = estimate_training_bytes(cfg, 1, 3, 4)
    c = estimate_training_bytes(with_patch(cfg, [80, 56, 40]), 1, 3, 2)
    state = a - (b - a)
    assert state > 0 and math.isclose(b - a, a - state)
    assert c - state == pytest.approx(2 * (a - state), rel=0.01)
