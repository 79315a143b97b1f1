"""Vision Transformer (Dosovitskiy et al., 2021), with DeiT's distillation token (Touvron et al.,
2021) and register tokens (Darcet et al., 2024).

An image is cut into P x P patches, each patch is flattened and projected to a token, a learned
CLS token is prepended, position embeddings are added, and a stack of pre-norm transformer blocks
mixes the tokens. The classifier reads the final CLS token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .hf import cfg, check_model_type, encoder_fields, fuse_qkv, load_hf_checkpoint, rename_keys, require_gelu, source_name
from .layers import (  # noqa: F401  (PatchEmbed: ViT's patch embedding, shared with Swin)
    Block, PatchEmbed, as_pair, check_image_size, check_positive, load_state_dict_checked, resample_pos_embed,
    sincos_2d_pos_embed,
)


# ----------------------------------------------------------------------------------------------
# The pure functions: image <-> patches
# ----------------------------------------------------------------------------------------------
def patchify(images: torch.Tensor, patch_size: int | tuple[int, int]) -> torch.Tensor:
    """Cut images into non-overlapping patches, flattened row-major (ViT eq. 1).

    images: (B, C, H, W) -> patches: (B, N, p_h * p_w * C) with N = (H/p_h) * (W/p_w).
    Patches are ordered row by row over the grid; inside a patch the values are ordered
    (row, column, channel), the layout MAE uses for its pixel targets.
    """
    if images.ndim != 4:
        raise ValueError(f"patchify expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    ph, pw = as_pair(patch_size)
    B, C, H, W = images.shape
    check_image_size(H, W, (ph, pw))
    x = images.reshape(B, C, H // ph, ph, W // pw, pw)  # (B, C, gh, ph, gw, pw)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, ph, pw, C)
    return x.reshape(B, (H // ph) * (W // pw), ph * pw * C)


def unpatchify(
    patches: torch.Tensor, patch_size: int | tuple[int, int], image_size: int | tuple[int, int], channels: int = 3
) -> torch.Tensor:
    """The exact inverse of `patchify`: (B, N, p_h * p_w * C) -> (B, C, H, W)."""
    ph, pw = as_pair(patch_size)
    H, W = as_pair(image_size)
    check_image_size(H, W, (ph, pw))
    B, N, D = patches.shape
    gh, gw = H // ph, W // pw
    if N != gh * gw or D != ph * pw * channels:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit a {H}x{W} image with {ph}x{pw} "
            f"patches and {channels} channels: expected (B, {gh * gw}, {ph * pw * channels})"
        )
    x = patches.reshape(B, gh, gw, ph, pw, channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, ph, gw, pw)
    return x.reshape(B, channels, H, W)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
@dataclass
class ViTConfig:
    image_size: int | tuple[int, int] = 32
    patch_size: int | tuple[int, int] = 4
    in_chans: int = 3
    num_classes: int = 10  # 0: no classification head (a backbone)
    dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pos_embed: str = "learned"  # "learned" | "sincos" | "none"
    class_token: bool = True
    num_registers: int = 0  # Darcet et al., 2024: extra tokens with no position, dropped at the output
    distilled: bool = False  # DeiT: a distillation token and a second head
    pool: str = "cls"  # "cls" | "mean" (mean over patch tokens)
    layer_scale: float | None = None  # CaiT/DINOv2 layer scale init, None = off
    eps: float = 1e-6
    drop_path: float = 0.0
    dropout: float = 0.0
    pos_antialias: bool = False  # DINOv2 resamples position tables with antialiasing
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("in_chans", "dim", "depth", "num_heads"):
            check_positive(name, getattr(self, name))
        for name in ("num_classes", "num_registers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.dim % self.num_heads != 0:
            raise ValueError(
                f"width {self.dim} is not divisible by {self.num_heads} heads: each head takes dim / num_heads "
                f"channels; pick num_heads from {[h for h in range(1, 17) if self.dim % h == 0]} or change dim"
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive (the MLP's hidden width is mlp_ratio * dim), got {self.mlp_ratio}")
        for name in ("drop_path", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} is a probability in [0, 1), got {getattr(self, name)}")
        if self.pos_embed not in ("learned", "sincos", "none"):
            raise ValueError(f"pos_embed must be 'learned', 'sincos' or 'none', got {self.pos_embed!r}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' needs class_token=True; use pool='mean' without a CLS token")
        H, W = as_pair(self.image_size)
        check_image_size(H, W, as_pair(self.patch_size))

    @property
    def grid(self) -> tuple[int, int]:
        (H, W), (ph, pw) = as_pair(self.image_size), as_pair(self.patch_size)
        return H // ph, W // pw

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches that have a position embedding (CLS, distillation)."""
        return int(self.class_token) + int(self.distilled)


