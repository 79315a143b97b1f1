"""Checks for lab 04 (masked autoencoders). The references are course_lib.mae's own functions."""

from __future__ import annotations

import torch

from ..mae import mae_loss as ref_mae_loss
from ..mae import normalized_pixel_target as ref_normalized_pixel_target
from ..mae import random_masking as ref_random_masking
from ..mae import unshuffle as ref_unshuffle
from . import Case, Lab

LAB = Lab("Lab 04 (MAE)", ["random_masking", "unshuffle", "normalized_pixel_target", "mae_loss"])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_masking(fn) -> None:
    """(x, mask_ratio, noise) -> (x_kept, mask, ids_restore); hidden cases: other ratios, one
    sample, many tokens, mask ratio 0."""
    cases = []
    for i, (B, L, D, r) in enumerate([(1, 8, 2, 0.75), (2, 16, 4, 0.75), (3, 10, 3, 0.6), (1, 49, 8, 0.9), (2, 12, 5, 0.0)]):
        g = _gen(i)
        x, noise = torch.randn(B, L, D, generator=g), torch.rand(B, L, generator=g)
        cases.append(Case((x, r, noise), ref_random_masking(x, r, noise), f"tokens {B}x{L}x{D}, mask ratio {r}"))
    LAB.run("random_masking", fn, cases, atol=0)


def unshuffle(fn) -> None:
    """(x_kept, mask_token, ids_restore) -> (B, L, D) in the original order."""
    cases = []
    for i, (B, L, D, r) in enumerate([(1, 8, 2, 0.75), (2, 16, 6, 0.75), (3, 10, 4, 0.5), (2, 9, 3, 0.0)]):
        g = _gen(10 + i)
        x, noise = torch.randn(B, L, D, generator=g), torch.rand(B, L, generator=g)
        kept, _, ids_restore = ref_random_masking(x, r, noise)
        token = torch.randn(1, 1, D, generator=g)
        expected = ref_unshuffle(kept, token, ids_restore)
        cases.append(Case((kept, token, ids_restore), expected, f"{B} samples, {kept.shape[1]} of {L} tokens kept"))
    LAB.run("unshuffle", fn, cases, atol=0)


def normalized_pixel_target(fn) -> None:
    """(patches,) -> per-patch (x - mean) / sqrt(unbiased var + 1e-6)."""
    cases = []
    for i, (B, L, P) in enumerate([(1, 4, 12), (2, 16, 48), (3, 5, 3)]):
        patches = torch.rand(B, L, P, generator=_gen(20 + i))
        cases.append(Case((patches,), ref_normalized_pixel_target(patches), f"patches {B}x{L}x{P}"))
    flat = torch.full((1, 2, 4), 0.5)  # a uniform patch: no division by zero thanks to eps
    cases.append(Case((flat,), ref_normalized_pixel_target(flat), "uniform patches"))
    LAB.run("normalized_pixel_target", fn, cases)


def mae_loss(fn) -> None:
    """(pred, target, mask, norm_pix) -> MSE over hidden patches only."""
    cases = []
    for i, (B, L, P, r, norm) in enumerate([(1, 4, 3, 0.5, False), (2, 16, 48, 0.75, False), (2, 16, 48, 0.75, True), (3, 10, 12, 0.6, True)]):
        g = _gen(30 + i)
        pred, target = torch.randn(B, L, P, generator=g), torch.rand(B, L, P, generator=g)
        _, mask, _ = ref_random_masking(torch.zeros(B, L, 1), r, torch.rand(B, L, generator=g))
        expected = ref_mae_loss(pred, target, mask, norm_pix=norm)
        cases.append(Case((pred, target, mask), expected, f"{B}x{L} patches, ratio {r}, norm_pix={norm}", kwargs={"norm_pix": norm}))
    LAB.run("mae_loss", fn, cases)


def summary() -> dict:
    return LAB.summary()
