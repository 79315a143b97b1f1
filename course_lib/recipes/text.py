"""Text for the scenes: one word-level tokenizer (built in code, nothing to download) and the
helpers that turn scenes captions and questions into padded id tensors.

The course uses two vocabularies, both served by `WordTokenizer`:
- `caption_tokenizer(captions)`: lecture 06's CLIP vocabulary, the caption words by frequency
  after <pad> <unk> <sot> <eot> (CLIP sec. 2.4 brackets each text with start/end-of-text tokens;
  an unknown word becomes <unk>);
- `scene_tokenizer()`: the frozen TinyLM's vocabulary of lectures 07 and 08, every word the
  scenes generator writes, sorted, after <pad> <bos> <eos> <image> (Flamingo's marker); it has no
  <unk>, so a typo in a prompt raises an error that names the word.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

from .. import data

CAPTION_SPECIALS = ("<pad>", "<unk>", "<sot>", "<eot>")
LM_SPECIALS = ("<pad>", "<bos>", "<eos>", "<image>")
# Every word the scenes generator writes besides shapes, colours, numbers and positions
# (course_lib/data.py: _caption, _where, _questions).
_TEMPLATE_WORDS = (
    "a an and at the on in of is are there what where how many shape shapes color object "
    "large small background plain striped checkered noisy center yes no , ?"
)


class WordTokenizer:
    """Lower-cased words and punctuation <-> ids.

    vocab: every token in id order, special tokens included. `bos` and `eos` name the tokens that
    start and end a text (CLIP calls them <sot> and <eot>); `unk`, if given, replaces unknown
    words; without it an unknown word raises a ValueError that names it.
    """

    def __init__(self, vocab: Sequence[str], *, bos: str = "<bos>", eos: str = "<eos>", unk: str | None = None):
        self.vocab = list(vocab)
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("the vocabulary lists a token twice: every token needs one id")
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        for role, token in (("pad", "<pad>"), ("bos", bos), ("eos", eos), ("unk", unk)):
            if token is not None and token not in self.ids:
                raise ValueError(f"the {role} token {token!r} is not in the vocabulary: add it to the special tokens")
        self.pad_id, self.bos_id, self.eos_id = self.ids["<pad>"], self.ids[bos], self.ids[eos]
        self.unk_id = self.ids[unk] if unk is not None else None
        self.image_id = self.ids.get("<image>")
        self.special_ids = {i for i in (self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.image_id) if i is not None}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    @staticmethod
    def split(text: str) -> list[str]:
        """"a red circle, on <image>" -> ["a", "red", "circle", ",", "on", "<image>"]."""
        return re.findall(r"<[a-z]+>|[a-z0-9]+|[^\sa-z0-9]", text.lower())

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """One text -> its ids, with the start and end tokens if asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes one text (a str), got {type(text).__name__}: use encode_batch for a list")
        words = self.split(text)
        unknown = sorted({w for w in words if w not in self.ids})
        if unknown and self.unk_id is None:
            raise ValueError(f"words not in the vocabulary: {unknown}; known words: {self.vocab[4:]}")
        ids = [self.ids.get(w, self.unk_id) for w in words]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: str | Sequence[str], context_length: int) -> torch.Tensor:
        """Texts -> ids (B, context_length): start, words, end, padding (CLIP's text input). A text
        that is too long is cut and still ends with the end token, so end-of-text pooling finds it."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 3:
            raise ValueError(f"context_length {context_length} is too short: the start and end tokens take two places")
        rows = [self.encode(t)[: context_length - 2] for t in texts]
        return pad_batch([[self.bos_id] + r + [self.eos_id] for r in rows], self.pad_id, context_length)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Ids -> text; with skip_special, stops at the first end token and drops the other special
        tokens. Punctuation is glued to the word before it."""
        words = []
        for i in (int(i) for i in ids):
            if skip_special and i == self.eos_id:
                break
            if skip_special and i in self.special_ids:
                continue
            words.append(self.vocab[i])
        return re.sub(r" ([^\sa-z0-9<])", r"\1", " ".join(words))


def caption_tokenizer(texts: Iterable[str], min_count: int = 1) -> WordTokenizer:
    """Lecture 06's CLIP tokenizer built from a corpus: words seen at least `min_count` times, the
    most frequent first (ties alphabetically, so the same corpus always gives the same ids)."""
    counts = Counter(w for t in texts for w in WordTokenizer.split(t))
    if not counts:
        raise ValueError("caption_tokenizer got no words: pass the training captions")
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in CAPTION_SPECIALS), key=lambda w: (-counts[w], w))
    return caption_tokenizer_from_vocab(list(CAPTION_SPECIALS) + words)


def caption_tokenizer_from_vocab(vocab: Sequence[str]) -> WordTokenizer:
    """The CLIP tokenizer for a stored vocabulary (specials first, as `caption_tokenizer` writes it)."""
    return WordTokenizer(vocab, bos="<sot>", eos="<eot>", unk="<unk>")


def lm_tokenizer(words: Iterable[str]) -> WordTokenizer:
    """A language model's tokenizer over `words`: the special tokens first (<pad> 0, <bos> 1,
    <eos> 2, <image> 3), then the words in alphabetical order."""
    return WordTokenizer(list(LM_SPECIALS) + sorted(set(words) - set(LM_SPECIALS)))


def scene_tokenizer() -> WordTokenizer:
    """The tokenizer of lectures 07 and 08: every word of the scenes captions, questions, answers."""
    words = set(_TEMPLATE_WORDS.split()) | set(data.SHAPES) | set(data.COLORS) | set(data.NUMBERS)
    words |= {w for p in data.POSITIONS for w in p.split()}
    return lm_tokenizer(words)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> torch.Tensor:
    """Right-pad lists of ids to one (B, length) tensor (length defaults to the longest; longer
    sequences are cut)."""
    if len(sequences) == 0:
        raise ValueError("pad_batch got no sequences")
    length = length or max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        s = list(s)[:length]
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def scene_texts(ds) -> list[str]:
    """The LM's training texts for a scenes dataset: every caption and every "question answer"."""
    texts = list(ds["caption"])
    for qs, ans in zip(ds["questions"], ds["answers"]):
        texts += [f"{q} {a}" for q, a in zip(qs, ans)]
    return texts
