"""LoRA: low-rank adaptation of a frozen linear layer (Hu et al., 2022).

Fine-tuning changes a weight W (out, in) by some update. LoRA bets that the update has low rank
and trains it in factored form, W' = W + (alpha / r) B A with A (r, in) and B (out, r): per
layer r (in + out) numbers instead of in * out. B starts at zero, so the wrapped layer starts
exactly as the pretrained one (sec. 4.1); A starts random (Kaiming-uniform, as in `peft`). After
training, `merge_lora` folds B A into W: the model has its original shape and no extra cost.

`LoRALinear` wraps one `nn.Linear`; `apply_lora(model, target_names, r, alpha)` wraps every
linear layer whose name ends with one of `target_names` and freezes everything else, which is
what `peft.get_peft_model(model, LoraConfig(target_modules=..., r=..., lora_alpha=...))` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def lora_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """x W^T + b + scaling * x A^T B^T (LoRA eq. 3), without forming the (out, in) update.

    x: (..., in), weight: (out, in), bias: (out,) or None, lora_A: (r, in), lora_B: (out, r).
    Returns (..., out)."""
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_A), lora_B)


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B A: (out, in), the weight of the merged layer."""
    return weight + scaling * (lora_B @ lora_A)


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (`base`) plus a trainable rank-r update (`lora_A`, `lora_B`)."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRA wraps nn.Linear layers, got {type(base).__name__}")
        if not 1 <= r <= min(base.in_features, base.out_features):
            raise ValueError(
                f"rank r={r} must be between 1 and min(in, out) = {min(base.in_features, base.out_features)} "
                f"for a {base.in_features} -> {base.out_features} layer"
            )
        self.base, self.r, self.alpha = base, r, alpha
        self.scaling = alpha / r
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling)

    def merge(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha / r) B A: the same outputs, no extra matmuls."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        merged = merged.to(self.base.weight)
        with torch.no_grad():
            merged.weight.copy_(merged_weight(self.base.weight, self.lora_A, self.lora_B, self.scaling))
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, target_names: Sequence[str], r: int = 8, alpha: float = 16.0) -> nn.Module:
    """Wrap every nn.Linear whose name is or ends with one of `target_names` (e.g. "qkv",
    "attn.proj") in a LoRALinear, and freeze every other parameter. In place; returns the model.

    Raises a ValueError when no layer matches (a typo would otherwise train nothing)."""
    if isinstance(target_names, str):
        target_names = [target_names]
    names = [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in target_names)
    ]
    if not names:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no linear layer matches {list(target_names)}; the model's linear layers end with {linears}")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        _set_submodule(model, n, LoRALinear(model.get_submodule(n), r, alpha))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear of `model` by its merged nn.Linear (in place); returns the model."""
    for n, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _set_submodule(model, n, m.merge())
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA factors of `model` (what an optimizer trains after `apply_lora`)."""
    return [p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))]
