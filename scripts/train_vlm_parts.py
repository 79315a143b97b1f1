"""Train the frozen parts of lectures 07 (BLIP-2) and 08 (Flamingo): a tiny image encoder and a
tiny language model for the scenes data, saved as safetensors checkpoints.

    python scripts/train_vlm_parts.py                                   # the shipped checkpoints (about 20 + 10 min, one CPU thread)
    python scripts/train_vlm_parts.py --n 64 --steps 2 --out-dir /tmp/vlm   # a smoke run

Image encoder: a ViT (patch 8 on 32x32 scenes with up to 3 objects, no classification head). It is
trained with a multi-label attribute head, dropped afterwards: for each of the 9 cells of the 3x3
layout, which shape and which colour sits there (or none), and how many objects there are. Its
tokens therefore carry shape, colour, position and count, the facts the captions and the
questions ask about.

Language model: `course_lib.tinylm.TinyLM`, trained on text only, in four kinds of batches:
the captions and "question answer" texts of the training scenes; the same after a run of <image>
placeholder tokens (where a soft prompt or an image marker will sit), which carry nothing; a
caption *before* <bos> followed by a question about that scene and its answer; and a caption before
<bos> followed by the same caption. It never sees an image. From the last two kinds it learns what
a large language model knows from reading: to answer, and to describe, from what precedes the text.
A soft prompt that a connector writes in front of <bos> (lecture 07) can then be read. An LM trained
on the first two kinds alone learns to ignore its prefix: even a soft prompt made from the true
answers (an oracle) then barely moves its answers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from course_lib import data
from course_lib.qformer import answer_accuracy, answer_after_captions
from course_lib.tinylm import (
    IMAGE_ENCODER_CHECKPOINT,
    LM_CHECKPOINT,
    TinyLM,
    TinyLMConfig,
    build_tokenizer,
    lm_loss,
    pad_batch,
    scene_texts,
)
from course_lib.train import cosine_schedule
from course_lib.utils import CHECKPOINTS, save_checkpoint, seed_everything
from course_lib.vit import ViT, ViTConfig

ENCODER_CONFIG = ViTConfig(image_size=32, patch_size=8, num_classes=0, dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
N_SHAPE, N_COLOR = len(data.SHAPES) + 1, len(data.COLORS) + 1  # + "nothing in this cell"
MAX_PREFIX = 24  # the longest <image> prefix the LM sees in training


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
    """Encoder + heads that read the attributes from the patch tokens: the 4x4 token grid is
    average-pooled to the 3x3 layout and one shared linear head names the shape and colour of each
    cell, so each patch token must describe what lies under it; the count is read from the mean."""

    def __init__(self, encoder: ViT):
        super().__init__()
        self.encoder = encoder
        D = encoder.config.dim
        self.cell_head = nn.Linear(D, N_SHAPE + N_COLOR)
        self.count_head = nn.Linear(D, 3)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.encoder.forward_features(images)[:, 1:]  # (B, 16, D) patch tokens
        B, N, D = tokens.shape
        g = int(N**0.5)
        grid = tokens.transpose(1, 2).reshape(B, D, g, g)  # (B, D, 4, 4)
        cells = F.adaptive_avg_pool2d(grid, 3).flatten(2).transpose(1, 2)  # (B, 9, D), row-major like POSITIONS
        out = self.cell_head(cells)  # (B, 9, N_SHAPE + N_COLOR)
        return out[..., :N_SHAPE], out[..., N_SHAPE:], self.count_head(tokens.mean(1))


def probe_loss(probe: AttributeProbe, images: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    shape, color, count = probe(images)
    loss = F.cross_entropy(shape.reshape(-1, N_SHAPE), y[:, :9].reshape(-1)) + F.cross_entropy(
        color.reshape(-1, N_COLOR), y[:, 9:18].reshape(-1)
    ) + F.cross_entropy(count, y[:, 18])
    # All 19 attributes right = the whole scene read correctly.
    exact = ((shape.argmax(-1) == y[:, :9]).all(1) & (color.argmax(-1) == y[:, 9:18]).all(1) & (count.argmax(-1) == y[:, 18]))
    return loss, exact.float().mean().item()


def train_loop(model: nn.Module, params, step_fn, steps: int, lr: float, log_every: int) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps, max(1, steps // 20)))
    model.train()
    start = time.time()
    for step in range(steps):
        loss, extra = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step == steps - 1:
            print(f"  step {step + 1}/{steps} loss {loss.item():.3f} {extra} ({time.time() - start:.0f} s)", flush=True)
    model.eval()


def train_image_encoder(n: int, steps: int, batch: int, out: Path, log_every: int) -> None:
    train, test = data.scenes(n, "train"), data.scenes(min(n, 1000), "test")
    x, _ = data.to_tensors(train)
    y = attribute_targets(train)
    xt, _ = data.to_tensors(test)
    yt = attribute_targets(test)
    probe = AttributeProbe(ViT(ENCODER_CONFIG))
    gen = torch.Generator().manual_seed(0)

    def step_fn(step: int):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss, exact = probe_loss(probe, x[idx], y[idx])
        return loss, f"scenes read exactly {exact:.2f}"

    print(f"image encoder: {n} scenes, {steps} steps")
    train_loop(probe, probe.parameters(), step_fn, steps, 2e-3, log_every)
    with torch.no_grad():
        _, exact = probe_loss(probe, xt, yt)
    print(f"image encoder: test scenes read exactly (all 9 cells + count) {exact:.3f}")
    save_checkpoint(probe.encoder, out, attribute_exact_match=f"{exact:.4f}", steps=steps, train_images=n)
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB)")


def context_examples(ds, tok) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reading examples: caption words, then <bos> question answer <eos> for each of a scene's
    questions (targets: the answer and <eos>), and caption words, then <bos> caption <eos>
    (targets: the caption). Returns (qa ids, qa targets, caption ids, caption targets), padded."""
    qa, qa_t, cap, cap_t = [], [], [], []
    for caption, questions, answers in zip(ds["caption"], ds["questions"], ds["answers"]):
        context = tok.encode(caption)
        for q, a in zip(questions, answers):
            question, answer = tok.encode(q, bos=True), tok.encode(a, eos=True)
            qa.append(context + question + answer)
            qa_t.append([-100] * (len(context) + len(question)) + answer)
        text = tok.encode(caption, bos=True, eos=True)
        cap.append(context + text)
        cap_t.append([-100] * (len(context) + 1) + text[1:])  # <bos> is given, not predicted
    qa_ids, cap_ids = pad_batch(qa, tok.pad_id), pad_batch(cap, tok.pad_id)
    return qa_ids, pad_batch(qa_t, -100, qa_ids.shape[1]), cap_ids, pad_batch(cap_t, -100, cap_ids.shape[1])


