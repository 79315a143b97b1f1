"""A decoder-only language model in the style of LLaMA (Touvron et al., 2023), the kind of LM that
LLaVA (Liu et al., 2023) puts behind its vision encoder and connector.

Three changes to the GPT-2 decoder of `tinylm.py`, each a small pure function or module here:
- RMSNorm instead of LayerNorm (Zhang and Sennrich, 2019): rescale by the root mean square, no
  mean subtraction, no bias.
- Rotary position embeddings (RoPE, Su et al., 2021) instead of a learned position table: queries
  and keys are rotated by an angle proportional to their position, so q.k depends only on the
  distance between the two tokens. `rotary_embedding(positions)` returns the `rotary(q, k)`
  function that the shared `layers.Attention` applies to its split heads.
- The SwiGLU feed-forward network (Shazeer, 2020): down(silu(gate(x)) * up(x)).

Causal attention is the shared `layers.Attention` (no biases). Generation keeps the keys and
values of earlier tokens in a `KVCache`, so each new token costs one position of work instead of
re-running the whole sequence. `Llama.from_hf` loads `transformers`' LlamaForCausalLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .hf import cfg, load_hf_checkpoint, rename_keys
from .layers import Attention, causal_mask, greedy_decode, load_state_dict_checked


@dataclass
class LlamaConfig:
    vocab_size: int = 64
    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 172  # LLaMA: about 8/3 of the width (SwiGLU has three matrices instead of two)
    rope_theta: float = 10000.0
    eps: float = 1e-6
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.num_heads != 0 or (self.dim // self.num_heads) % 2 != 0:
            raise ValueError(
                f"width {self.dim} with {self.num_heads} heads: each head needs an even width for the "
                "rotary embedding (pairs of channels are rotated); choose dim divisible by 2 * num_heads"
            )


# ----------------------------------------------------------------------------------------------
# The three building blocks
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (LLaMA's pre-norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (..., d): [x1, x2] -> [-x2, x1] with x1, x2 the two halves of the channels.

    Channel i is paired with channel i + d/2 (the "half" layout of the LLaMA checkpoints in
    transformers), and each pair is rotated like a complex number by `apply_rotary`."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE angles (Su et al., 2021, eq. 34): pair i turns by position * theta^(-2i/d).

    positions: (L,) integer positions. Returns cos, sin of shape (L, head_dim), each angle
    repeated for the two channels of its pair (the half layout of `rotate_half`)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (L, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, d)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate every channel pair of x (B, heads, L, d) by its angle: x cos + rotate_half(x) sin."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def rotary_embedding(positions: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """The `rotary(q, k) -> (q, k)` function that `layers.Attention` applies to its split heads.

    Rotating q at position m and k at position n makes q.k a function of m - n only: attention
    sees relative positions, and a cached key never needs recomputing."""
    cos, sin = rotary_cos_sin(positions, head_dim, theta)

    def rotary(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    return rotary


class SwiGLU(nn.Module):
    """The gated feed-forward network of LLaMA (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden_dim, bias=False)
        self.up = nn.Linear(dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------
class LayerCache:
    """Keys and values of one attention layer for the tokens seen so far."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's k, v (B, heads, L, d); return all of them (B, heads, past + L, d)."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache:
    """One `LayerCache` per block, and the number of positions already cached."""

    def __init__(self, depth: int):
        self.layers = [LayerCache() for _ in range(depth)]

    @property
    def length(self) -> int:
        k = self.layers[0].k
        return 0 if k is None else k.shape[2]


def causal_mask_with_past(length: int, past: int, device=None) -> torch.Tensor | None:
    """(L, past + L) boolean: new token i (at position past + i) sees every cached token and the
    new tokens up to itself. None when L == 1 (one new token may see everything)."""
    if length == 1:
        return None
    mask = causal_mask(length, device=device)  # (L, L)
    return torch.cat([mask.new_ones(length, past), mask], dim=1)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class LlamaBlock(nn.Module):
    """x + Attn(RMSNorm(x)) with RoPE and a causal mask, then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.dim, c.eps)
        self.attn = Attention(c.dim, c.num_heads, qkv_bias=False, proj_bias=False)
        self.mlp_norm = RMSNorm(c.dim, c.eps)
        self.mlp = SwiGLU(c.dim, c.mlp_dim)

    def forward(self, x: torch.Tensor, mask=None, rotary=None, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask=mask, rotary=rotary, cache=cache)[0]
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Token embeddings, `depth` LlamaBlocks, a final RMSNorm and the LM head.

    `forward` takes ids (B, T) or embeddings (B, T, D): a vision-language model splices image
    features into the embeddings (`embed`) and passes them in as `inputs_embeds`."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = c = config
        self.tok_embed = nn.Embedding(c.vocab_size, c.dim)
        self.blocks = nn.ModuleList(LlamaBlock(c) for _ in range(c.depth))
        self.norm = RMSNorm(c.dim, c.eps)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        for p in self.parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, std=0.02)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight

    def no_weight_decay(self) -> set[str]:
        return {"tok_embed.weight"}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> embeddings (B, T, D); RoPE adds positions inside attention."""
        return self.tok_embed(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size). With a cache, only the new tokens are passed and
        their keys and values are appended to it."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, D)")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        past = cache.length if cache is not None else 0
        T = x.shape[1]
        positions = torch.arange(past, past + T, device=x.device)
        rotary = rotary_embedding(positions, self.config.dim // self.config.num_heads, self.config.rope_theta)
        mask = causal_mask_with_past(T, past, device=x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, rotary, cache.layers[i] if cache is not None else None)
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        eos_id: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Greedy decoding of the prompt (ids (B, T) or embeddings (B, T, D), no padding):
        the new ids (B, <= max_new_tokens), stopping when every row has produced `eos_id`;
        rows that finished early are filled with `eos_id`. Without the cache, the whole
        sequence is recomputed at every step (the same tokens, more work)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, D)")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        cache = KVCache(self.config.depth) if use_cache else None
        return greedy_decode(lambda e: self(inputs_embeds=e, cache=cache)[:, -1], self.embed, x,
                             max_new_tokens, eos_id, incremental=use_cache)

    @classmethod
    def from_hf(cls, source, **overrides) -> "Llama":
        """Load a `transformers` LlamaForCausalLM: a model instance (offline), a save_pretrained
        folder, or a hub id (online)."""
        hf_config, state = load_hf_checkpoint(source)
        model = cls(config_from_hf(hf_config, **overrides))
        name = source if isinstance(source, str) else type(source).__name__
        load_state_dict_checked(model, convert_hf_state_dict(state, model.config), source=str(name))
        return model


# ----------------------------------------------------------------------------------------------
# transformers checkpoints
# ----------------------------------------------------------------------------------------------
def config_from_hf(hf_config, **overrides) -> LlamaConfig:
    """A transformers LlamaConfig (or its config.json) -> LlamaConfig."""
    if cfg(hf_config, "model_type") != "llama":
        raise ValueError(f"Llama.from_hf reads LlamaForCausalLM checkpoints, got model_type {cfg(hf_config, 'model_type')!r}")
    heads = cfg(hf_config, "num_attention_heads")
    dim = cfg(hf_config, "hidden_size")
    if cfg(hf_config, "num_key_value_heads", heads) != heads:
        raise NotImplementedError(
            "grouped-query attention (num_key_value_heads < num_attention_heads) is not implemented: "
            "course_lib's Llama uses one key and value head per query head"
        )
    if cfg(hf_config, "head_dim", dim // heads) != dim // heads:
        raise NotImplementedError("a head width other than hidden_size / num_attention_heads is not supported")
    if cfg(hf_config, "attention_bias", False) or cfg(hf_config, "mlp_bias", False):
        raise NotImplementedError("attention or MLP biases are not supported (LLaMA has none)")
    # transformers 5 keeps theta and the scaling type in `rope_parameters` (4.x: `rope_scaling`).
    rope = cfg(hf_config, "rope_parameters", None) or cfg(hf_config, "rope_scaling", None) or {}
    rope = rope if isinstance(rope, dict) else vars(rope)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise NotImplementedError(f"RoPE scaling {rope.get('rope_type')!r} is not supported, only the default RoPE")
    kwargs = dict(
        vocab_size=cfg(hf_config, "vocab_size"),
        dim=dim,
        depth=cfg(hf_config, "num_hidden_layers"),
        num_heads=heads,
        mlp_dim=cfg(hf_config, "intermediate_size"),
        rope_theta=float(rope.get("rope_theta", cfg(hf_config, "rope_theta", 10000.0))),
        eps=cfg(hf_config, "rms_norm_eps", 1e-6),
        tie_embeddings=bool(cfg(hf_config, "tie_word_embeddings", False)),
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


# In memory and on disk transformers 5 writes `model.layers.N...`; LLaVA checkpoints nest the
# language model as `language_model.model.layers` (disk) or `model.language_model.layers` (memory).
_HF_RULES = [
    (r"^(model\.)?(language_model\.)?(model\.)?", ""),
    (r"^embed_tokens\.", "tok_embed."),
    (r"^layers\.", "blocks."),
    (r"\.self_attn\.(q|k|v)_proj\.", r".attn.\1."),
    (r"\.self_attn\.o_proj\.", ".attn.proj."),
    (r"\.mlp\.(gate|up|down)_proj\.", r".mlp.\1."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".mlp_norm."),
]


def convert_hf_state_dict(state: dict[str, torch.Tensor], config: LlamaConfig) -> dict[str, torch.Tensor]:
    """transformers Llama names -> course_lib names; q, k, v fused into one `qkv` matrix."""
    out = rename_keys({k: v for k, v in state.items() if "rotary_emb" not in k}, _HF_RULES)
    for i in range(config.depth):
        p = f"blocks.{i}.attn"
        if f"{p}.q.weight" in out:
            out[f"{p}.qkv.weight"] = torch.cat([out.pop(f"{p}.{n}.weight") for n in "qkv"], dim=0)
    if config.tie_embeddings:
        out.setdefault("lm_head.weight", out["tok_embed.weight"])
    return out


def llama_tiny(vocab_size: int, **kw) -> Llama:
    """A CPU-sized LLaMA: width 64, 2 blocks, 4 heads (about 0.1 M parameters + embeddings)."""
    return Llama(LlamaConfig(vocab_size=vocab_size, **kw))
