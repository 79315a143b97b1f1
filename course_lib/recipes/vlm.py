"""The frozen parts of lectures 07 and 08 on the scenes: the image encoder and the TinyLM, how
scripts/train_vlm_parts.py trains them (through `fit`), and how a language model's answers to
the scenes questions are read and scored.

- image encoder: a ViT trained with `AttributeProbe`, a multi-label head (dropped afterwards) that
  names the shape and colour in each cell of the 3x3 layout and the number of objects;
- language model: `TinyLM` on text only (`lm_examples`): captions and "question answer" texts,
  the same after a run of <image> placeholders, and a caption *before* <bos> followed by a
  question about it or by the caption again (so that it learns to read what precedes <bos>);
- answers: greedy answers to every question of a dataset after an optional soft prompt, and their
  exact-match accuracy per question type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import data
from ..tinylm import TinyLM, TinyLMConfig, lm_loss
from ..train import extract_features
from ..utils import freeze, load_checkpoint
from ..vit import ViT, ViTConfig
from .text import WordTokenizer, pad_batch, scene_texts

LM_CHECKPOINT = "tinylm_scenes.safetensors"
IMAGE_ENCODER_CHECKPOINT = "image_encoder_scenes.safetensors"
QUESTION_TYPES = ("shape", "color", "count", "position", "yes/no")  # the order of a scene's questions


def load_frozen_lm(path=LM_CHECKPOINT) -> TinyLM:
    """The shipped TinyLM (trained by scripts/train_vlm_parts.py), frozen."""
    return freeze(load_checkpoint(path, TinyLM, TinyLMConfig)[0])


def load_frozen_image_encoder(path=IMAGE_ENCODER_CHECKPOINT) -> ViT:
    """The shipped ViT image encoder (patch 8 on 32x32 scenes, width 64, no head), frozen.

    `encoder.forward_features(images)` gives (B, 1 + 16, 64): the CLS token and 4x4 patch tokens,
    trained to carry the shape, colour and position of every object and their count.
    """
    return freeze(load_checkpoint(path, ViT, ViTConfig)[0])


def encode_images(encoder: nn.Module, ds, batch_size: int = 500) -> torch.Tensor:
    """The frozen encoder's tokens for every image of a scenes dataset: (N, 1 + patches, width)."""
    images, _ = data.to_tensors(ds)
    return extract_features(encoder.forward_features, images, batch_size, model=encoder)


# ----------------------------------------------------------------------------------------------
# Training the image encoder: the attribute probe
# ----------------------------------------------------------------------------------------------
N_SHAPE, N_COLOR = len(data.SHAPES) + 1, len(data.COLORS) + 1  # + "nothing in this cell"


def attribute_targets(ds) -> torch.Tensor:
    """(N, 9 + 9 + 1) long: the shape index per cell (5 = none), the colour index per cell (6 = none), count - 1."""
    rows = []
    for objects in ds["objects"]:
        shape, color = [N_SHAPE - 1] * 9, [N_COLOR - 1] * 9
        for o in objects:
            cell = data.POSITIONS.index(o["position"])
            shape[cell], color[cell] = data.SHAPES.index(o["shape"]), list(data.COLORS).index(o["color"])
        rows.append(shape + color + [len(objects) - 1])
    return torch.tensor(rows)


class AttributeProbe(nn.Module):
    """Encoder + heads that read the attributes from the patch tokens: the token grid is
    average-pooled to the 3x3 layout and one shared linear head names the shape and colour of each
    cell, so each patch token must describe what lies under it; the count is read from the mean."""

    def __init__(self, encoder: ViT):
        super().__init__()
        self.encoder = encoder
        D = encoder.config.dim
        self.cell_head = nn.Linear(D, N_SHAPE + N_COLOR)
        self.count_head = nn.Linear(D, 3)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gh, gw = self.encoder.config.grid
        tokens = self.encoder.forward_features(images)[:, -gh * gw :]  # (B, g*g, D): the patch tokens, after CLS and registers
        B, N, D = tokens.shape
        g = int(N**0.5)
        grid = tokens.transpose(1, 2).reshape(B, D, g, g)  # (B, D, g, g)
        cells = F.adaptive_avg_pool2d(grid, 3).flatten(2).transpose(1, 2)  # (B, 9, D), row-major like POSITIONS
        out = self.cell_head(cells)  # (B, 9, N_SHAPE + N_COLOR)
        return out[..., :N_SHAPE], out[..., N_SHAPE:], self.count_head(tokens.mean(1))


