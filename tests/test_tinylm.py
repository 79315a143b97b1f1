"""course_lib.tinylm and the recipes around it: the scenes tokenizer (course_lib.recipes.text), the
tiny causal LM, the shipped frozen parts (course_lib.recipes.vlm), the script that trains them
(run briefly so that it cannot rot), and the weight decay of every vision-language training path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401  (the parity reference of the course: a broken install fails here)

from course_lib import data
from course_lib.recipes.text import pad_batch, scene_tokenizer
from course_lib.recipes.vlm import load_frozen_image_encoder, load_frozen_lm
from course_lib.tinylm import TinyLM, TinyLMConfig, lm_loss
from course_lib.utils import CHECKPOINTS

ROOT = Path(__file__).resolve().parents[1]


def test_tokenizer_round_trips_every_scene_text():
    tok = scene_tokenizer()
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
    with pytest.raises(TypeError, match="encode_batch"):
        tok.encode(["a red circle"])
    assert tok.encode_batch(["a red circle"], 6).tolist() == [[1, tok.ids["a"], tok.ids["red"], tok.ids["circle"], 2, 0]]


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
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        TinyLMConfig(dim=16, num_heads=3)
    with pytest.raises(ValueError, match="must be positive"):
        TinyLMConfig(vocab_size=0)


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


@pytest.mark.slow
def test_shipped_frozen_parts():
    for name in ("tinylm_scenes.safetensors", "image_encoder_scenes.safetensors"):
        size = (CHECKPOINTS / name).stat().st_size
        print(f"{name}: {size / 1e6:.2f} MB")
        assert size < 3e6
    lm, encoder = load_frozen_lm(), load_frozen_image_encoder()
    for m in (lm, encoder):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    tok = scene_tokenizer()
    assert lm.config.vocab_size == tok.vocab_size
    images, _ = data.to_tensors(data.scenes(4, "test"))
    assert encoder.forward_features(images).shape == (4, 1 + 16, encoder.config.dim)
    # The trained LM knows the caption grammar: greedy text after "a large" is a valid caption tail.
    new = lm.generate(torch.tensor([tok.encode("a large", bos=True)]), max_new_tokens=30, eos_id=tok.eos_id)
    text = tok.decode(new[0])
    assert text.split()[0] in data.COLORS and text.endswith("background"), text


@pytest.mark.slow
def test_shipped_lm_reads_a_caption_placed_before_bos():
    """Stage 2 of lecture 07 writes a soft prompt before <bos>: the frozen LM must have learned to
    read what sits there. With the true caption there it answers; without, it guesses."""
    from course_lib.recipes.vlm import answer_accuracy, answer_after_captions, answer_questions

    torch.set_num_threads(1)
    tok, lm = scene_tokenizer(), load_frozen_lm()
    ds = data.scenes(500, "test").select(range(100))
    reading = answer_accuracy(answer_after_captions(lm, tok, ds), ds)
    prior = answer_accuracy(answer_questions(lm, tok, ds, None, None), ds)
    for kind in ("shape", "color", "count", "position"):
        assert reading[kind] > 0.9 and prior[kind] < 0.5, (kind, reading[kind], prior[kind])


@pytest.mark.slow
def test_training_script_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "scripts" / "train_vlm_parts.py"), "--n", "16", "--epochs", "1", "--batch", "8", "--out-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lm = load_frozen_lm(tmp_path / "tinylm_scenes.safetensors")
    encoder = load_frozen_image_encoder(tmp_path / "image_encoder_scenes.safetensors")
    assert lm.config.vocab_size == scene_tokenizer().vocab_size and encoder.config.patch_size == 8
    assert "steps" in lm_meta_of(tmp_path / "tinylm_scenes.safetensors")


def lm_meta_of(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_lm_examples_cover_the_four_kinds_and_predict_only_their_targets():
    from course_lib.recipes.vlm import lm_examples

    tok = scene_tokenizer()
    ds = data.scenes(2, "train")
    ids, targets = lm_examples(ds, tok, max_prefix=3, generator=torch.Generator().manual_seed(0))
    n_texts = len(ds) * (1 + len(ds[0]["questions"]))
    assert ids.shape[0] == 2 * n_texts + len(ds) * (len(ds[0]["questions"]) + 1)
    prefixed = ids[1]  # the first text again, after 1..3 <image> placeholders
    k = int((prefixed == tok.image_id).sum())
    assert 1 <= k <= 3 and (targets[1, :k] == -100).all() and torch.equal(prefixed[k : k + 5], ids[0, :5])
    assert (targets[ids == tok.pad_id] == -100).all()
    reading = ids[2 * n_texts]  # caption words, then <bos> question answer <eos>
    assert int(reading[0]) != tok.bos_id and tok.bos_id in reading.tolist()
    predicted = [t for t in targets[2 * n_texts].tolist() if t != -100]
    assert tok.decode(predicted) == ds[0]["answers"][0]
    with pytest.raises(ValueError, match="max_prefix"):
        lm_examples(ds, tok, max_prefix=0, generator=torch.Generator())


# Parameters that must never be decayed: learned tokens and tables that stand for a position or
# a role, not a feature map (ViT's CLS and position table, registers, CLIP's logit scale, BLIP-2's
# queries, Flamingo's latents and gates).
NEVER_DECAYED = ("cls_token", "pos_embed", "register", "logit_scale", "logit_bias", "query_tokens", "latents",
                 "probe", "alpha_", "log_temperature")


def _decayed_names(model: torch.nn.Module, loss_fn, batch, monkeypatch) -> set[str]:
    """The names of the parameters that `fit` hands to AdamW with weight decay > 0, found by
    running one real training step on `batch` and recording the optimizer's groups."""
    from course_lib import train

    seen = {}
    real = torch.optim.AdamW

    def spy(groups, **kw):
        seen["groups"] = groups
        return real(groups, **kw)

    monkeypatch.setattr(train.torch.optim, "AdamW", spy)
    train.fit(model, batch, epochs=1, batch_size=len(batch[0]), loss_fn=loss_fn, weight_decay=0.1, progress=False)
    monkeypatch.setattr(train.torch.optim, "AdamW", real)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in seen["groups"] if g["weight_decay"] > 0 for p in g["params"]}


