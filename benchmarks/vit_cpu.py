"""Throughput of course_lib's ViT against transformers' ViTModel with the same weights, on the
same device, batch and input: inference and one training step, images per second.

    python benchmarks/vit_cpu.py                # the course's small config on the CPU
    python benchmarks/vit_cpu.py --dim 768 --depth 12 --heads 12 --image 224 --patch 16 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from course_lib.utils import autocast
from course_lib.vit import ViT


def images_per_second(fn, batch: int, device: str, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    cfg = transformers.ViTConfig(hidden_size=args.dim, num_hidden_layers=args.depth, num_attention_heads=args.heads,
                                 intermediate_size=4 * args.dim, image_size=args.image, patch_size=args.patch,
                                 attn_implementation="sdpa")
    ref = transformers.ViTModel(cfg, add_pooling_layer=False).to(args.device)
    ours = ViT.from_hf(ref).to(args.device)
    x = torch.randn(args.batch, 3, args.image, args.image, device=args.device)
    rows = []
    for name, model, forward in [("transformers ViTModel", ref, lambda m: m(x).last_hidden_state),
                                 ("course_lib ViT", ours, lambda m: m.forward_features(x))]:
        model.eval()

        def infer(model=model, forward=forward):
            with torch.no_grad(), autocast(args.device):
                forward(model)

        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()

        def train_step(model=model, forward=forward, opt=opt):
            with autocast(args.device):
                loss = forward(model).float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        rows.append((name, images_per_second(infer, args.batch, args.device), images_per_second(train_step, args.batch, args.device)))
    print(f"ViT dim {args.dim} depth {args.depth} heads {args.heads}, {args.image}px / patch {args.patch}, "
          f"batch {args.batch}, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':24s} {'inference img/s':>16s} {'train img/s':>12s}")
    for name, inf, tr in rows:
        print(f"{name:24s} {inf:16.0f} {tr:12.0f}")
    print(f"course_lib / transformers: inference {rows[1][1] / rows[0][1]:.2f}x, training {rows[1][2] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
