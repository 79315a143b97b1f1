"""Lecture 02's experiments. Two measurements of the mechanism: the cost of global and windowed
attention (Swin eq. 1-2) and which tokens exchange information in one (shifted-)window layer
(Swin Figure 2). Then experiments on the scenes: a ViT and a Swin at the same patch size, a toy
version of Swin's Table 4 (shifted windows and relative position bias switched off one at a time),
and Swin V2's activation-amplitude argument for residual post-norm (V2 section 3.1, Figure 2).
The model and its pure functions live in `course_lib.swin`; this module measures them.

`scripts/sweep_swin.py` trains every point with several seeds and writes
`course_lib/checkpoints/swin_sweep.json`; the plan is for lecture 02 to load that file and re-run
one point live with `train_point`, so that the notebook and the script share every setting below.

Measured (3 seeds, 2026-11-29): with `SETTING` below (375 steps of batch 32) every Swin variant
and both deep stacks stay at chance (train accuracy about 21 %, the three Table 4 rows identical to
three decimals): the models have not started learning, so nothing can be read from them. A pilot
of the full Swin (seed 0, same data, 30 epochs = 1,410 steps) shows a long plateau: the training
loss stays at ln 5 = 1.609 for ~800 steps with lr 2e-3 or 5e-4 alike, and after 1,410 steps it is
1.51, test accuracy 32.2 % (lr 2e-3) / 32.4 % (lr 5e-4), train 31 % / 30 %. So the schedule must
be far longer, or the plateau's cause (not the learning rate) found, before the sweep can show
Table 4's effects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import data
from ..swin import Swin, SwinConfig, cyclic_shift, shifted_window_mask, window_partition
from ..train import History, fit
from ..utils import CHECKPOINTS, seed_everything
from ..vit import ViT, ViTConfig


def attention_flops(H: int, W: int, C: int, window_size: int | None = None) -> int:
    """Multiply-adds of one attention layer on an H x W map of width C (Swin eq. 1-2):
    global 4hwC^2 + 2(hw)^2 C; windowed 4hwC^2 + 2 M^2 hw C."""
    hw = H * W
    mixing = 2 * hw * hw * C if window_size is None else 2 * window_size**2 * hw * C
    return 4 * hw * C * C + mixing


def window_connectivity(H: int, W: int, window_size: int, shift: int) -> torch.Tensor:
    """Which tokens exchange information in one (shifted-)window attention layer.

    Returns a boolean (H*W, H*W), tokens numbered row-major on the original (unshifted) map:
    entry [i, j] is True when token i attends to token j (same window, same mask region).
    H and W must be multiples of the window.
    """
    M = window_size
    ids = cyclic_shift(torch.arange(H * W).reshape(1, H, W, 1), shift)  # where each token lands
    members = window_partition(ids, M).reshape(-1, M * M)  # (nW, M*M) original token ids
    mask = shifted_window_mask(H, W, M, shift)  # (nW, M*M, M*M)
    rows = members[:, :, None].expand_as(mask)
    cols = members[:, None, :].expand_as(mask)
    A = torch.zeros(H * W, H * W, dtype=torch.bool)
    A[rows[mask], cols[mask]] = True
    return A


RESULTS = CHECKPOINTS / "swin_sweep.json"

# Both models read 2x2-pixel patches of the 32x32 scenes: 256 tokens, 5 classes (chance 20 %).
SWIN_CONFIG = SwinConfig(image_size=32, patch_size=2, num_classes=len(data.SHAPES), embed_dim=32, depths=(2, 2),
                         num_heads=(2, 4), window_size=4, mlp_ratio=2.0)
VIT_CONFIG = ViTConfig(image_size=32, patch_size=2, num_classes=len(data.SHAPES), dim=64, depth=3, num_heads=2,
                       mlp_ratio=2.0)


@dataclass(frozen=True)
class Setting:
    """What one training run uses: data sizes and `fit`'s arguments."""

    train_images: int = 1500
    test_images: int = 500
    max_objects: int = 1
    epochs: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: float = 0.1
    fit_kwargs: dict = field(default_factory=dict)


SETTING = Setting()

# The rows of the toy Table 4: (shifted windows?, relative position bias?).
VARIANTS: dict[str, tuple[bool, bool]] = {
    "shifted windows, rel. pos.": (True, True),
    "w/o shifting": (False, True),
    "no pos.": (True, False),
}


