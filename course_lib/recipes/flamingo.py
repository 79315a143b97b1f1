"""Lecture 08's experiment on the scenes: interleaved (image, question, answer) prompts, the
training loss for `fit`, accuracy per question, and what the gated branches contribute.

- `vqa_episodes`: prompts of shots + 1 (image, question, answer) examples, one question kind per
  prompt (shape, colour or count of the large object); the answer words are the only targets;
- `VqaLoss`: `loss_fn` for `fit` over precomputed frozen-encoder features, with the shuffled-image
  control (`shuffle_images=True`: every prompt gets another prompt's images, so the images carry
  nothing about the answers);
- `BranchMonitor`: at every step, tanh(alpha_xattn) and the size of the gated cross-attention
  branch relative to the residual stream it is added to, ||tanh(alpha) * xattn|| / ||x||, per layer:
  a small gate times large branch weights can still add a lot;
- `question_accuracy`: accuracy of the last answer of each prompt per question kind, and of the
  answers after 0, 1, ... examples;
- `binding_episodes`, `query_accuracy`: Frozen's fast binding, labels paired with shapes afresh in
  every prompt, so that only the examples can tell the answer (not yet learned at this scale: the
  lecture does not use it).
`prepare_scenes` computes what every run shares; scripts/sweep_flamingo.py trains with these and ships the results the lecture plots.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import data
from ..flamingo import FlamingoConfig
from ..tinylm import lm_loss
from .text import WordTokenizer, scene_tokenizer
from .vlm import encode_images, load_frozen_image_encoder, load_frozen_lm

QUESTIONS = {
    "shape": "what shape is the large object?",
    "color": "what color is the large object?",
    "count": "how many shapes are there?",
}


# The lecture's data and model, shared by lecture 08 and scripts/sweep_flamingo.py
SETUP = dict(n_train_scenes=3000, n_test_scenes=600, n_train_prompts=2400, n_test_prompts=600, shots=2, batch_size=32)


def flamingo_config(image_token_id: int, alpha_shape: str = "scalar") -> FlamingoConfig:
    """The lecture's Flamingo: a gated block before each of the TinyLM's 2 blocks, 8 latents."""
    return FlamingoConfig(image_token_id=image_token_id, num_latents=8, resampler_depth=1, resampler_heads=4,
                          xattn_heads=2, cross_attn_every=1, mlp_ratio=2.0, alpha_shape=alpha_shape)


def prepare_scenes() -> dict:
    """Everything the lecture's runs share: the tokenizer, the frozen LM and encoder, the encoder's
    features of every scene (train scenes first, then test), each scene's answers to the QUESTIONS
    and the shape of its large object, and the train/test index pools."""
    tok, lm, encoder = scene_tokenizer(), load_frozen_lm(), load_frozen_image_encoder()
    train_ds, test_ds = data.scenes(SETUP["n_train_scenes"], "train"), data.scenes(SETUP["n_test_scenes"], "test")
    features = torch.cat([encode_images(encoder, train_ds), encode_images(encoder, test_ds)])
    objects = list(train_ds["objects"]) + list(test_ds["objects"])
    n = SETUP["n_train_scenes"]
    return dict(tok=tok, lm=lm, encoder=encoder, features=features, objects=objects,
                answers=scene_answers(objects, tok), shapes=torch.tensor([data.SHAPES.index(o[0]["shape"]) for o in objects]),
                train_pool=range(0, n), test_pool=range(n, n + SETUP["n_test_scenes"]))


def scene_answers(objects: list, tok: WordTokenizer) -> torch.Tensor:
    """The answer ids of every scene to the QUESTIONS, in their order: (N, 3). The first object of
    a scene is its large one."""
    return torch.tensor([[tok.ids[o[0]["shape"]], tok.ids[o[0]["color"]], tok.ids[data.NUMBERS[len(o)]]] for o in objects])


def vqa_episodes(tok: WordTokenizer, answers: torch.Tensor, n: int, pool: range, seed: int, shots: int = 2, slots: int = 1):
    """n prompts of shots + 1 (image, question, answer) examples drawn from the scenes in `pool`,
    one question kind per prompt: <bos> <image> question answer <image> question answer ...

    Returns (image indices (n, shots+1), ids (n, T), targets (n, T): -100 except at the answers,
    question kind (n,): index into QUESTIONS). Each image is `slots` <image> tokens (Frozen's
    prefix writes 2 vectors per image)."""
    if shots < 0 or slots < 1 or n < 1:
        raise ValueError(f"need n >= 1, shots >= 0 and slots >= 1, got n={n}, shots={shots}, slots={slots}")
    g = torch.Generator().manual_seed(seed)
    kind = torch.randint(0, len(QUESTIONS), (n,), generator=g)
    idx = torch.tensor(pool)[torch.randint(0, len(pool), (n, shots + 1), generator=g)]
    q_ids = [tok.encode(q) for q in QUESTIONS.values()]
    ids, targets = [], []
    for r in range(n):
        row, tgt = [tok.bos_id], [-100]
        for k in range(shots + 1):
            answer = int(answers[idx[r, k], kind[r]])
            segment = [tok.image_id] * slots + q_ids[kind[r]] + [answer]
            row += segment
            tgt += [-100] * (len(segment) - 1) + [answer]
        ids.append(row), targets.append(tgt)
    length = max(map(len, ids))  # the colour question is one word longer than the others
    pad = lambda rows, value: torch.tensor([r + [value] * (length - len(r)) for r in rows])  # noqa: E731
    return idx, pad(ids, tok.pad_id), pad(targets, -100), kind


def _answer_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n, shots+1) boolean: whether each answer of each prompt is the argmax next token."""
    at_answer = targets[:, 1:] != -100
    return (logits[:, :-1].argmax(-1) == targets[:, 1:])[at_answer].reshape(len(targets), -1)


