"""Sliding-window prediction: nnU-Net's window grid and Gaussian, exact results for pointwise and whole-image
networks, MONAI's inferer on the same grid and weights, 2-D slices, 2.5-D slabs, deep supervision, plan glue."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from segpipe.errors import ConfigError, DataError
from segpipe.inference import (
    FLOAT16_WEIGHT_FLOOR,
    SlidingWindowPredictor,
    gaussian_importance_map,
    predict_case_logits,
    sliding_window_inference,
    window_starts,
)
from segpipe.inference.windows import FIT_MAX_VOXELS, case_window, fitted_window, network_divisor
from segpipe.planning import PlanConfig

torch.set_num_threads(1)


def conv(dims: int, cin: int, cout: int, kernel: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = (nn.Conv3d if dims == 3 else nn.Conv2d)(cin, cout, kernel, padding=kernel // 2)
    return layer.eval()


# ---------------------------------------------------------------------------- window grid and weights
def test_window_starts_match_nnunet_by_hand():
    assert window_starts([110], [64], 0.5) == [[0, 23, 46]]  # nnU-Net's own example
    assert window_starts([16, 8], [8, 8]) == [[0, 4, 8], [0]]
    # 20 - 8 = 12 over ceil(12 / 4) = 3 steps of 4: 0, 4, 8, 12
    assert window_starts([20], [8], 0.5) == [[0, 4, 8, 12]]
    # 13 - 8 = 5 over ceil(5 / 4) = 2 steps of 2.5: 0, round(2.5) = 2 (to even, as np.round), 5
    assert window_starts([13], [8], 0.5) == [[0, 2, 5]]
    # no overlap: steps of a whole patch, the last window shifted back to end at the edge
    assert window_starts([20], [8], 0.0) == [[0, 6, 12]]
    with pytest.raises(ConfigError, match="overlap"):
        window_starts([20], [8], 1.0)
    with pytest.raises(ConfigError, match="smaller than the patch"):
        window_starts([4], [8])


def test_gaussian_matches_scipy_gaussian_filter_of_an_impulse():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    for patch in [(9, 16, 7), (40, 56, 40), (5, 1, 3)]:
        impulse = np.zeros(patch)
        impulse[tuple(p // 2 for p in patch)] = 1
        ref = scipy_ndimage.gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
        ref = ref / ref.max() * 10
        ref[ref == 0] = ref[ref > 0].min()
        got = gaussian_importance_map(patch)
        assert got.dtype == torch.float32 and got.shape == patch
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-30)
        assert float(got.max()) == pytest.approx(10.0)


def test_gaussian_has_no_zero_in_float16():
    g = gaussian_importance_map((40, 56, 40), dtype=torch.float16)
    assert g.dtype == torch.float16
    assert bool((g > 0).all())  # the 3-D corner (~4e-10) underflows float16 and is raised to its smallest value


# ---------------------------------------------------------------------------- exact results
@pytest.mark.parametrize("shape", [(2, 10, 20, 17), (2, 5, 6, 7)])  # the second is smaller than the patch
def test_pointwise_network_equals_whole_image(shape):
    torch.manual_seed(1)
    image = torch.randn(shape)
    net = conv(3, 2, 3, 1)
    with torch.no_grad():
        ref = net(image[None])[0]
    out = sliding_window_inference(image, net, (8, 8, 8), batch_size=3)
    assert out.dtype == torch.float32 and out.shape == (3, *shape[1:])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_constant_predictor_gives_constant_logits():
    image = torch.randn(1, 13, 11, 20)
    const = torch.tensor([1.5, -2.0, 0.25])

    def predictor(x: torch.Tensor) -> torch.Tensor:
        return const.view(1, 3, 1, 1, 1).expand(x.shape[0], 3, *x.shape[2:]).clone()

    out = sliding_window_inference(image, predictor, (8, 6, 8), overlap=0.5, batch_size=2)
    torch.testing.assert_close(out, const.view(3, 1, 1, 1).expand_as(out).contiguous())


def test_single_window_with_padding_equals_zero_padded_convolution():
    """An image smaller than the patch: padded with zeros (half on each side), one window, cropped back."""
    torch.manual_seed(2)
    image = torch.randn(1, 5, 6, 3)
    net = conv(3, 1, 2, 3)
    pad = (2, 3, 1, 1, 1, 2)  # X: 8 - 3 = 5 → 2 | 3; Y: 8 - 6 → 1 | 1; Z: 8 - 5 → 1 | 2
    with torch.no_grad():
        ref = net(F.pad(image, pad)[None])[0][:, 1:6, 1:7, 2:5]
    out = sliding_window_inference(image, net, (8, 8, 8))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_same_as_monai_on_the_same_grid_and_weights():
    """With a 3×3×3 convolution (not pointwise: windows disagree near their borders, so the blend
    matters) on a grid where MONAI's and nnU-Net's positions coincide, MONAI's inferer given the same
    importance map gives the same logits."""
    from monai.inferers import sliding_window_inference as monai_swi

    torch.manual_seed(3)
    image = torch.randn(2, 16, 12, 20)
    patch = (8, 8, 8)
    net = conv(3, 2, 3, 3)
    assert window_starts(image.shape[1:], patch) == [[0, 4, 8], [0, 4], [0, 4, 8, 12]]  # MONAI's too
    ours = sliding_window_inference(image, net, patch, overlap=0.5, batch_size=5)
    with torch.no_grad():
        ref = monai_swi(
            image[None], patch, 4, net, overlap=0.5, mode="gaussian", roi_weight_map=gaussian_importance_map(patch)
        )[0]
        whole = net(image[None])[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    # the blend is not trivial: near window borders it differs from the whole-image convolution ...
    assert float((ours - whole).abs().max()) > 1e-3
    # ... while voxels one away from every window border of every window covering them agree
    torch.testing.assert_close(ours[:, 1:3, 1:3, 1:3], whole[:, 1:3, 1:3, 1:3], rtol=1e-5, atol=1e-5)


def test_batch_size_does_not_change_the_result():
    torch.manual_seed(4)
    image = torch.randn(1, 12, 14, 10)
    net = conv(3, 1, 2, 3)
    one = sliding_window_inference(image, net, (8, 8, 8), batch_size=1)
    many = sliding_window_inference(image, net, (8, 8, 8), batch_size=7)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)


def test_float16_sums_keep_precision_with_the_floored_map():
    """float16 sums use a Gaussian floored at 2^-10 (nnU-Net's exact map leaves the image's corners to
    products below float16's range): the same as float32 sums with that map, and as the exact map where
    windows blend with normal weights."""
    torch.manual_seed(4)
    image = torch.randn(1, 12, 14, 10)
    net = conv(3, 1, 2, 3)
    patch = (8, 8, 8)
    half = sliding_window_inference(image, net, patch, accumulate_dtype=torch.float16)
    assert half.dtype == torch.float32
    floored = sliding_window_inference(image, net, patch, weight_floor=FLOAT16_WEIGHT_FLOOR)
    torch.testing.assert_close(half, floored, rtol=1e-2, atol=1e-2)
    exact = sliding_window_inference(image, net, patch)
    covered = torch.zeros(image.shape[1:])  # the largest weight any window gives each voxel
    g = gaussian_importance_map(patch)
    for z in window_starts(image.shape[1:], patch)[0]:
        for y in window_starts(image.shape[1:], patch)[1]:
            for x in window_starts(image.shape[1:], patch)[2]:
                box = covered[z : z + 8, y : y + 8, x : x + 8]
                torch.maximum(box, g, out=box)
    normal = covered > 1.0  # a tenth of the maximum: floored weights (≤ 2^-10) shift the blend < 0.1 %
    assert 0.1 < float(normal.float().mean()) < 1
    torch.testing.assert_close(half[:, normal], exact[:, normal], rtol=1e-2, atol=1e-2)
    # without the floor, float16 sums lose the corners (what the floor is for)
    raw = sliding_window_inference(image, net, patch, accumulate_dtype=torch.float16, weight_floor=0)
    assert float((raw - exact).abs().max()) > 0.05


# ---------------------------------------------------------------------------- 2-D, 2.5-D
def test_2d_image():
    torch.manual_seed(5)
    image = torch.randn(2, 20, 13)
    net = conv(2, 2, 3, 1)
    with torch.no_grad():
        ref = net(image[None])[0]
    out = sliding_window_inference(image, net, (8, 8))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_2d_network_runs_slice_by_slice_on_a_volume():
    torch.manual_seed(6)
    image = torch.randn(2, 4, 8, 6)
    net = conv(2, 2, 3, 3)  # in-plane patch = image size: one window per slice, exact
    with torch.no_grad():
        ref = torch.stack([net(image[:, z][None])[0] for z in range(4)], dim=1)
    out = sliding_window_inference(image, net, (8, 6), batch_size=3)  # batches span slices
    assert out.shape == (3, 4, 8, 6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_slab_channels_are_channel_major_neighbouring_slices_with_zeros_beyond():
    """context_slices=1, 2 channels: input channel c·3 + j is channel c of slice z − 1 + j (as PatchSampler)."""
    image = torch.arange(2 * 4 * 3 * 5, dtype=torch.float32).reshape(2, 4, 3, 5) + 1
    seen: list[int] = []

    def pick(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[1])
        # outputs: channel 0 of slice z−1, channel 1 of slice z+1, channel 0 of slice z
        return torch.stack([x[:, 0], x[:, 5], x[:, 1]], dim=1)

    out = sliding_window_inference(image, pick, (3, 5), context_slices=1, batch_size=2)
    assert set(seen) == {6}
    zeros = torch.zeros(1, 3, 5)
    torch.testing.assert_close(out[0], torch.cat([zeros, image[0, :-1]]))
    torch.testing.assert_close(out[1], torch.cat([image[1, 1:], zeros]))
    torch.testing.assert_close(out[2], image[0])


# ---------------------------------------------------------------------------- networks
class DeepSupervised(nn.Module):
    """Like segpipe's networks: a list in training mode, one tensor in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv3d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.head(x)
        return [out, out[:, :, ::2, ::2, ::2]] if self.training else out


def test_network_in_training_mode_is_run_in_eval_mode_and_restored():
    torch.manual_seed(7)
    net = DeepSupervised().train()
    image = torch.randn(1, 8, 8, 8)
    out = sliding_window_inference(image, net, (8, 8, 8))
    assert net.training  # restored
    with torch.no_grad():
        torch.testing.assert_close(out, net.eval()(image[None])[0])

    # a plain callable returning a list: its first (full-resolution) entry is used
    lst = sliding_window_inference(image, lambda x: [net(x), net(x)[:, :, ::2]], (8, 8, 8))
    torch.testing.assert_close(lst, out)


def test_predict_case_logits_with_segpipe_networks_from_a_plan():
    from segpipe.networks import build_network

    cfg3 = PlanConfig(
        name="3d_fullres",
        architecture="unet",
        dims=3,
        spacing=[1.0, 1.0, 1.0],
        median_shape=[10, 12, 9],
        patch_size=[8, 8, 8],
        batch_size=2,
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        kernel_sizes=[[3, 3, 3]] * 3,
        features=[4, 8, 8],
        n_conv_encoder=[1, 1, 1],
        n_conv_decoder=[1, 1],
    )
    torch.manual_seed(8)
    net = build_network(cfg3, 1, 3).train()
    image = np.random.default_rng(0).standard_normal((1, 10, 12, 9)).astype(np.float32)
    out = predict_case_logits(net, image, cfg3)
    assert out.shape == (3, 10, 12, 9) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert net.training

    cfg25 = PlanConfig.from_dict(
        {
            **cfg3.to_dict(),
            "name": "2.5d",
            "architecture": "unet25d",
            "dims": 2,
            "patch_size": [8, 8],
            "strides": [[1, 1], [2, 2], [2, 2]],
            "kernel_sizes": [[3, 3]] * 3,
            "context_slices": 1,
        }
    )
    net2 = build_network(cfg25, 1, 3)
    seen: list[tuple[int, ...]] = []
    net2.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[1:])))
    out2 = predict_case_logits(net2, image, cfg25, batch_size=4)
    assert out2.shape == (3, 10, 12, 9)
    assert set(seen) == {(3, 8, 8)}  # 3 slices as channels, 2-D windows
    assert "context_slices=1" in repr(SlidingWindowPredictor.from_plan(net2, cfg25))


