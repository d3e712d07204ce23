"""The engine that runs a trained network on the windows of a case: PyTorch, or OpenVINO on a CPU.

``runtime=`` (an ``infer`` setting): ``torch`` runs the network as trained; ``openvino`` converts it
once into an OpenVINO model compiled for this CPU (faster than PyTorch's eager CPU kernels for
segpipe's U-Nets by a factor that depends on the CPU, logits within ~1e-4: README, "Prediction
speed"); ``auto`` takes OpenVINO on a CPU when the ``openvino``
package is installed (``pip install 'segpipe[cpu]'``) and PyTorch otherwise, always PyTorch on CUDA.

:class:`OpenVINONetwork` is called like the torch module it replaces (``[B, C, *patch]`` in, the
full-resolution logits out), so flip TTA, fold and configuration ensembles and the sliding window
use it unchanged. The batch and spatial axes are dynamic (``window=fit`` sends windows of each
image's own size; a dynamic shape ran as fast as the static patch on OpenVINO's CPU plugin). A
converted network is stored in a cache folder when one is given, under a key made of the weights'
SHA-256, the patch it was traced with, the channels and the OpenVINO version, written atomically (a folder with ``network.xml`` and
``network.bin``), so the next run compiles it without converting; an entry that cannot be read is
converted again and replaced. Threads: as many as PyTorch would use in this process
(``OMP_NUM_THREADS``, ``torch.set_num_threads``), at most the CPUs its affinity mask allows.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..io.atomic import atomic_folder
from ..parallel import signals_blocked
from ..settings import configured

__all__ = [
    "RUNTIMES",
    "OpenVINONetwork",
    "check_precision",
    "choose_runtime",
    "compile_model",
    "compile_openvino",
    "convert_openvino",
    "export_openvino",
    "openvino_version",
]

log = logging.getLogger("segpipe")

RUNTIMES = ("auto", "torch", "openvino")
INSTALL_HINT = "pip install 'segpipe[cpu]' (or pip install openvino)"
NETWORK_XML, NETWORK_BIN = "network.xml", "network.bin"
OPENVINO_DIR = "openvino"  # in a workspace's dataset folder and in a model folder


@contextlib.contextmanager
def telemetry_declined() -> Iterator[None]:
    """Meanwhile, OpenVINO's converter and NNCF send no usage statistics.

    Both report usage to Google Analytics by default (from processes they fork, keeping a client id
    in ``~/intel``) unless the user opted out or the process runs as a CI job; segpipe runs where
    patient data lives and sends nothing anywhere, so it runs their entry points (the first import,
    each conversion, each quantisation) as such a job: ``CI=true`` in the environment, only meanwhile.
    """
    saved = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = saved


@functools.lru_cache(maxsize=1)
def _core() -> Any:
    """The process's one OpenVINO ``Core``: its CPU plugin and thread pool serve every network."""
    with telemetry_declined():
        import openvino as ov

    with signals_blocked():
        return ov.Core()


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when the package is not installed (read from its
    metadata: importing OpenVINO loads its libraries, which a run that converts nothing does not need)."""
    if importlib.util.find_spec("openvino") is None:
        return None
    try:
        return importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:  # importable without metadata (a source build)
        import openvino

        return str(openvino.__version__).split("-")[0]


def choose_runtime(requested: str, device: torch.device) -> tuple[str, str | None]:
    """The runtime to use for ``runtime=requested`` on ``device``, and a line saying why when ``auto``
    could not take OpenVINO on a CPU (None otherwise). ``openvino`` asked for where it cannot run is
    a :class:`~segpipe.errors.ConfigError` with the fix."""
    name = str(requested).strip().lower()
    if name not in RUNTIMES:
        raise ConfigError(f"runtime={requested} is not a runtime", hint=f"runtime={', '.join(RUNTIMES)}")
    if name == "torch":
        return "torch", None
    if device.type != "cpu":
        if name == "openvino":
            raise ConfigError(
                f"runtime=openvino runs on the CPU, and this prediction runs on {device}",
                hint="device=cpu runtime=openvino, or runtime=torch (or auto) on the GPU",
            )
        return "torch", None
    if openvino_version() is None:
        if name == "openvino":
            raise ConfigError("runtime=openvino: the openvino package is not installed", hint=INSTALL_HINT)
        return (
            "torch",
            f"OpenVINO is not installed, so the networks run in PyTorch ({INSTALL_HINT} for faster CPU prediction)",
        )
    return "openvino", None


PRECISIONS = ("fp32", "bf16", "int8")


def check_precision(precision: str, runtime: str) -> str:
    """``precision`` checked against the runtime and this CPU: ``fp32`` always; ``bf16`` only with
    OpenVINO on a CPU with native bf16 arithmetic (AVX-512 BF16 or AMX); ``int8`` only with OpenVINO
    (the int8 networks come from a model folder exported with ``quantize=int8``); else a
    :class:`~segpipe.errors.ConfigError` with the fix."""
    name = str(precision).strip().lower()
    if name not in PRECISIONS:
        raise ConfigError(
            f"precision={precision} is not a precision of prediction", hint="precision=fp32, bf16 or int8"
        )
    if name == "fp32":
        return name
    if runtime != "openvino":
        raise ConfigError(
            f"precision={name} needs the OpenVINO runtime, and this prediction runs in {runtime}",
            hint=f"runtime=openvino device=cpu precision={name}, or precision=fp32",
        )
    if name == "int8":
        return name
    if not cpu_has_bf16():
        raise ConfigError("precision=bf16: this CPU has no native bf16 arithmetic", hint="precision=fp32")
    return name


def cpu_has_bf16() -> bool:
    """Whether OpenVINO reports native bf16 arithmetic on this CPU."""

    with signals_blocked():
        return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def cpu_threads() -> int:
    """The threads PyTorch would use here (``torch.set_num_threads``, ``OMP_NUM_THREADS``; a process of
    a distributed batch gets its share), at most the CPUs this process may run on (its affinity mask)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    return max(1, min(int(torch.get_num_threads()), allowed))


