"""Checks for lab 06 (CLIP and SigLIP). The references are course_lib.clip's own functions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import clip as ref
from . import Case, Lab

LAB = Lab("Lab 06 (CLIP)", ["clip_logits", "clip_loss", "siglip_loss", "zero_shot_scores", "recall_at_k"])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(seed: int, n_images: int, n_texts: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised embeddings of different lengths, so that a missing normalisation shows."""
    g = _gen(seed)
    return torch.randn(n_images, dim, generator=g) * 3, torch.randn(n_texts, dim, generator=g) * 0.5


def clip_logits(fn) -> None:
    """(image_emb, text_emb, logit_scale) -> exp(logit_scale) * cosine similarities (Bi, Bt)."""
    cases = []
    for i, (bi, bt, d, s) in enumerate([(4, 4, 8, math.log(1 / 0.07)), (3, 5, 16, 0.0), (6, 2, 3, math.log(100)), (1, 7, 32, 1.5)]):
        image, text = _pair(i, bi, bt, d)
        scale = torch.tensor(s)
        cases.append(Case((image, text, scale), ref.contrastive_logits(image, text, scale), f"{bi} images, {bt} texts, width {d}, scale {math.exp(s):.3g}"))
    LAB.run("clip_logits", fn, cases, atol=1e-4)


def clip_loss(fn) -> None:
    """(image_emb, text_emb, logit_scale) -> the symmetric InfoNCE loss (a scalar)."""
    cases = []
    for i, (n, d, s) in enumerate([(4, 8, math.log(1 / 0.07)), (8, 16, 0.0), (2, 4, math.log(100)), (16, 32, 2.0), (1, 5, 1.0)]):
        image, text = _pair(10 + i, n, n, d)
        scale = torch.tensor(s)
        cases.append(Case((image, text, scale), ref.clip_loss(image, text, scale), f"{n} pairs, width {d}, scale {math.exp(s):.3g}"))
    # Perfectly matched pairs at scale 100: the loss is close to zero.
    emb = torch.eye(6)
    cases.append(Case((emb, emb, torch.tensor(math.log(100))), ref.clip_loss(emb, emb, math.log(100)), "6 perfect pairs, scale 100"))
    LAB.run("clip_loss", fn, cases, atol=1e-4)


def siglip_loss(fn) -> None:
    """(image_emb, text_emb, logit_scale, logit_bias) -> the pairwise sigmoid loss (a scalar)."""
    cases = []
    for i, (n, d, s, b) in enumerate([(4, 8, math.log(10), -10.0), (8, 16, 0.0, 0.0), (3, 4, 2.0, -3.0), (16, 32, math.log(10), -10.0), (1, 5, 1.0, 2.0)]):
        image, text = _pair(20 + i, n, n, d)
        scale, bias = torch.tensor(s), torch.tensor(b)
        cases.append(Case((image, text, scale, bias), ref.siglip_loss(image, text, scale, bias), f"{n} pairs, width {d}, scale {math.exp(s):.3g}, bias {b:g}"))
    LAB.run("siglip_loss", fn, cases, atol=1e-4)


def zero_shot_scores(fn) -> None:
    """(image_emb (B, D), prompt_emb (C, P, D)) -> cosine similarities (B, C) with the ensembled,
    normalised class embeddings."""
    cases = []
    for i, (b, c, p, d) in enumerate([(5, 3, 1, 8), (4, 5, 6, 16), (1, 2, 3, 4), (7, 10, 2, 32)]):
        g = _gen(30 + i)
        image, prompts = torch.randn(b, d, generator=g) * 2, torch.randn(c, p, d, generator=g) * 3
        classes = F.normalize(F.normalize(prompts, dim=-1).mean(dim=1), dim=-1)  # (C, D)
        expected = F.normalize(image, dim=-1) @ classes.T
        cases.append(Case((image, prompts), expected, f"{b} images, {c} classes x {p} prompts, width {d}"))
    LAB.run("zero_shot_scores", fn, cases, atol=1e-5)


def recall_at_k(fn) -> None:
    """(similarity (N, N), k) -> the fraction of rows whose diagonal entry is among the k largest."""
    cases = []
    for i, (n, k) in enumerate([(5, 1), (10, 3), (8, 8), (20, 5), (1, 1)]):
        g = _gen(40 + i)
        sim = torch.randn(n, n, generator=g) + 1.5 * torch.eye(n)  # a few matches win, others not
        cases.append(Case((sim, k), torch.tensor(ref.recall_at_k(sim, k)), f"{n} queries, k={k}"))
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.3, 0.2, 0.1]])
    cases.append(Case((sim.T.contiguous(), 2), torch.tensor(ref.recall_at_k(sim.T, 2)), "3x3 text -> image (columns as queries), k=2"))

    def as_tensor(similarity, k):
        return torch.tensor(float(fn(similarity, k)))

    LAB.run("recall_at_k", as_tensor, cases, atol=1e-6)


def summary() -> dict:
    return LAB.summary()
