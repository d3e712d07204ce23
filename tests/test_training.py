"""Training: optimizers, the poly schedule, durations, the wall-clock budget, checkpoints with
every RNG state, the LightningModule and fit with exact resume."""

from __future__ import annotations

import json
import math
import os
import random
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe.errors import ConfigError, StateError
from segpipe.planning import PlanConfig
from segpipe.training import (
    CHECKPOINT_FORMAT,
    PolyLR,
    build_optimizer,
    build_scheduler,
    capture_rng,
    fit_budget,
    load_checkpoint,
    optim_settings,
    parse_duration,
    poly_factor,
    restore_rng,
    save_checkpoint,
)
from segpipe.training.fit import fit, train_settings
from segpipe.training.module import SegmentationModule, confusion_counts, dice_from_counts


# ============================================================================ optimizers
def test_sgd_defaults_are_nnunet() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p])
    assert isinstance(opt, torch.optim.SGD)
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.01, 0.99, True, 3e-5)


def test_adamw_option_and_overrides() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p], optim_settings("adamw", lr=0.002, weight_decay=0.0))
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["betas"]) == (0.002, 0.0, (0.9, 0.999))
    assert build_optimizer([p], name="sgd", lr=None).param_groups[0]["lr"] == 0.01  # None keeps the default


def test_one_sgd_step_by_hand() -> None:
    # Nesterov SGD, first step: buf = g + wd·w; update = g' + μ·buf = (1 + μ)·g'
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = build_optimizer([p], lr=0.1, momentum=0.5, weight_decay=0.1)
    p.grad = torch.tensor([0.5, 1.0])
    opt.step()
    g = torch.tensor([0.5 + 0.1 * 1.0, 1.0 + 0.1 * -2.0])
    assert torch.allclose(p.detach(), torch.tensor([1.0, -2.0]) - 0.1 * 1.5 * g)


@pytest.mark.parametrize(
    ("name", "kw", "message"),
    [
        ("rmsprop", {}, "unknown optimizer"),
        ("sgd", {"betas": [0.9, 0.9]}, "has no setting betas"),
        ("sgd", {"lr": 0}, "out of range"),
        ("sgd", {"lr": "fast"}, "not a number"),
        ("sgd", {"schedule_interval": "batch"}, "schedule_interval"),
    ],
)
def test_bad_optimizer_settings(name: str, kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        optim_settings(name, **kw)


# ============================================================================ poly schedule
def test_poly_schedule_values_by_hand() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], lr=0.01)
    sched = build_scheduler(opt, 4)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.01, 0.01 * 0.75**0.9, 0.01 * 0.5**0.9, 0.01 * 0.25**0.9, 0.0]
    assert seen == pytest.approx(expected, rel=1e-12, abs=0)
    assert opt.param_groups[0]["lr"] == 0.0  # stays 0 past the end
    assert poly_factor(999, 1000) == pytest.approx(0.001**0.9)  # nnU-Net's last epoch


def test_poly_state_is_plain_and_resumes(tmp_path) -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p])
    sched = PolyLR(opt, 10)
    for _ in range(3):
        opt.step()
        sched.step()
    sched.set_total_steps(6)  # a budget shortened the run: 3 of 6 done
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**0.9)
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    opt2 = build_optimizer([torch.nn.Parameter(torch.zeros(1))])
    sched2 = PolyLR(opt2, 99)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert sched2.total_steps == 6 and sched2.get_last_lr() == sched.get_last_lr()
    with pytest.raises(ConfigError, match="at least 1 step"):
        PolyLR(opt, 0)


# ============================================================================ durations
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("20m", 1200.0),
        ("2h", 7200.0),
        ("90s", 90.0),
        ("1h30m", 5400.0),
        ("1h 30m 15s", 5415.0),
        ("1.5h", 5400.0),
        ("1d2h", 93600.0),
        (" 600 ", 600.0),
        ("00:20:00", 1200.0),
        ("01:00:00:30", 86430.0),
        (45, 45.0),
        (2.5, 2.5),
        (timedelta(minutes=3), 180.0),
    ],
)
def test_parse_duration(text, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "20 minutes", "m20", "30m1h", "1h1h", "-5", "0", "0m", "1:2", "abc", True, None])
def test_parse_duration_refuses(text) -> None:
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(text)


# ============================================================================ budget
def test_fit_budget_by_hand() -> None:
    # 20 min budget, 100 s gone; epoch = 10 × 5 s + 20 s = 70 s; final validation 120 s, margin 10 s
    # available = 1200 − 100 − 120 − 10 = 970 s → 13 epochs (910 s), 60 s left: − 20 s validation → 8 iterations
    fit = fit_budget(
        "20m",
        100.0,
        seconds_per_iteration=5.0,
        iterations_per_epoch=10,
        seconds_per_validation=20.0,
        final_validation_seconds=120.0,
        margin=10.0,
    )
    assert (fit.epochs, fit.iterations, fit.partial_iterations, fit.last_epoch_iterations) == (13, 138, 8, 8)
    # needed: 13 whole epochs, the shortened one (8 × 5 s + its 20 s validation), the final validation
    assert (fit.seconds_per_epoch, fit.seconds_left, fit.seconds_needed) == (70.0, 1100.0, 13 * 70.0 + 60.0 + 120.0)
    assert fit.seconds_needed + 10 + 100 <= 1200


def test_fit_budget_inside_an_epoch() -> None:
    # 4 of 10 iterations done; 1 s each, 2 s validation per epoch; 100 s available
    # the epoch in progress ends whole (6 + 2 = 8 s), then 7 more (84 s), then 8 s left: 6 iterations + 2 s
    fit = fit_budget(
        100, 0, seconds_per_iteration=1, iterations_per_epoch=10, seconds_per_validation=2, done_in_epoch=4
    )
    assert (fit.epochs, fit.iterations, fit.last_epoch_iterations, fit.partial_iterations) == (8, 6 + 70 + 6, 6, 6)
    # the epoch in progress cannot end whole: shortened to 4 + 3 iterations (3 s + its 2 s validation in 5 s)
    fit = fit_budget(5, 0, seconds_per_iteration=1, iterations_per_epoch=10, seconds_per_validation=2, done_in_epoch=4)
    assert (fit.epochs, fit.iterations, fit.last_epoch_iterations, fit.partial_iterations) == (0, 3, 7, 3)
    # already over budget inside an epoch: it ends with the iterations done
    fit = fit_budget(5, 10, seconds_per_iteration=1, iterations_per_epoch=10, done_in_epoch=4)
    assert (fit.epochs, fit.iterations, fit.last_epoch_iterations) == (0, 0, 4)
    # max_epochs counts the epoch in progress
    fit = fit_budget(1000, 0, seconds_per_iteration=1, iterations_per_epoch=10, done_in_epoch=4, max_epochs=2)
    assert (fit.epochs, fit.iterations, fit.last_epoch_iterations) == (2, 16, 0)