class VqaLoss:
    """`loss_fn` for `fit` with data (image indices, ids, targets): the LM loss on the answer words,
    and the number of last answers right. `features` (N, tokens, D) are the frozen encoder's, for
    every image index. shuffle_images=True gives each prompt the images of another prompt of the
    batch (a fresh permutation every step): the control in which images say nothing."""

    def __init__(self, features: torch.Tensor, shuffle_images: bool = False, seed: int = 0):
        self.features, self.shuffle_images = features, shuffle_images
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        idx, ids, targets = batch[:3]
        if self.shuffle_images:
            idx = idx[torch.randperm(len(idx), generator=self.generator)]
        logits = model(ids, features=self.features[idx])
        return lm_loss(logits, targets), _answer_hits(logits, targets)[:, -1].sum()


@torch.no_grad()
def question_accuracy(model: nn.Module, episodes, features: torch.Tensor, batch_size: int = 250) -> dict[str, float]:
    """Accuracy of the last answer of each prompt, per question kind and over all ("all"), and of
    the k-th answer over all kinds ("after k examples")."""
    idx, ids, targets, kind = episodes
    model.eval()
    logits = torch.cat([model(i, features=features[j]) for i, j in zip(ids.split(batch_size), idx.split(batch_size))])
    hits = _answer_hits(logits, targets).float()  # (n, shots+1)
    acc = {name: float(hits[kind == k, -1].mean()) for k, name in enumerate(QUESTIONS)}
    acc["all"] = float(hits[:, -1].mean())
    acc.update({f"after {k} examples": float(hits[:, k].mean()) for k in range(hits.shape[1])})
    return acc


