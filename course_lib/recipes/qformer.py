"""BLIP-2 on the scenes (lecture 07, scripts/train_qformer.py): the two training stages as
`loss_fn`s for `course_lib.train.fit`, the examples they train on, the stage-1 retrieval and
matching metrics, and the shipped checkpoints.

Both stages train on precomputed image features (the encoder is frozen): the data given to
`fit` holds an image index per example, and the loss looks the features up.
"""

from __future__ import annotations

import torch
from torch import nn

from ..connectors import Connectors, ConnectorsConfig
from ..qformer import QFormer, QFormerConfig, max_query_similarity
from ..tinylm import TinyLM, lm_loss
from ..utils import freeze, load_checkpoint
from .text import WordTokenizer, pad_batch

STAGE1_CHECKPOINT = "qformer_stage1_scenes.safetensors"
CONNECTORS_CHECKPOINT = "connectors_scenes.safetensors"


# ----------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------
def qa_examples(ds, tokenizer: WordTokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (image, question, answer) of a scenes dataset as LM training examples.

    Returns image_index (M,), input_ids (M, T) = <bos> question answer <eos> <pad>..., targets
    (M, T) = the answer and <eos>, -100 elsewhere (the question is given, not predicted), and the
    question type (M,) (0 shape, 1 colour, 2 count, 3 position, 4 yes/no).
    """
    index, ids, targets, kind = [], [], [], []
    for i, (qs, ans) in enumerate(zip(ds["questions"], ds["answers"])):
        for k, (q, a) in enumerate(zip(qs, ans)):
            question, answer = tokenizer.encode(q, bos=True), tokenizer.encode(a, eos=True)
            index.append(i), kind.append(k)
            ids.append(question + answer)
            targets.append([-100] * len(question) + answer)
    ids = pad_batch(ids, tokenizer.pad_id)
    return torch.tensor(index), ids, pad_batch(targets, -100, ids.shape[1]), torch.tensor(kind)


def caption_examples(ds, tokenizer: WordTokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_index (N,), input_ids (N, T) = <bos> caption <eos> <pad>..., targets with -100 on padding)."""
    ids = pad_batch([tokenizer.encode(c, bos=True, eos=True) for c in ds["caption"]], tokenizer.pad_id)
    return torch.arange(ids.shape[0]), ids, ids.masked_fill(ids == tokenizer.pad_id, -100)


def connector_data(*examples: tuple[torch.Tensor, ...], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Several example sets (image_index, input_ids, targets, ...) as one dataset for `fit`:
    (image_index (M,), input_ids (M, T), targets (M, T)), padded to the longest."""
    if not examples:
        raise ValueError("connector_data needs at least one example set, e.g. qa_examples(...)")
    if any(len({len(t) for t in e[:3]}) != 1 for e in examples):
        raise ValueError("each example set needs as many image indices as input_ids and targets rows")
    T = max(e[1].shape[1] for e in examples)
    pad = lambda t, value: torch.nn.functional.pad(t, (0, T - t.shape[1]), value=value)  # noqa: E731
    return (torch.cat([e[0] for e in examples]), torch.cat([pad(e[1], pad_id) for e in examples]),
            torch.cat([pad(e[2], -100) for e in examples]))


# ----------------------------------------------------------------------------------------------
# Stage 1 (BLIP-2 sec. 3.2): ITC + ITM + ITG against the frozen encoder
# ----------------------------------------------------------------------------------------------
class Stage1Loss:
    """`loss_fn` for `fit` with data (image_index, caption_ids): BLIP-2's three stage-1 losses on
    `image_feats[image_index]`, summed; the ITM correct count is returned for `fit`'s accuracy.
    Every step's itc, itm, itg and ITM accuracy are recorded in `history`."""

    def __init__(self, image_feats: torch.Tensor, seed: int = 0):
        self.image_feats = image_feats
        self.generator = torch.Generator().manual_seed(seed)  # draws the hard negatives
        self.history: dict[str, list[float]] = {"itc": [], "itm": [], "itg": [], "itm_accuracy": []}

    def __call__(self, qformer: QFormer, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(batch) != 2:
            raise ValueError(f"stage 1 trains on (image_index, caption_ids), got a batch of {len(batch)} tensors")
        index, ids = batch
        out = qformer.stage1_losses(self.image_feats[index.cpu()].to(ids.device), ids, self.generator)
        for k in ("itc", "itm", "itg"):
            self.history[k].append(out[k].item())
        self.history["itm_accuracy"].append(out["itm_correct"].item() / (3 * len(ids)))
        return out["loss"], out["itm_correct"]


@torch.no_grad()
def itc_embeddings(qformer: QFormer, image_feats: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The projected ITC embeddings: every query of every image (N, Nq, E), every text (M, E)."""
    Nq = qformer.config.num_queries
    # Under the ITC mask the queries never see the text and the text never sees the image, so the
    # query outputs need no text and the text outputs need no particular image.
    queries = qformer.vision_proj(qformer(image_feats)[:, :Nq])  # (N, Nq, E)
    text = qformer(image_feats[:1].expand(input_ids.shape[0], -1, -1), input_ids, "itc")[:, Nq]  # (M, D)
    return queries, qformer.text_proj(text)


@torch.no_grad()
def stage1_metrics(qformer: QFormer, image_feats: torch.Tensor, input_ids: torch.Tensor) -> dict[str, float]:
    """How well a stage-1 Q-Former pairs held-out images (N, L, encoder_dim) with their captions (N, T).

    - recall@1 image->text (text->image): the best-scoring caption (image) under ITC is right. A
      caption identical to the true one counts as right, and `recall_chance` is what a random
      ranking scores with these duplicates;
    - ITM accuracy: the matching head on the N true pairs and N wrong ones, balanced (chance 0.5),
      with wrong captions drawn at random (`itm_random`) or the wrong caption that ITC finds most
      similar to the image (`itm_hard`, the kind of negative ITM trains on).
    """
    if image_feats.shape[0] != input_ids.shape[0] or image_feats.shape[0] < 2:
        raise ValueError(f"pass N >= 2 images and their N captions, got {image_feats.shape[0]} and {input_ids.shape[0]}")
    qformer.eval()
    Nq, N = qformer.config.num_queries, image_feats.shape[0]
    sim = max_query_similarity(*itc_embeddings(qformer, image_feats, input_ids))  # (N images, N texts)
    same = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)  # (N, N): identical captions
    arange = torch.arange(N, device=sim.device)
    i2t = same[arange, sim.argmax(1)].float().mean().item()
    t2i = same[sim.argmax(0), arange].float().mean().item()

    def p_match(ids: torch.Tensor) -> torch.Tensor:
        return qformer.itm_head(qformer(image_feats, ids, "itm")[:, :Nq]).mean(1).softmax(-1)[:, 1]  # (N,)

    g = torch.Generator().manual_seed(0)
    random_neg = (arange + torch.randint(1, N, (N,), generator=g)) % N  # never the image's own index
    random_neg = torch.where(same[arange, random_neg], (random_neg + 1) % N, random_neg)
    hard_neg = sim.masked_fill(same, float("-inf")).argmax(1)
    pos = (p_match(input_ids) > 0.5).float().mean().item()
    itm = {name: (pos + (p_match(input_ids[neg]) <= 0.5).float().mean().item()) / 2
           for name, neg in (("itm_random", random_neg), ("itm_hard", hard_neg))}
    return {"recall@1 image->text": i2t, "recall@1 text->image": t2i, "recall_chance": same.float().mean().item(),
            "itm_random": itm["itm_random"], "itm_hard": itm["itm_hard"]}


# ----------------------------------------------------------------------------------------------
# Stage 2 (BLIP-2 sec. 3.3): a connector writes a soft prompt for the frozen LM
# ----------------------------------------------------------------------------------------------
def soft_prompt_loss(lm: TinyLM, prompt: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The LM's next-token loss on the text after a soft prompt (B, P, D_lm).

    targets (B, T): the ids to predict, -100 where nothing is predicted (padding, the question of a
    question-answer pair). The prompt positions predict nothing.
    """
    logits = lm(inputs_embeds=torch.cat([prompt, lm.embed(input_ids)], dim=1))  # (B, P + T, V)
    ignore = targets.new_full((targets.shape[0], prompt.shape[1]), -100)
    return lm_loss(logits, torch.cat([ignore, targets], dim=1))


class ConnectorLoss:
    """`loss_fn` for `fit` with data (image_index, input_ids, targets) (see `connector_data`): the
    frozen `lm`'s loss after the soft prompt the trained connector makes from `image_feats[image_index]`."""

    def __init__(self, lm: TinyLM, image_feats: torch.Tensor):
        if any(p.requires_grad for p in lm.parameters()):
            raise ValueError("the language model must be frozen in stage 2: pass course_lib.utils.freeze(lm)")
        self.lm, self.image_feats = lm, image_feats

    def __call__(self, connector: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, None]:
        if len(batch) != 3:
            raise ValueError(f"stage 2 trains on (image_index, input_ids, targets) from connector_data, got {len(batch)} tensors")
        index, ids, targets = batch
        prompt = connector(self.image_feats[index.cpu()].to(ids.device))
        return soft_prompt_loss(self.lm.to(ids.device), prompt, ids, targets), None


@torch.no_grad()
def generate_captions(lm: TinyLM, tokenizer: WordTokenizer, image_feats: torch.Tensor, connector: nn.Module,
                      max_new_tokens: int = 40) -> list[str]:
    """Greedy captions of the frozen LM after the connector's soft prompt and <bos>."""
    prompt = connector(image_feats)  # (B, P, D_lm)
    bos = lm.embed(torch.full((prompt.shape[0], 1), tokenizer.bos_id, device=prompt.device))
    new = lm.generate(inputs_embeds=torch.cat([prompt, bos], dim=1), max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id)
    return [tokenizer.decode(row) for row in new]


# ----------------------------------------------------------------------------------------------
# The shipped checkpoints (scripts/train_qformer.py)
# ----------------------------------------------------------------------------------------------
def load_stage1_qformer(path=STAGE1_CHECKPOINT) -> tuple[QFormer, dict[str, str]]:
    """The shipped stage-1 Q-Former (with its text side and ITC/ITM/ITG heads), in eval mode."""
    return load_checkpoint(path, QFormer, QFormerConfig)


def load_connectors(path=CONNECTORS_CHECKPOINT) -> tuple[Connectors, dict[str, str]]:
    """The connectors saved with `save_checkpoint(Connectors(...), ...)` (the shipped ones by
    default), frozen, with the file's metadata; `connectors["mlp"]` is one of them."""
    connectors, meta = load_checkpoint(path, Connectors, ConnectorsConfig)
    return freeze(connectors), meta