def test_fit_budget_keeps_the_periodic_full_validations() -> None:
    # epochs of 10 s; a 15 s full-case validation after every 2nd epoch (epoch 3 ended: the next is after 4)
    # 50 s: epoch 4 (10) + its validation (15) + epoch 5 (10) + epoch 6 (10) = 45 s; a 7th epoch would
    # first owe epoch 6's validation (15 s): nothing more; epoch 6's validation is the final one
    kw = {"seconds_per_iteration": 1, "iterations_per_epoch": 10, "completed_epochs": 3, "val_every": 2}
    fit = fit_budget(50, 0, seconds_per_full_validation=15, **kw)
    assert (fit.epochs, fit.iterations, fit.last_epoch_iterations, fit.seconds_needed) == (3, 30, 0, 45)
    # 65 s: after epoch 6 its validation (15 s) and a shortened 7th epoch of 5 iterations
    fit = fit_budget(65, 0, seconds_per_full_validation=15, **kw)
    assert (fit.epochs, fit.iterations, fit.last_epoch_iterations, fit.seconds_needed) == (3, 35, 5, 65)


def test_fit_budget_edges() -> None:
    # exactly fits: 2 epochs of 10 s, no partial epoch
    fit = fit_budget(20, 0, seconds_per_iteration=2.5, iterations_per_epoch=4)
    assert (fit.epochs, fit.iterations) == (2, 8)
    # capped by max_epochs: no partial epoch after the cap
    fit = fit_budget(1000, 0, seconds_per_iteration=1, iterations_per_epoch=4, max_epochs=3)
    assert (fit.epochs, fit.iterations) == (3, 12)
    # over budget already: nothing fits
    fit = fit_budget(60, 100, seconds_per_iteration=1, iterations_per_epoch=4, final_validation_seconds=5)
    assert (fit.epochs, fit.iterations, fit.seconds_left) == (0, 0, -40.0)
    # less than one epoch: a shortened one (3 iterations + its 1 s validation in 4.5 s)
    fit = fit_budget(4.5, 0, seconds_per_iteration=1, iterations_per_epoch=10, seconds_per_validation=1)
    assert (fit.epochs, fit.iterations) == (0, 3)
    with pytest.raises(ConfigError, match="positive seconds per iteration"):
        fit_budget(60, 0, seconds_per_iteration=0, iterations_per_epoch=4)


# ============================================================================ checkpoints
def _draw(gens: dict) -> list:
    return [
        random.random(),
        random.gauss(0, 1),
        float(np.random.rand()),  # noqa: NPY002
        float(np.random.randn()),  # noqa: NPY002
        torch.rand(3).tolist(),
        *[float(g.random()) for g in gens.values()],
        *[int(g.integers(2**62)) for g in gens.values()],
    ]


def test_rng_round_trip_is_exact(tmp_path: Path) -> None:
    gens = {"pcg": np.random.default_rng(7), "mt": np.random.Generator(np.random.MT19937(3))}
    random.seed(1)
    np.random.seed(2)  # noqa: NPY002
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in python's generator
    np.random.randn()  # noqa: NPY002 (a cached Gaussian in numpy's legacy generator)
    _draw(gens)
    state = capture_rng(gens)
    first = _draw(gens)
    # through a weights_only file as well
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    loaded = load_checkpoint(tmp_path / "rng.pt")["rng"]
    restore_rng(loaded, gens)
    assert _draw(gens) == first
    restore_rng(state, gens)
    assert _draw(gens) == first


def test_restore_rng_needs_every_named_generator() -> None:
    state = capture_rng({"a": np.random.default_rng(0)})
    with pytest.raises(StateError, match="random generator 'b'"):
        restore_rng(state, {"b": np.random.default_rng(0)})
    with pytest.raises(StateError, match="random-number state"):
        restore_rng({"python": {}}, None)


