"""Checks for lab 01 (ViT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The course's own answers: the expected values come from them, and they are unreachable while a
# student's function runs. Renamed in course_lib? Change them here only.
from course_lib import layers
from course_lib.layers import resample_pos_embed as ref_resample_pos_embed
from course_lib.vit import PatchEmbed, ViT
from course_lib.vit import patchify as ref_patchify

from . import Case, Lab

LAB = Lab("01", "Lab 01 (ViT)")


def ref_patch_embed_linear(images, weight, bias, patch_size):
    return F.conv2d(images, weight, bias, stride=patch_size).flatten(2).transpose(1, 2)


def ref_attention(q, k, v, mask=None):
    return layers.attention(q, k, v, mask, use_sdpa=False)[0]


def ref_vit_tokens(patch_tokens, cls_token, pos_embed, reg_tokens):
    B = patch_tokens.shape[0]
    t = torch.cat([cls_token.expand(B, -1, -1), patch_tokens], dim=1) + pos_embed
    return torch.cat([t[:, :1], reg_tokens.expand(B, -1, -1), t[:, 1:]], dim=1)


@LAB.exercise(ref_patchify)
def patchify(gen):
    """(images, patch_size) -> (B, N, p*p*C); hidden cases: non-square images, one channel, p=1."""
    for i, (B, C, H, W, p) in enumerate([(2, 3, 8, 8, 4), (1, 3, 32, 32, 8), (2, 1, 12, 20, 4), (3, 3, 6, 9, 3), (1, 2, 4, 4, 1)]):
        yield Case((torch.randn(B, C, H, W, generator=gen(i)), p), f"images {B}x{C}x{H}x{W}, patch {p}")


@LAB.exercise(ref_patch_embed_linear, blocked=[ref_patchify, PatchEmbed], atol=1e-4, torch_functions=["conv2d"])
def patch_embed_linear(gen):
    """(images, conv_weight, conv_bias, patch_size) -> tokens equal to the strided conv's."""
    for i, (B, C, H, W, p, D) in enumerate([(2, 3, 8, 8, 4, 5), (1, 3, 16, 24, 8, 7), (2, 1, 6, 6, 2, 3)]):
        g = gen(10 + i)
        x, w, b = torch.randn(B, C, H, W, generator=g), torch.randn(D, C, p, p, generator=g), torch.randn(D, generator=g)
        yield Case((x, w, b, p), f"images {B}x{C}x{H}x{W}, patch {p}, width {D}")


@LAB.exercise(ref_attention, blocked=[layers.attention, layers.Attention], torch_functions=["scaled_dot_product_attention"])
def attention(gen):
    """(q, k, v, mask=None) -> softmax(q k^T / sqrt(d) + mask) v, mask boolean (True = attend)."""
    for i, (shape, masked) in enumerate([((1, 4, 8), False), ((2, 3, 5, 8), False), ((2, 6, 16), True), ((2, 2, 7, 4), True)]):
        g = gen(20 + i)
        q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
        mask = torch.rand(*shape[:-1], shape[-2], generator=g) > 0.3 if masked else None
        if mask is not None:
            mask[..., 0] = True  # every query may attend to at least one key
        yield Case((q, k, v), f"q {'x'.join(map(str, shape))}{', with mask' if masked else ''}", kwargs={"mask": mask} if masked else {})


@LAB.exercise(ref_vit_tokens, blocked=[ViT])
def vit_tokens(gen):
    """(patch_tokens, cls_token, pos_embed, reg_tokens) -> [CLS, registers, patches] with
    position embeddings added to CLS and patches only."""
    for i, (B, N, D, R) in enumerate([(2, 4, 6, 0), (1, 9, 8, 2), (3, 16, 4, 4)]):
        g = gen(30 + i)
        x, cls, pos = torch.randn(B, N, D, generator=g), torch.randn(1, 1, D, generator=g), torch.randn(1, N + 1, D, generator=g)
        yield Case((x, cls, pos, torch.randn(1, R, D, generator=g)), f"{B} images, {N} patches, {R} registers")


@LAB.exercise(ref_resample_pos_embed)
def resample_pos_embed(gen):
    """(pos_embed, new_grid, old_grid, num_prefix_tokens) -> bicubic resampling of the grid part."""
    for i, (old, new, P) in enumerate([((4, 4), (6, 6), 1), ((4, 4), (2, 8), 1), ((3, 5), (6, 4), 2), ((8, 8), (8, 8), 1), ((2, 2), (5, 3), 0)]):
        pos = torch.randn(1, P + old[0] * old[1], 6, generator=gen(40 + i))
        yield Case((pos, new, old, P), f"grid {old} -> {new}, {P} prefix tokens")


def summary() -> dict:
    return LAB.summary()