def attribute_loss(probe: AttributeProbe, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """`loss_fn` for `fit` with data (images, attribute_targets): the summed cross-entropies, and
    the number of scenes read exactly (all 19 attributes right)."""
    images, y = batch
    shape, color, count = probe(images)
    loss = (F.cross_entropy(shape.reshape(-1, N_SHAPE), y[:, :9].reshape(-1))
            + F.cross_entropy(color.reshape(-1, N_COLOR), y[:, 9:18].reshape(-1)) + F.cross_entropy(count, y[:, 18]))
    exact = (shape.argmax(-1) == y[:, :9]).all(1) & (color.argmax(-1) == y[:, 9:18]).all(1) & (count.argmax(-1) == y[:, 18])
    return loss, exact.sum()


# ----------------------------------------------------------------------------------------------
# Training the language model
# ----------------------------------------------------------------------------------------------
def lm_examples(ds, tok: WordTokenizer, max_prefix: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The TinyLM's training data (ids (M, L), targets (M, L), -100 where nothing is predicted):

    - every caption and "question answer" text as <bos> text <eos>;
    - the same texts after 1..max_prefix <image> placeholders (never predicted): the LM learns to
      read text that starts later than position 0, and that a prefix which says nothing changes nothing;
    - caption words, then <bos> question answer <eos> for each of a scene's questions (targets: the
      answer and <eos>), and caption words, then <bos> caption <eos> (targets: the caption).
    """
    if max_prefix < 1:
        raise ValueError(f"max_prefix must be at least 1, got {max_prefix}")
    ids, targets = [], []
    for text in scene_texts(ds):
        t = tok.encode(text, bos=True, eos=True)
        k = int(torch.randint(1, max_prefix + 1, (), generator=generator))
        ids += [t, [tok.image_id] * k + t]
        targets += [t, [-100] * k + t]
    for caption, questions, answers in zip(ds["caption"], ds["questions"], ds["answers"]):
        context = tok.encode(caption)
        for q, a in zip(questions, answers):
            question, answer = tok.encode(q, bos=True), tok.encode(a, eos=True)
            ids.append(context + question + answer)
            targets.append([-100] * (len(context) + len(question)) + answer)
        text = tok.encode(caption, bos=True, eos=True)
        ids.append(context + text)
        targets.append([-100] * (len(context) + 1) + text[1:])  # <bos> is given, not predicted
    ids = pad_batch(ids, tok.pad_id)
    targets = pad_batch(targets, -100, ids.shape[1])
    return ids, targets.masked_fill(ids == tok.pad_id, -100)


def lm_batch_loss(lm: TinyLM, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, None]:
    """`loss_fn` for `fit` with data (ids, targets): the next-token loss."""
    ids, targets = batch
    return lm_loss(lm(ids), targets), None


# ----------------------------------------------------------------------------------------------
# Answers and their accuracy
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def answer_questions(lm: TinyLM, tokenizer: WordTokenizer, ds, image_feats: torch.Tensor | None,
                     connector: nn.Module | None) -> list[list[str]]:
    """Greedy answers of the frozen LM to every question of `ds`, after the connector's soft prompt
    (or with no prompt when connector is None: the LM's prior alone). Returns answers[image][question]."""
    if (image_feats is None) != (connector is None):
        raise ValueError("pass both image_feats and a connector (answers from the image), or neither (the LM alone)")
    n, questions = len(ds), ds["questions"]
    prompt = connector(image_feats) if connector is not None else None
    out = [[""] * len(questions[0]) for _ in range(n)]
    for k in range(len(questions[0])):  # every scene's k-th question has the same number of words
        embeds = lm.embed(torch.tensor([tokenizer.encode(qs[k], bos=True) for qs in questions]))
        if prompt is not None:
            embeds = torch.cat([prompt, embeds], dim=1)
        new = lm.generate(inputs_embeds=embeds, max_new_tokens=3, eos_id=tokenizer.eos_id)
        for i in range(n):
            out[i][k] = tokenizer.decode(new[i])
    return out


@torch.no_grad()
def answer_after_captions(lm: TinyLM, tokenizer: WordTokenizer, ds) -> list[list[str]]:
    """Greedy answers of the frozen LM to every question of `ds` when the scene's true caption, as
    words, precedes <bos> and the question: what a connector whose soft prompt said everything the
    caption says could reach (a ceiling). Returns answers[image][question], like answer_questions."""
    contexts = [tokenizer.encode(c) for c in ds["caption"]]
    questions = ds["questions"]
    by_length: dict[int, list[int]] = {}
    for i, c in enumerate(contexts):  # captions of one length batch together (no padding needed)
        by_length.setdefault(len(c), []).append(i)
    out = [[""] * len(questions[0]) for _ in range(len(contexts))]
    for k in range(len(questions[0])):
        for rows in by_length.values():
            ids = torch.tensor([contexts[i] + tokenizer.encode(questions[i][k], bos=True) for i in rows])
            new = lm.generate(ids, max_new_tokens=3, eos_id=tokenizer.eos_id)
            for i, row in zip(rows, new):
                out[i][k] = tokenizer.decode(row)
    return out


def answer_chance(ds) -> dict[str, float]:
    """Chance per question type: 1 / the number of different answers the type has in `ds`."""
    return {name: 1 / len({a[k] for a in ds["answers"]}) for k, name in enumerate(QUESTION_TYPES)}


def answer_accuracy(predicted: list[list[str]], ds) -> dict[str, float]:
    """Exact-match accuracy per question type and overall."""
    truth = ds["answers"]
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} answer lists for {len(truth)} scenes: answer every scene of the dataset")
    acc = {name: sum(p[k] == t[k] for p, t in zip(predicted, truth)) / len(truth) for k, name in enumerate(QUESTION_TYPES)}
    acc["all"] = sum(acc.values()) / len(QUESTION_TYPES)
    return acc
