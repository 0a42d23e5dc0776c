"""SlowFast 8x8 R50 (Feichtenhofer et al., "SlowFast networks for video recognition", ICCV 2019) as a plain
torch module whose state_dict uses pytorchvideo's own names.

Why our own module: ``pytorchvideo`` imports ``torchvision``, and PyPI's torchvision does not load against the
project's CPU torch wheel. This file restates what ``pytorchvideo.models.slowfast.create_slowfast(model_depth=50,
model_num_class=400)`` builds, module for module, so that the public ``SLOWFAST_8x8_R50.pyth`` checkpoint's
``model_state`` loads with ``load_state_dict(..., strict=True)`` and no renaming. Parity with pytorchvideo is
checked against ``shared/data/slowfast_oracle`` (pytorchvideo 0.1.5's output for given weights and input).

State-dict layout (pytorchvideo names; ``p`` = pathway, 0 slow / 1 fast)::

    blocks.0.multipathway_blocks.{p}.{conv,norm}                        stems (conv, BN, ReLU, max-pool)
    blocks.{0..3}.multipathway_fusion.{conv_fast_to_slow,norm}          fast->slow lateral fusion
    blocks.{1..4}.multipathway_blocks.{p}.res_blocks.{i}.
        branch1_{conv,norm}            (first block of a stage only)    shortcut projection
        branch2.{conv_a,norm_a,conv_b,norm_b,conv_c,norm_c}             bottleneck
    blocks.4.multipathway_fusion                                        Identity (no fusion after res5)
    blocks.5                                                            per-pathway AvgPool3d + concat (no params)
    blocks.6.proj.{weight,bias}                                         Kinetics-400 classifier (unused for features)

Feature (``SlowFastNet.forward``): the head's input, i.e. pytorchvideo with ``blocks[6].proj`` replaced by
``nn.Identity``: per pathway ``AvgPool3d((T, crop/32, crop/32), stride=1)`` then the head's global average,
concatenated slow first -> ``(B, 32*w + 32*w/beta_inv)`` = ``(B, 2304)`` for R50. At the 224 crop the pooling
kernel covers the whole (8, 7, 7) / (32, 7, 7) map, so this is the global average of each pathway, as in
HERO_Video_Feature_Extractor's ``ResNetBasicHead(last_fc=True)``.

Departures: none in the R50 preset. Test presets (``SlowFastConfig.from_name("tiny")``) shrink widths/depths and
the crop and pool with a plain global average (``head_pool="global"``); they exist only so tests run in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["SlowFastConfig", "SlowFastNet", "init_random_"]


@dataclass(frozen=True)
class SlowFastConfig:
    """SlowFast hyper-parameters (pytorchvideo ``create_slowfast`` defaults = the ``r50_8x8`` preset).

    width        slow-pathway stem channels ``w``; stage outputs are 4w, 8w, 16w, 32w (slow) and /beta_inv (fast)
    beta_inv     channel reduction of the fast pathway (pytorchvideo ``slowfast_channel_reduction_ratio``)
    fusion_ratio fast->slow fusion conv output = ``fusion_ratio`` x its input channels
    fusion_kernel temporal kernel of the fusion conv (stride ``alpha``)
    alpha        fast frames per slow frame
    depths       bottleneck blocks per stage (res2..res5)
    fast_frames  frames in the fast pathway input (slow gets ``fast_frames // alpha``)
    crop_size    input height = width
    head_pool    "avg": pytorchvideo's AvgPool3d((T, crop/32, crop/32), stride 1) then global average;
                 "global": plain global average (test presets, any crop)
    """

    name: str = "r50_8x8"
    width: int = 64
    beta_inv: int = 8
    fusion_ratio: int = 2
    fusion_kernel: int = 7
    alpha: int = 4
    depths: tuple[int, int, int, int] = (3, 4, 6, 3)
    num_classes: int = 400
    fast_frames: int = 32
    crop_size: int = 224
    head_pool: str = "avg"

    def __post_init__(self) -> None:
        if self.head_pool not in ("avg", "global"):
            raise ValueError(f"SlowFastConfig.head_pool must be 'avg' or 'global', got {self.head_pool!r}")
        if self.width % self.beta_inv or self.fast_frames % self.alpha:
            raise ValueError(f"SlowFastConfig: width {self.width} must divide by beta_inv {self.beta_inv} and "
                             f"fast_frames {self.fast_frames} by alpha {self.alpha}")
        if self.head_pool == "avg" and self.crop_size % 32:
            raise ValueError(f"SlowFastConfig: crop_size {self.crop_size} must be a multiple of 32 with head_pool='avg'")

    @property
    def slow_frames(self) -> int:
        return self.fast_frames // self.alpha

    @property
    def dim(self) -> int:
        """Feature width: slow (32 w) + fast (32 w / beta_inv) -> 2304 for R50."""
        return 32 * self.width + 32 * self.width // self.beta_inv

    @classmethod
    def from_name(cls, name: str) -> "SlowFastConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown SlowFast preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]


PRESETS: dict[str, SlowFastConfig] = {
    "r50_8x8": SlowFastConfig(),
    # test-only: 8/1 stem channels, one block per stage, 32-px crop, global pooling (dim 256 + 32 = 288)
    "tiny": SlowFastConfig(name="tiny", width=8, depths=(1, 1, 1, 1), num_classes=10, crop_size=32,
                           head_pool="global"),
}
PRESETS["tiny_deep"] = replace(PRESETS["tiny"], name="tiny_deep", width=16, depths=(2, 1, 2, 1), crop_size=48)


def _bn(c: int) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(c, eps=1e-5, momentum=0.1)


class ResNetBasicStem(nn.Module):
    """conv (kT x 7 x 7, stride 1x2x2) -> BN -> ReLU -> max-pool (1x3x3, stride 1x2x2): (B,3,T,H,W) -> (B,C,T,H/4,W/4)."""

    def __init__(self, c_out: int, kt: int):
        super().__init__()
        self.conv = nn.Conv3d(3, c_out, (kt, 7, 7), stride=(1, 2, 2), padding=(kt // 2, 3, 3), bias=False)
        self.norm = _bn(c_out)
        self.activation = nn.ReLU()
        self.pool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.activation(self.norm(self.conv(x))))


class FuseFastToSlow(nn.Module):
    """Lateral connection: conv (k x 1 x 1, stride alpha) on fast -> BN -> ReLU, concatenated after slow channels."""

    def __init__(self, c_fast: int, ratio: int, kernel: int, alpha: int):
        super().__init__()
        self.conv_fast_to_slow = nn.Conv3d(c_fast, c_fast * ratio, (kernel, 1, 1), stride=(alpha, 1, 1),
                                           padding=(kernel // 2, 0, 0), bias=False)
        self.norm = _bn(c_fast * ratio)
        self.activation = nn.ReLU()

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        x_s, x_f = x
        fuse = self.activation(self.norm(self.conv_fast_to_slow(x_f)))  # (B, ratio*Cf, Ts, H, W)
        return [torch.cat([x_s, fuse], 1), x_f]


class BottleneckBlock(nn.Module):
    """Tx1x1 conv_a -> BN -> ReLU -> 1x3x3 conv_b (spatial stride) -> BN -> ReLU -> 1x1x1 conv_c -> BN."""

    def __init__(self, c_in: int, c_inner: int, c_out: int, kt: int, stride: int):
        super().__init__()
        self.conv_a = nn.Conv3d(c_in, c_inner, (kt, 1, 1), padding=(kt // 2, 0, 0), bias=False)
        self.norm_a = _bn(c_inner)
        self.act_a = nn.ReLU()
        self.conv_b = nn.Conv3d(c_inner, c_inner, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False)
        self.norm_b = _bn(c_inner)
        self.act_b = nn.ReLU()
        self.conv_c = nn.Conv3d(c_inner, c_out, 1, bias=False)
        self.norm_c = _bn(c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act_a(self.norm_a(self.conv_a(x)))
        x = self.act_b(self.norm_b(self.conv_b(x)))
        return self.norm_c(self.conv_c(x))


class ResBlock(nn.Module):
    """ReLU(shortcut(x) + branch2(x)); the shortcut is a strided 1x1x1 conv + BN where shapes change."""

    def __init__(self, c_in: int, c_inner: int, c_out: int, kt: int, stride: int):
        super().__init__()
        if c_in != c_out or stride != 1:
            self.branch1_conv = nn.Conv3d(c_in, c_out, 1, stride=(1, stride, stride), bias=False)
            self.branch1_norm = _bn(c_out)
        else:
            self.branch1_conv = self.branch1_norm = None
        self.branch2 = BottleneckBlock(c_in, c_inner, c_out, kt, stride)
        self.activation = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.branch1_conv is None else self.branch1_norm(self.branch1_conv(x))
        return self.activation(shortcut + self.branch2(x))


class ResStage(nn.Module):
    def __init__(self, depth: int, c_in: int, c_inner: int, c_out: int, kt: int, stride: int):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ResBlock(c_in if i == 0 else c_out, c_inner, c_out, kt, stride if i == 0 else 1) for i in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.res_blocks:
            x = block(x)
        return x


class MultiPathWayWithFuse(nn.Module):
    """Run pathway p's block on input p, then the fusion (Identity after the last stage)."""

    def __init__(self, blocks: list[nn.Module], fusion: nn.Module):
        super().__init__()
        self.multipathway_blocks = nn.ModuleList(blocks)
        self.multipathway_fusion = fusion

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        return self.multipathway_fusion([block(xi) for block, xi in zip(self.multipathway_blocks, x)])


class PoolConcatPathway(nn.Module):
    """pytorchvideo ``blocks[5]``: per-pathway pooling, then concatenation along channels (slow first)."""

    def __init__(self, kernels: list[tuple[int, int, int]] | None):
        super().__init__()
        self.pool = None if kernels is None else nn.ModuleList(nn.AvgPool3d(k, stride=1) for k in kernels)

    def forward(self, x: list[Tensor]) -> Tensor:
        if self.pool is None:
            return torch.cat([xi.mean((2, 3, 4), keepdim=True) for xi in x], 1)  # (B, C, 1, 1, 1)
        return torch.cat([pool(xi) for pool, xi in zip(self.pool, x)], 1)  # (B, C, T', H', W')


class ResNetBasicHead(nn.Module):
    """pytorchvideo ``blocks[6]``; ``proj`` is kept so the checkpoint loads strictly, features skip it."""

    def __init__(self, c_in: int, num_classes: int):
        super().__init__()
        self.proj = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3, 4))  # the head's global average with proj = Identity: (B, C, T', H', W') -> (B, C)


