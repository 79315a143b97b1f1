"""DINO: self-distillation with no labels (Caron et al., 2021), with DINOv2's and DINOv3's additions.

A student network learns to match a teacher's output distribution over K "prototypes". The teacher
sees the large (global) crops of an image, the student those and several small (local) ones, so it
must infer the whole from a part. The teacher is an exponential moving average (EMA) of the
student. Centering (subtract a running mean: no prototype dominates) and sharpening (a low
temperature tau_t: the output is not uniform) keep the pair from collapsing to a constant.
DINOv2 (Oquab et al., 2024) adds iBOT's masked-patch loss, the KoLeo regulariser and Sinkhorn-Knopp
centering; DINOv3 (Simeoni et al., 2025) adds Gram anchoring. The backbone is course_lib's ViT;
`DINO.from_hf` loads transformers' Dinov2Model / Dinov2WithRegistersModel, mask token included.
The training recipe (multi-crop, the steps for `fit`, kNN evaluation) is `course_lib.recipes.dino`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .distributed import distributed_info
from .hf import load_hf_checkpoint
from .utils import freeze
from .vit import ViT, ViTConfig


def _process_count() -> int:
    """How many processes train together: 1 unless torch.distributed is initialised. The center
    and Sinkhorn-Knopp then reduce over all of them, as in the official code."""
    return distributed_info()[1]


def _all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the processes, in place; a no-op in one process. Returns `x`."""
    if _process_count() > 1:
        dist.all_reduce(x)
    return x


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{name} must be positive, got {v}")


def _check_unit(**values: float) -> None:
    for name, v in values.items():
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {v}")


def _check_range(**ranges: tuple[float, float]) -> None:
    for name, (low, high) in ranges.items():
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"{name} must be (low, high) with 0 <= low <= high <= 1, got {(low, high)}")


# ----------------------------------------------------------------------------------------------
# The loss: centering, sharpening, cross-entropy over view pairs
# ----------------------------------------------------------------------------------------------
Views = torch.Tensor | Sequence[torch.Tensor]  # (V, B, K), or a list of V tensors (B, K)


def _stack_views(out: Views, who: str) -> torch.Tensor:
    if isinstance(out, (list, tuple)):
        if len({tuple(o.shape) for o in out}) != 1:
            raise ValueError(f"{who} views have different shapes {[tuple(o.shape) for o in out]}: every view needs (B, K)")
        out = torch.stack(list(out))
    if out.ndim != 3:
        raise ValueError(f"{who} output must be (views, B, K) or a list of (B, K) tensors, got shape {tuple(out.shape)}")
    return out


def teacher_probs(teacher_out: torch.Tensor, center: torch.Tensor, tau_t: float) -> torch.Tensor:
    """Centered, sharpened teacher distribution softmax((t - c) / tau_t), with no gradient:
    (..., K) logits and a (K,) center -> (..., K) probabilities."""
    _check_positive(tau_t=tau_t)
    if center.shape != teacher_out.shape[-1:]:
        raise ValueError(f"center has shape {tuple(center.shape)}, expected ({teacher_out.shape[-1]},): one entry per prototype")
    return F.softmax((teacher_out.detach() - center) / tau_t, dim=-1)


def multicrop_cross_entropy(student_out: Views, teacher_p: torch.Tensor, tau_s: float) -> torch.Tensor:
    """Mean cross-entropy H(P_t, P_s) over all pairs of different views. student_out: (V_s, B, K)
    logits, the V_t global crops first; teacher_p: (V_t, B, K) targets (centered and sharpened).
    Pair (i, j) compares teacher view i with student view j; pairs with i == j are skipped."""
    _check_positive(tau_s=tau_s)
    s = _stack_views(student_out, "student")
    t = _stack_views(teacher_p, "teacher")
    (V_s, B, K), V_t = s.shape, t.shape[0]
    if t.shape[1:] != (B, K):
        raise ValueError(f"teacher views are {tuple(t.shape[1:])} per view, student views {(B, K)}: use the same batch and K")
    if V_t > V_s:
        raise ValueError(f"{V_t} teacher views but only {V_s} student views: the teacher sees the global crops, "
                         "the student sees them too (first) plus the local crops, so V_t <= V_s")
    if V_s == 1:
        raise ValueError("one view gives no pair of different views: use at least 2 crops per image")
    log_p_s = F.log_softmax(s / tau_s, dim=-1)  # (V_s, B, K)
    ce = -torch.einsum("ibk,jbk->ij", t, log_p_s) / B  # (V_t, V_s): each pair, mean over the batch
    same_view = torch.eye(V_t, V_s, dtype=torch.bool, device=ce.device)
    return ce[~same_view].mean()


