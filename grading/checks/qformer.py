"""Checks for lab 07 (BLIP-2's Q-Former)."""

from __future__ import annotations

import torch
from torch import nn

# The course's own answers: the expected values come from them, and they are unreachable while a
# student's function runs. Renamed in course_lib? Change them here only.
from course_lib import qformer

from . import Case, Lab

LAB = Lab("07", "Lab 07 (Q-Former)")
# (num_queries, text_len): the visible example first, then hidden ones (no text, one word, one query).
_MASK_SIZES = [(2, 3), (4, 6), (3, 0), (1, 1), (5, 2), (1, 7)]


def call_soft_prompt(fn, query_out, proj_weight, proj_bias, text_embeds):
    """The exercise takes the projection as an nn.Linear: built here from its weights."""
    proj = nn.Linear(proj_weight.shape[1], proj_weight.shape[0])
    with torch.no_grad():
        proj.weight.copy_(proj_weight)
        proj.bias.copy_(proj_bias)
        return fn(query_out, proj, text_embeds)


def _mask_cases(gen):
    for q, t in _MASK_SIZES:
        yield Case((q, t), f"{q} queries, {t} text tokens")


@LAB.exercise(qformer.itc_mask)
def itc_mask(gen):
    """(num_queries, text_len) -> (L, L) bool, queries and text each see only themselves."""
    yield from _mask_cases(gen)


@LAB.exercise(qformer.itm_mask)
def itm_mask(gen):
    """(num_queries, text_len) -> (L, L) bool, all True."""
    yield from _mask_cases(gen)


@LAB.exercise(qformer.itg_mask)
def itg_mask(gen):
    """(num_queries, text_len) -> (L, L) bool: queries see queries, text sees queries + earlier text."""
    yield from _mask_cases(gen)


@LAB.exercise(qformer.max_query_similarity)
def max_query_similarity(gen):
    """(query_feats (Bi, Nq, E), text_feats (Bt, E)) -> (Bi, Bt) max over queries of cosine similarity."""
    for i, (Bi, Bt, Nq, E) in enumerate([(2, 3, 4, 8), (4, 4, 32, 16), (1, 5, 1, 3), (3, 2, 7, 5)]):
        g = gen(70 + i)
        yield Case((torch.randn(Bi, Nq, E, generator=g) * 3, torch.randn(Bt, E, generator=g) * 0.5), f"{Bi} images x {Nq} queries, {Bt} texts, width {E}")


@LAB.exercise(qformer.prepend_soft_prompt, call=call_soft_prompt)
def soft_prompt(gen):
    """(query_out (B, Nq, D), proj nn.Linear(D, D_lm), text_embeds (B, T, D_lm)) -> (B, Nq + T, D_lm)."""
    for i, (B, Nq, D, T, Dlm) in enumerate([(2, 4, 8, 5, 6), (1, 32, 16, 3, 12), (3, 1, 4, 1, 4), (2, 6, 5, 0, 7)]):
        g = gen(80 + i)
        weight, bias = torch.randn(Dlm, D, generator=g), torch.randn(Dlm, generator=g)
        q, t = torch.randn(B, Nq, D, generator=g), torch.randn(B, T, Dlm, generator=g)
        yield Case((q, weight, bias, t), f"{B} images, {Nq} queries of width {D}, {T} words of width {Dlm}")


def summary() -> dict:
    return LAB.summary()
