"""Train the small DINO of lecture 05 on the scenes data and save its teacher backbone.

    python scripts/train_dino.py                      # course_lib/checkpoints/dino_scenes.safetensors
    python scripts/train_dino.py --steps 2 --out /tmp/x.safetensors   # a smoke test
    python scripts/train_dino.py --max-objects 1 --permute-channels --keep-object \
        --out course_lib/checkpoints/dino_scenes_shape.safetensors     # the run aimed at shape

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
from course_lib.recipes.dino import DINOSteps, SceneKNN, object_centres
from course_lib.train import fit
from course_lib.utils import load_checkpoint, save_checkpoint, seed_everything
from course_lib.vit import ViT, ViTConfig

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "course_lib" / "checkpoints" / "dino_scenes.safetensors"
BACKBONE = dict(image_size=32, patch_size=4, num_classes=0, dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_registers=2)
HEAD = dict(out_dim=256, hidden_dim=256, bottleneck_dim=64, momentum=0.99, momentum_final=0.995, tau_t=0.04, tau_t_start=0.04,
            n_local=4, global_size=32, local_size=16, koleo_weight=0.1)


def build(**head_overrides) -> dino.DINO:
    return dino.DINO(ViT(ViTConfig(**BACKBONE)), dino.DINOConfig(**{**HEAD, **head_overrides}))


def train(head: dict, *, steps: int = 1000, seed: int = 0, max_objects: int = 3, n_train: int = 4000, batch_size: int = 64,
          lr: float = 1e-3, eval_every: int = 100, knn: SceneKNN | None = None, init: str | None = None) -> tuple[dino.DINO, dict, float]:
    """One DINO run with the recipe HEAD updated by `head`; returns the model, its history (per-step
    loss terms, kNN per attribute every `eval_every` steps and at the end) and the seconds taken.
    The model is built right after seeding, so seed 0 gives the initialisation lecture 05 rebuilds.
    init: a shipped backbone (e.g. "dino_scenes.safetensors") that student and teacher start from,
    with fresh heads."""
    seed_everything(seed)
    model = build(**head)
    if init:
        start = load_checkpoint(init, ViT, ViTConfig)[0].state_dict()
        model.student.backbone.load_state_dict(start)
        model.teacher.backbone.load_state_dict(start)
    train_scenes = data.scenes(n_train, "train", max_objects=max_objects)
    batch = (data.to_tensors(train_scenes)[0], object_centres(train_scenes))
    knn = knn or SceneKNN(1000)
    knn.history = {a: [] for a in knn.history}

    def evaluate(m: dino.DINO) -> float:
        """kNN accuracy of the teacher's features on each attribute; returns the mean."""
        mean = knn(m)
        print({a: round(v[-1], 3) for a, v in knn.history.items()}, flush=True)
        return mean

    # eval_every=0: measure only at step 0 and at the end
    dino_steps = DINOSteps(model, seed=seed, eval_fn=evaluate, eval_every=eval_every or 10**9)
    if not eval_every:
        dino_steps._evaluate()
    epochs = math.ceil(steps / math.ceil(n_train / batch_size))
    hist = fit(model, batch, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=0.04, warmup=0.1, clip_grad=3.0,
               loss_fn=dino_steps.loss_fn, after_step=dino_steps.after_step, seed=seed)
    if dino_steps.eval_steps[-1] != dino_steps.step:
        dino_steps._evaluate()
    history = {"step": dino_steps.steps, **{k: [round(v, 5) for v in vs] for k, vs in dino_steps.stats.items()},
               "eval_step": dino_steps.eval_steps, "knn": knn.history}
    return model, history, hist.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps, rounded up to whole epochs of the training images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-objects", type=int, default=3, help="objects per training scene (1: the labelled object alone)")
    p.add_argument("--permute-channels", action="store_true", help="every view gets its own random order of the RGB channels")
    p.add_argument("--keep-object", action="store_true", help="every crop contains the large object's centre")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--koleo-weight", type=float, default=HEAD["koleo_weight"])
    p.add_argument("--n-knn", type=int, default=1000, help="labelled training images for the kNN evaluation (500 test images)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    head = {**HEAD, "koleo_weight": args.koleo_weight, "permute_channels": args.permute_channels, "keep_object": args.keep_object}
    model, history, seconds = train(head, steps=args.steps, seed=args.seed, max_objects=args.max_objects, n_train=args.n_train,
                                    batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every, knn=SceneKNN(args.n_knn))
    print(f"{history['step'][-1]} steps in {seconds:.0f} s")
    save_checkpoint(model.teacher.backbone, args.out, dino_config=json.dumps(head), history=json.dumps(history),
                    steps=history["step"][-1], batch_size=args.batch_size, train_images=args.n_train, max_objects=args.max_objects,
                    seed=args.seed, seconds=round(seconds), cpu_seconds=round(time.process_time()), threads=torch.get_num_threads())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
