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
projection learn. `course_lib.connectors` holds the connector modules (the Q-Former with its
projection, and the simpler ones it is compared with).

The layer follows the BERT-style post-norm of the official code and of transformers'
`Blip2QFormerModel`: x = LN(x + sublayer(x)); cross-attention to the image every
`cross_attention_freq` layers (BLIP-2 uses 2), and separate feed-forward weights for queries and text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .hf import cfg, fuse_qkv, load_hf_checkpoint, rename_keys
from .layers import Attention, Mlp, load_state_dict_checked


# ----------------------------------------------------------------------------------------------
# The three self-attention masks (BLIP-2 fig. 2, right). Boolean (L, L), True = may attend;
# the sequence is [num_queries queries, text_len text tokens].
# ----------------------------------------------------------------------------------------------
def _check_lengths(num_queries: int, text_len: int) -> None:
    if num_queries < 1 or text_len < 0:
        raise ValueError(f"a mask needs at least one query and a text length >= 0, got {num_queries} and {text_len}")


def itc_mask(num_queries: int, text_len: int) -> torch.Tensor:
    """Uni-modal mask for contrastive learning: queries see queries, text sees text, so neither
    can copy the answer from the other."""
    _check_lengths(num_queries, text_len)
    L = num_queries + text_len
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[:num_queries, :num_queries] = True
    mask[num_queries:, num_queries:] = True
    return mask


def itm_mask(num_queries: int, text_len: int) -> torch.Tensor:
    """Bi-directional mask for matching: every token sees every token, so the query outputs can
    compare the image with the whole text."""
    _check_lengths(num_queries, text_len)
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
    if mask.ndim != 2 or num_queries < 1:
        raise ValueError(f"the mask {tuple(mask.shape)} does not cover the queries and the {T} text tokens: build it for this text length")
    keys = torch.cat([text_keep.new_ones(B, num_queries), text_keep], dim=1)  # (B, L)
    return mask.to(text_keep.device)[None, None] & keys[:, None, None, :]


# ----------------------------------------------------------------------------------------------
# The losses of stage 1
# ----------------------------------------------------------------------------------------------
def max_query_similarity(query_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """ITC similarity (BLIP-2 sec. 3.2): cosine similarity of every query with the text, then the
    best query. query_feats (Bi, Nq, E), text_feats (Bt, E) -> (Bi, Bt)."""
    if query_feats.ndim != 3 or text_feats.ndim != 2 or query_feats.shape[-1] != text_feats.shape[-1]:
        raise ValueError(
            f"expected query features (images, queries, E) and text features (texts, E) of one width E, got "
            f"{tuple(query_feats.shape)} and {tuple(text_feats.shape)}: project both with vision_proj and text_proj"
        )
    q = F.normalize(query_feats, dim=-1)
    t = F.normalize(text_feats, dim=-1)
    sims = torch.einsum("iqe,te->itq", q, t)  # (Bi, Bt, Nq)
    return sims.max(dim=-1).values


def itc_loss(similarity: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE on an (N, N) similarity matrix whose diagonal holds the true pairs."""
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"itc_loss needs a square (N, N) similarity of N pairs, got {tuple(similarity.shape)}")
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


def itg_loss(logits: torch.Tensor, input_ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Image-grounded text generation: the text token at position t predicts the token at t+1
    (a language model's loss). logits (B, T, V), input_ids (B, T); padding predicts nothing."""
    targets = input_ids[:, 1:].masked_fill(input_ids[:, 1:] == pad_id, -100)  # (B, T-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


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
        if min(self.dim, self.depth, self.num_heads, self.mlp_dim, self.encoder_dim) < 1:
            raise ValueError("dim, depth, num_heads, mlp_dim and encoder_dim must all be positive")
        if self.dim % self.num_heads != 0:
            raise ValueError(f"width {self.dim} is not divisible by {self.num_heads} heads: pick a head count that divides it")


class QFormerLayer(nn.Module):
    """Self-attention over [queries, text]; cross-attention of the queries to the image (in some
    layers); a feed-forward for the queries and another for the text. Post-norm, as BERT."""

    def __init__(self, c: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        self.attn = Attention(c.dim, c.num_heads)
        self.norm_self = nn.LayerNorm(c.dim, eps=c.eps)
        self.cross_attn = Attention(c.dim, c.num_heads, context_dim=c.encoder_dim) if has_cross_attention else None
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
            if image_feats.shape[-1] != self.cross_attn.k.in_features:
                raise ValueError(
                    f"image features have width {image_feats.shape[-1]}, the Q-Former expects {self.cross_attn.k.in_features}: "
                    "set QFormerConfig(encoder_dim=...) to the image encoder's width"
                )
            c, weights = self.cross_attn(q, image_feats, return_weights=return_weights)
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
        if image_feats is not None and image_feats.ndim != 3:
            raise ValueError(f"image features must be (batch, tokens, encoder_dim), got {tuple(image_feats.shape)}")
        if image_feats is None and input_ids is None:
            raise ValueError("pass image features (B, N, encoder_dim), text ids (B, T), or both")
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
        itg = itg_loss(self.lm_head(h_itg), input_ids)
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


def query_transformer(qformer: QFormer) -> QFormer:
    """The part of a stage-1 Q-Former that stage 2 keeps: the queries and their path through the
    layers (self-attention, cross-attention, query feed-forward), without the text embeddings, the
    text feed-forward and the stage-1 heads, which stage 2 never runs (BLIP-2 fig. 3)."""
    bare = QFormer(dataclasses.replace(qformer.config, vocab_size=0, text_ffn=False))
    keep = bare.state_dict().keys()
    bare.load_state_dict({k: v for k, v in qformer.state_dict().items() if k in keep})
    return bare
