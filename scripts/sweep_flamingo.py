"""Lecture 08's training runs, longer than the notebook can afford: Flamingo's new layers on the
frozen TinyLM and image encoder, on interleaved (image, question, answer) prompts of the scenes.

Runs (name: gate shape, images, learning rate, epochs):
- scalar, vector: the paper's one gate per layer branch / IDEFICS's one per channel, lr 2e-3;
- scalar_shuffled, vector_shuffled: the same with every prompt given another prompt's images;
- scalar_lr2e-2: the learning rate the lecture first used;
- scalar_live: the short run the notebook repeats live (compare its numbers with this file's);
- prefix: Frozen's visual prefix (2 vectors per image) on the same prompts;
- binding_flamingo, binding_prefix: Frozen's fast binding (sec. 4.2): shapes named by labels drawn
  afresh for every prompt, which only the prompt's examples can give (not shown in the lecture:
  at this scale the models have not learned it yet).
The lecture reads scalar, scalar_shuffled and scalar_live.
For each run the results file holds the per-question test accuracy, the loss, and for Flamingo
tanh(alpha_xattn) and ||tanh(alpha) * xattn|| / ||x|| per layer every few steps.

    nice -n 10 python scripts/sweep_flamingo.py [--runs scalar scalar_shuffled ...]
writes course_lib/checkpoints/flamingo_sweep.json (merged with runs already there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from course_lib.connectors import VisualPrefixLM
from course_lib.flamingo import Flamingo
from course_lib.recipes.flamingo import (
    BINDING,
    SETUP,
    BranchMonitor,
    VqaLoss,
    binding_episodes,
    flamingo_config,
    prepare_scenes,
    query_accuracy,
    question_accuracy,
    vqa_episodes,
)
from course_lib.train import fit
from course_lib.utils import seed_everything

RESULTS = Path(__file__).resolve().parents[1] / "course_lib" / "checkpoints" / "flamingo_sweep.json"
RUNS = {  # name: (task, model, gate shape, shuffled images, learning rate, epochs)
    "scalar": ("vqa", "flamingo", "scalar", False, 2e-3, 10),
    "scalar_shuffled": ("vqa", "flamingo", "scalar", True, 2e-3, 10),
    "vector": ("vqa", "flamingo", "vector", False, 2e-3, 10),
    "vector_shuffled": ("vqa", "flamingo", "vector", True, 2e-3, 10),
    "scalar_lr2e-2": ("vqa", "flamingo", "scalar", False, 2e-2, 10),
    "scalar_live": ("vqa", "flamingo", "scalar", False, 2e-3, 1),
    "prefix": ("vqa", "prefix", None, False, 2e-3, 10),
    "binding_flamingo": ("binding", "flamingo", "scalar", False, 2e-3, BINDING["epochs"]),
    "binding_prefix": ("binding", "prefix", None, False, 2e-3, BINDING["epochs"]),
}
LOG_EVERY = 5


def episodes(task: str, s: dict, slots: int):
    """Training prompts and test prompts ({name: episodes}) of one task."""
    tok = s["tok"]
    if task == "vqa":
        make = lambda n, pool, seed: vqa_episodes(tok, s["answers"], n, pool, seed, SETUP["shots"], slots)  # noqa: E731
        return make(SETUP["n_train_prompts"], s["train_pool"], 0), {"test": make(SETUP["n_test_prompts"], s["test_pool"], 1)}
    one_object = [i for i, o in enumerate(s["objects"]) if len(o) == 1]  # the shape to name is the only one
    train_pool = [i for i in one_object if i in s["train_pool"]]
    test_pool = [i for i in one_object if i in s["test_pool"]]
    train = binding_episodes(tok, s["shapes"], BINDING["n_train_prompts"], train_pool, 0, BINDING["train_shots"],
                             BINDING["ways"], train=True, slots=slots)
    tests = {f"{k} shots": binding_episodes(tok, s["shapes"], BINDING["n_test_prompts"], test_pool, 1, k, BINDING["ways"], slots=slots)
             for k in BINDING["test_shots"]}
    return train, tests


def run(name: str, s: dict) -> dict:
    task, kind, alpha_shape, shuffled, lr, epochs = RUNS[name]
    slots = 2 if kind == "prefix" else 1
    train, tests = episodes(task, s, slots)
    seed_everything(0)
    if kind == "prefix":
        model = VisualPrefixLM(s["lm"], s["encoder"], image_token_id=s["tok"].image_id, num_prefix=2)
        monitor = None
    else:
        model = Flamingo(s["lm"], s["encoder"], flamingo_config(s["tok"].image_id, alpha_shape))
        monitor = BranchMonitor(model)
    with monitor or contextlib.nullcontext():
        hist = fit(model, train[:3], epochs=epochs, batch_size=SETUP["batch_size"], lr=lr, weight_decay=0.0,
                   loss_fn=VqaLoss(s["features"], shuffle_images=shuffled), progress=False,
                   after_step=monitor.step if monitor else None)
    if task == "vqa":
        test = question_accuracy(model, tests["test"], s["features"])
    else:
        test = {name: query_accuracy(model, eps, s["features"]) for name, eps in tests.items()}
    result = dict(task=task, model=kind, alpha_shape=alpha_shape, shuffled_images=shuffled, lr=lr, epochs=epochs,
                  loss_step=hist.step, loss=hist.loss, train_acc=hist.train_acc, test=test, seconds=round(hist.seconds, 1))
    if monitor is not None:
        result.update(gate=monitor.gate[LOG_EVERY - 1 :: LOG_EVERY], ratio=monitor.ratio[LOG_EVERY - 1 :: LOG_EVERY],
                      monitor_every=LOG_EVERY)
    return result


def dumps(results: dict) -> str:
    """JSON with one run per line and 4 decimals: small, and a rerun's diff is readable."""
    def rounded(v):
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        return [rounded(x) for x in v] if isinstance(v, (list, tuple)) else v
    lines = [f"{json.dumps(k)}: {json.dumps(rounded(v))}" for k, v in results.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    setup = prepare_scenes()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["setup"], results["binding"] = SETUP, BINDING
    for name in args.runs:
        results[name] = run(name, setup)
        r = results[name]
        print(f"{name}: {r['seconds']:.0f} s, test " + ", ".join(f"{k} {v:.3f}" for k, v in r["test"].items()), flush=True)
        args.out.write_text(dumps(results))  # after every run: a partial sweep is kept


if __name__ == "__main__":
    main()
