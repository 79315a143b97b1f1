"""Image augmentations on whole batches, written with torch alone (no torchvision): the random
resized crop (optionally keeping a given point, such as the object's centre, inside the box), a
horizontal flip, colour jitter, a random permutation of the colour channels (a coarse hue change)
and DINO's multi-crop (Caron et al., 2021).

Boxes are in the [-1, 1] coordinates of `torch.nn.functional.affine_grid`: the full image is the
box (cx, cy, w, h) = (0, 0, 2, 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_images(images: torch.Tensor, who: str, channels: int | None = None) -> None:
    if images.ndim != 4 or (channels is not None and images.shape[1] != channels):
        want = f"(B, {channels}, H, W)" if channels else "(B, C, H, W)"
        raise ValueError(f"{who} expects a batch of images {want}, got shape {tuple(images.shape)}: add a batch axis with images[None]")
    if not images.is_floating_point():
        raise ValueError(f"{who} expects float images in [0, 1], got {images.dtype}: divide uint8 images by 255")


def _check_scale(name: str, scale: tuple[float, float]) -> None:
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= 1 (fractions of the image area), got {scale}")


def crop_boxes(
    n: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random boxes for RandomResizedCrop: (n, 4) rows (cx, cy, w, h) in [-1, 1] image coordinates,
    w * h / 4 = a fraction of the area drawn uniformly from `scale`, aspect ratio log-uniform.

    keep: (n, 2) points (x, y) in [-1, 1]; box i is then placed at random among the positions
    that contain point i (for example the object's centre, so no crop is background only)."""
    _check_scale("scale", scale)
    if keep is not None and (keep.shape != (n, 2) or keep.abs().max() > 1):
        raise ValueError(f"keep must be ({n}, 2) points (x, y) inside the image, in [-1, 1], got shape {tuple(keep.shape)}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must be (low, high) aspect ratios with 0 < low <= high, got {ratio}")
    area = torch.empty(n).uniform_(*scale, generator=generator)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    w = (area * log_r.exp()).sqrt().clamp(max=1.0) * 2  # widths in [-1, 1] units (full image = 2)
    h = (area / log_r.exp()).sqrt().clamp(max=1.0) * 2
    if keep is None:
        cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w / 2)
        cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h / 2)
    else:  # the centre lies within half a box of the point, and the box inside the image
        lo_x, hi_x = torch.maximum(keep[:, 0] - w / 2, w / 2 - 1), torch.minimum(keep[:, 0] + w / 2, 1 - w / 2)
        lo_y, hi_y = torch.maximum(keep[:, 1] - h / 2, h / 2 - 1), torch.minimum(keep[:, 1] + h / 2, 1 - h / 2)
        cx = lo_x + torch.rand(n, generator=generator) * (hi_x - lo_x)
        cy = lo_y + torch.rand(n, generator=generator) * (hi_y - lo_y)
    return torch.stack([cx, cy, w, h], dim=1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Cut box i out of image i and resize it to size x size by bilinear sampling.

    images: (B, C, H, W); boxes: (B, 4) as from `crop_boxes`; flip: (B,) bool, mirror left-right.
    The full box (0, 0, 2, 2) at the input size returns the images unchanged.
    """
    _check_images(images, "crop_resize")
    if boxes.shape != (images.shape[0], 4):
        raise ValueError(f"boxes must be ({images.shape[0]}, 4) rows (cx, cy, w, h), one per image, got {tuple(boxes.shape)}")
    if size < 1:
        raise ValueError(f"size must be at least 1 pixel, got {size}")
    B = images.shape[0]
    cx, cy, w, h = boxes.to(images).unbind(1)
    sx = w / 2 * (1 - 2 * flip.to(images)) if flip is not None else w / 2
    theta = torch.zeros(B, 2, 3).to(images)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h / 2, cy
    grid = F.affine_grid(theta, [B, images.shape[1], size, size], align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def luminance(images: torch.Tensor) -> torch.Tensor:
    """Grayscale (ITU-R 601 luma, as PIL and torchvision): (B, 3, H, W) -> (B, 1, H, W)."""
    _check_images(images, "luminance", channels=3)
    return (images * images.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)


def adjust_colors(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor) -> torch.Tensor:
    """Brightness, then contrast, then saturation, one factor per image (B,), 1 = unchanged.

    As torchvision's ColorJitter: each step blends the *current* image with a reference (black,
    the mean gray level, the image's own grayscale) and clamps to [0, 1]. Saturation therefore
    leaves the luminance of the image it receives unchanged.
    """
    _check_images(images, "adjust_colors", channels=3)
    for name, f in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if f.shape != images.shape[:1]:
            raise ValueError(f"{name} needs one factor per image, shape ({images.shape[0]},), got {tuple(f.shape)}")
    b, c, s = (f.reshape(-1, 1, 1, 1).to(images) for f in (brightness, contrast, saturation))
    x = (images * b).clamp(0, 1)
    mean = luminance(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = ((x - mean) * c + mean).clamp(0, 1)
    gray = luminance(x)  # of the image after brightness and contrast, not of the input
    return ((x - gray) * s + gray).clamp(0, 1)


def color_jitter(images: torch.Tensor, strength: float = 0.4, p_gray: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random brightness, contrast and saturation per image, then random grayscale.

    images: (B, 3, H, W) in [0, 1]. Factors are drawn uniformly from [1 - strength, 1 + strength];
    a simplified version of DINO's photometric augmentations (no hue jitter, no blur)."""
    if not 0 <= strength <= 1 or not 0 <= p_gray <= 1:
        raise ValueError(f"strength and p_gray must lie in [0, 1], got {strength} and {p_gray}")
    B = images.shape[0]
    b, c, s = torch.empty(3, B).uniform_(1 - strength, 1 + strength, generator=generator)
    x = adjust_colors(images, b, c, s)
    to_gray = (torch.rand(B, 1, 1, 1, generator=generator) < p_gray).to(images)
    return x * (1 - to_gray) + luminance(x) * to_gray


def permute_channels(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image's colour channels in a random order of the six (RGB, RBG, GRB, ...): a coarse
    hue change that turns red into green or blue while keeping shapes and brightness pattern."""
    _check_images(images, "permute_channels", channels=3)
    order = torch.rand(images.shape[0], 3, generator=generator).argsort(dim=1)  # (B, 3), uniform over permutations
    return images.gather(1, order[:, :, None, None].expand_as(images))


def multi_crop(
    images: torch.Tensor,
    n_global: int = 2,
    n_local: int = 4,
    global_size: int = 32,
    local_size: int = 16,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    jitter: float = 0.4,
    generator: torch.Generator | None = None,
    permute: bool = False,
    keep: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """DINO's multi-crop (Caron et al., 2021, sec. 3.1): `n_global` large crops then `n_local`
    small ones of every image, each flipped and colour-jittered at random, and with `permute`
    given its own random order of the colour channels (`permute_channels`).

    images: (B, C, H, W) in [0, 1] -> list of n_global tensors (B, C, global_size, global_size)
    followed by n_local tensors (B, C, local_size, local_size). Views of index i share image i.
    keep: (B, 2) points in [-1, 1] that every crop of image i contains (see `crop_boxes`).
    """
    if n_global < 1:
        raise ValueError(f"n_global must be at least 1 (the teacher sees the global crops), got {n_global}")
    if n_local < 0:
        raise ValueError(f"n_local must be >= 0, got {n_local}")
    _check_images(images, "multi_crop")
    B = images.shape[0]
    views = []
    for i in range(n_global + n_local):
        size, scale = (global_size, global_scale) if i < n_global else (local_size, local_scale)
        flip = torch.rand(B, generator=generator) < 0.5
        view = crop_resize(images, crop_boxes(B, scale, generator=generator, keep=keep), size, flip)
        view = color_jitter(view, jitter, generator=generator) if jitter > 0 else view
        views.append(permute_channels(view, generator) if permute else view)
    return views
