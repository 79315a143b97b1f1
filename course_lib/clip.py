"""CLIP (Radford et al., 2021) and SigLIP (Zhai et al., 2023): learning images from paired text.

Two towers, a Vision Transformer for images and a transformer for text, each end in one vector
per input. Both vectors are projected to a shared width and L2-normalised, so that the dot
product of an image and a caption is their cosine similarity. Training makes the matching pairs
of a batch similar and the other pairs dissimilar:
- CLIP: a softmax over the batch in both directions (symmetric InfoNCE, CLIP fig. 3), inherited
  from ConVIRT (Zhang et al., 2020), which weighted the two directions;
- SigLIP: an independent sigmoid per image-text pair, with a learned bias.
A trained model classifies images it was never trained to classify ("zero-shot"): embed one text
prompt per class, and pick the class whose prompt is closest to the image (CLIP sec. 3.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .hf import cfg, fuse_qkv, load_hf_checkpoint, rename_keys
from .layers import Attention, Block, Mlp, causal_mask, load_state_dict_checked
from .vit import ViT, ViTConfig

CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)  # temperature 0.07 at init (CLIP sec. 2.5)
CLIP_MAX_LOGIT_SCALE = math.log(100)  # "clipped to prevent scaling the logits by more than 100"
SIGLIP_LOGIT_SCALE_INIT = math.log(10)  # SigLIP sec. 3.2: t' = log 10, b = -10
SIGLIP_LOGIT_BIAS_INIT = -10.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1], (B, 3, H, W) -> normalised with CLIP's per-channel mean and std."""
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


# ----------------------------------------------------------------------------------------------
# The pure functions: similarities, losses, retrieval
# ----------------------------------------------------------------------------------------------
def _check_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor, paired: bool) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(
            f"expected embeddings of shape (batch, width), got images {tuple(image_emb.shape)} "
            f"and texts {tuple(text_emb.shape)}"
        )
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"image embeddings have width {image_emb.shape[1]} but text embeddings {text_emb.shape[1]}: "
            "project both towers to the same embed_dim before comparing them"
        )
    if paired and image_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(
            f"a contrastive loss needs one caption per image, got {image_emb.shape[0]} images and "
            f"{text_emb.shape[0]} texts: pass the pairs of one batch (image i goes with text i)"
        )


def contrastive_logits(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Scaled cosine similarities exp(s) * normalize(I) normalize(T)^T (+ b) (CLIP fig. 3).

    image_emb (Bi, D), text_emb (Bt, D) -> logits (Bi, Bt); row i compares image i with every
    text. `logit_scale` s is the *log* of the scale (the scale is exp(s) = 1 / temperature);
    `logit_bias` b is SigLIP's learned bias (None for CLIP).
    """
    _check_embeddings(image_emb, text_emb, paired=False)
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = (image_emb @ text_emb.T) * torch.as_tensor(logit_scale).exp()
    return logits if logit_bias is None else logits + logit_bias


def clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float, image_weight: float = 0.5
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss (Radford et al., 2021, fig. 3).

    image_emb, text_emb: (N, D), pair i = (image i, text i); they are L2-normalised here.
    Each image must pick its own caption among the N texts (cross-entropy over a row of the
    logits) and each text its own image (over a column); the labels are arange(N).
    `image_weight` lambda weights the two directions as ConVIRT does (Zhang et al., 2020, eq. 4):
    lambda * image->text + (1 - lambda) * text->image; CLIP's 0.5 is their mean.
    """
    _check_embeddings(image_emb, text_emb, paired=True)
    logits = contrastive_logits(image_emb, text_emb, logit_scale)  # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    image_to_text = F.cross_entropy(logits, labels)  # softmax over the texts of each image
    text_to_image = F.cross_entropy(logits.T, labels)  # softmax over the images of each text
    return image_weight * image_to_text + (1 - image_weight) * text_to_image


def convirt_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, tau: float = 0.1, lam: float = 0.75) -> torch.Tensor:
    """ConVIRT's loss (Zhang et al., 2020, eq. 2-4): a fixed temperature `tau` and the
    image->text direction weighted by `lam` (the paper's values: tau = 0.1, lambda = 0.75)."""
    return clip_loss(image_emb, text_emb, math.log(1 / tau), image_weight=lam)