def test_checkpoint_round_trip_with_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model.parameters())
    sched = build_scheduler(opt, 5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    state = {
        "epoch": 1,
        "global_step": 4,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "history": {"train_loss": [np.float32(0.5)], "dice": np.array([0.25, 0.75])},
        "rng": capture_rng(),
        "where": tmp_path,
    }
    path = save_checkpoint(tmp_path / "run" / "last.pt", state)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind
    raw = torch.load(path, weights_only=True)  # loads with the safe unpickler as it is
    assert raw["format"] == CHECKPOINT_FORMAT
    data = load_checkpoint(path)
    assert data["history"]["train_loss"] == [0.5] and torch.equal(data["history"]["dice"], torch.tensor([0.25, 0.75]))
    assert data["where"] == str(tmp_path) and data["epoch"] == 1
    model2 = torch.nn.Linear(3, 2)
    model2.load_state_dict(data["model"])
    opt2 = build_optimizer(model2.parameters())
    opt2.load_state_dict(data["optimizer"])
    sched2 = build_scheduler(opt2, 99)
    sched2.load_state_dict(data["scheduler"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert sched2.total_steps == 5 and sched2.last_epoch == 1
    buf = opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], buf)


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_with_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": 1, "x": _Payload()}, path)
    with pytest.raises(StateError, match="objects other than tensors and plain values") as info:
        load_checkpoint(path)
    assert "overwrite=true" in str(info.value)
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": 1, "x": np.zeros(2)}, path)  # pickled numpy
    with pytest.raises(StateError, match="refused"):
        load_checkpoint(path)
    with pytest.raises(TypeError, match=r"checkpoint\['x'\] holds a .*_Payload"):
        save_checkpoint(tmp_path / "bad.pt", {"x": _Payload()})
    assert not (tmp_path / "bad.pt").exists() and [p.name for p in tmp_path.iterdir()] == ["evil.pt"]


def test_truncated_or_foreign_checkpoint_is_a_state_error(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "last.pt", {"model": {"w": torch.arange(1000.0)}})
    data = path.read_bytes()
    for n in (0, 10, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:n])
        with pytest.raises(StateError, match="truncated or damaged"):
            load_checkpoint(path)
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(StateError, match="not a segpipe training checkpoint"):
        load_checkpoint(path)
    with pytest.raises(StateError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_state_falls_back_to_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from segpipe.training import resume as runner

    run = tmp_path / "run"
    save_checkpoint(run / "last.pt", {"epoch": 1})
    save_checkpoint(run / "last.pt", {"epoch": 2}, keep_previous=True)
    assert load_checkpoint(run / "last.prev.pt")["epoch"] == 1
    assert runner.load_resume_state(run, writer=True)["epoch"] == 2  # the newest when it is sound
    # another process of a distributed run removed a damaged last.pt between the look and the read
    real = runner.load_checkpoint

    def vanishing(path: Path, **kw: object) -> dict:
        if Path(path).name == "last.pt":
            Path(path).unlink()
        return real(path)

    monkeypatch.setattr(runner, "load_checkpoint", vanishing)
    assert runner.load_resume_state(run, writer=False)["epoch"] == 1
    monkeypatch.setattr(runner, "load_checkpoint", real)
    # damaged: the previous one, and the damaged file is gone (never kept as "previous" by the next save)
    save_checkpoint(run / "last.pt", {"epoch": 2})
    (run / "last.pt").write_bytes(b"PK\x03\x04 cut short")
    assert runner.load_resume_state(run, writer=True)["epoch"] == 1 and not (run / "last.pt").exists()
    # a pickled object in last.pt is refused outright, not stepped around
    torch.save({"x": _Payload()}, run / "last.pt")
    with pytest.raises(StateError, match="could run code"):
        runner.load_resume_state(run, writer=True)


# ============================================================================ the LightningModule
def _tiny_config(**kw) -> PlanConfig:
    base = dict(
        name="3d_fullres",
        architecture="unet",
        dims=3,
        spacing=[1.0, 1.0, 1.0],
        median_shape=[8, 16, 16],
        patch_size=[8, 16, 16],
        batch_size=2,
        strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
        features=[4, 8, 16],
        n_conv_encoder=[2, 2, 2],
        n_conv_decoder=[2, 2],
    )
    base.update(kw)
    return PlanConfig(**base)


def test_confusion_counts_and_dice_by_hand() -> None:
    # 1 sample, 3 classes, 4 voxels along x: labels [0, 1, 2, 2], prediction [1, 1, 2, 0]
    labels = torch.tensor([0, 1, 2, 2]).view(1, 1, 1, 1, 4)
    pred = torch.tensor([1, 1, 2, 0])
    logits = torch.nn.functional.one_hot(pred, 3).T.reshape(1, 3, 1, 1, 4).float()
    counts = confusion_counts(logits, labels, 3)
    # class 1: tp 1 (voxel 1), fp 1 (voxel 0), fn 0; class 2: tp 1, fp 0, fn 1 (voxel 3)
    assert counts.tolist() == [[1, 1], [1, 0], [0, 1]]
    assert dice_from_counts(counts) == [2 / 3, 2 / 3]
    # ignore label 2: voxels 2 and 3 count nowhere; class 2 is then absent → NaN
    counts = confusion_counts(logits, labels, 3, ignore_index=2)
    assert counts.tolist() == [[1, 0], [1, 0], [0, 0]]
    d = dice_from_counts(counts)
    assert d[0] == 2 / 3 and np.isnan(d[1])


def test_module_trains_and_records_pseudo_dice() -> None:
    torch.manual_seed(0)
    module = SegmentationModule(_tiny_config(), 1, 3, epochs=4, iterations_per_epoch=2)
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and module.scheduler is not None and module.scheduler.total_steps == 4
    batch = {"image": torch.randn(2, 1, 8, 16, 16), "label": torch.randint(0, 3, (2, 1, 8, 16, 16), dtype=torch.uint8)}
    module.train()
    module.on_train_epoch_start()
    loss = module.training_step(batch, 0)
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    module.eval()
    module.on_validation_epoch_start()
    with torch.no_grad():
        module.validation_step(batch, 0)
        module.validation_step(batch, 1)
    counts = module._counts
    assert counts is not None and counts.shape == (3, 2)
    assert counts[0].add(counts[2]).sum() == 2 * ((batch["label"] > 0).sum())  # tp + fn = foreground, twice
    module.history["ema_fg_dice"].append(0.5)  # as if one epoch was recorded before
    expected = dice_from_counts(counts)
    mean = float(np.nanmean(expected))
    opt.step()
    module.on_train_epoch_end()
    h = module.history
    assert h["pseudo_dice"][-1] == expected and h["mean_fg_dice"][-1] == mean
    assert h["ema_fg_dice"][-1] == pytest.approx(0.9 * 0.5 + 0.1 * mean)
    assert h["lr"][-1] == 0.01 and opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.75**0.9)
    assert module.completed_epochs == 1


def test_module_per_iteration_schedule_and_adamw() -> None:
    module = SegmentationModule(
        _tiny_config(),
        1,
        3,
        loss="tversky",
        optim={"name": "adamw", "schedule_interval": "step"},
        epochs=3,
        iterations_per_epoch=5,
    )
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and module.scheduler is not None
    assert module.scheduler.total_steps == 15
    opt.step()
    module.on_train_batch_end(None, None, 0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (14 / 15) ** 0.9)


def test_train_settings_refuse_unknown_and_bad_values() -> None:
    s = train_settings({"epochs": 3, "max_time": "20m", "fold": 0})
    assert s["epochs"] == 3 and s["max_time"] == "20m" and "fold" not in s
    with pytest.raises(ConfigError, match="unknown training setting"):
        train_settings({"epochz": 3})
    with pytest.raises(ConfigError, match="at least 1"):
        train_settings({"iterations_per_epoch": 0})
    with pytest.raises(ConfigError, match="duration"):
        train_settings({"max_time": "soon"})
    assert train_settings({})["progress"] == "auto" and train_settings({"progress": "no"})["progress"] is False
    with pytest.raises(ConfigError, match="progress=auto, true or false"):
        train_settings({"progress": "sometimes"})


def test_progress_bar_and_tensorboard_follow_their_settings(tmp_path: Path, monkeypatch) -> None:
    from segpipe.training import fit as runner

    monkeypatch.setattr("segpipe.progress.progress_mode", lambda stream=None: "bar")
    assert runner._progress_bar("auto") is True and runner._progress_bar(False) is False
    monkeypatch.setattr("segpipe.progress.progress_mode", lambda stream=None: "log")
    assert runner._progress_bar("auto") is False and runner._progress_bar(True) is True
    assert runner._loggers(tmp_path, False) is False
    monkeypatch.setattr(runner.run_settings, "tensorboard_installed", lambda: False)
    assert runner._loggers(tmp_path, "auto") is False
    with pytest.raises(ConfigError, match="tensorboard=true needs the tensorboard package"):
        train_settings({"tensorboard": True})


