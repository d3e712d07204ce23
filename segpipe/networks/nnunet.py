"""nnU-Net v2's networks, built from a ``plans.json`` architecture entry, so its checkpoints load as they are.

nnU-Net v2 names its network in the plans (``architecture.network_class_name`` and ``arch_kwargs``,
classes of the ``dynamic-network-architectures`` package). segpipe builds those networks itself,
module for module, so that nnU-Net's ``network_weights`` load with ``strict=True`` and give the same
logits. Why not import that package: it requires ``timm``, which requires ``torchvision``, whose
wheels each pin one torch version, so installing it next to a CPU torch pulls another torch build.

Only an allow-list is built, never a class named by a file:

* ``PlainConvUNet``: per stage, stacked conv → (dropout) → norm → nonlinearity blocks, the first
  strided; a decoder of transposed convolutions, concatenated skips, stacked conv blocks and a 1×1
  segmentation head per level.
* ``ResidualEncoderUNet`` (nnU-Net's ResEnc M/L/XL presets): a stem, then per stage residual
  ``BasicBlockD`` blocks (average-pool + 1×1 projection on the shortcut when the stride or the width
  changes), and the same decoder.

Operators (``conv_op``, ``norm_op``, ``dropout_op``, ``nonlin``) come from :data:`OPERATORS` by name.
The module layout (and so every state-dict key, including the duplicate ``all_modules`` and
``decoder.encoder`` entries nnU-Net's checkpoints hold) follows the field's package exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["ARCHITECTURES", "OPERATORS", "PlainConvUNet", "ResidualEncoderUNet", "build_nnunet_network"]

#: the operators an architecture entry may name (nnU-Net writes torch's full dotted paths)
OPERATORS: dict[str, type[nn.Module]] = {
    "torch.nn.modules.conv.Conv2d": nn.Conv2d,
    "torch.nn.modules.conv.Conv3d": nn.Conv3d,
    "torch.nn.modules.instancenorm.InstanceNorm2d": nn.InstanceNorm2d,
    "torch.nn.modules.instancenorm.InstanceNorm3d": nn.InstanceNorm3d,
    "torch.nn.modules.batchnorm.BatchNorm2d": nn.BatchNorm2d,
    "torch.nn.modules.batchnorm.BatchNorm3d": nn.BatchNorm3d,
    "torch.nn.modules.dropout.Dropout": nn.Dropout,
    "torch.nn.modules.dropout.Dropout2d": nn.Dropout2d,
    "torch.nn.modules.dropout.Dropout3d": nn.Dropout3d,
    "torch.nn.modules.activation.LeakyReLU": nn.LeakyReLU,
    "torch.nn.modules.activation.ReLU": nn.ReLU,
    "torch.nn.modules.activation.GELU": nn.GELU,
    "torch.nn.modules.activation.ELU": nn.ELU,
}
# the short spellings (``torch.nn.Conv3d``) name the same classes
OPERATORS.update({f"torch.nn.{cls.__name__}": cls for cls in list(OPERATORS.values())})

_CONV_TRANSPOSE = {nn.Conv2d: nn.ConvTranspose2d, nn.Conv3d: nn.ConvTranspose3d}
_AVG_POOL = {nn.Conv2d: nn.AvgPool2d, nn.Conv3d: nn.AvgPool3d}


def _as_list(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _per_axis(conv_op: type[nn.Module], value: Any) -> list[int]:
    dims = 3 if conv_op is nn.Conv3d else 2
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * dims


class _Ops:
    """The operators and their settings shared by every block of one network."""

    def __init__(self, kwargs: Mapping[str, Any]):
        self.conv = kwargs["conv_op"]
        self.bias = bool(kwargs.get("conv_bias", False))
        self.norm = kwargs.get("norm_op")
        self.norm_kwargs = dict(kwargs.get("norm_op_kwargs") or {})
        self.dropout = kwargs.get("dropout_op")
        self.dropout_kwargs = dict(kwargs.get("dropout_op_kwargs") or {})
        self.nonlin = kwargs.get("nonlin")
        self.nonlin_kwargs = dict(kwargs.get("nonlin_kwargs") or {})


class ConvDropoutNormReLU(nn.Module):
    """conv → (dropout) → (norm) → (nonlinearity), with 'same' padding; each also under ``all_modules``."""

    def __init__(self, ops: _Ops, channels: tuple[int, int], kernel: Any, stride: Any, *, plain: bool = False):
        super().__init__()
        kernel = _per_axis(ops.conv, kernel)
        seq: list[nn.Module] = []
        self.conv = ops.conv(
            channels[0],
            channels[1],
            kernel,
            _per_axis(ops.conv, stride),
            padding=[(k - 1) // 2 for k in kernel],
            dilation=1,
            bias=ops.bias if not plain else False,
        )
        seq.append(self.conv)
        if ops.dropout is not None and not plain:
            self.dropout = ops.dropout(**ops.dropout_kwargs)
            seq.append(self.dropout)
        if ops.norm is not None:
            self.norm = ops.norm(channels[1], **ops.norm_kwargs)
            seq.append(self.norm)
        if ops.nonlin is not None and not plain:
            self.nonlin = ops.nonlin(**ops.nonlin_kwargs)
            seq.append(self.nonlin)
        self.all_modules = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_modules(x)


class StackedConvBlocks(nn.Module):
    def __init__(self, ops: _Ops, n: int, channels: tuple[int, int], kernel: Any, stride: Any):
        super().__init__()
        c_in, c_out = channels
        blocks = [ConvDropoutNormReLU(ops, (c_in, c_out), kernel, stride)]
        blocks += [ConvDropoutNormReLU(ops, (c_out, c_out), kernel, 1) for _ in range(1, n)]
        self.convs = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class BasicBlockD(nn.Module):
    """Two conv blocks (the second without nonlinearity) plus the shortcut, then the nonlinearity."""

    def __init__(self, ops: _Ops, channels: tuple[int, int], kernel: Any, stride: Any):
        super().__init__()
        c_in, c_out = channels
        stride = _per_axis(ops.conv, stride)
        self.conv1 = ConvDropoutNormReLU(ops, (c_in, c_out), kernel, stride)
        no_dropout_nonlin = _Ops(
            {"conv_op": ops.conv, "conv_bias": ops.bias, "norm_op": ops.norm, "norm_op_kwargs": ops.norm_kwargs}
        )
        self.conv2 = ConvDropoutNormReLU(no_dropout_nonlin, (c_out, c_out), kernel, 1)
        self.nonlin2 = ops.nonlin(**ops.nonlin_kwargs) if ops.nonlin is not None else nn.Identity()
        shortcut: list[nn.Module] = []
        if any(s != 1 for s in stride):
            shortcut.append(_AVG_POOL[ops.conv](stride, stride))
        if c_in != c_out:
            shortcut.append(ConvDropoutNormReLU(no_dropout_nonlin, (c_in, c_out), 1, 1, plain=True))
        self.skip = nn.Sequential(*shortcut) if shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        out = out + self.skip(x)
        return self.nonlin2(out)


class StackedResidualBlocks(nn.Module):
    def __init__(self, ops: _Ops, n: int, channels: tuple[int, int], kernel: Any, stride: Any):
        super().__init__()
        c_in, c_out = channels
        blocks = [BasicBlockD(ops, (c_in, c_out), kernel, stride)]
        blocks += [BasicBlockD(ops, (c_out, c_out), kernel, 1) for _ in range(1, n)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class _Encoder(nn.Module):
    """The stages of an encoder (plain or residual); returns every stage's output (the skips)."""

    def __init__(self, ops: _Ops, in_channels: int, kwargs: Mapping[str, Any], *, residual: bool):
        super().__init__()
        n = int(kwargs["n_stages"])
        self.features = [int(f) for f in _as_list(kwargs["features_per_stage"], n)]
        self.kernels = _as_list(kwargs["kernel_sizes"], n)
        self.strides = [_per_axis(ops.conv, s) for s in _as_list(kwargs["strides"], n)]
        stages: list[nn.Module] = []
        if residual:
            blocks = _as_list(kwargs["n_blocks_per_stage"], n)
            stem = int(kwargs.get("stem_channels") or self.features[0])
            self.stem: nn.Module | None = StackedConvBlocks(ops, 1, (in_channels, stem), self.kernels[0], 1)
            c = stem
            for s in range(n):
                stages.append(
                    StackedResidualBlocks(ops, int(blocks[s]), (c, self.features[s]), self.kernels[s], self.strides[s])
                )
                c = self.features[s]
        else:
            convs = _as_list(kwargs["n_conv_per_stage"], n)
            self.stem = None
            c = in_channels
            for s in range(n):
                block = StackedConvBlocks(ops, int(convs[s]), (c, self.features[s]), self.kernels[s], self.strides[s])
                stages.append(nn.Sequential(block))
                c = self.features[s]
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.stem is not None:
            x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class _Decoder(nn.Module):
    """Transposed convolution, skip concatenation and stacked convs per level, a 1×1 head per level."""

    def __init__(self, encoder: _Encoder, ops: _Ops, num_classes: int, n_conv: Sequence[int]):
        super().__init__()
        self.encoder = encoder  # registered as nnU-Net's decoder does: its keys are in the checkpoints
        feats, n = encoder.features, len(encoder.features)
        transpose: Any = _CONV_TRANSPOSE[ops.conv]
        stages, ups, heads = [], [], []
        for s in range(1, n):
            below, skip, stride = feats[-s], feats[-(s + 1)], encoder.strides[-s]
            ups.append(transpose(below, skip, tuple(stride), tuple(stride), bias=ops.bias))
            stages.append(StackedConvBlocks(ops, int(n_conv[s - 1]), (2 * skip, skip), encoder.kernels[-(s + 1)], 1))
            heads.append(ops.conv(skip, num_classes, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.transpconvs = nn.ModuleList(ups)
        self.seg_layers = nn.ModuleList(heads)
        self.deep_supervision = False

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x = skips[-1]
        outputs = []
        for s in range(len(self.stages)):
            x = self.stages[s](torch.cat((self.transpconvs[s](x), skips[-(s + 2)]), 1))
            if self.deep_supervision or s == len(self.stages) - 1:
                outputs.append(self.seg_layers[s](x))
        return outputs[::-1] if self.deep_supervision else outputs[-1]


class _UNet(nn.Module):
    residual = False

    def __init__(self, in_channels: int, num_classes: int, kwargs: Mapping[str, Any]):
        super().__init__()
        ops = _Ops(kwargs)
        n = int(kwargs["n_stages"])
        self.encoder = _Encoder(ops, in_channels, kwargs, residual=self.residual)
        self.decoder = _Decoder(self.encoder, ops, num_classes, _as_list(kwargs["n_conv_per_stage_decoder"], n - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.decoder(self.encoder(x))


class PlainConvUNet(_UNet):
    """nnU-Net's default U-Net (``dynamic_network_architectures.architectures.unet.PlainConvUNet``)."""


class ResidualEncoderUNet(_UNet):
    """nnU-Net's ResEnc U-Net (``dynamic_network_architectures.architectures.unet.ResidualEncoderUNet``)."""

    residual = True


#: the architectures an nnU-Net plan may name, by ``network_class_name``, and the arch_kwargs each accepts
ARCHITECTURES: dict[str, tuple[type[_UNet], frozenset[str]]] = {}
_COMMON = {
    "n_stages",
    "features_per_stage",
    "conv_op",
    "kernel_sizes",
    "strides",
    "n_conv_per_stage_decoder",
    "conv_bias",
    "norm_op",
    "norm_op_kwargs",
    "dropout_op",
    "dropout_op_kwargs",
    "nonlin",
    "nonlin_kwargs",
}
for _cls, _extra in (
    (PlainConvUNet, {"n_conv_per_stage", "nonlin_first"}),
    (ResidualEncoderUNet, {"n_blocks_per_stage", "block", "stem_channels", "bottleneck_channels"}),
):
    ARCHITECTURES[f"dynamic_network_architectures.architectures.unet.{_cls.__name__}"] = (
        _cls,
        frozenset(_COMMON | _extra),
    )


def _operator(name: Any, key: str, where: str) -> type[nn.Module] | None:
    if name is None:
        return None
    cls = OPERATORS.get(str(name))
    if cls is None:
        raise ConfigError(
            f"{where}: {key} {name!r} is not an operator segpipe builds",
            hint=f"supported: {', '.join(sorted(n for n in OPERATORS if n.count('.') > 2))}",
        )
    return cls


def build_nnunet_network(
    architecture: Mapping[str, Any], in_channels: int, num_classes: int, *, where: str = "plans.json"
) -> nn.Module:
    """The network of an nnU-Net plan's ``architecture`` entry, in eval mode, one output (no deep supervision).

    ``where`` names the file in errors. A class outside :data:`ARCHITECTURES`, an operator outside
    :data:`OPERATORS`, or a setting the class does not take is a :class:`ConfigError` naming it.
    """
    name = str(architecture.get("network_class_name", ""))
    short = name.rsplit(".", 1)[-1]
    entry = ARCHITECTURES.get(name) or next((v for k, v in ARCHITECTURES.items() if k.endswith("." + short)), None)
    if entry is None:
        raise ConfigError(
            f"{where}: network class {name!r} is not one segpipe can build",
            hint=f"supported: {', '.join(k.rsplit('.', 1)[-1] for k in ARCHITECTURES)}",
        )
    cls, accepted = entry
    kwargs = dict(architecture.get("arch_kwargs") or {})
    unknown = sorted(set(kwargs) - accepted - {"deep_supervision"})
    if unknown:
        raise ConfigError(f"{where}: {short} setting(s) {', '.join(unknown)} are not supported by segpipe")
    if kwargs.get("block") not in (None, "BasicBlockD") and not str(kwargs.get("block")).endswith(".BasicBlockD"):
        raise ConfigError(f"{where}: residual block {kwargs['block']!r} is not supported (only BasicBlockD)")
    if kwargs.get("nonlin_first") or kwargs.get("bottleneck_channels") is not None:
        raise ConfigError(f"{where}: {short} with nonlin_first or bottleneck blocks is not supported")
    for key in ("conv_op", "norm_op", "dropout_op", "nonlin"):
        kwargs[key] = _operator(kwargs.get(key), key, where)
    if kwargs["conv_op"] not in (nn.Conv2d, nn.Conv3d):
        raise ConfigError(f"{where}: conv_op must be a 2-D or 3-D convolution")
    try:
        net = cls(int(in_channels), int(num_classes), kwargs)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ConfigError(f"{where}: incomplete {short} settings ({exc})") from None
    return net.eval()