def siglip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al., 2023, eq. 1 and algorithm 1).

    Every one of the N x N image-text pairs is its own binary problem: label +1 on the diagonal
    (a true pair), -1 elsewhere, loss -log sigmoid(label * (exp(s) cos + b)). No softmax couples
    the pairs, so no normalisation over the batch is needed. Summed over the matrix, divided by N.
    """
    _check_embeddings(image_emb, text_emb, paired=True)
    logits = contrastive_logits(image_emb, text_emb, logit_scale, logit_bias)  # (N, N)
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1  # +1 diagonal, -1 off
    return -F.logsigmoid(labels * logits).sum() / n


def recall_at_k(similarity: torch.Tensor, k: int) -> float:
    """Retrieval recall@k: the fraction of queries whose match is among the k best candidates.

    similarity: (N, N) with row i = query i, column i = its match (for image->text retrieval pass
    image-text similarities; for text->image pass their transpose). A query's rank is the number
    of other candidates scored at least as high as its match (ties count against the query, so
    a collapsed model that scores everything alike gets no credit); it is found when rank < k.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"recall_at_k expects a square (N, N) similarity matrix, got {tuple(similarity.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    match = similarity.diagonal()[:, None]  # (N, 1)
    rank = (similarity >= match).sum(dim=1) - 1  # (N,), minus the match itself
    return (rank < k).float().mean().item()


# ----------------------------------------------------------------------------------------------
# The towers
# ----------------------------------------------------------------------------------------------
class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the sigmoid approximation of GELU that OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    """"gelu" (exact), "gelu_tanh" (SigLIP) or "quick_gelu" (OpenAI CLIP)."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}: use 'gelu', 'gelu_tanh' or 'quick_gelu'")


def pool_text(tokens: torch.Tensor, input_ids: torch.Tensor, mode: str, eos_token_id: int) -> torch.Tensor:
    """The one feature that stands for a whole text: tokens (B, L, D) -> (B, D).

    "eos": the first end-of-text token. Under the causal mask it is the first token that has
    seen the whole text (CLIP sec. 2.4). "argmax": the largest id, as OpenAI's code does (its
    end-of-text token has the largest id). "last": the last position (SigLIP, whose texts are
    padded to a fixed length and read with bidirectional attention).
    """
    B = tokens.shape[0]
    rows = torch.arange(B, device=tokens.device)
    if mode == "last":
        return tokens[:, -1]
    if mode == "argmax":
        return tokens[rows, input_ids.argmax(dim=-1)]
    if mode == "eos":
        is_eos = input_ids == eos_token_id  # (B, L)
        if not bool(is_eos.any(dim=1).all()):
            missing = (~is_eos.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(
                f"texts {missing[:8]} have no end-of-text token (id {eos_token_id}): encode them with "
                "the tokenizer, which appends it, or check that eos_token_id matches the tokenizer"
            )
        return tokens[rows, is_eos.int().argmax(dim=1)]  # argmax returns the first maximum
    raise ValueError(f"unknown text pooling {mode!r}: use 'eos', 'argmax' or 'last'")


class AttentionPool(nn.Module):
    """Multihead attention pooling (MAP), SigLIP's image pooling: one learned query (the probe)
    cross-attends over all patch tokens, then a residual MLP refines the result. (B, N, D) -> (B, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float, act: str = "gelu"):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = Attention(dim, num_heads, context_dim=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim)
        self.mlp.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(self.probe.expand(x.shape[0], -1, -1), context=x)  # (B, 1, D)
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


class VisionTower(ViT):
    """The image encoder: course_lib's ViT, with CLIP's extra LayerNorm on the embedded tokens
    (CLIP sec. 2.4) or SigLIP's attention pooling instead of the CLS token. Returns (B, dim)."""

    def __init__(self, config: ViTConfig, pre_norm: bool, attn_pool: bool, patch_bias: bool, act: str):
        super().__init__(config)
        self.norm_pre = nn.LayerNorm(config.dim, eps=config.eps) if pre_norm else nn.Identity()
        if not patch_bias:
            self.patch_embed.proj.bias = None
        mlp_dim = int(config.dim * config.mlp_ratio)
        self.attn_pool = AttentionPool(config.dim, config.num_heads, mlp_dim, config.eps, act) if attn_pool else None
        for block in self.blocks:
            block.mlp.act = make_activation(act)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(super().embed(images))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.attn_pool(tokens) if self.attn_pool is not None else super().pool(tokens)


