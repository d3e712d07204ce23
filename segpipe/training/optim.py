"""Optimizers, nnU-Net's poly learning-rate schedule, durations and the wall-clock budget.

* :func:`build_optimizer`: SGD with Nesterov momentum (lr 0.01, momentum 0.99, weight decay
  3e-5, nnU-Net's defaults) or AdamW. The defaults are written once, in ``conf/optim/<name>.yaml``.
* :class:`PolyLR`: ``lr = lr0 · (1 − step / total_steps) ** 0.9``. nnU-Net steps it once per
  epoch over its 1000 epochs; segpipe does the same by default (``schedule_interval: epoch``) and
  can step it once per iteration (``schedule_interval: step``) where the run has few epochs.
  ``total_steps`` is part of the scheduler's state, so a budget-sized schedule resumes as it was.
* :func:`parse_duration`: ``"20m"``, ``"2h"``, ``"90s"``, ``"1h30m"``, ``"00:20:00"`` or a
  number of seconds.
* :func:`fit_budget`: how many epochs (and iterations) still fit in a wall-clock budget so that
  the run ends, final validation included, inside it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from ..errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULE_INTERVALS = ("epoch", "step")
# settings of conf/optim/*.yaml that configure the schedule, not the torch optimizer
_SCHEDULE_KEYS = ("name", "poly_exponent", "schedule_interval")


# ============================================================================ optimizers
def _check_name(name: str) -> str:
    name = str(name).lower()
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}", hint=f"valid: {', '.join(OPTIMIZERS)} (optim=NAME)")
    return name


def _defaults(name: str) -> dict[str, Any]:
    from ..settings import option_defaults

    return option_defaults("optim", name)


def optim_defaults(name: str | None = None) -> dict[str, Any]:
    """The settings of optimizer ``name`` as written in ``conf/optim/<name>.yaml`` (a copy); None: the
    optimizer ``conf/config.yaml`` selects."""
    from ..settings import default_option

    return dict(_defaults(_check_name(default_option("optim") if name is None else name)))


def optim_settings(name: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The resolved settings of optimizer ``name`` (None: the one ``conf/config.yaml`` selects): its
    defaults with ``overrides`` applied.

    An override of ``None`` keeps the default (``lr=None`` means the optimizer's own initial rate).
    An unknown key is a :class:`ConfigError` listing the optimizer's settings; values are checked.
    """
    out = optim_defaults(name)
    unknown = sorted(k for k in overrides if k not in out)
    if unknown:
        raise ConfigError(
            f"optimizer {out['name']} has no setting {', '.join(unknown)}",
            hint=f"its settings: {', '.join(k for k in out if k != 'name')}",
        )
    out.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("lr", "weight_decay", "momentum", "eps", "poly_exponent"):
        if key in out:
            try:
                value = float(out[key])
            except (TypeError, ValueError):
                raise ConfigError(f"optimizer setting {key}={out[key]!r} is not a number") from None
            if not math.isfinite(value) or value < 0 or (key == "lr" and value == 0):
                raise ConfigError(
                    f"optimizer setting {key}={out[key]!r} is out of range",
                    hint=f"use a finite {'positive' if key == 'lr' else 'non-negative'} number",
                )
            if key == "momentum" and value >= 1:  # a momentum of 1 or more makes the steps grow without end
                raise ConfigError(
                    f"optimizer setting momentum={out[key]!r} is out of range", hint="a number in [0, 1), e.g. 0.99"
                )
            out[key] = value
    if str(out["schedule_interval"]) not in SCHEDULE_INTERVALS:
        raise ConfigError(
            f"schedule_interval={out['schedule_interval']!r} is not valid",
            hint=f"valid: {', '.join(SCHEDULE_INTERVALS)}",
        )
    return out


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
    settings: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> torch.optim.Optimizer:
    """The torch optimizer of ``settings`` (from :func:`optim_settings`; default: the optimizer
    ``conf/config.yaml`` selects, SGD as nnU-Net).

    ``overrides`` are applied on top (``build_optimizer(model.parameters(), lr=0.02)``).
    """
    merged = dict(settings or {})
    name = merged.pop("name", overrides.pop("name", None))
    cfg = optim_settings(name, **{**merged, **overrides})
    if cfg["name"] == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg["lr"],
            momentum=cfg["momentum"],
            nesterov=bool(cfg["nesterov"]) and cfg["momentum"] > 0,
            weight_decay=cfg["weight_decay"],
        )
    betas = tuple(float(b) for b in cfg["betas"])
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"betas={cfg['betas']!r} must be two numbers in [0, 1)", hint="e.g. betas=[0.9,0.999]")
    return torch.optim.AdamW(
        params,
        lr=cfg["lr"],
        betas=(betas[0], betas[1]),
        eps=cfg["eps"],
        weight_decay=cfg["weight_decay"],
        amsgrad=bool(cfg["amsgrad"]),
    )


