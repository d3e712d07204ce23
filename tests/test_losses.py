"""segpipe.losses: every loss against values computed by hand on tiny tensors, the ignore label,
deep supervision, the registry and its conf/loss options, and the hardness-weighted case sampler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from segpipe.errors import ConfigError, StateError
from segpipe.losses import (
    LOSSES,
    DeepSupervision,
    HardnessWeightedSampler,
    build_loss,
    deep_supervision_weights,
    downsample_target,
    loss_defaults,
)

torch.set_num_threads(1)

CONF = Path(__file__).resolve().parents[1] / "conf" / "loss"
S = 1e-5  # nnU-Net's smoothing
ln = math.log

# One 2×2 image, two classes. Foreground probabilities and labels (row-major):
#   p1 = .9 .2      g = 1 0
#        .6 .1          1 1
P1 = [[0.9, 0.2], [0.6, 0.1]]
G = [[1, 0], [1, 1]]


def logits_of(p1, *, dims: int = 2) -> torch.Tensor:
    """Logits [1, 2, 2, 2] (or [1, 2, 1, 2, 2]) whose softmax is exactly (1 − p1, p1): log-probabilities."""
    p = torch.tensor(p1, dtype=torch.float64)
    x = torch.stack([torch.log(1 - p), torch.log(p)])[None]
    return x[:, :, None] if dims == 3 else x


def labels_of(g, *, dims: int = 2) -> torch.Tensor:
    t = torch.tensor(g, dtype=torch.uint8)[None, None]
    return t[:, :, None] if dims == 3 else t


def region_only(name: str, **params) -> torch.nn.Module:
    return build_loss(name, ce_weight=0.0, **params) if name != "focal" else build_loss(name, **params)


# ---------------------------------------------------------------------------- hand-computed values
# tp = .9 + .6 + .1 = 1.6; Σp = .9 + .2 + .6 + .1 = 1.8; Σg = 3; fp = Σp − tp = .2; fn = Σg − tp = 1.4
DICE = (2 * 1.6 + S) / (1.8 + 3 + S)
# cross-entropy: mean of −log p_t, p_t = .9, (1 − .2), .6, .1
CE = -(ln(0.9) + ln(0.8) + ln(0.6) + ln(0.1)) / 4


@pytest.mark.parametrize("dims", [2, 3])
def test_dice_ce_is_nnunets_formula(dims):
    x, t = logits_of(P1, dims=dims), labels_of(G, dims=dims)
    assert build_loss("dice_ce")(x, t).item() == pytest.approx(CE - DICE, abs=1e-6)
    assert region_only("dice_ce")(x, t).item() == pytest.approx(-DICE, abs=1e-6)
    assert build_loss("dice_ce", region_weight=0.0)(x, t).item() == pytest.approx(CE, abs=1e-6)
    # labels without the channel axis are the same labels
    assert build_loss("dice_ce")(x, t[:, 0]).item() == pytest.approx(CE - DICE, abs=1e-6)


def test_dice_with_background():
    # background: p0 = .1 .8 / .4 .9, g0 = 0 1 / 0 0: tp = .8, Σp = 2.2, Σg = 1
    dice_bg = (2 * 0.8 + S) / (2.2 + 1 + S)
    loss = region_only("dice_ce", include_background=True)(logits_of(P1), labels_of(G))
    assert loss.item() == pytest.approx(-(dice_bg + DICE) / 2, abs=1e-6)


def test_tversky_by_hand_and_half_half_is_dice():
    x, t = logits_of(P1), labels_of(G)
    # α = .3, β = .7: TI = (2·1.6 + s) / (2·1.6 + 2·.3·.2 + 2·.7·1.4 + s) = (3.2 + s) / (5.28 + s)
    ti = (3.2 + S) / (3.2 + 0.12 + 1.96 + S)
    assert region_only("tversky", alpha=0.3, beta=0.7)(x, t).item() == pytest.approx(-ti, abs=1e-6)
    assert build_loss("tversky", alpha=0.3, beta=0.7)(x, t).item() == pytest.approx(CE - ti, abs=1e-6)
    half = region_only("tversky", alpha=0.5, beta=0.5)(x, t)
    assert half.item() == pytest.approx(region_only("dice_ce")(x, t).item(), abs=1e-12)
    assert half.item() == pytest.approx(-DICE, abs=1e-6)


def test_focal_tversky_by_hand():
    x, t = logits_of(P1), labels_of(G)
    ti = (3.2 + S) / (5.28 + S)
    loss = region_only("focal_tversky", alpha=0.3, beta=0.7, gamma=0.75)(x, t)
    assert loss.item() == pytest.approx((1 - ti) ** 0.75, abs=1e-6)
    # γ = 1 is the Tversky loss shifted by one
    one = region_only("focal_tversky", alpha=0.3, beta=0.7, gamma=1.0)(x, t)
    assert one.item() == pytest.approx(1 + region_only("tversky", alpha=0.3, beta=0.7)(x, t).item(), abs=1e-9)


def test_hardness_weighted_dice_by_hand_and_lambda_zero_is_dice():
    x, t = logits_of(P1), labels_of(G)
    # |p − g| = .1 .2 / .4 .9; w = .6·|p − g| + .4 = .46 .52 / .64 .94
    # tp = Σ w·p·g = .46·.9 + .64·.6 + .94·.1 = .414 + .384 + .094 = .892
    # Σ w·p = .892 + .52·.2 = .996;  Σ w·g = .46 + .64 + .94 = 2.04
    dc = (2 * 0.892 + S) / (0.996 + 2.04 + S)
    assert region_only("hardness_dice", lam=0.6)(x, t).item() == pytest.approx(-dc, abs=1e-6)
    zero = region_only("hardness_dice", lam=0.0)(x, t)
    assert zero.item() == pytest.approx(region_only("dice_ce")(x, t).item(), abs=1e-12)


def test_hardness_weight_detached_by_default():
    t = labels_of(G)
    grads = {}
    for detach in (True, False):
        x = logits_of(P1).requires_grad_()
        region_only("hardness_dice", lam=0.6, detach_weight=detach)(x, t).backward()
        grads[detach] = x.grad
    # same value, different gradients: the weight's own gradient is only there when kept
    assert not torch.allclose(grads[True], grads[False])
    # detached: the gradient of −(2·Σwpg + s)/(Σwp + Σwg + s) with w constant, at voxel (0, 1) (g = 0):
    # ∂/∂p = −(0 − dc·w) / D = dc·w / D, and ∂p/∂z1 = p(1 − p) for the foreground logit
    num, den = 2 * 0.892 + S, 0.996 + 2.04 + S
    dc = num / den
    d_p = dc * 0.52 / den
    assert grads[True][0, 1, 0, 1].item() == pytest.approx(d_p * 0.2 * 0.8, abs=1e-6)


def test_focal_by_hand_and_gamma_zero_is_cross_entropy():
    x, t = logits_of(P1), labels_of(G)
    # −(1 − p_t)^2 log p_t, p_t = .9, .8, .6, .1
    fl = -(0.1**2 * ln(0.9) + 0.2**2 * ln(0.8) + 0.4**2 * ln(0.6) + 0.9**2 * ln(0.1)) / 4
    assert build_loss("focal", gamma=2.0)(x, t).item() == pytest.approx(fl, abs=1e-6)
    # per-class α = [.25, .75]: α_t = .75, .25, .75, .75
    fla = -(0.75 * 0.1**2 * ln(0.9) + 0.25 * 0.2**2 * ln(0.8) + 0.75 * 0.4**2 * ln(0.6) + 0.75 * 0.9**2 * ln(0.1)) / 4
    assert build_loss("focal", gamma=2.0, alpha=[0.25, 0.75])(x, t).item() == pytest.approx(fla, abs=1e-6)
    torch.manual_seed(0)
    y = torch.randn(2, 3, 4, 5, 6)
    lab = torch.randint(0, 3, (2, 1, 4, 5, 6))
    ce = torch.nn.functional.cross_entropy(y, lab[:, 0])
    assert build_loss("focal", gamma=0.0, alpha=1.0)(y, lab).item() == pytest.approx(ce.item(), rel=1e-6)
    # plus a Dice term
    both = build_loss("focal", gamma=2.0, region_weight=1.0)(x, t)
    assert both.item() == pytest.approx(fl - DICE, abs=1e-6)


def test_focal_alpha_length_must_match_classes():
    with pytest.raises(ConfigError, match="alpha has 3 weights for 2 classes"):
        build_loss("focal", alpha=[0.2, 0.3, 0.5])(logits_of(P1), labels_of(G))


def test_batch_dice_differs_from_sample_dice():
    # sample A as above; sample B: foreground p = .1 everywhere, no foreground label
    x = torch.cat([logits_of(P1), logits_of([[0.1, 0.1], [0.1, 0.1]])])
    t = torch.cat([labels_of(G), labels_of([[0, 0], [0, 0]])])
    dice_b = (0 + S) / (0.4 + 0 + S)  # tp = 0, Σp = .4, Σg = 0: about 0
    sample = region_only("dice_ce", batch_dice=False)(x, t)
    assert sample.item() == pytest.approx(-(DICE + dice_b) / 2, abs=1e-6)
    batch = region_only("dice_ce", batch_dice=True)(x, t)
    assert batch.item() == pytest.approx(-(2 * 1.6 + S) / (1.8 + 0.4 + 3 + S), abs=1e-6)
    assert abs(batch.item() - sample.item()) > 0.25  # the empty sample's Dice of ≈ 0 no longer halves it
    # per-sample values stay per sample with batch Dice
    per = region_only("dice_ce", batch_dice=True).per_sample(x, t)
    assert per.tolist() == pytest.approx([-DICE, -dice_b], abs=1e-6)


def test_batch_dice_from_context_only_when_left_null():
    x = torch.cat([logits_of(P1), logits_of([[0.1, 0.1], [0.1, 0.1]])])
    t = torch.cat([labels_of(G), labels_of([[0, 0], [0, 0]])])
    from_plan = region_only("dice_ce", context={"batch_dice": True})(x, t)
    assert from_plan.item() == pytest.approx(region_only("dice_ce", batch_dice=True)(x, t).item())
    forced = region_only("dice_ce", batch_dice=False, context={"batch_dice": True})(x, t)
    assert forced.item() == pytest.approx(region_only("dice_ce", batch_dice=False)(x, t).item())
    # a context key the loss does not take is skipped
    build_loss("dice_ce", context={"gamma": 3.0})


def test_per_sample_values():
    x = torch.cat([logits_of(P1), logits_of([[0.1, 0.1], [0.1, 0.1]])])
    t = torch.cat([labels_of(G), labels_of([[0, 0], [0, 0]])])
    loss = build_loss("dice_ce")
    value, per = loss.with_per_sample(x, t)
    # sample B: CE = −log .9 at every voxel; Dice ≈ 0
    ce_b = -ln(0.9)
    assert per.tolist() == pytest.approx([CE - DICE, ce_b - S / (0.4 + S)], abs=1e-6)
    assert value.item() == pytest.approx(per.mean().item(), abs=1e-9)  # same counts: CE mean = mean of means
    assert not per.requires_grad


# ---------------------------------------------------------------------------- ignore label
def test_ignore_label_counts_in_no_term():
    # label 2 marks unlabelled voxels: (0, 1) and (1, 1) → only (0, 0) [p1 = .9, g = 1] and (1, 0) [.6, 1] count
    x, t = logits_of(P1), labels_of([[1, 2], [1, 2]])
    dice = (2 * 1.5 + S) / (1.5 + 2 + S)
    ce = -(ln(0.9) + ln(0.6)) / 2
    assert build_loss("dice_ce", ignore_index=2)(x, t).item() == pytest.approx(ce - dice, abs=1e-6)
    ti = (2 * 1.5 + S) / (2 * 1.5 + 2 * 0.3 * 0 + 2 * 0.7 * 0.5 + S)  # fp = 0, fn = 2 − 1.5 = .5
    assert build_loss("tversky", ignore_index=2)(x, t).item() == pytest.approx(ce - ti, abs=1e-6)
    fl = -(0.1**2 * ln(0.9) + 0.4**2 * ln(0.6)) / 2
    assert build_loss("focal", ignore_index=2)(x, t).item() == pytest.approx(fl, abs=1e-6)
    # every voxel ignored: no cross-entropy, Dice of nothing = 1
    all_ignored = build_loss("dice_ce", ignore_index=2)(x, labels_of([[2, 2], [2, 2]]))
    assert all_ignored.item() == pytest.approx(-1.0)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dims", [2, 3])
def test_ignored_voxels_change_neither_loss_nor_gradient(name, dims):
    torch.manual_seed(1)
    spatial = (3, 4, 5) if dims == 3 else (6, 5)
    t = torch.randint(0, 3, (2, 1, *spatial))
    t[:, :, 0] = 255  # the first slice/row is unlabelled
    params = {"region_weight": 1.0} if name == "focal" else {}
    loss = build_loss(name, ignore_index=255, **params)
    base = torch.randn(2, 3, *spatial, dtype=torch.float64)
    results = []
    for scale in (1.0, 7.0):
        x = base.clone()
        x[:, :, 0] = scale * torch.randn_like(x[:, :, 0]) + scale
        x.requires_grad_()
        value = loss(x, t)
        value.backward()
        assert x.grad is not None
        assert torch.all(x.grad[:, :, 0] == 0)
        results.append((value.detach(), x.grad[:, :, 1:].clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-12)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-12)


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dims", [2, 3])
def test_finite_gradients(name, dims):
    torch.manual_seed(2)
    spatial = (4, 6, 6) if dims == 3 else (8, 8)
    t = torch.randint(0, 3, (2, 1, *spatial), dtype=torch.uint8)
    t[1] = 0  # a sample without foreground
    for extra in ({}, {"batch_dice": True}):
        for scale in (1.0, 30.0):  # also confident (saturated) predictions
            x = (scale * torch.randn(2, 3, *spatial)).requires_grad_()
            value = build_loss(name, **extra)(x, t)
            value.backward()
            assert torch.isfinite(value) and x.grad is not None and torch.isfinite(x.grad).all(), (name, extra)
            assert x.grad.abs().sum() > 0


def test_perfect_prediction_keeps_focal_tversky_finite():
    t = labels_of(G)
    x = (40.0 * (2 * torch.nn.functional.one_hot(t[:, 0].long(), 2).movedim(-1, 1).float() - 1)).requires_grad_()
    value = build_loss("focal_tversky")(x, t)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------- deep supervision
def test_deep_supervision_weights_are_nnunets():
    assert deep_supervision_weights(3) == pytest.approx([1 / 1.5, 0.5 / 1.5, 0.0])
    assert deep_supervision_weights(4) == pytest.approx([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0])
    five = deep_supervision_weights(5)
    assert five == pytest.approx([1 / 1.875, 0.5 / 1.875, 0.25 / 1.875, 0.125 / 1.875, 0.0])
    assert [round(w, 2) for w in five] == [0.53, 0.27, 0.13, 0.07, 0.0]
    assert deep_supervision_weights(1) == [1.0]


def test_target_downsampling_shapes_and_values():
    t = torch.arange(2 * 8 * 8 * 8).reshape(2, 1, 8, 8, 8)
    assert downsample_target(t, (8, 8, 8)) is t
    half = downsample_target(t, (8, 4, 4))  # anisotropic: in-plane only
    assert half.shape == (2, 1, 8, 4, 4)
    assert torch.equal(half, t[:, :, :, 1::2, 1::2])  # nearest-exact picks voxel 2i + 1
    quarter = downsample_target(t, (2, 2, 2))
    assert quarter.shape == (2, 1, 2, 2, 2) and torch.equal(quarter, t[:, :, 2::4, 2::4, 2::4])
    # same as F.interpolate(mode="nearest-exact"), what nnU-Net uses
    ref = torch.nn.functional.interpolate(t.float(), size=(4, 2, 2), mode="nearest-exact").long()
    assert torch.equal(downsample_target(t, (4, 2, 2)), ref)
    # labels without a channel axis, 2-D, and a size that is not a divisor
    assert downsample_target(torch.zeros(3, 6, 10, dtype=torch.uint8), (3, 5)).shape == (3, 3, 5)
    odd = downsample_target(torch.ones(1, 1, 7, 7, dtype=torch.uint8), (3, 3))
    assert odd.shape == (1, 1, 3, 3) and odd.dtype == torch.uint8


def test_ignore_label_survives_downsampling():
    t = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    t[..., 1::2, 1::2] = 255  # exactly the voxels the half-resolution target keeps
    t[..., 0::2, 0::2] = 1
    down = downsample_target(t, (4, 4))
    assert torch.all(down == 255)
    assert set(downsample_target(t, (8, 8)).unique().tolist()) == {0, 1, 255}


def test_deep_supervision_sums_weighted_levels():
    torch.manual_seed(3)
    t = torch.randint(0, 3, (2, 1, 8, 8, 8))
    outs = [torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 2, 2, 2)]
    base = build_loss("dice_ce")
    ds = DeepSupervision(base)
    expected = 2 / 3 * base(outs[0], t) + 1 / 3 * base(outs[1], t[:, :, 1::2, 1::2, 1::2])
    assert ds(outs, t).item() == pytest.approx(expected.item(), rel=1e-6)
    per = ds.per_sample(outs, t)
    expected_per = 2 / 3 * base.per_sample(outs[0], t) + 1 / 3 * base.per_sample(outs[1], t[:, :, 1::2, 1::2, 1::2])
    assert torch.allclose(per, expected_per)
    # a single tensor (eval mode) is the plain loss
    assert ds(outs[0], t).item() == pytest.approx(base(outs[0], t).item())


def test_deep_supervision_keep_unused_gives_every_head_a_gradient():
    torch.manual_seed(4)
    t = torch.randint(0, 2, (1, 1, 8, 8))
    outs = [torch.randn(1, 2, 8, 8, requires_grad=True), torch.randn(1, 2, 4, 4, requires_grad=True)]
    DeepSupervision(build_loss("dice_ce"))(outs, t).backward()
    assert outs[1].grad is None  # weighted 0 and skipped, as nnU-Net
    outs = [o.detach().requires_grad_() for o in outs]
    value = DeepSupervision(build_loss("dice_ce"), keep_unused=True)(outs, t)
    value.backward()
    assert outs[1].grad is not None and torch.all(outs[1].grad == 0)
    assert value.item() == pytest.approx(build_loss("dice_ce")(outs[0], t).item())


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_deep_supervision_gradients_through_a_network(name):
    from segpipe.networks import build_network
    from segpipe.planning import PlanConfig

    cfg = PlanConfig.from_dict(
        {
            "name": "3d_fullres",
            "architecture": "unet",
            "dims": 3,
            "patch_size": [8, 8, 8],
            "spacing": [1.0, 1.0, 1.0],
            "median_shape": [8, 8, 8],
            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
            "kernel_sizes": [[3, 3, 3]] * 3,
            "features": [2, 4, 8],
            "n_conv_encoder": [1, 1, 1],
            "n_conv_decoder": [1, 1],
            "batch_size": 2,
        }
    )
    torch.manual_seed(5)
    net = build_network(cfg, 1, 3).train()
    outs = net(torch.randn(2, 1, 8, 8, 8))
    assert isinstance(outs, list) and [tuple(o.shape[2:]) for o in outs] == [(8, 8, 8), (4, 4, 4)]
    t = torch.randint(0, 3, (2, 1, 8, 8, 8), dtype=torch.uint8)
    value = DeepSupervision(build_loss(name, ignore_index=255), keep_unused=True)(outs, t)
    value.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------- registry and conf/loss
def test_unknown_loss_is_refused_with_the_list():
    with pytest.raises(ConfigError) as err:
        build_loss("dice")
    message = str(err.value)
    assert "unknown loss 'dice'" in message
    for name in ("dice_ce", "focal", "focal_tversky", "hardness_dice", "tversky"):
        assert name in message


def test_unknown_parameter_is_refused_with_the_list():
    with pytest.raises(ConfigError) as err:
        build_loss("tversky", alpha=0.3, gama=2)
    message = str(err.value)
    assert "unknown parameter(s) gama" in message and "alpha" in message and "ignore_index" in message
    with pytest.raises(ConfigError, match="no term with a nonzero weight"):
        build_loss("dice_ce", ce_weight=0.0, region_weight=0.0)


def test_every_loss_has_an_option_file():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted(LOSSES)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_option_file_composes_into_build_loss(path):
    params = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(params, dict)
    name = params.pop("name")
    assert name == path.stem
    loss = build_loss(name, **params)
    x, t = logits_of(P1), labels_of(G)
    assert torch.isfinite(loss(x, t))
    # the file holds exactly the builder's parameters: nothing missing, nothing unused
    import inspect

    assert set(params) == set(inspect.signature(LOSSES[name]).parameters)
    assert loss_defaults(name) == params
    # through a composed (DictConfig) node, as the training loop gets it
    node = OmegaConf.load(path)
    build_loss(str(node.name), **{k: node[k] for k in node if k != "name"})
    # every key is documented on its line
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            assert " # " in line, f"{path.name}: {line!r} has no comment"


def test_focal_alpha_from_a_composed_list():
    node = OmegaConf.create({"alpha": [0.25, 0.75]})
    loss = build_loss("focal", alpha=node.alpha)
    fl_bg = loss(logits_of(P1), labels_of([[0, 0], [0, 0]]))
    # every voxel background: α_t = .25, p_t = .1, .8, .4, .9
    fl = -0.25 * (0.9**2 * ln(0.1) + 0.2**2 * ln(0.8) + 0.6**2 * ln(0.4) + 0.1**2 * ln(0.9)) / 4
    assert fl_bg.item() == pytest.approx(fl, abs=1e-6)


# ---------------------------------------------------------------------------- hardness-weighted sampler
def test_sampler_probabilities_follow_softmax_of_beta_loss():
    s = HardnessWeightedSampler(3, beta=2.0, init_loss=0.5)
    assert s.probabilities() == pytest.approx([1 / 3] * 3)
    # losses 0, ln 2 / 2, ln 3 / 2 with β = 2: exp(β·L) = 1, 2, 3 → 1/6, 2/6, 3/6
    s.update([0, 1, 2], torch.tensor([0.0, ln(2) / 2, ln(3) / 2]))
    assert s.probabilities() == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    draws = s.sample(np.random.default_rng(0), 6000)
    assert draws.shape == (6000,) and draws.min() >= 0 and draws.max() <= 2
    assert np.bincount(draws, minlength=3) / 6000 == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=0.03)
    # a case drawn twice keeps the mean; a non-finite loss is skipped
    s.update(np.array([0, 0, 1]), [0.2, 0.4, float("nan")])
    assert s.losses.tolist() == pytest.approx([0.3, ln(2) / 2, ln(3) / 2])
    assert s.updates.tolist() == [2, 1, 1]
    # β = 0 is uniform sampling
    assert HardnessWeightedSampler(4, beta=0.0).probabilities() == pytest.approx([0.25] * 4)


def test_sampler_is_stable_for_large_beta_and_losses():
    s = HardnessWeightedSampler(2, beta=100.0)
    s.update([0, 1], [50.0, 40.0])
    p = s.probabilities()
    assert np.isfinite(p).all() and p[0] == pytest.approx(1.0)


def test_sampler_state_round_trip(tmp_path):
    s = HardnessWeightedSampler(4, beta=3.0, init_loss=2.0)
    s.update([1, 3], [0.5, -0.25])
    state = s.state_dict()
    json.dumps(state)  # plain types only
    torch.save({"sampler": state}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["sampler"]
    t = HardnessWeightedSampler(4, beta=1.0)
    t.load_state_dict(loaded)
    assert t.beta == 3.0 and t.probabilities() == pytest.approx(s.probabilities())
    assert t.updates.tolist() == [0, 1, 0, 1]
    assert np.array_equal(t.sample(np.random.default_rng(7), 20), s.sample(np.random.default_rng(7), 20))
    with pytest.raises(StateError, match="holds 4 cases, this fold has 5"):
        HardnessWeightedSampler(5, beta=1.0).load_state_dict(state)


def test_sampler_refuses_bad_settings():
    with pytest.raises(ConfigError, match="beta"):
        HardnessWeightedSampler(3, beta=-1.0)
    with pytest.raises(ConfigError, match="at least one case"):
        HardnessWeightedSampler(0, beta=1.0)
    with pytest.raises(ValueError, match="out of range"):
        HardnessWeightedSampler(3, beta=1.0).update([3], [0.1])


def test_sampler_fed_by_the_loss():
    torch.manual_seed(6)
    loss = DeepSupervision(build_loss("dice_ce"))
    sampler = HardnessWeightedSampler(5, beta=10.0)
    cases = sampler.sample(np.random.default_rng(1), 2)
    t = torch.randint(0, 2, (2, 1, 8, 8))
    outs = [torch.randn(2, 2, 8, 8), torch.randn(2, 2, 4, 4), torch.randn(2, 2, 2, 2)]
    value, per = loss.with_per_sample(outs, t)
    sampler.update(cases, per)
    assert np.isfinite(sampler.losses).all()
    assert all(
        sampler.losses[c] == pytest.approx(per[i].item()) for i, c in enumerate(cases) if list(cases).count(c) == 1
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_half_precision_logits_are_scored_in_fp32(name):
    torch.manual_seed(8)
    x = torch.randn(2, 3, 4, 6, 6)
    t = torch.randint(0, 3, (2, 1, 4, 6, 6))
    loss = build_loss(name)
    reference = loss(x, t)
    low = loss(x.bfloat16(), t)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(reference.item(), abs=0.03)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv = torch.nn.Conv3d(3, 3, 1)
        y = conv(x)
        assert y.dtype == torch.bfloat16
        value = loss(y, t)
    assert value.dtype == torch.float32 and torch.isfinite(value)