@dataclass
class CLIPConfig:
    embed_dim: int = 64  # the shared width both towers project to
    # image tower (a ViT)
    image_size: int = 32
    patch_size: int = 8
    in_chans: int = 3
    vision_dim: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    vision_mlp_ratio: float = 4.0
    vision_pool: str = "cls"  # "cls" (CLIP) | "map" (SigLIP's attention pooling) | "mean"
    pre_norm: bool = True  # CLIP's LayerNorm after the patch and position embeddings
    patch_bias: bool = False
    image_proj: bool = True  # SigLIP uses the pooled feature as it is (embed_dim == vision_dim)
    # text tower (a transformer over tokens)
    vocab_size: int = 64
    context_length: int = 40
    text_dim: int = 64
    text_depth: int = 2
    text_heads: int = 4
    text_mlp_ratio: float = 4.0
    causal: bool = True  # CLIP: causal mask (as GPT-2); SigLIP: bidirectional
    text_pool: str = "eos"  # "eos" | "argmax" | "last", see pool_text
    eos_token_id: int = 3  # <eot> of the scenes caption tokenizer (course_lib.recipes.text)
    text_proj_bias: bool = False
    # both towers
    act: str = "gelu"
    eps: float = 1e-5
    # the objective and its temperature
    loss: str = "clip"  # "clip" (softmax) | "siglip" (sigmoid)
    logit_scale_init: float = CLIP_LOGIT_SCALE_INIT
    logit_bias_init: float | None = None  # SigLIP: -10
    max_logit_scale: float | None = CLIP_MAX_LOGIT_SCALE

    def __post_init__(self) -> None:
        if self.loss not in ("clip", "siglip"):
            raise ValueError(f"loss must be 'clip' or 'siglip', got {self.loss!r}")
        if self.loss == "siglip" and self.logit_bias_init is None:
            raise ValueError("the SigLIP loss needs a learned bias: set logit_bias_init (the paper uses -10)")
        if self.vision_pool not in ("cls", "map", "mean"):
            raise ValueError(f"vision_pool must be 'cls', 'map' or 'mean', got {self.vision_pool!r}")
        if not self.image_proj and self.vision_dim != self.embed_dim:
            raise ValueError(
                f"without an image projection the image width {self.vision_dim} is the embedding width, "
                f"but embed_dim is {self.embed_dim}: set image_proj=True or embed_dim={self.vision_dim}"
            )
        if min(self.embed_dim, self.vocab_size, self.context_length, self.text_depth, self.text_heads) < 1:
            raise ValueError("embed_dim, vocab_size, context_length, text_depth and text_heads must all be positive")
        if self.text_dim % self.text_heads != 0:
            raise ValueError(f"text width {self.text_dim} is not divisible by {self.text_heads} heads: pick a head count that divides it")
        make_activation(self.act)
        self.vision_config()  # validates image and patch sizes and head counts

    def vision_config(self) -> ViTConfig:
        return ViTConfig(
            image_size=self.image_size, patch_size=self.patch_size, in_chans=self.in_chans, num_classes=0,
            dim=self.vision_dim, depth=self.vision_depth, num_heads=self.vision_heads,
            mlp_ratio=self.vision_mlp_ratio, class_token=self.vision_pool == "cls",
            pool="cls" if self.vision_pool == "cls" else "mean", eps=self.eps,
        )


def clip_init_(blocks: nn.ModuleList) -> None:
    """OpenAI CLIP's initialisation of a transformer (its text encoder's `initialize_parameters`):
    std width^-1/2 for attention inputs, (2 width)^-1/2 for the first MLP layer, and the layers
    that write into the residual stream scaled down by (2 depth)^-1/2. With ViT's std 0.02, a
    64-wide tower starts with all images mapped to nearly the same embedding."""
    width, depth = blocks[0].norm1.normalized_shape[0], len(blocks)
    proj_std = width**-0.5 * (2 * depth) ** -0.5
    for block in blocks:
        nn.init.normal_(block.attn.qkv.weight, std=width**-0.5)
        nn.init.normal_(block.attn.proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.fc1.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.mlp.fc2.weight, std=proj_std)


