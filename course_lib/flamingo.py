"""Flamingo (Alayrac et al., 2022): a frozen image encoder and a frozen language model joined by a
Perceiver Resampler and gated cross-attention layers, reading interleaved image-text sequences.

- `PerceiverResampler` (sec. 2.1, Fig. 5): a fixed number of learned latent queries attend over
  the concatenation of the image's features and the latents themselves, so any number of visual
  tokens becomes `num_latents` tokens.
- `GatedCrossAttentionBlock` (sec. 2.2, Fig. 4, "GATED XATTN-DENSE"): text tokens cross-attend
  to the visual tokens, then a feed-forward layer; each residual branch is multiplied by
  tanh(alpha) with alpha = 0 at initialization, so the frozen LM is exactly unchanged at the start.
- `media_attention_mask` (sec. 2.3): each text token sees only the image that comes immediately
  before it; tokens before any image see none, and their cross-attention output is zero.
- `Flamingo`: inserts a gated block before every `cross_attn_every`-th block of a frozen LM.
(Frozen's visual prefix, which lecture 08 describes beside Flamingo, is `course_lib.connectors.VisualPrefixLM`.)

Parity references: transformers' `IdeficsPerceiverResampler` and `IdeficsGatedCrossAttentionLayer`
(IDEFICS is an open reproduction of Flamingo). IDEFICS uses RMSNorm and a SiLU-gated feed-forward
in its gated layers, and a ReLU feed-forward in its resampler; the configs below select either
those or Flamingo's LayerNorm and GELU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .hf import cfg, load_hf_checkpoint, rename_keys
from .layers import Attention, causal_mask, load_state_dict_checked
from .utils import freeze

NORMS = ("layernorm", "rmsnorm")
ACTS = ("gelu", "relu", "swiglu")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else nn.RMSNorm(dim, eps=eps)


class FeedForward(nn.Module):
    """Bias-free feed-forward: fc2(act(fc1 x)), or with act="swiglu" down(silu(gate x) * up x)
    (the LLaMA-style layer IDEFICS uses inside its gated blocks)."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu"):
        super().__init__()
        _check_choice("act", act, ACTS)
        self.act_name = act
        self.fc1 = nn.Linear(dim, hidden_dim, bias=False)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=False)
        self.gate = nn.Linear(dim, hidden_dim, bias=False) if act == "swiglu" else None
        self.act = {"gelu": nn.GELU(), "relu": nn.ReLU(), "swiglu": nn.SiLU()}[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.fc2(self.act(self.gate(x)) * self.fc1(x))
        return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------------------------
# The media mask (sec. 2.3)
# ----------------------------------------------------------------------------------------------
def media_attention_mask(
    media_locations: torch.Tensor, num_media: int | None = None, only_immediate: bool = True
) -> torch.Tensor:
    """Which image each text token may cross-attend to.

    media_locations: (B, T) boolean, True at the <image> token that marks where image m starts.
    Returns (B, T, num_media) boolean, True where token t may attend to image m (0-based, in
    order of appearance). num_media defaults to the most images any row has.

    A cumulative sum counts the images seen so far: token t belongs to image cumsum[t] (1-based),
    the <image> token itself included. With only_immediate=True (Flamingo's choice) a token sees
    only that image; otherwise it sees every earlier image too. Tokens before the first image
    have cumsum 0 and see nothing: their row is all False.
    """
    if media_locations.ndim != 2:
        raise ValueError(f"media_locations must be (batch, tokens), got shape {tuple(media_locations.shape)}")
    media_locations = media_locations.bool()
    counts = media_locations.sum(-1)
    if num_media is None:
        num_media = int(counts.max()) if counts.numel() else 0
    elif counts.numel() and int(counts.max()) > num_media:
        raise ValueError(
            f"a sequence has {int(counts.max())} <image> tokens but only {num_media} images were given: "
            "pass one image per <image> token"
        )
    text_time = media_locations.long().cumsum(-1)  # (B, T): index (1-based) of the latest image
    media_time = torch.arange(1, num_media + 1, device=media_locations.device)  # (M,)
    if only_immediate:
        return text_time[..., None] == media_time  # (B, T, M)
    return text_time[..., None] >= media_time


def expand_media_mask(mask: torch.Tensor, tokens_per_media: int) -> torch.Tensor:
    """(B, T, M) per-image mask -> (B, T, M * tokens_per_media) per-visual-token mask, for media
    flattened image by image into one (B, M * tokens_per_media, D) sequence."""
    if mask.ndim != 3 or tokens_per_media < 1:
        raise ValueError(f"expected a (batch, tokens, images) mask and tokens_per_media >= 1, got {tuple(mask.shape)} and {tokens_per_media}")
    return mask.repeat_interleave(tokens_per_media, dim=-1)


# ----------------------------------------------------------------------------------------------
# Perceiver Resampler (sec. 2.1, Fig. 5)
# ----------------------------------------------------------------------------------------------
@dataclass
class PerceiverConfig:
    dim: int = 64  # width of the visual features and of the latents
    depth: int = 2
    num_heads: int = 4
    head_dim: int = 16  # the inner width num_heads * head_dim need not equal dim
    num_latents: int = 8
    mlp_ratio: float = 4.0
    act: str = "gelu"  # IDEFICS: "relu"
    eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_choice("act", self.act, ("gelu", "relu"))
        if min(self.dim, self.depth, self.num_heads, self.head_dim, self.num_latents) < 1:
            raise ValueError("dim, depth, num_heads, head_dim and num_latents must all be positive")


class PerceiverAttention(Attention):
    """Latents (queries) attend to concat(media, latents) (keys and values), bias-free: the
    course's cross-attention, whose context is the media with the latents appended."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__(dim, num_heads, context_dim=dim, head_dim=head_dim, qkv_bias=False, proj_bias=False)
        self.norm_media = nn.LayerNorm(dim, eps=eps)
        self.norm_latents = nn.LayerNorm(dim, eps=eps)

    def forward(
        self, media: torch.Tensor, latents: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """media (B, N, D), latents (B, L, D) -> (update (B, L, D), weights (B, h, L, N + L) or None)."""
        media, latents = self.norm_media(media), self.norm_latents(latents)
        # The latents are keys too (Fig. 5): each latent can keep what it already holds.
        context = torch.cat([media, latents], dim=1)  # (B, N + L, D)
        return super().forward(latents, context, return_weights=return_weights)


class PerceiverResampler(nn.Module):
    """Visual features (B, N, D) -> num_latents tokens (B, L, D), for any N.

    latents <- latents + attn(media, latents); latents <- latents + ffw(LN latents); final LN.
    (Flamingo adds learned time embeddings for video frames; images have one frame, so none here.)
    """

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        self.config = c = config
        self.latents = nn.Parameter(torch.randn(c.num_latents, c.dim) * 0.02)
        self.layers = nn.ModuleList()
        for _ in range(c.depth):
            layer = nn.Module()
            layer.attn = PerceiverAttention(c.dim, c.num_heads, c.head_dim, c.eps)
            layer.norm = nn.LayerNorm(c.dim, eps=c.eps)
            layer.ffw = FeedForward(c.dim, int(c.dim * c.mlp_ratio), c.act)
            self.layers.append(layer)
        self.norm = nn.LayerNorm(c.dim, eps=c.eps)

    def no_weight_decay(self) -> set[str]:
        return {"latents"}

    def forward(self, media: torch.Tensor, return_attention: bool = False):
        """media (B, N, D) -> (B, num_latents, D); with return_attention also the per-layer
        weights (B, heads, L, N + L), from the explicit softmax."""
        if media.ndim != 3 or media.shape[-1] != self.config.dim:
            raise ValueError(
                f"the resampler expects visual features (batch, tokens, {self.config.dim}), got "
                f"{tuple(media.shape)}: flatten images to (B*M, tokens, dim) or check PerceiverConfig.dim"
            )
        x = self.latents.expand(media.shape[0], -1, -1)  # (L, D) -> (B, L, D)
        maps = []
        for layer in self.layers:
            a, w = layer.attn(media, x, return_weights=return_attention)
            x = x + a
            x = x + layer.ffw(layer.norm(x))
            maps.append(w)
        x = self.norm(x)
        return (x, maps) if return_attention else x

    @classmethod
    def from_hf(cls, source) -> "PerceiverResampler":
        """Load an `IdeficsPerceiverResampler`, or the resampler of an IDEFICS model (instance or
        save_pretrained folder)."""
        if type(source).__name__ == "IdeficsPerceiverResampler":
            a = source.blocks[0][0]
            config = PerceiverConfig(
                dim=source.embed_dim, depth=len(source.blocks), num_heads=source.n_heads, head_dim=source.head_dim,
                num_latents=source.n_latents, mlp_ratio=source.intermediate_dim / source.embed_dim, act="relu",
                eps=a.context_layer_norm.eps,
            )
            if source.qk_layer_norms:
                raise NotImplementedError("IDEFICS's optional q/k layer norms in the resampler are not implemented")
            state = {k: v.detach() for k, v in source.state_dict().items()}
        else:
            hf_config, full = load_hf_checkpoint(source)
            state = {k.split("perceiver_resampler.", 1)[1]: v for k, v in full.items() if "perceiver_resampler." in k}
            if not state:
                raise ValueError("this checkpoint has no perceiver_resampler: it was built with use_resampler=False")
            p = cfg(hf_config, "perceiver_config")
            if cfg(p, "qk_layer_norms_perceiver", False):
                raise NotImplementedError("IDEFICS's optional q/k layer norms in the resampler are not implemented")
            dim = cfg(cfg(hf_config, "vision_config"), "embed_dim")
            config = PerceiverConfig(
                dim=dim, depth=cfg(p, "resampler_depth"), num_heads=cfg(p, "resampler_n_heads"),
                head_dim=cfg(p, "resampler_head_dim"), num_latents=cfg(p, "resampler_n_latents"),
                mlp_ratio=4.0, act="relu",
            )
        model = cls(config)
        load_state_dict_checked(model, rename_keys(state, _PERCEIVER_RULES), source="IDEFICS perceiver resampler")
        return model


_PERCEIVER_RULES = [
    (r"^blocks\.(\d+)\.0\.", r"layers.\1.attn."),
    (r"^blocks\.(\d+)\.1\.ln\.", r"layers.\1.norm."),
    (r"^blocks\.(\d+)\.1\.", r"layers.\1.ffw."),
    (r"\.context_layer_norm\.", ".norm_media."),
    (r"\.latents_layer_norm\.", ".norm_latents."),
    (r"\.(q|k|v)_proj\.", r".\1."),
    (r"\.output_proj\.", ".proj."),
    (r"\.fc\.", ".fc1."),
    (r"\.c_proj\.", ".fc2."),
    (r"^layer_norm\.", "norm."),
]


# ----------------------------------------------------------------------------------------------
# GATED XATTN-DENSE (sec. 2.2, Fig. 4)
# ----------------------------------------------------------------------------------------------
@dataclass
class GatedXAttnConfig:
    dim: int = 128  # the language model's width
    media_dim: int = 64  # the width of the visual tokens (keys and values)
    num_heads: int = 4
    mlp_ratio: float = 4.0
    norm: str = "layernorm"  # IDEFICS: "rmsnorm"
    act: str = "gelu"  # IDEFICS: "swiglu"
    alpha_shape: str = "scalar"  # "scalar" (one gate per branch) or "vector" (one per channel)
    eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_choice("norm", self.norm, NORMS)
        _check_choice("act", self.act, ACTS)
        _check_choice("alpha_shape", self.alpha_shape, ("scalar", "vector"))
        if self.dim % self.num_heads != 0:
            raise ValueError(f"LM width {self.dim} is not divisible by {self.num_heads} heads: pick a head count that divides it")


def gated_residual(x: torch.Tensor, branch: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x + tanh(alpha) * branch (Flamingo eq. in Fig. 4). alpha = 0 gives back x exactly."""
    if x.shape != branch.shape:
        raise ValueError(f"the residual {tuple(x.shape)} and the branch {tuple(branch.shape)} must have one shape")
    return x + torch.tanh(alpha) * branch


def media_cross_attention_mask(media_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flamingo's per-token media mask as an attention mask, and which tokens have an image at all.

    media_mask (B, T, S) boolean, True where text token t may attend to visual token s.
    Returns (mask (B, 1, T, S), broadcast over the heads; has_media (B, T), False for text before
    the first image). Such a token has no key to attend to, and softmax over nothing is 0/0: its
    row is opened to every key here, and the caller zeroes its output with `has_media`.
    """
    if media_mask.ndim != 3 or media_mask.dtype != torch.bool:
        raise ValueError(f"media_mask must be boolean (batch, text tokens, visual tokens), got {media_mask.dtype} {tuple(media_mask.shape)}")
    has_media = media_mask.any(-1)  # (B, T)
    return (media_mask | ~has_media[..., None])[:, None], has_media


class CrossAttention(Attention):
    """Text queries (B, T, dim) attend to visual keys/values (B, S, media_dim), bias-free, under
    Flamingo's media mask: the course's cross-attention, with the rows of text that precede
    every image set to zero."""

    def __init__(self, dim: int, media_dim: int, num_heads: int):
        super().__init__(dim, num_heads, context_dim=media_dim, qkv_bias=False, proj_bias=False)

    def forward(
        self, x: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor | None = None, return_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, dim), media (B, S, media_dim), media_mask (B, T, S) boolean (True = may attend;
        None = all) -> (out (B, T, dim), weights (B, h, T, S) or None)."""
        if media_mask is None:
            return super().forward(x, media, return_weights=return_weights)
        if media_mask.shape != (x.shape[0], x.shape[1], media.shape[1]):
            raise ValueError(
                f"media_mask must be (batch, text tokens, visual tokens) = {(x.shape[0], x.shape[1], media.shape[1])}, "
                f"got {tuple(media_mask.shape)}: expand the per-image mask with expand_media_mask"
            )
        mask, has_media = media_cross_attention_mask(media_mask)
        out, weights = super().forward(x, media, mask, return_weights=return_weights)
        out = out * has_media[..., None]  # tokens before any image get no cross-attention output
        weights = weights * has_media[:, None, :, None] if weights is not None else None
        return out, weights


class GatedCrossAttentionBlock(nn.Module):
    """y <- y + tanh(alpha_xattn) * xattn(norm y, media); y <- y + tanh(alpha_dense) * ffw(norm y).

    Both gates start at 0: at initialization the block is the identity and the frozen LM behind
    it computes exactly what it computed alone.
    """

    def __init__(self, config: GatedXAttnConfig):
        super().__init__()
        self.config = c = config
        self.norm1 = _norm(c.norm, c.dim, c.eps)
        self.xattn = CrossAttention(c.dim, c.media_dim, c.num_heads)
        self.norm2 = _norm(c.norm, c.dim, c.eps)
        self.ffw = FeedForward(c.dim, int(c.dim * c.mlp_ratio), c.act)
        shape = (1,) if c.alpha_shape == "scalar" else (c.dim,)
        self.alpha_xattn = nn.Parameter(torch.zeros(shape))
        self.alpha_dense = nn.Parameter(torch.zeros(shape))

    def no_weight_decay(self) -> set[str]:
        return {"alpha_xattn", "alpha_dense"}

    def forward(
        self, x: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor | None = None, return_weights: bool = False
    ):
        """x (B, T, dim) text, media (B, S, media_dim) visual tokens, media_mask (B, T, S) boolean
        (None: every token sees every visual token) -> (B, T, dim)."""
        if media.shape[-1] != self.config.media_dim:
            raise ValueError(f"visual tokens have width {media.shape[-1]}, the block expects media_dim={self.config.media_dim}")
        a, weights = self.xattn(self.norm1(x), media, media_mask, return_weights)
        x = gated_residual(x, a, self.alpha_xattn)
        x = gated_residual(x, self.ffw(self.norm2(x)), self.alpha_dense)
        return (x, weights) if return_weights else x

    @classmethod
    def from_hf(cls, source, layer: int = 0) -> "GatedCrossAttentionBlock":
        """Load an `IdeficsGatedCrossAttentionLayer`, or gated layer `layer` of an IDEFICS model
        (instance or save_pretrained folder)."""
        if type(source).__name__ == "IdeficsGatedCrossAttentionLayer":
            attn = source.cross_attn
            if attn.qk_layer_norms:
                raise NotImplementedError("IDEFICS's optional q/k norms in cross-attention are not implemented")
            state = {k: v.detach() for k, v in source.state_dict().items()}
            config = GatedXAttnConfig(
                dim=attn.hidden_size, media_dim=attn.k_proj.in_features, num_heads=attn.num_heads,
                mlp_ratio=source.mlp.gate_proj.out_features / attn.hidden_size, norm="rmsnorm", act="swiglu",
                alpha_shape="scalar" if source.alpha_cross_attn.numel() == 1 else "vector",
                eps=source.input_layernorm.variance_epsilon,
            )
        else:
            hf_config, full = load_hf_checkpoint(source)
            prefix = f"gated_cross_attn_layers.{layer}."
            state = {k.split(prefix, 1)[1]: v for k, v in full.items() if prefix in k}
            if not state:
                raise ValueError(f"this checkpoint has no gated cross-attention layer {layer}")
            if cfg(hf_config, "qk_layer_norms", False):
                raise NotImplementedError("IDEFICS's optional q/k norms in cross-attention are not implemented")
            if cfg(hf_config, "hidden_act", "silu") != "silu":
                raise NotImplementedError(f"activation {cfg(hf_config, 'hidden_act')!r}: only IDEFICS's SiLU is implemented")
            dim = cfg(hf_config, "hidden_size")
            config = GatedXAttnConfig(
                dim=dim, media_dim=state["cross_attn.k_proj.weight"].shape[1],
                num_heads=cfg(hf_config, "num_attention_heads"),
                mlp_ratio=cfg(hf_config, "intermediate_size") / dim, norm="rmsnorm", act="swiglu",
                alpha_shape="scalar" if state["alpha_cross_attn"].numel() == 1 else "vector",
                eps=cfg(hf_config, "rms_norm_eps", 1e-6),
            )
        state = rename_keys(state, _GATED_RULES)
        for name in ("alpha_xattn", "alpha_dense"):  # IDEFICS stores vector gates as (1, 1, dim)
            state[name] = state[name].reshape(-1)
        model = cls(config)
        load_state_dict_checked(model, state, source="IDEFICS gated cross-attention layer")
        return model


_GATED_RULES = [
    (r"^input_layernorm\.", "norm1."),
    (r"^post_attention_layernorm\.", "norm2."),
    (r"^cross_attn\.(q|k|v)_proj\.", r"xattn.\1."),
    (r"^cross_attn\.o_proj\.", "xattn.proj."),
    (r"^mlp\.gate_proj\.", "ffw.gate."),
    (r"^mlp\.up_proj\.", "ffw.fc1."),
    (r"^mlp\.down_proj\.", "ffw.fc2."),
    (r"^alpha_cross_attn$", "alpha_xattn"),
]


# ----------------------------------------------------------------------------------------------
# The whole model: frozen encoder -> resampler -> gated blocks inside a frozen LM
# ----------------------------------------------------------------------------------------------
@dataclass
class FlamingoConfig:
    image_token_id: int  # the <image> marker in the text
    num_latents: int = 8
    resampler_depth: int = 1
    resampler_heads: int = 4
    xattn_heads: int = 4
    cross_attn_every: int = 1  # Flamingo-3B: every layer; 9B: every 4th; 80B: every 7th (Table 10)
    mlp_ratio: float = 2.0
    only_immediate: bool = True
    alpha_shape: str = "scalar"  # one gate per layer branch, or "vector": one per channel

    def __post_init__(self) -> None:
        _check_choice("alpha_shape", self.alpha_shape, ("scalar", "vector"))
        if min(self.num_latents, self.resampler_depth, self.resampler_heads, self.xattn_heads, self.cross_attn_every) < 1:
            raise ValueError("num_latents, resampler_depth, the head counts and cross_attn_every must all be >= 1")


class Flamingo(nn.Module):
    """A frozen vision encoder and a frozen causal LM, joined by trainable Flamingo parts.

    The LM must provide `embed(ids)`, `add_positions(x)`, `blocks` (each called `block(x, mask)`
    with a boolean causal mask), `norm` and `lm_head`, as course_lib.tinylm.TinyLM does. The
    vision encoder must provide `forward_features(images) -> (B, tokens, width)` (a course_lib ViT).
    """

    def __init__(self, lm: nn.Module, vision: nn.Module, config: FlamingoConfig):
        super().__init__()
        self.config = c = config
        self.lm, self.vision = freeze(lm), freeze(vision)
        lm_dim = lm.lm_head.in_features
        media_dim = vision.norm.normalized_shape[0]
        self.resampler = PerceiverResampler(PerceiverConfig(
            dim=media_dim, depth=c.resampler_depth, num_heads=c.resampler_heads,
            head_dim=media_dim // c.resampler_heads, num_latents=c.num_latents,
        ))
        self.xattn_layers = nn.ModuleDict({
            str(i): GatedCrossAttentionBlock(GatedXAttnConfig(
                dim=lm_dim, media_dim=media_dim, num_heads=c.xattn_heads, mlp_ratio=c.mlp_ratio,
                alpha_shape=c.alpha_shape))
            for i in range(len(lm.blocks)) if i % c.cross_attn_every == 0
        })

    def train(self, mode: bool = True) -> "Flamingo":
        super().train(mode)
        self.lm.eval(), self.vision.eval()  # the frozen parts never switch to training behaviour
        return self

    def no_weight_decay(self) -> set[str]:
        skip = {"resampler.latents"}
        for name in self.xattn_layers:
            skip |= {f"xattn_layers.{name}.alpha_xattn", f"xattn_layers.{name}.alpha_dense"}
        return skip

    def gates(self) -> torch.Tensor:
        """How far each cross-attention gate is open: mean |tanh(alpha_xattn)| per gated block, (layers,)."""
        return torch.stack([torch.tanh(b.alpha_xattn).abs().mean() for b in self.xattn_layers.values()]).detach()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, M, C, H, W) -> frozen encoder tokens (B, M, N, Dv). Nothing here trains, so
        a training loop may compute these once and pass them to `forward(features=...)`."""
        if images.ndim != 5:
            raise ValueError(f"images must be (batch, images per sequence, C, H, W), got {tuple(images.shape)}")
        with torch.no_grad():
            feats = self.vision.forward_features(images.flatten(0, 1))  # (B*M, N, Dv)
        return feats.reshape(*images.shape[:2], *feats.shape[1:])

    def resample(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (B, M, N, Dv) -> visual tokens (B, M * num_latents, Dv), image by image."""
        B, M = features.shape[:2]
        latents = self.resampler(features.flatten(0, 1))  # (B*M, L, Dv)
        return latents.reshape(B, M * latents.shape[1], latents.shape[2])

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None, features: torch.Tensor | None = None):
        """Next-token logits (B, T, vocab) for interleaved text with <image> markers.

        Give either images (B, M, C, H, W) or the frozen encoder's features (B, M, N, Dv);
        image m belongs to the m-th <image> token of each row.
        """
        if (images is None) == (features is None):
            raise ValueError("pass exactly one of images (B, M, C, H, W) or features (B, M, N, D)")
        if features is None:
            features = self.image_features(images)
        media = self.resample(features)  # (B, M*L, Dv)
        L = self.config.num_latents
        per_image = media_attention_mask(input_ids == self.config.image_token_id, features.shape[1], self.config.only_immediate)
        media_mask = expand_media_mask(per_image, L)  # (B, T, M*L)
        x = self.lm.add_positions(self.lm.embed(input_ids))
        causal = causal_mask(x.shape[1], device=x.device)
        for i, block in enumerate(self.lm.blocks):
            if str(i) in self.xattn_layers:  # new, trained layer before the frozen one (Fig. 4)
                x = self.xattn_layers[str(i)](x, media, media_mask)
            x = block(x, causal)
        return self.lm.lm_head(self.lm.norm(x))
