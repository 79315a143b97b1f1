"""Train lecture 07's connectors between the frozen scenes image encoder and the frozen TinyLM,
and save them as safetensors checkpoints.

    python scripts/train_qformer.py                                                 # the shipped checkpoints (19 min, one CPU thread)
    python scripts/train_qformer.py --n 64 --test 32 --epochs 1 --out-dir /tmp/qf    # a smoke run

1. The frozen encoder's tokens (CLS + 4x4 patches, width 64) are computed once, for the training
   scenes and for held-out test scenes.
2. Stage 1 (BLIP-2 sec. 3.2): a Q-Former with a text side learns ITC + ITM + ITG on the captions,
   against the frozen encoder only. Its held-out recall@1 and ITM accuracy go into the metadata of
   `qformer_stage1_scenes.safetensors`.
3. Stage 2 (sec. 3.3), four connectors at an equal budget (the same steps, batches, examples and
   learning rate, through the same frozen LM): linear (LLaVA), MLP (LLaVA-1.5), a Q-Former from
   scratch, and the Q-Former from stage 1. Each learns a soft prompt from captions and
   question-answer pairs. Their held-out answer accuracy per question type, next to the LM alone
   and to chance, goes into the metadata of `connectors_scenes.safetensors`.

Everything runs on one CPU thread: the models are too small to gain from more.

The shipped checkpoints were made before this script trained through `course_lib.train.fit` (it
then drew random batches for a number of steps instead of epochs); a rerun makes new ones, with
numbers of their own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from course_lib import data
from course_lib.connectors import Connectors, ConnectorsConfig
from course_lib.qformer import QFormer, QFormerConfig, query_transformer
from course_lib.recipes.qformer import (
    CONNECTORS_CHECKPOINT,
    STAGE1_CHECKPOINT,
    ConnectorLoss,
    Stage1Loss,
    caption_examples,
    connector_data,
    qa_examples,
    stage1_metrics,
)
from course_lib.recipes.text import scene_tokenizer
from course_lib.recipes.vlm import (
    answer_accuracy,
    answer_chance,
    answer_questions,
    encode_images,
    load_frozen_image_encoder,
    load_frozen_lm,
)
from course_lib.train import fit
from course_lib.utils import CHECKPOINTS, count_params, save_checkpoint, seed_everything

# The comparison: name -> (kind, starts from the stage-1 Q-Former).
CONNECTORS = {"linear": ("linear", False), "mlp": ("mlp", False),
              "qformer_scratch": ("qformer", False), "qformer_stage1": ("qformer", True)}


def qformer_config(vocab_size: int) -> QFormerConfig:
    """Lecture 07's Q-Former: width 64, 2 layers (cross-attention in layer 0), 8 queries."""
    return QFormerConfig(dim=64, depth=2, num_heads=4, mlp_dim=128, num_queries=8, encoder_dim=64,
                         vocab_size=vocab_size, max_text_len=40, embed_dim=32)


