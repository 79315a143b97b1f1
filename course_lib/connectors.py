"""Connectors: the trainable part between a frozen image encoder and a frozen language model.

- `VisualPrefixLM` (Frozen, Tsimpoukelli et al., 2021): the pooled image feature, mapped linearly
  to a few embeddings written into the LM's input where the text has <image> slots;
- `LinearConnector` (LLaVA, Liu et al., 2023) and `MlpConnector` (LLaVA-1.5, Liu et al., 2024):
  every image token becomes one LM token;
- `QFormerConnector` (BLIP-2 stage 2, Li et al., 2023, sec. 3.3): a Q-Former's queries and one
  linear projection, always `num_queries` tokens;
- `Connectors`: several of them side by side under one config, saved as one checkpoint.
Flamingo's own connector (resampler and gated cross-attention) is `course_lib.flamingo`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import Mlp
from .qformer import QFormer, QFormerConfig
from .utils import freeze


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




@dataclass
class ConnectorsConfig:
    """Several connectors compared side by side: name -> kind, and the widths they bridge."""

    kinds: dict[str, str] = field(default_factory=lambda: {"qformer": "qformer"})
    encoder_dim: int = 64
    lm_dim: int = 64
    qformer: QFormerConfig | dict | None = None  # needed by "qformer" connectors

    def __post_init__(self) -> None:
        if isinstance(self.qformer, dict):  # read back from a checkpoint's JSON
            self.qformer = QFormerConfig(**self.qformer)
        unknown = {k for k in self.kinds.values() if k not in CONNECTOR_KINDS}
        if unknown:
            raise ValueError(f"unknown connector kinds {sorted(unknown)}; known: {CONNECTOR_KINDS}")
        if "qformer" in self.kinds.values() and self.qformer is None:
            raise ValueError("a Q-Former connector needs ConnectorsConfig(qformer=QFormerConfig(...))")


class Connectors(nn.ModuleDict):
    """Connectors under their names (`connectors["mlp"]`), built from one config, so that one
    checkpoint (`course_lib.utils.save_checkpoint`) holds them all."""

    def __init__(self, config: ConnectorsConfig):
        c = config
        super().__init__({name: make_connector(kind, c.encoder_dim, c.lm_dim, c.qformer) for name, kind in c.kinds.items()})
        self.config = config

    def no_weight_decay(self) -> set[str]:
        return {f"{name}.{n}" for name, m in self.items() for n in getattr(m, "no_weight_decay", set)()}


class VisualPrefixLM(nn.Module):
    """Frozen (Tsimpoukelli et al., 2021): each image becomes `num_prefix` embeddings, a linear map
    of the vision encoder's pooled feature reshaped to (num_prefix, lm_dim), written into the
    LM's input where the text has `num_prefix` consecutive <image> tokens. The LM is unchanged.
    (Frozen also trains its vision encoder; here both connectors get the same frozen encoder.)
    """

    def __init__(self, lm: nn.Module, vision: nn.Module, image_token_id: int, num_prefix: int = 2):
        super().__init__()
        self.lm, self.vision = freeze(lm), freeze(vision)
        self.image_token_id, self.num_prefix = image_token_id, num_prefix
        self.lm_dim = lm.lm_head.in_features
        self.proj = nn.Linear(vision.norm.normalized_shape[0], num_prefix * self.lm_dim)

    def train(self, mode: bool = True) -> "VisualPrefixLM":
        super().train(mode)
        self.lm.eval(), self.vision.eval()
        return self

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None, features: torch.Tensor | None = None):
        """input_ids (B, T) with M * num_prefix <image> tokens per row; images (B, M, C, H, W) or
        the frozen encoder's features (B, M, N, Dv) -> logits (B, T, vocab)."""
        if (images is None) == (features is None):
            raise ValueError("pass exactly one of images (B, M, C, H, W) or features (B, M, N, D)")
        if features is None:
            with torch.no_grad():
                features = self.vision.forward_features(images.flatten(0, 1)).unflatten(0, images.shape[:2])
        B, M = features.shape[:2]
        slots = input_ids == self.image_token_id
        if (slots.sum(-1) != M * self.num_prefix).any():
            raise ValueError(
                f"each row needs {M * self.num_prefix} <image> tokens ({self.num_prefix} per image), "
                f"got {slots.sum(-1).tolist()}"
            )
        pooled = features[:, :, 0]  # (B, M, Dv): the encoder's CLS token
        prefix = self.proj(pooled).reshape(B, M * self.num_prefix, self.lm_dim)  # (B, M*n, D)
        x = self.lm.embed(input_ids)
        x = x.masked_scatter(slots[..., None], prefix.to(x.dtype))  # fills the slots in order
        return self.lm(inputs_embeds=x)
