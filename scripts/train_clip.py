"""Train the tiny CLIP that lecture 06 analyses, on scenes images and their captions, and save it.

    python scripts/train_clip.py                                     # the shipped checkpoint
    python scripts/train_clip.py --epochs 1 --n 256 --out /tmp/clip.safetensors   # a smoke run

The model config and the tokenizer's vocabulary are stored in the checkpoint's metadata, so
`course_lib.recipes.clip.load_scenes_clip` rebuilds both exactly.

Training runs through `course_lib.train.fit`, with the logit-scale clamp as its `after_step`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from course_lib import clip, data
from course_lib.recipes import clip as recipe
from course_lib.recipes.text import WordTokenizer, caption_tokenizer
from course_lib.train import extract_features, fit
from course_lib.utils import save_checkpoint, seed_everything

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "course_lib" / "checkpoints" / "clip_scenes.safetensors"
CONTEXT = 32  # the longest scenes caption is 30 tokens plus <sot> and <eot>


@torch.no_grad()
def evaluate(model: clip.CLIP, tok: WordTokenizer, images: torch.Tensor, ds) -> dict[str, float]:
    """Zero-shot accuracy on the large object's shape and colour, and image->text recall@1."""
    model.eval()
    shape_w = recipe.zero_shot_classifier(model, data.SHAPES, [f"a large {c} {{}}" for c in data.COLORS], tok)
    color_w = recipe.zero_shot_classifier(model, list(data.COLORS), [f"a large {{}} {s}" for s in data.SHAPES], tok)
    shapes = torch.tensor(ds["label"])
    colors = torch.tensor([list(data.COLORS).index(o[0]["color"]) for o in ds["objects"]])
    image_emb = extract_features(lambda x: model.encode_image(x, normalize=True), images, model=model)
    text_emb = extract_features(lambda t: model.encode_text(t, normalize=True), tok.encode_batch(ds["caption"], CONTEXT), model=model)
    return {
        "shape_acc": (recipe.zero_shot_logits(model, images, shape_w).argmax(1) == shapes).float().mean().item(),
        "color_acc": (recipe.zero_shot_logits(model, images, color_w).argmax(1) == colors).float().mean().item(),
        "recall1": clip.recall_at_k(image_emb[:500] @ text_emb[:500].T, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--n", type=int, default=8000, help="training pairs")
    p.add_argument("--n-test", type=int, default=1000, help="test pairs for the printed scores")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss", choices=["clip", "siglip"], default="clip")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    seed_everything(0)
    train_ds, test_ds = data.scenes(args.n, "train"), data.scenes(args.n_test, "test")
    tok = caption_tokenizer(train_ds["caption"])
    x_train = clip.preprocess(data.to_tensors(train_ds)[0])
    x_test = clip.preprocess(data.to_tensors(test_ds)[0])
    ids_train = tok.encode_batch(train_ds["caption"], CONTEXT)
    factory = clip.siglip_tiny if args.loss == "siglip" else clip.clip_tiny
    model = factory(vocab_size=tok.vocab_size, context_length=CONTEXT)
    start = time.time()
    hist = fit(model, (x_train, ids_train), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=0.1,
               warmup=0.05, loss_fn=recipe.batch_loss, after_step=recipe.clamp_logit_scale(model), log_every=25)
    scores = evaluate(model, tok, x_test, test_ds)
    print(f"{args.epochs} epochs in {time.time() - start:.0f} s, final loss {hist.loss[-1]:.3f}, temperature "
          f"{model.temperature:.4f}; test: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    save_checkpoint(model, args.out, vocab=json.dumps(tok.vocab), epochs=args.epochs, train_pairs=args.n,
                    batch_size=args.batch_size, test_pairs=args.n_test, **{k: f"{v:.4f}" for k, v in scores.items()})
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