def test_progress_callback_counts_windows():
    calls: list[tuple[int, int]] = []
    image = torch.zeros(1, 16, 8, 8)
    sliding_window_inference(
        image, lambda x: x, (8, 8, 8), batch_size=2, progress=lambda done, total: calls.append((done, total))
    )
    assert calls == [(2, 3), (3, 3)]


def test_errors_name_the_problem():
    image = torch.zeros(1, 8, 8, 8)
    with pytest.raises(ConfigError, match="does not fit"):
        sliding_window_inference(image, lambda x: x, (8, 8, 8, 8))
    with pytest.raises(ConfigError, match="context_slices"):
        sliding_window_inference(image, lambda x: x, (8, 8, 8), context_slices=1)
    with pytest.raises(DataError, match=r"\[C, Y, X\]"):
        sliding_window_inference(torch.zeros(8, 8), lambda x: x, (8, 8))
    with pytest.raises(ConfigError, match="keep the patch size"):
        sliding_window_inference(image, lambda x: x[:, :, ::2], (8, 8, 8))
    with pytest.raises(DataError, match="Z, Y, X"):
        predict_case_logits(lambda x: x, torch.zeros(1, 8, 8), {"name": "2d", "patch_size": [8, 8]})


# ---------------------------------------------------------------------------- window=fit
def test_network_divisor_is_the_product_of_the_strides_per_axis():
    assert network_divisor([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 1]]) == (4, 8, 4)
    assert network_divisor([[1, 1], [2, 2]]) == (2, 2)


