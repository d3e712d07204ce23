"""segpipe.augment: nnU-Net's recipe — firing probabilities, ranges, label integrity, geometry."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe.data import PatchSampler
from segpipe.data.augment import AugmentConfig, Augmenter, bg_contrast, is_dummy_2d, mirror
from segpipe.preprocessing import Cache, sample_locations

OFF = AugmentConfig.none()


def write_cache(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int = 6) -> Path:
    cache = Cache(root)
    for cid, (image, label) in cases.items():
        cache.write(
            cid,
            image.astype(np.float32),
            label.astype(np.uint8),
            {"shape_after_resample": list(label.shape), "class_locations": sample_locations(label, num_classes)},
        )
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    cases = {}
    for i in range(3):
        shape = (14, 16, 15)
        image = rng.normal(size=(2, *shape)).astype(np.float32)
        label = rng.choice(np.array([0, 2, 5], dtype=np.uint8), size=shape)  # non-consecutive classes
        cases[f"c{i}"] = (image, label)
    return write_cache(tmp_path_factory.mktemp("augcache"), cases)


def run(sampler: PatchSampler, aug: Augmenter, n: int, seed: int = 0) -> dict:
    return aug(sampler.sample(np.random.default_rng(seed), n, aug))


def test_each_transform_fires_at_its_probability(cache: Path) -> None:
    sampler = PatchSampler(cache, ["c0", "c1", "c2"], (6, 6, 6))
    aug = Augmenter((6, 6, 6))
    n = 2000
    out = run(sampler, aug, n)
    assert out["image"].shape == (n, 2, 6, 6, 6) and torch.isfinite(out["image"]).all()
    rates = aug.expected_rates()
    assert set(rates) == set(out["flags"]) and len(rates) == 12
    assert aug.stats["samples"] == n
    for name, p in rates.items():
        k = aug.stats[name]
        assert k == int(out["flags"][name].sum())
        assert abs(k - n * p) <= 3 * math.sqrt(n * p * (1 - p)), f"{name}: {k}/{n} fired, expected p={p}"


def test_nnunet_rules_from_patch_shape() -> None:
    assert not is_dummy_2d((40, 56, 40)) and is_dummy_2d((16, 160, 128)) and not is_dummy_2d((56, 40))
    assert Augmenter((40, 56, 40)).rotation == pytest.approx((-math.pi / 6, math.pi / 6))
    assert Augmenter((16, 160, 128)).rotation == pytest.approx((-math.pi, math.pi))
    assert Augmenter((56, 40)).rotation == pytest.approx((-math.pi, math.pi))
    assert Augmenter((96, 40)).rotation == pytest.approx((-math.pi / 12, math.pi / 12))
    # dummy 2-D: rotation and scaling stay in-plane (axis 0 untouched)
    draw = Augmenter((16, 160, 128), AugmentConfig(p_rotation=1, p_scaling=1)).draw_spatial(
        np.random.default_rng(0), 50
    )
    assert np.allclose(draw.matrix[:, 0], [1, 0, 0]) and np.allclose(draw.matrix[:, :, 0], [1, 0, 0])
    assert (draw.region[:, 0] == 16).all()


def test_bg_contrast_halves() -> None:
    v = bg_contrast(np.random.default_rng(0), 0.75, 1.25, size=20000)
    assert v.min() >= 0.75 and v.max() <= 1.25
    assert abs((v < 1).mean() - 0.5) < 0.02


@pytest.mark.parametrize("patch", [(8, 10, 9), (3, 12, 11), (10, 9)])
def test_labels_keep_their_class_set_under_rotation_and_scaling(cache: Path, patch: tuple[int, ...]) -> None:
    sampler = PatchSampler(cache, ["c0", "c1", "c2"], patch)
    aug = Augmenter(patch, OFF.with_(p_rotation=1.0, p_scaling=1.0))
    out = run(sampler, aug, 40)
    assert out["flags"]["rotation"].all() and out["flags"]["scaling"].all()
    assert out["image"].shape[2:] == patch and out["label"].shape == (40, 1, *patch)
    assert set(torch.unique(out["label"]).tolist()) <= {0, 2, 5}  # never an interpolated value
    assert out["label"].dtype == torch.uint8


def test_identity_transform_equals_plain_crop(cache: Path) -> None:
    """A rotation of 0° at scale 1 through the grid_sample path reproduces the crop: the region
    and the patch share their centre exactly, also for even sizes."""
    for patch in [(8, 10, 9), (7, 6), (4, 12, 11), (3, 12, 11)]:  # the last one is "dummy 2-D"
        sampler = PatchSampler(cache, ["c0", "c1"], patch)
        ident = Augmenter(patch, OFF.with_(p_rotation=1.0, rotation_deg=(0.0, 0.0), p_scaling=1.0, scaling=(1, 1)))
        plain = Augmenter(patch, OFF)
        a, b = run(sampler, ident, 6, seed=3), run(sampler, plain, 6, seed=3)
        assert a["flags"]["rotation"].all() and not b["flags"]["rotation"].any()
        assert torch.allclose(a["image"], b["image"], atol=1e-5) and torch.equal(a["label"], b["label"])


def test_in_plane_rotation_by_90_degrees_is_rot90(tmp_path: Path) -> None:
    image = np.random.default_rng(1).normal(size=(1, 3, 12, 12)).astype(np.float32)
    cdir = write_cache(tmp_path, {"sq": (image, (image[0] > 0).astype(np.uint8))}, num_classes=2)
    sampler = PatchSampler(cdir, ["sq"], (8, 8))
    rot = run(sampler, Augmenter((8, 8), OFF.with_(p_rotation=1.0, rotation_deg=(90.0, 90.0))), 4, seed=5)
    ref = run(sampler, Augmenter((8, 8), OFF), 4, seed=5)
    expected = torch.rot90(ref["image"], 1, dims=(2, 3))
    if not torch.allclose(rot["image"], expected, atol=1e-4):
        expected = torch.rot90(ref["image"], -1, dims=(2, 3))
    assert torch.allclose(rot["image"], expected, atol=1e-4)


def test_mirroring_is_its_own_inverse(cache: Path) -> None:
    x = torch.randn(2, 3, 4, 5, 6)
    for axes in [(0,), (1, 2), (0, 1, 2)]:
        assert torch.equal(mirror(mirror(x, axes), axes), x)
    sampler = PatchSampler(cache, ["c0"], (6, 7, 8))
    ref = run(sampler, Augmenter((6, 7, 8), OFF), 3, seed=2)
    out = run(sampler, Augmenter((6, 7, 8), OFF.with_(p_mirror=1.0)), 3, seed=2)
    assert torch.equal(mirror(out["image"], (0, 1, 2)), ref["image"])
    assert torch.equal(mirror(out["label"], (0, 1, 2)), ref["label"])


def _batch(x: torch.Tensor) -> dict:
    b = x.shape[0]
    return {
        "image": x.clone(),
        "label": torch.zeros((b, 1, *x.shape[2:]), dtype=torch.int16),
        "spatial_index": torch.zeros(0, dtype=torch.int64),
        "rotated": np.zeros(b, bool),
        "scaled": np.zeros(b, bool),
        "seed": 0,
    }


def test_intensity_transforms_keep_their_invariants() -> None:
    x = torch.randn(64, 2, 6, 7, 8) * 3 + 1
    dims = (2, 3, 4)
    con = Augmenter((6, 7, 8), OFF.with_(p_contrast=1.0))(_batch(x))["image"]
    assert (con.amin(dims) >= x.amin(dims) - 1e-5).all() and (con.amax(dims) <= x.amax(dims) + 1e-5).all()
    for p in ("p_gamma", "p_gamma_inverted"):
        g = Augmenter((6, 7, 8), OFF.with_(**{p: 1.0}))(_batch(x))["image"]
        assert torch.allclose(g.mean(dims), x.mean(dims), atol=1e-4)
        assert torch.allclose(g.std(dims), x.std(dims), rtol=1e-3)
        assert not torch.allclose(g, x)
    ratio = Augmenter((6, 7, 8), OFF.with_(p_brightness=1.0))(_batch(x))["image"] / x
    r = ratio.flatten(2)
    assert torch.allclose(r, r[..., :1].expand_as(r), rtol=1e-4)
    assert (r >= 0.75 - 1e-5).all() and (r <= 1.25 + 1e-5).all()
    noisy = Augmenter((6, 7, 8), OFF.with_(p_noise=1.0))(_batch(x))["image"] - x
    assert torch.allclose(noisy[:, 0], noisy[:, 1], atol=1e-5)  # one field shared by the channels (nnU-Net)
    assert 0 < float(noisy.flatten(1).std(1).max()) <= 0.1 * 1.3
    blur = Augmenter((6, 7, 8), OFF.with_(p_blur=1.0))(_batch(x))["image"]
    changed = ~torch.isclose(blur, x).flatten(2).all(2)
    assert 0.3 < float(changed.float().mean()) < 0.7  # per channel p 0.5
    assert torch.allclose(blur.mean(dims), x.mean(dims), atol=0.35)
    low = Augmenter((6, 7, 8), OFF.with_(p_lowres=1.0))(_batch(x))["image"]
    assert torch.isfinite(low).all()


def test_blur_matches_scipy_and_keeps_constants() -> None:
    from scipy.ndimage import gaussian_filter1d

    from segpipe.data.augment import gaussian_1d, kernel_size

    x = torch.randn(3, 9, 10, 11)
    sig = np.array([0.5, 0.8, 1.0])  # kernels of 3, 5 and 7 taps (batchgeneratorsv2's 6σ rule)
    assert [kernel_size(s) for s in sig] == [3, 5, 7]
    out = gaussian_1d(x, sig, 2)
    for i, s in enumerate(sig):  # torch's "reflect" padding is scipy's "mirror"
        ref = gaussian_filter1d(x[i].numpy().astype(np.float64), s, axis=1, mode="mirror", radius=kernel_size(s) // 2)
        assert np.allclose(out[i].numpy(), ref, atol=1e-5)
    c = torch.full((2, 5, 6, 7), 4.0)
    assert torch.allclose(gaussian_1d(c, np.array([0.7, 1.0]), 3), c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_same_parameters_on_gpu(cache: Path) -> None:
    sampler = PatchSampler(cache, ["c0", "c1"], (8, 10, 9))
    aug = Augmenter((8, 10, 9))
    raw = sampler.sample(np.random.default_rng(4), 16, aug)
    gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in raw.items()}
    cpu_out = aug({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in raw.items()})
    gpu_out = aug(gpu)
    assert gpu_out["image"].is_cuda
    assert all(np.array_equal(cpu_out["flags"][k], gpu_out["flags"][k]) for k in cpu_out["flags"])
    assert torch.equal(cpu_out["label"], gpu_out["label"].cpu())
