"""The predictor: a trained model applied to whole cases, answered in each case's own geometry.

``Predictor.from_model("model/")`` (a folder ``segpipe export`` wrote) or
``Predictor.from_workspace(work_dir=..., dataset=...)`` (the trained runs) loads every network once;
``predictor.predict("case.nii.gz")`` (or a DICOM series folder, a list of channel files, or an
array with its :class:`~segpipe.geometry.Geometry`) returns a :class:`Prediction`.

For each configuration of the model, the case is preprocessed exactly as in training (transpose,
crop, normalise, resample: :func:`~segpipe.preprocessing.preprocess_arrays`), each fold's network
slides over it (Gaussian-weighted windows, overlap 0.5 by default, windows batched), with flip
test-time augmentation over every spatial axis unless ``tta=False``. The folds' logits are averaged
(nnU-Net's fold ensemble) and turned into probabilities. Several configurations are averaged as
probabilities on the case's own grid. Then the argmax, the post-processing decision (largest
connected component of the classes chosen on cross-validation), and the label map lies on the
input's grid: same shape, spacing, origin and direction, whatever the plan's spacing and axis order.

Memory: nothing is float64; with one configuration and no probabilities asked for, the label map
is restored one class at a time (:func:`~segpipe.preprocessing.restore_argmax`), so no K-class map
at the original resolution is ever held.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arrays import regions_to_labels
from ..errors import ConfigError, DataError, UsageError
from ..geometry import Geometry
from ..io.formats import case_id_of
from ..settings import configured
from .cascade import stage_only, with_previous_stage
from .flags import InputCheck, inspect_input
from .model import CHECKPOINTS, Model, file_sha256, load_model_folder, parse_configs, parse_folds, workspace_model
from .postprocess import apply_postprocessing
from .runtimes import (
    OPENVINO_DIR,
    check_precision,
    choose_runtime,
    compile_openvino,
    cpu_threads,
    openvino_version,
)
from .sliding_window import predict_case_logits
from .tta import FlipTTA
from .windows import case_window, check_window_mode, network_divisor, window_layout

__all__ = ["Prediction", "Predictor", "resolve_device"]

log = logging.getLogger("segpipe")

ImageInput = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | np.ndarray | torch.Tensor


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None): CUDA when present, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    if isinstance(device, torch.device):
        return device
    name = "auto" if device is None else str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in ("gpu", "cuda") or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device}: no CUDA device is available here", hint="device=cpu or device=auto")
        return torch.device("cuda" if name == "gpu" else name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device={device} is not a device", hint="device=auto, cpu, cuda or cuda:N")


@dataclass
class Prediction:
    """One case's result: ``label`` [Z, Y, X] on ``geometry`` (the input's grid), class values
    0..K-1; ``probabilities`` [K, Z, Y, X] float16 when asked for; ``seconds`` of prediction."""

    label: np.ndarray
    geometry: Geometry
    labels: dict[int, str]
    probabilities: np.ndarray | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    check: InputCheck | None = None  # the input's flags and a strided copy of it (segpipe.inference.flags)

    def volumes_ml(self) -> dict[str, float]:
        """Volume of each foreground class in millilitres (voxel count × voxel volume)."""
        voxel_ml = float(np.prod(self.geometry.spacing)) / 1000.0
        counts = np.bincount(self.label.ravel(), minlength=max(self.labels) + 1)
        return {name: float(counts[value]) * voxel_ml for value, name in self.labels.items() if value > 0}


class Predictor:
    """A trained :class:`~segpipe.inference.model.Model` ready to segment cases (see the module docstring).

    Options: ``tta`` (flip test-time augmentation, default on), ``overlap`` of the sliding windows
    (0.5), ``window`` (``pad``: the plan's patch; ``fit``: a window fitted to each image, see
    :func:`~segpipe.inference.windows.fitted_window`), ``batch_size`` (windows per forward pass; default 1 on a CPU, the plan's batch on a GPU), ``device``
    (``auto``: CUDA when present), ``strict`` (an input unlike the training data fails), ``runtime`` (``auto``: OpenVINO on a CPU when installed, see
    :mod:`segpipe.inference.runtimes`), ``precision`` (``fp32``; ``bf16`` or ``int8`` with OpenVINO, int8 from a model folder exported with ``quantize=int8``), ``dicom`` (options of the DICOM reader: ``series=``, ...).
    ``network_cache``: a folder for the networks converted for OpenVINO (the workspace's), written
    unless ``store_networks`` is false (a model folder's ``openvino/``, stored there by
    ``segpipe export runtime=openvino``, is only read; without it they are converted in memory).
    """

    def __init__(
        self,
        model: Model,
        *,
        tta: bool | None = None,
        overlap: float | None = None,
        window: str | None = None,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        runtime: str | None = None,
        precision: str | None = None,
        dicom: Mapping[str, Any] | None = None,
        network_cache: str | os.PathLike[str] | None = None,
        store_networks: bool = True,
        strict: bool | None = None,
    ):
        device = configured(device, "infer.device")
        runtime = configured(runtime, "infer.runtime")
        precision = configured(precision, "infer.precision")
        tta = configured(tta, "infer.tta")
        overlap = configured(overlap, "infer.overlap")
        window = str(configured(window, "infer.window")).strip().lower()
        from ..checkpoint import load_checkpoint
        from ..networks import network_outputs, plan_network

        if not model.members:
            raise ConfigError("the model has no trained network")
        if not 0.0 <= float(overlap) < 1.0:
            raise ConfigError(f"overlap={overlap} must be in [0, 1)", hint="overlap=0.5 (the default)")
        check_window_mode(window)
        if batch_size is not None and int(batch_size) < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1 (or null for the plan's)")
        self.model = model
        self.plan = model.plan
        self.tta, self.overlap, self.window = bool(tta), float(overlap), window
        self.strict = bool(configured(strict, "infer.strict"))  # an input unlike the training data fails
        self.batch_size = None if batch_size is None else int(batch_size)
        self.device = resolve_device(device)
        self.runtime, why_not = choose_runtime(str(runtime), self.device)
        if why_not:
            log.info(why_not)
        self.precision = check_precision(str(precision), self.runtime)
        if self.precision == "int8":
            _check_int8(model)
        self.dicom = {k: v for k, v in dict(dicom or {}).items() if v is not None}
        self.labels = {int(k): str(v) for k, v in self.plan.labels.items() if int(k) < self.plan.num_classes}
        self.networks: dict[str, list[torch.nn.Module]] = {}
        # what the networks are, for reports: a retrained fold or an edited plan is another model
        self.member_sha256 = [m.sha256 or file_sha256(m.path) for m in model.members]
        self.plan_sha256 = model.plan_sha256()
        # a model nnU-Net trained: its resampling, mirroring axes and (for regions) sigmoid outputs
        self.nnunet: dict[str, Any] | None = (self.plan.settings or {}).get("nnunet") or None
        self.outputs = network_outputs(self.plan)
        for member in model.members:
            net = plan_network(self.plan, member.configuration)
            try:
                weights = member.weights if member.weights is not None else load_checkpoint(member.path)["model"]
                net.load_state_dict(weights)
            except (KeyError, RuntimeError) as exc:
                raise ConfigError(
                    f"{member.path}: the weights do not fit the {member.configuration} network of the plan "
                    f"({str(exc).splitlines()[0][:160]})",
                    hint="use the plans.json the model was trained with (export the model again)",
                ) from None
            net.eval().to(self.device)
            self.networks.setdefault(member.configuration, []).append(net)
        # converted on first use: a batch whose cases are all done, or a case refused before its
        # first window, costs no conversion
        self._openvino_pending = self.runtime == "openvino"
        self._openvino_fallback = str(runtime).strip().lower() == "auto"
        self._network_cache = None if network_cache is None else Path(network_cache)
        self._store_networks = bool(store_networks)

    def prepare(self) -> Predictor:
        """Convert and compile the networks for the runtime now (they are otherwise prepared on first
        use, so that a batch of finished cases costs nothing); returns the predictor."""
        self._to_openvino()
        return self

    def _to_openvino(self) -> None:
        """Every network compiled by OpenVINO (read from the network cache when converted before); with
        ``runtime=auto``, a network OpenVINO cannot convert keeps them all in PyTorch."""
        if not self._openvino_pending:
            return
        self._openvino_pending = False
        fallback, cache = self._openvino_fallback, self._network_cache
        compiled: dict[str, list[torch.nn.Module]] = {}
        shas = iter(self.member_sha256)
        start, converted = time.perf_counter(), 0
        try:
            for configuration, nets in self.networks.items():
                cfg = self.plan.config(configuration)
                for net in nets:
                    ov_net = compile_openvino(
                        net,
                        in_channels=self.plan.network_channels(configuration) * max(1, cfg.input_slices),
                        patch=cfg.patch_size,
                        weights_sha256=next(shas),
                        cache_dir=cache,
                        store=self._store_networks,
                        precision=self.precision,
                    )
                    converted += ov_net.source == "converted"
                    compiled.setdefault(configuration, []).append(ov_net)
        except ConfigError as exc:
            if not fallback or self.precision != "fp32":  # PyTorch computes neither bf16 nor int8 here
                raise
            log.warning(f"{exc.message}: the networks run in PyTorch")
            self.runtime = "torch"
            return
        self.networks = compiled
        n = sum(len(v) for v in compiled.values())
        how = f"{converted} converted" + ("" if cache is None else f", {n - converted} from {cache}")
        log.info(f"OpenVINO {openvino_version()}: {n} network(s) ready in {time.perf_counter() - start:.1f} s ({how})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls,
        path: str | os.PathLike[str],
        *,
        configs: Sequence[str] | str | None = None,
        folds: Any = None,
        checkpoint: str | None = None,
        **options: Any,
    ) -> Predictor:
        """The predictor of a model folder written by ``segpipe export`` (every member by default), or
        of an nnU-Net v2 trained model folder (``<Trainer>__<Plans>__<configuration>/`` with
        ``dataset.json``, ``plans.json`` and ``fold_<k>/checkpoint_final.pth``; ``checkpoint=best``
        takes ``checkpoint_best.pth``; see :mod:`segpipe.inference.nnunet_folder`)."""
        from .nnunet_folder import is_nnunet_folder, load_nnunet_folder

        if is_nnunet_folder(path):
            checkpoint = str(configured(checkpoint, "infer.checkpoint"))
            if checkpoint not in CHECKPOINTS:
                raise UsageError(f"checkpoint={checkpoint} is not one of {', '.join(CHECKPOINTS)}")
            nn_model = load_nnunet_folder(path, folds=parse_folds(folds), checkpoint=checkpoint)
            return cls(nn_model.select(parse_configs(configs), None), **options)
        model = load_model_folder(path)
        if model.info.get("openvino"):  # networks converted at export, checked with the folder; never written
            options = {"network_cache": Path(model.origin) / OPENVINO_DIR, "store_networks": False, **options}
        return cls(model.select(parse_configs(configs), parse_folds(folds)), **options)

    @classmethod
    def from_workspace(
        cls,
        work_dir: str | os.PathLike[str] | None = None,
        dataset: str | os.PathLike[str] | None = None,
        *,
        configs: Sequence[str] | str | None = None,
        folds: Any = None,
        checkpoint: str | None = None,
        **options: Any,
    ) -> Predictor:
        """The predictor of a workspace's trained runs (``segpipe train``): the chosen configuration
        (``find-best``'s, else ``3d_fullres``) and every trained fold, unless ``configs``/``folds``."""
        checkpoint = configured(checkpoint, "infer.checkpoint")
        from ..planning import load_plan
        from ..workspace import find_dataset

        if checkpoint not in CHECKPOINTS:
            raise UsageError(f"checkpoint={checkpoint} is not one of {', '.join(CHECKPOINTS)}")
        _ws, dws = find_dataset(work_dir, dataset, "infer")
        plan = load_plan(dws.plans_path)
        model = workspace_model(
            dws, plan, configs=parse_configs(configs), folds=parse_folds(folds), checkpoint=checkpoint
        )
        cache = dws.openvino_dir if _writable(dws.root) else None  # a read-only workspace is only read
        return cls(model, network_cache=cache, **options)

    # ------------------------------------------------------------------ reading
    def read(
        self, source: ImageInput, geometry: Geometry | None = None, *, case_id: str | None = None
    ) -> tuple[np.ndarray, Geometry]:
        """The image [C, Z, Y, X] float32 and its geometry, checked as a dataset case is (channels,
        dimensions, NaN/inf, blank images): a file, a DICOM series folder, a list of channel files,
        or an array with ``geometry``."""
        if isinstance(source, (np.ndarray, torch.Tensor)):
            if geometry is None:
                raise UsageError(
                    "an image array needs its geometry",
                    hint="pass geometry=segpipe.Geometry(shape=..., spacing=(z, y, x) in mm, ...), "
                    "or the image file so its header gives it",
                )
            array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
            if array.ndim == 3:
                array = array[None]
            if array.ndim != 4:
                raise DataError(f"expected an image [C, Z, Y, X] or [Z, Y, X], got shape {array.shape}")
            if tuple(array.shape[1:]) != tuple(geometry.shape):
                raise DataError(f"image shape {array.shape[1:]} differs from the geometry's {geometry.shape}")
            if array.shape[0] != self.plan.in_channels:
                raise DataError(
                    f"the image has {array.shape[0]} channel(s), the model expects {self.plan.in_channels} "
                    f"({', '.join(self.plan.channel_names.values())})"
                )
            if not np.isfinite(array).all():
                raise DataError("the image holds NaN/inf voxels", hint="replace them by the background value")
            return np.asarray(array, dtype=np.float32), geometry
        from ..io.datasets import Case, read_case

        paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
        if not paths:
            raise UsageError("no image file given")
        case = Case(case_id or case_id_of(paths[0]), tuple(paths))
        data = read_case(case, self._input_dataset(paths[0]))
        return np.asarray(data.image, dtype=np.float32), data.geometry

    def _input_dataset(self, first: Path) -> Any:
        from ..io.datasets import Dataset

        return Dataset(
            name="input",
            root=first.parent.resolve(),
            layout="case-folder",
            channel_names={int(k): str(v) for k, v in self.plan.channel_names.items()},
            labels={int(k): str(v) for k, v in self.plan.labels.items()},
            cases=[],
            dicom_options=dict(self.dicom),
        )

    # ------------------------------------------------------------------ prediction
    def _window_network(self, configuration: str) -> torch.nn.Module:
        """The sliding window's predictor of one configuration: its folds' mean logits per window
        (the same as averaging whole-image logits: the window blend is linear), each under flip TTA."""
        self._to_openvino()
        axes = None if self.nnunet is None else self.nnunet.get("mirror_axes")
        mirror = self.tta and (self.nnunet is None or bool(axes))  # nnU-Net models mirror their trained axes only
        nets = [FlipTTA(net, axes=axes).eval() if mirror else net for net in self.networks[configuration]]
        return nets[0] if len(nets) == 1 else _MeanOf(nets).eval()

    def _slide(self, image: np.ndarray, configuration: str, sink: Any, name: str = "sliding window") -> None:
        """Slide the configuration's fold ensemble over its preprocessed image, handing the
        finished rows of logits [K, n, Y', X'] to ``sink(row, block)``; the progress of its
        windows is shown under ``name``."""
        cfg = self.plan.config(configuration)
        # the windows first: a case refused for their number costs no conversion of the networks
        spatial = tuple(int(s) for s in image.shape[1:])
        size = case_window(spatial, cfg.patch_size, network_divisor(cfg.strides), self.window)
        window_layout(spatial, size, self.overlap, cfg.context_slices)
        kwargs: dict[str, Any] = {
            "overlap": self.overlap,
            "window": self.window,
            "num_classes": self.outputs,
            "device": self.device,
        }
        if self.batch_size is not None:
            kwargs["batch_size"] = self.batch_size
        elif self.device.type == "cpu":  # one window per pass: as fast on a CPU, and less memory than the plan's batch
            kwargs["batch_size"] = 1
        predict_case_logits(
            self._window_network(configuration), image, cfg, output_device="cpu", sink=sink, progress=name, **kwargs
        )

    def _regions(self) -> list[int] | None:
        """The label values of a region model's outputs, in order (None for class outputs)."""
        regions = (self.plan.settings or {}).get("regions")
        return [int(v) for v in regions["class_order"]] if regions else None

    def _decode(self, scores: np.ndarray) -> np.ndarray:
        """The label map of class scores [K, ...] (argmax), or of region logits (nnU-Net's sigmoid > 0.5)."""
        regions = self._regions()
        dtype = np.uint8 if self.plan.num_classes <= 256 else np.int16
        if regions is None:
            return scores.argmax(axis=0).astype(dtype, copy=False)
        sig = torch.sigmoid(torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))).numpy()
        return regions_to_labels(sig, regions, dtype=dtype)

    def _label_grid(self, image: np.ndarray, configuration: str, name: str) -> np.ndarray:
        """The label map [Z', Y', X'] on the preprocessed grid, row block by row block."""
        dtype = np.uint8 if self.plan.num_classes <= 256 else np.int16
        label = np.zeros(image.shape[1:], dtype=dtype)

        def sink(row: int, block: torch.Tensor) -> None:
            label[row : row + block.shape[1]] = self._decode(block.numpy())

        self._slide(image, configuration, sink, name)
        return label

    def _probabilities(self, image: np.ndarray, configuration: str, name: str) -> np.ndarray:
        """Softmax [K, Z', Y', X'] float32 of the configuration's fold ensemble on its preprocessed grid
        (the logits for a model nnU-Net trained, which resamples logits and then applies its
        nonlinearity, and for a region model, whose regions each take a sigmoid after resampling)."""
        probs = np.zeros((self.outputs, *image.shape[1:]), dtype=np.float32)
        raw = self.nnunet is not None or self._regions() is not None

        def sink(row: int, block: torch.Tensor) -> None:
            probs[:, row : row + block.shape[1]] = (block if raw else torch.softmax(block, dim=0)).numpy()

        self._slide(image, configuration, sink, name)
        return probs

    def predict(
        self,
        source: ImageInput,
        geometry: Geometry | None = None,
        *,
        probabilities: bool | None = None,
        case_id: str | None = None,
    ) -> Prediction:
        """Segment one case (see :meth:`read` for ``source``); the label map is on the input's grid.

        While the windows run, their progress is shown under ``case_id`` (or the file's name) on
        stderr when the ``segpipe`` logger shows INFO (see :mod:`segpipe.progress`)."""
        probabilities = configured(probabilities, "infer.probabilities")
        from ..preprocessing import preprocess_arrays, restore, restore_argmax, spec_from_plan

        t0 = time.perf_counter()
        image, geo = self.read(source, geometry, case_id=case_id)
        check = inspect_input(image, geo, self.plan, source=source, strict=self.strict)
        timings = {"read": time.perf_counter() - t0}
        configs = [c for c in self.networks if not stage_only(self.plan, c, list(self.networks))]
        name = case_id or _source_name(source)
        mean: np.ndarray | None = None
        label: np.ndarray | None = None
        for i, configuration in enumerate(configs):
            t = time.perf_counter()
            spec = spec_from_plan(self.plan, configuration)
            grid, _, props = preprocess_arrays(image, None, geo, spec, self.plan.num_classes)
            if self.plan.previous_stage(configuration):  # the 3-D cascade: the first stage's answer joins
                grid = with_previous_stage(self, image, geo, configuration, grid, name=name, props=props)
            if self._regions() is not None:
                props["regions"] = self._regions()
            if i == len(configs) - 1:
                del image  # the preprocessed grid is all the last configuration needs
            timings["preprocess"] = timings.get("preprocess", 0.0) + time.perf_counter() - t
            t = time.perf_counter()
            lean = len(configs) == 1 and not probabilities
            what = f"{name}: sliding window" + (f" ({configuration})" if len(configs) > 1 else "")
            if lean and list(props["shape_after_resample"]) == list(props["shape_after_crop"]):
                # no resampling back: the argmax of each finished row block is the answer
                grid_label = self._label_grid(grid, configuration, what)
                del grid
                timings["network"] = timings.get("network", 0.0) + time.perf_counter() - t
                t = time.perf_counter()
                label = restore(grid_label, props, is_label=True)
                del grid_label
            else:
                probs = self._probabilities(grid, configuration, what)
                del grid
                timings["network"] = timings.get("network", 0.0) + time.perf_counter() - t
                t = time.perf_counter()
                if lean:
                    label = restore_argmax(probs, props)
                else:
                    restored = restore(probs, props, is_label=False)
                    if mean is None:
                        mean = restored
                    else:
                        mean += restored
                    del restored
                del probs
            timings["restore"] = timings.get("restore", 0.0) + time.perf_counter() - t
        prob_out: np.ndarray | None = None
        if mean is not None:
            mean /= len(configs)
            regions = self._regions()
            if regions is None:
                label = mean.argmax(axis=0).astype(np.uint8 if mean.shape[0] <= 256 else np.int16)
            else:  # the regions' probabilities: each above 0.5 writes its value
                label = regions_to_labels(mean, regions)
            if probabilities:
                prob_out = mean.astype(np.float16)
            del mean
        assert label is not None
        t = time.perf_counter()
        label = apply_postprocessing(label, self.model.postprocessing)
        timings["postprocess"] = time.perf_counter() - t
        if tuple(label.shape) != tuple(geo.shape):  # the restore's contract; never write a wrong grid
            raise RuntimeError(f"restored label shape {label.shape} differs from the input's {geo.shape}")
        return Prediction(label, geo, self.labels, prob_out, time.perf_counter() - t0, timings, check)

    def compute(self) -> dict[str, Any]:
        """Where and how the networks ran, for each case's report: device, runtime, precision, threads."""
        threads = cpu_threads() if self.runtime == "openvino" else torch.get_num_threads()
        return {
            "device": str(self.device),
            "runtime": self.runtime if self.runtime == "torch" else f"openvino {openvino_version()}",
            "precision": self.precision,
            "threads": int(threads) if self.device.type == "cpu" else None,
        }

    def describe(self) -> dict[str, Any]:
        """What this predictor runs (for reports): dataset, members, options."""
        return {
            "dataset": self.plan.dataset,
            "origin": self.model.origin,
            "members": [
                {"configuration": m.configuration, "fold": m.fold, "sha256": digest}
                for m, digest in zip(self.model.members, self.member_sha256, strict=True)
            ],
            "plan_sha256": self.plan_sha256,
            "postprocessing": self.model.postprocessing,
            **({"nnunet": _nnunet_identity(self.nnunet)} if self.nnunet else {}),
            **({"regions": _regions_identity(self.plan.settings["regions"])} if self._regions() else {}),
            "tta": self.tta,
            "overlap": self.overlap,
            "window": self.window,
            "device": str(self.device),
            "runtime": self.runtime if self.runtime == "torch" else f"openvino {openvino_version()}",
            "precision": self.precision,
        }


class _MeanOf(torch.nn.Module):
    """The mean of several networks' full-resolution logits (a fold ensemble inside each window)."""

    def __init__(self, networks: Sequence[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(networks)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for net in self.members:
            out = net(batch)
            out = (out[0] if isinstance(out, (list, tuple)) else out).float()
            total = out if total is None else total.add_(out)
        assert total is not None
        return total.div_(len(self.members))


def _check_int8(model: Model) -> None:
    """Refuse ``precision=int8`` for a model without an int8 network for every member."""
    stored = ((model.info or {}).get("openvino") or {}).get("int8") or {}
    root = Path(model.origin).resolve() if model.origin else None
    for m in model.members:
        try:
            rel = Path(m.path).resolve().relative_to(root).as_posix() if root is not None else None
        except ValueError:
            rel = None
        if rel not in stored:
            raise ConfigError(
                f"precision=int8: {m.configuration} fold {m.fold} has no int8 network in {model.origin or 'this model'}",
                hint="export a model folder with `segpipe export -o DIR quantize=int8` and predict with -m DIR, "
                "or use precision=fp32",
            )


def _writable(folder: Path) -> bool:
    """Whether ``folder`` may be written: permitted, and not marked read-only (no write bit at all,
    as a shared copy is, which root could still write)."""
    try:
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def _source_name(source: ImageInput) -> str:
    """The case's name in progress lines: its file's or folder's, ``case`` for an array."""
    if isinstance(source, (str, os.PathLike)):
        return case_id_of(Path(source))
    if isinstance(source, (np.ndarray, torch.Tensor)) or not source:
        return "case"
    return case_id_of(Path(source[0]))


def _nnunet_identity(nnunet: Mapping[str, Any]) -> dict[str, Any]:
    """What a report says of a model nnU-Net trained: its trainer, plans, mirroring axes, regions and
    where its post-processing came from (or why there is none)."""
    return {
        "trainer": nnunet.get("trainer"),
        "plans": nnunet.get("plans_name"),
        "mirror_axes": nnunet.get("mirror_axes"),
        "postprocessing": nnunet.get("postprocessing_source"),
    }


def _regions_identity(regions: Mapping[str, Any]) -> dict[str, Any]:
    """A region model's regions for reports: each region's name, label values and output value."""
    return {
        str(name): {"labels": list(values), "value": int(value)}
        for name, values, value in zip(regions["names"], regions["regions"], regions["class_order"], strict=True)
    }
