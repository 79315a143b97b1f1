"""Visual instructions generated from the scenes' annotations (card: data/instructions.md).

LLaVA (Liu et al., 2023, sec. 3) never showed GPT-4 the images: it wrote instructions from each
image's captions and boxes. The scenes' annotations (shape, colour, size, 3x3 position of every
object, background) play that role here, and templates play GPT-4's. Four kinds, as in
LLaVA-Instruct plus the yes/no questions of the VQA benchmarks:

- conversation: three turns of short questions about the large object and the count;
- detailed description: every object and the background, in a fixed order;
- reasoning: a question that combines attributes and positions ("what is left of the red
  circle?"), answered with another object's description;
- yes/no: "is there a red circle?", true half of the time; half of the false ones are hard
  negatives (the colour or the shape is in the image, not on the same object), so that a model has
  to bind colour to shape instead of spotting words.

Stage 1 uses `caption_sample` (a brief description, LLaVA's caption data). For AnyRes,
`panorama` glues two or three scenes into one wide or tall image and asks about one panel.
Everything is deterministic: sample i depends only on the seed and i.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import data
from .text import WordTokenizer, lm_tokenizer

KINDS = ("conversation", "detailed", "reasoning", "yes/no")
USER, ASSISTANT = "<user>", "<assistant>"
RELATIONS = {  # name -> test on (row, column) of the other object relative to the reference
    "left of": lambda dr, dc: dc < 0,
    "right of": lambda dr, dc: dc > 0,
    "above": lambda dr, dc: dr < 0,
    "below": lambda dr, dc: dr > 0,
}
PANELS = {2: ("first", "second"), 3: ("first", "second", "third")}
_WORDS = (
    "a an and at the on in of is are there what where how many shape shapes color object large small "
    "background plain striped checkered noisy center yes no , ? . describe image briefly detail "
    "left right above below top bottom nothing next to it panel first second third"
)


def instruction_tokenizer() -> WordTokenizer:
    """Word-level tokenizer over the instruction vocabulary, with the chat markers <user> and
    <assistant> (ids: <pad> 0, <bos> 1, <eos> 2, <image> 3)."""
    words = set(_WORDS.split()) | set(data.SHAPES) | set(data.COLORS) | set(data.NUMBERS) | {USER, ASSISTANT}
    words |= {w for p in data.POSITIONS for w in p.split()}
    return lm_tokenizer(words)


def _desc(o: dict) -> str:
    return f"{o['color']} {o['shape']}"


def _cell(o: dict) -> tuple[int, int]:
    return divmod(data.POSITIONS.index(o["position"]), 3)


def conversation(scene: dict, rng: np.random.Generator) -> list[tuple[str, str]]:
    main = scene["objects"][0]
    pool = [
        ("what shape is the large object ?", main["shape"]),
        ("what color is it ?", main["color"]),
        ("how many shapes are there ?", data.NUMBERS[len(scene["objects"])]),
        (f"where is the {_desc(main)} ?", main["position"]),
    ]
    order = [0, 1] + list(rng.permutation([2, 3]))  # "it" needs the shape question before it
    return [pool[i] for i in order[:3]]


def detailed_description(scene: dict) -> str:
    objects = scene["objects"]
    n = len(objects)
    head = "there is one shape ." if n == 1 else f"there are {data.NUMBERS[n]} shapes ."
    parts = [f"a {o['size']} {_desc(o)} {data._where(o['position'])} ." for o in objects]
    adjective = {"plain": "plain", "stripes": "striped", "checker": "checkered", "noise": "noisy"}[scene["background"]]
    return " ".join([head, *parts, f"the background is {adjective} ."])


def reasoning(scene: dict, rng: np.random.Generator) -> tuple[str, str]:
    """'what is <relation> the <colour> <shape>?' with exactly one object in that relation."""
    objects = scene["objects"]
    if len(objects) == 1:
        return f"what is next to the {_desc(objects[0])} ?", "nothing"
    options = []
    for ref in objects:
        for name, test in RELATIONS.items():
            (r0, c0) = _cell(ref)
            hits = [o for o in objects if o is not ref and test(_cell(o)[0] - r0, _cell(o)[1] - c0)]
            if len(hits) == 1:
                options.append((f"what is {name} the {_desc(ref)} ?", f"the {hits[0]['size']} {_desc(hits[0])}"))
    if not options:  # cannot happen with distinct cells, kept as a guard
        return f"what is next to the {_desc(objects[0])} ?", f"the {_desc(objects[1])}"
    return options[int(rng.integers(len(options)))]


def yes_no(scene: dict, rng: np.random.Generator) -> tuple[str, str]:
    objects = scene["objects"]
    present = {(o["color"], o["shape"]) for o in objects}
    if rng.random() < 0.5:
        o = objects[int(rng.integers(len(objects)))]
        return f"is there a {_desc(o)} ?", "yes"
    colors, shapes = list(data.COLORS), list(data.SHAPES)
    o = objects[int(rng.integers(len(objects)))]
    while True:  # half hard negatives (one attribute of a present object kept), half random
        kind = rng.random()
        c = o["color"] if kind < 0.25 else colors[int(rng.integers(len(colors)))]
        s = o["shape"] if 0.25 <= kind < 0.5 else shapes[int(rng.integers(len(shapes)))]
        if (c, s) not in present:
            return f"is there a {c} {s} ?", "no"


def instructions(scene: dict, index: int, seed: int = 0) -> list[dict]:
    """One sample of each kind for a scene: dicts with 'kind' and 'turns' [(question, answer)]."""
    rng = np.random.default_rng([seed, index, 7])
    return [
        {"kind": "conversation", "turns": conversation(scene, rng)},
        {"kind": "detailed", "turns": [("describe the image in detail .", detailed_description(scene))]},
        {"kind": "reasoning", "turns": [reasoning(scene, rng)]},
        {"kind": "yes/no", "turns": [yes_no(scene, rng)]},
    ]


def caption_sample(scene: dict) -> dict:
    """Stage 1 (feature alignment): a brief description, the scenes' caption."""
    return {"kind": "caption", "turns": [("describe the image briefly .", scene["caption"])]}


def scene_records(ds) -> list[dict]:
    """A scenes dataset's annotations as plain dicts (objects, background, caption)."""
    return [{"objects": o, "background": b, "caption": c} for o, b, c in zip(ds["objects"], ds["background"], ds["caption"])]


# ----------------------------------------------------------------------------------------------
# Panoramas for AnyRes: several scenes side by side, one question about one panel
# ----------------------------------------------------------------------------------------------
def panorama(index: int, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Image (3, H, W) float in [0, 1] of 2 or 3 scenes (32x32 each) in a row or a column, and a
    question about the large object of one panel ("what shape is the large object in the second
    panel ?"). Squeezed into one 32x32 view, each panel shrinks to a third or half of its size."""
    rng = np.random.default_rng([seed, data.SPLIT_SEEDS[split], index, 11])
    k = int(rng.integers(2, 4))
    wide = bool(rng.random() < 0.5)
    stream = 100 + seed * 1000 + data.SPLIT_SEEDS[split]
    scenes = [data.render_scene(index * 3 + j, stream) for j in range(k)]
    panels = [torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 255 for s in scenes]
    image = torch.cat(panels, dim=2 if wide else 1)
    j = int(rng.integers(k))
    attribute = "shape" if rng.random() < 0.5 else "color"
    main = scenes[j]["objects"][0]
    question = f"what {attribute} is the large object in the {PANELS[k][j]} panel ?"
    return image, {"kind": attribute, "turns": [(question, main[attribute])]}
