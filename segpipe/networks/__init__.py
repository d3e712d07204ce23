"""Networks a plan asks for: ``build_network(plan_config, in_channels, num_classes)``.

* ``unet`` (``2d``, ``3d_fullres``, ``3d_lowres``): MONAI ``DynUNet`` with the plan's kernels and
  strides, InstanceNorm (affine, eps 1e-5), LeakyReLU 0.01, strided-conv down, transposed-conv up
  — nnU-Net's ``PlainConvUNet``.
* ``unet25d`` (``2.5d``): the same DynUNet with the planner's in-plane-first kernels/strides
  (1×3×3 and 1×2×2 at the high-resolution levels) plus, optionally, a spatial-attention block
  after every decoder level (Wang et al. 2019: ``x · (1 + σ(conv(relu(conv(x)))))``). In slab mode
  (``context_slices = k``, 2k+1 slices) it is a 2D DynUNet whose input channels are the neighbouring slices.
* ``vnet``: written here because MONAI's ``VNet`` has a fixed depth and patch. Milletari et al.
  2016: residual stages of 5×5×5 convolutions (5×5×1 in-plane where the plan's U-Net kernel is 1),
  1/2/3 convolutions per stage, 2×2×2 strided-conv down, transposed-conv up, PReLU. Deviations,
  for small-batch training: InstanceNorm after each convolution, and the decoder keeps the
  encoder's width (concat → F channels) instead of 2F, which keeps 5³ convolutions affordable.

Deep supervision as in nnU-Net: in training mode the network returns a list
``[full_res, half_res, ...]`` — one 1×1 head per decoder level but the lowest, each at its own
resolution (MONAI's DynUNet would interpolate and stack them; we take its heads from
``DynUNet.heads`` instead). In eval mode it returns one tensor. Output size equals input size for
every patch the planner chooses (multiples of 2^pools per axis).

The memory model lives in :mod:`segpipe.planning` (``estimate_training_bytes``, re-exported here)
so that planning does not import torch; :func:`measure_training_bytes` is its ground truth.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..losses import DeepSupervision, build_loss
from ..planning import PlanConfig, attention_hidden, estimate_training_bytes, memory_breakdown

__all__ = [
    "NETWORKS",
    "SegUNet",
    "SpatialAttention",
    "VNet",
    "build_network",
    "get_network_builder",
    "estimate_training_bytes",
    "measure_training_bytes",
    "memory_breakdown",
    "network_outputs",
    "plan_network",
    "register_network",
]

NEGATIVE_SLOPE = 0.01
NORM_EPS = 1e-5


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _conv_t(dims: int) -> type[nn.Module]:
    return nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d


def _norm(dims: int, channels: int) -> nn.Module:
    cls = nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d
    return cls(channels, eps=NORM_EPS, affine=True)


class SpatialAttention(nn.Module):
    """Wang et al. 2019 spatial attention: ``x · (1 + σ(W₂ relu(W₁ x)))`` with 1×1 convolutions."""

    def __init__(self, channels: int, dims: int):
        super().__init__()
        hidden = attention_hidden(channels)
        self.conv1 = _conv(dims)(channels, hidden, 1)
        self.conv2 = _conv(dims)(hidden, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.conv2(F.relu(self.conv1(x))))
        return x * (1 + a)


class SegUNet(nn.Module):
    """MONAI ``DynUNet`` returning nnU-Net-style deep-supervision outputs (a list, one per resolution)."""

    def __init__(self, cfg: PlanConfig, in_channels: int, num_classes: int, *, deep_supervision: bool = True):
        super().__init__()
        from monai.networks.blocks.dynunet_block import UnetBasicBlock
        from monai.networks.nets import DynUNet

        n = len(cfg.strides)
        self.deep_supervision = bool(deep_supervision and n >= 3)
        self.net = DynUNet(
            spatial_dims=cfg.dims,
            in_channels=in_channels * max(1, cfg.input_slices),
            out_channels=num_classes,
            kernel_size=[list(k) for k in cfg.kernel_sizes],
            strides=[list(s) for s in cfg.strides],
            upsample_kernel_size=[list(s) for s in cfg.strides[1:]],
            filters=list(cfg.features),
            norm_name=("INSTANCE", {"affine": True, "eps": NORM_EPS}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": NEGATIVE_SLOPE}),
            deep_supervision=self.deep_supervision,
            deep_supr_num=max(1, n - 2),
        )
        # upsamples[0] is the deepest decoder level s = n - 2. MONAI gives level s's decoder block the
        # kernel of level s + 1; nnU-Net (and our plan) use level s's own kernel, which matters for
        # anisotropic plans (1×3×3 decoder convolutions where the encoder has them). Rebuild those blocks.
        for i, up in enumerate(self.net.upsamples):
            level = n - 2 - i
            if list(cfg.kernel_sizes[level]) != list(cfg.kernel_sizes[level + 1]):
                up.conv_block = UnetBasicBlock(
                    cfg.dims,
                    2 * cfg.features[level],
                    cfg.features[level],
                    kernel_size=list(cfg.kernel_sizes[level]),
                    stride=1,
                    norm_name=self.net.norm_name,
                    act_name=self.net.act_name,
                )
                up.conv_block.apply(self.net.initialize_weights)
            if cfg.attention:
                up.conv_block = nn.Sequential(up.conv_block, SpatialAttention(cfg.features[level], cfg.dims))
        self._placeholder = torch.zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.net.output_block(self.net.skip_layers(x))
        if not self.deep_supervision:
            return out
        heads = list(self.net.heads)
        for i in range(len(self.net.heads)):  # do not keep the last step's heads alive in the module
            self.net.heads[i] = self._placeholder
        return [out, *heads] if self.training else out


class _Down(nn.Sequential):
    def __init__(self, dims: int, cin: int, cout: int, stride: Sequence[int]):
        super().__init__(
            _conv(dims)(cin, cout, tuple(stride), stride=tuple(stride), bias=False), _norm(dims, cout), nn.PReLU(cout)
        )


class _Up(nn.Sequential):
    def __init__(self, dims: int, cin: int, cout: int, stride: Sequence[int]):
        super().__init__(
            _conv_t(dims)(cin, cout, tuple(stride), stride=tuple(stride), bias=False), _norm(dims, cout), nn.PReLU(cout)
        )


class _ResidualConvs(nn.Module):
    """``n`` conv → norm → PReLU layers; the residual is added before the last PReLU (Milletari)."""

    def __init__(self, dims: int, cin: int, cout: int, n: int, kernel: Sequence[int]):
        super().__init__()
        pad = tuple(k // 2 for k in kernel)
        self.convs = nn.ModuleList(
            _conv(dims)(cin if i == 0 else cout, cout, tuple(kernel), padding=pad, bias=False) for i in range(n)
        )
        self.norms = nn.ModuleList(_norm(dims, cout) for _ in range(n))
        self.acts = nn.ModuleList(nn.PReLU(cout) for _ in range(n))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h = x
        last = len(self.convs) - 1
        for i, (conv, norm, act) in enumerate(zip(self.convs, self.norms, self.acts)):
            h = norm(conv(h))
            if i == last:
                h = h + residual
            h = act(h)
        return h


class VNet(nn.Module):
    """Planner-sized V-Net (any depth, anisotropic kernels/strides) with deep supervision."""

    def __init__(self, cfg: PlanConfig, in_channels: int, num_classes: int, *, deep_supervision: bool = True):
        super().__init__()
        dims, feats, n = cfg.dims, list(cfg.features), len(cfg.strides)
        cin = in_channels * max(1, cfg.input_slices)
        self.deep_supervision = bool(deep_supervision and n >= 3)
        self.proj = _conv(dims)(cin, feats[0], 1, bias=False) if cin != feats[0] else nn.Identity()
        self.downs = nn.ModuleList(_Down(dims, feats[s - 1], feats[s], cfg.strides[s]) for s in range(1, n))
        self.enc = nn.ModuleList(
            _ResidualConvs(dims, cin if s == 0 else feats[s], feats[s], cfg.n_conv_encoder[s], cfg.kernel_sizes[s])
            for s in range(n)
        )
        self.ups = nn.ModuleList(_Up(dims, feats[s + 1], feats[s], cfg.strides[s + 1]) for s in range(n - 1))
        self.dec = nn.ModuleList(
            _ResidualConvs(dims, 2 * feats[s], feats[s], cfg.n_conv_decoder[s], cfg.kernel_sizes[s])
            for s in range(n - 1)
        )
        n_heads = max(1, n - 1) if self.deep_supervision else 1
        self.heads = nn.ModuleList(_conv(dims)(feats[s], num_classes, 1) for s in range(n_heads))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, a=0.25)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        h = self.enc[0](x, self.proj(x))
        skips = [h]
        for s, down in enumerate(self.downs, start=1):
            d = down(h)
            h = self.enc[s](d, d)
            skips.append(h)
        outs: list[torch.Tensor] = []
        for s in range(len(self.ups) - 1, -1, -1):
            u = self.ups[s](h)
            h = self.dec[s](torch.cat((u, skips[s]), dim=1), u)
            if self.training and self.deep_supervision and 0 < s < len(self.heads):
                outs.append(self.heads[s](h))
        out = self.heads[0](h)
        if self.training and self.deep_supervision:
            return [out, *reversed(outs)]
        return out


def _as_config(plan_config: PlanConfig | Mapping[str, Any]) -> PlanConfig:
    if isinstance(plan_config, PlanConfig):
        return plan_config
    if isinstance(plan_config, Mapping):
        return PlanConfig.from_dict(plan_config)
    raise ConfigError(f"expected a PlanConfig or its dict, got {type(plan_config).__name__}")


NetworkBuilder = Callable[..., nn.Module]

#: architecture name (``PlanConfig.architecture``) -> builder ``(cfg, in_channels, num_classes, *, deep_supervision)``;
#: the one place an architecture is looked up
NETWORKS: dict[str, NetworkBuilder] = {
    "unet": SegUNet,
    "unet25d": SegUNet,  # the plan's kernels, strides, attention and slab make it 2.5-D
    "vnet": VNet,
}


def register_network(name: str, builder: NetworkBuilder) -> None:
    """Add (or replace) an architecture."""
    NETWORKS[str(name)] = builder


def get_network_builder(name: str, *, configuration: str | None = None) -> NetworkBuilder:
    """The builder of architecture ``name``; an unknown name is a :class:`ConfigError` listing the valid ones."""
    builder = NETWORKS.get(str(name))
    if builder is None:
        where = f"configuration {configuration}: " if configuration else ""
        raise ConfigError(f"{where}unknown architecture {name!r}", hint=f"valid: {', '.join(sorted(NETWORKS))}")
    return builder


def build_network(
    plan_config: PlanConfig | Mapping[str, Any], in_channels: int, num_classes: int, *, deep_supervision: bool = True
) -> nn.Module:
    """The network of one plan configuration (looked up in :data:`NETWORKS` by its architecture).

    ``in_channels`` is the dataset's channel count (2.5d slab mode multiplies it by the slices);
    ``num_classes`` counts the background. In training mode with ``deep_supervision`` the
    network returns ``[full_res, half_res, ...]`` (``len == num_stages - 1``); otherwise a tensor.
    """
    cfg = _as_config(plan_config)
    builder = get_network_builder(cfg.architecture, configuration=cfg.name)
    return builder(cfg, in_channels, num_classes, deep_supervision=deep_supervision)


def network_outputs(plan: Any) -> int:
    """The output channels of a plan's networks: one per class (background included), or one per
    region for a region model (``plan.settings["regions"]``, nnU-Net's region-based training)."""
    regions = (plan.settings or {}).get("regions")
    return len(regions["regions"]) if regions else int(plan.num_classes)


def plan_network(plan: Any, configuration: str, *, deep_supervision: bool = True) -> nn.Module:
    """The network of one configuration of a :class:`~segpipe.planning.Plan`: segpipe's own
    (:func:`build_network`), or for a plan read from an nnU-Net model folder the architecture its
    ``settings["nnunet"]`` names (:func:`segpipe.networks.nnunet.build_nnunet_network`, one output)."""
    cfg = plan.config(configuration)
    nnunet = (plan.settings or {}).get("nnunet")
    if nnunet:
        from .nnunet import build_nnunet_network

        arch = (nnunet.get("architectures") or {}).get(configuration)
        if not arch:
            raise ConfigError(f"the plan names no nnU-Net network for {configuration}")
        channels = plan.network_channels(configuration)  # a cascade stage: the previous stage's labels too
        return build_nnunet_network(arch, channels, network_outputs(plan), where=f"plans.json ({configuration})")
    channels = plan.network_channels(configuration)  # a cascade stage: the previous stage's channels too
    return build_network(cfg, channels, network_outputs(plan), deep_supervision=deep_supervision)


# ---------------------------------------------------------------------------- measurement
def measure_training_bytes(
    plan_config: PlanConfig | Mapping[str, Any],
    in_channels: int,
    num_classes: int,
    batch_size: int,
    *,
    patch_size: Sequence[int] | None = None,
    device: str = "cpu",
    amp: bool = False,
    seed: int = 0,
) -> dict[str, int]:
    """Run one fp32 training step (SGD momentum, the training loss: nnU-Net's Dice+CE over the deep-supervision
    outputs, :func:`segpipe.losses.build_loss` ``("dice_ce")`` in :class:`~segpipe.losses.DeepSupervision`) and count
    the bytes its tensors hold: those saved for backward (seen by ``saved_tensors_hooks``, deduplicated
    by storage, parameters excluded) plus parameters, gradients and momentum buffers.
    ``patch_size`` overrides the plan's (keep it small on CPU). ``amp``: fp16 autocast (CUDA). On CUDA it
    also reports the allocator's peaks (``cuda_peak_allocated``/``cuda_peak_reserved``), which include
    what the model leaves out on purpose (cuDNN workspace, transient activation gradients).
    """
    cfg = _as_config(plan_config)
    if patch_size is not None:
        cfg = PlanConfig.from_dict({**cfg.to_dict(), "patch_size": list(patch_size)})
    torch.manual_seed(seed)
    # every head in the graph (keep_unused), as under DDP: each parameter gets a gradient and a momentum buffer
    loss_fn = DeepSupervision(build_loss("dice_ce"), keep_unused=True)
    model = build_network(cfg, in_channels, num_classes, deep_supervision=True).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    cin = in_channels * max(1, cfg.input_slices)
    x = torch.randn(batch_size, cin, *cfg.patch_size, device=device)
    target = torch.randint(0, num_classes, (batch_size, *cfg.patch_size), device=device)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs:
            saved[ptr] = max(saved.get(ptr, 0), storage.nbytes())
        return t

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.float16 if cuda else torch.bfloat16, enabled=amp)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        outs = model(x)
        outs = outs if isinstance(outs, list) else [outs]
        loss = loss_fn(outs, target)
    loss.backward()
    opt.step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(
        v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)
    )
    result = {
        "saved": int(sum(saved.values())),
        "parameters": int(params),
        "gradients": int(grads),
        "optimizer_state": int(state),
    }
    result["total"] = int(sum(result.values()))
    if cuda:
        torch.cuda.synchronize()
        result["cuda_peak_allocated"] = int(torch.cuda.max_memory_allocated())
        result["cuda_peak_reserved"] = int(torch.cuda.max_memory_reserved())
    return result
