"""Train the course's small SAM on the scenes with the paper's simulated interaction, evaluate it
on held-out scenes and ship the checkpoint (course_lib/checkpoints/sam_scenes.safetensors).

    python scripts/train_sam.py                 # the shipped run (1,000 steps, one CPU thread)
    python scripts/train_sam.py --n-train 256 --epochs 1 --n-test 32 --out /tmp/sam.safetensors  # smoke test

The shipped run took 27.9 min on one thread of the course's shared 2-core machine, under heavy load
from other jobs (train_minutes in the metadata); the first run of the same recipe with one object per
scene took 13.7 min there. The results (held-out mIoU after 1, 2 and 3 clicks, from a box, the colour baseline, and the
correlation of predicted with true IoU) go into the checkpoint's metadata, where the lecture and
the tests read them.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch

from course_lib.recipes.sam import evaluate_clicks, interactive_loss, scene_tensors
from course_lib.sam import sam_scenes
from course_lib.train import fit
from course_lib.utils import CHECKPOINTS, count_params, save_checkpoint, seed_everything


def summarize(results: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean IoU per prompt kind, and the Pearson correlation of predicted with true IoU (1 click)."""
    out = {f"miou_{k[4:]}": round(float(v.mean()), 4) for k, v in results.items() if k.startswith("iou_")}
    pair = torch.stack([results["pred_iou_click1"], results["iou_click1"]])
    out["pred_true_iou_corr"] = round(float(torch.corrcoef(pair)[0, 1]), 4)
    out["pred_iou_mae"] = round(float((pair[0] - pair[1]).abs().mean()), 4)
    out["objects"] = int(results["iou_click1"].numel())
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=8_000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--rounds", type=int, default=3, help="prompts per mask in the simulated interaction")
    ap.add_argument("--no-error-points", action="store_true", help="ablation: later clicks anywhere in the object")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(CHECKPOINTS / "sam_scenes.safetensors"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    train = scene_tensors(args.n_train, "train", resolution=32)
    test = scene_tensors(args.n_test, "test", resolution=32)
    model = sam_scenes()
    print(f"SAM: {count_params(model):,} parameters; {args.n_train} training scenes")
    start = time.perf_counter()
    loss_fn = partial(interactive_loss, rounds=args.rounds, error_points=not args.no_error_points)
    hist = fit(model, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, loss_fn=loss_fn,
               clip_grad=1.0, seed=args.seed, log_every=20)
    minutes = (time.perf_counter() - start) / 60
    results = summarize(evaluate_clicks(model, *test))
    results.update(train_minutes=round(minutes, 1), final_loss=round(hist.loss[-1], 4))
    print(json.dumps(results, indent=1))
    save_checkpoint(model.cpu(), args.out, results=json.dumps(results),
                    recipe=json.dumps({k: v for k, v in vars(args).items() if k != "out"}))
    print(f"saved {args.out}")
    return results


if __name__ == "__main__":
    main()