# ============================================================================ fit and resume
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """The demo dataset planned and preprocessed, with the plan shrunk to a tiny network and patch."""
    import segpipe
    from segpipe.planning import load_plan

    root = tmp_path_factory.mktemp("train")
    data = segpipe.generate_demo_data(root / "demo")
    work = root / "work"
    segpipe.plan(data, work_dir=work, configurations=["3d_fullres"], num_workers=1)
    segpipe.preprocess(data, work_dir=work, num_workers=1)
    plan = load_plan(work / "demo" / "plans.json")
    network = ("patch_size", "batch_size", "strides", "kernel_sizes", "features", "n_conv_encoder", "n_conv_decoder")
    small = {k: v for k, v in _tiny_config().to_dict().items() if k in network}
    plan.configurations["3d_fullres"] = PlanConfig.from_dict({**plan.configurations["3d_fullres"].to_dict(), **small})
    return plan, work


SETTINGS = {"epochs": 3, "iterations_per_epoch": 2, "val_batches": 2, "num_workers": 0, "deterministic": True}


def _same(a, b) -> bool:
    """Equal, NaN included (histories hold NaN for epochs without a value)."""
    return repr(a) == repr(b)


@pytest.mark.slow
def test_interrupted_and_resumed_run_is_bit_identical(tiny_run, monkeypatch) -> None:
    from segpipe.training import fit as fit_module

    torch.set_num_threads(1)
    plan, work = tiny_run
    # the uninterrupted run validates the full cases after every epoch, the resumed one only at the
    # end: the same weights show that validation leaves the training's random streams alone
    lines_a: list[str] = []
    full = fit_module.fit(
        plan, "3d_fullres", 0, work_dir=work, settings={**SETTINGS, "val_every": 1}, overwrite=True, log=lines_a.append
    )
    assert full["finished"] and full["epochs"] == 3 and not full["already_finished"]
    assert [x.split(":")[0] for x in lines_a if "validation after" in x] == [
        "validation after epoch 1",
        "validation after epoch 2",
        "final validation after epoch 3",
    ]
    a = load_checkpoint(full["checkpoint"])
    assert all(not math.isnan(v) for v in a["history"]["val_dice"])
    assert a["validation"]["epoch"] == 3 and a["validation"]["final"]

    class Killed(Exception):
        pass

    original = fit_module.RunCheckpoint.on_train_epoch_end

    def die_after_first_epoch(self, trainer, module):
        original(self, trainer, module)
        if module.completed_epochs == 1:
            raise Killed

    monkeypatch.setattr(fit_module.RunCheckpoint, "on_train_epoch_end", die_after_first_epoch)
    with pytest.raises(Killed):
        fit_module.fit(plan, "3d_fullres", 0, work_dir=work, settings=SETTINGS, overwrite=True)
    monkeypatch.setattr(fit_module.RunCheckpoint, "on_train_epoch_end", original)
    run_dir = Path(full["run_dir"])
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1 and not (run_dir / "final.pt").exists()
    assert not (run_dir / "validation").exists()  # overwrite cleared it; no validation before the end

    lines: list[str] = []
    resumed = fit_module.fit(plan, "3d_fullres", 0, work_dir=work, settings=SETTINGS, log=lines.append)
    assert resumed["resumed_from"] == 1 and resumed["finished"]
    assert "resuming after epoch 1" in lines[0] and len([x for x in lines if x.startswith("epoch ")]) == 2
    b = load_checkpoint(resumed["checkpoint"])
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    varying = ("epoch_seconds", "val_dice", "val_class_dice")
    assert _same(
        {k: v for k, v in a["history"].items() if k not in varying},
        {k: v for k, v in b["history"].items() if k not in varying},
    )
    # the final validation scores the same weights: the same Dice
    assert a["history"]["val_dice"][-1] == b["history"]["val_dice"][-1] == resumed["val_dice"]
    assert _same(b["history"]["val_dice"][:2], [math.nan, math.nan])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 3

    # the final validation: one line, the result, the files
    (line,) = [x for x in lines if x.startswith("final validation after epoch 3: mean foreground Dice")]
    assert resumed["validation"] in line and "cases" in line
    class_names = [name for _, name in sorted(plan.labels.items(), key=lambda kv: int(kv[0]))[1:]]
    assert list(resumed["val_class_dice"]) == class_names
    assert resumed["val_class_dice"] == dict(zip(class_names, b["history"]["val_class_dice"][-1]))
    val_dir = run_dir / "validation"
    assert resumed["validation_dir"] == str(val_dir)
    summary = json.loads((val_dir / "summary.json").read_text())
    assert summary["foreground_mean"]["Dice"] == pytest.approx(resumed["val_dice"])
    probabilities = sorted(val_dir.glob("*.npy"))
    assert len(probabilities) == b["validation"]["num_cases"] > 0
    assert np.load(probabilities[0], mmap_mode="r").dtype == np.float16

    # what the run folder holds
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == [
        "best.pt",
        "final.pt",
        "last.prev.pt",
        "last.pt",
        "metrics.csv",
        "progress.png",
        "report.html",
        "report_files",
        "settings.json",
        "validation",
    ]
    assert (run_dir / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:3] == ["epoch", "train_loss", "val_loss"] and header[-2:] == ["lr", "seconds"]
    assert header[header.index("val_dice") + 1 : -2] == [f"val_dice_{n}" for n in class_names]
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2"]
    assert [r.split(",")[header.index("val_dice")] for r in rows[1:3]] == ["", ""]  # no validation: empty
    assert float(rows[3].split(",")[header.index("val_dice")]) == pytest.approx(resumed["val_dice"], rel=1e-5)
    lrs = [float(r.split(",")[-2]) for r in rows[1:]]
    assert lrs == pytest.approx([0.01, 0.01 * (2 / 3) ** 0.9, 0.01 * (1 / 3) ** 0.9], rel=1e-5)
    for name in ("best.pt", "final.pt"):
        assert "model" in torch.load(run_dir / name, weights_only=True)
    saved = json.loads((run_dir / "settings.json").read_text())
    assert saved["settings"]["epochs"] == 3 and "torch" in saved["versions"]

    # finished: nothing is recomputed, a picture lost to a kill is drawn again
    (run_dir / "progress.png").unlink()
    stamp = (val_dir / "summary.json").stat().st_mtime_ns
    again = fit_module.fit(plan, "3d_fullres", 0, work_dir=work, settings=SETTINGS)
    assert again["already_finished"] and again["val_dice"] == resumed["val_dice"]
    assert again["val_class_dice"] == resumed["val_class_dice"] and again["validation"] == resumed["validation"]
    assert (val_dir / "summary.json").stat().st_mtime_ns == stamp and (run_dir / "progress.png").is_file()


