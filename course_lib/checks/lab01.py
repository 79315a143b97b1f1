"""Checks for lab 01 (ViT). The references are course_lib's own functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers import attention as ref_attention
from ..layers import resample_pos_embed as ref_resample
from ..vit import patchify as ref_patchify
from . import Case, Lab

LAB = Lab("Lab 01 (ViT)", ["patchify", "patch_embed_linear", "attention", "vit_tokens", "resample_pos_embed"])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def patchify(fn) -> None:
    """(images, patch_size) -> (B, N, p*p*C); hidden cases: non-square images, one channel, p=1."""
    cases = []
    for i, (B, C, H, W, p) in enumerate([(2, 3, 8, 8, 4), (1, 3, 32, 32, 8), (2, 1, 12, 20, 4), (3, 3, 6, 9, 3), (1, 2, 4, 4, 1)]):
        x = torch.randn(B, C, H, W, generator=_gen(i))
        cases.append(Case((x, p), ref_patchify(x, p), f"images {B}x{C}x{H}x{W}, patch {p}"))
    LAB.run("patchify", fn, cases)


def patch_embed_linear(fn) -> None:
    """(images, conv_weight, conv_bias, patch_size) -> tokens equal to the strided conv's."""
    cases = []
    for i, (B, C, H, W, p, D) in enumerate([(2, 3, 8, 8, 4, 5), (1, 3, 16, 24, 8, 7), (2, 1, 6, 6, 2, 3)]):
        g = _gen(10 + i)
        x, w, b = torch.randn(B, C, H, W, generator=g), torch.randn(D, C, p, p, generator=g), torch.randn(D, generator=g)
        expected = F.conv2d(x, w, b, stride=p).flatten(2).transpose(1, 2)
        cases.append(Case((x, w, b, p), expected, f"images {B}x{C}x{H}x{W}, patch {p}, width {D}"))
    LAB.run("patch_embed_linear", fn, cases, atol=1e-4)


def attention(fn) -> None:
    """(q, k, v, mask=None) -> softmax(q k^T / sqrt(d) + mask) v, mask boolean (True = attend)."""
    cases = []
    for i, (shape, masked) in enumerate([((1, 4, 8), False), ((2, 3, 5, 8), False), ((2, 6, 16), True), ((2, 2, 7, 4), True)]):
        g = _gen(20 + i)
        q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
        mask = torch.rand(*shape[:-1], shape[-2], generator=g) > 0.3 if masked else None
        if mask is not None:
            mask[..., 0] = True  # every query may attend to at least one key
        expected = ref_attention(q, k, v, mask, use_sdpa=False)[0]
        desc = f"q {'x'.join(map(str, shape))}{', with mask' if masked else ''}"
        cases.append(Case((q, k, v), expected, desc, kwargs={"mask": mask} if masked else {}))
    LAB.run("attention", fn, cases)


def vit_tokens(fn) -> None:
    """(patch_tokens, cls_token, pos_embed, reg_tokens) -> [CLS, registers, patches] with
    position embeddings added to CLS and patches only."""
    cases = []
    for i, (B, N, D, R) in enumerate([(2, 4, 6, 0), (1, 9, 8, 2), (3, 16, 4, 4)]):
        g = _gen(30 + i)
        x, cls, pos = torch.randn(B, N, D, generator=g), torch.randn(1, 1, D, generator=g), torch.randn(1, N + 1, D, generator=g)
        reg = torch.randn(1, R, D, generator=g)
        t = torch.cat([cls.expand(B, -1, -1), x], dim=1) + pos
        expected = torch.cat([t[:, :1], reg.expand(B, -1, -1), t[:, 1:]], dim=1)
        cases.append(Case((x, cls, pos, reg), expected, f"{B} images, {N} patches, {R} registers"))
    LAB.run("vit_tokens", fn, cases)


def resample_pos_embed(fn) -> None:
    """(pos_embed, new_grid, old_grid, num_prefix_tokens) -> bicubic resampling of the grid part."""
    cases = []
    for i, (old, new, P) in enumerate([((4, 4), (6, 6), 1), ((4, 4), (2, 8), 1), ((3, 5), (6, 4), 2), ((8, 8), (8, 8), 1), ((2, 2), (5, 3), 0)]):
        g = _gen(40 + i)
        pos = torch.randn(1, P + old[0] * old[1], 6, generator=g)
        cases.append(Case((pos, new, old, P), ref_resample(pos, new, old, P), f"grid {old} -> {new}, {P} prefix tokens"))
    LAB.run("resample_pos_embed", fn, cases, atol=1e-5)


def summary() -> dict:
    return LAB.summary()
