"""Checks for lab 03 (ConvNeXt and GRN)."""

from __future__ import annotations

import torch

# The course's own answers: the expected values come from them, and they are unreachable while a
# student's function runs. Renamed in course_lib? Change them here only.
from course_lib.convnext import GRN, ConvNeXtBlock, LayerNorm2d, fcmae_mask, grn_aggregate, grn_normalize
from course_lib.convnext import grn as ref_grn
from course_lib.convnext import layer_norm_2d as ref_layer_norm_2d
from course_lib.convnext import upsample_mask as ref_upsample_mask

from . import Case, Lab

LAB = Lab("03", "Lab 03 (ConvNeXt)")


def _block_params(dim: int, kernel: int, v2: bool, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A block's weights, random everywhere (GRN and layer scale included, so zeros hide nothing)."""
    block = ConvNeXtBlock(dim, kernel_size=kernel, layer_scale=None if v2 else 0.5, grn=v2)
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in block.state_dict().items()}


def ref_convnext_block(x, params, keep=None):
    """course_lib's ConvNeXtBlock with the given weights (V2 when they hold GRN's)."""
    v2 = any(k.startswith("grn.") for k in params)
    block = ConvNeXtBlock(x.shape[1], kernel_size=params["dwconv.weight"].shape[-1], layer_scale=None if v2 else 0.5, grn=v2).eval()
    block.load_state_dict(params)
    with torch.no_grad():
        return block(x, keep)


def ref_sparse_block(x, keep, params):
    return ref_convnext_block(x, params, keep)


@LAB.exercise(ref_layer_norm_2d, blocked=[LayerNorm2d])
def layer_norm_2d(gen):
    """(x (B, C, H, W), weight, bias, eps) -> LayerNorm over C at every pixel."""
    for i, (B, C, H, W) in enumerate([(2, 4, 3, 3), (1, 8, 5, 7), (3, 2, 1, 6), (2, 16, 4, 4)]):
        g = gen(i)
        x, w, b = torch.randn(B, C, H, W, generator=g) * 3 + 1, torch.randn(C, generator=g), torch.randn(C, generator=g)
        yield Case((x, w, b, 1e-6), f"x {B}x{C}x{H}x{W}")


@LAB.exercise(ref_grn, blocked=[GRN, grn_aggregate, grn_normalize])
def grn(gen):
    """(x (B, H, W, C), gamma, beta) -> GRN; hidden cases: non-square maps, zero gamma, one channel."""
    for i, (B, H, W, C) in enumerate([(2, 4, 4, 8), (1, 3, 5, 6), (2, 7, 2, 16), (1, 4, 4, 1), (2, 2, 2, 4)]):
        g = gen(10 + i)
        x, gamma, beta = torch.randn(B, H, W, C, generator=g), torch.randn(C, generator=g), torch.randn(C, generator=g)
        if i == 4:
            gamma, beta = torch.zeros(C), torch.zeros(C)  # the initialization: must return x itself
        yield Case((x, gamma, beta), f"x {B}x{H}x{W}x{C}" + (", gamma = beta = 0" if i == 4 else ""))


@LAB.exercise(ref_convnext_block, blocked=[ConvNeXtBlock, ref_grn, GRN], atol=1e-4)
def convnext_block(gen):
    """(x (B, C, H, W), params) -> the block's output; V1 (layer scale) and V2 (GRN) blocks."""
    for i, (B, C, H, W, k, v2) in enumerate([(2, 8, 6, 6, 7, True), (1, 8, 5, 9, 7, False), (2, 4, 4, 4, 3, True), (1, 16, 3, 5, 5, False)]):
        params = _block_params(C, k, v2, gen(20 + i))
        x = torch.randn(B, C, H, W, generator=gen(30 + i))
        yield Case((x, params), f"{'V2' if v2 else 'V1'} block, x {B}x{C}x{H}x{W}, kernel {k}")


@LAB.exercise(ref_upsample_mask)
def upsample_mask(gen):
    """(mask (B, gh, gw), scale) -> (B, 1, gh*scale, gw*scale)."""
    for i, (B, gh, gw, s) in enumerate([(2, 2, 2, 4), (1, 3, 5, 2), (3, 4, 4, 8), (1, 1, 3, 3)]):
        yield Case((fcmae_mask(B, (gh, gw), 0.5, generator=gen(40 + i)), s), f"mask {B}x{gh}x{gw}, scale {s}")


@LAB.exercise(ref_sparse_block, blocked=[ref_convnext_block, ConvNeXtBlock, ref_grn, GRN], atol=1e-4)
def sparse_block(gen):
    """(x, keep (B, 1, H, W), params) -> the V2 block with FCMAE's re-masking."""
    for i, (B, C, gh, gw, s) in enumerate([(2, 8, 2, 2, 3), (1, 8, 3, 2, 4), (2, 4, 2, 3, 2)]):
        params = _block_params(C, 7, True, gen(50 + i))
        mask = fcmae_mask(B, (gh, gw), 0.5, generator=gen(60 + i))
        keep = 1 - ref_upsample_mask(mask, s)
        x = torch.randn(B, C, gh * s, gw * s, generator=gen(70 + i)) * keep
        yield Case((x, keep, params), f"x {B}x{C}x{gh * s}x{gw * s}, {int(mask.sum())} masked cells")


def summary() -> dict:
    return LAB.summary()
