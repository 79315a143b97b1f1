"""SAM's mask decoder (Kirillov et al., 2023, section 3 and appendix A, Figure 14).

Prompt tokens (output tokens + sparse prompt tokens) and image tokens update each other in a
**two-way transformer**: each block runs (1) self-attention among the tokens, (2) cross-attention
from the tokens to the image, (3) an MLP on the tokens, (4) cross-attention from the image to the
tokens. Positional codes are added to queries and keys at every attention (never to values).
Then the image map is upscaled 4x by transposed convolutions, and each mask token becomes, through
its own small MLP (a **hypernetwork**), the weights of a 1x1 "layer" applied to that map: the
mask is a dot product per pixel. A separate IoU token predicts each mask's quality.
"""

from __future__ import annotations

import torch
from torch import nn

from .convnext import LayerNorm2d
from .layers import Attention, attention, merge_heads, split_heads


def hypernetwork_masks(mask_weights: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
    """Each mask token's weights dotted with every pixel's feature (the dynamic mask head).

    mask_weights: (B, K, c) from the hypernetwork MLPs; upscaled: (B, c, H, W) image features.
    Returns mask logits (B, K, H, W).
    """
    B, c, H, W = upscaled.shape
    if mask_weights.shape[0] != B or mask_weights.shape[-1] != c:
        raise ValueError(f"mask weights {tuple(mask_weights.shape)} do not fit features {tuple(upscaled.shape)}")
    return (mask_weights @ upscaled.reshape(B, c, H * W)).reshape(B, -1, H, W)  # (B, K, c) @ (B, c, HW)


class FeedForward(nn.Module):
    """An MLP of `num_layers` linear layers with ReLU between them (SAM's MLP everywhere in the
    decoder: the block MLP, the hypernetworks and the IoU head)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"num_layers must be at least 2, got {num_layers}")
        self.proj_in = nn.Linear(in_dim, hidden_dim)
        self.layers = nn.ModuleList([nn.Linear(hidden_dim, hidden_dim) for _ in range(num_layers - 2)])
        self.proj_out = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.proj_in(x))
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.proj_out(x)


class DownsampledAttention(Attention):
    """`layers.Attention` (cross-attention: `q`, `k`, `v`, `proj`) whose queries, keys and values are
    projected to dim / downsample_rate before the heads split (SAM appendix A: halves the cost of
    the 4,096 image tokens in cross-attention).

    Queries, keys and values come as three tensors: the keys carry positional codes that the
    values must not, so forward takes the key and value inputs separately.
    """

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1):
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ValueError(f"inner width {inner} (= {dim} / {downsample_rate}) is not divisible by {num_heads} heads")
        super().__init__(dim, num_heads, context_dim=dim, head_dim=inner // num_heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.q(q), self.num_heads)  # (B, heads, Lq, d)
        k = split_heads(self.k(k), self.num_heads)  # (B, heads, Lk, d)
        v = split_heads(self.v(v), self.num_heads)
        out, _ = attention(q, k, v, use_sdpa=self.use_sdpa)
        return self.proj(merge_heads(out))  # (B, Lq, inner) -> (B, Lq, dim)


class TwoWayBlock(nn.Module):
    """One block of the two-way transformer: tokens (B, T, C) and image tokens (B, HW, C).

    Post-norm (LayerNorm after each residual), as in the paper's code. In the first block the
    tokens' self-attention replaces them instead of adding a residual (`skip_first_pe`): at that
    point the tokens *are* their positional codes.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_pe: bool):
        super().__init__()
        self.self_attn = DownsampledAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn_token_to_image = DownsampledAttention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, mlp_dim, dim, 2)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn_image_to_token = DownsampledAttention(dim, num_heads, downsample_rate)
        self.norm4 = nn.LayerNorm(dim, eps=1e-6)
        self.skip_first_pe = skip_first_pe

    def forward(self, tokens, image, token_pe, image_pe) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_pe:
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norm1(tokens)
        # (2) tokens read the image
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(tokens + token_pe, image + image_pe, image))
        # (3) MLP on the tokens
        tokens = self.norm3(tokens + self.mlp(tokens))
        # (4) every image token reads the prompt tokens: the image map becomes prompt-aware
        image = self.norm4(image + self.cross_attn_image_to_token(image + image_pe, tokens + token_pe, tokens))
        return tokens, image