def train_lm(n: int, steps: int, batch: int, out: Path, log_every: int) -> None:
    tok = build_tokenizer()
    train = data.scenes(n, "train")
    texts = scene_texts(train)
    ids = pad_batch([tok.encode(t, bos=True, eos=True) for t in texts], tok.pad_id)  # (N, L)
    targets = ids.masked_fill(ids == tok.pad_id, -100)
    qa_ids, qa_targets, cap_ids, cap_targets = context_examples(train, tok)
    test = data.scenes(min(n, 500), "test")
    lm = TinyLM(TinyLMConfig(vocab_size=tok.vocab_size))
    gen = torch.Generator().manual_seed(0)

    def step_fn(step: int):
        kind = step % 4
        if kind >= 2:  # a caption, then a question about it (2) or the caption again (3)
            x, y = (qa_ids, qa_targets) if kind == 2 else (cap_ids, cap_targets)
            idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
            return lm_loss(lm(x[idx]), y[idx]), ""
        idx = torch.randint(0, ids.shape[0], (batch,), generator=gen)
        # Every other plain batch starts with 1..MAX_PREFIX <image> placeholders (never predicted):
        # the LM learns to read text that starts later than position 0, and that a prefix which
        # says nothing changes nothing.
        k = int(torch.randint(1, MAX_PREFIX + 1, (), generator=gen)) if kind == 1 else 0
        prefix = torch.full((batch, k), tok.image_id)
        x = torch.cat([prefix, ids[idx]], dim=1)
        y = torch.cat([torch.full((batch, k), -100), targets[idx]], dim=1)
        return lm_loss(lm(x), y), ""

    print(f"language model: {len(texts)} texts and {len(qa_ids) + len(cap_ids)} reading examples, "
          f"vocabulary {tok.vocab_size}, {steps} steps")
    train_loop(lm, lm.parameters(), step_fn, steps, 3e-3, log_every)
    test_ids = pad_batch([tok.encode(t, bos=True, eos=True) for t in scene_texts(test)], tok.pad_id)
    with torch.no_grad():
        test_loss = lm_loss(lm(test_ids), test_ids.masked_fill(test_ids == tok.pad_id, -100)).item()
    print(f"language model: test loss {test_loss:.3f} nats/token")
    reading = answer_accuracy(answer_after_captions(lm, tok, test), test)  # the true caption before <bos>
    print("  answers with the true caption before <bos>:", ", ".join(f"{k} {v:.2f}" for k, v in reading.items()))
    prompt = torch.tensor([tok.encode("a large", bos=True)])
    print("  sample:", tok.decode(lm.generate(prompt, max_new_tokens=30, eos_id=tok.eos_id)[0]))
    save_checkpoint(lm, out, test_loss=f"{test_loss:.4f}", steps=steps, train_texts=len(texts),
                    reading_accuracy=json.dumps({k: round(v, 4) for k, v in reading.items()}))
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="training scenes for both models (default: 10000 for the encoder, 4000 for the LM)")
    p.add_argument("--steps", type=int, default=None, help="steps for both models (default: --encoder-steps / --lm-steps)")
    p.add_argument("--encoder-steps", type=int, default=12000)
    p.add_argument("--lm-steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--only", choices=["encoder", "lm"], default=None)
    p.add_argument("--out-dir", type=Path, default=CHECKPOINTS)
    p.add_argument("--threads", type=int, default=1, help="torch threads (these models are too small to gain from more)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    log_every = 50 if (args.steps or 100) >= 50 else 1
    if args.only != "lm":
        seed_everything(0)
        train_image_encoder(args.n or 10000, args.steps or args.encoder_steps, args.batch, args.out_dir / IMAGE_ENCODER_CHECKPOINT, log_every)
    if args.only != "encoder":
        seed_everything(0)
        train_lm(args.n or 4000, args.steps or args.lm_steps, args.batch, args.out_dir / LM_CHECKPOINT, log_every)


if __name__ == "__main__":
    main()
