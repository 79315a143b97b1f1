"""Several processes training one model (data parallelism under `torchrun`), kept apart from the
training loop so that `train.fit` reads on one screen.

Every helper here also works in a single process: there it does nothing (rank 0 of 1, no
all-reduce, no wrapping), so the same code runs in a notebook and on eight GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

Batch = tuple[torch.Tensor, ...]


def distributed_info() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap_distributed(step_fn: nn.Module, strategy: str, device: torch.device, model: nn.Module | None = None) -> nn.Module:
    """Wrap the training computation for data-parallel training on the process group of torchrun.

    "ddp": every process holds the whole model; gradients are averaged across processes
    (DistributedDataParallel). "fsdp": parameters, gradients and optimizer state are sharded
    across processes and gathered block by block when needed (FSDP2's `fully_shard`), for models
    that do not fit in one device's memory. `model` is the network inside `step_fn` (FSDP shards
    its transformer blocks, then the rest; the loss must call `model(...)` so that FSDP gathers).
    """
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(step_fn, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        inner = step_fn if model is None else model
        for module in inner.modules():  # shard each transformer block, then the rest
            if hasattr(module, "attn") and hasattr(module, "mlp"):
                fully_shard(module)
        fully_shard(inner)
        return step_fn
    raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")


def shard_batch(batch: Batch, rank: int, world: int) -> tuple[Batch, float]:
    """This process's slice of a global batch, and the weight that makes the average of the
    per-process mean losses equal to the mean loss of the global batch (slices may differ by one)."""
    n = batch[0].shape[0]
    lo, hi = n * rank // world, n * (rank + 1) // world
    return tuple(t[lo:hi] for t in batch), (hi - lo) * world / n


def sum_over_processes(x: torch.Tensor | int | float, device: torch.device) -> torch.Tensor | int | float:
    """Sum of a scalar over all processes (`x` itself when there is one process)."""
    if distributed_info()[1] == 1:
        return x
    x = torch.as_tensor(x, dtype=torch.float64, device=device).clone()
    dist.all_reduce(x)
    return x


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's complete weights on the CPU, also when FSDP has sharded them across processes
    (every process must call it; save the result on rank 0)."""
    if distributed_info()[1] == 1:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
