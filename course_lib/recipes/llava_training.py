"""Training LLaVA on the scenes: the chat template, batches of precomputed vision features, the
`loss_fn`s for `course_lib.train.fit`, and held-out accuracy per question kind.

The chat template (LLaVA's, with the scenes vocabulary):
    <bos> <image> x N  <user> question <assistant> answer <eos>  <user> ... <eos>
The vision tower stays frozen in both stages (as in LLaVA), so its patch features are computed
once (`image_features`) and training runs only the connector and the language model.
An answer counts as correct when greedy decoding would produce it: the argmax at every answer
position, <eos> included, equals the answer token (one teacher-forced pass gives that exactly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..llava import IGNORE_INDEX, Llava, answer_labels, next_token_loss, select_best_resolution, splice_image_features, vision_features
from .text import WordTokenizer, pad_batch
from . import instructions as I
from .instructions import ASSISTANT, USER


def chat_ids(turns: Sequence[tuple[str, str]], tok: WordTokenizer, num_image_tokens: int = 0, context: str = "") -> list[int]:
    """Token ids of one conversation: <bos>, the image placeholders (or a text `context`, e.g. the
    true caption for the LM's ceiling), then every turn."""
    text = " ".join(["<image>"] * num_image_tokens + ([context] if context else []))
    text += "".join(f" {USER} {q} {ASSISTANT} {a} <eos>" for q, a in turns)
    return tok.encode(text, bos=True)


def encode_samples(
    samples: Sequence[dict], tok: WordTokenizer, num_image_tokens: Sequence[int] | int = 0, contexts: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, T), labels (B, T): the answers only, last (B, T) bool: the last answer's tokens,
    which accuracy is measured on). Rows are right-padded with <pad>."""
    counts = [num_image_tokens] * len(samples) if isinstance(num_image_tokens, int) else num_image_tokens
    rows = [chat_ids(s["turns"], tok, n, contexts[i] if contexts else "") for i, (s, n) in enumerate(zip(samples, counts))]
    ids = pad_batch(rows, tok.pad_id)
    start, end = tok.ids[ASSISTANT], tok.eos_id
    labels = answer_labels(ids, start, end)
    last_start = torch.where(ids == start, torch.arange(ids.shape[1]), -1).amax(1, keepdim=True)  # (B, 1)
    last = (labels != IGNORE_INDEX) & (torch.arange(ids.shape[1]) > last_start)
    return ids, labels, last


def image_features(model: Llava, images: torch.Tensor | Sequence[torch.Tensor], batch_size: int = 256) -> torch.Tensor:
    """The frozen tower's patch features of every view, (B, V, N, D_vision), zero-padded to the
    most views (V = 1 without AnyRes). AnyRes images may be a list of different sizes."""
    from ..llava import anyres_views
    from ..train import extract_features

    c = model.config
    views = [images[i : i + 1] for i in range(len(images))] if c.grid_pinpoints is None else [
        anyres_views(im, c.grid_pinpoints, c.tile_size) for im in images
    ]
    counts = [len(v) for v in views]
    flat = extract_features(lambda x: vision_features(model.vision_tower, x, c.feature_layer), torch.cat(views), batch_size, model)
    out = flat.new_zeros(len(views), max(counts), *flat.shape[1:])
    for i, f in enumerate(flat.split(counts)):
        out[i, : len(f)] = f
    return out


def trim_padding(ids: torch.Tensor, *others: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor, ...]:
    """Cut the columns that are padding in every row (B, T) -> (B, T'): a batch of short samples
    then costs what its longest sample costs, not what the longest sample of the dataset costs."""
    T = int((ids != pad_id).any(0).nonzero().max()) + 1
    return (ids[:, :T],) + tuple(o[:, :T] for o in others)


def _logits(model: Llava, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """batch: (features (B, V, N, D) or a dummy (B,) for text-only rows, ids, labels, last[, sizes]);
    the ids must already be trimmed to the labels' length."""
    features, ids = batch[0], batch[1]
    embeds = model.lm.embed(ids)
    if features.ndim > 1:
        c = model.config
        sizes = batch[4].tolist() if len(batch) > 4 else None
        if sizes is None:
            per_image = list(features)
        else:  # AnyRes: the base view and the tiles of the image's grid; the rest is padding
            grids = [select_best_resolution(s, c.grid_pinpoints) for s in sizes]
            per_image = [f[: 1 + (h // c.tile_size) * (w // c.tile_size)] for f, (h, w) in zip(features, grids)]
        tokens = model.tokens_from_features(per_image, sizes)
        embeds = splice_image_features(embeds, ids, torch.cat(tokens), c.image_token_id)
    return model.lm(inputs_embeds=embeds)


def llava_loss(model: Llava, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """`loss_fn` for fit: the answer-only loss, and the count of rows whose last answer is right."""
    batch = (batch[0], *trim_padding(*batch[1:4]), *batch[4:])
    logits = _logits(model, batch)
    return next_token_loss(logits, batch[2]), answers_correct(logits, batch[2], batch[3]).sum()


def answers_correct(logits: torch.Tensor, labels: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the argmax at every position of the last answer is the answer token."""
    hit = logits[:, :-1].argmax(-1) == labels[:, 1:]  # position t predicts token t + 1
    need = last[:, 1:]
    return (hit | ~need).all(1) & need.any(1)


@torch.no_grad()
def accuracy_by_kind(model: Llava, data: tuple[torch.Tensor, ...], kinds: Sequence[str], batch_size: int = 256) -> dict[str, float]:
    """Held-out accuracy of the last answer, per question kind and over all."""
    model.eval()
    correct = []
    for i in range(0, len(kinds), batch_size):
        batch = tuple(t[i : i + batch_size] for t in data)
        batch = (batch[0], *trim_padding(*batch[1:4]), *batch[4:])
        correct.append(answers_correct(_logits(model, batch), batch[2], batch[3]))
    ok = torch.cat(correct)
    out = {k: round(ok[[j for j, kk in enumerate(kinds) if kk == k]].float().mean().item(), 3) for k in dict.fromkeys(kinds)}
    out["all"] = round(ok.float().mean().item(), 3)
    return out


def lm_text_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, None]:
    """`loss_fn` for pretraining the language model on text (ids, labels): every token counts."""
    ids, labels = trim_padding(*batch)
    return next_token_loss(model(ids), labels), None


def set_trainable(model: Llava, connector: bool, lm: bool) -> Llava:
    """Stage 1: connector only. Stage 2: connector and LM. The vision tower is always frozen.
    LoRA factors (if any) train whenever the LM does not."""
    for name, p in model.named_parameters():
        if name.startswith("vision_tower."):
            p.requires_grad_(False)
        elif name.startswith("lm."):
            p.requires_grad_(lm or name.endswith(("lora_A", "lora_B")))
        else:
            p.requires_grad_(connector)
    return model


def instruction_data(model: Llava, records: list[dict], images: torch.Tensor, tok: WordTokenizer, caption_only: bool = False):
    """Training or test data for `fit` / `accuracy_by_kind`: ((features, ids, labels, last), kinds),
    one sample of each instruction kind per scene, or the brief captions of stage 1."""
    samples = [I.caption_sample(r) for r in records] if caption_only else [s for i, r in enumerate(records) for s in I.instructions(r, i)]
    per_scene = 1 if caption_only else len(I.KINDS)
    feats = image_features(model, images).repeat_interleave(per_scene, 0)
    ids, labels, last = encode_samples(samples, tok, model.num_image_tokens(tuple(images.shape[-2:])))
    return (feats, ids, labels, last), [s["kind"] for s in samples]


def text_eval_data(records: list[dict], tok: WordTokenizer, with_caption: bool):
    """The instructions without an image, for the LM alone; or with the true caption in its place
    (the ceiling: what the LM answers when the image is described perfectly)."""
    samples = [s for i, r in enumerate(records) for s in I.instructions(r, i)]
    contexts = [r["caption"] for r in records for _ in I.KINDS] if with_caption else None
    ids, labels, last = encode_samples(samples, tok, 0, contexts)
    return (torch.zeros(len(samples)), ids, labels, last), [s["kind"] for s in samples]


def panorama_data(model: Llava, n: int, split: str, tok: WordTokenizer, one_view: bool):
    """AnyRes data: ((features, ids, labels, last[, sizes]), kinds, image tokens per panorama).
    `one_view`: each panorama padded to a square and resized to one encoder input (LLaVA-1.5)."""
    images, samples = zip(*(I.panorama(i, split) for i in range(n)))
    if one_view:  # LLaVA-1.5: pad to a square, resize to the encoder's input
        views, size = [], model.config.tile_size
        for im in images:
            side = max(im.shape[1:])
            top, left = (side - im.shape[1]) // 2, (side - im.shape[2]) // 2
            canvas = F.pad(im, (left, side - im.shape[2] - left, top, side - im.shape[1] - top))
            views.append(F.interpolate(canvas[None], size=(size, size), mode="bilinear", antialias=True)[0])
        feats, counts, extra = image_features(model, torch.stack(views)), [model.num_image_tokens((size, size))] * n, ()
    else:
        feats = image_features(model, list(images))
        counts = [model.num_image_tokens(im.shape[1:]) for im in images]
        extra = (torch.tensor([list(im.shape[1:]) for im in images]),)
    ids, labels, last = encode_samples(samples, tok, counts)
    return (feats, ids, labels, last, *extra), [s["kind"] for s in samples], sum(counts) / n
