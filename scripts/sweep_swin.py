"""Train lecture 02's small models with several seeds and write the results file it loads.

    python scripts/sweep_swin.py                  # all points (about 10 min of one CPU core at the default setting)
    python scripts/sweep_swin.py --smoke --out /tmp/sweep.json   # a few seconds: the code path only

On a shared machine the points can run as separate processes and be merged afterwards:
    python scripts/sweep_swin.py --names ViT --seeds 0 --no-deep --out /tmp/part_vit0.json  # ... one per part
    python scripts/sweep_swin.py --merge /tmp/part_*.json                                   # -> the results file

Three experiments on the scenes (course_lib.recipes.swin holds every setting):
1. a ViT and a Swin reading the same 2x2-pixel patches: test accuracy per epoch and per class;
2. a toy Table 4 of the Swin paper: shifted windows and the relative position bias switched off
   one at a time, each with every seed;
3. Swin V2's argument for residual post-norm: the amplitude of the main path after every block of
   a deep stack, pre-norm against res-post-norm, after the same training.
It also saves the seed-0 Swin (swin_scenes.safetensors), whose trained bias table the lecture shows.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from course_lib import data
from course_lib.recipes import swin as recipe
from course_lib.train import fit
from course_lib.utils import CHECKPOINTS, save_checkpoint, seed_everything


def run_classifiers(names: list[str], seeds: list[int], setting: recipe.Setting, train, test, out: Path | None) -> dict:
    """Every (model, seed) point: test accuracy per epoch, final train accuracy, accuracy per class."""
    results = {}
    for name in names:
        rows = []
        for seed in seeds:
            start = time.time()
            model, hist = recipe.train_point(name, seed, train, test, setting)
            per_class = recipe.per_class_accuracy(model, *test, len(data.SHAPES))
            rows.append({"seed": seed, "test_acc": hist.eval_acc[-1], "test_acc_per_epoch": hist.eval_acc,
                         "train_acc": hist.train_acc[-1], "per_class": per_class})
            print(f"{name:28s} seed {seed}: test {hist.eval_acc[-1]:.3f}, train {hist.train_acc[-1]:.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
            if out is not None and name == "shifted windows, rel. pos." and seed == seeds[0]:
                save_checkpoint(model, out, test_accuracy=f"{hist.eval_acc[-1]:.4f}", seed=seed,
                                epochs=setting.epochs, train_images=setting.train_images)
        results[name] = rows
    return results


def run_deep_stacks(seeds: list[int], setting: recipe.Setting, train, test, norms: list[str]) -> dict:
    """Pre-norm and res-post-norm deep stacks: amplitude per block before and after training."""
    probe = test[0][:256]
    results = {}
    for post_norm in (norm == "res-post-norm" for norm in norms):
        rows = []
        for seed in seeds:
            seed_everything(seed)
            model = recipe.build_deep_stack(post_norm)
            before = recipe.activation_amplitude(model, probe)
            hist = fit(model, train, epochs=setting.epochs, batch_size=setting.batch_size, lr=setting.lr,
                       weight_decay=setting.weight_decay, warmup=setting.warmup, eval_data=test, seed=seed,
                       progress=False, log_every=20, **setting.fit_kwargs)
            after = recipe.activation_amplitude(model, probe)
            rows.append({"seed": seed, "amplitude_init": before, "amplitude_trained": after,
                         "test_acc": hist.eval_acc[-1]})
            print(f"deep stack, {'res-post-norm' if post_norm else 'pre-norm':13s} seed {seed}: test "
                  f"{hist.eval_acc[-1]:.3f}, amplitude first/last block {after[0]:.2f}/{after[-1]:.2f}", flush=True)
        results["res-post-norm" if post_norm else "pre-norm"] = rows
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--deep-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--names", nargs="*", default=["ViT", *recipe.VARIANTS], help="models to train (default: all)")
    p.add_argument("--no-deep", action="store_true", help="skip the deep stacks")
    p.add_argument("--norms", nargs="+", default=["pre-norm", "res-post-norm"], choices=["pre-norm", "res-post-norm"],
                   help="which deep stacks to train")
    p.add_argument("--merge", type=Path, nargs="+", help="merge the results files of separate runs into --out")
    p.add_argument("--smoke", action="store_true", help="tiny data and one epoch: checks the code path only")
    p.add_argument("--out", type=Path, default=recipe.RESULTS)
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINTS / "swin_scenes.safetensors")
    args = p.parse_args()

    torch.set_num_threads(1)  # one core: the sweep shares the machine
    if args.merge:
        write(merge([json.loads(f.read_text()) for f in args.merge]), args.out)
        return
    setting = recipe.SETTING
    if args.smoke:
        setting = replace(setting, train_images=64, test_images=32, epochs=1)
        args.seeds, args.deep_seeds = args.seeds[:1], args.deep_seeds[:1]
    train, test = recipe.load_data(setting)
    start = time.process_time()
    results = {
        "setting": asdict(setting),
        "classes": list(data.SHAPES),
        "seeds": args.seeds,
        "classifiers": run_classifiers(args.names, args.seeds, setting, train, test,
                                       None if args.smoke else args.checkpoint),
        "deep_stacks": {} if args.no_deep else run_deep_stacks(args.deep_seeds, setting, train, test, args.norms),
        "cpu_minutes": round((time.process_time() - start) / 60, 1),
    }
    write(results, args.out)


def merge(parts: list[dict]) -> dict:
    """One results file from separate runs of the same setting: their points, sorted by seed."""
    if any(p["setting"] != parts[0]["setting"] for p in parts):
        raise ValueError("these results files were made with different settings: rerun them with one setting")
    out = {**parts[0], "classifiers": {}, "deep_stacks": {}, "cpu_minutes": sum(p["cpu_minutes"] for p in parts)}
    for part in parts:
        for key in ("classifiers", "deep_stacks"):
            for name, rows in part[key].items():
                out[key][name] = sorted(out[key].get(name, []) + rows, key=lambda r: r["seed"])
    out["seeds"] = sorted({r["seed"] for rows in out["classifiers"].values() for r in rows})
    return out


def write(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
