"""Training checkpoints that resume exactly and load with ``torch.load(weights_only=True)``.

A checkpoint is one ``.pt`` file holding a dict of tensors and plain Python values only (dict,
list, tuple, str, int, float, bool, None): the model, optimizer and scheduler ``state_dict``\\ s,
the epoch and step counters, the data pipeline's and case sampler's state, the loss history and
every random-number generator's state (:func:`capture_rng`). Nothing in it is a pickled class, a
numpy array or an OmegaConf node, so loading it runs no code: :func:`load_checkpoint` uses
``weights_only=True`` and refuses anything else with a :class:`~segpipe.errors.StateError`.

Files are written atomically (temporary file in the same folder, ``fsync``, ``os.replace``): a
kill at any moment leaves the previous checkpoint intact, never a truncated one.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch

from .errors import StateError
from .io.atomic import atomic_path

CHECKPOINT_FORMAT = "segpipe.training.checkpoint"  # the name files carry (the module's first home)
CHECKPOINT_VERSION = 1


# ============================================================================ RNG states
def _python_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _plain_bit_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A ``BitGenerator.state`` dict with its 128-bit integers as decimal strings (any size fits,
    and nothing relies on the unpickler's handling of long integers)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, np.ndarray):
            return {"__ndarray__": torch.from_numpy(v.astype(np.int64) if v.dtype.kind == "u" else v.copy())}
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return {"__int__": str(int(v))}
        return v

    return conv(state)


def _bit_state_from_plain(state: Mapping[str, Any]) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, Mapping):
            if set(v) == {"__int__"}:
                return int(v["__int__"])
            if set(v) == {"__ndarray__"}:
                return v["__ndarray__"].numpy().astype(np.uint32)
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(state)


def capture_rng(generators: Mapping[str, np.random.Generator] | None = None) -> dict[str, Any]:
    """Every random-number generator's state, as tensors and plain values.

    Python's ``random``, numpy's global ``np.random``, torch's CPU generator, each CUDA device's
    generator (when CUDA is initialised) and, by name, the ``np.random.Generator`` objects in
    ``generators`` (a data pipeline's own). :func:`restore_rng` puts them back exactly.
    """
    state: dict[str, Any] = {
        "python": _python_state(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": [],
        "generators": {},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [t.cpu() for t in torch.cuda.get_rng_state_all()]
    for name, gen in (generators or {}).items():
        state["generators"][str(name)] = _plain_bit_state(gen.bit_generator.state)
    return state


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, np.random.Generator] | None = None) -> None:
    """Put back the generator states of :func:`capture_rng` (and those of ``generators`` by name).

    CUDA states are restored onto as many devices as both the checkpoint and this machine have;
    a named generator missing from ``state`` is a :class:`StateError`.
    """
    try:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
        npy = state["numpy"]
        np.random.set_state(  # noqa: NPY002 (the global generator is what is saved)
            (
                npy["bit_generator"],
                npy["keys"].numpy().astype(np.uint32),
                int(npy["pos"]),
                int(npy["has_gauss"]),
                float(npy["cached_gaussian"]),
            )
        )
        torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
        cuda = list(state.get("cuda") or [])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise StateError(
            f"the checkpoint's random-number state is incomplete or damaged ({type(exc).__name__}: {exc})",
            hint="resume from another checkpoint or start again with overwrite=true",
        ) from None
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.to(torch.uint8).cpu(), i)
    saved = state.get("generators") or {}
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise StateError(
                f"the checkpoint holds no state of the random generator {name!r}",
                hint="resume with the settings the run started with, or start again with overwrite=true",
            )
        gen.bit_generator.state = _bit_state_from_plain(saved[name])


# ============================================================================ plain values
def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` as tensors and plain values: numpy arrays become tensors, numpy scalars Python
    numbers, mappings dicts (OmegaConf containers included), ``Path`` strings. Anything else that
    is not a tensor or plain value is a ``TypeError`` naming where it sits."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.Size, torch.dtype, torch.device)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping) or type(obj).__name__ == "DictConfig":
        return {_plain_key(k, where): to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ListConfig":
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    raise TypeError(f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}, not a tensor or plain value")


def _plain_key(key: Any, where: str) -> Any:
    if isinstance(key, (str, int, bool)) or key is None:
        return key
    if isinstance(key, np.integer):
        return int(key)
    raise TypeError(f"{where} has a key of type {type(key).__name__}, not str or int")


# ============================================================================ save / load
class DamagedCheckpointError(StateError):
    """A checkpoint file that cannot be read back (truncated, overwritten, not a zip archive)."""


def previous_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Where :func:`save_checkpoint` with ``keep_previous`` keeps the file it replaces:
    ``last.pt`` → ``last.prev.pt``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.prev{p.suffix}")


class _Writes:
    """A file for ``torch.save`` that keeps the first ``OSError`` of its writes (a full disk): torch
    turns it into a RuntimeError that no longer says why."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self.f.write(data))
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any], *, keep_previous: bool = False) -> Path:
    """Write ``state`` (converted by :func:`to_plain`, stamped with the format) to ``path`` atomically.

    With ``keep_previous`` the file it replaces becomes :func:`previous_checkpoint` (renamed, once
    the new one is complete on disk), so one damaged file never loses the run: at every moment
    one of the two is complete.
    """
    payload = to_plain(dict(state))
    payload["format"] = CHECKPOINT_FORMAT
    payload["format_version"] = CHECKPOINT_VERSION
    target = Path(path)
    with atomic_path(target, ext=".pt") as tmp:
        with open(tmp, "wb") as f:
            writer = _Writes(f)
            try:
                torch.save(payload, cast(IO[bytes], writer))
            except RuntimeError:
                if writer.error is not None:  # torch reports a failed write as a RuntimeError: give the cause
                    if writer.error.filename is None:
                        writer.error.filename = str(target)
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and target.is_file():
            os.replace(target, previous_checkpoint(target))
    try:  # make the rename itself durable
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
    return target


def load_checkpoint(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    A missing, truncated or damaged file, one holding pickled objects (which could run code when
    loaded) and one of another format are each a one-line :class:`StateError`.
    """
    p = Path(path)
    fix = "start again with overwrite=true (or restore the file from a backup)"
    if not p.is_file():
        raise StateError(f"no checkpoint at {p}", hint="train first (segpipe train) or pass the run's folder")
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), "")
        raise StateError(
            f"checkpoint {p} holds objects other than tensors and plain values; refused, loading it could run code"
            + (f" ({detail})" if detail else ""),
            hint=fix,
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DamagedCheckpointError(f"checkpoint {p} is truncated or damaged ({reason})", hint=fix) from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise StateError(f"{p} is not a segpipe training checkpoint", hint=fix)
    if data.get("format_version") != CHECKPOINT_VERSION:
        raise StateError(
            f"checkpoint {p} has format version {data.get('format_version')!r}; this segpipe reads {CHECKPOINT_VERSION}",
            hint=fix,
        )
    return data


__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "DamagedCheckpointError",
    "capture_rng",
    "load_checkpoint",
    "previous_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "to_plain",
]
