"""segpipe.data: nnU-Net's folds, splits files, patch sampling (oversampling, padding, 2-D, slabs),
the training stream and the LightningDataModule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HIPPOCAMPUS, SKIP_HOW

from segpipe.data import (
    PatchSampler,
    SegDataModule,
    TrainStream,
    finish_batch,
    fold_cases,
    load_or_create_splits,
    make_splits,
)
from segpipe.errors import DataError, StateError, UsageError
from segpipe.preprocessing import Cache, sample_locations


def write_cache(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int = 3) -> Path:
    """A preprocessing cache written through segpipe's Cache (only the properties the sampler reads)."""
    cache = Cache(root)
    for cid, (image, label) in cases.items():
        props = {
            "shape_after_resample": list(label.shape),
            "num_classes": num_classes,
            "class_locations": sample_locations(label, num_classes),
        }
        cache.write(cid, image.astype(np.float32), label.astype(np.uint8), props)
    return root


def blob_case(seed: int, shape: tuple[int, int, int], *, foreground: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    if foreground:  # two small structures far from each other: a random patch often misses both
        c = [int(rng.integers(2, s - 3)) for s in shape]
        label[c[0] - 1 : c[0] + 2, c[1] - 1 : c[1] + 2, c[2] - 1 : c[2] + 2] = 1
        label[0:2, 0:2, shape[2] - 2 :] = 2
    return image, label


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cases = {f"case_{i}": blob_case(i, (24 + i, 40, 36)) for i in range(5)}
    return write_cache(tmp_path_factory.mktemp("cache"), cases)


# ---------------------------------------------------------------------------- splits
def _sklearn_folds(ids: list[str], n_folds: int = 5, seed: int = 12345) -> list[dict[str, list[str]]]:
    from sklearn.model_selection import KFold

    keys = np.sort(np.asarray(ids))  # nnU-Net: KFold over the sorted identifiers
    out = []
    for tr, va in KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(keys):
        out.append({"train": list(keys[tr]), "val": list(keys[va])})
    return out


@pytest.mark.parametrize("n", [5, 7, 13, 52, 208])
def test_make_splits_equals_sklearn_kfold(n: int) -> None:
    ids = [f"c{i:04d}" for i in np.random.default_rng(n).permutation(n)]  # unsorted input
    assert make_splits(ids) == _sklearn_folds(ids)


@pytest.mark.realdata
def test_hippocampus_fold0_equals_nnunet() -> None:
    if not (HIPPOCAMPUS / "imagesTr").is_dir():
        pytest.skip(f"real data not found at {HIPPOCAMPUS}: {SKIP_HOW}")
    ids = sorted(p.name[: -len(".nii.gz")] for p in (HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))
    assert len(ids) == 208
    splits = make_splits(ids)
    assert splits[0] == _sklearn_folds(ids)[0]
    assert [len(s["val"]) for s in splits] == [42, 42, 42, 41, 41]
    assert sorted(c for s in splits for c in s["val"]) == ids


def test_splits_file_created_atomically_then_honoured(tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(9)]
    path = tmp_path / "sub" / "splits_final.json"
    assert load_or_create_splits(path, ids) == make_splits(ids)
    assert json.loads(path.read_text()) == make_splits(ids)
    assert [p.name for p in path.parent.iterdir()] == ["splits_final.json"]  # no temp files left
    custom = [{"train": ids[:6], "val": ids[6:]}, {"train": ids[3:], "val": ids[:3]}]
    path.write_text(json.dumps(custom))
    assert load_or_create_splits(path, ids) == custom  # an existing file wins


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "unreadable"),
        ("{}", "non-empty list"),
        ("[]", "non-empty list"),
        ('[{"train": ["c1"]}]', "exactly the keys"),
        ('[{"train": "c1", "val": []}]', "list of case ids"),
        ('[{"train": [], "val": ["c1"]}]', "no training cases"),
        ('[{"train": ["c1", "nope"], "val": ["c2"]}]', "nope"),
    ],
)
def test_bad_splits_file_is_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "splits_final.json"
    path.write_text(content)
    with pytest.raises(StateError, match=message) as e:
        load_or_create_splits(path, ["c1", "c2", "c3"])
    assert "splits_final.json" in str(e.value)


