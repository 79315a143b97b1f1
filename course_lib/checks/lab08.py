"""Checks for lab 08 (Flamingo). The references are course_lib.flamingo's own functions and modules."""

from __future__ import annotations

import torch
from torch import nn

from ..flamingo import CrossAttention, PerceiverAttention
from ..flamingo import gated_residual as ref_gated_residual
from ..flamingo import media_attention_mask as ref_media_mask
from . import Case, Lab

LAB = Lab("Lab 08 (Flamingo)", ["media_attention_mask", "gated_residual", "perceiver_attention", "masked_cross_attention"])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _locations(B: int, T: int, images: int, g: torch.Generator, first: int | None = None) -> torch.Tensor:
    """(B, T) boolean with `images` <image> markers per row at random places (row 0 starts at `first`)."""
    loc = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        places = torch.randperm(T, generator=g)[:images]
        if b == 0 and first is not None:
            places = torch.cat([torch.tensor([first]), torch.randperm(T - first - 1, generator=g)[: images - 1] + first + 1])
        loc[b, places] = True
    return loc


def media_attention_mask(fn) -> None:
    """(media_locations, num_media, only_immediate) -> (B, T, num_media) boolean."""
    cases = []
    for i, (B, T, M, immediate) in enumerate([(1, 6, 2, True), (2, 10, 3, True), (2, 10, 3, False), (3, 7, 1, True), (1, 12, 4, False)]):
        g = _gen(i)
        loc = _locations(B, T, M, g, first=2)
        kw = {"only_immediate": immediate}
        desc = f"{B}x{T} tokens, {M} images, only_immediate={immediate}"
        cases.append(Case((loc, M), ref_media_mask(loc, M, immediate), desc, kwargs=kw))
    LAB.run("media_attention_mask", fn, cases)


def gated_residual(fn) -> None:
    """(x, branch, alpha) -> x + tanh(alpha) * branch; alpha = 0 must give x back exactly."""
    cases = []
    for i, (shape, alpha) in enumerate([((2, 3, 4), 0.0), ((2, 3, 4), 0.7), ((1, 5, 8), -2.0), ((3, 2, 6), None)]):
        g = _gen(10 + i)
        x, branch = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        a = torch.randn(shape[-1], generator=g) if alpha is None else torch.tensor([alpha])
        desc = f"x {'x'.join(map(str, shape))}, " + ("one gate per channel" if alpha is None else f"alpha {alpha}")
        cases.append(Case((x, branch, a), ref_gated_residual(x, branch, a), desc))
    LAB.run("gated_residual", fn, cases, atol=1e-6)


def perceiver_attention(fn) -> None:
    """(media, latents, wq, wk, wv, wo, num_heads) -> latent update (B, L, D): queries from the
    latents, keys and values from concat(media, latents); no norms, no biases."""
    cases = []
    for i, (B, N, L, D, h, d) in enumerate([(1, 6, 2, 8, 2, 4), (2, 9, 3, 8, 2, 3), (2, 1, 4, 6, 3, 2), (3, 16, 5, 12, 4, 4)]):
        g = _gen(20 + i)
        media, latents = torch.randn(B, N, D, generator=g), torch.randn(B, L, D, generator=g)
        wq, wk, wv = (torch.randn(h * d, D, generator=g) * 0.5 for _ in range(3))
        wo = torch.randn(D, h * d, generator=g) * 0.5
        ref = PerceiverAttention(D, h, d)
        ref.norm_media, ref.norm_latents = nn.Identity(), nn.Identity()
        with torch.no_grad():
            for lin, w in ((ref.q, wq), (ref.k, wk), (ref.v, wv), (ref.proj, wo)):
                lin.weight.copy_(w)
            expected = ref(media, latents)[0]
        cases.append(Case((media, latents, wq, wk, wv, wo, h), expected, f"{B} images, {N} features, {L} latents, {h} heads of {d}"))
    LAB.run("perceiver_attention", fn, cases, atol=1e-5)


def masked_cross_attention(fn) -> None:
    """(x, media, media_mask, wq, wk, wv, wo, num_heads) -> (B, T, dim); rows of media_mask that
    are all False (text before any image) give zeros."""
    cases = []
    for i, (B, T, M, L, D, Dm, h) in enumerate([(1, 6, 1, 2, 8, 6, 2), (2, 8, 2, 3, 8, 4, 2), (2, 9, 3, 2, 12, 6, 3), (1, 5, 1, 4, 4, 4, 1)]):
        g = _gen(30 + i)
        mask = ref_media_mask(_locations(B, T, M, g, first=2), M).repeat_interleave(L, dim=-1)  # (B, T, M*L)
        x, media = torch.randn(B, T, D, generator=g), torch.randn(B, M * L, Dm, generator=g)
        wq, wo = torch.randn(D, D, generator=g) * 0.5, torch.randn(D, D, generator=g) * 0.5
        wk, wv = torch.randn(D, Dm, generator=g) * 0.5, torch.randn(D, Dm, generator=g) * 0.5
        ref = CrossAttention(D, Dm, h)
        with torch.no_grad():
            for lin, w in ((ref.q, wq), (ref.k, wk), (ref.v, wv), (ref.proj, wo)):
                lin.weight.copy_(w)
            expected = ref(x, media, mask)[0]
        desc = f"{B}x{T} tokens, {M} images of {L} tokens, {h} heads"
        cases.append(Case((x, media, mask, wq, wk, wv, wo, h), expected, desc))
    LAB.run("masked_cross_attention", fn, cases, atol=1e-5)


def summary() -> dict:
    return LAB.summary()
