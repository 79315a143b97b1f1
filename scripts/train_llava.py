"""Train LLaVA on the scenes, both stages, and LLaVA-NeXT's AnyRes on panoramas (lecture 09).

    python scripts/train_llava.py                                     # the shipped checkpoints (~15 min, one thread)
    python scripts/train_llava.py --n 32 --steps 2 --out-dir /tmp/llava   # a smoke run

0. The language model: a `course_lib.llama.Llama` (width 64, 2 blocks) trained by this script on
   text only, as a chat model: "<bos> [caption] <user> question <assistant> answer <eos>" for every
   instruction kind, with the true caption where the image will go (4 texts in 5) or nothing.
   Measured: the LM alone (no caption: its prior) and the LM reading the true caption (the ceiling
   an image connector can approach).
1. Stage 1 (feature alignment, LLaVA sec. 4.2): vision tower (the shipped scenes ViT of lectures
   07-08, frozen) -> MLP connector -> LM (frozen); only the connector trains, on brief captions.
2. Stage 2 (visual instruction tuning): from stage 1, on the four instruction kinds, three ways:
   connector only with the LM still frozen (the frozen-LM recipe of lecture 07), connector + the
   whole LM, connector + LoRA factors on every linear layer of the LM.
3. AnyRes: panoramas of 2-3 scenes side by side, questions about one panel's large object; from
   the stage-2 model, one 32x32 view (padded to square, as LLaVA-1.5) vs AnyRes tiles, the same
   training steps.
Held-out accuracy per question kind (the last answer exactly right, greedy) goes into the
checkpoints' metadata: `llava_scenes` (stage 2, full) and `llava_next_scenes` (AnyRes).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from course_lib import data
from course_lib.llama import Llama, LlamaConfig
from course_lib.llava import Llava, LlavaConfig
from course_lib.lora import apply_lora, merge_lora
from course_lib.recipes import instructions as I
from course_lib.recipes.llava_training import (
    accuracy_by_kind,
    encode_samples,
    instruction_data,
    llava_loss,
    lm_text_loss,
    panorama_data,
    set_trainable,
    text_eval_data,
)
from course_lib.train import fit
from course_lib.utils import CHECKPOINTS, count_params, load_checkpoint, save_checkpoint, seed_everything
from course_lib.vit import ViT, ViTConfig

PINPOINTS = [[64, 64], [32, 64], [32, 96], [32, 128], [64, 32], [96, 32], [128, 32]]  # LLaVA-1.6's grids in 32 px tiles
LORA_TARGETS = ["qkv", "attn.proj", "gate", "up", "down"]


def lm_texts(records, tok, context_share: float = 0.8, seed: int = 0):
    """Text-only chat data for the LM: (ids, labels) with every token a target."""
    samples, contexts = [], []
    g = torch.Generator().manual_seed(seed)
    for i, r in enumerate(records):
        for s in I.instructions(r, i) + [I.caption_sample(r)]:
            samples.append(s)
            contexts.append(r["caption"] if float(torch.rand(1, generator=g)) < context_share else "")
    ids, _, _ = encode_samples(samples, tok, 0, contexts)
    return ids, ids.masked_fill(ids == tok.pad_id, -100)


def train(model, data_, steps, batch, lr, seed=0):
    n = data_[0].shape[0]
    epochs = max(1, round(steps * batch / n))
    hist = fit(model, data_, epochs=epochs, batch_size=batch, lr=lr, weight_decay=0.0, loss_fn=llava_loss_or_text(data_),
               seed=seed, progress=True)
    return hist


def llava_loss_or_text(data_):
    return lm_text_loss if len(data_) == 2 else llava_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000, help="training scenes (test: n // 8, at most 500)")
    p.add_argument("--steps", type=int, default=None, help="steps for every run (default: the per-run values below)")
    p.add_argument("--lm-steps", type=int, default=600)
    p.add_argument("--stage1-steps", type=int, default=150)
    p.add_argument("--stage2-steps", type=int, default=300)
    p.add_argument("--anyres-steps", type=int, default=200)
    p.add_argument("--panoramas", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out-dir", type=Path, default=CHECKPOINTS)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(0)
    steps = lambda s: args.steps or s  # noqa: E731
    start = time.perf_counter()
    results: dict = {}
    tok = I.instruction_tokenizer()
    n_test = max(8, min(500, args.n // 8))
    train_ds, test_ds = data.scenes(args.n, "train"), data.scenes(n_test, "test")
    train_rec, test_rec = I.scene_records(train_ds), I.scene_records(test_ds)
    train_img, test_img = data.to_tensors(train_ds)[0], data.to_tensors(test_ds)[0]

    # 0. the language model, on text only
    lm = Llama(LlamaConfig(vocab_size=tok.vocab_size, dim=64, depth=2, num_heads=4, mlp_dim=172))
    fit(lm, lm_texts(train_rec, tok), epochs=max(1, round(steps(args.lm_steps) * args.batch / (5 * args.n))),
        batch_size=args.batch, lr=3e-3, weight_decay=0.0, loss_fn=lm_text_loss, progress=True)
    for name, with_caption in (("lm_alone", False), ("lm_with_true_caption", True)):
        d, kinds = text_eval_data(test_rec, tok, with_caption)
        shell = Llava(LlavaConfig(text=lm.config))
        shell.lm = lm
        results[name] = accuracy_by_kind(shell, d, kinds)
        print(name, results[name], flush=True)

    # 1. stage 1: connector only, LM frozen, captions
    encoder, _ = load_checkpoint("image_encoder_scenes.safetensors", ViT, ViTConfig)
    config = LlavaConfig(vision=encoder.config, text=lm.config, vision_tower="vit", feature_layer=-2, connector="mlp",
                         image_token_id=tok.image_id)
    model = Llava(config)
    model.vision_tower.load_state_dict(encoder.state_dict())
    model.lm.load_state_dict(lm.state_dict())
    test_data, test_kinds = instruction_data(model, test_rec, test_img, tok)
    train_data, _ = instruction_data(model, train_rec, train_img, tok)
    captions, _ = instruction_data(model, train_rec, train_img, tok, caption_only=True)
    train(set_trainable(model, connector=True, lm=False), captions, steps(args.stage1_steps), args.batch, 2e-3)
    results["stage1"] = accuracy_by_kind(model, test_data, test_kinds)
    print("stage 1", results["stage1"], flush=True)

    # 2. stage 2, three ways, each from the stage-1 model
    runs = {}
    for name in ("frozen_lm", "full", "lora"):
        m = copy.deepcopy(model)
        if name == "lora":
            apply_lora(m.lm, LORA_TARGETS, r=8, alpha=16)
        set_trainable(m, connector=True, lm=name == "full")
        t0, trainable = time.perf_counter(), count_params(m, trainable_only=True)
        train(m, train_data, steps(args.stage2_steps), args.batch, 2e-3 if name != "full" else 1e-3)
        if name == "lora":
            merge_lora(m.lm)  # back to plain linear layers: the same model class as the others
        results[f"stage2_{name}"] = {**accuracy_by_kind(m, test_data, test_kinds), "trainable_params": trainable,
                                     "seconds": round(time.perf_counter() - t0)}
        print(f"stage 2 ({name})", results[f"stage2_{name}"], flush=True)
        runs[name] = m
    stage2 = runs["full"]

    # 3. AnyRes vs one view on panoramas, from the stage-2 model
    n_pan, n_pan_test = args.panoramas if not args.steps else args.n, max(8, min(500, args.panoramas // 6))
    anyres_results, next_model = {}, None
    for name in ("one_view", "anyres"):
        m = Llava(LlavaConfig(**{**config.__dict__, "grid_pinpoints": PINPOINTS if name == "anyres" else None}))
        m.load_state_dict(stage2.state_dict(), strict=False)  # all but AnyRes's newline embedding
        set_trainable(m, connector=True, lm=True)
        tr, _, _ = panorama_data(m, n_pan, "train", tok, one_view=name == "one_view")
        te, kinds, tokens = panorama_data(m, n_pan_test, "test", tok, one_view=name == "one_view")
        if m.image_newline is not None:
            m.image_newline.requires_grad_(True)
        train(m, tr, steps(args.anyres_steps), args.batch, 1e-3)
        anyres_results[name] = {**accuracy_by_kind(m, te, kinds), "image_tokens_per_image": round(tokens, 1)}
        print(name, anyres_results[name], flush=True)
        next_model = m
    results["anyres"] = anyres_results
    seconds = round(time.perf_counter() - start)
    print(f"total {seconds} s", flush=True)

    meta = dict(results=json.dumps(results), vocab=json.dumps(tok.vocab), train_scenes=args.n, test_scenes=n_test,
                seconds=seconds, threads=args.threads, batch=args.batch)
    save_checkpoint(stage2, args.out_dir / "llava_scenes.safetensors", **meta)
    save_checkpoint(next_model, args.out_dir / "llava_next_scenes.safetensors", **meta)


if __name__ == "__main__":
    main()
