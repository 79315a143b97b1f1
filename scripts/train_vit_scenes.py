"""Train the small ViT that lecture 01 analyses, and save it as a safetensors checkpoint.

    python scripts/train_vit_scenes.py                      # the shipped checkpoint (~15 min on 2 CPU cores)
    python scripts/train_vit_scenes.py --epochs 1 --n 256 --out /tmp/vit.safetensors   # a smoke run

The model config is stored in the checkpoint's metadata, so `load_checkpoint` rebuilds it exactly.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from course_lib import data
from course_lib.train import evaluate, fit
from course_lib.utils import save_checkpoint, seed_everything
from course_lib.vit import vit_scenes

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "course_lib" / "checkpoints" / "vit_scenes.safetensors"


def hflip(images: torch.Tensor) -> torch.Tensor:
    """Mirror half the batch left-right: every shape keeps its name under a horizontal flip."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--n", type=int, default=6000, help="training images")
    p.add_argument("--n-test", type=int, default=1000, help="test images (the accuracy stored in the checkpoint)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-objects", type=int, default=1, help="1: one shape per image, as in lecture 01")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()

    seed_everything(0)
    train = data.to_tensors(data.scenes(args.n, "train", max_objects=args.max_objects))
    test = data.to_tensors(data.scenes(args.n_test, "test", max_objects=args.max_objects))
    model = vit_scenes(num_classes=len(data.SHAPES))  # the config is in course_lib.vit.vit_scenes
    start = time.time()
    fit(model, train, epochs=args.epochs, batch_size=64, lr=args.lr, weight_decay=0.05, warmup=0.05,
               augment=hflip, eval_data=test, log_every=50)
    acc = evaluate(model, test)
    print(f"test accuracy {acc:.3f} after {args.epochs} epochs ({time.time() - start:.0f} s)")
    save_checkpoint(model, args.out, test_accuracy=f"{acc:.4f}", test_images=args.n_test, epochs=args.epochs, train_images=args.n,
                    max_objects=args.max_objects)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
