"""CLIP on the scenes (lecture 06, scripts/train_clip.py): the loss for `fit`, the logit-scale
clamp that runs after every step, zero-shot classification (CLIP sec. 3.1) with the scenes
tokenizer, and the shipped `clip_scenes` checkpoint with its tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..clip import CLIP, CLIPConfig
from ..train import extract_features
from ..utils import load_checkpoint
from .text import WordTokenizer, caption_tokenizer_from_vocab

CHECKPOINT = "clip_scenes.safetensors"


def batch_loss(model: CLIP, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, None]:
    """`loss_fn` for `course_lib.train.fit` with data (images, token_ids): CLIP's or SigLIP's loss."""
    if len(batch) != 2:
        raise ValueError(f"CLIP trains on (images, token_ids) pairs, got a batch of {len(batch)} tensors")
    return model.loss(batch[0], batch[1]), None


def clamp_logit_scale(model: CLIP) -> Callable[[int, int], None]:
    """`after_step` for `fit`: keep the logit scale at most 100 after every optimizer step (CLIP
    sec. 2.5), in place on `model`'s parameter."""
    return lambda step, total_steps: model.clamp_logit_scale_()


# ----------------------------------------------------------------------------------------------
# Zero-shot classification (CLIP sec. 3.1)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def class_embeddings(model: CLIP, prompts: Sequence[Sequence[str]], tokenizer: WordTokenizer) -> torch.Tensor:
    """One embedding per class from a list of prompts per class: embed each prompt, L2-normalise,
    average over the class's prompts and normalise again ("prompt ensembling", CLIP sec. 3.1.4).
    Returns (C, embed_dim), the weights of a linear classifier on normalised image embeddings."""
    device = model.logit_scale.device
    weights = []
    for class_prompts in prompts:
        if isinstance(class_prompts, str) or len(class_prompts) == 0:
            raise ValueError("every class needs a list of at least one prompt")
        ids = tokenizer.encode_batch(list(class_prompts), model.config.context_length).to(device)
        emb = model.encode_text(ids, normalize=True).mean(dim=0)
        weights.append(F.normalize(emb, dim=-1))
    return torch.stack(weights)


def zero_shot_classifier(
    model: CLIP, class_names: Sequence[str], templates: Sequence[str], tokenizer: WordTokenizer
) -> torch.Tensor:
    """Class weights (C, embed_dim) from class names and prompt templates such as "a large {}":
    each template is filled with each class name, and a class's prompts are ensembled."""
    if len(templates) == 0 or any("{}" not in t for t in templates):
        raise ValueError(f"pass templates with a '{{}}' where the class name goes, got {list(templates)}")
    return class_embeddings(model, [[t.format(name) for t in templates] for name in class_names], tokenizer)


def zero_shot_logits(model: CLIP, images: torch.Tensor, classifier: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images (B, C, H, W) and class weights (K, D) -> scaled cosine logits (B, K); argmax = class."""
    if classifier.ndim != 2 or classifier.shape[1] != model.config.embed_dim:
        raise ValueError(
            f"class weights must be (classes, {model.config.embed_dim}), got {tuple(classifier.shape)}: build them with zero_shot_classifier"
        )
    image_emb = extract_features(lambda x: model.encode_image(x, normalize=True), images, batch_size, model=model)
    return image_emb.to(classifier.device) @ classifier.T * model.logit_scale.exp().item()


# ----------------------------------------------------------------------------------------------
# The shipped checkpoint (scripts/train_clip.py)
# ----------------------------------------------------------------------------------------------
def load_scenes_clip(path: str = CHECKPOINT) -> tuple[CLIP, WordTokenizer, dict[str, str]]:
    """The CLIP trained on scenes captions by scripts/train_clip.py: (model, tokenizer, metadata)."""
    model, meta = load_checkpoint(path, CLIP, CLIPConfig)
    if "vocab" not in meta:
        raise ValueError(f"{path} stores no vocabulary: was it written by scripts/train_clip.py?")
    return model, caption_tokenizer_from_vocab(json.loads(meta.pop("vocab"))), meta
