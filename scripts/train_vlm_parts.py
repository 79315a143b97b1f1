"""Train the frozen parts of lectures 07 (BLIP-2) and 08 (Flamingo): a tiny image encoder and a
tiny language model for the scenes data, saved as safetensors checkpoints.

    python scripts/train_vlm_parts.py                                   # the shipped checkpoints (about 20 + 10 min, one CPU thread)
    python scripts/train_vlm_parts.py --n 64 --epochs 1 --out-dir /tmp/vlm   # a smoke run

Image encoder: a ViT (patch 8 on 32x32 scenes with up to 3 objects, no classification head). It is
trained with a multi-label attribute head, dropped afterwards: for each of the 9 cells of the 3x3
layout, which shape and which colour sits there (or none), and how many objects there are. Its
tokens therefore carry shape, colour, position and count, the facts the captions and the
questions ask about.

Both train through `course_lib.train.fit` with the recipes of `course_lib.recipes.vlm`.

Language model: `course_lib.tinylm.TinyLM`, trained on text only, on four kinds of examples:
the captions and "question answer" texts of the training scenes; the same after a run of <image>
placeholder tokens (where a soft prompt or an image marker will sit), which carry nothing; a
caption *before* <bos> followed by a question about that scene and its answer; and a caption before
<bos> followed by the same caption. It never sees an image. From the last two kinds it learns what
a large language model knows from reading: to answer, and to describe, from what precedes the text.
A soft prompt that a connector writes in front of <bos> (lecture 07) can then be read. An LM trained
on the first two kinds alone learns to ignore its prefix: even a soft prompt made from the true
answers (an oracle) then barely moves its answers.

The shipped checkpoints were made before this script trained through `course_lib.train.fit` (it
then drew random batches for a number of steps instead of epochs); a rerun makes new ones, with
numbers of their own.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from course_lib import data
from course_lib.recipes.text import pad_batch, scene_texts, scene_tokenizer
from course_lib.recipes.vlm import (
    IMAGE_ENCODER_CHECKPOINT,
    LM_CHECKPOINT,
    AttributeProbe,
    answer_accuracy,
    answer_after_captions,
    attribute_loss,
    attribute_targets,
    lm_batch_loss,
    lm_examples,
)
from course_lib.tinylm import TinyLM, TinyLMConfig, lm_loss
from course_lib.train import fit
from course_lib.utils import CHECKPOINTS, save_checkpoint, seed_everything
from course_lib.vit import ViT, ViTConfig

ENCODER_CONFIG = ViTConfig(image_size=32, patch_size=8, num_classes=0, dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
MAX_PREFIX = 24  # the longest <image> prefix the LM sees in training


def train_image_encoder(n: int, epochs: int, batch: int, out: Path) -> None:
    train, test = data.scenes(n, "train"), data.scenes(min(n, 1000), "test")
    x, xt = data.to_tensors(train)[0], data.to_tensors(test)[0]
    y, yt = attribute_targets(train), attribute_targets(test)
    probe = AttributeProbe(ViT(ENCODER_CONFIG))
    steps = epochs * math.ceil(n / batch)
    print(f"image encoder: {n} scenes, {epochs} epochs ({steps} steps)")
    fit(probe, (x, y), epochs=epochs, batch_size=batch, lr=2e-3, weight_decay=0.05, warmup=0.05, loss_fn=attribute_loss,
        log_every=50)
    with torch.no_grad():
        exact = attribute_loss(probe, (xt, yt))[1].item() / len(xt)
    print(f"image encoder: test scenes read exactly (all 9 cells + count) {exact:.3f}")
    save_checkpoint(probe.encoder, out, attribute_exact_match=f"{exact:.4f}", steps=steps, epochs=epochs, train_images=n)
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB)")


def train_lm(n: int, epochs: int, batch: int, out: Path) -> None:
    tok = scene_tokenizer()
    train = data.scenes(n, "train")
    ids, targets = lm_examples(train, tok, MAX_PREFIX, torch.Generator().manual_seed(0))
    test = data.scenes(min(n, 500), "test")
    lm = TinyLM(TinyLMConfig(vocab_size=tok.vocab_size))
    steps = epochs * math.ceil(len(ids) / batch)
    print(f"language model: {len(ids)} texts and reading examples, vocabulary {tok.vocab_size}, {epochs} epochs ({steps} steps)")
    fit(lm, (ids, targets), epochs=epochs, batch_size=batch, lr=3e-3, weight_decay=0.05, warmup=0.05, loss_fn=lm_batch_loss,
        log_every=50)
    test_ids = pad_batch([tok.encode(t, bos=True, eos=True) for t in scene_texts(test)], tok.pad_id)
    with torch.no_grad():
        test_loss = lm_loss(lm(test_ids), test_ids.masked_fill(test_ids == tok.pad_id, -100)).item()
    print(f"language model: test loss {test_loss:.3f} nats/token")
    reading = answer_accuracy(answer_after_captions(lm, tok, test), test)  # the true caption before <bos>
    print("  answers with the true caption before <bos>:", ", ".join(f"{k} {v:.2f}" for k, v in reading.items()))
    prompt = torch.tensor([tok.encode("a large", bos=True)])
    print("  sample:", tok.decode(lm.generate(prompt, max_new_tokens=30, eos_id=tok.eos_id)[0]))
    save_checkpoint(lm, out, test_loss=f"{test_loss:.4f}", steps=steps, epochs=epochs, train_texts=len(ids),
                    reading_accuracy=json.dumps({k: round(v, 4) for k, v in reading.items()}))
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="training scenes for both models (default: 10000 for the encoder, 4000 for the LM)")
    p.add_argument("--epochs", type=int, default=None, help="epochs for both models (default: --encoder-epochs / --lm-epochs)")
    p.add_argument("--encoder-epochs", type=int, default=77, help="77 epochs of 10,000 scenes: about 12,000 steps of 64")
    p.add_argument("--lm-epochs", type=int, default=6, help="6 epochs of 72,000 examples: about 6,700 steps of 64")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--only", choices=["encoder", "lm"], default=None)
    p.add_argument("--out-dir", type=Path, default=CHECKPOINTS)
    p.add_argument("--threads", type=int, default=1, help="torch threads (these models are too small to gain from more)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.only != "lm":
        seed_everything(0)
        train_image_encoder(args.n or 10000, args.epochs or args.encoder_epochs, args.batch, args.out_dir / IMAGE_ENCODER_CHECKPOINT)
    if args.only != "encoder":
        seed_everything(0)
        train_lm(args.n or 4000, args.epochs or args.lm_epochs, args.batch, args.out_dir / LM_CHECKPOINT)


if __name__ == "__main__":
    main()
