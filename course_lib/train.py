"""A small training loop shared by the lectures: AdamW with the course's weight-decay groups,
linear warmup then cosine decay, a progress bar, and a history of loss, accuracy and images/s.

The loss is pluggable: `loss_fn(model, batch) -> (loss, n_correct or None)`, so that MAE, DINO
and CLIP lectures train with the same loop as the classifiers (their loss_fns live in
`course_lib.recipes`), and `after_step` runs what a recipe does between steps. Several processes
under torchrun: `course_lib.distributed` wraps, shards and sums; `fit` only calls it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import distributed_info, shard_batch, sum_over_processes, wrap_distributed
from .layers import param_groups
from .utils import autocast, get_device

Batch = tuple[torch.Tensor, ...]


@dataclass
class History:
    """What `fit` records: per logged step the loss, per epoch the accuracies, and throughput."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)  # of all gradients, at the logged steps
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
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {total_steps} and {warmup_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batches(tensors: Batch, batch_size: int, shuffle: bool, generator: torch.Generator | None = None):
    """Minibatches of a tuple of equal-length tensors (no DataLoader worker overhead on CPU)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n = tensors[0].shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        yield tuple(t[idx] for t in tensors)


class _LossModule(nn.Module):
    """`loss_fn(model, batch)` as a module, so that DistributedDataParallel and torch.compile see
    the whole training computation (whatever method of the model the loss calls)."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *batch: torch.Tensor):
        return self.loss_fn(self.model, batch)


@torch.no_grad()
def evaluate(model: nn.Module, data: Batch, batch_size: int = 256, loss_fn=classification_loss, device=None) -> float:
    """Accuracy of `model` on (images, labels)."""
    _check_data(data, "data")
    device = device or next(model.parameters()).device
    return _accuracy(model, _LossModule(model, loss_fn), data, batch_size, device)


@torch.no_grad()
def _accuracy(model: nn.Module, step_fn: Callable, data: Batch, batch_size: int, device) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for batch in batches(data, batch_size, shuffle=False):
        batch = tuple(t.to(device) for t in batch)
        with autocast(device):
            _, c = step_fn(*batch)
        correct += int(c)
    model.train(was_training)
    return correct / data[0].shape[0]


@torch.no_grad()
def extract_features(
    fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    batch_size: int = 256,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """`fn` applied to `inputs` in batches, without gradients: (N, ...) -> (N, ...) on the CPU.

    The one feature extractor of the course: `fn` is whatever maps a batch to features
    (`backbone.forward_features`, a lambda that pools the CLS token, a CLIP image tower). Pass
    `model` (the module `fn` belongs to) to run it in eval mode and on its device; its training
    mode is restored afterwards.
    """
    if inputs.shape[0] == 0:
        raise ValueError("extract_features got no inputs (a tensor of length 0)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    was_training = model.training if model is not None else False
    device = next(model.parameters()).device if model is not None else inputs.device
    if model is not None:
        model.eval()
    try:
        out = [fn(batch.to(device)).cpu() for batch in inputs.split(batch_size)]
    finally:
        if model is not None:
            model.train(was_training)
    return torch.cat(out)


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
    clip_grad: float | None = None,
    compile: bool = False,
    channels_last: bool = False,
    fused: bool | None = None,
    strategy: str = "ddp",
    after_step: Callable[[int, int], None] | None = None,
) -> History:
    """Train `model` on `data` (a tuple of tensors, images first) and return its History.

    `augment` is applied to the images of each training batch. Accuracy is recorded when
    `loss_fn` returns a correct-count (the default classification loss does). `clip_grad` caps
    the norm of all gradients together (the norm is logged either way).

    Speed: on a GPU the optimizer is fused AdamW (`fused=None` means: on CUDA) and matmuls run
    in bf16 autocast;
    `compile=True` wraps the training computation in `torch.compile` and `channels_last=True`
    stores images and convolution weights channels-last (faster for ConvNeXt on GPUs).

    Several processes: under `torchrun`, after `torch.distributed.init_process_group`, each of
    the N processes trains on its 1/N slice of every global batch of `batch_size` images
    (`strategy="ddp"` or the sharded `"fsdp"`); the result equals one process training on the
    whole batch. `scripts/train_distributed.py` is the recipe.

    `after_step(step, total_steps)` runs after every optimizer step (step counts from 1), under
    `torch.no_grad()`: the place for what a recipe does between steps (DINO's EMA teacher update,
    CLIP's clamp of the logit scale).
    """
    from tqdm.auto import tqdm

    _check_fit_args(model, data, epochs, batch_size, lr, warmup, eval_data)
    rank, world = distributed_info()
    if world > 1 and batch_size < world:
        raise ValueError(f"batch_size {batch_size} is smaller than the number of processes ({world}): each needs at least one image")
    device = get_device(device) if not isinstance(device, torch.device) else device
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format).train()
    step_fn: nn.Module = _LossModule(model, loss_fn)
    if world > 1:
        step_fn = wrap_distributed(step_fn, strategy, device, model)
    if compile:
        step_fn = torch.compile(step_fn)
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=device.type == "cuda" if fused is None else fused)
    total = epochs * math.ceil(data[0].shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(total, int(warmup * total)))
    gen = torch.Generator().manual_seed(seed)  # the same on every process: same global batches
    hist, seen, step, start = History(), 0, 0, time.perf_counter()
    bar = tqdm(total=total, desc="training", disable=not progress or rank > 0, leave=True)
    for epoch in range(epochs):
        correct, count = 0, 0
        for batch in batches(tuple(data), batch_size, shuffle=True, generator=gen):
            n_global = batch[0].shape[0]
            batch, weight = shard_batch(batch, rank, world)  # this process's slice
            batch = _to_device(batch, device, augment, channels_last)
            with autocast(device):
                loss, c = step_fn(*batch)
            opt.zero_grad(set_to_none=True)
            (loss * weight).backward()
            log = step + 1 == total or (step + 1) % log_every == 0
            if clip_grad is not None or log:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad or math.inf)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a sharded norm
            opt.step()
            sched.step()
            step += 1
            if after_step is not None:
                with torch.no_grad():
                    after_step(step, total)
            seen += n_global
            if c is not None:
                correct, count = correct + int(sum_over_processes(c, device)), count + n_global
            if log:
                hist.step.append(step)
                hist.grad_norm.append(float(norm))
                hist.loss.append(float(sum_over_processes(loss.detach().float() * weight, device)) / world)
                bar.set_postfix(loss=f"{hist.loss[-1]:.3f}")
            bar.update(1)
        if count:
            hist.train_acc.append(correct / count)
        if eval_data is not None:
            hist.eval_acc.append(_accuracy(model, step_fn, eval_data, 256, device))
    bar.close()
    hist.seconds = time.perf_counter() - start
    hist.images_per_s = seen / hist.seconds
    model.eval()
    return hist