def windows(values: list[float], every: int) -> list[float]:
    """Means over consecutive windows of `every` steps: a short loss curve for the metadata."""
    return [round(sum(values[i:i + every]) / len(values[i:i + every]), 4) for i in range(0, len(values), every)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000, help="training scenes")
    p.add_argument("--test", type=int, default=500, help="held-out test scenes for the reported numbers")
    p.add_argument("--epochs", type=int, default=None, help="epochs for both stages (default: --stage1-epochs / --stage2-epochs)")
    p.add_argument("--stage1-epochs", type=int, default=24, help="24 epochs of 4,000 captions: 1,500 steps of 64")
    p.add_argument("--stage2-epochs", type=int, default=11, help="11 epochs of 24,000 examples: about 2,000 steps of 128")
    p.add_argument("--stage1-batch", type=int, default=64)
    p.add_argument("--stage2-batch", type=int, default=128, help="question-answer pairs and captions, mixed")
    p.add_argument("--stage1-lr", type=float, default=2e-3)
    p.add_argument("--stage2-lr", type=float, default=1e-3)
    p.add_argument("--only", choices=list(CONNECTORS), nargs="*", default=None, help="train only these connectors")
    p.add_argument("--out-dir", type=Path, default=CHECKPOINTS)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    stage1_epochs, stage2_epochs = args.epochs or args.stage1_epochs, args.epochs or args.stage2_epochs
    stage1_steps = stage1_epochs * math.ceil(args.n / args.stage1_batch)
    log_every = max(1, min(100, stage1_steps // 10))
    total_start = time.time()

    tok, lm, encoder = scene_tokenizer(), load_frozen_lm(), load_frozen_image_encoder()
    train_ds, test_ds = data.scenes(args.n, "train"), data.scenes(args.test, "test")
    feats, test_feats = encode_images(encoder, train_ds), encode_images(encoder, test_ds)
    cap_index, cap_ids, cap_targets = caption_examples(train_ds, tok)
    test_cap_ids = caption_examples(test_ds, tok)[1]
    print(f"features: train {tuple(feats.shape)}, test {tuple(test_feats.shape)}")
    common = {"train_scenes": args.n, "test_scenes": args.test, "threads": args.threads}

    # Stage 1 ------------------------------------------------------------------------------------
    seed_everything(0)
    config = qformer_config(tok.vocab_size)
    qformer = QFormer(config)
    start = time.time()
    stage1_loss = Stage1Loss(feats)
    fit(qformer, (cap_index, cap_ids), epochs=stage1_epochs, batch_size=args.stage1_batch, lr=args.stage1_lr,
        weight_decay=0.05, warmup=0.05, loss_fn=stage1_loss, log_every=log_every)
    history = stage1_loss.history
    stage1_seconds = time.time() - start
    metrics = stage1_metrics(qformer, test_feats, test_cap_ids)
    print("stage 1 held out: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f" ({stage1_seconds:.0f} s)")
    out1 = args.out_dir / STAGE1_CHECKPOINT
    save_checkpoint(qformer, out1, steps=stage1_steps, epochs=stage1_epochs, batch=args.stage1_batch, lr=args.stage1_lr, seconds=f"{stage1_seconds:.0f}",
                    history=json.dumps({k: windows(v, log_every) for k, v in history.items()}), log_every=log_every,
                    metrics=json.dumps({k: round(v, 4) for k, v in metrics.items()}), **common)
    print(f"saved {out1} ({out1.stat().st_size / 1e6:.2f} MB)")

    # Stage 2: the connectors at an equal budget ------------------------------------------------------
    examples = connector_data(qa_examples(train_ds, tok), (cap_index, cap_ids, cap_targets), pad_id=tok.pad_id)
    prior = answer_accuracy(answer_questions(lm, tok, test_ds, None, None), test_ds)
    print("LM alone: " + ", ".join(f"{k} {v:.2f}" for k, v in prior.items()))
    kinds = {name: kind for name, (kind, _) in CONNECTORS.items() if args.only is None or name in args.only}
    seed_everything(0)
    connectors = Connectors(ConnectorsConfig(kinds, encoder.config.dim, lm.config.dim,
                                             dataclasses.replace(config, vocab_size=0, text_ffn=False)))
    results = {}
    for name, connector in connectors.items():
        seed_everything(0)
        if CONNECTORS[name][1]:
            connector.qformer = query_transformer(qformer)
        start = time.time()
        hist = fit(connector, examples, epochs=stage2_epochs, batch_size=args.stage2_batch, lr=args.stage2_lr,
                   weight_decay=0.05, warmup=0.1, loss_fn=ConnectorLoss(lm, feats), log_every=1, progress=False)
        losses, stage2_steps = hist.loss, hist.step[-1]
        seconds = time.time() - start
        acc = answer_accuracy(answer_questions(lm, tok, test_ds, test_feats, connector), test_ds)
        with torch.no_grad():
            tokens = connector(test_feats[:1]).shape[1]
        results[name] = {"accuracy": {k: round(v, 4) for k, v in acc.items()}, "seconds": round(seconds),
                         "trainable_params": count_params(connector, trainable_only=True), "prompt_tokens": tokens,
                         "loss": windows(losses, max(1, stage2_steps // 40))}
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()) + f" ({seconds:.0f} s)", flush=True)
    out2 = args.out_dir / CONNECTORS_CHECKPOINT
    save_checkpoint(connectors, out2, steps=stage2_steps, epochs=stage2_epochs, batch=args.stage2_batch, lr=args.stage2_lr, results=json.dumps(results),
                    prior=json.dumps({k: round(v, 4) for k, v in prior.items()}), chance=json.dumps(answer_chance(test_ds)), **common)
    print(f"saved {out2} ({out2.stat().st_size / 1e6:.2f} MB); total {time.time() - total_start:.0f} s")


if __name__ == "__main__":
    main()
