"""Train lecture 07's connectors between the frozen scenes image encoder and the frozen TinyLM,
and save them as safetensors checkpoints.

    python scripts/train_qformer.py                                                 # the shipped checkpoints (19 min, one CPU thread)
    python scripts/train_qformer.py --n 64 --test 32 --steps 2 --out-dir /tmp/qf    # a smoke run

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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from course_lib import data
from course_lib.layers import param_groups
from course_lib.qformer import (
    CONNECTORS_CHECKPOINT,
    STAGE1_CHECKPOINT,
    QFormer,
    QFormerConfig,
    answer_accuracy,
    answer_chance,
    answer_questions,
    caption_examples,
    encode_images,
    make_connector,
    qa_examples,
    query_transformer,
    save_connectors,
    stage1_metrics,
    train_connector,
)
from course_lib.tinylm import build_tokenizer, load_frozen_image_encoder, load_frozen_lm
from course_lib.train import cosine_schedule
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


def train_stage1(qformer: QFormer, feats: torch.Tensor, cap_ids: torch.Tensor, steps: int, batch: int, lr: float,
                 log_every: int) -> dict[str, list[float]]:
    opt = torch.optim.AdamW(param_groups(qformer, 0.05), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps, max(1, steps // 20)))
    g = torch.Generator().manual_seed(0)
    history = {"itc": [], "itm": [], "itg": [], "itm_accuracy": []}
    qformer.train()
    start = time.time()
    for step in range(steps):
        pick = torch.randperm(len(cap_ids), generator=g)[:batch]
        out = qformer.stage1_losses(feats[pick], cap_ids[pick], g)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sched.step()
        for k in ("itc", "itm", "itg"):
            history[k].append(out[k].item())
        history["itm_accuracy"].append(out["itm_correct"].item() / (3 * len(pick)))
        if (step + 1) % log_every == 0 or step == steps - 1:
            recent = {k: sum(v[-log_every:]) / len(v[-log_every:]) for k, v in history.items()}
            print(f"  stage 1 step {step + 1}/{steps}: " + ", ".join(f"{k} {v:.3f}" for k, v in recent.items())
                  + f", temperature {qformer.temperature().item():.3f} ({time.time() - start:.0f} s)", flush=True)
    qformer.eval()
    return history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000, help="training scenes")
    p.add_argument("--test", type=int, default=500, help="held-out test scenes for the reported numbers")
    p.add_argument("--steps", type=int, default=None, help="steps for both stages (default: --stage1-steps / --stage2-steps)")
    p.add_argument("--stage1-steps", type=int, default=1500)
    p.add_argument("--stage2-steps", type=int, default=2000)
    p.add_argument("--stage1-batch", type=int, default=64)
    p.add_argument("--stage2-batch", type=int, default=64, help="per step: this many question-answer pairs and as many captions")
    p.add_argument("--stage1-lr", type=float, default=2e-3)
    p.add_argument("--stage2-lr", type=float, default=1e-3)
    p.add_argument("--only", choices=list(CONNECTORS), nargs="*", default=None, help="train only these connectors")
    p.add_argument("--out-dir", type=Path, default=CHECKPOINTS)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    stage1_steps, stage2_steps = args.steps or args.stage1_steps, args.steps or args.stage2_steps
    log_every = max(1, min(100, stage1_steps // 10))
    total_start = time.time()

    tok, lm, encoder = build_tokenizer(), load_frozen_lm(), load_frozen_image_encoder()
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
    history = train_stage1(qformer, feats, cap_ids, stage1_steps, args.stage1_batch, args.stage1_lr, log_every)
    stage1_seconds = time.time() - start
    metrics = stage1_metrics(qformer, test_feats, test_cap_ids)
    print("stage 1 held out: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f" ({stage1_seconds:.0f} s)")
    out1 = args.out_dir / STAGE1_CHECKPOINT
    save_checkpoint(qformer, out1, steps=stage1_steps, batch=args.stage1_batch, lr=args.stage1_lr, seconds=f"{stage1_seconds:.0f}",
                    history=json.dumps({k: windows(v, log_every) for k, v in history.items()}), log_every=log_every,
                    metrics=json.dumps({k: round(v, 4) for k, v in metrics.items()}), **common)
    print(f"saved {out1} ({out1.stat().st_size / 1e6:.2f} MB)")

    # Stage 2: the connectors at an equal budget ------------------------------------------------------
    qa_train = qa_examples(train_ds, tok)
    examples = [qa_train, (cap_index, cap_ids, cap_targets)]
    prior = answer_accuracy(answer_questions(lm, tok, test_ds, None, None), test_ds)
    print("LM alone: " + ", ".join(f"{k} {v:.2f}" for k, v in prior.items()))
    connectors, kinds, results = {}, {}, {}
    for name, (kind, from_stage1) in CONNECTORS.items():
        if args.only is not None and name not in args.only:
            continue
        seed_everything(0)
        connector = make_connector(kind, encoder.config.dim, lm.config.dim, config)
        if from_stage1:
            connector.qformer = query_transformer(qformer)
        start = time.time()
        losses = train_connector(connector, lm, feats, examples, stage2_steps, batch_size=args.stage2_batch, lr=args.stage2_lr)
        seconds = time.time() - start
        acc = answer_accuracy(answer_questions(lm, tok, test_ds, test_feats, connector), test_ds)
        with torch.no_grad():
            tokens = connector(test_feats[:1]).shape[1]
        results[name] = {"accuracy": {k: round(v, 4) for k, v in acc.items()}, "seconds": round(seconds),
                         "trainable_params": count_params(connector, trainable_only=True), "prompt_tokens": tokens,
                         "loss": windows(losses, max(1, stage2_steps // 40))}
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()) + f" ({seconds:.0f} s)", flush=True)
        connectors[name], kinds[name] = connector, kind
    out2 = args.out_dir / CONNECTORS_CHECKPOINT
    save_connectors(out2, connectors, kinds, encoder.config.dim, lm.config.dim, dataclasses.replace(config, vocab_size=0, text_ffn=False),
                    steps=stage2_steps, batch=args.stage2_batch, lr=args.stage2_lr, results=json.dumps(results),
                    prior=json.dumps({k: round(v, 4) for k, v in prior.items()}), chance=json.dumps(answer_chance(test_ds)), **common)
    print(f"saved {out2} ({out2.stat().st_size / 1e6:.2f} MB); total {time.time() - total_start:.0f} s")


if __name__ == "__main__":
    main()
