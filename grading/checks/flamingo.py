"""Checks for lab 08 (Flamingo)."""

from __future__ import annotations

import torch
from torch import nn

# The course's own answers: the expected values come from them, and they are unreachable while a
# student's function runs. Renamed in course_lib? Change them here only.
from course_lib import flamingo
from course_lib.layers import Attention, attention

from . import Case, Lab

LAB = Lab("08", "Lab 08 (Flamingo)")
ATTENTION = [attention, Attention, flamingo.PerceiverAttention, flamingo.CrossAttention]
NO_SDPA = ["scaled_dot_product_attention"]


def _load(module: nn.Module, weights: dict) -> nn.Module:
    with torch.no_grad():
        for name, w in weights.items():
            getattr(module, name).weight.copy_(w)
    return module


def ref_perceiver_attention(media, latents, wq, wk, wv, wo, num_heads):
    """course_lib's PerceiverAttention without its norms, with the given weights."""
    ref = _load(flamingo.PerceiverAttention(media.shape[-1], num_heads, wq.shape[0] // num_heads), dict(q=wq, k=wk, v=wv, proj=wo))
    ref.norm_media, ref.norm_latents = nn.Identity(), nn.Identity()
    with torch.no_grad():
        return ref(media, latents)[0]


def ref_masked_cross_attention(x, media, media_mask, wq, wk, wv, wo, num_heads):
    """course_lib's CrossAttention with the given weights."""
    ref = _load(flamingo.CrossAttention(x.shape[-1], media.shape[-1], num_heads), dict(q=wq, k=wk, v=wv, proj=wo))
    with torch.no_grad():
        return ref(x, media, media_mask)[0]


def _locations(B: int, T: int, images: int, g: torch.Generator, first: int | None = None) -> torch.Tensor:
    """(B, T) boolean with `images` <image> markers per row at random places (row 0 starts at `first`)."""
    loc = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        places = torch.randperm(T, generator=g)[:images]
        if b == 0 and first is not None:
            places = torch.cat([torch.tensor([first]), torch.randperm(T - first - 1, generator=g)[: images - 1] + first + 1])
        loc[b, places] = True
    return loc


@LAB.exercise(flamingo.media_attention_mask)
def media_attention_mask(gen):
    """(media_locations, num_media, only_immediate) -> (B, T, num_media) boolean."""
    for i, (B, T, M, immediate) in enumerate([(1, 6, 2, True), (2, 10, 3, True), (2, 10, 3, False), (3, 7, 1, True), (1, 12, 4, False)]):
        yield Case((_locations(B, T, M, gen(i), first=2), M), f"{B}x{T} tokens, {M} images, only_immediate={immediate}",
                   kwargs={"only_immediate": immediate})


@LAB.exercise(flamingo.gated_residual, atol=1e-6)
def gated_residual(gen):
    """(x, branch, alpha) -> x + tanh(alpha) * branch; alpha = 0 must give x back exactly."""
    for i, (shape, alpha) in enumerate([((2, 3, 4), 0.0), ((2, 3, 4), 0.7), ((1, 5, 8), -2.0), ((3, 2, 6), None)]):
        g = gen(10 + i)
        x, branch = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        a = torch.randn(shape[-1], generator=g) if alpha is None else torch.tensor([alpha])
        yield Case((x, branch, a), f"x {'x'.join(map(str, shape))}, " + ("one gate per channel" if alpha is None else f"alpha {alpha}"))


@LAB.exercise(ref_perceiver_attention, blocked=ATTENTION, torch_functions=NO_SDPA)
def perceiver_attention(gen):
    """(media, latents, wq, wk, wv, wo, num_heads) -> latent update (B, L, D): queries from the
    latents, keys and values from concat(media, latents); no norms, no biases."""
    for i, (B, N, L, D, h, d) in enumerate([(1, 6, 2, 8, 2, 4), (2, 9, 3, 8, 2, 3), (2, 1, 4, 6, 3, 2), (3, 16, 5, 12, 4, 4)]):
        g = gen(20 + i)
        media, latents = torch.randn(B, N, D, generator=g), torch.randn(B, L, D, generator=g)
        wq, wk, wv = (torch.randn(h * d, D, generator=g) * 0.5 for _ in range(3))
        yield Case((media, latents, wq, wk, wv, torch.randn(D, h * d, generator=g) * 0.5, h), f"{B} images, {N} features, {L} latents, {h} heads of {d}")


@LAB.exercise(ref_masked_cross_attention, blocked=ATTENTION, torch_functions=NO_SDPA)
def masked_cross_attention(gen):
    """(x, media, media_mask, wq, wk, wv, wo, num_heads) -> (B, T, dim); rows of media_mask that
    are all False (text before any image) give zeros."""
    for i, (B, T, M, L, D, Dm, h) in enumerate([(1, 6, 1, 2, 8, 6, 2), (2, 8, 2, 3, 8, 4, 2), (2, 9, 3, 2, 12, 6, 3), (1, 5, 1, 4, 4, 4, 1)]):
        g = gen(30 + i)
        mask = flamingo.media_attention_mask(_locations(B, T, M, g, first=2), M).repeat_interleave(L, dim=-1)  # (B, T, M*L)
        x, media = torch.randn(B, T, D, generator=g), torch.randn(B, M * L, Dm, generator=g)
        wq, wo = torch.randn(D, D, generator=g) * 0.5, torch.randn(D, D, generator=g) * 0.5
        wk, wv = torch.randn(D, Dm, generator=g) * 0.5, torch.randn(D, Dm, generator=g) * 0.5
        yield Case((x, media, mask, wq, wk, wv, wo, h), f"{B}x{T} tokens, {M} images of {L} tokens, {h} heads")


def summary() -> dict:
    return LAB.summary()
