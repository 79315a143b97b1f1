"""Masked image modeling on the course's scenes: the training step that `train.fit` runs for every
masked autoencoder (MAE, SimMIM, ConvNeXt V2's FCMAE), the mask samplings of MAE's ablation
(Table 1f), the encoder's token count, and the linear probe that measures a pretrained encoder
(MAE section 4).

The models and their losses live in the family modules (`course_lib.mae`, `course_lib.convnext`);
this module only trains and evaluates them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..mae import num_kept
from ..train import extract_features
from ..vit import ViT

Batch = tuple[torch.Tensor, ...]


# ----------------------------------------------------------------------------------------------
# Training: the loss_fn for fit
# ----------------------------------------------------------------------------------------------
def reconstruction_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, None]:
    """`fit`'s loss_fn for a masked autoencoder: its reconstruction loss on a batch of images.

    Every masked autoencoder of the course (`MAE`, `SimMIM`, `FCMAE`) returns (loss, pred, mask)
    from `model(images)` and draws its own random mask; labels, if the batch carries any, are not
    used, and there is no accuracy to count (None).
    """
    out = model(batch[0])
    if not isinstance(out, tuple) or len(out) != 3:
        raise TypeError(
            f"reconstruction_loss expects a masked autoencoder whose forward returns (loss, pred, mask), "
            f"got {type(model).__name__} returning {type(out).__name__}"
        )
    return out[0], None


def encoder_tokens(num_patches: int, mask_ratio: float, method: str) -> int:
    """Tokens one image sends through the encoder (CLS included): MAE 1 + K, SimMIM 1 + L."""
    if method == "mae":
        return 1 + num_kept(num_patches, mask_ratio)
    if method == "simmim":
        return 1 + num_patches
    raise ValueError(f"method must be 'mae' or 'simmim', got {method!r}")


# ----------------------------------------------------------------------------------------------
# MAE's ablation of mask sampling (Table 1f): block and grid masks as noise for random_masking
# ----------------------------------------------------------------------------------------------
def block_mask(
    grid: tuple[int, int], num_masked: int, min_block: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """BEiT's block-wise masking (Bao et al., 2022, Algorithm 1): hide random rectangles with
    aspect ratio in [0.3, 1/0.3] until about `num_masked` patches are hidden. -> (gh, gw) bool."""
    gh, gw = grid
    if not 0 <= num_masked <= gh * gw:
        raise ValueError(f"cannot hide {num_masked} patches of a {gh}x{gw} grid: use 0 to {gh * gw}")
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    for _ in range(100 * gh * gw):  # bounded: every accepted block adds at least one patch
        left = num_masked - int(mask.sum())
        if left <= 0:
            break
        r = torch.rand(3, generator=generator).tolist()
        area = min_block + r[0] * max(0, left - min_block) if left >= min_block else left
        aspect = math.exp(math.log(0.3) + r[1] * (math.log(1 / 0.3) - math.log(0.3)))
        h = max(1, min(gh, round(math.sqrt(area * aspect))))
        w = max(1, min(gw, round(math.sqrt(area / aspect))))
        top = int(r[2] * (gh - h + 1))
        leftmost = int(torch.randint(0, gw - w + 1, (1,), generator=generator))
        new = (~mask[top : top + h, leftmost : leftmost + w]).sum()
        if 0 < new <= left:
            mask[top : top + h, leftmost : leftmost + w] = True
    return mask


def grid_keep(grid: tuple[int, int], mask_ratio: float) -> torch.Tensor:
    """MAE's grid sampling (Figure 6): keep one patch in every s x s cell, with s chosen so that
    1 - 1/s^2 = mask_ratio (0.75 -> s = 2). -> (gh, gw) bool, True = visible."""
    s = round(1 / math.sqrt(1 - mask_ratio))
    if s < 2 or abs((1 - 1 / s**2) - mask_ratio) > 1e-6:
        raise ValueError(
            f"grid masking keeps one patch per s x s cell, so its mask ratio is 1 - 1/s^2 "
            f"(0.75, 0.889, 0.9375, ...), got {mask_ratio}"
        )
    gh, gw = grid
    if gh % s or gw % s:
        raise ValueError(f"grid masking with {s}x{s} cells needs a patch grid divisible by {s}, got {gh}x{gw}")
    keep = torch.zeros(gh, gw, dtype=torch.bool)
    keep[::s, ::s] = True
    return keep


def masking_noise(
    strategy: str, batch: int, grid: tuple[int, int], mask_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Noise (B, gh*gw) for `random_masking` that realises one of MAE's mask samplings (Table 1f):
    "random" (uniform), "block" (BEiT rectangles) or "grid" (a regular lattice).

    Structured strategies give the patches to hide noise >= 1 and the others noise < 1, so
    `random_masking` hides exactly them (and keeps its fixed K, padding at random if needed).
    """
    gh, gw = grid
    L = gh * gw
    keep = num_kept(L, mask_ratio)
    jitter = torch.rand(batch, L, generator=generator)
    if strategy == "random":
        return jitter
    if strategy == "block":
        hidden = torch.stack([block_mask(grid, L - keep, generator=generator).flatten() for _ in range(batch)])
    elif strategy == "grid":
        hidden = ~grid_keep(grid, mask_ratio).flatten().expand(batch, L)
    else:
        raise ValueError(f"unknown masking strategy {strategy!r}: use 'random', 'block' or 'grid'")
    return hidden.float() + 0.5 * jitter


# ----------------------------------------------------------------------------------------------
# Evaluating the pretrained encoder: a linear probe
# ----------------------------------------------------------------------------------------------
def cls_and_mean(tokens: torch.Tensor) -> torch.Tensor:
    """An encoder's tokens (B, 1 + L, D) -> [CLS, mean of the patch tokens] (B, 2D)."""
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)


def probe_features(encoder: ViT, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Frozen features of full (unmasked) images for the probe: [CLS, mean of patch tokens] -> (B, 2D).

    Runs through `train.extract_features` (batched, no gradients, eval mode, mode restored).
    """
    if not isinstance(encoder, ViT):
        raise TypeError(f"probe_features expects the ViT encoder (e.g. mae_model.encoder), got {type(encoder).__name__}")
    return extract_features(lambda x: cls_and_mean(encoder.forward_features(x)), images, batch_size, model=encoder)


def linear_probe(
    train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], weight_decay: float = 1e-3, steps: int = 100
) -> float:
    """Test accuracy of a softmax regression on frozen, standardized features (MAE section 4).

    train/test: (features (N, F), labels (N,)). Full-batch L-BFGS from zero weights: the same
    numbers on every run, and a second or two on a CPU.
    """
    (f_train, y_train), (f_test, y_test) = train, test
    for name, (f, y) in (("train", train), ("test", test)):
        if f.ndim != 2 or y.ndim != 1 or f.shape[0] != y.shape[0] or f.shape[0] == 0:
            raise ValueError(
                f"linear_probe's {name} must be (features (N, F), labels (N,)) with N > 0, got {tuple(f.shape)} and {tuple(y.shape)}"
            )
    if f_train.shape[1] != f_test.shape[1]:
        raise ValueError(f"train and test features differ in width: {f_train.shape[1]} vs {f_test.shape[1]}")
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6  # the paper puts a BatchNorm before the probe
    a, b = (f_train - mean) / std, (f_test - mean) / std
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    weight = torch.zeros(a.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ weight + bias, y_train) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((b @ weight + bias).argmax(-1) == y_test).float().mean().item()
