"""Reading Hugging Face `transformers` checkpoints, for every family's `from_hf`.

A checkpoint can arrive three ways, and each family's converter sees the same thing, a config and
a flat state dict:
- a `transformers` model instance (weight names as in memory, e.g. `layers.0.attention.q_proj`);
- a local folder written by `save_pretrained` or downloaded from the hub (names as on disk, e.g.
  `encoder.layer.0.attention.attention.query` in transformers 5.x);
- a hub id such as "google/vit-base-patch16-224" (downloaded once, online only).
The family modules rename both spellings to their own names with `rename_keys`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


def load_hf_checkpoint(source: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Return (config, state_dict) for a model instance, a local folder or a hub id.

    The config is the model's `transformers` config object, or, for files, a namespace read from
    config.json with the same attribute names.
    """
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        return source.config, {k: v.detach().clone() for k, v in source.state_dict().items()}
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"from_hf expects a transformers model, a folder or a hub id, got {type(source).__name__}"
        )
    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors"]))
        except Exception as err:  # offline, unknown id, no permission
            raise OSError(
                f"could not find a local folder or download the hub checkpoint {source!r} ({err}). "
                "Offline, pass a transformers model instance or a folder written by save_pretrained."
            ) from err
    return _config_from_folder(folder), _state_dict_from_folder(folder)


def _config_from_folder(folder: Path) -> SimpleNamespace:
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no config.json: is it a save_pretrained folder?")
    raw = json.loads(path.read_text())

    def to_ns(d: Any) -> Any:
        return SimpleNamespace(**{k: to_ns(v) for k, v in d.items()}) if isinstance(d, dict) else d

    return to_ns(raw)


def _state_dict_from_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if not bins:
            raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
        state: dict[str, torch.Tensor] = {}
        for b in bins:
            state.update(torch.load(b, map_location="cpu", weights_only=True))
        return state
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def rename_keys(state_dict: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply regex substitutions (pattern, replacement) in order to every key."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def fuse_qkv(state_dict: dict[str, torch.Tensor], prefix_pattern: str = r"(.*)\.attn\.q\.(weight|bias)$") -> dict[str, torch.Tensor]:
    """Concatenate separate `attn.q/k/v` tensors into one `attn.qkv` tensor (q, k, v order).

    A missing k bias (CLIP-style models without one) is filled with zeros.
    """
    out = dict(state_dict)
    for key in list(state_dict):
        m = re.match(prefix_pattern, key)
        if not m:
            continue
        base, kind = m.group(1), m.group(2)
        q = out.pop(f"{base}.attn.q.{kind}")
        k = out.pop(f"{base}.attn.k.{kind}", torch.zeros_like(q))
        v = out.pop(f"{base}.attn.v.{kind}")
        out[f"{base}.attn.qkv.{kind}"] = torch.cat([q, k, v], dim=0)
    return out


def cfg(config: Any, name: str, default: Any = None) -> Any:
    """Read an attribute from a transformers config or a config.json namespace."""
    return getattr(config, name, default)


def source_name(source: Any) -> str:
    """How an error message names a checkpoint: its path or hub id, or the model's class name."""
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def check_model_type(config: Any, expected: tuple[str, ...], loader: str) -> str:
    """The config's model_type if `loader` reads it, else a ValueError that says what was given."""
    model_type = cfg(config, "model_type", expected[0])
    if model_type not in expected:
        raise ValueError(
            f"{loader} reads {', '.join(expected)} checkpoints, got model_type {model_type!r}: "
            "load it with its own family's from_hf (course_lib.vit, course_lib.swin, course_lib.convnext, ...)"
        )
    return model_type


def require_gelu(config: Any, family: str) -> None:
    """course_lib's families use the exact GELU; other activations would load and silently differ."""
    act = cfg(config, "hidden_act", "gelu")
    if act != "gelu":
        raise NotImplementedError(f"activation {act!r}: course_lib's {family} uses exact GELU")


def encoder_fields(config: Any) -> dict[str, Any]:
    """The fields every ViT-style transformers config (ViT, DeiT, DINOv2, ViTMAE) spells alike,
    under course_lib's names: image and patch size, channels, width, depth, heads, qkv bias, eps."""
    return dict(
        image_size=cfg(config, "image_size"),
        patch_size=cfg(config, "patch_size"),
        in_chans=cfg(config, "num_channels", 3),
        dim=cfg(config, "hidden_size"),
        depth=cfg(config, "num_hidden_layers"),
        num_heads=cfg(config, "num_attention_heads"),
        qkv_bias=cfg(config, "qkv_bias", True),
        eps=cfg(config, "layer_norm_eps", 1e-12),
    )
