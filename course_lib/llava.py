"""LLaVA: a vision encoder, a small connector and a language model (Liu et al., 2023, 2024).

The recipe most open vision-language models follow: a frozen ViT turns the image into patch
features, a connector (LLaVA: one linear layer; LLaVA-1.5: two layers with a GELU) maps each
feature into the language model's embedding space, and the features take the place of the
`<image>` placeholder tokens in the prompt. The language model then reads them like words.
Training has two stages (LLaVA sec. 4.2): (1) only the connector, on captions, the LM frozen;
(2) connector and LM together on visual instructions, the loss only on the assistant's answers.

LLaVA-NeXT ("AnyRes", Liu et al., 2024b) keeps the encoder's native resolution for large or
non-square images: pick the grid of tiles that best fits the image's aspect ratio
(`select_best_resolution`), encode every tile plus a downsampled view of the whole image
(`anyres_views`), put the tiles' features back on one large feature map, crop the padding
(`unpad_features`) and end every row with a learned newline embedding (`pack_anyres_features`).

Pure functions carry the ideas; `Llava` composes them. `Llava.from_hf` loads `transformers`'
LlavaForConditionalGeneration and LlavaNextForConditionalGeneration (CLIP vision tower, Llama LM).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .hf import cfg, fuse_qkv, load_hf_checkpoint, rename_keys
from .layers import load_state_dict_checked
from .llama import Llama, LlamaConfig
from .llama import convert_hf_state_dict as convert_llama_state_dict
from .llama import config_from_hf as llama_config_from_hf
from .vit import ViT, ViTConfig

IGNORE_INDEX = -100  # label of the tokens the loss skips (prompt, image, padding)


@dataclass
class LlavaConfig:
    vision: ViTConfig = field(default_factory=lambda: ViTConfig(num_classes=0))
    text: LlamaConfig = field(default_factory=LlamaConfig)
    vision_tower: str = "vit"  # "vit" (course_lib.vit.ViT) | "clip" (CLIP's tower: pre-norm, QuickGELU)
    feature_layer: int = -2  # LLaVA-1.5 reads the penultimate layer's patch features
    connector: str = "mlp"  # "linear" (LLaVA) | "mlp" (LLaVA-1.5: linear, GELU, linear)
    image_token_id: int = 3
    grid_pinpoints: list[list[int]] | None = None  # AnyRes resolutions (height, width); None: one view

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):  # read back from a checkpoint's JSON metadata
            self.vision = ViTConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = LlamaConfig(**self.text)
        if self.connector not in ("linear", "mlp"):
            raise ValueError(f"connector must be 'linear' or 'mlp', got {self.connector!r}")
        if self.vision_tower not in ("vit", "clip"):
            raise ValueError(f"vision_tower must be 'vit' or 'clip', got {self.vision_tower!r}")
        if not -self.vision.depth - 1 <= self.feature_layer <= self.vision.depth:
            raise ValueError(f"feature_layer {self.feature_layer} does not exist in a {self.vision.depth}-block encoder")
        if self.grid_pinpoints is not None:
            tile = self.tile_size
            for h, w in self.grid_pinpoints:
                if h % tile or w % tile:
                    raise ValueError(f"grid resolution {h}x{w} is not a whole number of {tile}-pixel tiles")

    @property
    def tile_size(self) -> int:
        size = self.vision.image_size
        if not isinstance(size, int):
            raise ValueError(f"AnyRes needs a square encoder input, got image_size {size}")
        return size


# ----------------------------------------------------------------------------------------------
# Vision features, connector, splice, loss mask
# ----------------------------------------------------------------------------------------------
def vision_features(tower: ViT, images: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """Patch features of images (B, C, H, W) after block `layer`: (B, N, D).

    Layer 0 is the embedded input and layer i the output of block i; negative layers count from
    the end (-1: the last block, before the final norm, as transformers' `hidden_states[-1]`).
    The CLS token (and any registers) are dropped, as LLaVA does: only patch tokens go to the LM."""
    depth = len(tower.blocks)
    index = layer if layer >= 0 else depth + 1 + layer
    x = tower.embed(images)  # (B, prefix + N, D)
    for block in tower.blocks[:index]:
        x = block(x)
    return x[:, tower.num_skip_tokens :]


class Connector(nn.Module):
    """Vision width -> LM width: one linear layer (LLaVA) or linear-GELU-linear (LLaVA-1.5)."""

    def __init__(self, vision_dim: int, lm_dim: int, kind: str = "mlp"):
        super().__init__()
        self.kind = kind
        self.linear_1 = nn.Linear(vision_dim, lm_dim)
        self.act = nn.GELU() if kind == "mlp" else nn.Identity()
        self.linear_2 = nn.Linear(lm_dim, lm_dim) if kind == "mlp" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def splice_image_features(
    embeds: torch.Tensor, input_ids: torch.Tensor, image_features: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Put image features where the prompt has `<image>` placeholders.

    embeds: (B, T, D) text embeddings; input_ids: (B, T); image_features: (M, D), the features of
    all images in prompt order. The prompt holds one placeholder per feature (the chat template
    repeats `<image>` as often as the image has tokens), so there must be exactly M placeholders.
    Returns (B, T, D) with placeholder rows replaced, every other row unchanged."""
    is_image = input_ids == image_token_id  # (B, T)
    n = int(is_image.sum())
    if n != image_features.shape[0]:
        raise ValueError(
            f"the prompt has {n} <image> placeholders but there are {image_features.shape[0]} image features: "
            "repeat <image> once per image token (see Llava.num_image_tokens)"
        )
    mask = is_image[..., None].expand_as(embeds)
    return embeds.masked_scatter(mask, image_features.to(embeds.dtype))


def answer_mask(input_ids: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """(B, T) bool: True on the assistant's tokens, i.e. after each `start_id` (the assistant
    marker) up to and including the `end_id` that closes the answer. The marker itself, the
    user's turns, the image and the padding are False: the loss trains answers only (LLaVA sec. 4.2)."""
    starts = (input_ids == start_id).long().cumsum(1)  # markers seen so far
    ends = (input_ids == end_id).long().cumsum(1)
    ends_before = torch.cat([ends.new_zeros(ends.shape[0], 1), ends[:, :-1]], dim=1)  # closed before t
    return (starts > ends_before) & (input_ids != start_id)


def answer_labels(input_ids: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """Targets for the next-token loss: the ids on the answers, IGNORE_INDEX elsewhere."""
    return input_ids.masked_fill(~answer_mask(input_ids, start_id, end_id), IGNORE_INDEX)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) at t against labels[:, t + 1], skipping IGNORE_INDEX."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------------------------
# AnyRes (LLaVA-NeXT)
# ----------------------------------------------------------------------------------------------
def select_best_resolution(image_size: Sequence[int], resolutions: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) among `resolutions` that keeps most of the image's pixels when the image
    is scaled to fit inside it (aspect ratio kept), ties broken by the least padding.

    image_size: (height, width) of the original image."""
    H, W = (int(s) for s in image_size)
    best, best_effective, best_wasted = None, 0, math.inf
    for h, w in resolutions:
        scale = min(w / W, h / H)
        effective = min(int(W * scale) * int(H * scale), W * H)  # original pixels that survive
        wasted = h * w - effective  # padding
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


def resize_to_fit(image_size: Sequence[int], target: Sequence[int]) -> tuple[int, int]:
    """(height, width) of the image scaled to fit in `target` with its aspect ratio kept."""
    (H, W), (h, w) = image_size, target
    if w / W < h / H:
        return min(math.ceil(H * w / W), h), w
    return h, min(math.ceil(W * h / H), w)


def anyres_views(image: torch.Tensor, resolutions: Sequence[Sequence[int]], tile: int) -> torch.Tensor:
    """One image (C, H, W) -> the encoder's views (1 + rows*cols, C, tile, tile): first the whole
    image squashed to one tile, then the tiles of the best grid in row-major order. The image is
    resized to fit the grid (aspect ratio kept) and centred on zero padding."""
    C, H, W = image.shape
    gh, gw = select_best_resolution((H, W), resolutions)
    nh, nw = resize_to_fit((H, W), (gh, gw))
    fitted = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (gh - nh) // 2, (gw - nw) // 2
    canvas = image.new_zeros(C, gh, gw)
    canvas[:, top : top + nh, left : left + nw] = fitted
    tiles = canvas.reshape(C, gh // tile, tile, gw // tile, tile).permute(1, 3, 0, 2, 4)  # (rows, cols, C, t, t)
    base = F.interpolate(image[None], size=(tile, tile), mode="bilinear", align_corners=False, antialias=True)
    return torch.cat([base, tiles.reshape(-1, C, tile, tile)])


def unpad_features(features: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
    """Crop the rows or columns of a feature map (D, h, w) that cover the padding added around an
    image of `image_size` (height, width) when it was fitted to the grid."""
    H, W = (int(s) for s in image_size)
    h, w = features.shape[1:]
    if W / H > w / h:  # wider than the grid: padding above and below
        new_h = int(round(H * (w / W), 7))
        pad = (h - new_h) // 2
        return features[:, pad : h - pad, :]
    new_w = int(round(W * (h / H), 7))
    pad = (w - new_w) // 2
    return features[:, :, pad : w - pad]


def pack_anyres_features(
    features: torch.Tensor, image_size: Sequence[int], resolutions: Sequence[Sequence[int]], tile: int, newline: torch.Tensor
) -> torch.Tensor:
    """Connector outputs of one image's views (1 + rows*cols, n*n, D) -> its token sequence (M, D):
    the base view's n*n tokens, then the tiles' features as one (rows*n) x (cols*n) map, padding
    cropped, read row by row with the `newline` embedding (D,) after every row."""
    base, tiles = features[0], features[1:]
    gh, gw = select_best_resolution(image_size, resolutions)
    rows, cols = gh // tile, gw // tile
    n = math.isqrt(tiles.shape[1])
    D = tiles.shape[-1]
    grid = tiles.reshape(rows, cols, n, n, D).permute(4, 0, 2, 1, 3).reshape(D, rows * n, cols * n)  # (D, H', W')
    grid = unpad_features(grid, image_size)
    grid = torch.cat([grid, newline[:, None, None].expand(D, grid.shape[1], 1).to(grid)], dim=2)  # a newline column
    return torch.cat([base, grid.flatten(1).T])  # (n*n + H' * (W' + 1), D)


def num_anyres_tokens(image_size: Sequence[int], resolutions: Sequence[Sequence[int]], tile: int, side: int) -> int:
    """Image tokens of an image of (height, width) under AnyRes, with `side` x `side` features per
    tile: the base view's side^2, plus the unpadded tile map's rows, each with its newline."""
    gh, gw = select_best_resolution(image_size, resolutions)
    h, w = unpad_features(torch.empty(0, gh // tile * side, gw // tile * side), image_size).shape[1:]
    return side * side + h * (w + 1)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
def build_vision_tower(c: LlavaConfig) -> ViT:
    if c.vision_tower == "clip":
        from .clip import VisionTower

        return VisionTower(c.vision, pre_norm=True, attn_pool=False, patch_bias=False, act="quick_gelu")
    return ViT(c.vision)


class Llava(nn.Module):
    """vision tower -> connector -> splice at <image> -> Llama. With `grid_pinpoints`, AnyRes."""

    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = c = config
        self.vision_tower = build_vision_tower(c)
        self.connector = Connector(c.vision.dim, c.text.dim, c.connector)
        self.lm = Llama(c.text)
        self.image_newline = nn.Parameter(torch.randn(c.text.dim) / c.text.dim**0.5) if c.grid_pinpoints else None

    def no_weight_decay(self) -> set[str]:
        return {"image_newline"} | {f"lm.{n}" for n in self.lm.no_weight_decay()}

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) -> LM-width image tokens (B, N, D_lm)."""
        return self.connector(vision_features(self.vision_tower, images, self.config.feature_layer))

    def image_tokens(self, images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each image's tokens (M_i, D_lm). One view: images (B, C, S, S). AnyRes: a list of
        images (C, H_i, W_i) of any sizes, or a (B, C, H, W) batch of one size."""
        c = self.config
        if c.grid_pinpoints is None:
            return list(self.encode_images(images))
        views = [anyres_views(im, c.grid_pinpoints, c.tile_size) for im in images]
        feats = vision_features(self.vision_tower, torch.cat(views), c.feature_layer).split([len(v) for v in views])
        return self.tokens_from_features(feats, [im.shape[-2:] for im in images])

    def tokens_from_features(self, features: Sequence[torch.Tensor], image_sizes: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
        """Vision features (per image: (views, N, D_vision)) -> each image's LM tokens (M_i, D_lm).
        The vision tower is frozen in both stages, so training can compute its features once."""
        c = self.config
        if c.grid_pinpoints is None:
            return [self.connector(f).flatten(0, -2) for f in features]
        return [
            pack_anyres_features(self.connector(f), size, c.grid_pinpoints, c.tile_size, self.image_newline)
            for f, size in zip(features, image_sizes)
        ]

    def num_image_tokens(self, image_size: Sequence[int]) -> int:
        """How many `<image>` placeholders an image of (height, width) needs in the prompt."""
        c = self.config
        n = c.vision.grid[0] * c.vision.grid[1]
        if c.grid_pinpoints is None:
            return n
        return num_anyres_tokens(image_size, c.grid_pinpoints, c.tile_size, math.isqrt(n))

    def embed(self, input_ids: torch.Tensor, images=None) -> torch.Tensor:
        """The LM's input embeddings (B, T, D) with the image tokens spliced in."""
        embeds = self.lm.embed(input_ids)
        if images is None:
            return embeds
        return splice_image_features(embeds, input_ids, torch.cat(self.image_tokens(images)), self.config.image_token_id)

    def forward(self, input_ids: torch.Tensor, images=None) -> torch.Tensor:
        """Next-token logits (B, T, vocab)."""
        return self.lm(inputs_embeds=self.embed(input_ids, images))

    def loss(self, input_ids: torch.Tensor, images, labels: torch.Tensor) -> torch.Tensor:
        return next_token_loss(self(input_ids, images), labels)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, images=None, max_new_tokens: int = 20, eos_id: int | None = None) -> torch.Tensor:
        """Greedy answer ids (B, <= max_new_tokens) to prompts of equal length (no padding)."""
        return self.lm.generate(inputs_embeds=self.embed(input_ids, images), max_new_tokens=max_new_tokens, eos_id=eos_id)

    @classmethod
    def from_hf(cls, source, **overrides) -> "Llava":
        """Load a `transformers` LlavaForConditionalGeneration or LlavaNextForConditionalGeneration
        with a CLIP vision tower and a Llama LM: an instance, a save_pretrained folder or a hub id."""
        hf_config, state = load_hf_checkpoint(source)
        config = config_from_hf(hf_config, **overrides)
        model = cls(config)
        name = source if isinstance(source, str) else type(source).__name__
        load_state_dict_checked(model, convert_hf_state_dict(state, config), source=str(name))
        return model


# ----------------------------------------------------------------------------------------------
# transformers checkpoints
# ----------------------------------------------------------------------------------------------
def config_from_hf(hf_config, **overrides) -> LlavaConfig:
    kind = cfg(hf_config, "model_type")
    if kind not in ("llava", "llava_next"):
        raise ValueError(f"Llava.from_hf reads llava and llava_next checkpoints, got model_type {kind!r}")
    v = cfg(hf_config, "vision_config")
    if cfg(v, "model_type") != "clip_vision_model":
        raise NotImplementedError(f"vision tower {cfg(v, 'model_type')!r}: course_lib's LLaVA supports CLIP's")
    if cfg(v, "hidden_act", "quick_gelu") != "quick_gelu" or cfg(hf_config, "projector_hidden_act", "gelu") != "gelu":
        raise NotImplementedError("only CLIP's quick_gelu in the tower and a GELU connector are supported")
    if cfg(hf_config, "vision_feature_select_strategy", "default") != "default":
        raise NotImplementedError("only the 'default' feature selection (CLS dropped) is supported")
    layer = cfg(hf_config, "vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise NotImplementedError(f"features from several layers {layer} are not supported: pick one")
    dim = cfg(v, "hidden_size")
    vision = ViTConfig(
        image_size=cfg(v, "image_size"), patch_size=cfg(v, "patch_size"), in_chans=cfg(v, "num_channels", 3),
        num_classes=0, dim=dim, depth=cfg(v, "num_hidden_layers"), num_heads=cfg(v, "num_attention_heads"),
        mlp_ratio=cfg(v, "intermediate_size") / dim, eps=cfg(v, "layer_norm_eps", 1e-5),
    )
    pinpoints = cfg(hf_config, "image_grid_pinpoints") if kind == "llava_next" else None
    kwargs = dict(
        vision=vision, text=llama_config_from_hf(cfg(hf_config, "text_config")), vision_tower="clip",
        feature_layer=layer, connector="mlp", image_token_id=cfg(hf_config, "image_token_id", cfg(hf_config, "image_token_index")),
        grid_pinpoints=[list(p) for p in pinpoints] if pinpoints else None,
    )
    kwargs.update(overrides)
    return LlavaConfig(**kwargs)


_HF_RULES = [  # memory: model.vision_tower.X, model.multi_modal_projector; disk: vision_tower.vision_model.X
    (r"^(model\.)?vision_tower\.(vision_model\.)?", "vision_model."),
    (r"^(model\.)?multi_modal_projector\.", "connector."),
    (r"^(model\.)?image_newline$", "image_newline"),
    (r"^vision_model\.embeddings\.class_embedding$", "vision_tower.cls_token"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "vision_tower.patch_embed.proj."),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "vision_tower.pos_embed"),
    (r"^vision_model\.pre_layrnorm\.", "vision_tower.norm_pre."),
    (r"^vision_model\.encoder\.layers\.", "vision_tower.blocks."),
    (r"^vision_model\.post_layernorm\.", "vision_tower.norm."),
    (r"\.self_attn\.(q|k|v)_proj\.", r".attn.\1."),
    (r"\.self_attn\.out_proj\.", ".attn.proj."),
    (r"\.layer_norm(\d)\.", r".norm\1."),
]


def convert_hf_state_dict(state: dict[str, torch.Tensor], config: LlavaConfig) -> dict[str, torch.Tensor]:
    """transformers LLaVA / LLaVA-NeXT names -> course_lib names."""
    is_lm = lambda k: "language_model" in k or k.startswith(("lm_head", "language_model"))  # noqa: E731
    lm = convert_llama_state_dict({k: v for k, v in state.items() if is_lm(k)}, config.text)
    rest = rename_keys({k: v for k, v in state.items() if not is_lm(k) and not k.endswith("position_ids")}, _HF_RULES)
    rest = fuse_qkv(rest)
    for name in ("vision_tower.pos_embed", "vision_tower.cls_token"):
        rest[name] = rest[name].reshape(1, -1, rest[name].shape[-1])  # (L, D) or (D,) -> (1, L, D)
    return {**rest, **{f"lm.{k}": v for k, v in lm.items()}}

