"""Devices, precision and reproducibility."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def get_device(prefer: str | None = None) -> torch.device:
    """The best available device: CUDA, then Apple's MPS, then the CPU (or `prefer` if given)."""
    if prefer is not None:
        try:
            return torch.device(prefer)
        except RuntimeError as err:
            raise ValueError(f"unknown device {prefer!r}: use 'cpu', 'cuda', 'cuda:1' or 'mps' ({err})") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device | str, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (where it is fast and safe for these models); fp32 elsewhere."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch so that a notebook prints the same numbers every run."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise TypeError(f"the seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and requires_grad False on every parameter: a frozen part of a model (the image
    encoder and language model of a vision-language model, a DINO teacher)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those that train, with trainable_only=True)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass (what papers report as "FLOPs"), counted by
    torch's FLOP counter on a zero input; norms and activations are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    was_training = model.training
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(input_shape, dtype=param.dtype, device=param.device))
    model.train(was_training)
    return counter.get_total_flops() // 2


# ----------------------------------------------------------------------------------------------
# Checkpoints: safetensors weights with the model's config in the metadata
# ----------------------------------------------------------------------------------------------
CHECKPOINTS = __import__("pathlib").Path(__file__).parent / "checkpoints"


def save_checkpoint(model: torch.nn.Module, path, **metadata: str) -> None:
    """Save weights as safetensors, with `model.config` (a dataclass) as JSON in the metadata."""
    import dataclasses
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    if not dataclasses.is_dataclass(getattr(model, "config", None)):
        raise TypeError(
            f"save_checkpoint stores model.config (a dataclass) beside the weights, and this "
            f"{type(model).__name__} has none: save a course_lib model, or its state_dict with safetensors"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(dataclasses.asdict(model.config)), **{k: str(v) for k, v in metadata.items()}}
    save_file(state, str(path), metadata=meta)


def load_checkpoint(path, model_cls, config_cls) -> tuple[torch.nn.Module, dict[str, str]]:
    """Rebuild a model saved by `save_checkpoint`: returns (model in eval mode, metadata).

    `path` may be a file or the name of a checkpoint shipped in course_lib/checkpoints/.
    """
    import json
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    from .layers import load_state_dict_checked

    path = Path(path)
    if not path.exists() and (CHECKPOINTS / path.name).exists():
        path = CHECKPOINTS / path.name
    if not path.exists():
        shipped = sorted(p.name for p in CHECKPOINTS.glob("*.safetensors"))
        raise FileNotFoundError(f"no checkpoint at {path}; shipped checkpoints: {shipped}")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "config" not in meta:
        raise ValueError(f"{path} has no config in its metadata: was it written by save_checkpoint?")
    model = model_cls(config_cls(**json.loads(meta.pop("config"))))
    load_state_dict_checked(model, load_file(str(path)), source=str(path))
    return model.eval(), meta