def dino_loss(student_out: Views, teacher_out: Views, center: torch.Tensor, tau_s: float = 0.1, tau_t: float = 0.04) -> torch.Tensor:
    """The DINO loss over multi-crop views (Caron et al., 2021, eq. 3 and Algorithm 1).

    student_out: (V_s, B, K) logits of every view, the V_t global crops first, then the locals
    (or a list of V_s tensors (B, K)). teacher_out: (V_t, B, K) logits of the global crops only.
    center: (K,) running mean of the teacher logits.
    P_t = softmax((t - center) / tau_t) (centered, sharpened, no gradient), P_s = softmax(s / tau_s).
    For every pair (teacher view i, student view j) with i != j the cross-entropy
    -sum_k P_t log P_s is averaged over the batch; the loss is the mean over the V_t * V_s - V_t
    pairs. A student never matches the teacher on the very same view: that would be trivial.
    """
    t = _stack_views(teacher_out, "teacher")
    return multicrop_cross_entropy(student_out, teacher_probs(t, center, tau_t), tau_s)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """C <- m C + (1 - m) mean(teacher logits) (DINO eq. 4): the new center (K,). teacher_out:
    (..., K), all global views of the batch; the mean is over every row and every process."""
    _check_unit(momentum=momentum)
    if center.shape != teacher_out.shape[-1:]:
        raise ValueError(f"center has shape {tuple(center.shape)}, teacher logits {tuple(teacher_out.shape)}: one center entry per prototype")
    batch_center = _all_reduce_sum_(teacher_out.detach().reshape(-1, teacher_out.shape[-1]).mean(dim=0)) / _process_count()
    return center * momentum + batch_center * (1 - momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_out: torch.Tensor, tau_t: float, n_iters: int = 3) -> torch.Tensor:
    """DINOv2's centering (SwAV, Caron et al., 2020): (B, K) logits -> (B, K) probabilities whose
    rows sum to 1. Alternately gives every prototype (column) equal mass and every sample (row)
    mass one, `n_iters` times (DINOv2 uses 3)."""
    if teacher_out.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects (B, K) logits, got shape {tuple(teacher_out.shape)}: flatten the views into the batch")
    _check_positive(tau_t=tau_t, n_iters=n_iters)
    Q = torch.exp(teacher_out.float() / tau_t).T  # (K, B); logits are cosines, so no overflow
    K, B = Q.shape
    B = B * _process_count()  # the columns of every process together
    Q = Q / _all_reduce_sum_(Q.sum())
    for _ in range(n_iters):
        Q = Q / _all_reduce_sum_(Q.sum(dim=1, keepdim=True)) / K  # every prototype gets mass 1/K
        Q = Q / Q.sum(dim=0, keepdim=True) / B  # every sample gets mass 1/B
    return (Q * B).T


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of distributions along the last axis: (..., K) -> (...)."""
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1)


# ----------------------------------------------------------------------------------------------
# The teacher: EMA of the student, with DINO's schedules
# ----------------------------------------------------------------------------------------------
def teacher_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine schedule of the EMA momentum from `base` at step 0 to `final` at the last step
    (DINO section 3.1): late in training the teacher moves ever more slowly."""
    _check_positive(total_steps=total_steps)
    _check_unit(base=base, final=final)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    progress = min(1.0, step / max(1, total_steps))
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.04) -> float:
    """Linear warmup of tau_t from `start` to `end` over `warmup_steps`, then constant (DINO
    uses 0.04 -> 0.07 over 30 epochs for long runs: a too sharp teacher early can diverge)."""
    _check_positive(start=start, end=end)
    if warmup_steps < 0 or step < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got {step} and {warmup_steps}")
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_s for every parameter, in place (DINO section 3.1);
    buffers are copied from the student. The two modules must have the same parameters."""
    _check_unit(momentum=momentum)
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        diff = sorted(set(t_params) ^ set(s_params))
        raise ValueError(f"teacher and student have different parameters ({', '.join(diff[:5])}): build the teacher with copy.deepcopy(student)")
    for name, p_t in t_params.items():
        p_s = s_params[name]
        if p_t.shape != p_s.shape:
            raise ValueError(f"{name}: teacher {tuple(p_t.shape)} vs student {tuple(p_s.shape)}")
        p_t.mul_(momentum).add_(p_s.detach(), alpha=1 - momentum)
    for b_t, b_s in zip(teacher.buffers(), student.buffers()):
        b_t.copy_(b_s)


# ----------------------------------------------------------------------------------------------
# DINOv2 and DINOv3 terms
# ----------------------------------------------------------------------------------------------
def masked_cross_entropy(student_patch_out: torch.Tensor, teacher_p: torch.Tensor, mask: torch.Tensor, tau_s: float) -> torch.Tensor:
    """Cross-entropy on masked patches: (B, N, K) logits, (B, N, K) targets, (B, N) bool mask.
    Averaged over the masked patches of each image, then over the batch; an image with no masked
    patch contributes 0."""
    if student_patch_out.shape != teacher_p.shape or student_patch_out.shape[:2] != mask.shape:
        raise ValueError(f"student {tuple(student_patch_out.shape)}, teacher {tuple(teacher_p.shape)} and mask "
                         f"{tuple(mask.shape)} must agree as (B, N, K), (B, N, K), (B, N)")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean (True = masked), got {mask.dtype}: use mask.bool()")
    _check_positive(tau_s=tau_s)
    ce = -(teacher_p * F.log_softmax(student_patch_out / tau_s, dim=-1)).sum(dim=-1)  # (B, N)
    m = mask.float()
    return ((ce * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)).mean()


def ibot_patch_loss(student_patch_out: torch.Tensor, teacher_patch_out: torch.Tensor, mask: torch.Tensor, center: torch.Tensor,
                    tau_s: float = 0.1, tau_t: float = 0.04) -> torch.Tensor:
    """iBOT's masked-patch loss as in DINOv2 (Zhou et al., 2022; Oquab et al., 2024, sec. 4).
    student_patch_out: (B, N, K) logits of the student's patch tokens on the image with the masked
    patches replaced by a mask token; teacher_patch_out: (B, N, K), the teacher's on the unmasked
    image; mask: (B, N) bool, True = masked; center: (K,), the patch logits' own running mean."""
    return masked_cross_entropy(student_patch_out, teacher_probs(teacher_patch_out, center, tau_t), mask, tau_s)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (Sablayrolles et al., 2019; DINOv2 sec. 4): -mean_i log(d_i + eps), with
    d_i the distance from x_i to its nearest neighbour in the batch, after L2 normalisation.

    x: (B, D) with B >= 2. Minimising it pushes neighbours apart: features spread over the sphere.
    """
    if x.ndim != 2:
        raise ValueError(f"koleo_loss expects (B, D) features, got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs at least 2 samples to find a nearest neighbour, got a batch of {x.shape[0]}: "
                         "use a larger batch (or skip the term for this batch)")
    x = F.normalize(x, dim=-1)
    with torch.no_grad():
        dots = x @ x.T  # (B, B); on the unit sphere the largest dot product is the nearest point
        dots.fill_diagonal_(-2.0)  # never choose yourself (dots are >= -1)
        nearest = dots.argmax(dim=1)  # (B,)
    d = (x - x[nearest]).norm(dim=-1)
    return -torch.log(d + eps).mean()


def gram_loss(student_patches: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
    """DINOv3's Gram anchoring (Simeoni et al., 2025, eq. 2).

    student_patches, teacher_patches: (B, P, D) patch features of the student and of the "Gram
    teacher" (an earlier teacher). Both are L2-normalised; the loss is the squared Frobenius
    distance between their (P, P) Gram matrices divided by P^2 (the mean over entries, as the
    mean-squared error of DINOv3's code), averaged over the batch. Only similarities between
    patches are pinned: any rotation of the feature space costs nothing.
    """
    if student_patches.shape != teacher_patches.shape or student_patches.ndim != 3:
        raise ValueError(f"gram_loss expects two (B, P, D) tensors of one shape, got {tuple(student_patches.shape)} and {tuple(teacher_patches.shape)}")
    xs = F.normalize(student_patches, dim=-1)
    xg = F.normalize(teacher_patches.detach(), dim=-1)
    return F.mse_loss(xs @ xs.transpose(1, 2), xg @ xg.transpose(1, 2))  # (B, P, P) each


# ----------------------------------------------------------------------------------------------
# iBOT masking, the heads and the student/teacher pair
# ----------------------------------------------------------------------------------------------
def random_patch_mask(batch: int, num_patches: int, ratio: tuple[float, float] = (0.1, 0.5), generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) bool mask for iBOT, True = masked; each image masks a fraction drawn from `ratio`."""
    _check_positive(batch=batch, num_patches=num_patches)
    _check_range(ratio=ratio)
    r = torch.empty(batch, 1).uniform_(*ratio, generator=generator)
    ranks = torch.rand(batch, num_patches, generator=generator).argsort(dim=1).argsort(dim=1)  # random rank of each patch
    return ranks < (r * num_patches).round()


class DINOHead(nn.Module):
    """Projection head: an MLP to a bottleneck, L2 normalisation, then K unit-norm prototypes
    (DINO's weight-normalised last layer with its norm fixed to 1). Output: (..., K) cosines."""

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 64, n_layers: int = 3):
        super().__init__()
        _check_positive(in_dim=in_dim, out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, n_layers=n_layers)
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Linear(bottleneck_dim, out_dim, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)  # (..., bottleneck) on the unit sphere
        return z @ F.normalize(self.prototypes.weight, dim=-1).T  # (..., K)