@pytest.mark.slow
def test_finished_run_returns_at_once_and_other_settings_are_refused(tiny_run) -> None:
    plan, work = tiny_run
    # the optimizer and loss as composed config groups (conf/optim/sgd.yaml, conf/loss/dice_ce.yaml)
    settings = {**SETTINGS, "epochs": 1, "optim": {"name": "sgd", "lr": 0.02}, "loss": {"name": "dice_ce"}}
    first = fit(plan, "3d_fullres", 1, work_dir=work, settings=settings, overwrite=True)
    assert first["finished"] and first["epochs"] == 1
    assert load_checkpoint(first["checkpoint"])["history"]["lr"] == [0.02]
    lines: list[str] = []
    again = fit(plan, "3d_fullres", 1, work_dir=work, settings=settings, log=lines.append)
    assert again["already_finished"] and again["epochs"] == 1 and "has finished" in lines[0]
    with pytest.raises(StateError, match="other settings"):
        fit(plan, "3d_fullres", 1, work_dir=work, settings={**settings, "seed": 1})
    redo = fit(plan, "3d_fullres", 1, work_dir=work, settings={**settings, "seed": 1}, overwrite=True)
    assert redo["finished"] and not redo["already_finished"]


@pytest.mark.slow
def test_sigusr1_saves_inside_an_epoch_requeues_under_slurm_and_resumes_bit_identical(
    tiny_run, monkeypatch, tmp_path: Path
) -> None:
    """SIGUSR1 (what SLURM sends before it ends a job) in the middle of epoch 2: the state is saved
    with the batches done, the job is requeued, the run stops; the same call resumes inside the
    epoch and ends with the weights of a run that was never stopped."""
    import signal

    from segpipe.training import fit as fit_module

    torch.set_num_threads(1)
    plan, work = tiny_run
    handler_before = signal.getsignal(signal.SIGUSR1)
    settings = {**SETTINGS, "epochs": 3, "iterations_per_epoch": 4, "checkpoint_every": None}
    full = fit_module.fit(plan, "3d_fullres", 3, work_dir=work, settings=settings, overwrite=True)
    a = load_checkpoint(full["checkpoint"])

    # a SLURM job (one task), with an scontrol that records what it is asked
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.txt"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "segpipe", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1"}
    slurm.update({"SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"})
    slurm["SLURM_NODELIST"] = "localhost"
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)

    step = fit_module.SegmentationModule.training_step
    calls = {"n": 0}

    def signal_at_step_6(self, batch, batch_idx):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 2, its 2nd batch
            os.kill(os.getpid(), signal.SIGUSR1)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(fit_module.SegmentationModule, "training_step", signal_at_step_6)
    stopped = fit_module.fit(plan, "3d_fullres", 3, work_dir=work, settings=settings, overwrite=True)
    assert stopped["preempted"] and "epoch 2, iteration 2" in stopped["preempted"]
    assert "SLURM job 4242 requeued" in stopped["preempted"]
    assert record.read_text().split() == ["requeue", "4242"]
    saved = load_checkpoint(stopped["checkpoint"])
    assert saved["epoch"] == 1 and saved["data"] == {"train_stream_starts": 1, "in_epoch": 2}
    assert len(saved["epoch_train_losses"]) == 2 and not saved["finished"]
    assert signal.getsignal(signal.SIGUSR1) == handler_before  # the run's handler is gone with it

    monkeypatch.setattr(fit_module.SegmentationModule, "training_step", step)
    resumed = fit_module.fit(plan, "3d_fullres", 3, work_dir=work, settings=settings)
    # epoch 2 ends after its 2 remaining batches (validated), epoch 3 runs whole
    assert resumed["finished"] and resumed["resumed_from"] == 1 and resumed["epochs"] == 3
    b = load_checkpoint(resumed["checkpoint"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    varying = ("epoch_seconds", "val_dice", "val_class_dice")
    assert _same(
        {k: v for k, v in a["history"].items() if k not in varying},
        {k: v for k, v in b["history"].items() if k not in varying},
    )
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


@pytest.mark.slow
def test_checkpoint_every_saves_inside_epochs(tiny_run, monkeypatch) -> None:
    from segpipe.training import callbacks
    from segpipe.training import fit as fit_module

    plan, work = tiny_run
    saved: list[dict] = []
    original = callbacks.save_checkpoint

    def recording(path, state, **kw):
        saved.append({"name": Path(path).name, "data": dict(state.get("data", {}))})
        return original(path, state, **kw)

    monkeypatch.setattr(callbacks, "save_checkpoint", recording)
    settings = {**SETTINGS, "epochs": 1, "iterations_per_epoch": 3, "checkpoint_every": "0.001s"}
    res = fit_module.fit(plan, "3d_fullres", 3, work_dir=work, settings=settings, overwrite=True)
    assert res["finished"]
    inside = [x["data"]["in_epoch"] for x in saved if x["name"] == "last.pt" and x["data"].get("in_epoch")]
    assert inside == [1, 2]  # after batches 1 and 2; batch 3 ends the epoch, saved as its end
    assert load_checkpoint(res["checkpoint"])["data"] == {"train_stream_starts": 1, "in_epoch": 0}


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tiny_run, tmp_path: Path) -> None:
    """trainer=ddp devices=2 on the CPU (gloo): the processes train on different batches, end with the
    same weights, and only rank 0 writes the run's files."""
    import subprocess
    import sys

    plan, work = tiny_run
    out = tmp_path / "ddp"
    out.mkdir()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    probe = [sys.executable, str(Path(__file__).with_name("ddp_probe.py")), str(work), str(out)]
    done = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"]) == (0, 1)
    # 2 epochs × 3 iterations each, every batch its own
    assert len(r0["batches"]) == len(r1["batches"]) == 6 and not set(r0["batches"]) & set(r1["batches"])
    assert r0["weights"] == r1["weights"]  # gradients averaged: the same model in both processes
    assert r1["written"] == [] and {"settings.json", "last.pt", "final.pt", "metrics.csv"} <= set(r0["written"])
    assert r0["result"]["finished"] and r0["result"]["epochs"] == 2 and r1["result"]["rank"] == 1
    state = load_checkpoint(Path(r0["result"]["checkpoint"]))
    # the validation patches, shared out between the processes, were all scored
    assert all(not math.isnan(v) for v in state["history"]["mean_fg_dice"])


@pytest.mark.slow
def test_hardness_weighted_case_sampling_draws_the_hard_cases(tiny_run, monkeypatch) -> None:
    """case_sampling=hardness: the losses seen per case steer the next epoch's draws (fresh loader
    workers get the probabilities), and the loss history is part of the saved state."""
    from segpipe.training import fit as fit_module

    plan, work = tiny_run
    drawn: list[list[str]] = []
    step = fit_module.SegmentationModule.training_step

    def recording(self, batch, batch_idx):
        drawn.append(list(batch["case"]))
        if self.completed_epochs == 0:  # make one case "hard" after epoch 1
            out = step(self, batch, batch_idx)
            sampler = self.case_sampler
            sampler.losses[:] = 0.0
            sampler.losses[0] = 1.0
            return out
        return step(self, batch, batch_idx)

    monkeypatch.setattr(fit_module.SegmentationModule, "training_step", recording)
    settings = {**SETTINGS, "epochs": 2, "iterations_per_epoch": 3, "num_workers": 2, "deterministic": False}
    settings.update({"case_sampling": "hardness", "hardness_beta": 50.0})
    res = fit_module.fit(plan, "3d_fullres", 1, work_dir=work, settings=settings, overwrite=True)
    assert res["finished"]
    state = load_checkpoint(res["checkpoint"])
    sampler = state["case_sampler"]
    hard = sorted(json.loads((work / "demo" / "splits_final.json").read_text())[1]["train"])[0]
    # β = 50 on a loss gap of 1: the hard case is drawn with probability ≈ 1 in epoch 2
    assert drawn[3:] == [[hard] * 2] * 3
    assert sampler["num_cases"] > 1 and sum(sampler["updates"]) > 0
    with pytest.raises(ConfigError, match="case_sampling"):
        train_settings({"case_sampling": "hardest"})


def test_an_ignore_label_trains_without_an_output_loss_or_metric(tmp_path: Path) -> None:
    """A dataset.json label named "ignore" (the highest value) marks unlabelled voxels: the plan has
    no output for it, patches are not centred on it, and training and validation skip its voxels."""
    import nibabel as nib

    import segpipe
    from segpipe.planning import load_plan
    from segpipe.preprocessing import Cache

    data = segpipe.generate_demo_data(tmp_path / "demo")
    desc = json.loads((data / "dataset.json").read_text())
    desc["labels"]["4"] = "ignore"
    (data / "dataset.json").write_text(json.dumps(desc))
    for path in sorted((data / "labelsTr").glob("*.nii.gz")):  # half of every label map unlabelled
        img = nib.load(path)
        lab = np.asarray(img.dataobj).copy()
        lab[: lab.shape[0] // 2] = 4
        nib.save(nib.Nifti1Image(lab, img.affine, img.header), path)
    work = tmp_path / "work"
    segpipe.plan(data, work_dir=work, configurations=["3d_fullres"], num_workers=1)
    segpipe.preprocess(data, work_dir=work, num_workers=1)
    plan = load_plan(work / "demo" / "plans.json")
    assert (plan.ignore_label, plan.num_classes) == (4, 4)  # background + 3 classes: 4 outputs
    cache = Cache.for_configuration(work, plan, "3d_fullres")
    props = cache.properties(cache.cases()[0])
    assert props is not None and "4" not in props["class_locations"] and props["class_locations"]
    network = ("patch_size", "batch_size", "strides", "kernel_sizes", "features", "n_conv_encoder", "n_conv_decoder")
    small = {k: v for k, v in _tiny_config().to_dict().items() if k in network}
    plan.configurations["3d_fullres"] = PlanConfig.from_dict({**plan.configurations["3d_fullres"].to_dict(), **small})
    res = fit(plan, "3d_fullres", 0, work_dir=work, settings={**SETTINGS, "epochs": 1})
    assert res["finished"] and list(res["val_class_dice"]) == ["organ", "vessel", "lesion"]
    assert math.isfinite(res["ema_fg_dice"])
    state = load_checkpoint(res["checkpoint"])
    last_bias = [v for k, v in state["model"].items() if k.endswith("bias")][-1]
    assert last_bias.shape == (4,)  # the full-resolution head: one output per class, none for "ignore"
    header = (Path(res["run_dir"]) / "metrics.csv").read_text().splitlines()[0]
    assert "ignore" not in header


def test_an_ignore_label_must_have_the_highest_value(tmp_path: Path) -> None:
    import segpipe
    from segpipe.errors import DatasetError
    from segpipe.io.datasets import load_dataset

    data = segpipe.generate_demo_data(tmp_path / "demo")
    desc = json.loads((data / "dataset.json").read_text())
    desc["labels"] = {"0": "background", "1": "ignore", "2": "organ", "3": "vessel", "4": "lesion"}
    (data / "dataset.json").write_text(json.dumps(desc))
    with pytest.raises(DatasetError, match='the "ignore" label must be one label with the highest value'):
        load_dataset(data)


@pytest.mark.slow
def test_fold_all_has_no_validation(tiny_run) -> None:
    plan, work = tiny_run
    lines: list[str] = []
    res = fit(
        plan, "3d_fullres", "all", work_dir=work, settings={**SETTINGS, "epochs": 1}, overwrite=True, log=lines.append
    )
    assert res["finished"] and "fold all trains on every case: no full-case validation" in lines[0]
    assert math.isnan(res["val_dice"]) and res["val_class_dice"] == {} and res["validation"] is None
    assert res["validation_dir"] is None and not (Path(res["run_dir"]) / "validation").exists()
    assert (Path(res["run_dir"]) / "progress.png").is_file()


@pytest.mark.slow
def test_a_budget_ends_the_run_with_its_final_validation(tiny_run) -> None:
    plan, work = tiny_run
    lines: list[str] = []
    settings = {**SETTINGS, "epochs": 1000, "max_time": "4s"}
    res = fit(plan, "3d_fullres", 2, work_dir=work, settings=settings, overwrite=True, log=lines.append)
    # the budget shortened the run (re-spanning the schedule) and it ended finished and validated
    assert res["finished"] and 1 <= res["epochs"] == res["planned_epochs"] < 1000
    finals = [x for x in lines if x.startswith("final validation after epoch")]
    assert len(finals) == 1 and finals[0].startswith(f"final validation after epoch {res['epochs']}: ")
    assert not math.isnan(res["val_dice"]) and res["validation"] in finals[0]
    state = load_checkpoint(res["checkpoint"])
    assert state["scheduler"]["total_steps"] == res["epochs"]


# ============================================================================ validation pieces, by hand
class _FakeCache:
    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes

    def load(self, case_id: str, *, mmap: bool = True):
        return np.zeros(self.shapes[case_id], dtype=np.float32), None, {}


class _FakePlan:
    def __init__(self, cfg: PlanConfig):
        self.cfg = cfg

    def config(self, name: str) -> PlanConfig:
        return self.cfg


def test_fold_validation_counts_windows_and_estimates_its_time(tmp_path: Path) -> None:
    from segpipe.training.budget import FORWARD_SHARE, WINDOW_OVERHEAD
    from segpipe.training.validation import FoldValidation

    plan = _FakePlan(_tiny_config(patch_size=[12, 24, 28]))
    # patch 12×24×28, overlap 0.5: 12×30×28 → 1·2·1 windows (y: 30 − 24 = 6 < step 12 → 2); 10×20×20 pads to 1
    cache = _FakeCache({"a": (1, 12, 30, 28), "b": (1, 10, 20, 20)})
    v = FoldValidation(plan, "3d_fullres", cache, ["a", "b"], tmp_path)
    assert v.windows() == 3
    # 3 windows × 0.5 × (2 s per iteration / batch 2)
    assert v.estimate_seconds(2.0, 2) == pytest.approx(3 * FORWARD_SHARE * 1.0) == 1.5
    # with a timed forward pass: 3 windows × 0.2 s × the window overhead, whatever the training step
    assert v.estimate_seconds(2.0, 2, window_seconds=0.2) == pytest.approx(3 * 0.2 * WINDOW_OVERHEAD)
    # a 2-D configuration slides over each slice: 5 slices × 2 windows
    plan2d = _FakePlan(
        _tiny_config(
            name="2d",
            dims=2,
            patch_size=[24, 28],
            strides=[[1, 1], [2, 2], [2, 2]],
            kernel_sizes=[[3, 3]] * 3,
            spacing=[1.0, 1.0],
            median_shape=[30, 28],
        )
    )
    v2 = FoldValidation(plan2d, "2d", _FakeCache({"a": (1, 5, 30, 28)}), ["a"], tmp_path)
    assert v2.windows() == 10


def test_fold_validation_times_a_window_without_touching_weights_or_random_streams(tmp_path: Path) -> None:
    from segpipe.networks import build_network
    from segpipe.training.validation import FoldValidation

    cfg = _tiny_config(patch_size=[12, 24, 28])
    v = FoldValidation(_FakePlan(cfg), "3d_fullres", _FakeCache({"a": (1, 12, 30, 28)}), ["a"], tmp_path)
    net = build_network(cfg, 1, 3)
    net.train()
    before = {k: t.clone() for k, t in net.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = v.time_window(net, torch.device("cpu"), 1)
    assert 0 < seconds < 60
    assert net.training  # put back in training mode
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], t) for k, t in net.state_dict().items())


