"""Checks for lab 07 (BLIP-2's Q-Former). The references are course_lib.qformer's functions."""

from __future__ import annotations

import torch
from torch import nn

from ..qformer import itc_mask as ref_itc_mask
from ..qformer import itg_mask as ref_itg_mask
from ..qformer import itm_mask as ref_itm_mask
from ..qformer import max_query_similarity as ref_similarity
from ..qformer import prepend_soft_prompt as ref_prepend
from . import Case, Lab

LAB = Lab("Lab 07 (Q-Former)", ["itc_mask", "itm_mask", "itg_mask", "max_query_similarity", "soft_prompt"])

# (num_queries, text_len): the visible example first, then hidden ones (no text, one word, one query).
_MASK_SIZES = [(2, 3), (4, 6), (3, 0), (1, 1), (5, 2), (1, 7)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mask_cases(ref) -> list[Case]:
    return [Case((q, t), ref(q, t), f"{q} queries, {t} text tokens") for q, t in _MASK_SIZES]


def itc_mask(fn) -> None:
    """(num_queries, text_len) -> (L, L) bool, queries and text each see only themselves."""
    LAB.run("itc_mask", fn, _mask_cases(ref_itc_mask))


def itm_mask(fn) -> None:
    """(num_queries, text_len) -> (L, L) bool, all True."""
    LAB.run("itm_mask", fn, _mask_cases(ref_itm_mask))


def itg_mask(fn) -> None:
    """(num_queries, text_len) -> (L, L) bool: queries see queries, text sees queries + earlier text."""
    LAB.run("itg_mask", fn, _mask_cases(ref_itg_mask))


def max_query_similarity(fn) -> None:
    """(query_feats (Bi, Nq, E), text_feats (Bt, E)) -> (Bi, Bt) max over queries of cosine similarity."""
    cases = []
    for i, (Bi, Bt, Nq, E) in enumerate([(2, 3, 4, 8), (4, 4, 32, 16), (1, 5, 1, 3), (3, 2, 7, 5)]):
        g = _gen(70 + i)
        q, t = torch.randn(Bi, Nq, E, generator=g) * 3, torch.randn(Bt, E, generator=g) * 0.5
        cases.append(Case((q, t), ref_similarity(q, t), f"{Bi} images x {Nq} queries, {Bt} texts, width {E}"))
    LAB.run("max_query_similarity", fn, cases)


def soft_prompt(fn) -> None:
    """(query_out (B, Nq, D), proj nn.Linear(D, D_lm), text_embeds (B, T, D_lm)) -> (B, Nq + T, D_lm)."""
    cases = []
    for i, (B, Nq, D, T, Dlm) in enumerate([(2, 4, 8, 5, 6), (1, 32, 16, 3, 12), (3, 1, 4, 1, 4), (2, 6, 5, 0, 7)]):
        g = _gen(80 + i)
        proj = nn.Linear(D, Dlm)
        with torch.no_grad():
            proj.weight.copy_(torch.randn(Dlm, D, generator=g))
            proj.bias.copy_(torch.randn(Dlm, generator=g))
        q, t = torch.randn(B, Nq, D, generator=g), torch.randn(B, T, Dlm, generator=g)
        with torch.no_grad():
            expected = ref_prepend(q, proj, t)
        cases.append(Case((q, proj, t), expected, f"{B} images, {Nq} queries of width {D}, {T} words of width {Dlm}"))
    LAB.run("soft_prompt", fn, cases, atol=1e-5)


def summary() -> dict:
    return LAB.summary()