class TwoWayTransformer(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, mlp_dim: int, downsample_rate: int):
        super().__init__()
        self.layers = nn.ModuleList(
            [TwoWayBlock(dim, num_heads, mlp_dim, downsample_rate, skip_first_pe=(i == 0)) for i in range(depth)]
        )
        self.final_attn_token_to_image = DownsampledAttention(dim, num_heads, downsample_rate)
        self.norm_final = nn.LayerNorm(dim)  # eps 1e-5 here, as in the paper's code

    def forward(self, tokens, image, image_pe) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T, C), which are also their own positional codes; image and image_pe (B, HW, C)."""
        token_pe = tokens
        for layer in self.layers:
            tokens, image = layer(tokens, image, token_pe, image_pe)
        tokens = self.norm_final(tokens + self.final_attn_token_to_image(tokens + token_pe, image + image_pe, image))
        return tokens, image


class MaskDecoder(nn.Module):
    """Image embeddings + prompt embeddings -> mask logits (B, K, 4g, 4g) and IoU predictions (B, K)."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, mlp_dim: int, downsample_rate: int = 2,
        num_multimask_outputs: int = 3, iou_head_depth: int = 3, iou_head_hidden_dim: int = 256,
    ):
        super().__init__()
        if dim % 8:
            raise ValueError(f"the decoder width {dim} must be divisible by 8 (the upscaled map has dim / 8 channels)")
        self.num_mask_tokens = num_multimask_outputs + 1  # token 0: the single-mask answer
        self.iou_token = nn.Parameter(torch.randn(1, dim) * 0.02)
        self.mask_tokens = nn.Parameter(torch.randn(self.num_mask_tokens, dim) * 0.02)
        self.transformer = TwoWayTransformer(dim, depth, num_heads, mlp_dim, downsample_rate)
        self.upscale_conv1 = nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2)
        self.upscale_layer_norm = LayerNorm2d(dim // 4, eps=1e-6)
        self.upscale_conv2 = nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2)
        self.output_hypernetworks_mlps = nn.ModuleList(
            [FeedForward(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)]
        )
        self.iou_prediction_head = FeedForward(dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings (B, C, g, g); image_pe (C, g, g); sparse prompt tokens (B, T, C); dense
        prompt (B, C, g, g). Returns masks (B, K, 4g, 4g) and IoU predictions (B, K): K = 3 (tokens
        1-3) if multimask else 1 (token 0)."""
        B, C, g, _ = image_embeddings.shape
        output_tokens = torch.cat([self.iou_token, self.mask_tokens]).expand(B, -1, -1)  # (B, 1+K, C)
        tokens = torch.cat([output_tokens, sparse], dim=1)  # (B, 1+K+T, C)
        image = (image_embeddings + dense).flatten(2).transpose(1, 2)  # (B, C, g, g) -> (B, g*g, C)
        pe = image_pe.flatten(1).transpose(0, 1).expand(B, -1, -1)  # (C, g, g) -> (B, g*g, C)
        tokens, image = self.transformer(tokens, image, pe)
        iou_token, mask_tokens = tokens[:, 0], tokens[:, 1 : 1 + self.num_mask_tokens]
        image = image.transpose(1, 2).reshape(B, C, g, g)  # (B, g*g, C) -> (B, C, g, g)
        up = torch.nn.functional.gelu(self.upscale_layer_norm(self.upscale_conv1(image)))  # (B, C/4, 2g, 2g)
        up = torch.nn.functional.gelu(self.upscale_conv2(up))  # (B, C/8, 4g, 4g)
        weights = torch.stack(
            [mlp(mask_tokens[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, 1+K, C/8)
        masks = hypernetwork_masks(weights, up)  # (B, 1+K, 4g, 4g)
        iou = self.iou_prediction_head(iou_token)  # (B, 1+K)
        keep = slice(1, None) if multimask else slice(0, 1)
        return masks[:, keep], iou[:, keep]