@pytest.mark.parametrize(
    "size,expected",
    [
        ((35, 51, 34), (40, 56, 40)),  # rounded up to the divisor: the patch itself
        ((30, 44, 28), (32, 48, 32)),  # smaller on every axis
        ((44, 58, 33), (48, 64, 40)),  # a few voxels longer on two axes: one grown window, not four
        ((51, 56, 40), (40, 56, 40)),  # 51 > 40 × 1.25: the patch slides
        ((80, 200, 7), (40, 56, 8)),  # far larger axes slide the patch; a thin one is 8, not 40
        ((40, 56, 40), (40, 56, 40)),
    ],
)
def test_fitted_window_by_hand(size, expected):
    assert fitted_window(size, (40, 56, 40), (8, 8, 8)) == expected


def test_fitted_window_grows_the_least_grown_axes_first_within_the_voxel_bound():
    patch, divisor = (40, 40, 40), (8, 8, 8)
    # every axis 48 (1.2 patches each, 1.73 in all): only two may grow within 1.5 patches of voxels
    window = fitted_window((48, 48, 48), patch, divisor)
    assert sorted(window) == [40, 48, 48] and np.prod(window) <= FIT_MAX_VOXELS * np.prod(patch)
    # 41 on axis 2 rounds to 48 as well, 45 on axis 0 too: equal growth, the lower axis wins the tie
    assert fitted_window((45, 47, 41), patch, divisor) == (48, 48, 40)
    assert fitted_window((48, 48, 48), patch, divisor, max_voxels=1.0) == patch


