"""A small training loop shared by the lectures: AdamW with the course's weight-decay groups,
linear warmup then cosine decay, a progress bar, and a history of loss, accuracy and images/s.

The loss is pluggable: `loss_fn(model, batch) -> (loss, n_correct or None)`, so that MAE, DINO
and CLIP lectures train with the same loop as the classifiers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .layers import param_groups
from .utils import autocast, get_device

Batch = tuple[torch.Tensor, ...]


@dataclass
class History:
    """What `fit` records: per logged step the loss, per epoch the accuracies, and throughput."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    eval_acc: list[float] = field(default_factory=list)
    images_per_s: float = 0.0
    seconds: float = 0.0


def classification_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = batch[0], batch[1]
    logits = model(images)
    return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).sum()


def cosine_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batches(tensors: Batch, batch_size: int, shuffle: bool, generator: torch.Generator | None = None):
    """Minibatches of a tuple of equal-length tensors (no DataLoader worker overhead on CPU)."""
    n = tensors[0].shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        yield tuple(t[idx] for t in tensors)


@torch.no_grad()
def evaluate(model: nn.Module, data: Batch, batch_size: int = 256, loss_fn=classification_loss, device=None) -> float:
    """Accuracy of `model` on (images, labels)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for batch in batches(data, batch_size, shuffle=False):
        batch = tuple(t.to(device) for t in batch)
        with autocast(device):
            _, c = loss_fn(model, batch)
        correct += int(c)
    model.train(was_training)
    return correct / data[0].shape[0]


def fit(
    model: nn.Module,
    data: Batch,
    *,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: float = 0.1,
    loss_fn: Callable = classification_loss,
    eval_data: Batch | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
    log_every: int = 5,
) -> History:
    """Train `model` on `data` (a tuple of tensors, images first) and return its History.

    `augment` is applied to the images of each training batch. Accuracy is recorded when
    `loss_fn` returns a correct-count (the default classification loss does).
    """
    from tqdm.auto import tqdm

    if not isinstance(data, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in data):
        raise TypeError("fit expects data as a tuple of tensors, e.g. (images, labels)")
    if len({t.shape[0] for t in data}) != 1:
        raise ValueError(f"the tensors in data have different lengths: {[t.shape[0] for t in data]}")
    device = get_device(device) if not isinstance(device, torch.device) else device
    model.to(device).train()
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=fused)
    steps_per_epoch = math.ceil(data[0].shape[0] / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(total, int(warmup * total)))
    gen = torch.Generator().manual_seed(seed)
    hist = History()
    seen, start, step = 0, time.perf_counter(), 0
    bar = tqdm(total=total, desc="training", disable=not progress, leave=True)
    for epoch in range(epochs):
        correct, count = 0, 0
        for batch in batches(tuple(data), batch_size, shuffle=True, generator=gen):
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            if augment is not None:
                batch = (augment(batch[0]),) + batch[1:]
            with autocast(device):
                loss, c = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            seen += batch[0].shape[0]
            if c is not None:
                correct, count = correct + int(c), count + batch[0].shape[0]
            if step % log_every == 0 or step == total:
                hist.step.append(step)
                hist.loss.append(loss.item())
                bar.set_postfix(loss=f"{hist.loss[-1]:.3f}")
            bar.update(1)
        if count:
            hist.train_acc.append(correct / count)
        if eval_data is not None:
            hist.eval_acc.append(evaluate(model, eval_data, loss_fn=loss_fn, device=device))
    bar.close()
    hist.seconds = time.perf_counter() - start
    hist.images_per_s = seen / hist.seconds
    model.eval()
    return hist