class OpenVINONetwork(nn.Module):
    """A network compiled by OpenVINO for the CPU, called like the torch module it was converted from."""

    def __init__(self, compiled: Any, *, key: str, seconds: float, source: str) -> None:
        super().__init__()
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.output = compiled.output(0)
        self.key = key
        self.seconds = seconds  # converting (or reading) and compiling it
        self.source = source  # "converted" or "cache"

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        with signals_blocked():
            result = self.request.infer({0: array})[self.output]
        return torch.from_numpy(np.array(result, dtype=np.float32, copy=True))  # the request reuses its buffer


def network_key(weights_sha256: str, *, in_channels: int, patch: Sequence[int], version: str) -> str:
    """The cache key of a converted network: its weights, input shape and the OpenVINO version."""
    text = f"{weights_sha256}|{int(in_channels)}|{'x'.join(str(int(p)) for p in patch)}|{version}|dynamic"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def _plugin_config(precision: str, threads: int | None) -> dict[str, Any]:
    """The CPU plugin's settings: threads, and the arithmetic of what is not int8 (fp32 or bf16)."""
    hint = "bf16" if precision == "bf16" else "f32"
    return {"INFERENCE_NUM_THREADS": int(threads or cpu_threads()), "INFERENCE_PRECISION_HINT": hint}


def compile_model(model: Any, precision: str, *, threads: int | None = None) -> OpenVINONetwork:
    """An OpenVINO model (converted or read) compiled for this CPU as an :class:`OpenVINONetwork`."""
    start = time.perf_counter()
    with signals_blocked():
        compiled = _core().compile_model(model, "CPU", _plugin_config(precision, threads))
    return OpenVINONetwork(compiled, key="", seconds=time.perf_counter() - start, source="converted")


def int8_network_key(weights_sha256: str, *, in_channels: int, patch: Sequence[int], version: str) -> str:
    """The key of a network's int8 model (``segpipe export ... quantize=int8``) in a model folder."""
    return network_key(weights_sha256, in_channels=in_channels, patch=patch, version=f"{version}|int8")


def compile_openvino(
    network: nn.Module,
    *,
    in_channels: int,
    patch: Sequence[int],
    weights_sha256: str,
    cache_dir: Path | None = None,
    store: bool = True,
    threads: int | None = None,
    precision: str | None = None,
) -> OpenVINONetwork:
    """``network`` (a torch module in eval mode) as an :class:`OpenVINONetwork` for the CPU: read from
    ``cache_dir`` when converted before, else converted (and stored there when ``cache_dir`` is given
    and ``store``; a model folder's networks are read, never written). ``precision=int8`` reads the
    network's int8 model from ``cache_dir`` (a model folder exported with ``quantize=int8``); there is
    no converting one on the fly.

    A network OpenVINO cannot convert raises a :class:`~segpipe.errors.ConfigError` naming what failed.
    """

    version = openvino_version() or "unknown"
    patch = [int(p) for p in patch]
    precision = str(configured(precision, "infer.precision"))
    if precision == "int8":
        return _int8_network(in_channels, patch, weights_sha256, cache_dir=cache_dir, version=version, threads=threads)
    key = network_key(weights_sha256, in_channels=in_channels, patch=patch, version=version)
    # the converted network is fp32 either way: the precision is how the CPU plugin computes it
    config = _plugin_config(precision, threads)
    with signals_blocked():
        return _compile(
            network,
            _core(),
            key=key,
            config=config,
            entry=None if cache_dir is None else Path(cache_dir) / key,
            in_channels=in_channels,
            patch=patch,
            store=store,
        )


def _compile(
    network: nn.Module,
    core: Any,
    *,
    key: str,
    config: dict[str, Any],
    entry: Path | None,
    in_channels: int,
    patch: list[int],
    store: bool,
) -> OpenVINONetwork:
    """Read, or convert (and store), then compile ``network`` (see :func:`compile_openvino`)."""
    with telemetry_declined():
        import openvino as ov

    start = time.perf_counter()
    model, source = (_read_cached(core, entry, remove=store), "cache") if entry is not None else (None, "converted")
    if model is None:
        model, source = _convert(ov, network, in_channels=in_channels, patch=patch), "converted"
        if entry is not None and store:
            _store(ov, model, entry)
    compiled = core.compile_model(model, "CPU", config)
    return OpenVINONetwork(compiled, key=key, seconds=time.perf_counter() - start, source=source)


