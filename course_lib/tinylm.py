"""A tiny causal language model for the scenes data, shipped frozen.

BLIP-2 (Li et al., 2023) and Flamingo (Alayrac et al., 2022) connect a *frozen* image encoder to a
*frozen* language model and train only the part in between. Lectures 07 and 08 do the same at a
size that trains on a laptop CPU:

- `TinyLM`: a GPT-style decoder (token + learned position embeddings, pre-norm blocks from
  `course_lib.layers` under a causal mask, a final norm and a linear head) trained on scenes
  captions and "question answer" texts. It never sees an image: whatever it knows about a
  particular image has to come through the connector.

Its tokenizer, training texts and the shipped frozen checkpoints are in `course_lib.recipes.text`
and `course_lib.recipes.vlm` (scripts/train_vlm_parts.py trains them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Block, causal_mask, greedy_decode


# ----------------------------------------------------------------------------------------------
# The language model
# ----------------------------------------------------------------------------------------------
@dataclass
class TinyLMConfig:
    vocab_size: int = 64
    max_len: int = 80  # positions, soft-prompt tokens included
    dim: int = 64
    depth: int = 2
    num_heads: int = 2
    mlp_ratio: float = 4.0
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.max_len < 1 or self.depth < 1:
            raise ValueError(f"vocab_size, max_len and depth must be positive, got {self.vocab_size}, {self.max_len}, {self.depth}")
        if self.dim % self.num_heads != 0:
            raise ValueError(f"width {self.dim} is not divisible by {self.num_heads} heads: pick a head count that divides it")


class TinyLM(nn.Module):
    """A GPT-style decoder: logits for the next token at every position.

    `embed` gives token embeddings only; `forward` adds the position embeddings, so a connector
    can put its soft prompt (B, N, D) in front of the text embeddings and call
    `forward(inputs_embeds=torch.cat([prompt, lm.embed(ids)], 1))`.
    """

    def __init__(self, config: TinyLMConfig):
        super().__init__()
        self.config = c = config
        self.tok_embed = nn.Embedding(c.vocab_size, c.dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.max_len, c.dim))
        self.blocks = nn.ModuleList(Block(c.dim, c.num_heads, int(c.dim * c.mlp_ratio), eps=c.eps) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=c.eps)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        for p in self.parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "tok_embed.weight"}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> token embeddings (B, T, D), without positions."""
        if input_ids.numel() and (int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0):
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}), got {int(input_ids.min())}..{int(input_ids.max())}: "
                "encode with the tokenizer the model was built for (vocab_size=tokenizer.vocab_size)"
            )
        return self.tok_embed(input_ids)

    def add_positions(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) + learned positions 0..T-1."""
        T = x.shape[1]
        if T > self.config.max_len:
            raise ValueError(
                f"sequence of {T} tokens is longer than the model's {self.config.max_len} positions: "
                "shorten the prompt (fewer soft-prompt tokens) or the text"
            )
        return x + self.pos_embed[:, :T]

    def forward_hidden(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, D)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, D)")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        x = self.add_positions(x)
        mask = causal_mask(x.shape[1], device=x.device)  # (T, T): token t sees tokens <= t
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size) from ids (B, T) or embeddings (B, T, D)."""
        return self.lm_head(self.forward_hidden(input_ids, inputs_embeds))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        eos_id: int | None = 2,
    ) -> torch.Tensor:
        """Greedy decoding: the new token ids (B, <= max_new_tokens), stopping when every row has
        produced `eos_id`; rows that finished early are filled with `eos_id`.

        The prompt is either ids or embeddings (a soft prompt followed by text embeddings); the
        whole sequence is recomputed at every step (no key/value cache: the model is tiny).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, D)")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        return greedy_decode(lambda e: self(inputs_embeds=e)[:, -1], self.embed, x, max_new_tokens, eos_id)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) at position t predict targets[:, t+1].

    Positions whose target is `ignore_index` (padding, prompt tokens) do not count.
    """
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), ignore_index=ignore_index)


def tinylm(vocab_size: int, **kw) -> TinyLM:
    """The shipped size: width 64, 2 blocks, 2 heads (about 0.1 M parameters, 0.5 MB in fp32)."""
    return TinyLM(TinyLMConfig(vocab_size=vocab_size, **kw))
