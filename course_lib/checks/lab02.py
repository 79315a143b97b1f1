"""Checks for lab 02 (Swin). The references are course_lib.swin's own functions."""

from __future__ import annotations

import torch

from .. import swin
from . import Case, Lab

LAB = Lab(
    "Lab 02 (Swin)",
    ["window_partition", "window_reverse", "cyclic_shift", "shifted_window_mask", "relative_position_index", "window_attention"],
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


_MAPS = [(1, 8, 8, 1, 4), (2, 8, 8, 3, 4), (1, 6, 9, 2, 3), (3, 4, 12, 5, 2), (1, 14, 7, 4, 7)]


def window_partition(fn) -> None:
    """(B, H, W, C), M -> (B*nW, M, M, C); hidden cases: non-square maps, several images,
    windows of 2, 3 and 7."""
    cases = []
    for i, (B, H, W, C, M) in enumerate(_MAPS):
        x = torch.randn(B, H, W, C, generator=_gen(i))
        cases.append(Case((x, M), swin.window_partition(x, M), f"map {B}x{H}x{W}x{C}, window {M}"))
    LAB.run("window_partition", fn, cases)


def window_reverse(fn) -> None:
    """(B*nW, M, M, C), M, H, W -> (B, H, W, C), the inverse of window_partition."""
    cases = []
    for i, (B, H, W, C, M) in enumerate(_MAPS):
        x = torch.randn(B, H, W, C, generator=_gen(50 + i))
        cases.append(Case((swin.window_partition(x, M), M, H, W), x, f"map {B}x{H}x{W}x{C}, window {M}"))
    LAB.run("window_reverse", fn, cases)


def cyclic_shift(fn) -> None:
    """(x, shift) -> x rolled up and left by shift; a negative shift rolls back (the inverse)."""
    cases = []
    for i, (B, H, W, C, s) in enumerate([(1, 8, 8, 1, 2), (2, 8, 8, 3, 0), (1, 6, 10, 2, 3), (2, 12, 4, 1, 1), (1, 8, 8, 2, -2)]):
        x = torch.randn(B, H, W, C, generator=_gen(10 + i))
        cases.append(Case((x, s), swin.cyclic_shift(x, s), f"map {B}x{H}x{W}x{C}, shift {s}"))
    LAB.run("cyclic_shift", fn, cases)


def shifted_window_mask(fn) -> None:
    """(H, W, window_size, shift) -> boolean (nW, M*M, M*M); hidden: non-square maps, shift 1."""
    cases = [
        Case((H, W, M, s), swin.shifted_window_mask(H, W, M, s), f"{H}x{W} map, window {M}, shift {s}")
        for H, W, M, s in [(8, 8, 4, 2), (4, 4, 2, 1), (6, 9, 3, 1), (8, 12, 4, 2), (12, 6, 6, 3), (8, 8, 4, 0)]
    ]
    LAB.run("shifted_window_mask", fn, cases)


def relative_position_index(fn) -> None:
    """(window_size) -> (M*M, M*M) integer index into the ((2M-1)^2, heads) table."""
    cases = [Case((M,), swin.relative_position_index(M), f"window {M}") for M in (2, 3, 4, 7)]
    LAB.run("relative_position_index", fn, cases)


def window_attention(fn) -> None:
    """(windows, qkv_weight, qkv_bias, proj_weight, proj_bias, bias_table, num_heads, mask) ->
    (B*nW, M*M, C), equal to course_lib's WindowAttention (V1)."""
    cases = []
    for i, (B, H, W, C, heads, M, s) in enumerate([(1, 4, 4, 8, 2, 2, 0), (2, 8, 8, 6, 3, 4, 2), (1, 6, 9, 4, 1, 3, 1), (2, 8, 4, 8, 4, 4, 2)]):
        g = _gen(30 + i)
        module = swin.WindowAttention(C, heads, M)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        x = torch.randn(B, H, W, C, generator=g)
        windows = swin.window_partition(swin.cyclic_shift(x, s), M).reshape(-1, M * M, C)
        mask = swin.shifted_window_mask(H, W, M, s) if s else None
        with torch.no_grad():
            expected = module(windows, M, mask)[0]
        args = (windows, module.qkv.weight.detach(), module.qkv.bias.detach(), module.proj.weight.detach(),
                module.proj.bias.detach(), module.relative_position_bias_table.detach(), heads, mask)
        desc = f"{B} images, {H}x{W} map, width {C}, {heads} heads, window {M}, shift {s}"
        cases.append(Case(args, expected, desc))
    LAB.run("window_attention", fn, cases, atol=1e-4)


def summary() -> dict:
    return LAB.summary()
