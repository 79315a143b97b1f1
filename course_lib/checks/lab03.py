"""Checks for lab 03 (ConvNeXt and GRN). The references are course_lib's own functions and modules."""

from __future__ import annotations

import torch

from ..convnext import ConvNeXtBlock, fcmae_mask
from ..convnext import grn as ref_grn
from ..convnext import layer_norm_2d as ref_layer_norm_2d
from ..convnext import upsample_mask as ref_upsample_mask
from . import Case, Lab

LAB = Lab("Lab 03 (ConvNeXt)", ["layer_norm_2d", "grn", "convnext_block", "upsample_mask", "sparse_block"])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _block(dim: int, kernel: int, v2: bool, seed: int) -> ConvNeXtBlock:
    """A block with random weights everywhere (GRN and layer scale included, so zeros hide nothing)."""
    block = ConvNeXtBlock(dim, kernel_size=kernel, layer_scale=None if v2 else 0.5, grn=v2).eval()
    g = _gen(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return block


def _params(block: ConvNeXtBlock) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


def layer_norm_2d(fn) -> None:
    """(x (B, C, H, W), weight, bias, eps) -> LayerNorm over C at every pixel."""
    cases = []
    for i, (B, C, H, W) in enumerate([(2, 4, 3, 3), (1, 8, 5, 7), (3, 2, 1, 6), (2, 16, 4, 4)]):
        g = _gen(i)
        x, w, b = torch.randn(B, C, H, W, generator=g) * 3 + 1, torch.randn(C, generator=g), torch.randn(C, generator=g)
        cases.append(Case((x, w, b, 1e-6), ref_layer_norm_2d(x, w, b, 1e-6), f"x {B}x{C}x{H}x{W}"))
    LAB.run("layer_norm_2d", fn, cases, atol=1e-5)


def grn(fn) -> None:
    """(x (B, H, W, C), gamma, beta) -> GRN; hidden cases: non-square maps, zero gamma, one channel."""
    cases = []
    shapes = [(2, 4, 4, 8), (1, 3, 5, 6), (2, 7, 2, 16), (1, 4, 4, 1), (2, 2, 2, 4)]
    for i, (B, H, W, C) in enumerate(shapes):
        g = _gen(10 + i)
        x, gamma, beta = torch.randn(B, H, W, C, generator=g), torch.randn(C, generator=g), torch.randn(C, generator=g)
        if i == 4:
            gamma, beta = torch.zeros(C), torch.zeros(C)  # the initialization: must return x itself
        cases.append(Case((x, gamma, beta), ref_grn(x, gamma, beta), f"x {B}x{H}x{W}x{C}" + (", gamma = beta = 0" if i == 4 else "")))
    LAB.run("grn", fn, cases, atol=1e-5)


def convnext_block(fn) -> None:
    """(x (B, C, H, W), params) -> the block's output; V1 (layer scale) and V2 (GRN) blocks."""
    cases = []
    for i, (B, C, H, W, k, v2) in enumerate([(2, 8, 6, 6, 7, True), (1, 8, 5, 9, 7, False), (2, 4, 4, 4, 3, True), (1, 16, 3, 5, 5, False)]):
        block = _block(C, k, v2, 20 + i)
        x = torch.randn(B, C, H, W, generator=_gen(30 + i))
        with torch.no_grad():
            expected = block(x)
        desc = f"{'V2' if v2 else 'V1'} block, x {B}x{C}x{H}x{W}, kernel {k}"
        cases.append(Case((x, _params(block)), expected, desc))
    LAB.run("convnext_block", fn, cases, atol=1e-4)


def upsample_mask(fn) -> None:
    """(mask (B, gh, gw), scale) -> (B, 1, gh*scale, gw*scale)."""
    cases = []
    for i, (B, gh, gw, s) in enumerate([(2, 2, 2, 4), (1, 3, 5, 2), (3, 4, 4, 8), (1, 1, 3, 3)]):
        mask = fcmae_mask(B, (gh, gw), 0.5, generator=_gen(40 + i))
        cases.append(Case((mask, s), ref_upsample_mask(mask, s), f"mask {B}x{gh}x{gw}, scale {s}"))
    LAB.run("upsample_mask", fn, cases)


def sparse_block(fn) -> None:
    """(x, keep (B, 1, H, W), params) -> the V2 block with FCMAE's re-masking."""
    cases = []
    for i, (B, C, gh, gw, s) in enumerate([(2, 8, 2, 2, 3), (1, 8, 3, 2, 4), (2, 4, 2, 3, 2)]):
        block = _block(C, 7, True, 50 + i)
        mask = fcmae_mask(B, (gh, gw), 0.5, generator=_gen(60 + i))
        keep = 1 - ref_upsample_mask(mask, s)
        x = torch.randn(B, C, gh * s, gw * s, generator=_gen(70 + i)) * keep
        with torch.no_grad():
            expected = block(x, keep)
        cases.append(Case((x, keep, _params(block)), expected, f"x {B}x{C}x{gh * s}x{gw * s}, {int(mask.sum())} masked cells"))
    LAB.run("sparse_block", fn, cases, atol=1e-4)


def summary() -> dict:
    return LAB.summary()
