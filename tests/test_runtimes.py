"""The networks' runtime: ``runtime=torch|openvino|auto``, OpenVINO's logits against PyTorch's, the
converted-network cache (reused, rebuilt when damaged, keyed by the weights), and the fallbacks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segpipe.errors import ConfigError
from segpipe.inference import runtimes
from segpipe.inference.runtimes import choose_runtime, compile_openvino, network_key, openvino_version

needs_openvino = pytest.mark.skipif(openvino_version() is None, reason="the openvino package is not installed")
CPU = torch.device("cpu")


def test_runtime_choice_follows_the_setting_the_device_and_what_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_runtime("torch", CPU) == ("torch", None)
    assert choose_runtime("auto", torch.device("cuda")) == ("torch", None)  # OpenVINO is for the CPU
    with pytest.raises(ConfigError, match="runs on the CPU") as err:
        choose_runtime("openvino", torch.device("cuda"))
    assert "device=cpu" in (err.value.hint or "")
    with pytest.raises(ConfigError, match="runtime=onnx is not a runtime"):
        choose_runtime("onnx", CPU)
    monkeypatch.setattr(runtimes, "openvino_version", lambda: None)
    runtime, why = choose_runtime("auto", CPU)
    assert runtime == "torch" and why is not None and "not installed" in why and "segpipe[cpu]" in why
    with pytest.raises(ConfigError, match="not installed") as err:
        choose_runtime("openvino", CPU)
    assert "pip install" in (err.value.hint or "")
    monkeypatch.setattr(runtimes, "openvino_version", lambda: "2026.4.1")
    assert choose_runtime("AUTO", CPU) == ("openvino", None)


def test_the_cache_key_changes_with_the_weights_the_shape_and_the_version() -> None:
    key = network_key("a" * 64, in_channels=1, patch=[16, 32, 32], version="2026.4.1")
    assert key == network_key("a" * 64, in_channels=1, patch=(16, 32, 32), version="2026.4.1")
    others = [
        network_key("b" * 64, in_channels=1, patch=[16, 32, 32], version="2026.4.1"),
        network_key("a" * 64, in_channels=3, patch=[16, 32, 32], version="2026.4.1"),
        network_key("a" * 64, in_channels=1, patch=[16, 32, 16], version="2026.4.1"),
        network_key("a" * 64, in_channels=1, patch=[16, 32, 32], version="2026.5.0"),
    ]
    assert key not in others and len(set(others)) == 4


def _network(configuration: str = "3d_fullres", context_slices: int = 0):
    from segpipe.networks import build_network
    from segpipe.planning import PlanConfig

    dims = 3 if configuration != "2d" else 2
    cfg = PlanConfig(
        name=configuration,
        architecture="unet" if not context_slices else "unet25d",
        dims=dims,
        spacing=[1.0, 1.0, 1.0],
        median_shape=[16, 32, 32],
        patch_size=[16, 32, 32][-dims:],
        batch_size=2,
        strides=[[1] * dims] + [[2] * dims] * 2,
        kernel_sizes=[[3] * dims] * 3,
        features=[4, 8, 16],
        n_conv_encoder=[1, 1, 1],
        n_conv_decoder=[1, 1],
        context_slices=context_slices,
    )
    torch.manual_seed(0)
    net = build_network(cfg, 1, 3, deep_supervision=True).eval()
    return net, cfg


@needs_openvino
@pytest.mark.parametrize("configuration,context", [("3d_fullres", 0), ("2d", 0), ("2.5d", 2)])
def test_openvino_gives_the_logits_of_pytorch_at_any_batch_size_and_window(configuration: str, context: int) -> None:
    net, cfg = _network("2d" if configuration == "2.5d" else configuration, context)
    channels = max(1, cfg.input_slices)
    ov_net = compile_openvino(net, in_channels=channels, patch=cfg.patch_size, weights_sha256="0" * 64)
    assert ov_net.source == "converted"
    # window=fit sends windows smaller and larger than the patch (multiples of the divisor, 4 here)
    fitted = [max(4, p - 4) for p in cfg.patch_size], [p + 8 for p in cfg.patch_size]
    for batch, window in ((1, cfg.patch_size), (3, cfg.patch_size), (2, fitted[0]), (1, fitted[1])):
        x = torch.randn(batch, channels, *window, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            expected = net(x)
        got = ov_net(x)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
        assert torch.equal(got.argmax(1), expected.argmax(1))


@needs_openvino
def test_a_converted_network_is_stored_reused_and_rebuilt_when_damaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    net, cfg = _network()
    x = torch.randn(2, 1, *cfg.patch_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = net(x)
    kwargs = {"in_channels": 1, "patch": cfg.patch_size, "weights_sha256": "1" * 64, "cache_dir": tmp_path}
    first = compile_openvino(net, **kwargs)
    entry = tmp_path / first.key
    assert first.source == "converted" and (entry / "network.xml").is_file() and (entry / "network.bin").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [first.key]  # no temporary left beside it
    second = compile_openvino(net, **kwargs)
    assert second.source == "cache" and torch.allclose(second(x), expected, atol=1e-4, rtol=1e-4)
    (entry / "network.xml").write_text("<net><damaged", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="segpipe"):
        third = compile_openvino(net, **kwargs)
    assert third.source == "converted" and "cannot be read" in caplog.text and "converting it again" in caplog.text
    assert torch.allclose(third(x), expected, atol=1e-4, rtol=1e-4)
    assert compile_openvino(net, **kwargs).source == "cache"  # the damaged entry was replaced


@needs_openvino
def test_a_network_openvino_cannot_convert_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    net, cfg = _network()

    def refuse(*args, **kwargs):
        raise RuntimeError("Exception from src/frontends/pytorch: aten::weird_op is not supported\nmore detail")

    import openvino

    monkeypatch.setattr(openvino, "convert_model", refuse)
    with pytest.raises(ConfigError, match="OpenVINO cannot convert this network") as err:
        compile_openvino(net, in_channels=1, patch=cfg.patch_size, weights_sha256="2" * 64)
    assert "aten::weird_op" in err.value.message and "\n" not in err.value.message
    assert err.value.hint == "predict with runtime=torch"


@needs_openvino
def test_infer_with_openvino_writes_the_labels_of_pytorch_and_caches_in_the_workspace(
    tmp_path: Path, tiny_model: tuple[Path, Path]
) -> None:
    from segpipe.cli import main

    model, image = tiny_model
    outs = {}
    for runtime, window in (("torch", "pad"), ("openvino", "pad"), ("openvino", "fit")):
        out = tmp_path / f"{runtime}-{window}"
        args = ["infer", str(image), "-o", str(out), "-m", str(model), f"runtime={runtime}", f"window={window}", "-q"]
        assert main(args) == 0
        outs[runtime if window == "pad" else window] = np.asarray(nib.load(next(out.glob("*.nii.gz"))).dataobj)
        report = json.loads(next(out.glob("*.json")).read_text(encoding="utf-8"))
        compute = report["compute"]  # how the networks ran: runtime, precision, threads, device
        assert compute["runtime"] == report["identity"]["runtime"] and report["identity"]["window"] == window
        assert compute["runtime"].startswith(runtime) and compute["precision"] == "fp32"
        assert compute["device"] == "cpu" and compute["threads"] >= 1
    # windows fitted to the image (another context for the network): the same grid, labels of the same network
    assert outs["fit"].shape == outs["torch"].shape and float(np.mean(outs["fit"] == outs["torch"])) > 0.5
    agreement = float(np.mean(outs["torch"] == outs["openvino"]))
    # random weights leave near-ties between classes, where 1e-5 of logit decides: agreement, not identity
    assert agreement >= 0.999, agreement
    assert not any(model.rglob("*.xml"))  # a model folder is only read: its networks are converted in memory


@needs_openvino
def test_auto_falls_back_to_pytorch_when_a_network_cannot_be_converted(
    tiny_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from segpipe.inference import Predictor

    model, image = tiny_model

    def refuse(*args, **kwargs):
        raise ConfigError("OpenVINO cannot convert this network (aten::weird_op)", hint="predict with runtime=torch")

    monkeypatch.setattr(runtimes, "_convert", refuse)
    predictor = Predictor.from_model(model, runtime="auto", tta=False)
    assert predictor.runtime == "openvino"  # converted on first use, not before
    with caplog.at_level(logging.WARNING, logger="segpipe"):
        assert predictor.predict(image).label.shape  # it still segments
    assert predictor.runtime == "torch" and "aten::weird_op" in caplog.text
    with pytest.raises(ConfigError, match="cannot convert"):
        Predictor.from_model(model, runtime="openvino", tta=False).predict(image)


def test_a_bad_runtime_setting_is_exit_2(tmp_path: Path, tiny_model: tuple[Path, Path]) -> None:
    from segpipe.cli import main

    model, image = tiny_model
    assert main(["infer", str(image), "-o", str(tmp_path / "o"), "-m", str(model), "runtime=onnx", "-q"]) == 2
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_without_openvino_auto_predicts_with_pytorch_and_says_why(
    tiny_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from segpipe.inference import Predictor

    model, _image = tiny_model
    monkeypatch.setattr(runtimes, "openvino_version", lambda: None)
    with caplog.at_level(logging.INFO, logger="segpipe"):
        predictor = Predictor.from_model(model, runtime="auto", device="cpu")
    assert predictor.runtime == "torch" and "OpenVINO is not installed" in caplog.text
    assert predictor.describe()["runtime"] == "torch"
    shutil.rmtree(model / "openvino", ignore_errors=True)


@pytest.fixture(scope="module")
def openvino_export(tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple[Path, Path]) -> Path:
    """The tiny model exported again with its networks converted for OpenVINO."""
    from segpipe.inference.model import export_model, load_model_folder

    out = tmp_path_factory.mktemp("ov_export") / "model"
    return export_model(load_model_folder(tiny_model[0]), out, openvino=True)


@needs_openvino
def test_export_with_openvino_stores_checksummed_networks_that_infer_only_reads(
    openvino_export: Path, tiny_model: tuple[Path, Path]
) -> None:
    from segpipe.inference import Predictor

    info = json.loads((openvino_export / "model.json").read_text(encoding="utf-8"))
    entry = info["openvino"]
    assert entry["version"] == openvino_version()
    (files,) = entry["networks"].values()
    assert sorted(Path(rel).name for rel in files) == ["network.bin", "network.xml"]
    for rel, digest in files.items():
        assert (openvino_export / rel).is_file() and len(digest) == 64
    assert "converted for OpenVINO" in (openvino_export / "README.md").read_text(encoding="utf-8")
    before = {p: p.stat().st_mtime_ns for p in openvino_export.rglob("*")}
    predictor = Predictor.from_model(openvino_export, runtime="openvino", tta=False).prepare()
    (network,) = predictor.networks["3d_fullres"]
    assert network.source == "cache"  # loaded as stored, not converted
    assert predictor.predict(tiny_model[1]).label.any()
    assert {p: p.stat().st_mtime_ns for p in openvino_export.rglob("*")} == before  # nothing written


@needs_openvino
def test_a_changed_openvino_network_in_a_model_folder_is_refused(openvino_export: Path, tmp_path: Path) -> None:
    from segpipe.errors import StateError
    from segpipe.inference.model import load_model_folder

    copy = tmp_path / "model"
    shutil.copytree(openvino_export, copy)
    (xml,) = copy.glob("openvino/*/network.xml")
    xml.write_text(xml.read_text(encoding="utf-8").replace("</net>", "</net>\n"), encoding="utf-8")
    with pytest.raises(StateError, match="network.xml: checksum differs"):
        load_model_folder(copy)


def test_export_with_openvino_missing_is_exit_2_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import segpipe
    from segpipe.cli import main
    from segpipe.demo_data import generate_demo_dataset

    data = generate_demo_dataset(tmp_path / "Demo", num_cases=3, num_test=0)
    segpipe.plan(data, work_dir=tmp_path / "work", configurations=["3d_fullres"], base_features=4, max_features_3d=16)
    monkeypatch.setattr(runtimes, "openvino_version", lambda: None)
    code = main(["export", "-o", str(tmp_path / "model"), f"work_dir={tmp_path / 'work'}", "runtime=openvino", "-q"])
    assert code == 2 and not (tmp_path / "model").exists()


def test_bf16_is_taken_only_with_openvino_on_a_cpu_that_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from segpipe.inference.runtimes import check_precision

    assert check_precision("fp32", "torch") == "fp32" and check_precision("FP32", "openvino") == "fp32"
    with pytest.raises(ConfigError, match="precision=fp16 is not a precision"):
        check_precision("fp16", "openvino")
    with pytest.raises(ConfigError, match="needs the OpenVINO runtime") as err:
        check_precision("bf16", "torch")
    assert "runtime=openvino" in (err.value.hint or "")
    monkeypatch.setattr(runtimes, "cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match="no native bf16"):
        check_precision("bf16", "openvino")
    monkeypatch.setattr(runtimes, "cpu_has_bf16", lambda: True)
    assert check_precision("bf16", "openvino") == "bf16"


@needs_openvino
def test_bf16_predicts_close_to_fp32_and_says_so_in_the_report(tiny_model: tuple[Path, Path]) -> None:
    from segpipe.inference import Predictor

    if not runtimes.cpu_has_bf16():
        pytest.skip("this CPU has no native bf16")
    net, cfg = _network()
    x = torch.randn(2, 1, *cfg.patch_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = net(x)
    got = compile_openvino(net, in_channels=1, patch=cfg.patch_size, weights_sha256="3" * 64, precision="bf16")(x)
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 0.05 * scale  # bf16 keeps 8 bits of mantissa
    model, image = tiny_model
    predictor = Predictor.from_model(model, runtime="openvino", precision="bf16", tta=False)
    assert predictor.predict(image).label.shape
    assert predictor.compute()["precision"] == "bf16" and predictor.describe()["precision"] == "bf16"