def test_case_window_fits_the_in_plane_axes_of_2d_patches_and_pads_by_default():
    assert case_window((120, 30, 70), (32, 64), (4, 4), "fit") == (32, 72)
    assert case_window((120, 30, 70), (32, 64), (4, 4), "pad") == (32, 64)
    with pytest.raises(ConfigError, match="window=fit or window=pad"):
        case_window((8, 8, 8), (8, 8, 8), (2, 2, 2), "shrink")
    with pytest.raises(ConfigError, match="divisor"):
        SlidingWindowPredictor(lambda x: x, (8, 8, 8), window="fit")


def test_fit_gives_a_pointwise_network_the_same_logits_with_fewer_voxels():
    net = conv(3, 2, 3, 1)
    seen: list[tuple[int, ...]] = []
    net.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    image = torch.randn(2, 19, 29, 35, generator=torch.Generator().manual_seed(3))
    pad = SlidingWindowPredictor(net, (16, 32, 32), batch_size=1)
    fit = SlidingWindowPredictor(net, (16, 32, 32), batch_size=1, window="fit", divisor=(4, 4, 4))
    expected = pad(image)
    pad_windows, seen[:] = list(seen), []
    got = fit(image)
    assert torch.allclose(got, expected, atol=1e-5)
    assert pad_windows == [(1, 2, 16, 32, 32)] * 4  # 19 > 16 and 35 > 32: four patches
    assert seen == [(1, 2, 20, 32, 36)]  # one window of the image rounded up to 4
    assert fit.window_size((19, 29, 35)) == (20, 32, 36)