class BranchMonitor:
    """Records, per gated block of a `Flamingo` and per call, tanh(alpha_xattn) (its mean |.| over
    channels) and ||tanh(alpha) * xattn(x)|| / ||x|| over the text tokens that follow an image: how
    much the visual branch adds to the residual stream. Use as a context manager around training
    or evaluation; `step()` (an `after_step` for `fit`) keeps the values of the latest call."""

    def __init__(self, model: nn.Module):
        self.blocks = list(model.xattn_layers.values())
        self.gate: list[list[float]] = []  # per step: one value per layer
        self.ratio: list[list[float]] = []
        self._latest: dict[int, float] = {}
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> "BranchMonitor":
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._keep_input(i)))
            self._handles.append(block.xattn.register_forward_hook(self._measure(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _keep_input(self, i: int):
        def hook(module, args):
            self._inputs[i] = args[0].detach()
        return hook

    def _measure(self, i: int):
        def hook(module, args, output):
            branch = torch.tanh(self.blocks[i].alpha_xattn).detach() * output[0].detach()  # (B, T, D)
            x = self._inputs[i]
            seen = branch.abs().sum(-1) > 0  # tokens after an image (the others get no branch output)
            self._latest[i] = float(branch[seen].norm(dim=-1).mean() / x[seen].norm(dim=-1).mean()) if seen.any() else 0.0
        return hook

    def gates(self) -> list[float]:
        return [float(torch.tanh(b.alpha_xattn.detach()).abs().mean()) for b in self.blocks]

    def step(self, step: int = 0, total: int = 0) -> None:
        self.gate.append(self.gates())
        self.ratio.append([self._latest.get(i, 0.0) for i in range(len(self.blocks))])


# ----------------------------------------------------------------------------------------------
# Fast binding (Frozen, sec. 4.2): labels that only the examples in the prompt can give
# ----------------------------------------------------------------------------------------------
LABEL_WORDS = ("plain", "striped", "checkered", "noisy")  # words with no link to a shape
BINDING = dict(ways=2, n_train_prompts=2400, train_shots=4, n_test_prompts=600, test_shots=(0, 1, 2, 4), epochs=10)


def binding_episodes(tok: WordTokenizer, classes: torch.Tensor, n: int, pool: list[int], seed: int, shots: int,
                     ways: int = 2, train: bool = False, slots: int = 1):
    """n prompts that name shapes with labels fixed per prompt: `ways` shapes and `ways` of the
    LABEL_WORDS are drawn at random for each prompt and paired at random, so which label names which
    shape can be read only from the examples. Each example is <image> the object is <label>.

    classes (N,) is the class (shape) of every scene; `pool` lists the scenes to draw from.
    train=False: `shots` examples cycle through the prompt's shapes in random order (every shape
    shown once when shots >= ways), then a query whose label is the only target.
    train=True: shots + 1 examples of random shapes, every label a target (a label whose shape has
    not appeared before cannot be known and only adds noise).
    Returns (image indices (n, shots+1), ids (n, T), targets (n, T), query class (n,))."""
    if ways > len(LABEL_WORDS) or ways < 2 or shots < 0:
        raise ValueError(f"need 2 <= ways <= {len(LABEL_WORDS)} and shots >= 0, got ways={ways}, shots={shots}")
    g = torch.Generator().manual_seed(seed)
    pool = torch.as_tensor(pool)
    by_class = {int(c): pool[classes[pool] == c] for c in classes[pool].unique()}
    names = sorted(by_class)
    label_ids = [tok.ids[w] for w in LABEL_WORDS]
    text = tok.encode("the object is")
    idx, ids, targets, query_class = [], [], [], []
    for _ in range(n):
        chosen = torch.randperm(len(names), generator=g)[:ways].tolist()  # this prompt's shapes
        labels = torch.randperm(len(label_ids), generator=g)[:ways].tolist()  # and their labels
        if train:
            order = torch.randint(0, ways, (shots + 1,), generator=g).tolist()
        else:
            cycle = torch.randperm(ways, generator=g).tolist()
            order = [cycle[k % ways] for k in range(shots)] + [int(torch.randint(0, ways, (), generator=g))]
        row, tgt, images = [tok.bos_id], [-100], []
        for k, w in enumerate(order):
            members = by_class[names[chosen[w]]]
            images.append(int(members[torch.randint(0, len(members), (), generator=g)]))
            label = label_ids[labels[w]]
            row += [tok.image_id] * slots + text + [label]
            tgt += [-100] * (slots + len(text)) + [label if train or k == shots else -100]
        idx.append(images), ids.append(row), targets.append(tgt), query_class.append(names[chosen[order[-1]]])
    return torch.tensor(idx), torch.tensor(ids), torch.tensor(targets), torch.tensor(query_class)


@torch.no_grad()
def query_accuracy(model: nn.Module, episodes, features: torch.Tensor, batch_size: int = 250) -> float:
    """Accuracy of the last target of each prompt (the query of `binding_episodes`)."""
    idx, ids, targets = episodes[:3]
    model.eval()
    logits = torch.cat([model(i, features=features[j]) for i, j in zip(ids.split(batch_size), idx.split(batch_size))])
    return float(_answer_hits(logits, targets)[:, -1].float().mean())