def _int8_network(
    in_channels: int,
    patch: list[int],
    weights_sha256: str,
    *,
    cache_dir: Path | None,
    version: str,
    threads: int | None,
) -> OpenVINONetwork:
    """The int8 model of a network, read from a model folder's ``openvino/`` and compiled."""
    key = int8_network_key(weights_sha256, in_channels=in_channels, patch=patch, version=version)
    entry = None if cache_dir is None else Path(cache_dir) / key
    start = time.perf_counter()
    with signals_blocked():
        model = None if entry is None else _read_cached(_core(), entry, remove=False)
        if model is None:
            raise ConfigError(
                f"precision=int8: the model has no int8 network for OpenVINO {version}",
                hint="export it with `segpipe export -o DIR runtime=openvino quantize=int8` (with this OpenVINO "
                "version) and predict with -m DIR, or use precision=fp32",
            )
        compiled = _core().compile_model(model, "CPU", _plugin_config("int8", threads))
    return OpenVINONetwork(compiled, key=key, seconds=time.perf_counter() - start, source="cache")


def read_openvino(entry: Path) -> Any:
    """The converted network stored in ``entry`` (a folder of ``network.xml`` and ``.bin``), or None."""
    with signals_blocked():
        return _read_cached(_core(), entry, remove=False)


def _read_cached(core: Any, entry: Path, *, remove: bool) -> Any:
    """The converted network stored in ``entry``, or None when there is none or it cannot be read
    (a damaged entry is removed with ``remove``, to be converted again)."""
    xml, weights = entry / NETWORK_XML, entry / NETWORK_BIN
    if not (xml.is_file() and weights.is_file()):
        return None
    try:
        return core.read_model(str(xml), str(weights))
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
        log.warning(f"{entry}: the stored OpenVINO network cannot be read ({_first_line(exc)}); converting it again")
        if remove:
            shutil.rmtree(entry, ignore_errors=True)
        return None


def convert_openvino(network: nn.Module, *, in_channels: int, patch: Sequence[int]) -> Any:
    """``network`` converted to an OpenVINO model (dynamic batch and spatial axes), not compiled."""
    with telemetry_declined():
        import openvino as ov

    with signals_blocked():
        return _convert(ov, network, in_channels=in_channels, patch=[int(p) for p in patch])


def _convert(ov: Any, network: nn.Module, *, in_channels: int, patch: list[int]) -> Any:
    """The OpenVINO model of ``network``, traced on the plan's patch, with dynamic batch and spatial axes."""
    example = torch.zeros((1, int(in_channels), *patch), dtype=torch.float32)
    shape = ov.PartialShape([-1, int(in_channels), *([-1] * len(patch))])
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # tracing notes on shapes: segpipe's networks take any multiple of their divisor
            with telemetry_declined():
                return ov.convert_model(network, example_input=example, input=[shape])
    except Exception as exc:  # noqa: BLE001 - the converter raises its own errors, naming the operation
        raise ConfigError(
            f"OpenVINO cannot convert this network ({_first_line(exc)})",
            hint="predict with runtime=torch",
        ) from None
    finally:
        network.train(was_training)


def _store(ov: Any, model: Any, entry: Path) -> None:
    """Write the converted network to ``entry`` atomically; a cache that cannot be written is only a
    slower next run, said in one line."""
    try:
        with atomic_folder(entry) as tmp:
            ov.save_model(model, str(tmp / NETWORK_XML), compress_to_fp16=False)
    except OSError as exc:
        log.warning(
            f"{entry}: the converted network was not stored ({exc.strerror or exc}); it is converted again next time"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def export_openvino(plan: Any, members: Sequence[Mapping[str, Any]], folder: Path) -> dict[str, Any]:
    """Convert the networks of a model folder being written (``folder``, whose ``members`` entries
    name their weight files) into ``folder/openvino/<key>/``; returns the OpenVINO version and, per
    weight file, the files of its converted network (relative to ``folder``)."""
    from ..checkpoint import load_checkpoint
    from ..networks import plan_network

    version = openvino_version()
    if version is None:
        raise ConfigError("runtime=openvino: the openvino package is not installed", hint=INSTALL_HINT)
    networks: dict[str, Any] = {}
    for member in members:
        cfg = plan.config(member["configuration"])
        net = plan_network(plan, member["configuration"])
        net.load_state_dict(load_checkpoint(folder / member["file"], map_location="cpu")["model"])
        compiled = compile_openvino(
            net.eval(),
            in_channels=plan.network_channels(member["configuration"]) * max(1, cfg.input_slices),
            patch=cfg.patch_size,
            weights_sha256=member["sha256"],
            cache_dir=folder / OPENVINO_DIR,
        )
        networks[member["file"]] = [f"{OPENVINO_DIR}/{compiled.key}/{name}" for name in (NETWORK_XML, NETWORK_BIN)]
    return {"version": version, "networks": networks}
