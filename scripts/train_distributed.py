"""Train a course_lib classifier on one or many processes with PyTorch's own engine (torchrun).

    # one process (CPU or one GPU)
    python scripts/train_distributed.py --model vit_scenes --epochs 5

    # 2 processes on this machine's CPU (gloo backend): the same result as one process
    torchrun --standalone --nproc_per_node 2 scripts/train_distributed.py --model vit_scenes --epochs 5

    # 8 GPUs, a real dataset from the Hugging Face hub (online), ViT-S/16 at 224 px, bf16
    torchrun --standalone --nproc_per_node 8 scripts/train_distributed.py \
        --model vit_small --dataset cifar100 --resolution 224 --batch-size 1024 --epochs 100 --compile

    # a model too large for one device's memory: shard weights, gradients and optimizer state
    torchrun --standalone --nproc_per_node 8 scripts/train_distributed.py --model vit_base --strategy fsdp ...

`--batch-size` is the global batch: each of the N processes takes 1/N of it, and the gradients are
averaged, so the optimisation is the same whatever N is (tests/test_distributed.py checks that the
losses and the final weights of 2 processes match one process). Random augmentations would differ
between processes, so this recipe uses none; add yours to `fit(augment=...)`.

Rank 0 prints the progress bar, evaluates, and writes the checkpoint (safetensors with the config
in its metadata, loadable with course_lib.utils.load_checkpoint) and a JSON log of the losses.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from course_lib import convnext, data, swin, vit
from course_lib.distributed import distributed_info, full_state_dict
from course_lib.train import evaluate, fit
from course_lib.utils import get_device, seed_everything

MODELS = {
    # the course's CPU-sized models for 32x32 scenes
    "vit_scenes": lambda n: vit.vit_scenes(num_classes=n),
    "vit_micro": lambda n: vit.ViT(vit.ViTConfig(image_size=32, patch_size=8, num_classes=n, dim=32, depth=2, num_heads=2, mlp_ratio=2.0)),
    "swin_micro": lambda n: swin.swin_micro(num_classes=n),
    "convnextv2_atto": lambda n: convnext.convnextv2_atto(num_classes=n),
    # the papers' sizes, for real data at 224 px on GPUs
    "vit_tiny": lambda n: vit.vit_tiny(num_classes=n),
    "vit_small": lambda n: vit.vit_small(num_classes=n),
    "vit_base": lambda n: vit.vit_base(num_classes=n),
    "swin_tiny": lambda n: swin.swin_tiny(num_classes=n),
    "convnextv2_tiny": lambda n: convnext.convnextv2_tiny(num_classes=n),
}


def load_data(args) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], int]:
    """(train, test, number of classes): the course's scenes offline, or a hub dataset online."""
    if args.dataset == "scenes":
        train = data.to_tensors(data.scenes(args.n_train, "train", resolution=args.resolution))
        test = data.to_tensors(data.scenes(args.n_test, "test", resolution=args.resolution))
        return train[:2], test[:2], len(data.SHAPES)
    train_ds = data.load_hf(args.dataset, "train", resolution=args.resolution, n=args.n_train)
    test_ds = data.load_hf(args.dataset, args.test_split, resolution=args.resolution, n=args.n_test)
    n_classes = train_ds.features["label"].num_classes
    return data.to_tensors(train_ds)[:2], data.to_tensors(test_ds)[:2], n_classes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_scenes", choices=sorted(MODELS))
    p.add_argument("--dataset", default="scenes", help="'scenes' (offline) or a Hugging Face dataset id or folder")
    p.add_argument("--test-split", default="test")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--n-train", type=int, default=2048, help="training images (the whole split: 0)")
    p.add_argument("--n-test", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split across processes")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("_build/distributed/model.safetensors"))
    args = p.parse_args()
    args.n_train = args.n_train or None

    if "RANK" in os.environ:  # started by torchrun
        device = get_device()
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
    else:
        device = get_device()
    rank, world = distributed_info()
    seed_everything(args.seed)  # the same initial weights on every process
    train, test, n_classes = load_data(args)
    model = MODELS[args.model](n_classes)
    start = time.time()
    hist = fit(model, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
               device=device, seed=args.seed, log_every=1, compile=args.compile, channels_last=args.channels_last,
               strategy=args.strategy, progress=rank == 0)
    acc = evaluate(model, test, device=device)  # every process takes part (FSDP gathers the shards)
    state = full_state_dict(model)
    if rank == 0:
        from safetensors.torch import save_file

        args.out.parent.mkdir(parents=True, exist_ok=True)
        config = json.dumps(__import__("dataclasses").asdict(model.config))
        save_file({k: v.contiguous() for k, v in state.items()}, str(args.out), metadata={"config": config, "model": args.model})
        log = {"processes": world, "step": hist.step, "loss": hist.loss, "grad_norm": hist.grad_norm, "test_accuracy": acc,
               "seconds": round(time.time() - start, 2), "images_per_s": round(hist.images_per_s, 1)}
        args.out.with_suffix(".json").write_text(json.dumps(log, indent=1))
        print(f"{world} process(es), {hist.step[-1]} steps, final loss {hist.loss[-1]:.4f}, "
              f"test accuracy {acc:.4f}, {log['seconds']} s; wrote {args.out}")
    if world > 1:
        dist.barrier()  # every process waits for rank 0's files: tearing gloo down early aborts a peer
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