def _to_device(batch: Batch, device: torch.device, augment, channels_last: bool) -> Batch:
    """Move a batch to the device, augment its images, store them channels-last if asked."""
    batch = tuple(t.to(device, non_blocking=True) for t in batch)
    if augment is not None:
        batch = (augment(batch[0]),) + batch[1:]
    if channels_last and batch[0].dim() == 4:
        batch = (batch[0].contiguous(memory_format=torch.channels_last),) + batch[1:]
    return batch


def _check_data(data, name: str) -> None:
    if not isinstance(data, (tuple, list)) or not data or not all(isinstance(t, torch.Tensor) for t in data):
        raise TypeError(f"{name} must be a tuple of tensors, e.g. (images, labels) or (images,), got {type(data).__name__}")
    lengths = [t.shape[0] if t.ndim else 0 for t in data]
    if len(set(lengths)) != 1:
        raise ValueError(f"the tensors in {name} have different lengths: {lengths}; one row per example in each")
    if lengths[0] == 0:
        raise ValueError(f"{name} is empty (0 examples): nothing to train or evaluate on; check the dataset split and its size")


def _check_fit_args(model, data, epochs, batch_size, lr, warmup, eval_data) -> None:
    """Clear errors for what would otherwise fail deep inside the loop (or silently not train)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fit trains an nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (all frozen?): unfreeze the parts to train")
    _check_data(data, "data")
    if eval_data is not None:
        _check_data(eval_data, "eval_data")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup is a fraction of the training steps in [0, 1), got {warmup}")
