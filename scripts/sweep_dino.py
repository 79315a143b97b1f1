"""The augmentation ablation of lecture 05: DINO continued from the shipped teacher
(dino_scenes.safetensors, fresh heads) on one-object scenes, with the colour jitter alone or with
a random colour-channel permutation per view, over several seeds; the kNN accuracy per attribute
of the teacher at step 0 (the shipped teacher), every `--eval-every` steps and at the end, as JSON.

    python scripts/sweep_dino.py                                  # every config and seed, in turn
    python scripts/sweep_dino.py --configs permute --seeds 1 --out /tmp/part.json   # one run (in parallel)
    python scripts/sweep_dino.py --merge /tmp/part*.json          # -> course_lib/checkpoints/dino_ablation.json

Every run keeps the large object's centre in all its crops (`--keep-object` of train_dino.py), so
the two configs differ in the colour augmentation alone. The teacher backbone of every run is saved
beside the JSON, so lecture 05 re-measures them. Why continue rather than start from scratch:
runs from a random initialisation (`--init ""`, planned for 189 steps, stopped early) were still
within 0.06 of the random encoder's kNN accuracy on every attribute at step 126 (seeds 0-1) and
step 63 (seed 2) with either config, so they could not show what the augmentation changes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from course_lib.recipes.dino import SceneKNN
from course_lib.utils import save_checkpoint
from train_dino import HEAD, train

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "course_lib" / "checkpoints" / "dino_ablation.json"
CONFIGS = {  # name: changes to train_dino.HEAD; every run also keeps the object in its crops
    "jitter": {"permute_channels": False, "keep_object": True},  # brightness, contrast, saturation, grayscale
    "permute": {"permute_channels": True, "keep_object": True},  # the same, then the channels in a random order
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"some of {list(CONFIGS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=126, help="optimizer steps (126: 2 epochs of 4,000 scenes)")
    p.add_argument("--eval-every", type=int, default=63, help="kNN of the teacher every so many steps (and at 0 and the end)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init", default="dino_scenes.safetensors", help="the shipped backbone every run starts from (fresh heads); '' for a random one")
    p.add_argument("--merge", type=Path, nargs="+", help="merge the runs of these result files into --out and stop")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON; checkpoints go to its folder")
    args = p.parse_args()
    if args.merge:
        parts = [json.loads(f.read_text()) for f in args.merge]
        merged = {**parts[0], "runs": [r for part in parts for r in part["runs"]]}
        args.out.write_text(json.dumps(merged, indent=1))
        print(f"wrote {args.out}: {len(merged['runs'])} runs")
        return
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}: choose among {list(CONFIGS)}")
    torch.set_num_threads(args.threads)
    knn, runs = SceneKNN(1000), []
    for name in args.configs:
        for seed in args.seeds:
            start = time.process_time()
            head = {**HEAD, **CONFIGS[name]}
            model, history, _ = train(head, steps=args.steps, seed=seed, max_objects=1, eval_every=args.eval_every, knn=knn, init=args.init or None)
            checkpoint = f"dino_ablation_{name}_s{seed}{'' if args.init else '_scratch'}.safetensors"
            save_checkpoint(model.teacher.backbone, args.out.parent / checkpoint, dino_config=json.dumps(head), seed=seed,
                            steps=history["eval_step"][-1], max_objects=1)
            runs.append({"config": name, "seed": seed, "steps": history["eval_step"][-1], "cpu_seconds": round(time.process_time() - start),
                         "checkpoint": checkpoint, "eval_step": history["eval_step"], "knn": history["knn"]})
            print(runs[-1], flush=True)
            args.out.write_text(json.dumps({"recipe": HEAD, "configs": CONFIGS, "max_objects": 1, "init": args.init, "runs": runs}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
