"""A tiny causal language model and a tiny image encoder for the scenes data, shipped frozen.

BLIP-2 (Li et al., 2023) and Flamingo (Alayrac et al., 2022) connect a *frozen* image encoder to a
*frozen* language model and train only the part in between. Lectures 07 and 08 do the same at a
size that trains on a laptop CPU:

- `build_tokenizer()`: a word-level tokenizer over the scenes vocabulary (built in code, nothing
  to download), with the special tokens <pad>, <bos>, <eos> and <image> (Flamingo's marker).
- `TinyLM`: a GPT-style decoder (token + learned position embeddings, pre-norm blocks from
  `course_lib.layers` under a causal mask, a final norm and a linear head) trained on scenes
  captions and "question answer" texts. It never sees an image: whatever it knows about a
  particular image has to come through the connector.
- `load_frozen_lm()`, `load_frozen_image_encoder()`: the checkpoints written by
  scripts/train_vlm_parts.py, in eval mode with requires_grad False.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .layers import Block, causal_mask
from .utils import freeze

LM_CHECKPOINT = "tinylm_scenes.safetensors"
IMAGE_ENCODER_CHECKPOINT = "image_encoder_scenes.safetensors"


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
# Every word the scenes generator writes (course_lib/data.py: _caption, _where, _questions).
_TEMPLATE_WORDS = (
    "a an and at the on in of is are there what where how many shape shapes color object "
    "large small background plain striped checkered noisy center yes no , ?"
)


class WordTokenizer:
    """Words and punctuation -> ids. Unknown words raise a ValueError that names them, so that a
    typo in a prompt is caught instead of silently becoming <unk>."""

    specials = ("<pad>", "<bos>", "<eos>", "<image>")

    def __init__(self, words: Sequence[str]):
        self.vocab = list(self.specials) + sorted(set(words) - set(self.specials))
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.image_id = range(4)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    @staticmethod
    def split(text: str) -> list[str]:
        """"a red circle, on <image>" -> ["a", "red", "circle", ",", "on", "<image>"]."""
        return re.findall(r"<[a-z]+>|[a-z0-9]+|[^\sa-z0-9]", text.lower())

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        words = self.split(text)
        unknown = sorted({w for w in words if w not in self.ids})
        if unknown:
            raise ValueError(f"words not in the scenes vocabulary: {unknown}; known words: {self.vocab[4:]}")
        return [self.bos_id] * bos + [self.ids[w] for w in words] + [self.eos_id] * eos

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Ids -> text; stops at the first <eos>. Punctuation is glued to the word before it."""
        words = []
        for i in [int(i) for i in ids]:
            if i == self.eos_id and skip_special:
                break
            if i < len(self.specials) and skip_special:
                continue
            words.append(self.vocab[i])
        return re.sub(r" ([,?])", r"\1", " ".join(words))


def build_tokenizer() -> WordTokenizer:
    """The tokenizer of lectures 07 and 08: every word of the scenes captions, questions, answers."""
    words = set(_TEMPLATE_WORDS.split()) | set(data.SHAPES) | set(data.COLORS) | set(data.NUMBERS)
    words |= {w for p in data.POSITIONS for w in p.split()}
    return WordTokenizer(sorted(words))


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> torch.Tensor:
    """Right-pad lists of ids to one (B, length) tensor (length defaults to the longest)."""
    length = length or max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        s = list(s)[:length]
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


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
        new, done = [], torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(max_new_tokens):
            next_id = self(inputs_embeds=x)[:, -1].argmax(-1)  # (B,)
            if eos_id is not None:
                next_id = torch.where(done, torch.full_like(next_id, eos_id), next_id)
                done |= next_id == eos_id
            new.append(next_id)
            x = torch.cat([x, self.embed(next_id[:, None])], dim=1)
            if eos_id is not None and bool(done.all()):
                break
        return torch.stack(new, dim=1)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) at position t predict targets[:, t+1].

    Positions whose target is `ignore_index` (padding, prompt tokens) do not count.
    """
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), ignore_index=ignore_index)


def scene_texts(ds) -> list[str]:
    """The LM's training texts for a scenes dataset: every caption and every "question answer"."""
    texts = list(ds["caption"])
    for qs, ans in zip(ds["questions"], ds["answers"]):
        texts += [f"{q} {a}" for q, a in zip(qs, ans)]
    return texts


def tinylm(vocab_size: int, **kw) -> TinyLM:
    """The shipped size: width 64, 2 blocks, 2 heads (about 0.1 M parameters, 0.5 MB in fp32)."""
    return TinyLM(TinyLMConfig(vocab_size=vocab_size, **kw))


# ----------------------------------------------------------------------------------------------
# The frozen parts
# ----------------------------------------------------------------------------------------------
def load_frozen_lm(path=LM_CHECKPOINT) -> TinyLM:
    """The shipped TinyLM (trained by scripts/train_vlm_parts.py), frozen."""
    from .utils import load_checkpoint

    model, _ = load_checkpoint(path, TinyLM, TinyLMConfig)
    return freeze(model)


def load_frozen_image_encoder(path=IMAGE_ENCODER_CHECKPOINT):
    """The shipped ViT image encoder (patch 8 on 32x32 scenes, width 64, no head), frozen.

    `encoder.forward_features(images)` gives (B, 1 + 16, 64): the CLS token and 4x4 patch tokens,
    trained to carry the shape, colour and position of every object and their count.
    """
    from .utils import load_checkpoint
    from .vit import ViT, ViTConfig

    model, _ = load_checkpoint(path, ViT, ViTConfig)
    return freeze(model)
