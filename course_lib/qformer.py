"""BLIP-2's Querying Transformer (Li et al., 2023): a small set of learned queries reads a frozen
image encoder and hands a fixed number of vectors to a frozen language model.

Stage 1 (representation learning, BLIP-2 sec. 3.2) trains the Q-Former against the frozen image
encoder with three objectives that share one network and differ only in the self-attention mask:
- image-text contrastive (ITC): queries and text may not see each other (`itc_mask`); the score of
  an image-text pair is the best match over the queries (`max_query_similarity`);
- image-text matching (ITM): everything sees everything (`itm_mask`); a binary head on the query
  outputs decides match / no match, with hard negatives mined from the ITC scores;
- image-grounded text generation (ITG): text sees all queries and the text before it (`itg_mask`),
  queries never see the text; the text tokens predict the next word.
Stage 2 (sec. 3.3) projects the query outputs into the language model's embedding space and puts
them in front of the text as a soft prompt (`prepend_soft_prompt`); only the Q-Former and the
projection learn. `LinearConnector` and `MlpConnector` are the simpler connectors it is compared with.

The layer follows the BERT-style post-norm of the official code and of transformers'
`Blip2QFormerModel`: x = LN(x + sublayer(x)); cross-attention to the image every
`cross_attention_freq` layers (BLIP-2 uses 2), and separate feed-forward weights for queries and text.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import data
from .hf import cfg, fuse_qkv, load_hf_checkpoint, rename_keys
from .layers import Attention, Mlp, attention, load_state_dict_checked, param_groups
from .tinylm import lm_loss, pad_batch
from .train import cosine_schedule
from .utils import CHECKPOINTS, load_checkpoint


# ----------------------------------------------------------------------------------------------
# The three self-attention masks (BLIP-2 fig. 2, right). Boolean (L, L), True = may attend;
# the sequence is [num_queries queries, text_len text tokens].
# ----------------------------------------------------------------------------------------------
def itc_mask(num_queries: int, text_len: int) -> torch.Tensor:
    """Uni-modal mask for contrastive learning: queries see queries, text sees text, so neither
    can copy the answer from the other."""
    L = num_queries + text_len
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[:num_queries, :num_queries] = True
    mask[num_queries:, num_queries:] = True
    return mask


def itm_mask(num_queries: int, text_len: int) -> torch.Tensor:
    """Bi-directional mask for matching: every token sees every token, so the query outputs can
    compare the image with the whole text."""
    L = num_queries + text_len
    return torch.ones(L, L, dtype=torch.bool)


def itg_mask(num_queries: int, text_len: int) -> torch.Tensor:
    """Multi-modal causal mask for generation: queries see queries only; text token t sees every
    query and text tokens 0..t. The words must come from the image, through the queries."""
    mask = itc_mask(num_queries, text_len)
    mask[num_queries:, :num_queries] = True
    mask[num_queries:, num_queries:] = torch.ones(text_len, text_len, dtype=torch.bool).tril()
    return mask


MASKS = {"itc": itc_mask, "itm": itm_mask, "itg": itg_mask}


def with_text_padding(mask: torch.Tensor, text_keep: torch.Tensor) -> torch.Tensor:
    """Combine an (L, L) mask with text padding: text_keep (B, T) True for real tokens.

    Returns (B, 1, L, L): no token attends to a padding key. Every row keeps at least one key (a
    query sees the queries, a text token sees <bos>), so the softmax never meets an empty row.
    """
    B, T = text_keep.shape
    num_queries = mask.shape[0] - T
    keys = torch.cat([text_keep.new_ones(B, num_queries), text_keep], dim=1)  # (B, L)
    return mask.to(text_keep.device)[None, None] & keys[:, None, None, :]


# ----------------------------------------------------------------------------------------------
# The losses of stage 1
# ----------------------------------------------------------------------------------------------
def max_query_similarity(query_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """ITC similarity (BLIP-2 sec. 3.2): cosine similarity of every query with the text, then the
    best query. query_feats (Bi, Nq, E), text_feats (Bt, E) -> (Bi, Bt)."""
    q = F.normalize(query_feats, dim=-1)
    t = F.normalize(text_feats, dim=-1)
    sims = torch.einsum("iqe,te->itq", q, t)  # (Bi, Bt, Nq)
    return sims.max(dim=-1).values


def itc_loss(similarity: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE on an (N, N) similarity matrix whose diagonal holds the true pairs."""
    logits = similarity / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def sample_hard_negatives(logits: torch.Tensor, generator: torch.Generator | None = None,
                          exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a wrong text, and for each text a wrong image, drawn with probability
    softmax(logits) over the others (ALBEF/BLIP hard-negative mining): the confusing pairs are
    picked most often. logits (N, N) are the ITC logits, similarity / temperature: a cosine
    similarity alone lies in [-1, 1], where the softmax is nearly uniform and the "hard"
    negatives would be random ones.

    exclude (N, N) bool, optional: pairs that must not be drawn besides the diagonal (an identical
    caption is no negative). Returns (text index per image (N,), image index per text (N,)).
    """
    N = logits.shape[0]
    if N < 2:
        raise ValueError("hard negatives need a batch of at least 2 pairs")
    never = torch.eye(N, dtype=torch.bool, device=logits.device)
    if exclude is not None:
        never = never | exclude
    with torch.no_grad():
        # A tiny floor keeps every allowed pair drawable when the softmax underflows.
        w_i2t = logits.float().softmax(dim=1).masked_fill(never, 0) + (~never) * 1e-6
        w_t2i = logits.float().softmax(dim=0).T.masked_fill(never.T, 0) + (~never.T) * 1e-6
        # A row with nothing allowed (every caption in the batch identical) falls back to any other pair.
        eye = torch.eye(N, dtype=torch.bool, device=logits.device)
        w_i2t = torch.where(w_i2t.sum(1, keepdim=True) > 0, w_i2t, (~eye).float())
        w_t2i = torch.where(w_t2i.sum(1, keepdim=True) > 0, w_t2i, (~eye).float())
        neg_text = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
        neg_image = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    return neg_text, neg_image


def itm_loss(match_logits: torch.Tensor, is_match: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary matching loss. match_logits (M, 2), is_match (M,) long -> (loss, n_correct)."""
    return F.cross_entropy(match_logits, is_match), (match_logits.argmax(-1) == is_match).sum()


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
@dataclass
class QFormerConfig:
    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 256
    num_queries: int = 8  # BLIP-2 uses 32
    encoder_dim: int = 64  # width of the frozen image features
    cross_attention_freq: int = 2  # cross-attention in layers 0, f, 2f, ... (BLIP-2: every other layer)
    vocab_size: int = 64  # text side for stage 1; 0 = queries only
    max_text_len: int = 48
    embed_dim: int = 32  # ITC projection width (BLIP-2: 256)
    eps: float = 1e-12
    text_ffn: bool = True  # a feed-forward for text tokens (transformers: use_qformer_text_input)

    def __post_init__(self) -> None:
        if self.cross_attention_freq < 1:
            raise ValueError(f"cross_attention_freq must be >= 1, got {self.cross_attention_freq}")
        if self.num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {self.num_queries}")


class CrossAttention(nn.Module):
    """Multi-head attention from x (B, Lq, D) to context (B, Lk, Dk): keys and values come from the
    context, which may have another width (the image encoder's)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(context_dim, dim)
        self.v = nn.Linear(context_dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.use_sdpa = True

    def forward(self, x: torch.Tensor, context: torch.Tensor, return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, Lq, D = x.shape
        if context.shape[-1] != self.k.in_features:
            raise ValueError(
                f"image features have width {context.shape[-1]}, the Q-Former expects {self.k.in_features}: "
                "set QFormerConfig(encoder_dim=...) to the image encoder's width"
            )
        heads = lambda t: t.reshape(B, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, L, hd)
        out, weights = attention(heads(self.q(x)), heads(self.k(context)), heads(self.v(context)),
                                 use_sdpa=self.use_sdpa and not return_weights)
        return self.proj(out.transpose(1, 2).reshape(B, Lq, D)), weights


class QFormerLayer(nn.Module):
    """Self-attention over [queries, text]; cross-attention of the queries to the image (in some
    layers); a feed-forward for the queries and another for the text. Post-norm, as BERT."""

    def __init__(self, c: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        self.attn = Attention(c.dim, c.num_heads)
        self.norm_self = nn.LayerNorm(c.dim, eps=c.eps)
        self.cross_attn = CrossAttention(c.dim, c.encoder_dim, c.num_heads) if has_cross_attention else None
        self.norm_cross = nn.LayerNorm(c.dim, eps=c.eps) if has_cross_attention else None
        self.mlp_query = Mlp(c.dim, c.mlp_dim)
        self.norm_query = nn.LayerNorm(c.dim, eps=c.eps)
        self.mlp_text = Mlp(c.dim, c.mlp_dim) if c.text_ffn else None
        self.norm_text = nn.LayerNorm(c.dim, eps=c.eps) if c.text_ffn else None

    def forward(self, x: torch.Tensor, num_queries: int, image_feats: torch.Tensor | None,
                mask: torch.Tensor | None = None, return_weights: bool = False):
        a, _ = self.attn(x, mask=mask)
        x = self.norm_self(x + a)
        q, t = x[:, :num_queries], x[:, num_queries:]  # (B, Nq, D), (B, T, D)
        weights = None
        if self.cross_attn is not None:
            if image_feats is None:
                raise ValueError("this layer cross-attends to the image: pass image_feats (B, N, encoder_dim)")
            c, weights = self.cross_attn(q, image_feats, return_weights)
            q = self.norm_cross(q + c)
        q = self.norm_query(q + self.mlp_query(q))
        if t.shape[1] > 0:
            if self.mlp_text is None:
                raise ValueError("this Q-Former has no text feed-forward (text_ffn=False): pass queries only")
            t = self.norm_text(t + self.mlp_text(t))
            q = torch.cat([q, t], dim=1)
        return q, weights


class QFormer(nn.Module):
    """Learned queries + optional text -> hidden states (B, Nq + T, D), with BLIP-2's stage-1 heads.

    Token order: [queries, text]. `encode` is the transformer itself (it matches transformers'
    Blip2QFormerModel); `forward` adds the query tokens and the text embeddings.
    """

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = c = config
        self.query_tokens = nn.Parameter(torch.randn(1, c.num_queries, c.dim) * 0.02)
        self.embed_norm = nn.LayerNorm(c.dim, eps=c.eps)  # applied to [queries, text] before layer 0
        self.layers = nn.ModuleList(QFormerLayer(c, i % c.cross_attention_freq == 0) for i in range(c.depth))
        if c.vocab_size:
            self.word_embed = nn.Embedding(c.vocab_size, c.dim)
            self.pos_embed = nn.Parameter(torch.randn(1, c.max_text_len, c.dim) * 0.02)
            self.vision_proj = nn.Linear(c.dim, c.embed_dim)  # ITC: queries -> shared space
            self.text_proj = nn.Linear(c.dim, c.embed_dim)  # ITC: first text token -> shared space
            self.itm_head = nn.Linear(c.dim, 2)
            self.lm_head = nn.Linear(c.dim, c.vocab_size)  # ITG
            self.log_temperature = nn.Parameter(torch.tensor(0.07).log())

    def no_weight_decay(self) -> set[str]:
        return {"query_tokens", "pos_embed", "log_temperature"}

    def temperature(self) -> torch.Tensor:
        """The learned ITC temperature, kept in BLIP-2's range [0.001, 0.5]."""
        return self.log_temperature.exp().clamp(1e-3, 0.5)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text ids (B, T) -> word + position embeddings (B, T, D)."""
        if not self.config.vocab_size:
            raise ValueError("this Q-Former has no text side (vocab_size=0)")
        T = input_ids.shape[1]
        if T > self.config.max_text_len:
            raise ValueError(f"text of {T} tokens is longer than max_text_len={self.config.max_text_len}")
        return self.word_embed(input_ids) + self.pos_embed[:, :T]

    def encode(self, embeddings: torch.Tensor, num_queries: int, image_feats: torch.Tensor | None,
               mask: torch.Tensor | None = None, return_cross_attention: bool = False):
        """The transformer: embeddings (B, Nq + T, D) (queries first) -> hidden states (B, Nq + T, D).

        image_feats (B, N, encoder_dim); mask: boolean (L, L) or (B, 1, L, L), True = may attend.
        With return_cross_attention also returns the per-layer weights (B, heads, Nq, N) of the
        cross-attention layers.
        """
        x = self.embed_norm(embeddings)
        maps = []
        for layer in self.layers:
            x, w = layer(x, num_queries, image_feats, mask, return_cross_attention)
            if w is not None:
                maps.append(w)
        return (x, maps) if return_cross_attention else x

    def forward(self, image_feats: torch.Tensor | None, input_ids: torch.Tensor | None = None,
                mask_kind: str = "itm", text_keep: torch.Tensor | None = None, return_cross_attention: bool = False):
        """Image features (B, N, encoder_dim) and optional text ids (B, T) -> (B, Nq + T, D).

        mask_kind: "itc", "itm" or "itg" (see the mask functions); text_keep (B, T) marks real
        tokens (default: every id that is not 0, the tokenizer's <pad>).
        """
        B = image_feats.shape[0] if image_feats is not None else input_ids.shape[0]
        Nq = self.config.num_queries
        x = self.query_tokens.expand(B, -1, -1)
        mask = None
        if input_ids is not None:
            if mask_kind not in MASKS:
                raise ValueError(f"mask_kind must be one of {list(MASKS)}, got {mask_kind!r}")
            x = torch.cat([x, self.embed_text(input_ids)], dim=1)
            keep = input_ids != 0 if text_keep is None else text_keep
            mask = with_text_padding(MASKS[mask_kind](Nq, input_ids.shape[1]), keep)
        return self.encode(x, Nq, image_feats, mask, return_cross_attention)

    def query_outputs(self, image_feats: torch.Tensor) -> torch.Tensor:
        """The queries alone, as stage 2 uses them: (B, N, encoder_dim) -> (B, Nq, D)."""
        return self(image_feats)

    # ------------------------------------------------------------------------------------------
    def stage1_losses(self, image_feats: torch.Tensor, input_ids: torch.Tensor,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """BLIP-2's three stage-1 losses on a batch of pairs (image i, text i).

        input_ids (B, T) start with <bos>, which plays BERT's [CLS] (ITC) and [DEC] (ITG) roles.
        Returns {"itc", "itm", "itg", "loss" (their sum), "itm_correct", "similarity"}.
        """
        Nq, B = self.config.num_queries, image_feats.shape[0]
        # ITC: one pass under the uni-modal mask gives both the query and the text features.
        h = self(image_feats, input_ids, "itc")
        query_feats = self.vision_proj(h[:, :Nq])  # (B, Nq, E)
        text_feats = self.text_proj(h[:, Nq])  # (B, E): the first text token
        sim = max_query_similarity(query_feats, text_feats)  # (B, B)
        temperature = self.temperature()
        itc = itc_loss(sim, temperature)
        # ITM: the true pairs, each image with a hard-negative text, each text with a hard-negative image,
        # drawn from the ITC logits (similarity / temperature, as BLIP-2 does). Two identical captions
        # describe each other's image, so neither is drawn as the other's negative.
        same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)  # (B, B)
        neg_text, neg_image = sample_hard_negatives(sim.detach() / temperature.detach(), generator, exclude=same_text)
        images = torch.cat([image_feats, image_feats, image_feats[neg_image]])
        texts = torch.cat([input_ids, input_ids[neg_text], input_ids])
        h_itm = self(images, texts, "itm")[:, :Nq]  # (3B, Nq, D)
        match_logits = self.itm_head(h_itm).mean(dim=1)  # average over the queries (BLIP-2 sec. 3.2)
        is_match = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(input_ids.device)
        itm, itm_correct = itm_loss(match_logits, is_match)
        # ITG: the text tokens predict the next word, seeing the image only through the queries.
        h_itg = self(image_feats, input_ids, "itg")[:, Nq:]  # (B, T, D)
        itg = lm_loss(self.lm_head(h_itg), input_ids.masked_fill(input_ids == 0, -100))
        return {"itc": itc, "itm": itm, "itg": itg, "loss": itc + itm + itg, "itm_correct": itm_correct, "similarity": sim}

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source, **overrides) -> "QFormer":
        """Load transformers' `Blip2QFormerModel` (or the `qformer` and `query_tokens` of a
        `Blip2Model`): a model instance or a save_pretrained folder.

        The Q-Former transformer (`encode`) gets the checkpoint's weights; parts the checkpoint does
        not have (query tokens for a bare Blip2QFormerModel, the text embeddings and stage-1 heads)
        keep their fresh initialisation.
        """
        hf_config, state = load_hf_checkpoint(source)
        if hasattr(hf_config, "qformer_config"):  # a whole Blip2Model
            num_queries = cfg(hf_config, "num_query_tokens", 32)
            hf_config = hf_config.qformer_config
            state = {k: v for k, v in state.items() if k.startswith(("qformer.", "query_tokens"))}
        else:
            num_queries = overrides.pop("num_queries", QFormerConfig.num_queries)
        config = config_from_hf(hf_config, num_queries=num_queries, **overrides)
        model = cls(config)
        converted = convert_hf_state_dict(state)
        core = {k for k in model.state_dict() if k.startswith(("layers.", "embed_norm."))}
        missing = sorted(core - set(converted))
        if missing:
            raise ValueError(f"the checkpoint lacks Q-Former weights {missing[:6]}: is it a Blip2QFormerModel or Blip2Model?")
        load_state_dict_checked(model, {**model.state_dict(), **converted}, source=str(source) if isinstance(source, str) else type(source).__name__)
        return model


def config_from_hf(hf_config, **overrides) -> QFormerConfig:
    """transformers' Blip2QFormerConfig (object or config.json namespace) -> QFormerConfig."""
    act = cfg(hf_config, "hidden_act", "gelu")
    if act != "gelu":
        raise NotImplementedError(f"activation {act!r}: course_lib's Q-Former uses exact GELU")
    kwargs = dict(
        dim=cfg(hf_config, "hidden_size"),
        depth=cfg(hf_config, "num_hidden_layers"),
        num_heads=cfg(hf_config, "num_attention_heads"),
        mlp_dim=cfg(hf_config, "intermediate_size"),
        encoder_dim=cfg(hf_config, "encoder_hidden_size"),
        cross_attention_freq=cfg(hf_config, "cross_attention_frequency", 2),
        vocab_size=cfg(hf_config, "vocab_size", 0),
        max_text_len=cfg(hf_config, "max_position_embeddings", 512),
        eps=cfg(hf_config, "layer_norm_eps", 1e-12),
        text_ffn=cfg(hf_config, "use_qformer_text_input", False),
    )
    kwargs.update(overrides)
    return QFormerConfig(**kwargs)


# One spelling serves both: transformers 5.x writes Blip2QFormerModel's in-memory names to disk.
_HF_RULES = [
    (r"^qformer\.", ""),
    (r"^layernorm\.", "embed_norm."),
    (r"^encoder\.layer\.(\d+)\.", r"layers.\1."),
    (r"\.crossattention\.attention\.(query)\.", ".cross_attn.q."),
    (r"\.crossattention\.attention\.(key)\.", ".cross_attn.k."),
    (r"\.crossattention\.attention\.(value)\.", ".cross_attn.v."),
    (r"\.crossattention\.output\.dense\.", ".cross_attn.proj."),
    (r"\.crossattention\.output\.LayerNorm\.", ".norm_cross."),
    (r"\.attention\.attention\.query\.", ".attn.q."),
    (r"\.attention\.attention\.key\.", ".attn.k."),
    (r"\.attention\.attention\.value\.", ".attn.v."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.attention\.output\.LayerNorm\.", ".norm_self."),
    (r"\.intermediate_query\.dense\.", ".mlp_query.fc1."),
    (r"\.output_query\.dense\.", ".mlp_query.fc2."),
    (r"\.output_query\.LayerNorm\.", ".norm_query."),
    (r"\.intermediate\.dense\.", ".mlp_text.fc1."),
    (r"\.output\.dense\.", ".mlp_text.fc2."),
    (r"\.output\.LayerNorm\.", ".norm_text."),
]


def convert_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers Q-Former weight names -> course_lib QFormer names (self-attention q/k/v fused)."""
    return fuse_qkv(rename_keys(state, _HF_RULES))


def qformer_tiny(**kw) -> QFormer:
    """The lecture's size: width 64, 2 layers (cross-attention in layer 0), 8 queries."""
    return QFormer(QFormerConfig(**kw))


def qformer_base(**kw) -> QFormer:
    """BLIP-2's size (sec. 3.1): BERT-base width 768, 12 layers, 32 queries, image width 1408 (ViT-g)."""
    return QFormer(QFormerConfig(**{**dict(dim=768, depth=12, num_heads=12, mlp_dim=3072, num_queries=32,
                                           encoder_dim=1408, vocab_size=30523, max_text_len=512, embed_dim=256), **kw}))


# ----------------------------------------------------------------------------------------------
# Stage 2: connectors that turn image features into a soft prompt for a frozen language model
# ----------------------------------------------------------------------------------------------
def prepend_soft_prompt(query_out: torch.Tensor, proj: nn.Linear, text_embeds: torch.Tensor) -> torch.Tensor:
    """BLIP-2 stage 2 (sec. 3.3): project the query outputs (B, Nq, D) to the LM width with `proj`
    and put them before the text embeddings (B, T, D_lm) -> (B, Nq + T, D_lm)."""
    prompt = proj(query_out)
    if prompt.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(f"projected queries have width {prompt.shape[-1]}, the LM's embeddings {text_embeds.shape[-1]}: "
                         "build the projection as nn.Linear(qformer_dim, lm_dim)")
    return torch.cat([prompt, text_embeds], dim=1)


class LinearConnector(nn.Module):
    """Every image token becomes one LM token through one linear map (LLaVA, Liu et al., 2023)."""

    def __init__(self, encoder_dim: int, lm_dim: int):
        super().__init__()
        self.proj = nn.Linear(encoder_dim, lm_dim)

    def forward(self, image_feats: torch.Tensor) -> torch.Tensor:
        return self.proj(image_feats)  # (B, N, encoder_dim) -> (B, N, lm_dim)


class MlpConnector(nn.Module):
    """Every image token through a two-layer GELU MLP (LLaVA-1.5, Liu et al., 2024)."""

    def __init__(self, encoder_dim: int, lm_dim: int):
        super().__init__()
        self.mlp = Mlp(encoder_dim, lm_dim, lm_dim)

    def forward(self, image_feats: torch.Tensor) -> torch.Tensor:
        return self.mlp(image_feats)


class QFormerConnector(nn.Module):
    """A Q-Former (queries only) plus BLIP-2's linear projection: always Nq prompt tokens."""

    def __init__(self, qformer: QFormer, lm_dim: int):
        super().__init__()
        self.qformer = qformer
        self.proj = nn.Linear(qformer.config.dim, lm_dim)

    def no_weight_decay(self) -> set[str]:
        return {f"qformer.{n}" for n in self.qformer.no_weight_decay()}

    def forward(self, image_feats: torch.Tensor) -> torch.Tensor:
        return self.proj(self.qformer.query_outputs(image_feats))  # (B, Nq, lm_dim)


def query_transformer(qformer: QFormer) -> QFormer:
    """The part of a stage-1 Q-Former that stage 2 keeps: the queries and their path through the
    layers (self-attention, cross-attention, query feed-forward), without the text embeddings, the
    text feed-forward and the stage-1 heads, which stage 2 never runs (BLIP-2 fig. 3)."""
    bare = QFormer(dataclasses.replace(qformer.config, vocab_size=0, text_ffn=False))
    keep = bare.state_dict().keys()
    bare.load_state_dict({k: v for k, v in qformer.state_dict().items() if k in keep})
    return bare


CONNECTOR_KINDS = ("linear", "mlp", "qformer")


def make_connector(kind: str, encoder_dim: int, lm_dim: int, qformer_config: QFormerConfig | None = None) -> nn.Module:
    """A fresh connector: "linear" (LLaVA), "mlp" (LLaVA-1.5) or "qformer" (BLIP-2, queries only,
    built from `qformer_config`)."""
    if kind == "linear":
        return LinearConnector(encoder_dim, lm_dim)
    if kind == "mlp":
        return MlpConnector(encoder_dim, lm_dim)
    if kind == "qformer":
        if qformer_config is None:
            raise ValueError("a Q-Former connector needs qformer_config")
        return QFormerConnector(QFormer(dataclasses.replace(qformer_config, vocab_size=0, text_ffn=False)), lm_dim)
    raise ValueError(f"unknown connector kind {kind!r}; known: {CONNECTOR_KINDS}")


def soft_prompt_loss(lm: nn.Module, prompt: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The LM's next-token loss on the text after a soft prompt (B, P, D_lm).

    targets (B, T): the ids to predict, -100 where nothing is predicted (padding, the question of a
    question-answer pair). The prompt positions predict nothing.
    """
    logits = lm(inputs_embeds=torch.cat([prompt, lm.embed(input_ids)], dim=1))  # (B, P + T, V)
    P = prompt.shape[1]
    ignore = targets.new_full((targets.shape[0], P), -100)
    return lm_loss(logits, torch.cat([ignore, targets], dim=1))


# ----------------------------------------------------------------------------------------------
# Stage 2 on the scenes: examples, training and the question-answering accuracy
# ----------------------------------------------------------------------------------------------
def qa_examples(ds, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (image, question, answer) of a scenes dataset as LM training examples.

    Returns image_index (M,), input_ids (M, T) = <bos> question answer <eos> <pad>..., targets
    (M, T) = the answer and <eos>, -100 elsewhere (the question is given, not predicted), and the
    question type (M,) (0 shape, 1 colour, 2 count, 3 position, 4 yes/no).
    """
    index, ids, targets, kind = [], [], [], []
    for i, (qs, ans) in enumerate(zip(ds["questions"], ds["answers"])):
        for k, (q, a) in enumerate(zip(qs, ans)):
            question, answer = tokenizer.encode(q, bos=True), tokenizer.encode(a, eos=True)
            index.append(i), kind.append(k)
            ids.append(question + answer)
            targets.append([-100] * len(question) + answer)
    ids = pad_batch(ids, tokenizer.pad_id)
    return torch.tensor(index), ids, pad_batch(targets, -100, ids.shape[1]), torch.tensor(kind)


def caption_examples(ds, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_index (N,), input_ids (N, T) = <bos> caption <eos> <pad>..., targets with -100 on padding)."""
    ids = pad_batch([tokenizer.encode(c, bos=True, eos=True) for c in ds["caption"]], tokenizer.pad_id)
    return torch.arange(ids.shape[0]), ids, ids.masked_fill(ids == tokenizer.pad_id, -100)


def train_connector(connector: nn.Module, lm: nn.Module, image_feats: torch.Tensor, examples: list[tuple],
                    steps: int, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> list[float]:
    """Stage 2: train `connector` (image features -> soft prompt) through the frozen `lm`.

    examples: a list of (image_index, input_ids, targets, ...) tuples (from qa_examples,
    caption_examples); each step takes one batch from each. Returns the loss of every step.
    """
    opt = torch.optim.AdamW(param_groups(connector, 0.05), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps, max(1, steps // 10)))
    g = torch.Generator().manual_seed(seed)
    connector.train()
    losses = []
    for _ in range(steps):
        loss = 0.0
        for index, ids, targets, *_ in examples:
            pick = torch.randint(0, ids.shape[0], (batch_size,), generator=g)
            loss = loss + soft_prompt_loss(lm, connector(image_feats[index[pick]]), ids[pick], targets[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    connector.eval()
    return losses


@torch.no_grad()
def answer_questions(lm: nn.Module, tokenizer, ds, image_feats: torch.Tensor | None, connector: nn.Module | None) -> list[list[str]]:
    """Greedy answers of the frozen LM to every question of `ds`, after the connector's soft prompt
    (or with no prompt when connector is None: the LM's prior alone). Returns answers[image][question]."""
    n = len(ds)
    questions = ds["questions"]
    prompt = connector(image_feats) if connector is not None else None
    out = [[""] * len(questions[0]) for _ in range(n)]
    for k in range(len(questions[0])):  # every scene's k-th question has the same number of words
        ids = torch.tensor([tokenizer.encode(qs[k], bos=True) for qs in questions])
        embeds = lm.embed(ids)
        if prompt is not None:
            embeds = torch.cat([prompt, embeds], dim=1)
        new = lm.generate(inputs_embeds=embeds, max_new_tokens=3, eos_id=tokenizer.eos_id)
        for i in range(n):
            out[i][k] = tokenizer.decode(new[i])
    return out


@torch.no_grad()
def answer_after_captions(lm: nn.Module, tokenizer, ds) -> list[list[str]]:
    """Greedy answers of the frozen LM to every question of `ds` when the scene's true caption, as
    words, precedes <bos> and the question: what a connector whose soft prompt said everything the
    caption says could reach (a ceiling). Returns answers[image][question], like answer_questions."""
    contexts = [tokenizer.encode(c) for c in ds["caption"]]
    questions = ds["questions"]
    by_length: dict[int, list[int]] = {}
    for i, c in enumerate(contexts):  # captions of one length batch together (no padding needed)
        by_length.setdefault(len(c), []).append(i)
    out = [[""] * len(questions[0]) for _ in range(len(contexts))]
    for k in range(len(questions[0])):
        for rows in by_length.values():
            ids = torch.tensor([contexts[i] + tokenizer.encode(questions[i][k], bos=True) for i in rows])
            new = lm.generate(ids, max_new_tokens=3, eos_id=tokenizer.eos_id)
            for i, row in zip(rows, new):
                out[i][k] = tokenizer.decode(row)
    return out


QUESTION_TYPES = ("shape", "color", "count", "position", "yes/no")  # the order of a scene's questions


def answer_chance(ds) -> dict[str, float]:
    """Chance per question type: 1 / the number of different answers the type has in `ds`."""
    return {name: 1 / len({a[k] for a in ds["answers"]}) for k, name in enumerate(QUESTION_TYPES)}


@torch.no_grad()
def encode_images(encoder: nn.Module, ds, batch_size: int = 500) -> torch.Tensor:
    """The frozen encoder's tokens for every image of `ds`: (N, 1 + patches, width)."""
    images, _ = data.to_tensors(ds)
    return torch.cat([encoder.forward_features(x) for x in images.split(batch_size)])


def answer_accuracy(predicted: list[list[str]], ds) -> dict[str, float]:
    """Exact-match accuracy per question type and overall."""
    names = QUESTION_TYPES
    truth = ds["answers"]
    acc = {name: sum(p[k] == t[k] for p, t in zip(predicted, truth)) / len(truth) for k, name in enumerate(names)}
    acc["all"] = sum(acc.values()) / len(names)
    return acc


@torch.no_grad()
def generate_captions(lm: nn.Module, tokenizer, image_feats: torch.Tensor, connector: nn.Module,
                      max_new_tokens: int = 40) -> list[str]:
    """Greedy captions of the frozen LM after the connector's soft prompt and <bos>."""
    prompt = connector(image_feats)  # (B, P, D_lm)
    bos = lm.embed(torch.full((prompt.shape[0], 1), tokenizer.bos_id, device=prompt.device))
    new = lm.generate(inputs_embeds=torch.cat([prompt, bos], dim=1), max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id)
    return [tokenizer.decode(row) for row in new]


# ----------------------------------------------------------------------------------------------
# Stage 1 on held-out pairs: retrieval and matching
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def itc_similarity(qformer: QFormer, image_feats: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """ITC scores of every image (N, L, encoder_dim) with every text (M, T) -> (N, M)."""
    return max_query_similarity(*itc_embeddings(qformer, image_feats, input_ids))


@torch.no_grad()
def itc_embeddings(qformer: QFormer, image_feats: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The projected ITC embeddings: every query of every image (N, Nq, E), every text (M, E)."""
    Nq = qformer.config.num_queries
    # Under the ITC mask the queries never see the text and the text never sees the image, so the
    # query outputs need no text and the text outputs need no particular image.
    queries = qformer.vision_proj(qformer(image_feats)[:, :Nq])  # (N, Nq, E)
    text = qformer(image_feats[:1].expand(input_ids.shape[0], -1, -1), input_ids, "itc")[:, Nq]  # (M, D)
    return queries, qformer.text_proj(text)


@torch.no_grad()
def stage1_metrics(qformer: QFormer, image_feats: torch.Tensor, input_ids: torch.Tensor) -> dict[str, float]:
    """How well a stage-1 Q-Former pairs held-out images (N, L, encoder_dim) with their captions (N, T).

    - recall@1 image->text (text->image): the best-scoring caption (image) under ITC is right. A
      caption identical to the true one counts as right, and `recall_chance` is what a random
      ranking scores with these duplicates;
    - ITM accuracy: the matching head on the N true pairs and N wrong ones, balanced (chance 0.5),
      with wrong captions drawn at random (`itm_random`) or the wrong caption that ITC finds most
      similar to the image (`itm_hard`, the kind of negative ITM trains on).
    """
    qformer.eval()
    Nq, N = qformer.config.num_queries, image_feats.shape[0]
    sim = itc_similarity(qformer, image_feats, input_ids)  # (N images, N texts)
    same = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)  # (N, N): identical captions
    arange = torch.arange(N, device=sim.device)
    i2t = same[arange, sim.argmax(1)].float().mean().item()
    t2i = same[sim.argmax(0), arange].float().mean().item()

    def p_match(ids: torch.Tensor) -> torch.Tensor:
        return qformer.itm_head(qformer(image_feats, ids, "itm")[:, :Nq]).mean(1).softmax(-1)[:, 1]  # (N,)

    g = torch.Generator().manual_seed(0)
    random_neg = (arange + torch.randint(1, N, (N,), generator=g)) % N  # never the image's own index
    random_neg = torch.where(same[arange, random_neg], (random_neg + 1) % N, random_neg)
    hard_neg = sim.masked_fill(same, float("-inf")).argmax(1)
    pos = (p_match(input_ids) > 0.5).float().mean().item()
    itm = {name: (pos + (p_match(input_ids[neg]) <= 0.5).float().mean().item()) / 2
           for name, neg in (("itm_random", random_neg), ("itm_hard", hard_neg))}
    return {"recall@1 image->text": i2t, "recall@1 text->image": t2i, "recall_chance": same.float().mean().item(),
            "itm_random": itm["itm_random"], "itm_hard": itm["itm_hard"]}


# ----------------------------------------------------------------------------------------------
# The shipped checkpoints (scripts/train_qformer.py)
# ----------------------------------------------------------------------------------------------
STAGE1_CHECKPOINT = "qformer_stage1_scenes.safetensors"
CONNECTORS_CHECKPOINT = "connectors_scenes.safetensors"


def save_connectors(path, connectors: dict[str, nn.Module], kinds: dict[str, str], encoder_dim: int, lm_dim: int,
                    qformer_config: QFormerConfig, **metadata: str) -> None:
    """Several connectors in one safetensors file: each one's weights under "name.", and in the
    metadata what it takes to rebuild them (kinds, widths, the Q-Former config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"{name}.{k}": v.detach().contiguous() for name, c in connectors.items() for k, v in c.state_dict().items()}
    meta = {"kinds": json.dumps(kinds), "encoder_dim": str(encoder_dim), "lm_dim": str(lm_dim),
            "qformer_config": json.dumps(dataclasses.asdict(qformer_config)), **{k: str(v) for k, v in metadata.items()}}
    save_file(state, str(path), metadata=meta)


def load_connectors(path=CONNECTORS_CHECKPOINT) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The connectors saved by `save_connectors` (the shipped ones by default), frozen, in the
    saved order, with the file's metadata."""
    path = Path(path)
    if not path.exists() and (CHECKPOINTS / path.name).exists():
        path = CHECKPOINTS / path.name
    if not path.exists():
        raise FileNotFoundError(f"no connectors at {path}: run scripts/train_qformer.py")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "kinds" not in meta:
        raise ValueError(f"{path} was not written by save_connectors (no 'kinds' in its metadata)")
    state = load_file(str(path))
    config = QFormerConfig(**json.loads(meta["qformer_config"]))
    connectors = {}
    for name, kind in json.loads(meta["kinds"]).items():
        c = make_connector(kind, int(meta["encoder_dim"]), int(meta["lm_dim"]), config)
        load_state_dict_checked(c, {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}, source=f"{path} [{name}]")
        c.eval()
        for p in c.parameters():
            p.requires_grad_(False)
        connectors[name] = c
    return connectors, meta


def load_stage1_qformer(path=STAGE1_CHECKPOINT) -> tuple[QFormer, dict[str, str]]:
    """The shipped stage-1 Q-Former (with its text side and ITC/ITM/ITG heads), in eval mode."""
    return load_checkpoint(path, QFormer, QFormerConfig)
