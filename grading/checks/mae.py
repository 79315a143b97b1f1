"""Checks for lab 04 (masked autoencoders)."""

from __future__ import annotations

import torch

# The course's own answers: the expected values come from them, and they are unreachable while a
# student's function runs. Renamed in course_lib? Change them here only.
from course_lib import mae

from . import Case, Lab

LAB = Lab("04", "Lab 04 (MAE)")


@LAB.exercise(mae.random_masking, blocked=[mae._keep_lowest_noise], atol=0)
def random_masking(gen):
    """(x, mask_ratio, noise) -> (x_kept, mask, ids_restore); hidden cases: other ratios, one
    sample, many tokens, mask ratio 0."""
    for i, (B, L, D, r) in enumerate([(1, 8, 2, 0.75), (2, 16, 4, 0.75), (3, 10, 3, 0.6), (1, 49, 8, 0.9), (2, 12, 5, 0.0)]):
        g = gen(i)
        yield Case((torch.randn(B, L, D, generator=g), r, torch.rand(B, L, generator=g)), f"tokens {B}x{L}x{D}, mask ratio {r}")


@LAB.exercise(mae.unshuffle, atol=0)
def unshuffle(gen):
    """(x_kept, mask_token, ids_restore) -> (B, L, D) in the original order."""
    for i, (B, L, D, r) in enumerate([(1, 8, 2, 0.75), (2, 16, 6, 0.75), (3, 10, 4, 0.5), (2, 9, 3, 0.0)]):
        g = gen(10 + i)
        x, noise = torch.randn(B, L, D, generator=g), torch.rand(B, L, generator=g)
        kept, _, ids_restore = mae.random_masking(x, r, noise)
        yield Case((kept, torch.randn(1, 1, D, generator=g), ids_restore), f"{B} samples, {kept.shape[1]} of {L} tokens kept")


@LAB.exercise(mae.normalized_pixel_target)
def normalized_pixel_target(gen):
    """(patches,) -> per-patch (x - mean) / sqrt(unbiased var + 1e-6)."""
    for i, (B, L, P) in enumerate([(1, 4, 12), (2, 16, 48), (3, 5, 3)]):
        yield Case((torch.rand(B, L, P, generator=gen(20 + i)),), f"patches {B}x{L}x{P}")
    yield Case((torch.full((1, 2, 4), 0.5),), "uniform patches")  # no division by zero thanks to eps


@LAB.exercise(mae.mae_loss, blocked=[mae.normalized_pixel_target])
def mae_loss(gen):
    """(pred, target, mask, norm_pix) -> MSE over hidden patches only."""
    for i, (B, L, P, r, norm) in enumerate([(1, 4, 3, 0.5, False), (2, 16, 48, 0.75, False), (2, 16, 48, 0.75, True), (3, 10, 12, 0.6, True)]):
        g = gen(30 + i)
        pred, target = torch.randn(B, L, P, generator=g), torch.rand(B, L, P, generator=g)
        _, mask, _ = mae.random_masking(torch.zeros(B, L, 1), r, torch.rand(B, L, generator=g))
        yield Case((pred, target, mask), f"{B}x{L} patches, ratio {r}, norm_pix={norm}", kwargs={"norm_pix": norm})


def summary() -> dict:
    return LAB.summary()