# ============================================================================ poly schedule
def poly_factor(step: int, total_steps: int, exponent: float = 0.9) -> float:
    """``(1 − step / total_steps) ** exponent``, 0 from ``total_steps`` on."""
    step = min(max(int(step), 0), int(total_steps))
    return (1.0 - step / int(total_steps)) ** float(exponent)


class PolyLR(LRScheduler):
    """nnU-Net's poly decay: ``lr = lr0 · (1 − n / total_steps) ** exponent`` after ``n`` calls of
    :meth:`step` (an epoch, or an iteration: whatever the caller steps it on).

    Its state (``state_dict``) holds plain numbers only, ``total_steps`` included; a wall-clock
    budget may change the total during the run with :meth:`set_total_steps`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, exponent: float = 0.9, last_epoch: int = -1):
        self.total_steps = _positive_steps(total_steps)
        self.exponent = float(exponent)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        f = poly_factor(self.last_epoch, self.total_steps, self.exponent)
        return [float(base) * f for base in self.base_lrs]

    def set_total_steps(self, total_steps: int) -> None:
        """Re-span the schedule over ``total_steps`` (from the current step on) and update the rates."""
        self.total_steps = _positive_steps(total_steps)
        values = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = list[float | torch.Tensor](values)


def _positive_steps(total_steps: Any) -> int:
    if isinstance(total_steps, bool) or int(total_steps) < 1:
        raise ConfigError(f"the schedule needs at least 1 step, got {total_steps!r}", hint="use epochs ≥ 1")
    return int(total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, *, exponent: float = 0.9) -> PolyLR:
    """The poly schedule over ``total_steps`` (epochs, or iterations when stepped per iteration)."""
    return PolyLR(optimizer, total_steps, exponent)


# ============================================================================ durations
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([dhms])")
_DURATION_HINT = "write a duration such as 90s, 20m, 2h, 1h30m, 00:20:00 or a number of seconds"


def parse_duration(value: str | float | int | timedelta) -> float:
    """Seconds in a duration: ``"20m"``, ``"2h"``, ``"90s"``, ``"1h30m"``, ``"1d 2h"``,
    ``"HH:MM:SS"``, ``"DD:HH:MM:SS"`` (Lightning's form), a ``timedelta`` or a number of seconds.

    Anything else, and a duration that is not positive, is a :class:`ConfigError`.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_text(value)
    else:
        raise ConfigError(f"duration {value!r} is not a duration", hint=_DURATION_HINT)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"duration {value!r} must be positive", hint=_DURATION_HINT)
    return seconds


def _parse_text(value: str) -> float:
    text = value.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    if ":" in text:
        fields = text.split(":")
        if len(fields) in (3, 4) and all(re.fullmatch(r"\d+(\.\d*)?", f) for f in fields):
            scale = (86400.0, 3600.0, 60.0, 1.0)[4 - len(fields) :]
            return sum(float(f) * s for f, s in zip(fields, scale))
        raise ConfigError(f"duration {value!r} is not HH:MM:SS or DD:HH:MM:SS", hint=_DURATION_HINT)
    parts = _PART.findall(text)
    rest = _PART.sub("", text).strip()
    units = [u for _, u in parts]
    ordered = [u for u in "dhms" if u in units]
    if not parts or rest or units != ordered:  # leftovers, repeated or out-of-order units
        raise ConfigError(f"duration {value!r} is not understood", hint=_DURATION_HINT)
    return sum(float(n) * _UNITS[u] for n, u in parts)


# ============================================================================ budget
@dataclass(frozen=True)
class BudgetFit:
    """What still fits in a wall-clock budget (see :func:`fit_budget`)."""

    epochs: int  # whole epochs still to end (the one in progress included when it ends whole)
    iterations: int  # training iterations from now on: the whole epochs' plus a shortened last epoch's
    seconds_per_epoch: float
    seconds_left: float  # budget left now (may be negative when already over)
    seconds_needed: float  # what the whole epochs, their validations and the final validation will take
    iterations_per_epoch: int
    last_epoch_iterations: int = 0  # length of a shortened last epoch from its start (0: none)
    partial_iterations: int = 0  # the shortened last epoch's iterations from now on (0: none)


