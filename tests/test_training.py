"""Training: optimizers, the poly schedule, durations, the wall-clock budget, checkpoints with
every RNG state, the LightningModule and fit with exact resume."""

from __future__ import annotations

import os
import random
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe.errors import ConfigError, StateError
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
    assert (fit.epochs, fit.iterations, fit.partial_iterations) == (13, 138, 8)
    assert (fit.seconds_per_epoch, fit.seconds_left, fit.seconds_needed) == (70.0, 1100.0, 13 * 70.0 + 120.0)
    assert fit.seconds_needed + 10 + 100 <= 1200


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