def test_fold_cases_and_errors() -> None:
    ids = [f"c{i}" for i in range(10)]
    splits = make_splits(ids)
    tr, va = fold_cases(splits, 2)
    assert sorted(tr + va) == ids and not set(tr) & set(va)
    assert fold_cases(splits, "all") == (ids, ids)
    with pytest.raises(UsageError, match="0, 1, 2, 3, 4, all"):
        fold_cases(splits, 5)
    with pytest.raises(UsageError):
        fold_cases(splits, "x")
    with pytest.raises(DataError):
        make_splits(ids[:3])


# ---------------------------------------------------------------------------- sampling
def test_forced_foreground_share_follows_nnunet() -> None:
    s = PatchSampler.__new__(PatchSampler)
    s.oversample_foreground = 0.33
    for bs, forced in [(2, 1), (3, 1), (7, 2), (12, 4)]:  # bs - round(bs * 0.67)
        f = s.forced(bs)
        assert f.sum() == forced and f[-forced:].all()


def test_foreground_fraction_over_many_batches(cache: Path) -> None:
    ids = [f"case_{i}" for i in range(5)]
    sampler = PatchSampler(cache, ids, (12, 12, 12))
    bs, n_batches = 3, 300
    rng = np.random.default_rng(0)
    has_fg = np.zeros((n_batches, bs), dtype=bool)
    for k in range(n_batches):
        lab = finish_batch(sampler.sample(rng, bs), None)["label"]
        has_fg[k] = (lab > 0).flatten(1).any(1).numpy()
    assert has_fg[:, -1].all()  # the forced sample always holds foreground
    assert has_fg.mean() >= 1 / 3
    assert has_fg[:, :-1].mean() < 0.9  # the free ones are not forced (small blobs are often missed)


def test_case_without_foreground_falls_back_to_random(tmp_path: Path) -> None:
    cdir = write_cache(tmp_path, {"empty": blob_case(0, (10, 10, 10), foreground=False)})
    out = finish_batch(PatchSampler(cdir, ["empty"], (8, 8, 8)).sample(np.random.default_rng(0), 3), None)
    assert out["image"].shape == (3, 1, 8, 8, 8) and int(out["label"].max()) == 0


def test_padding_when_case_is_smaller_than_patch(tmp_path: Path) -> None:
    image = np.arange(1, 1 + 4 * 5 * 6, dtype=np.float32).reshape(1, 4, 5, 6)
    label = np.ones((4, 5, 6), dtype=np.uint8)
    cdir = write_cache(tmp_path, {"small": (image, label)})
    sampler = PatchSampler(cdir, ["small"], (8, 9, 10), image_pad=-7.0, label_pad=0)
    for seed in range(5):
        out = finish_batch(sampler.sample(np.random.default_rng(seed), 2), None)
        img, lab = out["image"], out["label"]
        assert img.shape == (2, 1, 8, 9, 10) and lab.shape == (2, 1, 8, 9, 10)
        for b in range(2):  # the whole case is inside, centred ± 1, padding everywhere else
            inside = img[b, 0] != -7.0
            assert int(inside.sum()) == image.size
            assert torch.equal(inside, lab[b, 0] == 1)
            assert sorted(img[b, 0][inside].tolist()) == sorted(image.ravel().tolist())
            lo = [int(torch.nonzero(inside)[:, a].min()) for a in range(3)]
            assert all(abs(lo_a - (p - s) / 2) <= 1 for lo_a, p, s in zip(lo, (8, 9, 10), (4, 5, 6)))
    # a negative label padding (an "ignore" value) switches the compact label type to int16
    ignore = PatchSampler(cdir, ["small"], (8, 9, 10), label_pad=-1)
    lab = finish_batch(ignore.sample(np.random.default_rng(0), 1), None)["label"]
    assert lab.dtype == torch.int16 and set(torch.unique(lab).tolist()) == {-1, 1}