def test_metrics_csv_has_the_validation_columns() -> None:
    from segpipe.training.reports import metrics_csv as _metrics_csv

    nan = float("nan")
    history = {
        "epoch": [0, 1],
        "train_loss": [1.5, 1.25],
        "val_loss": [1.4, 1.2],
        "pseudo_dice": [[0.5, nan], [0.25, 0.75]],
        "mean_fg_dice": [0.5, 0.5],
        "ema_fg_dice": [0.5, 0.5],
        "val_dice": [nan, 0.625],
        "val_class_dice": [[nan, nan], [0.5, 0.75]],
        "lr": [0.01, 0.005],
        "epoch_seconds": [2.0, 3.0],
    }
    assert _metrics_csv(history, ["a", "b"]).splitlines() == [
        "epoch,train_loss,val_loss,dice_a,dice_b,mean_fg_dice,ema_fg_dice,val_dice,val_dice_a,val_dice_b,lr,seconds",
        "0,1.5,1.4,0.5,,0.5,0.5,,,,0.01,2",
        "1,1.25,1.2,0.25,0.75,0.5,0.5,0.625,0.5,0.75,0.005,3",
    ]
    # a history saved before the validation columns existed: empty cells
    old = {k: v for k, v in history.items() if not k.startswith("val_dice") and k != "val_class_dice"}
    assert _metrics_csv(old, ["a", "b"]).splitlines()[2] == "1,1.25,1.2,0.25,0.75,0.5,0.5,,,,0.005,3"