class ViT(nn.Module):
    """ViT / DeiT / ViT with registers. Token order: [CLS], [DIST], registers, patches."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.distilled else None
        self.reg_tokens = nn.Parameter(torch.zeros(1, c.num_registers, c.dim)) if c.num_registers else None
        n_pos = c.num_prefix_tokens + c.grid[0] * c.grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, c.dim)) if c.pos_embed == "learned" else None
        self.pos_drop = nn.Dropout(c.dropout)
        dpr = torch.linspace(0, c.drop_path, c.depth, device="cpu").tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            Block(c.dim, c.num_heads, int(c.dim * c.mlp_ratio), c.qkv_bias, c.eps, c.layer_scale, dpr[i], c.dropout)
            for i in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.dim, eps=c.eps)
        self.head = nn.Linear(c.dim, c.num_classes) if c.num_classes else nn.Identity()
        self.head_dist = nn.Linear(c.dim, c.num_classes) if (c.distilled and c.num_classes) else None
        self.init_weights()

    def init_weights(self) -> None:
        for t in (self.cls_token, self.dist_token, self.reg_tokens, self.pos_embed):
            if t is not None:
                nn.init.trunc_normal_(t, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "dist_token", "reg_tokens", "pos_embed"}

    @property
    def num_skip_tokens(self) -> int:
        """Tokens before the patch tokens in the output: prefix tokens and registers."""
        return self.config.num_prefix_tokens + self.config.num_registers

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """(1, prefix + gh*gw, D) for this input's grid, resampled if it differs from the config's."""
        c = self.config
        if c.pos_embed == "none":
            return None
        if c.pos_embed == "sincos":
            table = sincos_2d_pos_embed(grid, c.dim).to(self.patch_embed.proj.weight)
            prefix = table.new_zeros(c.num_prefix_tokens, c.dim)  # prefix tokens get no position
            return torch.cat([prefix, table])[None]
        return resample_pos_embed(self.pos_embed, grid, c.grid, c.num_prefix_tokens, c.pos_antialias)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, prefix + registers + N, D) ready for the blocks."""
        x = self.patch_embed(images)  # (B, N, D)
        B = x.shape[0]
        grid = (images.shape[2] // self.patch_embed.patch_size[0], images.shape[3] // self.patch_embed.patch_size[1])
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        x = torch.cat(prefix + [x], dim=1)
        pos = self.position_embedding(grid)
        if pos is not None:
            x = x + pos
        if self.reg_tokens is not None:
            # Registers join after the position embeddings were added: they have no position.
            n = self.config.num_prefix_tokens
            x = torch.cat([x[:, :n], self.reg_tokens.expand(B, -1, -1), x[:, n:]], dim=1)
        return self.pos_drop(x)

    def forward_features(self, images: torch.Tensor, return_attention: bool = False):
        """All output tokens after the final norm: (B, prefix + registers + N, D).

        With return_attention=True also returns the list of per-block attention weights
        (B, heads, T, T), computed by the explicit softmax path.
        """
        x = self.embed(images)
        maps = []
        for block in self.blocks:
            if return_attention:
                x, w = block(x, return_weights=True)
                maps.append(w)
            else:
                x = block(x)
        x = self.norm(x)
        return (x, maps) if return_attention else x

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.pool == "mean":
            return tokens[:, self.num_skip_tokens :].mean(dim=1)
        return tokens[:, 0]

    def forward_heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DeiT: (class-token logits, distillation-token logits)."""
        if not self.config.distilled:
            raise ValueError("forward_heads needs a distilled model (ViTConfig(distilled=True))")
        tokens = self.forward_features(images)
        return self.head(tokens[:, 0]), self.head_dist(tokens[:, 1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes); a backbone (num_classes=0) returns the pooled feature.

        A distilled (DeiT) model averages its two heads, as DeiT does at test time.
        """
        if self.config.distilled and self.head_dist is not None:
            cls_logits, dist_logits = self.forward_heads(images)
            return (cls_logits + dist_logits) / 2
        return self.head(self.pool(self.forward_features(images)))

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source, **overrides) -> "ViT":
        """Load a `transformers` ViT, DeiT, DINOv2 or DINOv2-with-registers model.

        source: a model instance (offline), a save_pretrained folder, or a hub id (online).
        Classification checkpoints (ViTForImageClassification, DeiTForImageClassificationWithTeacher)
        keep their heads; backbones get num_classes=0.
        """
        hf_config, state = load_hf_checkpoint(source)
        config = config_from_hf(hf_config, state, **overrides)
        model = cls(config)
        load_state_dict_checked(model, convert_hf_state_dict(state, config), source=source_name(source))
        return model


