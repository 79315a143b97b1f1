"""DINO on the course's scenes: the training steps for `course_lib.train.fit`, and the evaluation of
lecture 05 (kNN on frozen features, the CLS token's attention maps).

    model = dino.dino_scenes()  # or dino.DINO(backbone, dino.DINOConfig(...))
    steps = DINOSteps(model, eval_fn=SceneKNN(), eval_every=100)
    fit(model, (images,), epochs=16, batch_size=64, lr=1e-3, weight_decay=0.04, clip_grad=3.0,
        loss_fn=steps.loss_fn, after_step=steps.after_step)

`fit` runs the optimizer (AdamW on the student only: the teacher has no gradient) with its warmup
and cosine learning rate. What DINO adds around it lives here: the multi-crop views of every
batch, the teacher temperature of the current step, and after every optimizer step the EMA
update of the teacher on the cosine momentum schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import data
from ..dino import DINO, teacher_momentum, teacher_temperature
from ..train import extract_features
from ..vit import ViT
from .augment import multi_crop


class DINOSteps:
    """What DINO does at every step of `fit`, and what it records.

    `loss_fn(model, batch)` cuts the multi-crop views of the batch's images (N, C, H, W) in
    [0, 1] (with `keep_object`, the batch's second tensor (N, 2) holds points in [-1, 1] that
    every crop keeps: `object_centres`), and returns the DINO loss with the teacher temperature of this step (the centers are
    updated inside the loss, from this batch). `after_step(step, total_steps)` moves the teacher
    towards the student with the momentum of the step just taken, refreshes the Gram teacher
    every `gram_refresh_every` steps (DINOv3) and calls `eval_fn(model)` every `eval_every` steps
    (and once here, at step 0, before training).

    Recorded: `steps` and `stats` (the loss's diagnostics at every step), `eval_steps` and
    `evals` (what `eval_fn` returned).
    """

    def __init__(
        self,
        model: DINO,
        *,
        seed: int = 0,
        gram_refresh_every: int = 0,
        eval_fn: Callable[[DINO], float] | None = None,
        eval_every: int = 0,
    ):
        if not isinstance(model, DINO):
            raise TypeError(f"DINOSteps trains a course_lib.dino.DINO, got {type(model).__name__}")
        if gram_refresh_every < 0 or eval_every < 0:
            raise ValueError(f"gram_refresh_every and eval_every must be >= 0 (0: never), got {gram_refresh_every} and {eval_every}")
        if eval_every and eval_fn is None:
            raise ValueError("eval_every is set but there is no eval_fn to call")
        self.model, self.gram_refresh_every = model, gram_refresh_every
        self.eval_fn, self.eval_every = eval_fn, eval_every
        self.generator = torch.Generator().manual_seed(seed)  # the crops: the same run every time
        self.step = 0  # optimizer steps taken so far: the schedules read it
        self.steps: list[int] = []
        self.stats: dict[str, list[float]] = {}
        self.eval_steps: list[int] = []
        self.evals: list[float] = []
        if eval_every:
            self._evaluate()

    def loss_fn(self, model: DINO, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, None]:
        c = model.config
        if c.keep_object and len(batch) < 2:
            raise ValueError("keep_object needs the objects' centres as the batch's second tensor: fit(model, (images, centres), ...)")
        views = multi_crop(batch[0], c.n_global, c.n_local, c.global_size, c.local_size, c.global_scale, c.local_scale,
                           c.jitter, self.generator, c.permute_channels, batch[1] if c.keep_object else None)
        tau_t = teacher_temperature(self.step, c.tau_t_warmup_steps, c.tau_t_start, c.tau_t)
        loss, stats = model.loss(views, tau_t)
        self.steps.append(self.step + 1)
        for key, value in stats.items():
            self.stats.setdefault(key, []).append(value)
        return loss, None  # None: no accuracy to count

    def after_step(self, step: int, total_steps: int) -> None:
        c, self.step = self.model.config, step
        # The schedule indexes steps from 0, as DINO's code: step `step` was the (step - 1)-th.
        self.model.update_teacher(teacher_momentum(step - 1, total_steps, c.momentum, c.momentum_final))
        if self.gram_refresh_every and step % self.gram_refresh_every == 0:
            self.model.refresh_gram_teacher()
        if self.eval_every and step % self.eval_every == 0:
            self._evaluate()

    def _evaluate(self) -> None:
        was_training = self.model.training
        self.eval_steps.append(self.step)
        self.evals.append(float(self.eval_fn(self.model)))
        self.model.train(was_training)


def object_centres(scenes) -> torch.Tensor:
    """The large object's centre in every scene, (N, 2) as (x, y) in the [-1, 1] coordinates of
    the crops (`augment.crop_boxes`)."""
    return torch.tensor([[o[0]["x"], o[0]["y"]] for o in scenes["objects"]]) * 2 - 1


def pooled_features(backbone: ViT, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image features (N, D) of a frozen backbone in eval mode: its CLS token, or
    the mean patch token when the backbone was built with ViTConfig(pool="mean")."""
    feats = extract_features(lambda x: backbone.pool(backbone.forward_features(x)), images, batch_size, model=backbone)
    return F.normalize(feats, dim=-1)


def knn_accuracy(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, test_labels: torch.Tensor, k: int = 20, T: float = 0.07
) -> float:
    """Weighted k-nearest-neighbour accuracy on L2-normalised features (DINO's evaluation,
    after Wu et al., 2018): the k most cosine-similar training images vote for their label with
    weight exp(similarity / T)."""
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be (N, D) with one D, got {tuple(train_features.shape)} and {tuple(test_features.shape)}")
    if train_labels.shape != train_features.shape[:1] or test_labels.shape != test_features.shape[:1]:
        raise ValueError(f"one label per feature row: {tuple(train_labels.shape)} labels for {train_features.shape[0]} training rows, "
                         f"{tuple(test_labels.shape)} for {test_features.shape[0]} test rows")
    if k < 1 or T <= 0:
        raise ValueError(f"k must be at least 1 and T positive, got k={k}, T={T}")
    k = min(k, train_features.shape[0])
    sims = F.normalize(test_features, dim=-1) @ F.normalize(train_features, dim=-1).T  # (N_test, N_train)
    top, idx = sims.topk(k, dim=1)  # (N_test, k)
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = torch.zeros(test_features.shape[0], n_classes).scatter_add_(1, train_labels[idx], (top / T).exp())
    return (votes.argmax(dim=1) == test_labels).float().mean().item()


class SceneKNN:
    """The kNN evaluation of lecture 05 and scripts/train_dino.py: `n_train` labelled training
    scenes (seed 1, apart from the unlabelled training images) vote for each of the 500 test
    scenes; each scene attribute (the large object's shape and colour, the background) is its own
    classification task. Calling it on a DINO measures the teacher's backbone and returns the mean
    accuracy over the attributes; `history` keeps every measurement per attribute."""

    def __init__(self, n_train: int = 1000, n_test: int = 500, attributes: Sequence[str] = tuple(data.SCENE_ATTRIBUTES)):
        unknown = set(attributes) - set(data.SCENE_ATTRIBUTES)
        if unknown or not attributes:
            raise ValueError(f"attributes must be some of {list(data.SCENE_ATTRIBUTES)}, got {list(attributes)}")
        self.train_scenes, self.test_scenes = data.scenes(n_train, "train", seed=1), data.scenes(n_test, "test")
        self.train_images, self.test_images = data.to_tensors(self.train_scenes)[0], data.to_tensors(self.test_scenes)[0]
        self.labels = {a: (data.attribute_labels(self.train_scenes, a), data.attribute_labels(self.test_scenes, a)) for a in attributes}
        self.history: dict[str, list[float]] = {a: [] for a in attributes}

    def accuracy(self, train_features: torch.Tensor, test_features: torch.Tensor) -> dict[str, float]:
        """kNN accuracy per attribute of features (n_train, D) and (n_test, D) of the two sets."""
        return {a: knn_accuracy(train_features, y_train, test_features, y_test) for a, (y_train, y_test) in self.labels.items()}

    def backbone_accuracy(self, backbone: ViT) -> dict[str, float]:
        """kNN accuracy per attribute of a backbone's pooled features."""
        return self.accuracy(pooled_features(backbone, self.train_images), pooled_features(backbone, self.test_images))

    def __call__(self, model: DINO) -> float:
        acc = self.backbone_accuracy(model.teacher.backbone)
        for a, v in acc.items():
            self.history[a].append(v)
        return sum(acc.values()) / len(acc)


@torch.no_grad()
def cls_attention_maps(backbone: ViT, images: torch.Tensor) -> torch.Tensor:
    """Last-layer attention of the CLS token to the patches (DINO Fig. 1): (B, heads, gh, gw).

    Register tokens are left out; each map is renormalised to sum to 1 over the patches."""
    if not backbone.config.class_token:
        raise ValueError("cls_attention_maps needs a backbone with a CLS token (ViTConfig(class_token=True))")
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    _, maps = backbone.eval().forward_features(images, return_attention=True)
    attn = maps[-1][:, :, 0, backbone.num_skip_tokens :]  # (B, heads, N)
    attn = attn / attn.sum(dim=-1, keepdim=True)
    gh, gw = images.shape[2] // backbone.patch_embed.patch_size[0], images.shape[3] // backbone.patch_embed.patch_size[1]
    return attn.reshape(*attn.shape[:2], gh, gw)
