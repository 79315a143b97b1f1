"""Plotting helpers used across the lectures: image grids, patch grids, heat maps, histories."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch


def to_image(x) -> np.ndarray:
    """A (C, H, W) or (H, W, C) tensor/array in [0, 1] or uint8 -> (H, W, C) float array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    if x.ndim not in (2, 3):
        raise ValueError(f"to_image shows one image, (C, H, W), (H, W, C) or (H, W), got shape {x.shape}: index the batch first")
    if x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(1, 2, 0)
    if x.dtype == np.uint8:
        x = x / 255.0
    return np.clip(x, 0, 1).squeeze()


def show_images(images, titles=None, ncols: int = 8, size: float = 1.6, suptitle: str | None = None):
    """A grid of images with optional titles; returns the figure."""
    n = len(images)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.3 if suptitle else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(to_image(images[i]), cmap="gray" if to_image(images[i]).ndim == 2 else None)
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def show_patch_grid(image, patch_size: int, ax=None, numbers: bool = True, color: str = "white"):
    """Draw an image with its patch grid and the patch index (row-major) in each cell."""
    img = to_image(image)
    H, W = img.shape[:2]
    ax = ax or plt.subplots(figsize=(4, 4))[1]
    ax.imshow(img)
    for x in range(0, W + 1, patch_size):
        ax.axvline(x - 0.5, color=color, lw=0.8)
    for y in range(0, H + 1, patch_size):
        ax.axhline(y - 0.5, color=color, lw=0.8)
    if numbers and (H // patch_size) * (W // patch_size) <= 196:
        for r in range(H // patch_size):
            for c in range(W // patch_size):
                ax.text(c * patch_size + patch_size / 2 - 0.5, r * patch_size + patch_size / 2 - 0.5, str(r * (W // patch_size) + c),
                        color=color, ha="center", va="center", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def heatmap(matrix, ax=None, title: str | None = None, cmap: str = "viridis", colorbar: bool = True, **kw):
    """A matrix as an image with a colour bar."""
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().float().cpu().numpy()
    ax = ax or plt.subplots(figsize=(4, 4))[1]
    im = ax.imshow(matrix, cmap=cmap, **kw)
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        plt.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return ax


def plot_history(history, title: str = "training", ax=None):
    """Loss per step (and accuracy per epoch on a twin axis, if recorded)."""
    ax = ax or plt.subplots(figsize=(5, 3))[1]
    ax.plot(history.step, history.loss, label="training loss", color="C0")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if history.eval_acc or history.train_acc:
        ax2 = ax.twinx()
        steps_per_epoch = history.step[-1] / max(1, len(history.eval_acc or history.train_acc))
        if history.train_acc:
            ax2.plot([(i + 1) * steps_per_epoch for i in range(len(history.train_acc))], history.train_acc, "o--", color="C1", label="train accuracy")
        if history.eval_acc:
            ax2.plot([(i + 1) * steps_per_epoch for i in range(len(history.eval_acc))], history.eval_acc, "o-", color="C2", label="test accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right", fontsize=8)
    return ax