def config_from_hf(hf_config, state: dict[str, torch.Tensor], **overrides) -> ViTConfig:
    """Translate a transformers ViT/DeiT/DINOv2 (or ViTMAE encoder) config into a ViTConfig."""
    model_type = check_model_type(hf_config, ("vit", "deit", "dinov2", "dinov2_with_registers", "vit_mae", "vit_msn"), "ViT.from_hf")
    require_gelu(hf_config, "ViT")
    fields = encoder_fields(hf_config)
    if model_type.startswith("dinov2"):
        mlp_ratio = cfg(hf_config, "mlp_ratio", 4)
        if cfg(hf_config, "use_swiglu_ffn", False):
            raise NotImplementedError("DINOv2 giant's SwiGLU feed-forward is not implemented in course_lib")
    else:
        mlp_ratio = cfg(hf_config, "intermediate_size") / fields["dim"]
    head = next((k for k in state if k.endswith("classifier.weight") or k.endswith("cls_classifier.weight")), None)
    kwargs = dict(
        **fields,
        num_classes=state[head].shape[0] if head else 0,
        mlp_ratio=mlp_ratio,
        num_registers=cfg(hf_config, "num_register_tokens", 0) if model_type == "dinov2_with_registers" else 0,
        distilled=model_type == "deit",
        layer_scale=cfg(hf_config, "layerscale_value", 1.0) if model_type.startswith("dinov2") else None,
        pos_antialias=model_type == "dinov2_with_registers",
    )
    return ViTConfig(**{**kwargs, **overrides})


# Both spellings of transformers 5.x: in memory (first group) and on disk (second group).
_HF_RULES = [
    (r"^(vit|deit|dinov2|dinov2_with_registers|model)\.", ""),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.distillation_token$", "dist_token"),
    (r"^embeddings\.register_tokens$", "reg_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^(encoder\.layer|layers)\.(\d+)\.", r"blocks.\2."),
    (r"\.attention\.(q_proj|attention\.query)\.", ".attn.q."),
    (r"\.attention\.(k_proj|attention\.key)\.", ".attn.k."),
    (r"\.attention\.(v_proj|attention\.value)\.", ".attn.v."),
    (r"\.attention\.(o_proj|output\.dense)\.", ".attn.proj."),
    (r"\.(layernorm_before|norm1)\.", ".norm1."),
    (r"\.(layernorm_after|norm2)\.", ".norm2."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"(blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
    (r"\.layer_scale(\d)\.lambda1$", r".ls\1.gamma"),
    (r"^layernorm\.", "norm."),
    (r"^(classifier|cls_classifier)\.", "head."),
    (r"^distillation_classifier\.", "head_dist."),
]


def convert_hf_state_dict(state: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """transformers weight names (in-memory or on-disk spelling) -> course_lib ViT names."""
    out = fuse_qkv(rename_keys(state, _HF_RULES))
    # Parts course_lib does not use: the ViTModel pooler and DINOv2's mask token (for iBOT).
    for k in [k for k in out if k.startswith("pooler.") or k == "embeddings.mask_token"]:
        out.pop(k)
    return out


# ----------------------------------------------------------------------------------------------
# Sizes: the papers' models (ViT Table 1, DeiT Table 1) at 224 px with 16 x 16 patches and the
# 1,000 ImageNet classes, as everywhere else in the field; and the course's model for its scenes
# ----------------------------------------------------------------------------------------------
_IMAGENET = dict(image_size=224, patch_size=16, num_classes=1000, eps=1e-6)


def _vit(dim: int, depth: int, num_heads: int, **kw) -> ViT:
    return ViT(ViTConfig(**{**_IMAGENET, "dim": dim, "depth": depth, "num_heads": num_heads, **kw}))


def vit_tiny(**kw) -> ViT:
    """ViT-Ti/16 (DeiT-Ti): width 192, 12 blocks, 3 heads; 5.7M parameters."""
    return _vit(192, 12, 3, **kw)


def vit_small(**kw) -> ViT:
    """ViT-S/16 (DeiT-S): width 384, 12 blocks, 6 heads; 22.1M parameters."""
    return _vit(384, 12, 6, **kw)


def vit_base(**kw) -> ViT:
    """ViT-B/16: width 768, 12 blocks, 12 heads; 86.6M parameters (ViT Table 1: 86M)."""
    return _vit(768, 12, 12, **kw)


def vit_large(**kw) -> ViT:
    """ViT-L/16: width 1024, 24 blocks, 16 heads; 304M parameters (ViT Table 1: 307M)."""
    return _vit(1024, 24, 16, **kw)


def vit_huge(**kw) -> ViT:
    """ViT-H/14: width 1280, 32 blocks, 16 heads, 14 x 14 patches; 632M parameters."""
    return _vit(1280, 32, 16, **{"patch_size": 14, **kw})


def vit_scenes(**kw) -> ViT:
    """The course's ViT for its 32x32 scenes (5 shape classes), the model of the shipped checkpoint
    vit_scenes.safetensors (scripts/train_vit_scenes.py): 4 x 4 patches, width 64, 4 blocks."""
    base = dict(image_size=32, patch_size=4, num_classes=5, dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
    return ViT(ViTConfig(**{**base, **kw}))


def deit_hard_distillation_loss(
    cls_logits: torch.Tensor, dist_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """DeiT's hard distillation (Touvron et al., 2021, eq. 3): the class head learns the true
    label, the distillation head learns the teacher's argmax, each with weight 1/2."""
    teacher_labels = teacher_logits.argmax(dim=-1)
    return 0.5 * F.cross_entropy(cls_logits, labels) + 0.5 * F.cross_entropy(dist_logits, teacher_labels)
