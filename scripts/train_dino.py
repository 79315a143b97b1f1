"""Train the small DINO of lecture 05 on the scenes data and save its teacher backbone.

    python scripts/train_dino.py                      # course_lib/checkpoints/dino_scenes.safetensors
    python scripts/train_dino.py --steps 2 --out /tmp/x.safetensors   # a smoke test

No labels are used for training. The scenes' attributes (the large object's shape and colour,
the background) only serve the kNN evaluation of the teacher's CLS features, printed along the
way and stored, with the loss curve, in the file's metadata (JSON); step 0 is the random
initialisation. The lecture loads it with `course_lib.utils.load_checkpoint(path, ViT, ViTConfig)`.

The loop is `course_lib.train.fit` (AdamW on the student, warmup and cosine learning rate), with
DINO's steps from `course_lib.recipes.dino.DINOSteps` (multi-crop views, the teacher temperature,
the EMA teacher update after every optimizer step). `--steps` is rounded up to whole epochs.

The recipe is tuned for about 15 minutes of one CPU thread (1000 steps of 64 images):
- KoLeo (DINOv2) on: at this scale the DINO loss alone does not leave the uniform/constant
  output of a random ViT within the budget; KoLeo spreads the CLS features from the first steps.
  `--koleo-weight 0` trains the ablation the lecture compares with.
- teacher momentum 0.99 -> 0.995 instead of DINO's 0.996 -> 1: over 1000 steps a momentum that
  reaches 1 freezes the teacher while the student is still learning, and its features lag.
- tau_t = 0.04 from the start (DINO's value; 0.01 makes the teacher one-hot on a few prototypes).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from course_lib import data, dino
from course_lib.recipes.dino import DINOSteps, SceneKNN
from course_lib.train import fit
from course_lib.utils import save_checkpoint, seed_everything
from course_lib.vit import ViT, ViTConfig

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "course_lib" / "checkpoints" / "dino_scenes.safetensors"
BACKBONE = dict(image_size=32, patch_size=4, num_classes=0, dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_registers=2)
HEAD = dict(out_dim=256, hidden_dim=256, bottleneck_dim=64, momentum=0.99, momentum_final=0.995, tau_t=0.04, tau_t_start=0.04,
            n_local=4, global_size=32, local_size=16, koleo_weight=0.1)


def build(**head_overrides) -> dino.DINO:
    return dino.DINO(ViT(ViTConfig(**BACKBONE)), dino.DINOConfig(**{**HEAD, **head_overrides}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps, rounded up to whole epochs of the training images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--koleo-weight", type=float, default=HEAD["koleo_weight"])
    p.add_argument("--n-knn", type=int, default=1000, help="labelled training images for the kNN evaluation (500 test images)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(0)
    head = {**HEAD, "koleo_weight": args.koleo_weight}
    model = build(**head)  # right after seeding: lecture 05 rebuilds this random initialisation
    train_x, _ = data.to_tensors(data.scenes(args.n_train, "train"))
    knn = SceneKNN(args.n_knn)

    def evaluate(m: dino.DINO) -> float:
        """kNN accuracy of the teacher's features on each attribute; returns the mean."""
        mean = knn(m)
        print({a: round(v[-1], 3) for a, v in knn.history.items()})
        return mean

    steps = DINOSteps(model, eval_fn=evaluate, eval_every=args.eval_every)
    epochs = math.ceil(args.steps / math.ceil(args.n_train / args.batch_size))
    start = time.time()
    hist = fit(model, (train_x,), epochs=epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=0.04, warmup=0.1,
               clip_grad=3.0, loss_fn=steps.loss_fn, after_step=steps.after_step)
    print(f"{steps.step} steps in {time.time() - start:.0f} s")
    history = {"step": steps.steps, **{k: [round(v, 5) for v in vs] for k, vs in steps.stats.items()}, "eval_step": steps.eval_steps,
               "knn": knn.history}
    save_checkpoint(model.teacher.backbone, args.out, dino_config=json.dumps(head), history=json.dumps(history),
                    steps=steps.step, batch_size=args.batch_size, train_images=args.n_train, seconds=round(hist.seconds),
                    cpu_seconds=round(time.process_time()), threads=torch.get_num_threads())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