def test_fit_with_a_segpipe_network_answers_on_the_image_grid():
    from segpipe.networks import build_network

    cfg = PlanConfig(
        name="3d_fullres",
        architecture="unet",
        dims=3,
        spacing=[1.0, 1.0, 1.0],
        median_shape=[10, 12, 9],
        patch_size=[16, 16, 16],
        batch_size=2,
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        kernel_sizes=[[3, 3, 3]] * 3,
        features=[4, 8, 8],
        n_conv_encoder=[1, 1, 1],
        n_conv_decoder=[1, 1],
    )
    torch.manual_seed(8)
    net = build_network(cfg, 1, 3).eval()
    seen: list[tuple[int, ...]] = []
    net.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[2:])))
    image = np.random.default_rng(0).standard_normal((1, 10, 18, 9)).astype(np.float32)
    out = predict_case_logits(net, image, cfg, window="fit")
    assert out.shape == (3, 10, 18, 9) and bool(torch.isfinite(out).all())
    assert seen == [(12, 20, 12)]  # the divisor is 4: 10 → 12, 18 → 20 (grown), 9 → 12


# ---------------------------------------------------------------------------- rolling sums and sinks
@pytest.mark.parametrize(
    "shape, patch, overlap",
    [((2, 23, 13, 11), (8, 8, 8), 0.5), ((2, 5, 13, 11), (8, 8, 8), 0.5), ((2, 17, 9, 12), (6, 5, 4), 0.0)],
)
def test_sink_receives_every_row_once_in_order_equal_to_the_returned_logits(shape, patch, overlap):
    """The rolling sums (one patch depth of rows) hand each row over once, in order, and the rows are
    exactly the logits of the whole-image call: padding removed, overlap blended, weights divided."""
    torch.manual_seed(3)
    image = torch.randn(shape)
    net = conv(3, 2, 3, 3, seed=1)
    whole = sliding_window_inference(image, net, patch, overlap=overlap, batch_size=3)
    calls: list[int] = []
    seen: list[tuple[int, int, int]] = []  # (first row, rows, forward passes so far)
    blocks: dict[int, torch.Tensor] = {}

    def counting(batch):
        calls.append(1)
        return net(batch)

    def sink(row, block):
        seen.append((row, block.shape[1], len(calls)))
        assert block.dtype == torch.float32 and tuple(block.shape[2:]) == tuple(shape[2:])
        for i in range(block.shape[1]):
            blocks[row + i] = block[:, i].clone()

    assert sliding_window_inference(image, counting, patch, overlap=overlap, batch_size=1, sink=sink) is None
    rows = [r for r, n, _ in seen for r in range(r, r + n)]
    assert rows == list(range(shape[1]))  # each row once, in order
    got = torch.stack([blocks[r] for r in range(shape[1])], dim=1)
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6)
    if shape[1] > 2 * patch[0]:  # rows were handed over while windows further down were still to come
        assert seen[0][2] < len(calls)


def test_sink_on_2d_slices_hands_over_each_slice_after_its_windows():
    torch.manual_seed(4)
    image = torch.randn(1, 6, 12, 10)
    net = conv(2, 3, 2, 3)  # a 2.5-D slab of 3 slices in, 2 classes out
    whole = sliding_window_inference(image, net, (8, 8), context_slices=1, batch_size=2)
    got: dict[int, torch.Tensor] = {}
    sliding_window_inference(
        image, net, (8, 8), context_slices=1, batch_size=2, sink=lambda r, b: got.update({r: b[:, 0].clone()})
    )
    assert sorted(got) == list(range(6))
    torch.testing.assert_close(torch.stack([got[r] for r in range(6)], dim=1), whole)