def test_2d_and_slab_samples(tmp_path: Path) -> None:
    z, y, x = 6, 12, 14
    image = np.broadcast_to(np.arange(1, z + 1, dtype=np.float32)[:, None, None], (z, y, x))[None].copy()
    label = np.broadcast_to((np.arange(z) % 3).astype(np.uint8)[:, None, None], (z, y, x)).copy()
    cdir = write_cache(tmp_path, {"c": (image, label)})
    s2d = PatchSampler(cdir, ["c"], (8, 10))
    out = finish_batch(s2d.sample(np.random.default_rng(0), 4), None)
    assert out["image"].shape == (4, 1, 8, 10) and out["label"].shape == (4, 1, 8, 10)
    for b in range(4):  # one slice: constant image, its label matches the slice index
        zi = int(out["image"][b, 0, 0, 0]) - 1
        assert torch.all(out["image"][b] == zi + 1) and torch.all(out["label"][b] == zi % 3)

    slab = PatchSampler(cdir, ["c"], (8, 10), context_slices=2)
    out = finish_batch(slab.sample(np.random.default_rng(1), 16), None)
    assert out["image"].shape == (16, 5, 8, 10) and out["label"].shape == (16, 1, 8, 10)
    for b in range(16):
        zc = int(out["centre"][b, 0])
        expect = [float(k + 1) if 0 <= k < z else 0.0 for k in range(zc - 2, zc + 3)]  # zero outside
        assert out["image"][b, :, 0, 0].tolist() == expect
        assert torch.all(out["label"][b] == zc % 3)
    with pytest.raises(UsageError):
        PatchSampler(cdir, ["c"], (4, 8, 10), context_slices=1)


def test_sampler_pickles_without_arrays(cache: Path) -> None:
    import pickle

    s = PatchSampler(cache, ["case_0"], (8, 8, 8))
    s.sample(np.random.default_rng(0), 2)
    assert s._arrays and not pickle.loads(pickle.dumps(s))._arrays
    with pytest.raises(StateError, match="not in the cache"):
        PatchSampler(cache, ["missing"], (8, 8, 8))


# ---------------------------------------------------------------------------- stream and data module
def _first(loader: torch.utils.data.DataLoader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_datamodule_shapes_and_determinism(cache: Path) -> None:
    ids = [f"case_{i}" for i in range(5)]
    kw = dict(patch_size=(12, 16, 12), batch_size=3, num_workers=0, seed=7, num_val_batches=4)
    dm1, dm2 = SegDataModule(cache, ids[:4], ids[4:], **kw), SegDataModule(cache, ids[:4], ids[4:], **kw)
    a, b = _first(dm1.train_dataloader(), 3), _first(dm2.train_dataloader(), 3)
    for x, y in zip(a, b):
        assert x["image"].shape == (3, 1, 12, 16, 12) and x["image"].dtype == torch.float32
        assert x["label"].shape == (3, 1, 12, 16, 12) and x["label"].dtype == torch.uint8
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    # a second epoch continues the stream rather than repeating it
    again = _first(dm1.train_dataloader(), 1)[0]
    assert not torch.equal(again["image"], a[0]["image"])
    v1, v2 = list(dm1.val_dataloader()), list(dm1.val_dataloader())
    assert len(v1) == 4 and set(v1[0]["case"]) == {"case_4"}
    assert all(torch.equal(p["image"], q["image"]) for p, q in zip(v1, v2))  # fixed validation patches


def test_datamodule_2d_slab_and_for_fold(cache: Path, tmp_path: Path) -> None:
    dm = SegDataModule.for_fold(
        cache, tmp_path / "splits_final.json", 0, patch_size=(16, 12), batch_size=2, context_slices=1, num_workers=0
    )
    assert (tmp_path / "splits_final.json").is_file() and len(dm.val_cases) == 1
    batch = _first(dm.train_dataloader(), 1)[0]
    assert batch["image"].shape == (2, 3, 16, 12) and batch["label"].shape == (2, 1, 16, 12)


def test_worker_stream_is_deterministic(cache: Path) -> None:
    ids = [f"case_{i}" for i in range(5)]
    kw = dict(patch_size=(12, 16, 12), batch_size=2, num_workers=2, seed=3)
    a = _first(SegDataModule(cache, ids, ids, **kw).train_dataloader(), 4)
    b = _first(SegDataModule(cache, ids, ids, **kw).train_dataloader(), 4)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["image"], a[1]["image"])  # two workers, two different streams