def masked_forward_features(backbone: ViT, images: torch.Tensor, mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """Backbone tokens (B, prefix + registers + N, D) with the masked patches replaced: as in iBOT,
    DINOv2 and transformers' `bool_masked_pos`, a masked patch's embedding (mask (B, N), True =
    masked) becomes the learned `mask_token` (1, 1, D) *before* its position embedding is added."""
    if mask is None:
        return backbone.forward_features(images)
    if mask_token is None:
        raise ValueError("a mask needs a mask_token of shape (1, 1, D)")
    x = backbone.embed(images)  # (B, P + R + N, D), positions already added
    skip, P = backbone.num_skip_tokens, backbone.config.num_prefix_tokens
    if mask.shape != (x.shape[0], x.shape[1] - skip):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(x.shape[0], x.shape[1] - skip)} (B, patches)")
    grid = (images.shape[2] // backbone.patch_embed.patch_size[0], images.shape[3] // backbone.patch_embed.patch_size[1])
    pos = backbone.position_embedding(grid)
    masked = mask_token.reshape(1, 1, -1) + (pos[:, P:] if pos is not None else 0)  # (1, N, D) or (1, 1, D)
    patches = torch.where(mask[..., None], masked.to(x.dtype), x[:, skip:])
    x = torch.cat([x[:, :skip], patches], dim=1)
    for block in backbone.blocks:
        x = block(x)
    return backbone.norm(x)


@dataclass
class DINOConfig:
    out_dim: int = 1024  # K prototypes (DINO: 65536)
    hidden_dim: int = 512  # head MLP width (DINO: 2048)
    bottleneck_dim: int = 64  # (DINO: 256)
    head_layers: int = 3
    tau_s: float = 0.1
    tau_t: float = 0.04  # after warmup
    tau_t_start: float = 0.04  # teacher temperature at step 0, warmed up linearly to tau_t
    tau_t_warmup_steps: int = 0
    centering: str = "center"  # "center" (DINO) | "sinkhorn" (DINOv2) | "none"
    center_momentum: float = 0.9
    momentum: float = 0.996  # EMA momentum at step 0, cosine schedule to momentum_final
    momentum_final: float = 1.0
    n_global: int = 2  # the teacher sees the global crops only
    # Multi-crop: cut by course_lib.recipes.augment.multi_crop in the training recipe
    n_local: int = 4
    global_size: int = 32
    local_size: int = 16
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    jitter: float = 0.4
    permute_channels: bool = False  # every view gets its own order of the RGB channels (a coarse hue jitter)
    keep_object: bool = False  # every crop contains the object's centre (given with the batch)
    ibot_weight: float = 0.0  # DINOv2: masked-patch loss with its own (untied) head
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    koleo_weight: float = 0.0  # DINOv2: 0.1
    gram_weight: float = 0.0  # DINOv3: Gram anchoring against a frozen earlier teacher
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.centering not in ("center", "sinkhorn", "none"):
            raise ValueError(f"centering must be 'center', 'sinkhorn' or 'none', got {self.centering!r}")
        _check_positive(tau_s=self.tau_s, tau_t=self.tau_t, tau_t_start=self.tau_t_start, out_dim=self.out_dim, hidden_dim=self.hidden_dim,
                        bottleneck_dim=self.bottleneck_dim, head_layers=self.head_layers, n_global=self.n_global,
                        global_size=self.global_size, local_size=self.local_size)
        _check_unit(momentum=self.momentum, momentum_final=self.momentum_final, center_momentum=self.center_momentum)
        if min(self.n_local, self.tau_t_warmup_steps, self.jitter, self.ibot_weight, self.koleo_weight, self.gram_weight) < 0:
            raise ValueError("n_local, tau_t_warmup_steps, jitter and the loss weights must be >= 0")
        _check_range(global_scale=self.global_scale, local_scale=self.local_scale, mask_ratio=self.mask_ratio)


class DINO(nn.Module):
    """A student (backbone + DINO head [+ iBOT head]) and its EMA teacher, with the center."""

    def __init__(self, backbone: ViT, config: DINOConfig | None = None):
        super().__init__()
        if not isinstance(backbone, ViT):
            raise TypeError(f"DINO trains a course_lib ViT backbone, got {type(backbone).__name__}: build one with ViT(ViTConfig(num_classes=0, ...))")
        self.config = c = config or DINOConfig()
        D = backbone.config.dim
        heads = {"backbone": backbone, "head": DINOHead(D, c.out_dim, c.hidden_dim, c.bottleneck_dim, c.head_layers)}
        if c.ibot_weight > 0:
            heads["ibot_head"] = DINOHead(D, c.out_dim, c.hidden_dim, c.bottleneck_dim, c.head_layers)
        self.student = nn.ModuleDict(heads)
        self.teacher = freeze(copy.deepcopy(self.student))  # no gradient, so no optimizer step and no weight decay
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D)) if c.ibot_weight > 0 else None
        self.gram_teacher = freeze(copy.deepcopy(backbone)) if c.gram_weight > 0 else None
        self.register_buffer("center", torch.zeros(c.out_dim))
        self.register_buffer("patch_center", torch.zeros(c.out_dim))

    def no_weight_decay(self) -> set[str]:
        return {f"student.backbone.{n}" for n in self.student.backbone.no_weight_decay()} | {"mask_token"}

    def train(self, mode: bool = True) -> "DINO":
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout or drop path
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        ema_update(self.teacher, self.student, momentum)

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        """DINOv3 resets the Gram teacher to the current EMA teacher every so often."""
        if self.gram_teacher is not None:
            self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())

    def _teacher_targets(self, logits: torch.Tensor, center: torch.Tensor, tau_t: float) -> torch.Tensor:
        if self.config.centering == "sinkhorn":
            return sinkhorn_knopp(logits.reshape(-1, logits.shape[-1]), tau_t).reshape(logits.shape)
        if self.config.centering == "none":
            center = torch.zeros_like(center)
        return teacher_probs(logits, center, tau_t)

    def loss(self, views: Sequence[torch.Tensor], tau_t: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss on a list of views (the n_global global crops first) and a dict of
        diagnostics. The centers are updated after the loss is computed, from this batch."""
        c = self.config
        tau_t = c.tau_t if tau_t is None else tau_t
        if len(views) < c.n_global:
            raise ValueError(f"got {len(views)} views but the config has {c.n_global} global crops: pass the globals first, then the locals")
        shapes = [tuple(v.shape) for v in views]
        if len(set(shapes[: c.n_global])) > 1 or len(set(shapes[c.n_global :])) > 1 or len({s[0] for s in shapes}) > 1:
            raise ValueError(f"views of shapes {shapes}: every view needs the same images, the global crops one size, the local crops another")
        B, skip = views[0].shape[0], self.student.backbone.num_skip_tokens
        globals_ = torch.cat(list(views[: c.n_global]))  # (n_global*B, C, H, W), view-major
        with torch.no_grad():
            t_tokens = self.teacher.backbone.forward_features(globals_)  # (n_global*B, T, D)
            t_logits = self.teacher.head(self.teacher.backbone.pool(t_tokens)).reshape(c.n_global, B, -1)  # (V_t, B, K)
            p_t = self._teacher_targets(t_logits, self.center, tau_t)
        mask = None
        if c.ibot_weight > 0:
            mask = random_patch_mask(globals_.shape[0], t_tokens.shape[1] - skip, c.mask_ratio).to(globals_.device)
        s_tokens = masked_forward_features(self.student.backbone, globals_, mask, self.mask_token)
        s_cls = [self.student.backbone.pool(s_tokens)]  # the CLS token, or the mean of patches (ViTConfig.pool)
        if len(views) > c.n_global:  # local crops share one size: one forward pass for all of them
            s_cls.append(self.student.backbone.pool(self.student.backbone.forward_features(torch.cat(list(views[c.n_global :])))))
        s_logits = self.student.head(torch.cat(s_cls)).reshape(len(views), B, -1)  # (V_s, B, K)
        terms = {"dino": (1.0, multicrop_cross_entropy(s_logits, p_t, c.tau_s))}  # name: (weight, loss)
        if c.ibot_weight > 0:
            with torch.no_grad():
                t_patch = self.teacher.ibot_head(t_tokens[:, skip:])  # (n_global*B, N, K)
                p_patch = self._teacher_targets(t_patch, self.patch_center, tau_t)
            terms["ibot"] = c.ibot_weight, masked_cross_entropy(self.student.ibot_head(s_tokens[:, skip:]), p_patch, mask, c.tau_s)
            self.patch_center.copy_(update_center(self.patch_center, t_patch[mask], c.center_momentum))
        if c.koleo_weight > 0:  # on the student's CLS features, per global view (DINOv2)
            terms["koleo"] = c.koleo_weight, torch.stack([koleo_loss(x) for x in s_cls[0].split(B)]).mean()
        if c.gram_weight > 0:  # on the patch features of the global crops (DINOv3)
            with torch.no_grad():
                g_tokens = self.gram_teacher.forward_features(globals_)
            terms["gram"] = c.gram_weight, gram_loss(s_tokens[:, skip:], g_tokens[:, skip:])
        self.center.copy_(update_center(self.center, t_logits, c.center_momentum))
        total = sum(w * loss for w, loss in terms.values())
        stats = {name: loss.item() for name, (_, loss) in terms.items()}
        stats["teacher_entropy"] = entropy(p_t).mean().item()  # per image: 0 when one-hot
        stats["marginal_entropy"] = entropy(p_t.reshape(-1, p_t.shape[-1]).mean(0)).item()  # of the batch mean
        stats["kl"] = stats["dino"] - stats["teacher_entropy"]  # H(P_t, P_s) = H(P_t) + KL(P_t || P_s)
        stats["loss"] = total.item()
        return total, stats

    @classmethod
    def from_hf(cls, source, config: DINOConfig | None = None, **overrides) -> "DINO":
        """A DINO whose student and teacher backbones are a transformers Dinov2Model or
        Dinov2WithRegistersModel (instance, save_pretrained folder or hub id); its mask token
        becomes the iBOT mask token when config.ibot_weight > 0. The heads start fresh: the
        released checkpoints do not include them."""
        model = cls(ViT.from_hf(source, **overrides), config)
        if model.mask_token is not None:  # not part of the ViT: read it from the checkpoint
            state = load_hf_checkpoint(source)[1]
            key = next((k for k in state if k.endswith("embeddings.mask_token")), None)
            if key is not None:
                with torch.no_grad():
                    model.mask_token.copy_(state[key].reshape(1, 1, -1))
        return model


# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------
def dino_scenes(**config_kw) -> DINO:
    """The course's small DINO for 32x32 scenes: ViT width 96, depth 4, patch 4, 4 heads."""
    backbone = ViT(ViTConfig(image_size=32, patch_size=4, num_classes=0, dim=96, depth=4, num_heads=4, mlp_ratio=2.0))
    return DINO(backbone, DINOConfig(**config_kw))


def _dino_vit16(dim: int, num_heads: int, config_kw: dict) -> DINO:
    """A ViT-?/16 at 224 (depth 12) with DINO's head and multi-crop: K = 65536 prototypes,
    hidden 2048, bottleneck 256, 2 global crops of 224 and 8 local crops of 96 (Caron et al., 2021)."""
    backbone = ViT(ViTConfig(image_size=224, patch_size=16, num_classes=0, dim=dim, depth=12, num_heads=num_heads))
    paper = dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=256, global_size=224, local_size=96, n_local=8)
    return DINO(backbone, DINOConfig(**{**paper, **config_kw}))


def dino_vit_small(**config_kw) -> DINO:
    """DINO ViT-S/16: width 384, 6 heads, 21.7M backbone parameters."""
    return _dino_vit16(384, 6, config_kw)


def dino_vit_base(**config_kw) -> DINO:
    """DINO ViT-B/16: width 768, 12 heads, 85.8M backbone parameters."""
    return _dino_vit16(768, 12, config_kw)