class TextTower(nn.Module):
    """The text encoder: token + position embeddings, pre-norm blocks (causal for CLIP), a final
    LayerNorm, and one pooled feature per text. input_ids (B, L) -> (B, text_dim)."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.config = c
        self.token_embed = nn.Embedding(c.vocab_size, c.text_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.context_length, c.text_dim))
        mlp_dim = int(c.text_dim * c.text_mlp_ratio)
        self.blocks = nn.ModuleList(Block(c.text_dim, c.text_heads, mlp_dim, eps=c.eps) for _ in range(c.text_depth))
        for block in self.blocks:
            block.mlp.act = make_activation(c.act)
        self.norm = nn.LayerNorm(c.text_dim, eps=c.eps)
        nn.init.normal_(self.token_embed.weight, std=0.02)  # CLIP's init
        nn.init.normal_(self.pos_embed, std=0.01)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def attention_mask(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Boolean (B or 1, 1, L, L), True = may attend: the causal mask and/or padded keys hidden."""
        L = input_ids.shape[1]
        mask = causal_mask(L, input_ids.device)[None, None] if self.config.causal else None
        if padding_mask is not None:
            keys = padding_mask.bool()[:, None, None, :]  # (B, 1, 1, L): padded keys are hidden
            mask = keys if mask is None else mask & keys
        return mask

    def forward_features(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm: (B, L, text_dim)."""
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"expected token ids of shape (B, L), got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > c.context_length:
            raise ValueError(
                f"texts of {input_ids.shape[1]} tokens are longer than the context length {c.context_length}: "
                f"encode them with context_length={c.context_length} (the tokenizer truncates)"
            )
        if int(input_ids.max()) >= c.vocab_size or int(input_ids.min()) < 0:
            raise ValueError(
                f"token id {int(input_ids.max())} is outside the vocabulary of {c.vocab_size}: build the "
                "model with vocab_size=tokenizer.vocab_size"
            )
        x = self.token_embed(input_ids) + self.pos_embed[:, : input_ids.shape[1]]  # (B, L, D)
        mask = self.attention_mask(input_ids, padding_mask)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.forward_features(input_ids, padding_mask)
        return pool_text(tokens, input_ids, self.config.text_pool, self.config.eos_token_id)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class CLIP(nn.Module):
    """CLIP or SigLIP: two towers, two projections, a learned logit scale (and SigLIP's bias)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = c = config
        self.visual = VisionTower(
            c.vision_config(), pre_norm=c.pre_norm, attn_pool=c.vision_pool == "map", patch_bias=c.patch_bias, act=c.act
        )
        self.text = TextTower(c)
        self.image_proj = nn.Linear(c.vision_dim, c.embed_dim, bias=False) if c.image_proj else nn.Identity()
        self.text_proj = nn.Linear(c.text_dim, c.embed_dim, bias=c.text_proj_bias)
        for proj in (self.image_proj, self.text_proj):
            if isinstance(proj, nn.Linear):
                nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(c.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(c.logit_bias_init))) if c.logit_bias_init is not None else None
        for tower in (self.visual, self.text):
            clip_init_(tower.blocks)


    def no_weight_decay(self) -> set[str]:
        skip = {f"visual.{n}" for n in self.visual.no_weight_decay()}
        return skip | {"visual.attn_pool.probe", "text.pos_embed", "logit_scale", "logit_bias"}

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Images (B, C, H, W) -> embeddings (B, embed_dim), L2-normalised if asked."""
        emb = self.image_proj(self.visual(images))
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(
        self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """Token ids (B, L) -> embeddings (B, embed_dim), L2-normalised if asked. `padding_mask`
        (B, L), 1 = real token, hides padded keys (CLIP's causal mask already hides them from
        the end-of-text token)."""
        emb = self.text_proj(self.text(input_ids, padding_mask))
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """logits_per_image (B_images, B_texts): exp(s) * cosine similarity (+ b for SigLIP)."""
        return contrastive_logits(
            self.encode_image(images), self.encode_text(input_ids, padding_mask), self.logit_scale, self.logit_bias
        )

    def loss(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch of pairs (image i with text i): CLIP's or SigLIP's."""
        image_emb, text_emb = self.encode_image(images), self.encode_text(input_ids)
        if self.config.loss == "siglip":
            return siglip_loss(image_emb, text_emb, self.logit_scale, self.logit_bias)
        return clip_loss(image_emb, text_emb, self.logit_scale)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep the scale exp(s) at most 100 (CLIP sec. 2.5); call after each optimizer step."""
        if self.config.max_logit_scale is not None:
            self.logit_scale.clamp_(max=self.config.max_logit_scale)

    @property
    def temperature(self) -> float:
        return math.exp(-self.logit_scale.item())

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source, **overrides) -> "CLIP":
        """Load a `transformers` CLIPModel or SiglipModel: a model instance (offline), a
        save_pretrained folder, or a hub id (online, e.g. "openai/clip-vit-base-patch32")."""
        hf_config, state = load_hf_checkpoint(source)
        config = config_from_hf(hf_config, **overrides)
        model = cls(config)
        name = source if isinstance(source, str) else type(source).__name__
        load_state_dict_checked(model, convert_hf_state_dict(state), source=str(name))
        return model


# ----------------------------------------------------------------------------------------------
# transformers checkpoints
# ----------------------------------------------------------------------------------------------
_ACTIVATIONS_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


def config_from_hf(hf_config, **overrides) -> CLIPConfig:
    """Translate a transformers CLIPConfig or SiglipConfig (or their config.json) to a CLIPConfig."""
    model_type = cfg(hf_config, "model_type")
    if model_type not in ("clip", "siglip"):
        raise ValueError(f"from_hf reads CLIPModel and SiglipModel checkpoints, got model_type {model_type!r}")
    siglip = model_type == "siglip"
    v, t = cfg(hf_config, "vision_config"), cfg(hf_config, "text_config")
    default_act = "gelu_pytorch_tanh" if siglip else "quick_gelu"
    acts = {cfg(v, "hidden_act", default_act), cfg(t, "hidden_act", default_act)}
    if len(acts) != 1 or not acts <= set(_ACTIVATIONS_HF):
        raise NotImplementedError(f"activations {acts}: course_lib supports one of {list(_ACTIVATIONS_HF)} in both towers")
    if siglip and not cfg(v, "vision_use_head", True):
        raise NotImplementedError("SigLIP without its attention-pooling head is not supported")
    default_eps = 1e-6 if siglip else 1e-5
    if cfg(v, "layer_norm_eps", default_eps) != cfg(t, "layer_norm_eps", default_eps):
        raise NotImplementedError("the two towers use different LayerNorm eps values")
    vdim, tdim = cfg(v, "hidden_size"), cfg(t, "hidden_size")
    eos = cfg(t, "eos_token_id", 1 if siglip else 49407)
    kwargs = dict(
        embed_dim=vdim if siglip else cfg(hf_config, "projection_dim", 512),
        image_size=cfg(v, "image_size"),
        patch_size=cfg(v, "patch_size"),
        in_chans=cfg(v, "num_channels", 3),
        vision_dim=vdim,
        vision_depth=cfg(v, "num_hidden_layers"),
        vision_heads=cfg(v, "num_attention_heads"),
        vision_mlp_ratio=cfg(v, "intermediate_size") / vdim,
        vision_pool="map" if siglip else "cls",
        pre_norm=not siglip,
        patch_bias=siglip,
        image_proj=not siglip,
        vocab_size=cfg(t, "vocab_size"),
        context_length=cfg(t, "max_position_embeddings"),
        text_dim=tdim,
        text_depth=cfg(t, "num_hidden_layers"),
        text_heads=cfg(t, "num_attention_heads"),
        text_mlp_ratio=cfg(t, "intermediate_size") / tdim,
        causal=not siglip,
        # transformers keeps argmax pooling for old CLIP configs whose eos_token_id reads 2.
        text_pool="last" if siglip else ("argmax" if eos == 2 else "eos"),
        eos_token_id=eos,
        text_proj_bias=siglip,
        act=_ACTIVATIONS_HF[acts.pop()],
        eps=cfg(v, "layer_norm_eps", default_eps),
        loss="siglip" if siglip else "clip",
        logit_scale_init=SIGLIP_LOGIT_SCALE_INIT if siglip else cfg(hf_config, "logit_scale_init_value", CLIP_LOGIT_SCALE_INIT),
        logit_bias_init=SIGLIP_LOGIT_BIAS_INIT if siglip else None,
        max_logit_scale=None if siglip else CLIP_MAX_LOGIT_SCALE,
    )
    for tower, dim, hidden in (("vision", vdim, cfg(v, "intermediate_size")), ("text", tdim, cfg(t, "intermediate_size"))):
        if int(dim * kwargs[f"{tower}_mlp_ratio"]) != hidden:
            raise NotImplementedError(f"{tower} MLP width {hidden} is not representable as an integer ratio of {dim}")
    kwargs.update(overrides)
    return CLIPConfig(**kwargs)


# transformers 5.x writes the same names to disk as it holds in memory for CLIP and SigLIP.
_HF_RULES = [
    (r"^text_model\.embeddings\.token_embedding\.", "text.token_embed."),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "text.pos_embed"),
    (r"^text_model\.encoder\.layers\.", "text.blocks."),
    (r"^text_model\.final_layer_norm\.", "text.norm."),
    (r"^(text_projection|text_model\.head)\.", "text_proj."),
    (r"^visual_projection\.", "image_proj."),
    (r"^vision_model\.embeddings\.class_embedding$", "visual.cls_token"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual.patch_embed.proj."),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.pos_embed"),
    (r"^vision_model\.pre_layrnorm\.", "visual.norm_pre."),
    (r"^vision_model\.encoder\.layers\.", "visual.blocks."),
    (r"^vision_model\.post_layernorm\.", "visual.norm."),
    (r"^vision_model\.head\.", "visual.attn_pool."),
    (r"\.self_attn\.(q|k|v)_proj\.", r".attn.\1."),
    (r"\.self_attn\.out_proj\.", ".attn.proj."),
    (r"\.layer_norm(\d)\.", r".norm\1."),
    (r"attn_pool\.attention\.out_proj\.", "attn_pool.attn.proj."),
    (r"attn_pool\.layernorm\.", "attn_pool.norm."),
]


def convert_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP/SigLIP weight names -> course_lib names, with the reshapes they need."""
    out = fuse_qkv(rename_keys({k: v for k, v in state.items() if not k.endswith("position_ids")}, _HF_RULES))
    for name in ("visual.pos_embed", "text.pos_embed", "visual.cls_token"):
        if name in out:  # (L, D) or (D,) -> (1, L, D) or (1, 1, D)
            out[name] = out[name].reshape(1, -1, out[name].shape[-1])
    for name in ("logit_scale", "logit_bias"):
        if name in out:
            out[name] = out[name].reshape(())  # SigLIP stores (1,)
    for kind in ("weight", "bias"):  # torch's MultiheadAttention keeps q, k, v in one in_proj
        key = f"visual.attn_pool.attention.in_proj_{kind}"
        if key in out:
            w = out.pop(key)
            d = w.shape[0] // 3
            for i, name in enumerate("qkv"):
                out[f"visual.attn_pool.attn.{name}.{kind}"] = w[i * d : (i + 1) * d]
    return out


# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------
def clip_tiny(**kw) -> CLIP:
    """A CLIP small enough to train on the scenes data on a laptop CPU in a minute."""
    return CLIP(CLIPConfig(**kw))


def siglip_tiny(**kw) -> CLIP:
    """clip_tiny's towers trained with SigLIP's sigmoid loss (its temperature and bias init)."""
    defaults = dict(
        loss="siglip", logit_scale_init=SIGLIP_LOGIT_SCALE_INIT, logit_bias_init=SIGLIP_LOGIT_BIAS_INIT, max_logit_scale=None
    )
    return CLIP(CLIPConfig(**{**defaults, **kw}))


def clip_vit_b32(**kw) -> CLIP:
    """CLIP ViT-B/32 (Radford et al., 2021, table 20): 224 px, 12x768 image tower, 12x512 text
    tower with 8 heads, 77 tokens, 49,408 words, 512-wide embedding, quick GELU."""
    defaults = dict(
        embed_dim=512, image_size=224, patch_size=32, vision_dim=768, vision_depth=12, vision_heads=12,
        vocab_size=49408, context_length=77, text_dim=512, text_depth=12, text_heads=8,
        eos_token_id=49407, act="quick_gelu",
    )
    return CLIP(CLIPConfig(**{**defaults, **kw}))


def siglip_base(**kw) -> CLIP:
    """SigLIP B/16 at 224 px (Zhai et al., 2023): 12x768 towers, attention pooling, 64 tokens,
    a 32,000-word vocabulary, tanh GELU, bidirectional text attention read at the last token."""
    defaults = dict(
        embed_dim=768, image_size=224, patch_size=16, vision_dim=768, vision_depth=12, vision_heads=12,
        vision_pool="map", pre_norm=False, patch_bias=True, image_proj=False, vocab_size=32000,
        context_length=64, text_dim=768, text_depth=12, text_heads=12, causal=False, text_pool="last",
        eos_token_id=1, text_proj_bias=True, act="gelu_tanh", eps=1e-6, loss="siglip",
        logit_scale_init=SIGLIP_LOGIT_SCALE_INIT, logit_bias_init=SIGLIP_LOGIT_BIAS_INIT, max_logit_scale=None,
    )
    return CLIP(CLIPConfig(**{**defaults, **kw}))
