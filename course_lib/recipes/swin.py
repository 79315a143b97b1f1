"""Swin experiments of lecture 02: the cost of global and windowed attention (Swin eq. 1-2) and
which tokens exchange information in one (shifted-)window layer (Swin Figure 2).

The model and its pure functions live in `course_lib.swin`; this module measures them.
"""

from __future__ import annotations

import torch

from ..swin import cyclic_shift, shifted_window_mask, window_partition


def attention_flops(H: int, W: int, C: int, window_size: int | None = None) -> int:
    """Multiply-adds of one attention layer on an H x W map of width C (Swin eq. 1-2):
    global 4hwC^2 + 2(hw)^2 C; windowed 4hwC^2 + 2 M^2 hw C."""
    hw = H * W
    mixing = 2 * hw * hw * C if window_size is None else 2 * window_size**2 * hw * C
    return 4 * hw * C * C + mixing


def window_connectivity(H: int, W: int, window_size: int, shift: int) -> torch.Tensor:
    """Which tokens exchange information in one (shifted-)window attention layer.

    Returns a boolean (H*W, H*W), tokens numbered row-major on the original (unshifted) map:
    entry [i, j] is True when token i attends to token j (same window, same mask region).
    H and W must be multiples of the window.
    """
    M = window_size
    ids = cyclic_shift(torch.arange(H * W).reshape(1, H, W, 1), shift)  # where each token lands
    members = window_partition(ids, M).reshape(-1, M * M)  # (nW, M*M) original token ids
    mask = shifted_window_mask(H, W, M, shift)  # (nW, M*M, M*M)
    rows = members[:, :, None].expand_as(mask)
    cols = members[:, None, :].expand_as(mask)
    A = torch.zeros(H * W, H * W, dtype=torch.bool)
    A[rows[mask], cols[mask]] = True
    return A
