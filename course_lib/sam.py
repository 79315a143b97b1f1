"""Segment Anything (Kirillov et al., 2023): a promptable segmentation model.

Three parts (paper section 3, Figure 4):
- an **image encoder**, a ViT whose blocks attend inside windows except a few global ones, with
  decomposed relative position terms (Li et al., ViTDet / MViTv2), and a convolutional neck down
  to the decoder width. It runs **once per image**;
- a **prompt encoder**: points (positive or negative) and box corners through random Fourier
  features (Tancik et al., 2020) plus a learned embedding per kind, and a dense mask prompt
  through a small conv stack (or the learned "no mask" embedding);
- a **mask decoder** (`course_lib.sam_decoder`): a two-way transformer between prompt tokens
  and image tokens, then transposed-conv upscaling and one hypernetwork MLP per mask token. It
  runs **once per prompt**, in milliseconds, which is what makes interactive clicking possible.

Coordinates are pixels of the input image, (x, y), like the paper's code. Point labels: 1 =
positive (on the object), 0 = negative (not on it), -1 = padding ("not a point").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .convnext import LayerNorm2d
from .hf import cfg, load_hf_checkpoint, rename_keys
from .layers import Attention, Mlp, PatchEmbed, attention, load_state_dict_checked, merge_heads
from .sam_decoder import MaskDecoder
from .swin import pad_to_window, window_partition, window_reverse  # ViTDet: Swin's windows in a plain ViT


# ----------------------------------------------------------------------------------------------
# The pure functions: relative positions, Fourier features, prompt padding
# ----------------------------------------------------------------------------------------------
def relative_offsets(size: int) -> torch.Tensor:
    """Row index into a (2 * size - 1, d) relative position table for every (query, key) pair of
    one axis: offset q - k shifted by size - 1 into [0, 2 * size - 2]. Returns (size, size) long."""
    coords = torch.arange(size)
    return coords[:, None] - coords[None, :] + (size - 1)


def decomposed_rel_pos(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """SAM's relative position term (from MViTv2, Li et al., 2022, eq. 4), added to the scores.

    q: (B, heads, H*W, d) queries of an H x W grid (a window or the whole map); rel_pos_h:
    (2H - 1, d), rel_pos_w: (2W - 1, d) learned tables. The term for query (y1, x1) and key
    (y2, x2) is q . R_h[y1 - y2] + q . R_w[x1 - x2]: one table per axis instead of one entry per 2D
    offset, so it scales to the 64 x 64 global grid of the real model.
    Returns the additive bias (B, heads, H*W, H*W).
    """
    H, W = size
    if rel_pos_h.shape[0] != 2 * H - 1 or rel_pos_w.shape[0] != 2 * W - 1:
        raise ValueError(
            f"relative position tables of {rel_pos_h.shape[0]} and {rel_pos_w.shape[0]} rows do not fit "
            f"a {H}x{W} grid (they need {2 * H - 1} and {2 * W - 1}): build the block with this window size"
        )
    B, heads, _, d = q.shape
    Rh = rel_pos_h[relative_offsets(H).to(q.device)]  # (H, H, d): [query row, key row]
    Rw = rel_pos_w[relative_offsets(W).to(q.device)]  # (W, W, d)
    q = q.reshape(B, heads, H, W, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", q, Rh)  # (B, heads, H, W, key rows)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", q, Rw)  # (B, heads, H, W, key cols)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, heads, H, W, H, W)
    return bias.reshape(B, heads, H * W, H * W)


def fourier_encode(coords: torch.Tensor, gaussian_matrix: torch.Tensor) -> torch.Tensor:
    """Random Fourier features of 2D coordinates (Tancik et al., 2020; SAM section 3).

    coords: (..., 2), (x, y) normalized to [0, 1]; gaussian_matrix: (2, F), fixed random
    frequencies. Each point maps to [sin(2 pi v), cos(2 pi v)] with v = (2 * coords - 1) @ G, so
    nearby points get similar codes at many spatial frequencies. Returns (..., 2F).
    """
    if coords.shape[-1] != 2:
        raise ValueError(f"coordinates must end in (x, y), got shape {tuple(coords.shape)}")
    v = 2 * math.pi * ((2 * coords - 1).to(gaussian_matrix.dtype) @ gaussian_matrix)  # (..., F)
    return torch.cat([v.sin(), v.cos()], dim=-1)


def grid_coordinates(height: int, width: int, device=None) -> torch.Tensor:
    """The centre of every cell of a height x width grid, normalized to [0, 1]: (H, W, 2) as (x, y)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def pad_points(points: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append one "not a point" (label -1 at (0, 0)) to every prompt: (B, N, 2), (B, N) ->
    (B, N + 1, 2), (B, N + 1). SAM does this when no box is given, so that a point-only prompt has
    the same token layout as a point + box prompt (the box's second corner's place is filled)."""
    B = points.shape[0]
    pad = points.new_zeros(B, 1, 2)
    return torch.cat([points, pad], dim=1), torch.cat([labels, labels.new_full((B, 1), -1)], dim=1)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class SamConfig:
    image_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    # image encoder (a ViT): window attention except in `global_blocks`
    dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    window_size: int = 4
    global_blocks: list[int] = field(default_factory=lambda: [1, 3])
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    eps: float = 1e-6
    # prompt encoder and mask decoder: width = the neck's output channels = 2 x Fourier features
    prompt_dim: int = 32
    fourier_scale: float = 1.0  # std of the random frequencies (the paper's code uses 1)
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_mlp_dim: int = 128
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 64

    @property
    def grid(self) -> int:
        """Side of the image-embedding grid (image size / patch size)."""
        return self.image_size // self.patch_size


# ----------------------------------------------------------------------------------------------
# Image encoder
# ----------------------------------------------------------------------------------------------
class RelPosAttention(Attention):
    """Self-attention over an H x W grid with SAM's decomposed relative position term: the
    course's `layers.Attention` (fused `qkv`, heads, `attention`) plus a bias that depends on each
    query (q . R), so it is computed between the projection and the softmax."""

    def __init__(self, dim: int, num_heads: int, grid: int, qkv_bias: bool = True, use_rel_pos: bool = True):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:  # zeros at init, as in the paper's code
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv_heads(x.reshape(B, H * W, C))  # 3 x (B, heads, H*W, d)
        bias = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (H, W)) if self.use_rel_pos else None
        out, _ = attention(q, k, v, bias, use_sdpa=self.use_sdpa)
        return self.proj(merge_heads(out)).reshape(B, H, W, C)  # (B, heads, HW, d) -> (B, H, W, C)


class EncoderBlock(nn.Module):
    """Pre-norm ViT block on a (B, H, W, C) map; window_size > 0 attends inside non-overlapping
    windows (zero-padded to a multiple of the window, as in ViTDet), 0 attends globally."""

    def __init__(self, config: SamConfig, window_size: int):
        super().__init__()
        c = config
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(c.dim, eps=c.eps)
        self.attn = RelPosAttention(c.dim, c.num_heads, window_size or c.grid, c.qkv_bias, c.use_rel_pos)
        self.norm2 = nn.LayerNorm(c.dim, eps=c.eps)
        self.mlp = Mlp(c.dim, int(c.dim * c.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        h = self.norm1(x)
        if self.window_size:
            h = pad_to_window(h, self.window_size)
            Hp, Wp = h.shape[1:3]
            h = window_partition(h, self.window_size)  # (B*nW, M, M, C)
            h = self.attn(h)
            h = window_reverse(h, self.window_size, Hp, Wp)[:, :H, :W]  # (B, H, W, C), padding cut
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class ImageEncoder(nn.Module):
    """ViT backbone + neck: images (B, 3, S, S) -> image embeddings (B, prompt_dim, S/p, S/p)."""

    def __init__(self, config: SamConfig):
        super().__init__()
        c = config
        self.config = c
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.dim)
        # an absolute position table on the grid (zeros at init in the paper's code)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.grid, c.grid, c.dim)) if c.use_abs_pos else None
        self.blocks = nn.ModuleList(
            [EncoderBlock(c, 0 if i in c.global_blocks else c.window_size) for i in range(c.depth)]
        )
        # the neck (section 3, appendix A): 1x1 conv to the decoder width, 3x3 conv, LayerNorms
        self.neck = nn.ModuleDict({
            "conv1": nn.Conv2d(c.dim, c.prompt_dim, 1, bias=False),
            "norm1": LayerNorm2d(c.prompt_dim, eps=1e-6),
            "conv2": nn.Conv2d(c.prompt_dim, c.prompt_dim, 3, padding=1, bias=False),
            "norm2": LayerNorm2d(c.prompt_dim, eps=1e-6),
        })

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        S = self.config.image_size
        if images.ndim != 4 or images.shape[-2:] != (S, S):
            raise ValueError(
                f"the image encoder expects images of shape (B, {self.config.in_chans}, {S}, {S}), got "
                f"{tuple(images.shape)}: resize (or pad) the images to {S}x{S}"
            )
        g = self.config.grid
        x = self.patch_embed(images).reshape(images.shape[0], g, g, -1)  # (B, N, C) -> (B, g, g, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)  # (B, g, g, C) -> (B, C, g, g)
        n = self.neck
        return n["norm2"](n["conv2"](n["norm1"](n["conv1"](x))))


# ----------------------------------------------------------------------------------------------
# Prompt encoder
# ----------------------------------------------------------------------------------------------
class PromptEncoder(nn.Module):
    """Points, boxes and a mask prompt -> sparse tokens (B, T, C) and a dense map (B, C, g, g)."""

    def __init__(self, config: SamConfig):
        super().__init__()
        c = config
        self.config = c
        if c.prompt_dim % 2:
            raise ValueError(f"prompt_dim {c.prompt_dim} must be even: half sine, half cosine features")
        # fixed random frequencies, not trained (a buffer, as in the paper's code)
        self.register_buffer("gaussian_matrix", c.fourier_scale * torch.randn(2, c.prompt_dim // 2))
        # learned embeddings added to the Fourier code: negative point, positive point, box
        # top-left corner, box bottom-right corner (rows 0-3)
        self.point_embed = nn.Parameter(torch.randn(4, c.prompt_dim) * 0.02)
        self.not_a_point_embed = nn.Parameter(torch.randn(c.prompt_dim) * 0.02)
        self.no_mask_embed = nn.Parameter(torch.randn(c.prompt_dim) * 0.02)
        # dense prompt: a (4g x 4g) mask downscaled 4x by two stride-2 convs, then to the width
        m = c.mask_in_chans
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, m // 4, 2, stride=2), LayerNorm2d(m // 4, eps=1e-6), nn.GELU(),
            nn.Conv2d(m // 4, m, 2, stride=2), LayerNorm2d(m, eps=1e-6), nn.GELU(),
            nn.Conv2d(m, c.prompt_dim, 1),
        )

    def dense_positional_encoding(self) -> torch.Tensor:
        """Fourier code of every image-embedding cell: (C, g, g), the keys' positions in the decoder."""
        g = self.config.grid
        return fourier_encode(grid_coordinates(g, g, self.gaussian_matrix.device), self.gaussian_matrix).permute(2, 0, 1)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """points (B, N, 2) in pixels, labels (B, N) in {1, 0, -1} -> tokens (B, N, C)."""
        coords = (points + 0.5) / self.config.image_size  # the centre of the pixel, in [0, 1]
        emb = fourier_encode(coords, self.gaussian_matrix)  # (B, N, C)
        lab = labels[..., None]
        emb = torch.where(lab == -1, self.not_a_point_embed, emb)  # padding: no position at all
        emb = emb + torch.where(lab == 0, self.point_embed[0], 0.0) + torch.where(lab == 1, self.point_embed[1], 0.0)
        return emb

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """boxes (B, 4) as (x1, y1, x2, y2) pixels -> two corner tokens (B, 2, C)."""
        corners = (boxes.reshape(-1, 2, 2) + 0.5) / self.config.image_size  # (B, 2 corners, (x, y))
        return fourier_encode(corners, self.gaussian_matrix) + self.point_embed[2:4]

    def forward(
        self,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        batch = next((t.shape[0] for t in (points, boxes, mask_logits) if t is not None), None)
        if batch is None:
            raise ValueError("give at least one prompt: points (with labels), boxes or mask_logits")
        tokens = []
        if points is not None:
            if labels is None or labels.shape != points.shape[:2] or points.shape[-1] != 2:
                raise ValueError(
                    f"points must be (B, N, 2) pixels (x, y) with labels (B, N) (1 = on the object, "
                    f"0 = not on it, -1 = padding); got points {tuple(points.shape)}, labels "
                    f"{None if labels is None else tuple(labels.shape)}"
                )
            if boxes is None:
                points, labels = pad_points(points, labels)
            tokens.append(self.embed_points(points, labels))
        if boxes is not None:
            if boxes.shape != (batch, 4):
                raise ValueError(f"boxes must be (B, 4) as (x1, y1, x2, y2) pixels, one per prompt; got {tuple(boxes.shape)}")
            tokens.append(self.embed_boxes(boxes))
        sparse = torch.cat(tokens, dim=1) if tokens else self.point_embed.new_zeros(batch, 0, c.prompt_dim)
        if mask_logits is not None:
            side = 4 * c.grid
            if mask_logits.shape[1:] != (1, side, side):
                raise ValueError(
                    f"mask_logits must be (B, 1, {side}, {side}) (the decoder's low-resolution logits), "
                    f"got {tuple(mask_logits.shape)}"
                )
            dense = self.mask_downscaling(mask_logits)  # (B, C, g, g)
        else:
            dense = self.no_mask_embed.reshape(1, -1, 1, 1).expand(batch, -1, c.grid, c.grid)
        return sparse, dense


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class Sam(nn.Module):
    """Segment Anything: `encode_image` once per image, then `decode` once per prompt.

    forward(images, points, labels, boxes, mask_logits, multimask) -> (mask logits (B, K, 4g, 4g),
    predicted IoU (B, K)), K = 3 for an ambiguous prompt (one click, no box) and 1 otherwise, unless
    `multimask` says which. The masks come at 4x the embedding grid (a quarter of the image side);
    `upsample_masks` brings them to the image size.
    """

    def __init__(self, config: SamConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.prompt_encoder = PromptEncoder(config)
        self.mask_decoder = MaskDecoder(
            config.prompt_dim, config.decoder_depth, config.decoder_heads, config.decoder_mlp_dim,
            config.attention_downsample_rate, config.num_multimask_outputs, config.iou_head_depth,
            config.iou_head_hidden_dim,
        )

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C, g, g): the expensive part, run once per image."""
        return self.image_encoder(images)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_logits: torch.Tensor | None = None,
        multimask: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt per row of `image_embeddings` (repeat rows for several prompts per image)."""
        if multimask is None:  # a single click is ambiguous (part, object, group): three answers
            multimask = points is not None and points.shape[1] == 1 and boxes is None
        sparse, dense = self.prompt_encoder(points, labels, boxes, mask_logits)
        if sparse.shape[0] != image_embeddings.shape[0]:
            raise ValueError(
                f"{image_embeddings.shape[0]} image embeddings but {sparse.shape[0]} prompts: one prompt per "
                "row (use image_embeddings.repeat_interleave(k, 0) for k prompts per image)"
            )
        pos = self.prompt_encoder.dense_positional_encoding()
        return self.mask_decoder(image_embeddings, pos, sparse, dense, multimask)

    def forward(self, images: torch.Tensor, points=None, labels=None, boxes=None, mask_logits=None, multimask=None):
        return self.decode(self.encode_image(images), points, labels, boxes, mask_logits, multimask)

    @classmethod
    def from_hf(cls, source, **overrides) -> "Sam":
        """Load a `transformers` SamModel: an instance (offline), a save_pretrained folder, or a hub
        id such as "facebook/sam-vit-base" (online)."""
        hf_config, state = load_hf_checkpoint(source)
        config = config_from_hf(hf_config, **overrides)
        model = cls(config)
        name = source if isinstance(source, str) else type(source).__name__
        load_state_dict_checked(model, convert_hf_state_dict(state, config), source=str(name))
        return model.eval()


def upsample_masks(mask_logits: torch.Tensor, size: int) -> torch.Tensor:
    """Low-resolution mask logits (B, K, h, w) -> (B, K, size, size) by bilinear interpolation."""
    return F.interpolate(mask_logits, size=(size, size), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------------------------
# Converting transformers checkpoints
# ----------------------------------------------------------------------------------------------
def config_from_hf(hf_config, **overrides) -> SamConfig:
    """Translate a transformers SamConfig (or its config.json) into a SamConfig."""
    v, p, m = (cfg(hf_config, k) for k in ("vision_config", "prompt_encoder_config", "mask_decoder_config"))
    dim = cfg(v, "hidden_size")
    kwargs = dict(
        image_size=cfg(v, "image_size"), patch_size=cfg(v, "patch_size"), in_chans=cfg(v, "num_channels", 3),
        dim=dim, depth=cfg(v, "num_hidden_layers"), num_heads=cfg(v, "num_attention_heads"),
        mlp_ratio=(cfg(v, "mlp_dim") or dim * cfg(v, "mlp_ratio", 4.0)) / dim,
        window_size=cfg(v, "window_size"), global_blocks=list(cfg(v, "global_attn_indexes")),
        qkv_bias=cfg(v, "qkv_bias", True), use_abs_pos=cfg(v, "use_abs_pos", True),
        use_rel_pos=cfg(v, "use_rel_pos", True), eps=cfg(v, "layer_norm_eps", 1e-6),
        prompt_dim=cfg(p, "hidden_size"), mask_in_chans=cfg(p, "mask_input_channels"),
        decoder_depth=cfg(m, "num_hidden_layers"), decoder_heads=cfg(m, "num_attention_heads"),
        decoder_mlp_dim=cfg(m, "mlp_dim"), attention_downsample_rate=cfg(m, "attention_downsample_rate"),
        num_multimask_outputs=cfg(m, "num_multimask_outputs"), iou_head_depth=cfg(m, "iou_head_depth"),
        iou_head_hidden_dim=cfg(m, "iou_head_hidden_dim"),
    )
    if 2 * cfg(v, "num_pos_feats") != kwargs["prompt_dim"] or cfg(v, "output_channels") != kwargs["prompt_dim"]:
        raise ValueError("this SAM config is inconsistent: output_channels and 2 x num_pos_feats must equal the prompt width")
    kwargs.update(overrides)
    return SamConfig(**kwargs)


_HF_RULES = [
    (r"^vision_encoder\.", "image_encoder."),
    (r"patch_embed\.projection\.", "patch_embed.proj."),
    (r"image_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
    (r"image_encoder\.layers\.(\d+)\.", r"image_encoder.blocks.\1."),
    (r"(image_encoder\.blocks\.\d+\.mlp)\.lin(\d)\.", r"\1.fc\2."),
    (r"neck\.layer_norm(\d)\.", r"neck.norm\1."),
    (r"prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"(transformer\.layers\.\d+)\.layer_norm(\d)\.", r"\1.norm\2."),
    (r"(transformer\.layers\.\d+\.mlp)\.lin1\.", r"\1.proj_in."),
    (r"(transformer\.layers\.\d+\.mlp)\.lin2\.", r"\1.proj_out."),
    (r"transformer\.layer_norm_final_attn\.", "transformer.norm_final."),
    (r"\.out_proj\.", ".proj."),
    (r"\.(q|k|v)_proj\.", r".\1."),
]


def convert_hf_state_dict(state: dict[str, torch.Tensor], config: SamConfig) -> dict[str, torch.Tensor]:
    """Rename a transformers SAM state dict (in-memory or on-disk names, the same for SAM) to ours."""
    state = dict(state)
    state.pop("prompt_encoder.shared_embedding.positional_embedding", None)  # tied to the one below
    out = rename_keys(state, _HF_RULES)
    out["prompt_encoder.gaussian_matrix"] = out.pop("shared_image_embedding.positional_embedding")
    out["prompt_encoder.point_embed"] = torch.cat([out.pop(f"prompt_encoder.point_embed.{i}.weight") for i in range(4)])
    for name in ("not_a_point_embed", "no_mask_embed"):
        out[f"prompt_encoder.{name}"] = out.pop(f"prompt_encoder.{name}.weight")[0]
    for name in ("iou_token", "mask_tokens"):
        out[f"mask_decoder.{name}"] = out.pop(f"mask_decoder.{name}.weight")
    return out


# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------
def sam_scenes(**kw) -> Sam:
    """The course's SAM for 32 x 32 scenes: patches of 4, an 8 x 8 grid, windows of 4, two global
    blocks; the masks come out at 32 x 32, the image's own resolution."""
    return Sam(SamConfig(**kw))


def sam_vit_base_config(**kw) -> SamConfig:
    """The paper's smallest model (ViT-B encoder, 1024 px, windows of 14, global blocks 2, 5, 8, 11;
    decoder width 256): transformers' default SamConfig."""
    base = dict(image_size=1024, patch_size=16, dim=768, depth=12, num_heads=12, window_size=14,
                global_blocks=[2, 5, 8, 11], prompt_dim=256, decoder_heads=8, decoder_mlp_dim=2048,
                iou_head_hidden_dim=256)
    return SamConfig(**{**base, **kw})


def sam_vit_base(**kw) -> Sam:
    """SAM with the ViT-B image encoder (random weights; `Sam.from_hf("facebook/sam-vit-base")` online)."""
    return Sam(sam_vit_base_config(**kw))
