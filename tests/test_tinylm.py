"""course_lib.tinylm: the scenes tokenizer, the tiny causal LM, the shipped frozen parts, and the
script that trains them (run briefly so that it cannot rot)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course_lib import data
from course_lib.tinylm import (
    TinyLM,
    TinyLMConfig,
    build_tokenizer,
    lm_loss,
    load_frozen_image_encoder,
    load_frozen_lm,
    pad_batch,
)
from course_lib.utils import CHECKPOINTS

ROOT = Path(__file__).resolve().parents[1]


def test_tokenizer_round_trips_every_scene_text():
    tok = build_tokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id) == (0, 1, 2, 3)
    assert tok.vocab[:4] == ["<pad>", "<bos>", "<eos>", "<image>"] and tok.vocab_size == len(tok.vocab)
    for i in range(60):
        scene = data.render_scene(i, max_objects=3)
        for text in [scene["caption"]] + [f"{q} {a}" for q, a in zip(scene["questions"], scene["answers"])]:
            ids = tok.encode(text, bos=True, eos=True)
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
            assert tok.decode(ids) == text
    assert tok.encode("<image> a red circle, ?") == [3, tok.ids["a"], tok.ids["red"], tok.ids["circle"], tok.ids[","], tok.ids["?"]]
    assert tok.decode([tok.ids["red"], tok.eos_id, tok.ids["blue"]]) == "red"  # stops at <eos>
    with pytest.raises(ValueError, match="dog"):
        tok.encode("a red dog")


def test_lm_is_causal_and_embeddings_match_ids():
    torch.manual_seed(0)
    lm = TinyLM(TinyLMConfig(vocab_size=20, dim=16, depth=2, num_heads=2, max_len=12)).eval()
    assert isinstance(lm.blocks, torch.nn.ModuleList) and len(lm.blocks) == 2
    ids = torch.randint(0, 20, (2, 7))
    logits = lm(ids)
    assert logits.shape == (2, 7, 20)
    assert torch.allclose(logits, lm(inputs_embeds=lm.embed(ids)))
    changed = ids.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 20
    assert torch.allclose(lm(changed)[:, :4], logits[:, :4], atol=1e-6)  # the future cannot leak back
    assert not torch.allclose(lm(changed)[:, 4:], logits[:, 4:])
    with pytest.raises(ValueError, match="exactly one"):
        lm()
    with pytest.raises(ValueError, match="longer than"):
        lm(torch.zeros(1, 13, dtype=torch.long))


def test_generate_is_greedy_and_stops_at_eos():
    torch.manual_seed(0)
    lm = TinyLM(TinyLMConfig(vocab_size=20, dim=16, depth=1, num_heads=2, max_len=16)).eval()
    prompt = torch.randint(3, 20, (3, 4))
    new = lm.generate(prompt, max_new_tokens=5, eos_id=None)
    x = prompt
    for _ in range(5):  # the same thing by hand
        x = torch.cat([x, lm(x)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(new, x[:, 4:])
    eos = int(new[0, 0])  # pretend the first generated token is <eos>: row 0 stops at once
    out = lm.generate(prompt, max_new_tokens=5, eos_id=eos)
    assert (out[0] == eos).all()
    same = lm.generate(inputs_embeds=lm.embed(prompt), max_new_tokens=5, eos_id=None)
    assert torch.equal(same, new)
    with pytest.raises(ValueError, match="exactly one"):
        lm.generate(max_new_tokens=2)


def test_lm_loss_ignores_padding():
    logits = torch.randn(2, 5, 7)
    targets = pad_batch([[1, 2, 3], [1, 4, 5, 6, 2]], -100)
    assert targets.tolist()[0] == [1, 2, 3, -100, -100]
    loss = lm_loss(logits, targets)
    manual = torch.nn.functional.cross_entropy(
        torch.cat([logits[0, :2], logits[1, :4]]), torch.tensor([2, 3, 4, 5, 6, 2])
    )
    assert torch.allclose(loss, manual)


def test_shipped_frozen_parts():
    for name in ("tinylm_scenes.safetensors", "image_encoder_scenes.safetensors"):
        size = (CHECKPOINTS / name).stat().st_size
        print(f"{name}: {size / 1e6:.2f} MB")
        assert size < 3e6
    lm, encoder = load_frozen_lm(), load_frozen_image_encoder()
    for m in (lm, encoder):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    tok = build_tokenizer()
    assert lm.config.vocab_size == tok.vocab_size
    images, _ = data.to_tensors(data.scenes(4, "test"))
    assert encoder.forward_features(images).shape == (4, 1 + 16, encoder.config.dim)
    # The trained LM knows the caption grammar: greedy text after "a large" is a valid caption tail.
    new = lm.generate(torch.tensor([tok.encode("a large", bos=True)]), max_new_tokens=30, eos_id=tok.eos_id)
    text = tok.decode(new[0])
    assert text.split()[0] in data.COLORS and text.endswith("background"), text


def test_shipped_lm_reads_a_caption_placed_before_bos():
    """Stage 2 of lecture 07 writes a soft prompt before <bos>: the frozen LM must have learned to
    read what sits there. With the true caption there it answers; without, it guesses."""
    from course_lib.qformer import answer_accuracy, answer_after_captions, answer_questions

    torch.set_num_threads(1)
    tok, lm = build_tokenizer(), load_frozen_lm()
    ds = data.scenes(500, "test").select(range(100))
    reading = answer_accuracy(answer_after_captions(lm, tok, ds), ds)
    prior = answer_accuracy(answer_questions(lm, tok, ds, None, None), ds)
    for kind in ("shape", "color", "count", "position"):
        assert reading[kind] > 0.9 and prior[kind] < 0.5, (kind, reading[kind], prior[kind])


def test_training_script_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "scripts" / "train_vlm_parts.py"), "--n", "16", "--steps", "2", "--batch", "8", "--out-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lm = load_frozen_lm(tmp_path / "tinylm_scenes.safetensors")
    encoder = load_frozen_image_encoder(tmp_path / "image_encoder_scenes.safetensors")
    assert lm.config.vocab_size == build_tokenizer().vocab_size and encoder.config.patch_size == 8