def test_device_augmentation_path_matches_worker_path(cache: Path) -> None:
    from segpipe.data.augment import Augmenter

    sampler = PatchSampler(cache, ["case_0", "case_1"], (10, 12, 10))
    aug = Augmenter((10, 12, 10))
    raw = next(iter(TrainStream(sampler, 4, aug, seed=1, augment_in_worker=False)))
    cooked = next(iter(TrainStream(sampler, 4, aug, seed=1)))
    assert "region_image" in raw and "region_image" not in cooked
    done = finish_batch(raw, aug)
    assert torch.allclose(done["image"], cooked["image"]) and torch.equal(done["label"], cooked["label"])


def _images(batches) -> list[torch.Tensor]:
    return [b["image"] for b in batches]


def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(_images(a), _images(b)))


def test_stream_is_the_same_for_any_number_of_workers(cache: Path) -> None:
    ids = [f"case_{i}" for i in range(5)]
    kw = dict(patch_size=(12, 16, 12), batch_size=2, seed=3)
    serial = _first(SegDataModule(cache, ids, ids, num_workers=0, **kw).train_dataloader(), 5)
    workers = _first(SegDataModule(cache, ids, ids, num_workers=2, **kw).train_dataloader(), 5)
    assert _same_batches(serial, workers)


def test_stream_resumes_inside_an_epoch_with_the_same_batches(cache: Path) -> None:
    sampler = PatchSampler(cache, [f"case_{i}" for i in range(4)], (10, 12, 10))
    whole = TrainStream(sampler, 2, None, seed=5)
    it = iter(whole)
    epoch0 = [next(it) for _ in range(6)]
    it = iter(whole)
    epoch1 = [next(it) for _ in range(3)]
    # interrupted after 4 of epoch 0's 6 batches: the resumed stream gives batches 4 and 5, ends the
    # epoch there, and the next epoch is epoch 1 as drawn without the interruption
    resumed = TrainStream(sampler, 2, None, seed=5)
    resumed.resume_at(0, 4, 6)
    assert _same_batches(list(resumed), epoch0[4:])
    it = iter(resumed)
    assert _same_batches([next(it) for _ in range(3)], epoch1)
    # another process of a distributed run draws other batches
    other = TrainStream(sampler, 2, None, seed=5, rank=1)
    assert not torch.equal(next(iter(other))["image"], epoch0[0]["image"])


def test_validation_patches_are_shared_out_between_processes(cache: Path) -> None:
    from segpipe.data.datamodule import ValidationPatches

    sampler = PatchSampler(cache, ["case_0", "case_1"], (10, 12, 10))
    one = ValidationPatches(sampler, 2, 5, seed=1)
    parts = [ValidationPatches(sampler, 2, 5, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert (len(one), len(parts[0]), len(parts[1])) == (5, 3, 2)
    shared = [parts[j % 2][j // 2] for j in range(5)]
    assert _same_batches(shared, [one[j] for j in range(5)])
    with pytest.raises(IndexError):
        parts[1][2]


def test_case_probabilities_steer_the_draw(cache: Path) -> None:
    sampler = PatchSampler(cache, [f"case_{i}" for i in range(4)], (10, 12, 10))
    rng = np.random.default_rng(0)
    assert len(set(sampler.draw(rng, 64)[0].tolist())) == 4  # uniform: every case comes up
    sampler.case_probabilities = np.array([0.0, 0.0, 1.0, 0.0])
    assert set(sampler.draw(rng, 64)[0].tolist()) == {2}