# pytorchvideo create_slowfast defaults: per pathway (slow, fast), per stage res2..res5
_CONV_A_KT = ((1, 1, 3, 3), (3, 3, 3, 3))
_SPATIAL_STRIDES = (1, 2, 2, 2)


class SlowFastNet(nn.Module):
    """SlowFast as ``blocks`` (pytorchvideo's ``Net``); ``forward(slow, fast) -> (B, dim)`` pre-projection features."""

    def __init__(self, config: SlowFastConfig | None = None):
        super().__init__()
        cfg = self.config = config or SlowFastConfig()
        w, b = cfg.width, cfg.beta_inv

        def fusion(c_slow: int) -> FuseFastToSlow:
            return FuseFastToSlow(c_slow // b, cfg.fusion_ratio, cfg.fusion_kernel, cfg.alpha)

        blocks: list[nn.Module] = [MultiPathWayWithFuse(
            [ResNetBasicStem(w, 1), ResNetBasicStem(w // b, 5)], fusion(w))]
        c_in, c_out = w, 4 * w
        for s, depth in enumerate(cfg.depths):
            extra = c_in * cfg.fusion_ratio // b  # fused fast channels concatenated onto the slow input
            stages = [ResStage(depth, c_in + extra, c_out // 4, c_out, _CONV_A_KT[0][s], _SPATIAL_STRIDES[s]),
                      ResStage(depth, c_in // b, c_out // 4 // b, c_out // b, _CONV_A_KT[1][s], _SPATIAL_STRIDES[s])]
            last = s == len(cfg.depths) - 1
            blocks.append(MultiPathWayWithFuse(stages, nn.Identity() if last else fusion(c_out)))
            c_in, c_out = c_out, 2 * c_out
        side = cfg.crop_size // 32
        kernels = None if cfg.head_pool == "global" else [(cfg.slow_frames, side, side), (cfg.fast_frames, side, side)]
        blocks.append(PoolConcatPathway(kernels))
        blocks.append(ResNetBasicHead(c_in + c_in // b, cfg.num_classes))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, slow: Tensor, fast: Tensor) -> Tensor:
        """slow (B, 3, T/alpha, S, S), fast (B, 3, T, S, S), normalised pixels -> (B, dim) fp32 features.

        ``dim`` = slow (32 w) || fast (32 w / beta_inv) = 2048 || 256 for R50.
        """
        x: list[Tensor] = [slow, fast]
        for block in self.blocks[:5]:
            x = block(x)  # stems and res2..res5: [(B, Cs, Ts, h, w), (B, Cf, Tf, h, w)]
        return self.blocks[6](self.blocks[5](x))  # pool + concat -> (B, Cs + Cf, t, h', w') -> (B, dim)

    def logits(self, features: Tensor) -> Tensor:
        """Kinetics-400 class scores of ``forward``'s features (the head's projection): (B, dim) -> (B, classes)."""
        return self.blocks[6].proj(features)


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random weights (test presets / no checkpoint): He-normal convs, non-trivial BN statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        elif isinstance(m, nn.BatchNorm3d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
        elif isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.01)
            m.bias.zero_()
    return model
