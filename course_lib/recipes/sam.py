"""Training and evaluating SAM on the scenes: the paper's simulated interaction (section 3,
"Training", and appendix A).

Each training mask goes through a few rounds of a simulated user: a first prompt (a point drawn
uniformly inside the object, or its box with noise), then new points drawn uniformly from the
**error region** of the previous prediction (a positive click on a missed pixel, a negative click
on a wrongly covered one), with the previous mask logits fed back as the dense prompt. The loss is
focal + dice (20:1) on the masks and MSE between predicted and true IoU; for an ambiguous prompt
(one click) only the lowest-loss mask of the three is back-propagated.

Evaluation clicks are deterministic: the point of the (largest) error region farthest from its
boundary, as in the paper's interactive evaluation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..sam import Sam, upsample_masks

# ----------------------------------------------------------------------------------------------
# Losses (pure functions; masks are (B, K, H, W) logits against a (B, H, W) 0/1 target)
# ----------------------------------------------------------------------------------------------
FOCAL_WEIGHT, DICE_WEIGHT = 20.0, 1.0  # the paper's 20:1


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al., 2017), averaged over pixels: (B, K, H, W), (B, H, W) -> (B, K).

    Cross-entropy scaled by (1 - p_t)^gamma, so the many easy pixels (far background) count little
    and the hard ones near the boundary count a lot; alpha weighs positives against negatives.
    """
    target = target[:, None].expand_as(logits).to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = logits.sigmoid()
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t) ** gamma * ce).flatten(2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice coefficient (Milletari et al., 2016): (B, K, H, W), (B, H, W) -> (B, K).

    Dice = 2 |P . T| / (|P| + |T|) on probabilities: an overlap measure that does not care how
    large the object is, the complement of the pixel-averaged focal loss.
    """
    p = logits.sigmoid().flatten(2)  # (B, K, HW)
    t = target[:, None].flatten(2).to(p.dtype)  # (B, 1, HW)
    return 1 - (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's mask loss, 20 x focal + 1 x dice, per mask: (B, K, H, W), (B, H, W) -> (B, K)."""
    return FOCAL_WEIGHT * focal_loss(logits, target) + DICE_WEIGHT * dice_loss(logits, target)


def min_over_masks(losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For an ambiguous prompt the model answers K masks and only the best one is trained:
    losses (B, K) -> (the lowest loss per prompt (B,), which mask (B,)). Gradients reach only
    the chosen mask, so the K outputs are free to specialise (part, object, group)."""
    best, index = losses.min(dim=1)
    return best, index


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded masks (logit > 0) with the target: (B, K, H, W), (B, H, W) -> (B, K).
    An empty prediction of an empty target counts as IoU 1."""
    pred = logits > 0
    t = target[:, None].bool()
    inter = (pred & t).flatten(2).sum(-1).float()
    union = (pred | t).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# ----------------------------------------------------------------------------------------------
# Simulated clicks
# ----------------------------------------------------------------------------------------------
def error_regions(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(false negatives, false positives) of a boolean prediction against the target, (B, H, W) each:
    missed object pixels call for a positive click, wrongly covered ones for a negative click."""
    pred, target = pred.bool(), target.bool()
    return target & ~pred, pred & ~target


def sample_error_points(
    pred: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per row, drawn uniformly from the error region (paper, section 3).

    pred, target: (B, H, W) booleans. Returns points (B, 2) as pixel (x, y) and labels (B,):
    1 if the pixel was missed (false negative), 0 if it was wrongly covered (false positive).
    A row with no error gets a positive click inside the target (or at its centre if empty).
    """
    fn, fp = error_regions(pred, target)
    region = fn | fp
    empty = ~region.flatten(1).any(1)
    region = torch.where(empty[:, None, None], target.bool(), region)
    B, H, W = region.shape
    weights = region.flatten(1).float() + 1e-12  # uniform over the region; an empty one: anywhere
    idx = torch.multinomial(weights, 1, generator=generator)[:, 0]  # (B,)
    ys, xs = idx // W, idx % W
    labels = (~fp.flatten(1)[torch.arange(B, device=idx.device), idx]).long()  # on a false positive: negative click
    return torch.stack([xs, ys], dim=1).float(), labels


def interior_point(region: torch.Tensor) -> torch.Tensor:
    """The pixel of each (B, H, W) boolean region farthest from the region's boundary: the
    deterministic click of the paper's evaluation. It counts how many 3x3 erosions each pixel
    survives (a chessboard distance transform) and takes the first maximum. Returns (B, 2) as (x, y);
    an empty region gives the image centre."""
    B, H, W = region.shape
    x = region.float()[:, None]
    depth = torch.zeros_like(x)
    while x.any():
        depth += x
        x = -F.max_pool2d(-x, 3, stride=1, padding=1)  # min-pool: erosion (the border counts as inside)
    idx = depth.flatten(1).argmax(1)
    points = torch.stack([idx % W, idx // W], dim=1).float()
    empty = ~region.flatten(1).any(1)
    return torch.where(empty[:, None], torch.tensor([W / 2, H / 2], device=points.device), points)


def box_of(target: torch.Tensor) -> torch.Tensor:
    """The tight box (x1, y1, x2, y2) of each (B, H, W) mask, in pixels (inclusive corners)."""
    B, H, W = target.shape
    rows, cols = target.any(2), target.any(1)  # (B, H), (B, W)
    ar_h, ar_w = torch.arange(H, device=target.device), torch.arange(W, device=target.device)
    y1 = torch.where(rows, ar_h, H).min(1).values
    y2 = torch.where(rows, ar_h, -1).max(1).values
    x1 = torch.where(cols, ar_w, W).min(1).values
    x2 = torch.where(cols, ar_w, -1).max(1).values
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def noisy_box(target: torch.Tensor, noise: float = 0.1, max_pixels: float = 3.0, generator=None) -> torch.Tensor:
    """The box of each mask with each coordinate moved by Gaussian noise of std `noise` x the box
    side, capped at `max_pixels` (the paper: 10% of the side, at most 20 pixels at 1024 px)."""
    box = box_of(target)
    side = torch.stack([box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]] * 2, dim=1) + 1
    jitter = torch.randn(box.shape, generator=generator, device=box.device) * noise * side
    return box + jitter.clamp(-max_pixels, max_pixels)


# ----------------------------------------------------------------------------------------------
# The training step (a loss_fn for course_lib.train.fit)
# ----------------------------------------------------------------------------------------------
def interactive_loss(
    model: Sam,
    batch: tuple[torch.Tensor, ...],
    *,
    rounds: int = 3,
    box_prob: float = 0.5,
    error_points: bool = True,
    iou_weight: float = 1.0,
) -> tuple[torch.Tensor, None]:
    """Simulated interaction on a batch (images (B, 3, S, S), label maps (B, S, S), counts (B,)).

    Every object of every scene is a training mask (the paper samples up to 64 masks per image):
    the image is encoded once and its embedding repeated for each of its objects. Round 1
    prompts with a point inside the object or (with probability `box_prob`, for the whole batch)
    its noisy box; every later round adds one click from the error region of the previous
    prediction (or, with `error_points=False`, a positive click anywhere in the object: the
    ablation) and feeds the previous mask logits back. The loss is the mean over rounds of the
    mask loss (the best of three for a single click) plus the IoU MSE.
    """
    images, label_maps, counts = batch
    scene, target = object_rows(label_maps, counts.to(label_maps.device))
    S = images.shape[-1]
    embeddings = model.encode_image(images)[scene]  # (M, C, g, g): one row per object
    B = target.shape[0]
    use_box = bool(torch.rand(()) < box_prob)
    boxes = noisy_box(target) if use_box else None
    if use_box:
        points, labels = images.new_zeros(B, 0, 2), torch.zeros(B, 0, dtype=torch.long, device=images.device)
    else:
        points, labels = sample_error_points(torch.zeros_like(target), target)
        points, labels = points[:, None], labels[:, None]
    prev_logits, total = None, 0.0
    for r in range(rounds):
        masks, iou_pred = model.decode(embeddings, points if points.shape[1] else None,
                                       labels if points.shape[1] else None, boxes, prev_logits)
        full = upsample_masks(masks, S)
        best, index = min_over_masks(mask_loss(full, target))
        true_iou = mask_iou(full.detach(), target)
        total = total + best.mean() + iou_weight * F.mse_loss(iou_pred, true_iou)
        rows = torch.arange(B, device=images.device)
        prev_logits = masks[rows, index][:, None].detach()  # (B, 1, 4g, 4g): the dense prompt next round
        if r + 1 < rounds:
            pred = full[rows, index].detach() > 0
            if error_points:
                p, l = sample_error_points(pred, target)
            else:
                p, l = sample_error_points(torch.zeros_like(target), target)
            points, labels = torch.cat([points, p[:, None]], 1), torch.cat([labels, l[:, None]], 1)
    return total / rounds, None


# ----------------------------------------------------------------------------------------------
# Data and evaluation
# ----------------------------------------------------------------------------------------------
def scene_tensors(n: int, split: str, resolution: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scenes as (images (N, 3, S, S) in [0, 1], label maps (N, S, S) uint8, object counts (N,))."""
    from .. import data

    ds = data.scenes(n, split=split, resolution=resolution)
    images, _ = data.to_tensors(ds, label_column=None)
    label_maps = torch.from_numpy(np.asarray(ds["mask"], dtype=np.uint8))
    return images, label_maps, torch.tensor(ds["count"], dtype=torch.long)


def object_rows(label_maps: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every object of every scene: (scene index (M,), object mask (M, S, S) bool)."""
    scene = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    obj = torch.cat([torch.arange(1, int(c) + 1, device=counts.device) for c in counts])
    return scene, label_maps[scene] == obj[:, None, None]


def colour_baseline(images: torch.Tensor, points: torch.Tensor, tolerance: float = 0.12) -> torch.Tensor:
    """The baseline: every pixel whose colour is within `tolerance` (RGB distance, [0, 1] scale)
    of the clicked pixel's. images (B, 3, S, S), points (B, 2) (x, y) -> masks (B, S, S) bool."""
    rows = torch.arange(images.shape[0], device=images.device)
    xs, ys = points[:, 0].long(), points[:, 1].long()
    clicked = images[rows, :, ys, xs]  # (B, 3)
    return (images - clicked[:, :, None, None]).norm(dim=1) < tolerance


@torch.no_grad()
def evaluate_clicks(
    model: Sam, images: torch.Tensor, label_maps: torch.Tensor, counts: torch.Tensor,
    clicks: int = 3, batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Interactive evaluation on every object: first click at the object's interior point, then
    each new click at the interior point of the larger error set (the missed pixels, clicked
    positive, or the wrongly covered ones, clicked negative).

    Returns per-object tensors (M,): "iou_click1" ... "iou_click{clicks}", "iou_box" (a tight box),
    "pred_iou_click1" (the predicted IoU of the chosen mask after one click) and "iou_colour" (the
    colour baseline at the first click). For one click SAM answers three masks and the one with
    the highest predicted IoU is kept, as at inference time.
    """
    model.eval()
    device = next(model.parameters()).device
    images, label_maps, counts = images.to(device), label_maps.to(device), counts.to(device)
    scene, targets = object_rows(label_maps, counts)
    S = images.shape[-1]
    out: dict[str, list[torch.Tensor]] = {}
    embeddings = torch.cat([model.encode_image(b) for b in images.split(batch_size)])
    for lo in range(0, len(scene), batch_size):
        emb, target, img = embeddings[scene[lo:lo + batch_size]], targets[lo:lo + batch_size], images[scene[lo:lo + batch_size]]
        rows = torch.arange(len(target), device=target.device)
        p = interior_point(target)
        out.setdefault("iou_colour", []).append(mask_iou(colour_baseline(img, p)[:, None].float() * 2 - 1, target)[:, 0])
        points, labels, prev = p[:, None], torch.ones(len(target), 1, dtype=torch.long, device=p.device), None
        for c in range(clicks):
            masks, iou_pred = model.decode(emb, points, labels, mask_logits=prev)
            choice = iou_pred.argmax(1)
            prev = masks[rows, choice][:, None]
            full = upsample_masks(prev, S)
            out.setdefault(f"iou_click{c + 1}", []).append(mask_iou(full, target)[:, 0])
            if c == 0:
                out.setdefault("pred_iou_click1", []).append(iou_pred[rows, choice])
            fn, fp = error_regions(full[:, 0] > 0, target)
            use_fn = fn.flatten(1).sum(1) >= fp.flatten(1).sum(1)
            region = torch.where(use_fn[:, None, None], fn, fp)
            done = ~region.flatten(1).any(1)  # a perfect mask: confirm it with a positive click
            p = interior_point(torch.where(done[:, None, None], target, region))
            points = torch.cat([points, p[:, None]], 1)
            labels = torch.cat([labels, (use_fn | done).long()[:, None]], 1)
        masks, _ = model.decode(emb, boxes=box_of(target))
        out.setdefault("iou_box", []).append(mask_iou(upsample_masks(masks, S), target)[:, 0])
    return {k: torch.cat(v).cpu() for k, v in out.items()}
