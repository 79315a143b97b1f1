"""ConvNeXt experiments of lectures 03: the modernization roadmap from a ResNet block to ConvNeXt's
(ConvNeXt section 2, Fig. 2-3), the measurements of feature collapse (ConvNeXt V2 section 3,
Fig. 3-4), and why FCMAE needs sparse convolution (mask leakage).

The models (ConvNeXt, GRN, FCMAE) live in `course_lib.convnext`; this module studies them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..convnext import GRN, ConvNeXt, LayerNorm2d, upsample_mask


# ----------------------------------------------------------------------------------------------
# The modernization roadmap (ConvNeXt section 2, Fig. 2-3): from a ResNet block to ConvNeXt's
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockDesign:
    """One point on the roadmap. Every field is one of the paper's block-level changes."""

    depthwise: bool = False  # 2.3 ResNeXt-ify: the 3x3 conv becomes depthwise (groups = channels)
    inverted: bool = False  # 2.4 inverted bottleneck: hidden width 4x dim instead of dim/4
    conv_first: bool = False  # 2.5 move the spatial conv up, like attention before the MLP
    kernel_size: int = 3  # 2.5 larger kernel: 7x7
    act: str = "relu"  # 2.6 GELU instead of ReLU
    one_act: bool = False  # 2.6 a single activation, between the two 1x1 convs
    one_norm: bool = False  # 2.6 a single norm, after the spatial conv
    norm: str = "batch"  # 2.6 "batch" -> "layer" (LayerNorm over channels)


ROADMAP: list[tuple[str, BlockDesign]] = []
_d = BlockDesign()
for _name, _change in [
    ("ResNet bottleneck", {}),
    ("depthwise conv", dict(depthwise=True)),
    ("inverted bottleneck", dict(inverted=True)),
    ("move conv up", dict(conv_first=True)),
    ("7x7 kernel", dict(kernel_size=7)),
    ("GELU", dict(act="gelu")),
    ("fewer activations", dict(one_act=True)),
    ("fewer norms", dict(one_norm=True)),
    ("LayerNorm", dict(norm="layer")),
]:
    _d = BlockDesign(**{**vars(_d), **_change})
    ROADMAP.append((_name, _d))
del _d, _name, _change


class RoadmapBlock(nn.Module):
    """A residual block built from a BlockDesign; the last roadmap step equals a ConvNeXt V1 block
    without layer scale (same parameters, same multiply-adds)."""

    def __init__(self, dim: int, design: BlockDesign):
        super().__init__()
        d = design
        hidden = dim * 4 if d.inverted else dim // 4
        width = dim if d.conv_first else hidden  # channels the spatial conv sees
        k = d.kernel_size
        spatial = nn.Conv2d(width, width, k, padding=k // 2, groups=width if d.depthwise else 1)
        expand, reduce = nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, dim, 1)
        convs = [spatial, expand, reduce] if d.conv_first else [expand, spatial, reduce]
        act = nn.GELU if d.act == "gelu" else nn.ReLU
        norm = (lambda c: LayerNorm2d(c, eps=1e-6)) if d.norm == "layer" else nn.BatchNorm2d
        layers: list[nn.Module] = []
        for i, conv in enumerate(convs):
            layers.append(conv)
            if not d.one_norm or conv is spatial:
                layers.append(norm(conv.out_channels))
            if (d.one_act and conv is expand) or (not d.one_act and i < 2):
                layers.append(act())
        self.body = nn.Sequential(*layers)
        self.post_act = nn.Identity() if d.one_act else act()  # ResNet's ReLU after the addition

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post_act(x + self.body(x))


# ----------------------------------------------------------------------------------------------
# Looking for feature collapse (ConvNeXt V2 section 3, Fig. 3-4)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def hidden_activations(model: ConvNeXt, images: torch.Tensor, stage: int = -1, block: int = -1, after_grn: bool = False) -> torch.Tensor:
    """The wide hidden layer of one block (after GELU; before GRN unless after_grn), where
    ConvNeXt V2 looks for collapse: (B, H, W, hidden), channels-last."""
    out: list[torch.Tensor] = []
    hook = model.stages[stage].blocks[block].grn.register_forward_hook(
        lambda _m, inputs, output: out.append(output if after_grn else inputs[0])
    )
    try:
        model.forward_features(images)
    finally:
        hook.remove()
    return out[0]


def feature_cosine_distance(x: torch.Tensor) -> float:
    """ConvNeXt V2 Fig. 4's diversity score: for each image, the mean over all channel pairs of
    (1 - cos(X_i, X_j)) / 2, with X_i the flattened H x W map of channel i; averaged over images.
    x: (B, H, W, C). 0 when every channel carries the same map, higher for diverse channels."""
    maps = F.normalize(x.flatten(1, 2).transpose(1, 2), dim=-1)  # (B, C, H*W), unit-length maps
    cos = maps @ maps.transpose(1, 2)  # (B, C, C)
    return ((1 - cos) / 2).mean().item()


def collapsed_channels(x: torch.Tensor, rel: float = 0.01, cv: float = 0.1) -> tuple[int, int]:
    """(dead, saturated) channel counts of activations x (B, H, W, C) over a batch of images.

    dead: the channel's largest |response| is below `rel` times the largest of the layer.
    saturated: it responds, but almost the same everywhere: std / |mean| below `cv` over all
    positions and images (a constant map carries no information about the image).
    """
    a = x.flatten(0, 2)  # (B*H*W, C)
    peak = a.abs().amax(dim=0)  # (C,)
    dead = peak < rel * peak.max()
    saturated = ~dead & (a.std(dim=0) < cv * a.mean(dim=0).abs())
    return int(dead.sum()), int(saturated.sum())


@contextlib.contextmanager
def grn_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily make every GRN of `model` the identity (gamma = beta = 0), then restore it."""
    saved = [(m, m.gamma.detach().clone(), m.beta.detach().clone()) for m in model.modules() if isinstance(m, GRN)]
    try:
        with torch.no_grad():
            for m, _, _ in saved:
                m.gamma.zero_()
                m.beta.zero_()
        yield model
    finally:
        with torch.no_grad():
            for m, g, b in saved:
                m.gamma.copy_(g)
                m.beta.copy_(b)


@torch.no_grad()
def mask_leakage(encoder: ConvNeXt, images: torch.Tensor, mask: torch.Tensor, sparse: bool) -> list[float]:
    """Why FCMAE needs sparse convolution: per stage, the mean |feature| in masked cells divided by
    the mean |feature| in visible cells.

    sparse=False zeroes the masked pixels once and runs the ordinary dense network: every 7x7 conv
    copies visible content a few cells into the holes (and biases fill them), so deeper stages see
    no holes at all and the masked region is no longer hidden. sparse=True re-masks after every
    layer, as sparse convolution computes only at visible cells: the ratio stays exactly 0.
    """
    s = encoder.config.total_stride
    if sparse:
        stages = encoder.forward_features(images, mask=mask, return_stages=True)
    else:
        stages = encoder.forward_features(images * (1 - upsample_mask(mask, s).to(images)), return_stages=True)
    ratios = []
    for feat, keep in zip(stages, encoder.keep_masks(mask, images.shape[2:])):
        a = feat.abs().mean(dim=1, keepdim=True)  # (B, 1, h, w)
        masked = (a * (1 - keep)).sum() / (1 - keep).sum().clamp(min=1)
        visible = (a * keep).sum() / keep.sum().clamp(min=1)
        ratios.append((masked / visible).item())
    return ratios
