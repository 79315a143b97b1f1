"""Checks for lab 06 (CLIP and SigLIP)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The course's own answers: the expected values come from them, and they are unreachable while a
# student's function runs. Renamed in course_lib? Change them here only.
from course_lib import clip

from . import Case, Lab

LAB = Lab("06", "Lab 06 (CLIP)")


def ref_zero_shot_scores(image_emb, prompt_emb):
    classes = F.normalize(F.normalize(prompt_emb, dim=-1).mean(dim=1), dim=-1)  # (C, D)
    return F.normalize(image_emb, dim=-1) @ classes.T


def call_recall(fn, similarity, k):
    """The recall as a tensor, whatever number type the function returns."""
    return torch.tensor(float(fn(similarity, k)))


def _pair(g: torch.Generator, n_images: int, n_texts: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised embeddings of different lengths, so that a missing normalisation shows."""
    return torch.randn(n_images, dim, generator=g) * 3, torch.randn(n_texts, dim, generator=g) * 0.5


@LAB.exercise(clip.contrastive_logits, atol=1e-4)
def clip_logits(gen):
    """(image_emb, text_emb, logit_scale) -> exp(logit_scale) * cosine similarities (Bi, Bt)."""
    for i, (bi, bt, d, s) in enumerate([(4, 4, 8, math.log(1 / 0.07)), (3, 5, 16, 0.0), (6, 2, 3, math.log(100)), (1, 7, 32, 1.5)]):
        yield Case((*_pair(gen(i), bi, bt, d), torch.tensor(s)), f"{bi} images, {bt} texts, width {d}, scale {math.exp(s):.3g}")


@LAB.exercise(clip.clip_loss, blocked=[clip.contrastive_logits], atol=1e-4)
def clip_loss(gen):
    """(image_emb, text_emb, logit_scale) -> the symmetric InfoNCE loss (a scalar)."""
    for i, (n, d, s) in enumerate([(4, 8, math.log(1 / 0.07)), (8, 16, 0.0), (2, 4, math.log(100)), (16, 32, 2.0), (1, 5, 1.0)]):
        yield Case((*_pair(gen(10 + i), n, n, d), torch.tensor(s)), f"{n} pairs, width {d}, scale {math.exp(s):.3g}")
    emb = torch.eye(6)  # perfectly matched pairs at scale 100: the loss is close to zero
    yield Case((emb, emb, torch.tensor(math.log(100))), "6 perfect pairs, scale 100")


@LAB.exercise(clip.siglip_loss, blocked=[clip.contrastive_logits], atol=1e-4)
def siglip_loss(gen):
    """(image_emb, text_emb, logit_scale, logit_bias) -> the pairwise sigmoid loss (a scalar)."""
    for i, (n, d, s, b) in enumerate([(4, 8, math.log(10), -10.0), (8, 16, 0.0, 0.0), (3, 4, 2.0, -3.0), (16, 32, math.log(10), -10.0), (1, 5, 1.0, 2.0)]):
        yield Case((*_pair(gen(20 + i), n, n, d), torch.tensor(s), torch.tensor(b)), f"{n} pairs, width {d}, scale {math.exp(s):.3g}, bias {b:g}")


@LAB.exercise(ref_zero_shot_scores)
def zero_shot_scores(gen):
    """(image_emb (B, D), prompt_emb (C, P, D)) -> cosine similarities (B, C) with the ensembled,
    normalised class embeddings."""
    for i, (b, c, p, d) in enumerate([(5, 3, 1, 8), (4, 5, 6, 16), (1, 2, 3, 4), (7, 10, 2, 32)]):
        g = gen(30 + i)
        yield Case((torch.randn(b, d, generator=g) * 2, torch.randn(c, p, d, generator=g) * 3), f"{b} images, {c} classes x {p} prompts, width {d}")


@LAB.exercise(clip.recall_at_k, atol=1e-6, call=call_recall)
def recall_at_k(gen):
    """(similarity (N, N), k) -> the fraction of rows whose diagonal entry is among the k largest."""
    for i, (n, k) in enumerate([(5, 1), (10, 3), (8, 8), (20, 5), (1, 1)]):
        yield Case((torch.randn(n, n, generator=gen(40 + i)) + 1.5 * torch.eye(n), k), f"{n} queries, k={k}")  # some matches win
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.3, 0.2, 0.1]])
    yield Case((sim.T.contiguous(), 2), "3x3 text -> image (columns as queries), k=2")


def summary() -> dict:
    return LAB.summary()