def build_swin(shift: bool = True, relative_bias: bool = True, config: SwinConfig = SWIN_CONFIG) -> Swin:
    """The course's small Swin with Table 4's switches.

    shift=False sets every block's shift to 0 (all blocks use regular windows, the paper's
    "w/o shifting"); relative_bias=False zeroes and freezes every bias table ("no pos.": Swin has
    no absolute position embedding, so the model then knows positions only through the order of
    the pixels inside a patch and of the four neighbours that patch merging concatenates).
    """
    if config.version != 1:
        raise ValueError("build_swin switches Swin V1's bias table: pass a config with version=1")
    model = Swin(config)
    for block in (b for stage in model.stages for b in stage.blocks):
        if not shift:
            block.shift = 0
        if not relative_bias:
            table = block.attn.relative_position_bias_table
            nn.init.zeros_(table)
            table.requires_grad_(False)
    return model


def build_model(name: str) -> nn.Module:
    """A fresh model for a row of the sweep: "ViT" or one of `VARIANTS`."""
    if name == "ViT":
        return ViT(VIT_CONFIG)
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}: choose 'ViT' or one of {list(VARIANTS)}")
    return build_swin(*VARIANTS[name])


def load_data(setting: Setting = SETTING) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test) tensors of single-object scenes, the shape as the label."""
    train = data.to_tensors(data.scenes(setting.train_images, "train", max_objects=setting.max_objects))
    test = data.to_tensors(data.scenes(setting.test_images, "test", max_objects=setting.max_objects))
    return train, test


def train_point(name: str, seed: int, train, test, setting: Setting = SETTING,
                progress: bool = False) -> tuple[nn.Module, History]:
    """Train one (model, seed) point of the sweep: the seed fixes the initialisation and the batch order."""
    seed_everything(seed)
    model = build_model(name)
    hist = fit(model, train, epochs=setting.epochs, batch_size=setting.batch_size, lr=setting.lr,
               weight_decay=setting.weight_decay, warmup=setting.warmup, eval_data=test, seed=seed,
               progress=progress, log_every=20, **setting.fit_kwargs)
    return model, hist


@torch.no_grad()
def per_class_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Accuracy on the images of each class: (num_classes,) fractions, in class order."""
    model.eval()
    pred = torch.cat([model(x).argmax(-1) for x in images.split(256)])
    return [float((pred[labels == c] == c).float().mean()) for c in range(num_classes)]


# ----------------------------------------------------------------------------------------------
# Swin V2's motivation: activations grow with depth under pre-norm (V2 section 3.1, Figure 2)
# ----------------------------------------------------------------------------------------------
DEEP_CONFIG = SwinConfig(image_size=32, patch_size=4, num_classes=len(data.SHAPES), embed_dim=32, depths=(12,),
                         num_heads=(2,), window_size=4, mlp_ratio=2.0)


def build_deep_stack(post_norm: bool, config: SwinConfig = DEEP_CONFIG) -> Swin:
    """One deep stage of Swin V1 blocks, with pre-norm (V1) or residual post-norm (V2's rule,
    x + LN(branch(x)), its LayerNorm weights starting at zero as in V2). Attention and position
    bias stay V1's, so the normalisation is the only difference between the two stacks."""
    model = Swin(config)
    if post_norm:
        for block in (b for stage in model.stages for b in stage.blocks):
            block.post_norm = True
            nn.init.zeros_(block.norm1.weight)
            nn.init.zeros_(block.norm2.weight)
    return model


@torch.no_grad()
def activation_amplitude(model: Swin, images: torch.Tensor) -> list[float]:
    """Root-mean-square of the main (residual) path after every block: one number per block,
    averaged over images, tokens and channels. The quantity of V2 Figure 2."""
    out: list[float] = []
    hooks = [b.register_forward_hook(lambda m, i, o: out.append(float(o.pow(2).mean().sqrt())))
             for stage in model.stages for b in stage.blocks]
    try:
        model.eval()(images)
    finally:
        for h in hooks:
            h.remove()
    return out


def load_results(path: Path = RESULTS) -> dict:
    """The sweep's results file (written by scripts/sweep_swin.py)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no sweep results at {path}: run `python scripts/sweep_swin.py` to make them")
    return json.loads(path.read_text())