def test_progress_png_costs_at_most_a_twentieth_and_waits_at_most_30_s(tmp_path: Path, monkeypatch) -> None:
    from segpipe.training import reports

    drawn: list[int] = []
    monkeypatch.setattr(
        reports, "write_reports", lambda run_dir, history, names, **kw: drawn.append(len(history["epoch"]))
    )
    module = SegmentationModule(_tiny_config(), 1, 3, epochs=10, iterations_per_epoch=2)
    cb = reports.ProgressDrawer(tmp_path)

    def epoch_end(force: bool = False, draw_seconds: float = 1.0) -> None:
        module.history["epoch"].append(len(module.history["epoch"]))
        cb.draw(module, force=force)
        cb.draw_seconds = draw_seconds  # as if drawing took this long

    epoch_end()  # the first epoch: drawn
    epoch_end()  # right after: not drawn (a 1 s drawing waits 20 s)
    assert drawn == [1]
    assert cb.drawn_at is not None
    cb.drawn_at -= 19.0
    epoch_end()  # 19 s later: not yet
    cb.drawn_at -= 1.0
    epoch_end(draw_seconds=2.0)  # 20 s: drawn
    cb.drawn_at -= 30.0
    epoch_end()  # a 2 s drawing would wait 40 s, but never more than 30 s: drawn
    epoch_end(force=True)  # the last epoch: always
    assert drawn == [1, 4, 5, 6]


def test_record_validation_and_old_histories() -> None:
    module = SegmentationModule(_tiny_config(), 1, 3, epochs=4, iterations_per_epoch=2)
    module.configure_optimizers().step()
    module.on_train_epoch_start()
    module.on_train_epoch_end()
    assert _same(module.history["val_dice"], [math.nan]) and _same(module.history["val_class_dice"], [[math.nan] * 2])
    module.record_validation(0.5, [0.25, 0.75])
    assert module.history["val_dice"] == [0.5] and module.history["val_class_dice"] == [[0.25, 0.75]]
    state = module.training_state()
    state["history"] = {k: v for k, v in state["history"].items() if k not in ("val_dice", "val_class_dice")}
    other = SegmentationModule(_tiny_config(), 1, 3, epochs=4, iterations_per_epoch=2)
    other.load_training_state(state)  # a history from before the validation columns: NaN for its epochs
    assert _same(other.history["val_dice"], [math.nan]) and _same(other.history["val_class_dice"], [[math.nan] * 2])


def test_budget_respans_the_schedule(tmp_path: Path) -> None:
    from segpipe.training.callbacks import RunCheckpoint

    module = SegmentationModule(_tiny_config(), 1, 3, epochs=100, iterations_per_epoch=5)
    opt = module.configure_optimizers()
    assert module.scheduler is not None
    for _ in range(2):  # two epochs of 10 s done
        opt.step()
        module.scheduler.step()
    module.completed_epochs = 2
    module.history["epoch_seconds"] = [10.0, 10.0]
    cb = RunCheckpoint(tmp_path, max_time=100.0, resume={"elapsed_seconds": 40.0})
    cb.apply_budget(None, module)  # type: ignore[arg-type]
    # 100 s − 40 s spent = 60 s: 6 more epochs of 10 s (less whatever this test's clock took)
    assert module.planned_epochs in (7, 8)
    planned = module.planned_epochs
    assert module.scheduler.total_steps == planned
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 2 / planned) ** 0.9)