def fit_budget(
    max_time: float | str,
    elapsed: float,
    *,
    seconds_per_iteration: float,
    iterations_per_epoch: int,
    seconds_per_validation: float = 0.0,
    final_validation_seconds: float = 0.0,
    margin: float = 0.0,
    max_epochs: int | None = None,
    done_in_epoch: int = 0,
    completed_epochs: int = 0,
    val_every: int = 0,
    seconds_per_full_validation: float = 0.0,
) -> BudgetFit:
    """How much more training fits in ``max_time`` seconds when ``elapsed`` are spent.

    An epoch costs ``iterations_per_epoch × seconds_per_iteration + seconds_per_validation`` (the
    per-epoch validation, 0 without one); ``done_in_epoch`` iterations of the epoch in progress are
    already done (0 at an epoch's end). After every ``val_every``-th epoch (counted from
    ``completed_epochs``, the epochs already ended) a full-case validation of
    ``seconds_per_full_validation`` follows. The run must end with its final validation
    (``final_validation_seconds``) and a safety ``margin`` (seconds) inside the budget, so epochs are
    added while::

        elapsed + their iterations, validations + final_validation_seconds + margin ≤ max_time

    up to ``max_epochs`` (counting the one in progress). When the time left after the whole epochs
    still holds an iteration plus a per-epoch validation, a shortened last epoch takes it
    (``last_epoch_iterations``, counted from that epoch's start; an epoch in progress that cannot end
    whole is shortened to what fits, at least the iterations already done). Pure function: no clock
    is read.
    """
    budget = parse_duration(max_time)
    spi, spv = float(seconds_per_iteration), float(seconds_per_validation)
    ipe, pos = int(iterations_per_epoch), int(done_in_epoch)
    if not (spi > 0 and math.isfinite(spi)) or spv < 0 or ipe < 1 or not 0 <= pos < ipe:
        raise ConfigError(
            f"budget needs positive seconds per iteration and iterations per epoch (got {spi}, {ipe}), "
            f"non-negative validation seconds (got {spv}) and 0 ≤ done_in_epoch < iterations_per_epoch"
        )
    per_epoch = ipe * spi + spv
    left = budget - float(elapsed)
    available = left - float(final_validation_seconds) - float(margin)
    cap = math.inf if max_epochs is None else max(0, int(max_epochs))
    epochs = iterations = last = 0
    spent = pending = 0.0  # pending: the full validation owed before another epoch starts
    while epochs < cap:
        cost = pending + (ipe - pos) * spi + spv
        if spent + cost <= available + 1e-9:
            spent += cost
            iterations += ipe - pos
            epochs += 1
            pos = 0
            ended = int(completed_epochs) + epochs
            pending = float(seconds_per_full_validation) if val_every and ended % int(val_every) == 0 else 0.0
            continue
        room = available - spent - pending - spv
        more = max(0, math.floor(room / spi + 1e-9)) if room > 0 else 0
        more = min(more, ipe - pos - 1)
        if pos + more > 0:
            iterations += more
            last = pos + more
            spent += pending
        break
    partial = (last - pos) if last else 0
    needed = spent + (spv + partial * spi if last else 0.0) + float(final_validation_seconds)
    return BudgetFit(
        epochs=epochs,
        iterations=iterations,
        seconds_per_epoch=per_epoch,
        seconds_left=left,
        seconds_needed=needed,
        iterations_per_epoch=ipe,
        last_epoch_iterations=last,
        partial_iterations=partial,
    )


__all__ = [
    "OPTIMIZERS",
    "BudgetFit",
    "PolyLR",
    "build_optimizer",
    "build_scheduler",
    "fit_budget",
    "optim_defaults",
    "optim_settings",
    "parse_duration",
    "poly_factor",
]


# ============================================================================ budget defaults
#: the batch size a wall-clock budget on a CPU trains with (nnU-Net's minimum batch)
CPU_BUDGET_BATCH = 2


def budget_defaults(
    *, max_time: Any, device: str, given: Iterable[str], plan_batch: int
) -> tuple[dict[str, Any], str | None]:
    """What a wall-clock budget on a CPU changes when the user did not choose it.

    On a CPU a training step costs in proportion to its samples, so under ``max_time`` the plan's
    batch buys few optimizer steps: with neither ``batch_size`` nor ``schedule_interval`` given
    the run trains with batch :data:`CPU_BUDGET_BATCH` (when the plan's is larger) and steps the
    poly schedule per iteration, so that it decays smoothly over the few epochs the budget holds.
    A GPU, where a step's cost hardly depends on the batch, keeps the plan's settings; so does a
    run without a budget. Returns ``(settings to change, the line that says so)``.
    """
    given = set(given)
    if max_time is None:
        return {}, None
    name = str(device).lower()
    on_cpu = name == "cpu" or (name == "auto" and not torch.cuda.is_available())
    if not on_cpu:
        return {}, None
    changes: dict[str, Any] = {}
    said = []
    if not given & {"batch_size", "train.batch_size"} and int(plan_batch) > CPU_BUDGET_BATCH:
        changes["batch_size"] = CPU_BUDGET_BATCH
        said.append(
            f"batch {CPU_BUDGET_BATCH} (the plan's {plan_batch}: {plan_batch / CPU_BUDGET_BATCH:.1f}x more steps)"
        )
    if not given & {"schedule_interval", "optim.schedule_interval"}:
        changes["schedule_interval"] = "step"
        said.append("the learning rate decayed per iteration")
    if not changes:
        return {}, None
    line = (
        f"a {max_time} budget on the CPU: " + " and ".join(said) + " (a CPU step costs in proportion to its batch; "
        "batch_size= or schedule_interval= choose otherwise)"
    )
    return changes, line