@pytest.mark.slow
def test_no_weight_decay_on_tokens_in_every_vlm_training_path(monkeypatch):
    """scripts/train_clip.py, train_vlm_parts.py (encoder and LM), train_qformer.py (stage 1 and
    every connector) and lecture 08's Flamingo all train through `fit`: one step of each, and the
    optimizer's decayed group holds weight matrices only."""
    from course_lib import clip, connectors, flamingo, qformer
    from course_lib.recipes import clip as clip_recipe
    from course_lib.recipes import qformer as qformer_recipe
    from course_lib.recipes import vlm
    from course_lib.vit import ViT, ViTConfig

    torch.manual_seed(0)
    tok = scene_tokenizer()
    def encoder() -> ViT:
        return ViT(ViTConfig(image_size=32, patch_size=8, num_classes=0, dim=32, depth=1, num_heads=2, num_registers=2))

    def lm() -> TinyLM:
        return TinyLM(TinyLMConfig(vocab_size=tok.vocab_size, dim=32, depth=1))

    ds = data.scenes(4, "train")
    images = data.to_tensors(ds)[0]
    feats = torch.randn(4, 17, 32)
    qf_config = qformer.QFormerConfig(dim=32, depth=1, num_heads=2, mlp_dim=64, num_queries=4, encoder_dim=32,
                                      vocab_size=tok.vocab_size, max_text_len=40)
    cap_index, cap_ids, cap_targets = qformer_recipe.caption_examples(ds, tok)
    from course_lib.utils import freeze

    # Each path builds its models when it runs: Flamingo and the connectors freeze the encoder and the LM.
    text = (images, tok.encode_batch(ds["caption"], 40))
    paths = {
        "clip": lambda: (clip.clip_tiny(vocab_size=tok.vocab_size, context_length=40, eos_token_id=tok.eos_id),
                         clip_recipe.batch_loss, text),
        "siglip": lambda: (clip.siglip_tiny(vocab_size=tok.vocab_size, context_length=40, eos_token_id=tok.eos_id, vision_pool="map",
                                            image_proj=False), clip_recipe.batch_loss, text),
        "image encoder": lambda: (vlm.AttributeProbe(encoder()), vlm.attribute_loss, (images, vlm.attribute_targets(ds))),
        "language model": lambda: (lm(), vlm.lm_batch_loss, (cap_ids, cap_targets)),
        "Q-Former stage 1": lambda: (qformer.QFormer(qf_config), qformer_recipe.Stage1Loss(feats), (cap_index, cap_ids)),
        "flamingo": lambda: (flamingo.Flamingo(lm(), encoder(), flamingo.FlamingoConfig(image_token_id=tok.image_id, resampler_heads=2,
                                                                                          xattn_heads=2)),
                             lambda m, b: (lm_loss(m(b[0], features=b[1]), b[0]), None),
                             (torch.cat([torch.full((4, 1), tok.image_id), cap_ids], 1), feats[:, None])),
    }
    for name in ("linear", "mlp", "qformer"):
        paths[f"connector {name}"] = lambda name=name: (
            connectors.Connectors(connectors.ConnectorsConfig({"linear": "linear", "mlp": "mlp", "qformer": "qformer"}, 32, 32, qf_config))[name],
            qformer_recipe.ConnectorLoss(freeze(lm()), feats), (cap_index, cap_ids, cap_targets))
    for path, build in paths.items():
        model, loss_fn, batch = build()
        decayed = _decayed_names(model, loss_fn, batch, monkeypatch)
        wrong = sorted(n for n in decayed if any(key in n for key in NEVER_DECAYED))
        print(f"{path}: {len(decayed)} decayed tensors")
        assert decayed and not wrong, f"{path} decays {wrong}"
        assert all(model.get_parameter(n).ndim >= 2 for n in decayed), path


BAD_INPUTS = {
    "ids outside the vocabulary": (lambda: TinyLM(TinyLMConfig(vocab_size=10))(torch.full((1, 2), 12)), "vocab_size=tokenizer.vocab_size"),
    "nothing to generate": (lambda: TinyLM(TinyLMConfig(vocab_size=10)).generate(torch.ones(1, 2, dtype=torch.long), max_new_tokens=0),
                            "max_new_tokens"),
    "no sequences to pad": (lambda: pad_batch([], 0), "no sequences"),
    "answers for other scenes": (lambda: __import__("course_lib.recipes.vlm", fromlist=["x"]).answer_accuracy([], data.scenes(2, "test")),
                                 "answer every scene"),
    "prompt without a connector": (lambda: __import__("course_lib.recipes.vlm", fromlist=["x"]).answer_questions(
        None, scene_tokenizer(), data.scenes(2, "test"), torch.zeros(2), None), "or neither"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(case):
    fn, match = BAD_INPUTS[case]
    with pytest.raises((ValueError, TypeError), match=match):
        fn()
