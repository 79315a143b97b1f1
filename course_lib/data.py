"""Offline data for the course, as Hugging Face `datasets.Dataset` objects.

- `scenes(...)`: synthetic images of one to three coloured shapes on a textured background, with a
  class label, per-object attributes, segmentation masks, a caption and question/answer pairs.
  Deterministic (image i depends only on the seed and i), generated in seconds, cached on disk.
- `photo(name)`: real photos that ship inside installed packages (matplotlib, scikit-learn).
- `digits()`: scikit-learn's 1,797 handwritten digits as a small real image dataset.
- `load_hf(name, ...)`: a real Hugging Face dataset (online), converted to the same format.

Every dataset has an "image" column (PIL images, RGB) and a "label" column (ClassLabel);
`to_tensors` turns one into float tensors for training. Cards: data/*.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

SHAPES = ["circle", "square", "triangle", "cross", "diamond"]
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SIZES = {"small": 0.09, "large": 0.155}  # radius as a fraction of the image side
BACKGROUNDS = ["plain", "stripes", "checker", "noise"]
# A 3x3 layout: each object sits in its own cell, named as people name places in a picture.
POSITIONS = [
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
]
NUMBERS = ["zero", "one", "two", "three"]
SCENES_VERSION = 1  # bump when the generator changes: cached copies are then rebuilt


def cache_dir() -> Path:
    """Where generated datasets are cached: $COURSE_CACHE, else ~/.cache/vit-course."""
    return Path(os.environ.get("COURSE_CACHE", Path.home() / ".cache" / "vit-course"))


# ----------------------------------------------------------------------------------------------
# Scenes: rendering
# ----------------------------------------------------------------------------------------------
def _shape_mask(shape: str, X: np.ndarray, Y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask of one shape centred at (cx, cy) with radius r, on coordinate grids X, Y."""
    dx, dy = X - cx, Y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        s = r * 0.85
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.15
    if shape == "cross":
        w = r * 0.38
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if shape == "triangle":  # pointing up, apex at cy - r, base at cy + 0.75 r
        top, base = cy - r, cy + 0.75 * r
        half_width = (Y - top) / (base - top) * r * 1.05
        return (Y >= top) & (Y <= base) & (np.abs(dx) <= half_width)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A low-saturation texture so that the shapes' colours stay unambiguous. (H, W, 3) float."""
    base = rng.uniform(60, 170)
    tint = rng.uniform(-15, 15, size=3)
    img = np.full((size, size, 3), base) + tint
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "stripes":
        period = rng.integers(3, 7) * size / 32
        angle = rng.uniform(0, np.pi)
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period
        img += (np.floor(phase) % 2)[..., None] * rng.uniform(18, 35)
    elif kind == "checker":
        cell = max(1, int(rng.integers(3, 6) * size / 32))
        img += (((xx // cell) + (yy // cell)) % 2)[..., None] * rng.uniform(18, 35)
    elif kind == "noise":
        img += rng.normal(0, 12, size=(size, size, 1))
    return img


def render_scene(index: int, seed: int = 0, resolution: int = 32, max_objects: int = 3, supersample: int = 2) -> dict:
    """Draw scene number `index`: image (H, W, 3) uint8, mask (H, W) uint8 and the attributes.

    Object 0 is the one large object; the others are small. The class label is object 0's shape.
    The same (index, seed, resolution, max_objects) always gives the same scene.
    """
    if resolution < 16:
        raise ValueError(f"resolution {resolution} is too small to draw shapes: use at least 16")
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects}")
    rng = np.random.default_rng([seed, index])
    S = resolution * supersample
    n_obj = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(9, size=n_obj, replace=False)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    img = np.kron(_background(rng, background, resolution), np.ones((supersample, supersample, 1)))
    label_map = np.zeros((S, S), dtype=np.uint8)
    Y, X = np.mgrid[0:S, 0:S] + 0.5
    objects = []
    for i, cell in enumerate(cells):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        size = "large" if i == 0 else "small"
        r = SIZES[size] * S * rng.uniform(0.9, 1.1)
        row, col = divmod(int(cell), 3)
        jitter = (S / 3 - 2 * r) / 2 * 0.8
        cx = (col + 0.5) * S / 3 + rng.uniform(-1, 1) * max(jitter, 0)
        cy = (row + 0.5) * S / 3 + rng.uniform(-1, 1) * max(jitter, 0)
        m = _shape_mask(shape, X, Y, cx, cy, r)
        shade = np.array(COLORS[color]) * rng.uniform(0.9, 1.05)
        img[m] = np.clip(shade, 0, 255)
        label_map[m] = i + 1
        ys, xs = np.nonzero(m)
        objects.append({
            "shape": shape, "color": color, "size": size, "position": POSITIONS[int(cell)],
            "x": float(cx / S), "y": float(cy / S),
            "bbox": [float(xs.min() / S), float(ys.min() / S), float((xs.max() + 1) / S), float((ys.max() + 1) / S)],
        })
    # Average-pool the supersampled canvas: smooth edges at the target resolution.
    img = img.reshape(resolution, supersample, resolution, supersample, 3).mean(axis=(1, 3))
    mask = label_map[supersample // 2 :: supersample, supersample // 2 :: supersample]
    caption = _caption(objects, background)
    questions, answers = _questions(objects, rng)
    return {
        "image": np.clip(img.round(), 0, 255).astype(np.uint8), "mask": mask, "label": SHAPES.index(objects[0]["shape"]),
        "objects": objects, "count": n_obj, "background": background,
        "caption": caption, "questions": questions, "answers": answers,
    }


def _describe(o: dict) -> str:
    return f"{o['size']} {o['color']} {o['shape']}"


def _caption(objects: list[dict], background: str) -> str:
    parts = [f"a {_describe(o)} {_where(o['position'])}" for o in objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    adjective = {"plain": "plain", "stripes": "striped", "checker": "checkered", "noise": "noisy"}[background]
    return f"{text} on a {adjective} background"


def _where(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def _questions(objects: list[dict], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Five questions per scene with one-word or two-word answers, for VQA-style lectures."""
    main = objects[0]
    qs = [
        ("what shape is the large object?", main["shape"]),
        ("what color is the large object?", main["color"]),
        ("how many shapes are there?", NUMBERS[len(objects)]),
        (f"where is the {main['color']} {main['shape']}?", main["position"]),
    ]
    # A yes/no question, true half of the time.
    if rng.random() < 0.5:
        o = objects[int(rng.integers(len(objects)))]
        qs.append((f"is there a {o['color']} {o['shape']}?", "yes"))
    else:
        present = {(o["color"], o["shape"]) for o in objects}
        while True:
            c, s = list(COLORS)[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))]
            if (c, s) not in present:
                break
        qs.append((f"is there a {c} {s}?", "no"))
    return [q for q, _ in qs], [a for _, a in qs]


# ----------------------------------------------------------------------------------------------
# Scenes: the dataset
# ----------------------------------------------------------------------------------------------
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def scenes(
    n: int = 10_000,
    split: str = "train",
    resolution: int = 32,
    max_objects: int = 3,
    seed: int = 0,
    cache: bool = True,
):
    """The synthetic scenes dataset as a `datasets.Dataset` (card: data/scenes.md).

    Columns: image (PIL RGB), label (ClassLabel over SHAPES: the large object's shape), mask
    (H x W, 0 = background, i = object i), objects (shape, color, size, position, x, y, bbox),
    count, background, caption, questions, answers. Splits use disjoint random streams.
    """
    import datasets

    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {list(SPLIT_SEEDS)}, got {split!r}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    stream = seed * 1000 + SPLIT_SEEDS[split]
    key = json.dumps([SCENES_VERSION, n, split, resolution, max_objects, seed])
    path = cache_dir() / f"scenes-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if cache and path.exists():
        try:
            return datasets.load_from_disk(str(path))
        except Exception:
            pass  # a half-written cache: build again
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=SHAPES),
        "mask": datasets.Array2D(shape=(resolution, resolution), dtype="uint8"),
        "objects": datasets.List({
            "shape": datasets.Value("string"), "color": datasets.Value("string"),
            "size": datasets.Value("string"), "position": datasets.Value("string"),
            "x": datasets.Value("float32"), "y": datasets.Value("float32"),
            "bbox": datasets.List(datasets.Value("float32"), length=4),
        }),
        "count": datasets.Value("int8"),
        "background": datasets.Value("string"),
        "caption": datasets.Value("string"),
        "questions": datasets.List(datasets.Value("string")),
        "answers": datasets.List(datasets.Value("string")),
    })
    rows = [render_scene(i, stream, resolution, max_objects) for i in range(n)]
    columns = {k: [r[k] for r in rows] for k in features}
    ds = datasets.Dataset.from_dict(columns, features=features)
    ds.info.description = f"course_lib scenes v{SCENES_VERSION}: {key}"
    if cache:  # write to a temporary folder, then rename: a crash never leaves a half cache
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        datasets.disable_progress_bars()
        try:
            ds.save_to_disk(str(tmp))
        finally:
            datasets.enable_progress_bars()
        if not path.exists():
            tmp.replace(path)
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        ds = datasets.load_from_disk(str(path))
    return ds


def to_tensors(ds, image_column: str = "image", label_column: str | None = "label") -> tuple[torch.Tensor, torch.Tensor | None]:
    """A dataset with an image column -> (images float32 (N, 3, H, W) in [0, 1], labels int64 (N,))."""
    for column in (image_column, label_column):
        if column is not None and column not in ds.column_names:
            raise ValueError(f"the dataset has no column {column!r}; its columns: {ds.column_names}")
    images = np.stack([np.asarray(im.convert("RGB")) for im in ds[image_column]])  # (N, H, W, 3)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)  # (N, 3, H, W)
    y = torch.tensor(ds[label_column], dtype=torch.long) if label_column else None
    return x, y


SCENE_ATTRIBUTES = {"shape": SHAPES, "color": list(COLORS), "background": BACKGROUNDS}


def attribute_labels(ds, attribute: str) -> torch.Tensor:
    """Class index (N,) of one attribute of every scene: the large object's "shape" or "color",
    or the "background" texture. For probing what features know beyond the shape label."""
    if attribute not in SCENE_ATTRIBUTES:
        raise ValueError(f"attribute must be one of {list(SCENE_ATTRIBUTES)}, got {attribute!r}")
    names = SCENE_ATTRIBUTES[attribute]
    values = ds["background"] if attribute == "background" else [o[0][attribute] for o in ds["objects"]]
    return torch.tensor([names.index(v) for v in values])


# ----------------------------------------------------------------------------------------------
# Real images that ship with installed packages
# ----------------------------------------------------------------------------------------------
PHOTOS = {
    "grace_hopper": "Rear Admiral Grace Hopper (US Navy photo, public domain), from matplotlib",
    "china": "a temple in China (from scikit-learn, CC BY 2.0 by Hernán García Crespo)",
    "flower": "a flower (from scikit-learn, CC BY 2.0 by Ashish Kumar Gupta)",
}


def photo(name: str = "grace_hopper", size: int | None = None) -> np.ndarray:
    """A real photo as (H, W, 3) uint8; with `size`, centre-cropped to a square and resized."""
    from PIL import Image

    if name == "grace_hopper":
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            img = Image.open(f).convert("RGB")
    elif name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = Image.fromarray(load_sample_image(f"{name}.jpg"))
    else:
        raise ValueError(f"unknown photo {name!r}; available: {list(PHOTOS)}")
    if size is not None:
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
    return np.array(img)  # a writable copy (torch.from_numpy warns on read-only arrays)


def digits(size: int = 32):
    """scikit-learn's 8x8 handwritten digits (1,797 images) upsampled to size x size RGB."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((size, size), Image.BILINEAR).convert("RGB") for im in d.images]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": images, "label": d.target.tolist()}, features=features)


# ----------------------------------------------------------------------------------------------
# Real Hugging Face datasets (online), in the same format
# ----------------------------------------------------------------------------------------------
def load_hf(
    name: str,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    resolution: int | None = 32,
    n: int | None = None,
    **kwargs,
):
    """Load a Hugging Face dataset (a hub id such as "cifar10", or a local folder laid out like the
    hub's) and return it with the course's columns: "image" (RGB, resized to `resolution`) and
    "label". The image/label columns are found by their feature types unless named.
    """
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, **kwargs)
    except Exception as err:
        raise OSError(
            f"could not load the dataset {name!r} ({type(err).__name__}: {err}). Offline, use the "
            "course's own data (course_lib.data.scenes, digits) or a local folder of parquet files."
        ) from err
    if n is not None:
        ds = ds.select(range(min(n, len(ds))))
    feats = ds.features
    image_column = image_column or next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
    label_column = label_column or next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None)
    if image_column is None or image_column not in feats:
        raise ValueError(f"no image column found in {list(feats)}: pass image_column=...")
    if label_column is None or label_column not in feats:
        raise ValueError(f"no ClassLabel column found in {list(feats)}: pass label_column=...")
    ds = ds.select_columns([image_column, label_column])
    if image_column != "image":
        ds = ds.rename_column(image_column, "image")
    if label_column != "label":
        ds = ds.rename_column(label_column, "label")

    def convert(batch):
        ims = [im.convert("RGB") for im in batch["image"]]
        if resolution:
            ims = [im.resize((resolution, resolution)) for im in ims]
        return {"image": ims}

    return ds.map(convert, batched=True, features=ds.features)