class _Estimate:
    def __init__(self, seconds: float):
        self.seconds = seconds

    def estimate_seconds(self, seconds_per_iteration: float, batch_size: int, *, window_seconds=None) -> float:
        assert (seconds_per_iteration, batch_size) == (2.0, 2)  # 10 s epochs of 5 iterations
        assert window_seconds is None  # no forward pass was timed in this test
        return self.seconds


@pytest.mark.parametrize(
    ("val_every", "measured", "planned", "last"),
    [
        # estimate 4 s → final 4 × 1.25 = 5 s; margin min(10, 2 % of 100 s) = 2 s; 2 s per iteration;
        # available 100 − 39 − 5 − 2 = 54 s: epochs 3-6 (40 s) and the validations after 4 and 6 (8 s)
        # = 48 s; 6 s left: a 7th epoch of 2 iterations (a hair under 6 s: the test's clock ran) → 7
        (2, None, 7, 2),
        # no validation before the final one: epochs 3-7 (50 s), then 1 iteration of an 8th
        (100, None, 8, 1),
        # measured 6 s (without the softmax) → final 7.5 s: 100 − 39 − 7.5 − 2 = 51.5 s → epochs 3-7, 1.5 s left
        (100, {"seconds": 6.0, "final": False}, 7, None),
        # … and one after epoch 4 (6 s): epochs 3-6 = 46 s, 5.5 s left → 2 iterations of a 7th
        (4, {"seconds": 6.0, "final": False}, 7, 2),
    ],
)
def test_budget_keeps_the_final_validation_in_reserve(tmp_path: Path, val_every, measured, planned, last) -> None:
    from segpipe.training.callbacks import RunCheckpoint

    module = SegmentationModule(_tiny_config(), 1, 3, epochs=100, iterations_per_epoch=5)
    module.configure_optimizers()
    module.completed_epochs = 2
    module.history["epoch_seconds"] = [10.0, 10.0]
    resume = {"elapsed_seconds": 39.0, "validation": measured}
    cb = RunCheckpoint(
        tmp_path, max_time=100.0, resume=resume, validation=_Estimate(4.0), val_every=val_every, batch_size=2
    )  # type: ignore[arg-type]
    cb.apply_budget(None, module)  # type: ignore[arg-type]
    assert (module.planned_epochs, module.final_epoch_iterations) == (planned, last)


def test_budget_plans_inside_the_first_epoch(tmp_path: Path) -> None:
    """Iterations timed inside an epoch plan the run before any epoch ended: a budget shorter than one
    epoch ends the first epoch early, and the per-iteration schedule spans exactly the planned steps."""
    from segpipe.training.callbacks import RunCheckpoint

    module = SegmentationModule(
        _tiny_config(), 1, 3, epochs=100, iterations_per_epoch=10, optim={"schedule_interval": "step"}
    )
    module.configure_optimizers()
    cb = RunCheckpoint(tmp_path, max_time=30.0, val_batches=4)
    cb.budget.iteration_times = [1.0, 1.2, 0.9]  # median 1 s; validation patches estimated 4 × 0.5 × 1 s = 2 s
    cb.apply_budget(None, module, done_in_epoch=4)  # type: ignore[arg-type]
    # available 30 − (a hair) − 0.6 margin: epoch 1 ends whole (6 + 2 s), epoch 2 (12 s): 20 s; then
    # 9.4 s: 7 iterations + 2 s → 3 epochs, the last of 7 iterations, 27 steps
    assert (module.planned_epochs, module.final_epoch_iterations) == (3, 7)
    assert module.scheduler is not None and module.scheduler.total_steps == 27
    # the shortened last epoch ends at its 7th iteration, the others run whole
    assert module.on_train_batch_start(None, 9) is None
    module.completed_epochs = 2
    assert module.on_train_batch_start(None, 6) is None and module.on_train_batch_start(None, 7) == -1
    # a budget smaller than what is done ends the epoch in progress at once
    cb = RunCheckpoint(tmp_path, max_time=1.0, val_batches=4)
    cb.budget.iteration_times = [1.0, 1.0, 1.0]
    module.completed_epochs = 0
    cb.apply_budget(None, module, done_in_epoch=4)  # type: ignore[arg-type]
    assert (module.planned_epochs, module.final_epoch_iterations) == (1, 4)
    assert module.scheduler.total_steps == 4


@pytest.mark.slow
def test_a_budget_shorter_than_an_epoch_ends_inside_it(tiny_run) -> None:
    plan, work = tiny_run
    settings = {**SETTINGS, "epochs": 50, "iterations_per_epoch": 100000, "max_time": "6s", "deterministic": False}
    settings["optim"] = {"name": "sgd", "schedule_interval": "step"}
    res = fit(plan, "3d_fullres", 2, work_dir=work, settings=settings, overwrite=True)
    assert res["finished"] and res["epochs"] == res["planned_epochs"] == 1 and not math.isnan(res["val_dice"])
    state = load_checkpoint(res["checkpoint"])
    steps = state["scheduler"]["last_epoch"]
    assert 3 <= steps == state["final_epoch_iterations"] == state["scheduler"]["total_steps"] < 100000


@pytest.mark.slow
@pytest.mark.parametrize(
    "selection",
    [f"loss={name}" for name in sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "loss").glob("*.yaml"))]
    + [
        f"optim={name}"
        for name in sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "optim").glob("*.yaml"))
    ],
)
def test_every_config_group_option_composes_and_trains_two_iterations(tiny_run, selection: str) -> None:
    """Each option of conf/loss/ and conf/optim/, composed as the CLI does, trains 2 iterations to finite losses."""
    from segpipe.config import compose_config, to_container

    plan, work = tiny_run
    cfg = compose_config([selection], command="train")
    group, option = selection.split("=")
    assert cfg[group]["name"] == option
    settings = {**SETTINGS, "epochs": 1, "deterministic": False, "optim": to_container(cfg.optim)}
    settings["loss"] = to_container(cfg.loss)
    res = fit(plan, "3d_fullres", 0, work_dir=work, settings=settings, overwrite=True)
    assert res["finished"] and res["epochs"] == 1
    metrics = (Path(res["run_dir"]) / "metrics.csv").read_text().splitlines()
    header, row = metrics[0].split(","), metrics[1].split(",")
    train_loss = float(row[header.index("train_loss")])
    assert math.isfinite(train_loss), (selection, train_loss)
