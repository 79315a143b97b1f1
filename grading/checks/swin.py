"""Checks for lab 02 (Swin)."""

from __future__ import annotations

import torch

# The course's own answers: the expected values come from them, and they are unreachable while a
# student's function runs. Renamed in course_lib? Change them here only.
from course_lib import swin
from course_lib.recipes import swin as swin_recipes
from course_lib.layers import Attention, attention

from . import Case, Lab

LAB = Lab("02", "Lab 02 (Swin)")
_MAPS = [(1, 8, 8, 1, 4), (2, 8, 8, 3, 4), (1, 6, 9, 2, 3), (3, 4, 12, 5, 2), (1, 14, 7, 4, 7)]


def ref_window_attention(windows, qkv_weight, qkv_bias, proj_weight, proj_bias, bias_table, num_heads, mask):
    """course_lib's WindowAttention (V1) with the given weights."""
    C, M = windows.shape[-1], round(windows.shape[1] ** 0.5)
    module = swin.WindowAttention(C, num_heads, M)
    with torch.no_grad():
        for p, value in zip([module.qkv.weight, module.qkv.bias, module.proj.weight, module.proj.bias,
                             module.relative_position_bias_table], [qkv_weight, qkv_bias, proj_weight, proj_bias, bias_table]):
            p.copy_(value)
        return module(windows, M, mask)[0]


@LAB.exercise(swin.window_partition)
def window_partition(gen):
    """(B, H, W, C), M -> (B*nW, M, M, C); hidden cases: non-square maps, several images,
    windows of 2, 3 and 7."""
    for i, (B, H, W, C, M) in enumerate(_MAPS):
        yield Case((torch.randn(B, H, W, C, generator=gen(i)), M), f"map {B}x{H}x{W}x{C}, window {M}")


@LAB.exercise(swin.window_reverse)
def window_reverse(gen):
    """(B*nW, M, M, C), M, H, W -> (B, H, W, C), the inverse of window_partition."""
    for i, (B, H, W, C, M) in enumerate(_MAPS):
        x = torch.randn(B, H, W, C, generator=gen(50 + i))
        yield Case((swin.window_partition(x, M), M, H, W), f"map {B}x{H}x{W}x{C}, window {M}")


@LAB.exercise(swin.cyclic_shift, blocked=[swin.reverse_cyclic_shift])
def cyclic_shift(gen):
    """(x, shift) -> x rolled up and left by shift; a negative shift rolls back (the inverse)."""
    for i, (B, H, W, C, s) in enumerate([(1, 8, 8, 1, 2), (2, 8, 8, 3, 0), (1, 6, 10, 2, 3), (2, 12, 4, 1, 1), (1, 8, 8, 2, -2)]):
        yield Case((torch.randn(B, H, W, C, generator=gen(10 + i)), s), f"map {B}x{H}x{W}x{C}, shift {s}")


@LAB.exercise(swin.shifted_window_mask, blocked=[swin_recipes.window_connectivity])
def shifted_window_mask(gen):
    """(H, W, window_size, shift) -> boolean (nW, M*M, M*M); hidden: non-square maps, shift 1."""
    for H, W, M, s in [(8, 8, 4, 2), (4, 4, 2, 1), (6, 9, 3, 1), (8, 12, 4, 2), (12, 6, 6, 3), (8, 8, 4, 0)]:
        yield Case((H, W, M, s), f"{H}x{W} map, window {M}, shift {s}")


@LAB.exercise(swin.relative_position_index)
def relative_position_index(gen):
    """(window_size) -> (M*M, M*M) integer index into the ((2M-1)^2, heads) table."""
    for M in (2, 3, 4, 7):
        yield Case((M,), f"window {M}")


@LAB.exercise(ref_window_attention, blocked=[swin.WindowAttention, swin.relative_position_bias, attention, Attention],
              atol=1e-4, torch_functions=["scaled_dot_product_attention"])
def window_attention(gen):
    """(windows, qkv_weight, qkv_bias, proj_weight, proj_bias, bias_table, num_heads, mask) ->
    (B*nW, M*M, C), equal to course_lib's WindowAttention (V1)."""
    for i, (B, H, W, C, heads, M, s) in enumerate([(1, 4, 4, 8, 2, 2, 0), (2, 8, 8, 6, 3, 4, 2), (1, 6, 9, 4, 1, 3, 1), (2, 8, 4, 8, 4, 4, 2)]):
        g = gen(30 + i)
        weights = [torch.randn(shape, generator=g) * 0.5 for shape in [(3 * C, C), (3 * C,), (C, C), (C,), ((2 * M - 1) ** 2, heads)]]
        x = torch.randn(B, H, W, C, generator=g)
        windows = swin.window_partition(swin.cyclic_shift(x, s), M).reshape(-1, M * M, C)
        mask = swin.shifted_window_mask(H, W, M, s) if s else None
        yield Case((windows, *weights, heads, mask), f"{B} images, {H}x{W} map, width {C}, {heads} heads, window {M}, shift {s}")


def summary() -> dict:
    return LAB.summary()
